//! Spare compute connections (`[proxy] spare_max_age`): a busy endpoint's next session starts
//! on a connection opened ahead of it. Each session must still be exactly what a fresh
//! connection gives, a spare must never keep a compute awake, and a spare that turns out dead
//! must cost a retry, never the client's session.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{http_get, metric, stdout, wait_until, Env, DEMO};
use pgwake_compute_manager::Phase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const LONG: Duration = Duration::from_secs(60);

async fn spares(admin: SocketAddr, outcome: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics").await;
    metric(
        &text,
        &format!("pgwake_spare_connections_total{{outcome=\"{outcome}\"}}"),
    )
}

/// pgwake with `extra` config and /metrics, and the demo endpoint's table `spare_log`.
async fn started(extra: &str) -> (Env, SocketAddr) {
    let env = Env::start_with(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n{extra}"), DEMO).await;
    let admin = env.pgwake().admin_addr().unwrap();
    let c = env.client("demo").await;
    c.batch_execute("create table spare_log (pid int); insert into spare_log values (0)")
        .await
        .unwrap();
    drop(c);
    (env, admin)
}

/// After a session on a spare, so the endpoint is busy, one more session runs `sql`: the
/// spare it opens is the one left waiting when the compute goes idle.
async fn busy_then_idle(env: &Env, admin: SocketAddr, sql: &str) {
    sessions_until_used(env, admin, 1.0).await;
    let c = env.client("demo").await;
    c.batch_execute(sql).await.unwrap();
    drop(c);
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// Starts sessions one after another (each one a query, then closed) until `used` sessions
/// in all have started on a spare; gives the backend pids seen.
async fn sessions_until_used(env: &Env, admin: SocketAddr, used: f64) -> Vec<i32> {
    let mut pids = Vec::new();
    for _ in 0..200 {
        if spares(admin, "used").await >= used {
            return pids;
        }
        let c = env.client("demo").await;
        let n = count(&c, "select count(*) from spare_log").await;
        let pid: i32 = c
            .query_one(
                "insert into spare_log values (pg_backend_pid()) returning pid",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n as usize, pids.len() + 1, "every earlier row is visible");
        pids.push(pid);
    }
    panic!("no session started on a spare in 200");
}

/// Sessions of a busy endpoint start on spares, with tokio-postgres and psql: each one is a
/// backend of its own that sees every row committed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_endpoints_sessions_start_on_spares_and_stay_correct() {
    let (env, admin) = started("").await;

    let pids = sessions_until_used(&env, admin, 3.0).await;
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        pids.len(),
        "one backend per session: {pids:?}"
    );

    // psql, whose startup differs (application_name, client_encoding), on a spare too.
    let before = spares(admin, "used").await;
    let out = env.psql(
        "demo",
        "select current_setting('application_name') || ':' || count(*) from spare_log",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), format!("psql:{}", pids.len() + 1));
    assert_eq!(
        spares(admin, "used").await,
        before + 1.0,
        "psql's session on a spare"
    );
    assert_eq!(spares(admin, "dead").await, 0.0);
    env.stop().await;
}

/// An idle compute is suspended with a spare open to it: the spare holds no session. The
/// next client gets a working session: the spare to the stopped compute is found closed and a
/// new connection made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_never_keeps_a_compute_awake() {
    let (env, admin) =
        started("[proxy]\nspare_max_age = \"50s\"\n[compute]\nidle_timeout = \"1s\"").await;
    busy_then_idle(&env, admin, "insert into spare_log values (-1)").await;

    env.wait_phase("demo", Phase::Suspended, LONG).await;
    let c = env.client("demo").await;
    let n = count(&c, "select count(*) from spare_log where pid = -1").await;
    assert_eq!(n, 1, "the row committed before the suspend");
    let discarded = spares(admin, "dead").await + spares(admin, "moved").await;
    assert!(
        discarded >= 1.0,
        "the spare to the stopped compute was discarded"
    );
    drop(c);
    env.stop().await;
}

/// Light sleep: a spare open to a compute that is frozen waits through the freeze and is used
/// once the compute runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_to_a_frozen_compute_is_used_once_it_runs_again() {
    let (env, admin) = started(
        "[proxy]\nspare_max_age = \"50s\"\n[compute]\nidle_timeout = \"1s\"\ndeep_sleep_after = \"120s\"",
    )
    .await;
    busy_then_idle(&env, admin, "select 1").await;
    env.wait_phase("demo", Phase::Frozen, LONG).await;

    let used = spares(admin, "used").await;
    let c = env.client("demo").await;
    let n = count(&c, "select count(*) from spare_log").await;
    assert!(n >= 2, "{n} rows");
    assert_eq!(
        spares(admin, "used").await,
        used + 1.0,
        "the spare was used"
    );
    drop(c);
    env.stop().await;
}

