//! Fault tests against real PostgreSQL: a compute killed mid-query, computes that cannot start
//! (bad data directory, data root the compute user cannot enter, a full disk, a data directory
//! postgres refuses), data that must not be replaced by an empty database (a lost data
//! directory or data root, initdb killed part-way), leftovers of a previous compute (a pgwake
//! killed while its compute shuts down, a postmaster killed under a busy backend), and a flood
//! of garbage connections while real clients keep working. Every wait has a deadline; every
//! test stops its pgwake (and so its computes) and removes its directories.
//!
//! "Port taken" runs the local backend on its own, with its port picker made to hand out a
//! port another program holds first (the kernel's choice for port 0 cannot be predicted from
//! outside). Not here: "manager restarted while clients are held" (the manager runs
//! in-process; there is no separate manager service to restart yet).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use pgwake_compute_manager::Phase;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LONG: Duration = Duration::from_secs(60);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Direct children of `pid`, from /proc.
fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| stat_field(*p, 3) == Some(pid.to_string()))
        .collect()
}

/// Field `n` of /proc/PID/stat counted from 0 (0 pid, 1 comm, 2 state, 3 ppid); `n >= 2`.
fn stat_field(pid: i32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(n - 2).map(str::to_owned)
}

/// Every process of the cluster in `dir`, whoever its parent is now: each Postgres process
/// runs with the data directory as its working directory.
fn cluster_procs(dir: &std::path::Path) -> Vec<i32> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| std::fs::read_link(format!("/proc/{p}/cwd")).is_ok_and(|cwd| cwd == dir))
        .filter(|p| !gone(*p))
        .collect()
}

/// Gone, or a zombie waiting for a reaper that is not us: either way no longer running.
fn gone(pid: i32) -> bool {
    !matches!(stat_field(pid, 2).as_deref(), Some(s) if s != "Z")
}

