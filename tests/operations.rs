//! Issue-4 operations: PROXY protocol, cancellation, metrics/health, limits, allowlist, drain.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use pgwake_compute_manager::Phase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LONG: Duration = Duration::from_secs(60);

/// Opens a TCP connection that starts with `header`, then runs a tokio-postgres session on it.
async fn connect_with_header(
    addr: SocketAddr,
    header: &[u8],
    conn_str: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(header).await.unwrap();
    let cfg: tokio_postgres::Config = conn_str.parse().unwrap();
    let (client, conn) = cfg.connect_raw(s, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

fn v2_header(src: &str) -> Vec<u8> {
    let src: SocketAddr = src.parse().unwrap();
    let dst: SocketAddr = "10.0.0.1:5432".parse().unwrap();
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_address_drives_the_allowlist() {
    let env = Env::start_with(
        "[proxy]\nproxy_protocol = \"required\"",
        "[[endpoint]]\nid = \"demo\"\nbackend = \"local\"\nallow = [\"10.1.0.0/16\"]\n",
    )
    .await;
    let cs = env.conn_str("demo");
    // The header says 10.1.2.3: allowed, although the socket comes from 127.0.0.1.
    let c = connect_with_header(env.addr, &v2_header("10.1.2.3:40000"), &cs)
        .await
        .unwrap();
    assert_eq!(
        c.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    drop(c);
    // v1 text header with an address outside the allowlist: 28000, and no wake.
    let err = connect_with_header(
        env.addr,
        b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 5432\r\n",
        &cs,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.as_db_error().unwrap().code().code(), "28000");
    // Required mode without a header: closed without a Postgres message.
    let err = tokio_postgres::connect(&cs, tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert!(err.as_db_error().is_none(), "{err}");
    assert_eq!(env.stats("demo").unwrap().starts, 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_refuses_before_any_wake() {
    let env = Env::start(
        "",
        "[[endpoint]]\nid = \"locked\"\nbackend = \"local\"\nallow = [\"10.0.0.0/8\"]\n",
    )
    .await;
    let err = tokio_postgres::connect(&env.conn_str("locked"), tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "28000");
    assert!(db.message().contains("\"locked\""), "{}", db.message());
    assert!(env.stats("locked").is_none(), "the compute was never woken");
    assert!(!env.data_dir("locked").exists(), "not even initdb ran");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_tokio_postgres_and_wrong_keys_do_nothing() {
    let env = Env::start("", DEMO).await;
    let client = env.client("demo").await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let r = client.simple_query("select pg_sleep(60)").await;
        (r, client)
    });
    // Cancel once the query is really running on the compute.
    let watcher = env.client("demo").await;
    wait_for_sleeping(&watcher).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (r, client) = tokio::time::timeout(LONG, sleeper).await.unwrap().unwrap();
    let err = r.expect_err("pg_sleep(60) cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );

    // A forged key (right pid range, wrong secret) reaches nobody: the query finishes.
    let sleeper =
        tokio::spawn(async move { client.simple_query("select pg_sleep(3)").await.map(|_| ()) });
    wait_for_sleeping(&watcher).await;
    for pid in [1i32, 42, i32::MAX] {
        let mut s = TcpStream::connect(env.addr).await.unwrap();
        let mut msg = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        msg.extend_from_slice(&pid.to_be_bytes());
        msg.extend_from_slice(&[1, 2, 3, 4]);
        s.write_all(&msg).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        assert!(buf.is_empty(), "cancel requests get no answer");
    }
    tokio::time::timeout(LONG, sleeper)
        .await
        .unwrap()
        .unwrap()
        .expect("not cancelled");
    drop(watcher);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_ctrl_c_cancels_through_pgwake() {
    let env = Env::start("", DEMO).await;
    let watcher = env.client("demo").await;
    let mut psql = std::process::Command::new("psql")
        .arg(env.conn_str("demo"))
        .args(["-X", "-c", "select pg_sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_sleeping(&watcher).await;
    // What Ctrl-C in a terminal does: SIGINT to psql, which sends a CancelRequest.
    unsafe { libc::kill(psql.id() as i32, libc::SIGINT) };
    let out = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + LONG;
        while psql.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = psql.kill();
                panic!("psql still running after Ctrl-C");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        psql.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    drop(watcher);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_limits() {
    let env = Env::start_with(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[limits]\nmax_connections_per_endpoint = 2\nconnections_per_ip_per_second = 0.001\nconnections_per_ip_burst = 8",
        &format!("{DEMO}[[endpoint]]\nid = \"roomy\"\nbackend = \"local\"\nmax_connections = 100\n"),
    )
    .await;
    let admin = env.pgwake().admin_addr().unwrap();
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    assert_eq!(http_get(admin, "/nope").await.0, 404);

    let a = env.client("demo").await;
    let b = env.client("demo").await;
    // Third at once: over the endpoint cap.
    let err = tokio_postgres::connect(&env.conn_str("demo"), tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(err.as_db_error().unwrap().code().code(), "53300");
    let (_, text) = http_get(admin, "/metrics").await;
    assert_eq!(metric(&text, "pgwake_connections_active"), 2.0);
    assert_eq!(
        metric(&text, "pgwake_wake_requests_total{outcome=\"cold\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "pgwake_wake_requests_total{outcome=\"warm\"}"),
        1.0
    );
    assert_eq!(metric(&text, "pgwake_computes{state=\"running\"}"), 1.0);
    assert_eq!(
        metric(
            &text,
            "pgwake_endpoint_state{endpoint=\"demo\",state=\"running\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "pgwake_endpoint_state{endpoint=\"demo\",state=\"suspended\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(
            &text,
            "pgwake_connection_errors_total{kind=\"endpoint_full\",side=\"client\"}"
        ),
        1.0
    );
    assert_eq!(
        a.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    drop((a, b));
    env.wait_detached("demo", LONG).await;

    // Opened now, used for the drain check at the end.
    let c = env.client("demo").await;
    // The IP bucket held 8: four used above, now four more and then a refusal.
    // Held open, on an endpoint whose own cap is high: only the rate can refuse.
    let mut refused = 0;
    let mut held = Vec::new();
    for _ in 0..5 {
        match tokio_postgres::connect(&env.conn_str("roomy"), tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                held.push(c);
            }
            Err(e) => {
                assert_eq!(e.as_db_error().unwrap().code().code(), "53300");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 1);
    assert_eq!(held.len(), 4);
    drop(held);
    let (_, text) = http_get(admin, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "pgwake_connection_errors_total{kind=\"rate_limited\",side=\"client\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "pgwake_connection_errors_total{kind=\"endpoint_full\",side=\"client\"}"
        ),
        1.0
    );
    assert!(
        metric(
            &text,
            "pgwake_forwarded_bytes_total{direction=\"compute_to_client\"}"
        ) > 0.0
    );
    assert!(metric(&text, "pgwake_wake_duration_seconds_count{kind=\"cold\"}") >= 1.0);

    // Drain: readyz flips at once; a query already running finishes within the drain timeout.
    let running = tokio::spawn(async move {
        c.query_one("select 7 from pg_sleep(0.5)", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    let watcher_free = env.pgwake().health.clone();
    let Env { pgwake, dir, .. } = env;
    let shutdown = tokio::spawn(pgwake.unwrap().shutdown());
    wait_until(LONG, || !watcher_free.is_ready()).await.unwrap();
    assert_eq!(http_get(admin, "/readyz").await.0, 503);
    assert_eq!(running.await.unwrap().unwrap(), 7);
    shutdown.await.unwrap();
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_rate_limit_refuses_with_53300() {
    let env = Env::start_with(
        "[compute]\nmax_starts_per_minute = 1\nwake_timeout = \"60s\"",
        DEMO,
    )
    .await;
    drop(env.client("demo").await);
    env.wait_detached("demo", LONG).await;
    env.suspend("demo").await;
    env.wait_phase("demo", Phase::Suspended, LONG).await;
    let err = tokio_postgres::connect(&env.conn_str("demo"), tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(err.as_db_error().unwrap().code().code(), "53300");
    assert_eq!(env.stats("demo").unwrap().starts, 1);
    env.stop().await;
}

/// An endpoint removed by a reload keeps its running compute while a session uses it; once
/// suspended, it leaves no state in the manager and no metric series behind (issue 10).
#[tokio::test]
async fn an_endpoint_removed_by_a_reload_leaves_no_state_once_suspended() {
    let admin_cfg = "[admin]\nlisten = \"127.0.0.1:0\"";
    let second = "[[endpoint]]\nid = \"second\"\nbackend = \"local\"\n";
    let env = Env::start_with(admin_cfg, &format!("{DEMO}{second}")).await;
    let admin = env.pgwake().admin_addr().unwrap();
    let client = env.client("second").await;
    let (_, text) = http_get(admin, "/metrics").await;
    assert!(text.contains("endpoint=\"second\""), "{text}");

    let path = env.dir.path().join("reloaded.toml");
    std::fs::write(&path, config_text(env.dir.path(), admin_cfg, DEMO)).unwrap();
    assert_eq!(env.pgwake().reload(&path).unwrap().table.removed, 1);
    let v: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1, "a live session keeps its compute across the removal");
    assert_eq!(env.stats("second").unwrap().phase, Phase::Running);

    drop(client);
    env.wait_detached("second", Duration::from_secs(10)).await;
    env.suspend("second").await;
    wait_until(Duration::from_secs(10), || env.stats("second").is_none())
        .await
        .unwrap_or_else(|_| panic!("state kept: {:?}", env.stats("second")));
    let (_, text) = http_get(admin, "/metrics").await;
    assert!(!text.contains("endpoint=\"second\""), "{text}");
    assert_eq!(metric(&text, "pgwake_computes{state=\"suspended\"}"), 0.0);
    env.stop().await;
}