/// A compute that speaks just enough of the protocol for a client to log in; the first
/// startup that arrives after `doom` is set gets its connection closed without an answer, as
/// a backend that died after the proxy checked its spare would.
struct FakeCompute {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    startups: Arc<AtomicUsize>,
    doom: Arc<AtomicBool>,
    doomed: Arc<AtomicUsize>,
}

impl FakeCompute {
    async fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Self {
            addr: l.local_addr().unwrap(),
            accepted: Arc::default(),
            startups: Arc::default(),
            doom: Arc::default(),
            doomed: Arc::default(),
        };
        let (accepted, startups, doom, doomed) = (
            fake.accepted.clone(),
            fake.startups.clone(),
            fake.doom.clone(),
            fake.doomed.clone(),
        );
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (startups, doom, doomed) = (startups.clone(), doom.clone(), doomed.clone());
                tokio::spawn(async move {
                    let mut len = [0u8; 4];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                    s.read_exact(&mut body).await.unwrap();
                    if doom.swap(false, Ordering::SeqCst) {
                        doomed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    startups.fetch_add(1, Ordering::SeqCst);
                    let mut hello = Vec::new();
                    hello.extend_from_slice(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
                    hello.extend_from_slice(&[b'K', 0, 0, 0, 12, 0, 0, 0, 42, 1, 2, 3, 4]);
                    hello.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
                    s.write_all(&hello).await.unwrap();
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest).await;
                });
            }
        });
        fake
    }
}

async fn login(env: &Env) {
    let (client, conn) = tokio_postgres::connect(&env.conn_str("fake"), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("login through pgwake: {e}"));
    let task = tokio::spawn(conn);
    drop(client);
    let _ = task.await;
}

/// The spare is checked when taken, but its backend can still die before it reads the
/// startup: the session then starts on a new connection, and the client never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_that_dies_after_it_was_taken_costs_a_retry_not_the_session() {
    let fake = FakeCompute::start().await;
    let endpoints = format!(
        "[[endpoint]]\nid = \"fake\"\nbackend = \"static\"\naddress = \"{}\"\n",
        fake.addr
    );
    let env = Env::start_with("[admin]\nlisten = \"127.0.0.1:0\"", &endpoints).await;
    let admin = env.pgwake().admin_addr().unwrap();
    login(&env).await;
    login(&env).await;
    // Two sessions, and the spare the second one opened: three connections, two startups.
    wait_until(LONG, || fake.accepted.load(Ordering::SeqCst) == 3)
        .await
        .expect("the spare was opened");
    assert_eq!(fake.startups.load(Ordering::SeqCst), 2);

    fake.doom.store(true, Ordering::SeqCst);
    login(&env).await;
    assert_eq!(
        fake.doomed.load(Ordering::SeqCst),
        1,
        "the spare got the startup"
    );
    assert_eq!(
        fake.startups.load(Ordering::SeqCst),
        3,
        "and a new one took over"
    );
    assert_eq!(spares(admin, "dead").await, 1.0);
    assert_eq!(spares(admin, "used").await, 0.0);

    // The next one uses the spare the third session opened.
    wait_until(LONG, || fake.accepted.load(Ordering::SeqCst) == 5)
        .await
        .expect("another spare was opened");
    login(&env).await;
    assert_eq!(spares(admin, "used").await, 1.0);
    env.stop().await;
}

/// `spare_max_age = "0s"`: every session connects anew, however busy the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spares_when_turned_off() {
    let fake = FakeCompute::start().await;
    let endpoints = format!(
        "[[endpoint]]\nid = \"fake\"\nbackend = \"static\"\naddress = \"{}\"\n",
        fake.addr
    );
    let env = Env::start_with(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[proxy]\nspare_max_age = \"0s\"",
        &endpoints,
    )
    .await;
    let admin = env.pgwake().admin_addr().unwrap();
    for _ in 0..5 {
        login(&env).await;
    }
    // With spares, the fifth session would have been the third on one.
    assert_eq!(fake.accepted.load(Ordering::SeqCst), 5);
    assert_eq!(spares(admin, "used").await, 0.0);
    env.stop().await;
}
