//! Logins checked at the proxy before any wake (issue 11), end to end: real computes that
//! require SCRAM themselves, real clients (tokio-postgres, psql), and the manager's start
//! count to show that a failed login never woke anything.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::scram::{roles, self_signed, starts, tls_table, PASSWORD};
use common::*;
use tokio_postgres::error::SqlState;

fn conn(env: &Env, endpoint: &str, user: &str, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=postgres options=endpoint={endpoint} connect_timeout=60",
        env.addr.port()
    )
}

/// The error a login gets (code, message), or `None` when it logs in.
async fn login(conn: &str) -> Option<(String, String)> {
    match tokio_postgres::connect(conn, tokio_postgres::NoTls).await {
        Ok((client, c)) => {
            tokio::spawn(c);
            let row = client.query_one("select current_user", &[]).await.unwrap();
            assert_eq!(row.get::<_, String>(0), "postgres");
            None
        }
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("not a server error: {e}"));
            Some((db.code().code().to_string(), db.message().to_string()))
        }
    }
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `select current_user` with psycopg 3 (libpq underneath); `None` when psycopg is missing
/// (and `PGWAKE_REQUIRE_DRIVERS` is unset, as in tests/drivers.rs).
fn psycopg(conninfo: &str) -> Option<std::process::Output> {
    let script = "import sys, psycopg\n\
                  with psycopg.connect(sys.argv[1]) as c:\n    \
                  print(c.execute('select current_user').fetchone()[0])";
    let out = std::process::Command::new("python3")
        .args(["-c", script, conninfo])
        .env("PGCONNECT_TIMEOUT", "60")
        .output()
        .ok()?;
    if String::from_utf8_lossy(&out.stderr).contains("No module named 'psycopg'") {
        assert!(
            std::env::var_os("PGWAKE_REQUIRE_DRIVERS").is_none(),
            "psycopg is required but not importable"
        );
        eprintln!("SKIPPED: python3 cannot import psycopg");
        return None;
    }
    Some(out)
}

