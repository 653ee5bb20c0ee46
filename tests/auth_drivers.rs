//! Real client drivers logging in through SCRAM checked at the proxy (issue 11): node-postgres,
//! asyncpg, pgjdbc and psycopg (libpq, `channel_binding=require` over TLS, also over direct
//! TLS), each plaintext and over TLS, each with a wrong password first (28P01, nothing woken)
//! and then the right one.
//! The driver programs are in tests/drivers/ (`auth_*`); scripts/setup-deps.sh installs them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::scram::{driver_available, roles, self_signed, starts, tls_table, PASSWORD};
use common::*;

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

struct Driver {
    name: &'static str,
    /// Whether its TLS run also binds the channel (SCRAM-SHA-256-PLUS).
    binds_channel: bool,
    /// Whether its TLS run names the endpoint by SNI rather than by `options`.
    uses_sni: bool,
    /// Whether it also runs over PostgreSQL 17's direct TLS (no SSLRequest).
    direct_tls: bool,
    command: fn() -> Command,
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The drivers that can run here; a missing one is skipped (or fails the test under
/// `PGWAKE_REQUIRE_DRIVERS`).
fn drivers() -> Vec<Driver> {
    let mut found = Vec::new();
    let node_pg =
        drivers_dir().join("node_modules/pg/package.json").exists() && runs("node", &["--version"]);
    if driver_available("node-postgres", node_pg, "cd tests/drivers && npm ci") {
        found.push(Driver {
            name: "node-postgres",
            binds_channel: true,
            uses_sni: true,
            direct_tls: false,
            command: || {
                let mut c = Command::new("node");
                c.arg(drivers_dir().join("auth_pg.js"));
                c
            },
        });
    }
    if driver_available(
        "asyncpg",
        runs("python3", &["-c", "import asyncpg"]),
        "pip install asyncpg",
    ) {
        found.push(Driver {
            name: "asyncpg",
            binds_channel: false,
            uses_sni: false,
            direct_tls: false,
            command: || {
                let mut c = Command::new("python3");
                c.arg(drivers_dir().join("auth_asyncpg.py"));
                c
            },
        });
    }
    let jdbc = Path::new(JDBC_JAR).exists() && runs("java", &["-version"]);
    if driver_available("pgjdbc", jdbc, "apt-get install libpostgresql-jdbc-java") {
        found.push(Driver {
            name: "pgjdbc",
            binds_channel: false,
            uses_sni: false,
            direct_tls: false,
            command: || {
                let mut c = Command::new("java");
                c.args(["-cp", JDBC_JAR])
                    .arg(drivers_dir().join("AuthJdbc.java"));
                c
            },
        });
    }
    let psycopg_binary = Command::new("python3")
        .args(["-c", "import psycopg"])
        .env("PSYCOPG_IMPL", "binary")
        .output()
        .is_ok_and(|o| o.status.success());
    if driver_available("psycopg", psycopg_binary, "pip install 'psycopg[binary]'") {
        found.push(Driver {
            name: "psycopg",
            binds_channel: true,
            uses_sni: true,
            direct_tls: true,
            command: || {
                let mut c = Command::new("python3");
                // psycopg-binary's own libpq (new enough for direct TLS), not Debian's.
                c.arg(drivers_dir().join("auth_psycopg.py"))
                    .env("PSYCOPG_IMPL", "binary");
                c
            },
        });
    }
    found
}

/// Where and how a driver connects.
struct Target<'a> {
    env: &'a Env,
    /// The CA file: TLS, verified; `None`: plaintext.
    ca: Option<&'a Path>,
    /// Direct TLS (PostgreSQL 17) instead of SSLRequest.
    direct: bool,
}

/// Runs `driver` with `password`: its one-line answer (`ok <user> <tls>` or `error <SQLSTATE>`).
async fn run(driver: &Driver, target: &Target<'_>, password: &str) -> String {
    let mut cmd = (driver.command)();
    cmd.env("PGW_HOST", "127.0.0.1")
        .env("PGW_PORT", target.env.addr.port().to_string())
        .env("PGW_USER", "postgres")
        .env("PGW_PASSWORD", password)
        .env("PGW_ENDPOINT", "demo");
    if let Some(ca) = target.ca {
        cmd.env("PGW_CA", ca);
        if driver.uses_sni {
            cmd.env("PGW_SERVERNAME", "demo.db.localtest");
        }
        if target.direct {
            cmd.env("PGW_SSLNEGOTIATION", "direct");
        }
    }
    let name = driver.name;
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{name} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_log_in_through_proxy_side_scram_and_a_wrong_password_wakes_nothing() {
    let drivers = drivers();
    if drivers.is_empty() {
        return;
    }
    let dir = tempdir();
    let (local, endpoint) = roles(dir.path());
    // Valid for the SNI name and for 127.0.0.1, so drivers that send no SNI verify it too.
    let (cert, key) = self_signed(dir.path(), "proxy", &["*.db.localtest", "127.0.0.1"]);
    let extra = format!("{local}{}", tls_table(&cert, &key));
    let env = Env::start_in(dir, &extra, &endpoint).await;
    let plain = Target {
        env: &env,
        ca: None,
        direct: false,
    };
    let tls = Target {
        env: &env,
        ca: Some(&cert),
        direct: false,
    };
    let direct_tls = Target {
        env: &env,
        ca: Some(&cert),
        direct: true,
    };
    // Direct TLS needs libpq 17; psycopg-binary's may be older somewhere.
    let mut direct_drivers = Vec::new();
    for d in drivers.iter().filter(|d| d.direct_tls) {
        match run(d, &direct_tls, "wrong").await.as_str() {
            "error 28P01" => direct_drivers.push(d),
            skip if skip.starts_with("skip") => {
                eprintln!("SKIPPED {} over direct TLS: {skip}", d.name)
            }
            other => panic!("{} over direct TLS, wrong password: {other}", d.name),
        }
    }

    for d in &drivers {
        for (target, how) in [(&plain, "plaintext"), (&tls, "TLS")] {
            assert_eq!(
                run(d, target, "wrong").await,
                "error 28P01",
                "{} over {how}, wrong password",
                d.name
            );
        }
    }
    assert_eq!(starts(&env), 0, "failed logins woke nothing");
    assert!(postmaster_pid(&env.data_dir("demo")).is_none());

    for d in &drivers {
        assert_eq!(
            run(d, &plain, PASSWORD).await,
            "ok postgres false",
            "{} over plaintext",
            d.name
        );
        let how = if d.binds_channel {
            "TLS with channel binding"
        } else {
            "TLS"
        };
        assert_eq!(
            run(d, &tls, PASSWORD).await,
            "ok postgres true",
            "{} over {how}",
            d.name
        );
    }
    for d in direct_drivers {
        assert_eq!(
            run(d, &direct_tls, PASSWORD).await,
            "ok postgres true",
            "{} over direct TLS with channel binding",
            d.name
        );
    }
    // One wake for all of them: the compute stays up between logins.
    assert_eq!(starts(&env), 1);
    eprintln!(
        "logged in through proxy-side SCRAM: {}",
        drivers
            .iter()
            .map(|d| d.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    env.stop().await;
}
