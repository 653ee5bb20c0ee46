//! Wake-on-connect end to end: real PostgreSQL computes started by the local backend, driven
//! through pgwake by psql and tokio-postgres.

mod common;

use std::time::Duration;

use common::*;
use pgwake_compute_manager::Phase;

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_cold_start_warm_reconnect_idle_suspend_and_wake_again() {
    let env = Env::start(
        "",
        "[[endpoint]]\nid = \"demo\"\nbackend = \"local\"\nidle_timeout = \"1s\"\n",
    )
    .await;
    assert!(
        env.stats("demo").is_none(),
        "nothing started before the first client"
    );

    // Cold: initdb, start, hold the client, forward.
    let out = env.psql("demo", "select 41 + 1");
    assert_eq!(stdout(&out), "42");
    let s = env.stats("demo").unwrap();
    assert_eq!((s.starts, s.start_failures), (1, 0));
    let pid = postmaster_pid(&env.data_dir("demo")).expect("postmaster.pid of the running compute");
    assert!(process_alive(pid));

    // Warm: same compute, no new start.
    assert_eq!(
        stdout(&env.psql("demo", "select current_setting('port')::int > 0")),
        "t"
    );
    assert_eq!(env.stats("demo").unwrap().starts, 1);

    // Idle: the process goes away by itself after idle_timeout with no client.
    env.wait_phase("demo", Phase::Suspended, LONG).await;
    wait_until(LONG, || !process_alive(pid))
        .await
        .expect("postmaster exited");
    assert!(
        !env.data_dir("demo").join("postmaster.pid").exists(),
        "clean shutdown removes the lock file"
    );
    assert_eq!(env.stats("demo").unwrap().suspends, 1);

    // And the next connect wakes it again, on the existing data directory.
    assert_eq!(stdout(&env.psql("demo", "select 'again'")), "again");
    assert_eq!(env.stats("demo").unwrap().starts, 2);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_options_are_passed_through_without_the_endpoint() {
    let env = Env::start("", DEMO).await;
    let conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres application_name=pgwake-test options='-c statement_timeout=4321 endpoint=demo -c DateStyle=ISO,\\\\ DMY'",
        env.addr.port()
    );
    let (client, c) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(c);
    let row = client
        .query_one(
            "select current_setting('statement_timeout'), current_setting('DateStyle'), current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "4321ms");
    assert_eq!(row.get::<_, String>(1), "ISO, DMY");
    assert_eq!(row.get::<_, String>(2), "pgwake-test");
    // The endpoint option never reaches the compute as a setting.
    let err = client
        .query_one("select current_setting('endpoint')", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT)
    );
    drop(client);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_one_start() {
    let env = Env::start("", DEMO).await;
    let conns = futures::future::join_all((0..200).map(|i| {
        let cs = env.conn_str("demo");
        async move {
            let (client, c) = tokio_postgres::connect(&cs, tokio_postgres::NoTls).await?;
            let task = tokio::spawn(c);
            let v: i32 = client.query_one("select $1::int", &[&i]).await?.get(0);
            assert_eq!(v, i);
            Ok::<_, tokio_postgres::Error>((client, task))
        }
    }))
    .await;
    let failures: Vec<_> = conns.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    let s = env.stats("demo").unwrap();
    assert_eq!(s.starts, 1, "exactly one start for 200 clients: {s:?}");
    assert_eq!(s.attached, 200);
    drop(conns);
    env.wait_detached("demo", LONG).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_rows_survive_twenty_suspend_wake_cycles() {
    let env = Env::start("", DEMO).await;
    let id = pgwake_router::EndpointId::parse("demo").unwrap();
    let client = env.client("demo").await;
    client
        .batch_execute("create table t (i int primary key, v text)")
        .await
        .unwrap();
    drop(client);
    for cycle in 0..20 {
        env.wait_detached("demo", LONG).await;
        assert!(
            env.pgwake().manager.suspend(&id).await,
            "cycle {cycle}: suspend"
        );
        assert_eq!(env.stats("demo").unwrap().phase, Phase::Suspended);
        let client = env.client("demo").await;
        let n: i64 = client
            .query_one("select count(*) from t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, cycle, "rows committed before suspend {cycle}");
        let sum: Option<i64> = client
            .query_one("select sum(i)::bigint from t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(sum.unwrap_or(0), (0..cycle).sum::<i64>());
        client
            .execute(
                "insert into t values ($1, repeat('x', 1000))",
                &[&(cycle as i32)],
            )
            .await
            .unwrap();
        drop(client);
    }
    let s = env.stats("demo").unwrap();
    assert_eq!((s.starts, s.suspends, s.crashes), (21, 20, 0));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_compute_is_noticed_and_restarted() {
    let env = Env::start("", DEMO).await;
    let client = env.client("demo").await;
    client
        .batch_execute("create table kept (i int); insert into kept values (7)")
        .await
        .unwrap();
    let pid = postmaster_pid(&env.data_dir("demo")).unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // Idle backends exit as soon as they see the postmaster die; the session through pgwake
    // must then end with an error, not hang.
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        match tokio::time::timeout_at(deadline, client.simple_query("select 1")).await {
            Ok(Err(_)) => break,
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(_) => panic!("session on a dead compute neither failed nor answered"),
        }
    }
    env.wait_phase("demo", Phase::Suspended, LONG).await;
    assert_eq!(env.stats("demo").unwrap().crashes, 1);
    drop(client);
    let client = env.client("demo").await;
    let v: i32 = client
        .query_one("select i from kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 7, "committed before the crash, recovered after");
    assert_eq!(env.stats("demo").unwrap().starts, 2);
    drop(client);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_failures_are_reported_to_the_client_without_internals() {
    let env = Env::start(
        "",
        "[[endpoint]]\nid = \"broken\"\nbackend = \"local\"\n[[endpoint]]\nid = \"ok\"\nbackend = \"local\"\n",
    )
    .await;
    // A data directory that is not a cluster: pgwake must not initdb over somebody's files.
    let dir = env.data_dir("broken");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("precious.txt"), "not a cluster").unwrap();
    let err = tokio_postgres::connect(&env.conn_str("broken"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("wake must fail");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "08006");
    assert!(
        db.message().contains("\"broken\"") && db.message().contains("data directory"),
        "{}",
        db.message()
    );
    assert!(
        !db.message().contains(dir.to_str().unwrap()),
        "path leaked: {}",
        db.message()
    );
    assert!(dir.join("precious.txt").exists());
    // Other endpoints are unaffected.
    assert_eq!(stdout(&env.psql("ok", "select 1")), "1");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_binaries_are_a_clear_error() {
    let dir = tempdir();
    let text = config_text(dir.path(), "", DEMO)
        .replace("[local]", "[local]\nbin_dir = \"/nonexistent/bin\"");
    let pgwake = pgwake::Pgwake::start(pgwake::Config::parse(&text).unwrap())
        .await
        .unwrap();
    let cs = format!(
        "host=127.0.0.1 port={} user=postgres options=endpoint=demo",
        pgwake.local_addr().port()
    );
    let err = tokio_postgres::connect(&cs, tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "08006");
    assert!(db.message().contains("misconfigured"), "{}", db.message());
    assert!(!db.message().contains("/nonexistent"), "{}", db.message());
    pgwake.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_computes_log_is_rotated_and_stays_under_twice_the_limit() {
    const LIMIT: u64 = 64 * 1024;
    let env = Env::start("[local]\nlog_max_size = \"64KiB\"\n", DEMO).await;
    let client = env.client("demo").await;
    // About 10 times the limit, through the compute's stderr.
    client
        .batch_execute(
            "do $$ begin for i in 1..5000 loop raise log 'filler % %', i, repeat('x', 100); \
             end loop; end $$",
        )
        .await
        .unwrap();
    let log = env.data_dir("demo").with_extension("log");
    let rotated = env.data_dir("demo").with_extension("log.1");
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    wait_until(LONG, || size(&rotated) > 0)
        .await
        .expect("the log rotated to <id>.log.1");
    let total = size(&log) + size(&rotated);
    assert!(
        size(&log) <= LIMIT && size(&rotated) <= LIMIT,
        "{} + {} bytes",
        size(&log),
        size(&rotated)
    );
    assert!(total < 2 * LIMIT);
    assert!(std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("LOG:  filler"));
    // The compute is unaffected by its log's rotation.
    let row = client.query_one("select 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    drop(client);
    env.stop().await;
}
