//! The pgwake binary as users run it: config file, SIGHUP reload, SIGTERM shutdown.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(60);

/// What `pid`'s fds point at, for a failure message.
fn open_fds(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn conn(port: u16, endpoint: &str) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=postgres options=endpoint={endpoint}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_endpoints_and_sigterm_stops_cleanly() {
    let dir = tempdir();
    let port = free_port();
    let admin_port = free_port();
    let cfg_path = dir.path().join("pgwake.toml");
    let write_cfg = |endpoints: &str| {
        let extra = format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"");
        let text = config_text(dir.path(), &extra, endpoints)
            .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
        std::fs::write(&cfg_path, text).unwrap();
    };
    write_cfg(DEMO);
    let check = Command::new(env!("CARGO_BIN_EXE_pgwake"))
        .arg("--check-config")
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");

    let mut child = spawn_pgwake(&cfg_path);
    let pid = child.0.id() as i32;
    wait_until(LONG, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await
    .expect("pgwake listening");

    assert_eq!(stdout(&psql(&conn(port, "demo"), "select 1")), "1");
    // A session that stays open across the reloads below.
    let (client, c) = tokio_postgres::connect(&conn(port, "demo"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(c);

    let unknown = psql(&conn(port, "second"), "select 1");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("does not exist"));

    write_cfg(&format!(
        "{DEMO}[[endpoint]]\nid = \"second\"\nbackend = \"local\"\n"
    ));
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_until(LONG, || {
        psql(&conn(port, "second"), "select 2").status.success()
    })
    .await
    .expect("new endpoint routable after SIGHUP");

    // A broken file keeps the old table.
    std::fs::write(&cfg_path, "[[endpoint]]\nid = \"BAD\"\n").unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let v: i32 = client.query_one("select 3", &[]).await.unwrap().get(0);
    assert_eq!(v, 3, "live session survives reloads");
    assert_eq!(stdout(&psql(&conn(port, "second"), "select 4")), "4");

    let demo_dir = dir.path().join("data/demo");
    assert!(demo_dir.join("postmaster.pid").exists());
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin_port).into();
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    // SIGTERM with a session open: readyz turns 503 at once, and the session keeps working
    // while pgwake drains (drain_timeout is 5 s in the test config).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until(LONG, || {
        std::net::TcpStream::connect(admin).is_ok_and(|mut s| {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.starts_with("HTTP/1.1 503")
        })
    })
    .await
    .expect("readyz 503 after SIGTERM");
    let v: i32 = client.query_one("select 6", &[]).await.unwrap().get(0);
    assert_eq!(v, 6, "a live session runs on during the drain");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the listener is closed while draining"
    );
    drop(client);
    let status = {
        let deadline = std::time::Instant::now() + LONG;
        loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pgwake did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    assert!(status.success(), "{status:?}");
    // Local computes are stopped cleanly with pgwake, not orphaned.
    assert!(!demo_dir.join("postmaster.pid").exists());
    assert!(!dir.path().join("data/second/postmaster.pid").exists());
}

/// `--check-config NEW --against RUNNING` tells what a SIGHUP would do before it is sent.
#[test]
fn check_config_against_the_running_file() {
    let dir = tempdir();
    let (old, new) = (dir.path().join("old.toml"), dir.path().join("new.toml"));
    let two = format!("{DEMO}[[endpoint]]\nid = \"second\"\nbackend = \"local\"\n");
    std::fs::write(&old, config_text(dir.path(), "", &two)).unwrap();
    let check = |against: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pgwake"));
        c.arg("--check-config").arg(&new);
        if against {
            c.arg("--against").arg(&old);
        }
        let out = c.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };

    std::fs::write(&new, "").unwrap();
    let (ok, text) = check(false);
    assert!(ok && text.contains("no [[endpoint]]"), "{text}");
    let (ok, text) = check(true);
    assert!(
        !ok && text.contains("would be refused") && text.contains("all 2"),
        "{text}"
    );

    let changed = config_text(
        dir.path(),
        "[proxy]\nlisten = \"127.0.0.1:1\"\n[compute]\nidle_timeout = \"9s\"",
        &two,
    );
    std::fs::write(&new, changed).unwrap();
    let (ok, text) = check(true);
    assert!(ok, "{text}");
    assert!(
        text.contains("[proxy] listen changed: takes effect only after a restart"),
        "{text}"
    );
    assert!(
        text.contains("applied by a reload: [compute] idle_timeout"),
        "{text}"
    );
}