fn psql_with_password(conn: &str, password: &str) -> std::process::Output {
    std::process::Command::new("psql")
        .arg(conn)
        .args(["-X", "-A", "-t", "-c", "select current_user"])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "60")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_endpoints_are_hidden_by_default_once_an_endpoint_checks_logins() {
    let failed = Some((
        SqlState::INVALID_PASSWORD.code().to_string(),
        "password authentication failed for user \"postgres\"".to_string(),
    ));
    // No [auth] setting: a scram endpoint in the file hides which ids exist.
    let dir = tempdir();
    let (local, endpoint) = roles(dir.path());
    let env = Env::start_in(dir, &local, &endpoint).await;
    assert_eq!(
        login(&conn(&env, "ghost", "postgres", PASSWORD)).await,
        failed
    );
    env.stop().await;

    // Said otherwise, the id's absence is told as before.
    let dir = tempdir();
    let (local, endpoint) = roles(dir.path());
    let extra = format!("{local}[auth]\nhide_unknown_endpoints = false\n");
    let env = Env::start_in(dir, &extra, &endpoint).await;
    let (code, _) = login(&conn(&env, "ghost", "postgres", PASSWORD))
        .await
        .unwrap();
    assert_eq!(code, SqlState::INVALID_CATALOG_NAME.code());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_unknown_role_and_unknown_endpoint_look_the_same_and_wake_nothing() {
    let dir = tempdir();
    let (local, endpoint) = roles(dir.path());
    let extra = format!("{local}[auth]\nhide_unknown_endpoints = true\n");
    let env = Env::start_in(dir, &extra, &endpoint).await;

    let failed = |user: &str| {
        Some((
            SqlState::INVALID_PASSWORD.code().to_string(),
            format!("password authentication failed for user \"{user}\""),
        ))
    };
    assert_eq!(
        login(&conn(&env, "demo", "postgres", "wrong")).await,
        failed("postgres")
    );
    assert_eq!(
        login(&conn(&env, "demo", "nobody", PASSWORD)).await,
        failed("nobody")
    );
    assert_eq!(
        login(&conn(&env, "ghost", "postgres", PASSWORD)).await,
        failed("postgres")
    );
    let out = psql_with_password(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres options=endpoint=demo",
            env.addr.port()
        ),
        "wrong",
    );
    assert!(
        stderr(&out).contains("password authentication failed for user \"postgres\""),
        "{}",
        stderr(&out)
    );
    // Nothing was started: no start counted, no postmaster.
    assert_eq!(starts(&env), 0);
    assert!(postmaster_pid(&env.data_dir("demo")).is_none());

    // The right password wakes the compute, and the proxy logs in to it (the compute asks for
    // SCRAM itself) with the ClientKey from the client's proof.
    assert_eq!(login(&conn(&env, "demo", "postgres", PASSWORD)).await, None);
    assert_eq!(starts(&env), 1);
    let out = psql_with_password(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres options=endpoint=demo",
            env.addr.port()
        ),
        PASSWORD,
    );
    assert_eq!(stdout(&out), "postgres", "{}", stderr(&out));
    let plain = conn(&env, "demo", "postgres", PASSWORD);
    if let Some(out) = psycopg(&plain) {
        assert_eq!(stdout(&out), "postgres", "{}", stderr(&out));
    }

    let metrics = prometheus::TextEncoder::new()
        .encode_to_string(&env.pgwake().registry.gather())
        .unwrap();
    assert!(
        metrics.contains("pgwake_auth_failures_total{reason=\"auth_failed\"} 4"),
        "{metrics}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled_without_a_wake() {
    let dir = tempdir();
    let (local, endpoint) = roles(dir.path());
    let extra = format!("{local}[auth.throttle]\nmax_failures_per_ip = 3\n");
    let env = Env::start_in(dir, &extra, &endpoint).await;
    for _ in 0..3 {
        let (code, _) = login(&conn(&env, "demo", "postgres", "wrong"))
            .await
            .unwrap();
        assert_eq!(code, "28P01");
    }
    // Banned: even the right password is refused, before any SCRAM.
    let (code, message) = login(&conn(&env, "demo", "postgres", PASSWORD))
        .await
        .unwrap();
    assert_eq!(code, "53300", "{message}");
    assert_eq!(starts(&env), 0);
    let metrics = prometheus::TextEncoder::new()
        .encode_to_string(&env.pgwake().registry.gather())
        .unwrap();
    assert!(
        metrics.contains("pgwake_auth_throttled_total{scope=\"ip\"} 1"),
        "{metrics}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_channel_binding_require_over_tls_and_the_password_endpoint() {
    let dir = tempdir();
    let (local, endpoint) = roles(dir.path());
    let (cert_path, key_path) = self_signed(dir.path(), "c", &["*.db.localtest"]);
    let extra = format!(
        "{local}{}allow_password_endpoint = true\n",
        tls_table(&cert_path, &key_path)
    );
    let env = Env::start_in(dir, &extra, &endpoint).await;
    let sni = format!(
        "host=demo.db.localtest hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={} channel_binding=require",
        env.addr.port(),
        cert_path.display()
    );
    let out = psql_with_password(&sni, "wrong");
    assert!(
        stderr(&out).contains("password authentication failed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(starts(&env), 0);
    // SCRAM-SHA-256-PLUS, bound to the certificate the proxy presented.
    let out = psql_with_password(&sni, PASSWORD);
    assert_eq!(stdout(&out), "postgres", "{}", stderr(&out));
    if let Some(out) = psycopg(&format!("{sni} password={PASSWORD}")) {
        assert_eq!(stdout(&out), "postgres", "{}", stderr(&out));
    }

    // endpoint=ID;PASSWORD (cleartext over TLS): the password is checked against the verifier.
    let ip = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
        env.addr.port()
    );
    let out = psql_with_password(&ip, "endpoint=demo;wrong");
    assert!(
        stderr(&out).contains("password authentication failed for user \"postgres\""),
        "{}",
        stderr(&out)
    );
    let out = psql_with_password(&ip, &format!("endpoint=demo;{PASSWORD}"));
    assert_eq!(stdout(&out), "postgres", "{}", stderr(&out));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_learned_from_the_compute_and_a_new_role_logs_in_after_suspend_and_wake() {
    use pgwake_proxy::verifiers::Lookup;
    use pgwake_router::EndpointId;
    let dir = tempdir();
    // A cleartext superuser password: pgwake reads the roles with it.
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let extra = format!(
        "[local]\nauth = \"scram-sha-256\"\ninitdb_args = [\"--no-sync\", \"--pwfile={}\"]\n[auth]\nlearn_interval = \"50ms\"\n",
        pwfile.display()
    );
    let env = Env::start_in(
        dir,
        &extra,
        "[[endpoint]]\nid = \"demo\"\nbackend = \"local\"\nauth = \"scram\"\n",
    )
    .await;
    let id = EndpointId::parse("demo").unwrap();
    let known = |role: &str| {
        matches!(
            env.pgwake().auth.store().lookup(&id, role),
            Some(Lookup::Known(_))
        )
    };
    // Nothing known yet: even the right password is refused, and nothing starts.
    assert_eq!(
        login(&conn(&env, "demo", "postgres", PASSWORD))
            .await
            .unwrap()
            .0,
        "28P01"
    );
    assert_eq!(starts(&env), 0);

    // An operator's wake (not a client's): the compute runs and its roles are learned.
    let route = env.pgwake().table.lookup(&id).unwrap();
    let lease = env.pgwake().manager.wake(&route).await.unwrap();
    wait_until(std::time::Duration::from_secs(30), || known("postgres"))
        .await
        .expect("the superuser's verifier learned");
    drop(lease);
    assert_eq!(login(&conn(&env, "demo", "postgres", PASSWORD)).await, None);

    // A role created in a session is learned while the compute runs...
    let (client, c) = tokio_postgres::connect(
        &conn(&env, "demo", "postgres", PASSWORD),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(c);
    client
        .batch_execute("create role alice login password 'apw'")
        .await
        .unwrap();
    drop(client);
    wait_until(std::time::Duration::from_secs(30), || known("alice"))
        .await
        .expect("the new role learned");
    let saved = env.data_dir("demo").with_extension("roles");
    assert_eq!(
        std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(&saved)
        .unwrap()
        .contains("\"alice\""));

    // ...and logs in after a suspend, checked before the wake.
    env.suspend("demo").await;
    let before = starts(&env);
    assert_eq!(
        login(&conn(&env, "demo", "alice", "wrong"))
            .await
            .unwrap()
            .0,
        "28P01"
    );
    assert_eq!(starts(&env), before, "a failed login woke nothing");
    let (client, c) =
        tokio_postgres::connect(&conn(&env, "demo", "alice", "apw"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(c);
    let row = client.query_one("select current_user", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "alice");
    assert_eq!(starts(&env), before + 1);
    drop(client);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_created_just_before_a_suspend_logs_in_at_the_next_wake() {
    use pgwake_router::EndpointId;
    let dir = tempdir();
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The timer never fires while the compute runs: only the look before the suspend can
    // learn the role.
    let extra = format!(
        "[local]\nauth = \"scram-sha-256\"\ninitdb_args = [\"--no-sync\", \"--pwfile={}\"]\n[auth]\nlearn_interval = \"1h\"\n",
        pwfile.display()
    );
    let env = Env::start_in(
        dir,
        &extra,
        "[[endpoint]]\nid = \"demo\"\nbackend = \"local\"\nauth = \"scram\"\n",
    )
    .await;
    let id = EndpointId::parse("demo").unwrap();
    // An operator's wake, and a role created straight on the compute.
    let route = env.pgwake().table.lookup(&id).unwrap();
    let attached = env.pgwake().manager.wake(&route).await.unwrap();
    let direct = format!(
        "host={} port={} user=postgres password={PASSWORD} dbname=postgres",
        attached.addr.host(),
        attached.addr.port().unwrap()
    );
    let (client, c) = tokio_postgres::connect(&direct, tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn_task = tokio::spawn(c);
    client
        .batch_execute("create role bob login password 'bpw'")
        .await
        .unwrap();
    drop(client);
    let _ = conn_task.await;
    drop(attached);
    env.suspend("demo").await;
    let before = starts(&env);
    let (client, c) =
        tokio_postgres::connect(&conn(&env, "demo", "bob", "bpw"), tokio_postgres::NoTls)
            .await
            .expect("the role was learned before the suspend");
    tokio::spawn(c);
    let row = client.query_one("select current_user", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "bob");
    drop(client);
    assert_eq!(starts(&env), before + 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_failed_logins_is_throttled_other_addresses_are_served_and_nothing_wakes() {
    let dir = tempdir();
    let (local, endpoint) = roles(dir.path());
    let env = Env::start_in(dir, &local, &endpoint).await;
    let cfg: tokio_postgres::Config = conn(&env, "demo", "postgres", "wrong").parse().unwrap();
    let (mut failed, mut throttled) = (0, 0);
    for _ in 0..20 {
        let attempts: Vec<_> = (0..50)
            .map(|_| {
                let cfg = cfg.clone();
                tokio::spawn(async move {
                    let e = cfg.connect(tokio_postgres::NoTls).await.err().unwrap();
                    e.as_db_error().map(|d| d.code().code().to_string())
                })
            })
            .collect();
        for a in attempts {
            match a.await.unwrap().as_deref() {
                Some("28P01") => failed += 1,
                Some("53300") => throttled += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
    }
    eprintln!(
        "1000 failed logins: {failed} answered 28P01 after SCRAM, {throttled} throttled (53300)"
    );
    assert_eq!(failed + throttled, 1000);
    // The default threshold (20 per minute) plus those already past the check when it tripped.
    assert!(failed < 100, "{failed} SCRAM exchanges run before the ban");
    assert_eq!(starts(&env), 0, "1,000 failed logins woke nothing");

    // Another client address (127.0.0.2 on loopback) still logs in.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = socket.connect(env.addr).await.unwrap();
    let good: tokio_postgres::Config = conn(&env, "demo", "postgres", PASSWORD).parse().unwrap();
    let (client, c) = good
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(c);
    let row = client.query_one("select 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(starts(&env), 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_at_the_challenge_is_closed_after_auth_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempdir();
    let (local, endpoint) = roles(dir.path());
    let extra = format!("{local}[proxy]\nauth_timeout = \"300ms\"\nstartup_timeout = \"10s\"\n");
    let env = Env::start_in(dir, &extra, &endpoint).await;
    let mut s = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let mut startup = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [
            ("user", "postgres"),
            ("database", "postgres"),
            ("options", "endpoint=demo"),
        ],
        &mut startup,
    )
    .unwrap();
    s.write_all(&startup).await.unwrap();
    // AuthenticationSASL, then silence from the client.
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!((head[0], &head[5..9]), (b'R', &10i32.to_be_bytes()[..]));
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("closed by auth_timeout, well before startup_timeout")
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(starts(&env), 0);
    env.stop().await;
}

/// A TLS-terminating man in the middle: takes the client's TLS with its own certificate
/// (`cert`/`key`), opens its own TLS to `upstream` (trusting `upstream_ca`, SNI
/// `demo.db.localtest`) and relays the bytes between the two sessions.
async fn mitm(
    listener: tokio::net::TcpListener,
    cert: &Path,
    key: &Path,
    upstream: std::net::SocketAddr,
    upstream_ca: &Path,
) {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pem = |p: &Path| std::fs::read(p).unwrap();
    use rustls::pki_types::pem::PemObject;
    let chain = vec![rustls::pki_types::CertificateDer::from_pem_slice(&pem(cert)).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem(key)).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(&pem(upstream_ca)).unwrap())
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    loop {
        let (mut down, _) = listener.accept().await.unwrap();
        let (acceptor, connector) = (acceptor.clone(), connector.clone());
        tokio::spawn(async move {
            let mut req = [0u8; 8];
            down.read_exact(&mut req).await?;
            assert_eq!(req, SSL_REQUEST, "the client asks for TLS first");
            down.write_all(b"S").await?;
            let mut down = acceptor.accept(down).await?;
            let mut up = tokio::net::TcpStream::connect(upstream).await?;
            up.write_all(&SSL_REQUEST).await?;
            let mut s = [0u8; 1];
            up.read_exact(&mut s).await?;
            assert_eq!(&s, b"S");
            let name = rustls::pki_types::ServerName::try_from("demo.db.localtest").unwrap();
            let mut up = connector.connect(name, up).await?;
            tokio::io::copy_bidirectional(&mut down, &mut up).await?;
            Ok::<_, std::io::Error>(())
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_terminating_man_in_the_middle_fails_channel_binding_and_wakes_nothing() {
    let dir = tempdir();
    let (local, endpoint) = roles(dir.path());
    let (cert, key) = self_signed(dir.path(), "proxy", &["*.db.localtest"]);
    // The client trusts the man in the middle's certificate (a CA it was tricked into
    // trusting, or a corporate TLS inspection box): only channel binding can tell.
    let (mitm_cert, mitm_key) = self_signed(dir.path(), "mitm", &["*.db.localtest"]);
    let extra = format!("{local}{}", tls_table(&cert, &key));
    let env = Env::start_in(dir, &extra, &endpoint).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mitm_addr = listener.local_addr().unwrap();
    let relay = tokio::spawn({
        let (c, k, ca) = (mitm_cert.clone(), mitm_key, cert.clone());
        let upstream = env.addr;
        async move { mitm(listener, &c, &k, upstream, &ca).await }
    });
    let through_mitm = |binding: &str| {
        format!(
            "host=demo.db.localtest hostaddr=127.0.0.1 port={} user=postgres dbname=postgres \
             sslmode=verify-full sslrootcert={} channel_binding={binding}",
            mitm_addr.port(),
            mitm_cert.display()
        )
    };
    let run =
        |conn: String| tokio::task::spawn_blocking(move || psql_with_password(&conn, PASSWORD));

    // The right password, but the client binds to the certificate it saw (the man in the
    // middle's) and the proxy to its own: the proof is refused, and nothing wakes.
    let out = run(through_mitm("require")).await.unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("SCRAM channel binding check failed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(starts(&env), 0);
    assert!(postmaster_pid(&env.data_dir("demo")).is_none());

    // The same relay without channel binding logs in (and wakes the compute): the relay
    // itself works, channel binding is what caught it.
    let out = run(through_mitm("disable")).await.unwrap();
    assert_eq!(stdout(&out), "postgres", "{}", stderr(&out));
    assert_eq!(starts(&env), 1);
    relay.abort();
    env.stop().await;
}
