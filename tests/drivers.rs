//! A third client library through pgwake: psycopg 3 (Python, libpq underneath).

mod common;

use common::*;

fn python_with_psycopg() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import psycopg"])
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_through_pgwake() {
    if !python_with_psycopg() {
        // .ci/run installs psycopg and sets this, so CI can never skip it silently.
        assert!(
            std::env::var_os("PGWAKE_REQUIRE_DRIVERS").is_none(),
            "psycopg is required (pip install psycopg) but not importable"
        );
        eprintln!("SKIPPED: python3 cannot import psycopg (pip install psycopg)");
        return;
    }
    let env = Env::start("", DEMO).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/drivers/psycopg_check.py"
    );
    let conninfo = format!("{} application_name=psycopg-test", env.conn_str("demo"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .arg(conninfo)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(stdout(&out), "psycopg ok");
    assert_eq!(env.stats("demo").unwrap().starts, 1);
    env.stop().await;
}