/// The real client address through a real haproxy (Debian's package) with `send-proxy-v2`:
/// pgwake in `required` mode accepts the connection and logs the client's own address, not
/// haproxy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v2_address_reaches_the_logs() {
    let haproxy = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(haproxy) = haproxy else {
        assert!(
            std::env::var_os("PGWAKE_REQUIRE_DRIVERS").is_none(),
            "haproxy is required in CI (apt-get install haproxy)"
        );
        eprintln!("SKIPPED: haproxy not installed");
        return;
    };
    let dir = tempdir();
    let port = free_port();
    let cfg_path = dir.path().join("pgwake.toml");
    let text = config_text(dir.path(), "[proxy]\nproxy_protocol = \"required\"", DEMO)
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&cfg_path, text).unwrap();
    let log_path = dir.path().join("pgwake.log");
    let _pgwake = Proc(
        Command::new(env!("CARGO_BIN_EXE_pgwake"))
            .arg("--config")
            .arg(&cfg_path)
            .arg("--log-json")
            .stdout(std::fs::File::create(&log_path).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lb_port = free_port();
    let hacfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &hacfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend fe\n  bind 127.0.0.1:{lb_port}\n  default_backend be\n\
             backend be\n  server pgwake 127.0.0.1:{port} send-proxy-v2\n"
        ),
    )
    .unwrap();
    let _haproxy = Proc(
        Command::new(haproxy)
            .args(["-db", "-f"])
            .arg(&hacfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(LONG, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", lb_port)).is_ok()
    })
    .await
    .expect("pgwake and haproxy listening");

    let stream = tokio::net::TcpStream::connect(("127.0.0.1", lb_port))
        .await
        .unwrap();
    let client_addr = stream.local_addr().unwrap();
    let cfg: tokio_postgres::Config = conn(lb_port, "demo").parse().unwrap();
    let (client, c) = cfg
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn_task = tokio::spawn(c);
    let v: i32 = client.query_one("select 5", &[]).await.unwrap().get(0);
    assert_eq!(v, 5);
    drop(client);
    let _ = conn_task.await;
    // The session's closing line carries the span's client field.
    let needle = format!("\"client\":\"{client_addr}\"");
    wait_until(LONG, || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| {
            l.lines()
                .any(|l| l.contains("session closed") && l.contains(&needle))
        })
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no session log with {needle}:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    });
    // Directly, without the header, required mode refuses.
    assert!(!psql(&conn(port, "demo"), "select 1").status.success());
}

/// At the fd limit: a client gets 53300 at once, whether pgwake runs out while accepting (the
/// reserve fd answers it) or while connecting to the compute, instead of waiting in the listen
/// backlog; sessions already open keep working, and once some close new ones get in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_is_53300_at_once_and_recovers() {
    // The compute: a real Postgres woken through an in-process pgwake, kept up by a session.
    let env = Env::start("", DEMO).await;
    let (keep, c) = tokio_postgres::connect(&env.conn_str("demo"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(c);
    let compute = env
        .pgwake
        .as_ref()
        .unwrap()
        .manager
        .stats(&pgwake_router::EndpointId::parse("demo").unwrap())
        .and_then(|s| s.addr)
        .expect("demo running");

    let dir = tempdir();
    let port = free_port();
    let cfg_path = dir.path().join("pgwake.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\n[[endpoint]]\nid = \"pg\"\nbackend = \"static\"\naddress = \"{compute}\"\n"
        ),
    )
    .unwrap();
    // Room for a handful of sessions beside pgwake's own fds (runtime, listener, log).
    const FDS: u64 = 48;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgwake"));
    cmd.arg("--config")
        .arg(&cfg_path)
        .env("PGWAKE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: setrlimit is async-signal-safe, and nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let lim = libc::rlimit {
                rlim_cur: FDS,
                rlim_max: FDS,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = Proc(cmd.spawn().unwrap());
    wait_until(LONG, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await
    .expect("pgwake listening");

    let conn = conn(port, "pg");
    let open = || async {
        // A hang here is the failure this test is about: answer or error, within seconds.
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio_postgres::connect(&conn, tokio_postgres::NoTls),
        )
        .await
        .expect("pgwake answers at its fd limit instead of leaving the client waiting")
    };
    let mut sessions = Vec::new();
    let refused = loop {
        assert!(sessions.len() < FDS as usize, "never ran out of fds");
        match open().await {
            Ok((client, c)) => {
                tokio::spawn(c);
                sessions.push(client);
            }
            Err(e) => break e,
        }
    };
    assert!(sessions.len() >= 5, "only {} sessions fit", sessions.len());
    let out_of_fds = |e: &tokio_postgres::Error| {
        e.as_db_error().is_some_and(|d| {
            d.code().code() == "53300" && d.message() == "too many connections to the proxy"
        })
    };
    assert!(out_of_fds(&refused), "{refused}");
    // Every further client too, one after the other (the reserve fd comes back each time).
    // pgwake may have an fd free again by then (one of its own that it held for a moment
    // while the first sessions came in): a client that gets in is a session like the others,
    // but only a couple may, and every other one is told 53300 at once.
    let mut refusals = 0;
    let mut late = 0;
    while refusals < 5 {
        match open().await {
            Err(e) => {
                assert!(out_of_fds(&e), "{e}");
                refusals += 1;
            }
            Ok((client, c)) => {
                late += 1;
                eprintln!(
                    "a session got in after {refusals} refusals; pgwake's fds: {:?}",
                    open_fds(child.0.id())
                );
                assert!(late <= 2, "still room after {refusals} refusals");
                tokio::spawn(c);
                sessions.push(client);
            }
        }
    }
    for s in &sessions {
        assert_eq!(
            s.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0),
            1
        );
    }
    // Room again once sessions close.
    sessions.truncate(sessions.len() - 3);
    let mut back = None;
    let deadline = std::time::Instant::now() + LONG;
    while back.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no room after sessions closed"
        );
        match open().await {
            Ok((client, c)) => {
                tokio::spawn(c);
                back = Some(client);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let back = back.unwrap();
    assert_eq!(
        back.query_one("select 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
    drop((sessions, back));
    drop(child);
    drop(keep);
    env.stop().await;
}