/// The first error a client gets from connecting through pgwake, with its SQLSTATE.
async fn connect_error(env: &Env, endpoint: &str) -> (String, String) {
    let err = match tokio_postgres::connect(&env.conn_str(endpoint), tokio_postgres::NoTls).await {
        Ok(_) => panic!("connect to {endpoint} unexpectedly worked"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {err:?}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

/// `env.client`, but a failure shows the SQLSTATE, the message and the compute's last log
/// lines instead of just "db error".
async fn client_or_explain(env: &Env, endpoint: &str) -> tokio_postgres::Client {
    match tokio_postgres::connect(&env.conn_str(endpoint), tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            client
        }
        Err(e) => {
            let log = std::fs::read_to_string(env.dir.path().join(format!("data/{endpoint}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            panic!(
                "connect to {endpoint}: {e:?} {:?}\ncompute log (last lines first):\n{}\nstats: {:?}",
                e.as_db_error().map(|d| (d.code().code(), d.message())),
                tail.join("\n"),
                env.stats(endpoint)
            )
        }
    }
}

async fn select_one(env: &Env, endpoint: &str) -> i32 {
    env.client(endpoint)
        .await
        .query_one("select 1", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_killed_mid_query_gives_a_clean_error_and_the_next_connect_wakes_a_new_one() {
    let env = Env::start("", DEMO).await;
    let client = env.client("demo").await;
    client
        .batch_execute("create table t (i int); insert into t values (1)")
        .await
        .unwrap();
    let backend: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let postmaster = postmaster_pid(&env.data_dir("demo")).unwrap();
    assert!(children(postmaster).contains(&backend));
    assert!(cluster_procs(&env.data_dir("demo")).contains(&postmaster));

    let query = tokio::spawn(async move {
        let r = client.query_one("select pg_sleep(60)", &[]).await;
        (r, client)
    });
    // The query must be running in the compute before the kill.
    let watcher = env.client("demo").await;
    let running = async {
        loop {
            let n: i64 = watcher
                .query_one(
                    "select count(*) from pg_stat_activity where pid = $1 and state = 'active'",
                    &[&backend],
                )
                .await
                .unwrap()
                .get(0);
            if n == 1 {
                break;
            }
        }
    };
    tokio::time::timeout(LONG, running)
        .await
        .expect("query running");

    // SIGKILL the postmaster and the query's backend: the compute dies without a word.
    for pid in [postmaster, backend] {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let (res, _client) = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("the client hears about the dead compute promptly")
        .unwrap();
    let err = res.expect_err("the query cannot have succeeded");
    // Either the connection just ends (SIGKILL leaves nobody to say goodbye) or, if the
    // proxy got there first, an ErrorResponse; never a hang or a half-read message.
    assert!(
        err.is_closed() || err.as_db_error().is_some(),
        "unexpected error: {err:?}"
    );
    // The manager notices the exit by itself and forgets the dead address.
    env.wait_phase("demo", Phase::Suspended, LONG).await;
    assert_eq!(env.stats("demo").unwrap().crashes, 1);
    // The other processes of the dead compute (background workers, the watcher's backend)
    // go away by themselves: they watch the postmaster. Until they have, a new postmaster
    // would refuse to start while they still hold the old shared memory.
    let dir = env.data_dir("demo");
    wait_until(LONG, || cluster_procs(&dir).is_empty())
        .await
        .unwrap_or_else(|_| panic!("old compute processes linger: {:?}", cluster_procs(&dir)));
    drop(watcher);

    // Next connect: a new compute, after crash recovery, with the committed row.
    let client = client_or_explain(&env, "demo").await;
    let n: i64 = client
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let s = env.stats("demo").unwrap();
    assert_eq!((s.starts, s.phase), (2, Phase::Running), "{s:?}");
    assert_ne!(postmaster_pid(&env.data_dir("demo")), Some(postmaster));
    drop(client);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_with_a_bad_data_directory_fails_cleanly_and_recovers_once_fixed() {
    let env = Env::start("", DEMO).await;
    let dir = env.data_dir("demo");
    // 1. Not empty and not a data directory: refused before anything runs.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("stray-file"), "not postgres").unwrap();
    let (code, msg) = connect_error(&env, "demo").await;
    assert_eq!(code, "08006", "{msg}");
    assert!(msg.contains("endpoint \"demo\""), "{msg}");
    assert!(
        !msg.contains(&*dir.to_string_lossy()),
        "leaks the path: {msg}"
    );

    // 2. Looks like one (PG_VERSION) but is not: postgres itself fails to start.
    std::fs::remove_file(dir.join("stray-file")).unwrap();
    std::fs::write(dir.join("PG_VERSION"), "15\n").unwrap();
    if is_root() {
        let st = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success());
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, msg) = connect_error(&env, "demo").await;
    assert!(["57P03", "08006"].contains(&code.as_str()), "{code} {msg}");
    assert!(msg.contains("endpoint \"demo\""), "{msg}");
    assert!(
        !msg.contains(&*dir.to_string_lossy()),
        "leaks the path: {msg}"
    );
    let s = env.stats("demo").unwrap();
    assert_eq!((s.phase, s.start_failures), (Phase::Failed, 2), "{s:?}");

    // Fixed by the operator: the next client gets a fresh cluster.
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(select_one(&env, "demo").await, 1);
    assert_eq!(env.stats("demo").unwrap().phase, Phase::Running);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_root_the_compute_user_cannot_enter_fails_cleanly() {
    if !is_root() {
        eprintln!("skipped: needs root (computes run as another user only under root)");
        return;
    }
    let env = Env::start("", DEMO).await;
    let root = env.dir.path().join("data");
    // Owned by root, closed to everyone else: pgwake (root) can create the endpoint's
    // directory, but initdb, running as `postgres`, cannot reach it.
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, msg) = connect_error(&env, "demo").await;
    assert_eq!(code, "08006", "{msg}");
    assert!(msg.contains("endpoint \"demo\""), "{msg}");
    assert!(
        !msg.contains(&*root.to_string_lossy()),
        "leaks the path: {msg}"
    );
    assert_eq!(env.stats("demo").unwrap().phase, Phase::Failed);

    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(select_one(&env, "demo").await, 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_under_the_data_root_fails_cleanly_and_recovers_with_space() {
    let env = Env::start("", DEMO).await;
    let root = env.dir.path().join("data");
    std::fs::create_dir(&root).unwrap();
    // A 4 MiB filesystem: initdb needs ~40 MiB, so it runs out of space part-way.
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0755", "pgwake-test-full"])
        .arg(&root)
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "skipped: cannot mount a size-limited tmpfs here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            env.stop().await;
            return;
        }
        Err(e) => {
            eprintln!("skipped: cannot run mount: {e}");
            env.stop().await;
            return;
        }
    }
    let mount = Mount(root.clone());

    let (code, msg) = connect_error(&env, "demo").await;
    assert_eq!(code, "08006", "{msg}");
    assert!(msg.contains("endpoint \"demo\""), "{msg}");
    assert_eq!(env.stats("demo").unwrap().phase, Phase::Failed);

    // Space freed: initdb cleaned up after itself, and the next client gets a compute.
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(grown.success());
    assert_eq!(select_one(&env, "demo").await, 1);
    // Stop the computes, unmount, and only then remove the directory (`Env::stop` would remove
    // it while the mount still sits on it). On a panic, `mount` drops before `env` too.
    let mut env = env;
    if let Some(p) = env.pgwake.take() {
        p.shutdown().await;
    }
    drop(mount);
    drop(env);
}

/// One garbage client: random bytes in one of a few shapes the proxy must survive. Returns
/// what the proxy answered before it closed the connection.
async fn garbage_client(addr: std::net::SocketAddr, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut bytes: Vec<u8> = Vec::new();
    let random = |rng: &mut rand::rngs::StdRng, n: usize| -> Vec<u8> {
        (0..n).map(|_| rng.gen()).collect::<Vec<u8>>()
    };
    match seed % 5 {
        // Pure noise.
        0 => {
            let n = rng.gen_range(0..300);
            bytes = random(&mut rng, n);
        }
        // A plausible length, then noise (and less of it than promised, sometimes).
        1 => {
            let len = rng.gen_range(8u32..10_300);
            bytes.extend_from_slice(&len.to_be_bytes());
            let n = rng.gen_range(0..(len as usize).min(400));
            bytes.extend(random(&mut rng, n));
        }
        // SSLRequest, then noise where the StartupMessage should be.
        2 => {
            bytes.extend_from_slice(&[0, 0, 0, 8, 4, 210, 22, 47]);
            let n = rng.gen_range(0..200);
            bytes.extend(random(&mut rng, n));
        }
        // A well-formed startup with a random endpoint option.
        3 => {
            let mut ep: String = (0..rng.gen_range(0..80))
                .map(|_| rng.gen_range(b' '..=b'~') as char)
                .collect();
            if rng.gen() {
                ep.insert_str(0, "endpoint=");
            }
            let mut body = vec![0, 3, 0, 0];
            for (k, v) in [("user", "postgres"), ("options", ep.as_str())] {
                body.extend_from_slice(k.as_bytes());
                body.push(0);
                body.extend(v.bytes().filter(|&b| b != 0));
                body.push(0);
            }
            body.push(0);
            bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
            bytes.extend(body);
        }
        // A cancel request with a random key (never one pgwake issued).
        _ => {
            bytes.extend_from_slice(&[0, 0, 0, 16, 4, 210, 22, 46]);
            bytes.extend(random(&mut rng, 8));
        }
    }
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The proxy may close before reading everything; that is fine.
    let _ = s.write_all(&bytes).await;
    let _ = s.shutdown().await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: proxy kept a garbage connection open"))
        .ok();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_garbage_connections_while_real_clients_keep_working() {
    let env = Env::start("", DEMO).await;
    let held = env.client("demo").await;
    let addr = env.addr;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

    let flood = {
        let done = std::sync::Arc::clone(&done);
        tokio::spawn(async move {
            use futures::StreamExt;
            let answers: Vec<(u64, Vec<u8>)> = futures::stream::iter(0..1000u64)
                .map(|seed| async move { (seed, garbage_client(addr, seed).await) })
                .buffer_unordered(50)
                .collect()
                .await;
            done.store(true, std::sync::atomic::Ordering::Release);
            answers
        })
    };
    // Real clients, new connections and an established one, for as long as the flood lasts.
    let mut real = 0u32;
    while !done.load(std::sync::atomic::Ordering::Acquire) || real < 5 {
        assert_eq!(select_one(&env, "demo").await, 1);
        let v: i32 = held.query_one("select 2", &[]).await.unwrap().get(0);
        assert_eq!(v, 2);
        real += 1;
    }
    let answers = tokio::time::timeout(LONG, flood).await.unwrap().unwrap();
    assert_eq!(answers.len(), 1000);
    // Whatever the proxy said is protocol: 'N' to an SSLRequest, then at most an ErrorResponse.
    for (seed, a) in &answers {
        let rest = a.strip_prefix(b"N").unwrap_or(a);
        assert!(
            rest.is_empty() || rest[0] == b'E',
            "seed {seed}: unexpected answer {a:?}"
        );
    }
    // The flood left nothing attached, and the compute started once.
    drop(held);
    env.wait_detached("demo", LONG).await;
    let s = env.stats("demo").unwrap();
    assert_eq!(s.starts, 1, "{s:?}");
    eprintln!("{real} real round trips during 1000 garbage connections");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_taken_by_another_program_is_retried_on_another_port() {
    use pgwake_compute_manager::{ComputeBackend, LocalBackend, LocalConfig};
    use std::sync::{Arc, Mutex};

    // Another program on the port the backend will try first; it hangs up on everyone, so the
    // readiness probe is told nothing useful there.
    let squatter = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let squat = tokio::spawn(async move {
        while let Ok((conn, _)) = squatter.accept().await {
            drop(conn);
        }
    });

    let dir = tempdir();
    let cfg = LocalConfig {
        data_root: dir.path().join("data"),
        create_data_root: true,
        initdb_args: vec!["--no-sync".into()],
        settings: [("shared_buffers".to_string(), "16MB".to_string())].into(),
        ..LocalConfig::default()
    };
    let picked = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&picked);
    let backend = LocalBackend::new(cfg).unwrap().with_port_picker(move || {
        let mut log = log.lock().unwrap();
        let port = if log.is_empty() { taken } else { free_port() };
        log.push(port);
        Ok(port)
    });
    let route = pgwake_router::Route {
        endpoint: pgwake_router::EndpointId::parse("demo").unwrap(),
        backend: pgwake_router::BackendSpec::Local {
            settings: Default::default(),
        },
        idle_timeout: None,
        deep_sleep_after: None,
        allow: Vec::new(),
        max_connections: None,
    };
    let compute = tokio::time::timeout(LONG, backend.start(&route))
        .await
        .expect("start within a minute")
        .expect("started on another port");
    let picked = picked.lock().unwrap().clone();
    assert_eq!(picked.len(), 2, "one retry: {picked:?}");
    assert_eq!(picked[0], taken);
    let port = compute.addr().port().expect("a port");
    assert_eq!(port, picked[1]);
    let log_text = std::fs::read_to_string(dir.path().join("data/demo.log")).unwrap();
    assert!(
        log_text.contains("could not bind") || log_text.contains("already in use"),
        "the first postgres failed for the port: {log_text}"
    );

    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let v: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
    drop(client);
    let _ = conn.await;
    compute.stop().await.unwrap();
    squat.abort();
}

/// Sends SIGKILL to processes on drop, so that a failing test leaves no compute process
/// running (one of them spins on a CPU-bound query).
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if !gone(pid) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_data_directory_is_refused_never_replaced_by_an_empty_one() {
    let env = Env::start("", DEMO).await;
    let client = env.client("demo").await;
    client
        .batch_execute("create table t (i int); insert into t values (1)")
        .await
        .unwrap();
    drop(client);
    env.wait_detached("demo", LONG).await;
    env.suspend("demo").await;

    // The volume holding it is gone (unmounted, deleted by mistake).
    let dir = env.data_dir("demo");
    let away = env.dir.path().join("away");
    std::fs::rename(&dir, &away).unwrap();
    let (code, msg) = connect_error(&env, "demo").await;
    assert_eq!(code, "08006", "{msg}");
    assert!(
        msg.contains("endpoint \"demo\"") && msg.contains("data missing"),
        "{msg}"
    );
    assert!(
        !msg.contains(&*dir.to_string_lossy()),
        "leaks the path: {msg}"
    );
    assert!(!dir.exists(), "an empty cluster was created in its place");
    // An empty directory in its place (a mount point without its volume) is no better.
    std::fs::create_dir(&dir).unwrap();
    let (code, msg) = connect_error(&env, "demo").await;
    assert_eq!(code, "08006", "{msg}");
    assert!(!dir.join("PG_VERSION").exists());

    // Back: served again, with its data.
    std::fs::remove_dir(&dir).unwrap();
    std::fs::rename(&away, &dir).unwrap();
    let client = client_or_explain(&env, "demo").await;
    let n: i64 = client
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    drop(client);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_empty_data_root_is_refused_unless_creating_it_is_allowed() {
    let env = Env::start("[local]\ncreate_data_root = false", DEMO).await;
    let root = env.dir.path().join("data");
    let (code, msg) = connect_error(&env, "demo").await;
    assert_eq!(code, "08006", "{msg}");
    assert!(msg.contains("data missing"), "{msg}");
    assert!(!root.exists(), "the data root was created");
    // An empty directory with no marker: a mount point whose volume is not mounted.
    std::fs::create_dir(&root).unwrap();
    let (code, msg) = connect_error(&env, "demo").await;
    assert_eq!(code, "08006", "{msg}");
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "wrote into it"
    );
    assert_eq!(env.stats("demo").unwrap().phase, Phase::Failed);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initdb_killed_part_way_leaves_no_half_built_cluster_and_the_next_wake_succeeds() {
    let dir = tempdir();
    let real = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .unwrap();
    let real = String::from_utf8(real.stdout).unwrap().trim().to_string();
    // A bin_dir whose initdb is killed (SIGKILL, with its process group) on its first run,
    // once the real initdb has written part of the cluster: as when pgwake or the machine dies
    // during initdb.
    let bin = dir.path().join("bin");
    let state = dir.path().join("state");
    std::fs::create_dir(&bin).unwrap();
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(format!("{real}/postgres"), bin.join("postgres")).unwrap();
    std::fs::write(
        bin.join("initdb"),
        format!(
            "#!/bin/sh\n\
             if mkdir '{state}/first' 2>/dev/null; then\n\
               '{real}/initdb' \"$@\" >/dev/null 2>&1 &\n\
               n=0\n\
               while [ ! -e \"$2/global/pg_control\" ] && [ $n -lt 3000 ]; do sleep 0.01; n=$((n+1)); done\n\
               kill -9 0\n\
             fi\n\
             exec '{real}/initdb' \"$@\"\n",
            state = state.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(bin.join("initdb"), std::fs::Permissions::from_mode(0o755)).unwrap();

    let extra = format!("[local]\nbin_dir = \"{}\"", bin.display());
    let env = Env::start_in(dir, &extra, DEMO).await;
    let (code, msg) = connect_error(&env, "demo").await;
    assert_eq!(code, "08006", "{msg}");
    assert!(state.join("first").exists(), "the killed initdb ran");
    let data = env.data_dir("demo");
    assert!(
        !data.join("PG_VERSION").exists(),
        "a half-built cluster is in the endpoint's place"
    );

    // pgwake itself died during an initdb: its temporary directory is left behind.
    let building = env.dir.path().join("data/.demo.initdb");
    std::fs::create_dir(&building).unwrap();
    std::fs::write(building.join("PG_VERSION"), "15\n").unwrap();
    let client = client_or_explain(&env, "demo").await;
    let n: i64 = client
        .query_one(
            "select count(*) from pg_database where datname = 'postgres'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "a complete cluster");
    assert!(!building.exists(), "the leftover was removed");
    drop(client);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmaster_killed_under_a_busy_backend_its_orphans_go_and_the_next_wake_succeeds() {
    let env = Env::start("", DEMO).await;
    let dir = env.data_dir("demo");
    let client = env.client("demo").await;
    client
        .batch_execute("create table t (i int); insert into t values (1)")
        .await
        .unwrap();
    let backend: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let postmaster = postmaster_pid(&dir).unwrap();
    // CPU-bound for hours, and never waits on anything: a backend in such a query does not
    // notice that its postmaster died.
    let busy = tokio::spawn(async move {
        let _ = client
            .query_one(
                "select count(*) from generate_series(1, 100000) a, generate_series(1, 100000) b",
                &[],
            )
            .await;
    });
    let watcher = env.client("demo").await;
    let running = async {
        loop {
            let n: i64 = watcher
                .query_one(
                    "select count(*) from pg_stat_activity where pid = $1 and state = 'active'",
                    &[&backend],
                )
                .await
                .unwrap()
                .get(0);
            if n == 1 {
                break;
            }
        }
    };
    tokio::time::timeout(LONG, running)
        .await
        .expect("query running");
    drop(watcher);
    let old = cluster_procs(&dir);
    assert!(
        old.contains(&backend) && old.contains(&postmaster),
        "{old:?}"
    );
    let _cleanup = KillOnDrop(old.clone());

    unsafe { libc::kill(postmaster, libc::SIGKILL) };
    env.wait_phase("demo", Phase::Suspended, LONG).await;
    let client = client_or_explain(&env, "demo").await;
    let n: i64 = client
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let left: Vec<i32> = old.iter().copied().filter(|p| !gone(*p)).collect();
    assert!(
        left.is_empty(),
        "processes of the dead compute remain: {left:?}"
    );
    tokio::time::timeout(LONG, busy)
        .await
        .expect("the busy client hears of the dead compute")
        .unwrap();
    drop(client);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_postgres_refuses_is_a_permanent_error() {
    let env = Env::start("", DEMO).await;
    assert_eq!(select_one(&env, "demo").await, 1);
    env.wait_detached("demo", LONG).await;
    env.suspend("demo").await;
    let dir = env.data_dir("demo");
    let mode = |m| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m)).unwrap();

    // Permissions postgres refuses (it wants 0700 or 0750).
    mode(0o777);
    let (code, msg) = connect_error(&env, "demo").await;
    assert_eq!(code, "08006", "{msg}");
    assert!(msg.contains("endpoint \"demo\""), "{msg}");
    assert!(
        !msg.contains(&*dir.to_string_lossy()),
        "leaks the path: {msg}"
    );
    mode(0o700);
    if is_root() {
        // Owned by someone other than the user postgres runs as.
        std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
        let (code, msg) = connect_error(&env, "demo").await;
        assert_eq!(code, "08006", "{msg}");
        let st = std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success());
    }
    // Fixed by the operator: served again.
    assert_eq!(select_one(&env, "demo").await, 1);
    env.stop().await;
}

/// Holds a process still in a ptrace stop until dropped: a stand-in for a process that is
/// simply slow. Not SIGSTOP, since pgwake itself continues stopped processes of a cluster it
/// finds (light sleep's recovery after a crash): a ptrace stop (state `t`) is not a stopped
/// compute, and SIGCONT does not end it. ptrace requests must come from the tracing thread,
/// hence the thread.
struct Held {
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Held {
    fn new(pid: i32) -> Self {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held_tx, held_rx) = std::sync::mpsc::channel::<bool>();
        let thread = std::thread::spawn(move || {
            let null = std::ptr::null_mut::<libc::c_void>();
            // SAFETY: plain ptrace and waitpid calls on a pid; no memory is shared.
            let held = unsafe {
                libc::ptrace(libc::PTRACE_SEIZE, pid, null, null) == 0
                    && libc::ptrace(libc::PTRACE_INTERRUPT, pid, null, null) == 0
                    && libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL) == pid
            };
            held_tx.send(held).unwrap();
            let _ = released.recv();
            // SAFETY: as above; the tracee resumes with its pending signals.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, null, null) };
        });
        assert!(held_rx.recv().unwrap(), "could not hold {pid} with ptrace");
        Self {
            release: Some(release),
            thread: Some(thread),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgwake_killed_while_its_compute_shuts_down_the_next_pgwake_waits_for_it() {
    let dir = tempdir();
    let port = free_port();
    let cfg = dir.path().join("pgwake.toml");
    let text =
        config_text(dir.path(), "", DEMO).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&cfg, text).unwrap();
    let conn = format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres options=endpoint=demo connect_timeout=60"
    );
    let connect = move || {
        let conn = conn.clone();
        async move {
            let (client, c) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
            tokio::spawn(c);
            Ok::<_, tokio_postgres::Error>(client)
        }
    };

    let log1 = dir.path().join("pgwake1.log");
    let mut first = spawn_pgwake_with(&cfg, std::fs::File::create(&log1).unwrap());
    wait_until(LONG, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await
    .expect("pgwake listening");
    let client = connect().await.unwrap();
    client
        .batch_execute("create table t (i int); insert into t values (1)")
        .await
        .unwrap();
    // Busy: a transaction with uncommitted work in progress when pgwake dies.
    let busy = tokio::spawn(async move {
        let _ = client
            .batch_execute("begin; insert into t values (2); select pg_sleep(600)")
            .await;
    });
    let data = dir.path().join("data/demo");
    let postmaster = postmaster_pid(&data).unwrap();
    // The postmaster gets SIGINT (a fast shutdown, with a checkpoint) when pgwake dies. With
    // its checkpointer held, the shutdown checkpoint lasts for as long as the test needs, as
    // when it flushes a lot of data.
    let checkpointer = children(postmaster)
        .into_iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"postgres: checkpointer"))
        })
        .expect("a checkpointer");
    let frozen = Held::new(checkpointer);
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let _ = tokio::time::timeout(LONG, busy).await;

    let connect2 = connect.clone();
    let log2 = dir.path().join("pgwake2.log");
    let mut second = spawn_pgwake_with(&cfg, std::fs::File::create(&log2).unwrap());
    wait_until(LONG, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await
    .expect("second pgwake listening");
    let attempt = tokio::spawn(async move {
        let client = connect2().await?;
        let n: i64 = client
            .query_one("select count(*) from t", &[])
            .await?
            .get(0);
        Ok::<_, tokio_postgres::Error>(n)
    });
    let waiting =
        || std::fs::read_to_string(&log2).is_ok_and(|l| l.contains("previous postmaster"));
    wait_until(LONG, || attempt.is_finished() || waiting())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the second pgwake did not try to start the compute:\n{}",
                std::fs::read_to_string(&log2).unwrap_or_default()
            )
        });
    if attempt.is_finished() {
        let r = attempt.await.unwrap();
        panic!(
            "connect ended while the old postmaster held the data directory: {}\n{}\n{:?}",
            std::fs::read_to_string(&log2).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("data/demo.log")).unwrap_or_default(),
            r.map_err(|e| e
                .as_db_error()
                .map(|d| (d.code().code().to_owned(), d.message().to_owned())))
        );
    }
    assert!(process_alive(postmaster) && !gone(postmaster));
    // The shutdown checkpoint completes, the old postmaster exits; then the new compute starts.
    drop(frozen);
    let n = tokio::time::timeout(LONG, attempt)
        .await
        .expect("connect within a minute")
        .unwrap()
        .unwrap_or_else(|e| panic!("connect after the old postmaster exited: {e:?}"));
    assert_eq!(n, 1, "the committed row, not the uncommitted one");
    assert_ne!(postmaster_pid(&data), Some(postmaster));

    // Stopped cleanly, the second pgwake takes its compute with it.
    unsafe { libc::kill(second.0.id() as i32, libc::SIGTERM) };
    wait_until(LONG, || second.0.try_wait().unwrap().is_some())
        .await
        .expect("pgwake exits after SIGTERM");
    assert!(!data.join("postmaster.pid").exists());
}
