//! TLS termination and SNI routing end to end: certificates from a test CA made at test time,
//! real clients (psql/libpq, tokio-postgres over rustls, psycopg) against real computes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A CA and one certificate signed by it, written into `dir` as `<name>-ca.pem`,
/// `<name>.pem` and `<name>.key`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path, name: &str, san: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("pgwake e2e {name} CA"));
    let ca = params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![san.to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let pki = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.cert, leaf.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

async fn tls_env(extra: &str) -> (Env, Pki) {
    let dir = tempdir();
    let pki = make_pki(dir.path(), "wild", "*.db.localtest");
    let tls = format!(
        "[tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\ndomains = [\"db.localtest\"]\n{extra}",
        pki.cert.display(),
        pki.key.display()
    );
    let endpoints = format!("{DEMO}[[endpoint]]\nid = \"other\"\nbackend = \"local\"\n");
    (Env::start_in(dir, &tls, &endpoints).await, pki)
}

fn sni_conn(env: &Env, pki: &Pki, host: &str, extra: &str) -> String {
    format!(
        "host={host} hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={} {extra}",
        env.addr.port(),
        pki.ca.display()
    )
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_verify_full_routes_by_sni() {
    let (env, pki) = tls_env("").await;
    // libpq sends `host` as SNI and verifies the wildcard certificate against it.
    let out = psql(
        &sni_conn(&env, &pki, "demo.db.localtest", ""),
        "select 'via sni'",
    );
    assert_eq!(stdout(&out), "via sni");
    assert_eq!(env.stats("demo").unwrap().starts, 1);
    assert!(env.stats("other").is_none());
    // Same endpoint named in options too: fine.
    let out = psql(
        &sni_conn(&env, &pki, "demo.db.localtest", "options=endpoint=demo"),
        "select 1",
    );
    assert_eq!(stdout(&out), "1");
    // Different endpoints from SNI and options: a clear 08004.
    let out = psql(
        &sni_conn(&env, &pki, "demo.db.localtest", "options=endpoint=other"),
        "select 1",
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("selects endpoint \"demo\" but options select endpoint \"other\""),
        "{}",
        stderr(&out)
    );
    // A host under no configured domain (certificate not checked here): refused by name.
    let conn = format!(
        "host=demo.elsewhere.test hostaddr=127.0.0.1 port={} user=postgres sslmode=require",
        env.addr.port()
    );
    let out = psql(&conn, "select 1");
    assert!(
        stderr(&out).contains("demo.elsewhere.test"),
        "{}",
        stderr(&out)
    );
    // No SNI (IP address host): options still work over TLS, and the no-endpoint error
    // explains both ways.
    let ip = format!(
        "host=127.0.0.1 port={} user=postgres sslmode=require",
        env.addr.port()
    );
    assert_eq!(
        stdout(&psql(&format!("{ip} options=endpoint=other"), "select 2")),
        "2"
    );
    let out = psql(&ip, "select 1");
    let e = stderr(&out);
    assert!(
        e.contains("endpoint ID is not specified") && e.contains("SNI") && e.contains("options"),
        "{e}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_over_rustls_with_sni() {
    let (env, pki) = tls_env("").await;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&pki.ca).unwrap();
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
    roots.add(der).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    // SSLRequest by hand, then the TLS handshake, then tokio-postgres on the TLS stream.
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await.unwrap();
    assert_eq!(&s, b"S");
    let name = rustls::pki_types::ServerName::try_from("other.db.localtest").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let pg: tokio_postgres::Config = "user=postgres dbname=postgres".parse().unwrap();
    let (client, conn) = pg.connect_raw(tls, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // A bulk transfer through the buffered TLS relay, checked end to end.
    let row = client
        .query_one("select count(*), sum(length(x)) from (select repeat('y', 1000) x from generate_series(1, 20000)) s", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (20000, 20_000_000)
    );
    let big: String = client
        .query_one("select repeat('z', 5000000)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(big.len(), 5_000_000);
    assert_eq!(env.stats("other").unwrap().starts, 1);
    drop(client);
    env.stop().await;
}

fn psycopg(impl_: &str, conninfo: &str) -> Option<std::process::Output> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import psycopg"])
        .env("PSYCOPG_IMPL", impl_)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("PGWAKE_REQUIRE_DRIVERS").is_none(),
            "psycopg ({impl_}) is required: pip install 'psycopg[binary]'"
        );
        eprintln!("SKIPPED: psycopg with PSYCOPG_IMPL={impl_} is not importable");
        return None;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/drivers/tls_check.py");
    Some(
        std::process::Command::new("python3")
            .arg(script)
            .arg(conninfo)
            .env("PSYCOPG_IMPL", impl_)
            .output()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_with_sni_and_direct_tls() {
    let (env, pki) = tls_env("").await;
    // psycopg over Debian's libpq, SNI + verify-full.
    let conninfo = sni_conn(&env, &pki, "demo.db.localtest", "");
    let info = conninfo.clone();
    let out = tokio::task::spawn_blocking(move || psycopg("python", &info))
        .await
        .unwrap();
    if let Some(out) = out {
        assert!(stdout(&out).ends_with("tls ok"));
    }
    // psycopg-binary bundles a libpq >= 17: PostgreSQL 17's direct TLS (no SSLRequest, ALPN).
    let info = format!("{conninfo} sslnegotiation=direct");
    let out = tokio::task::spawn_blocking(move || psycopg("binary", &info))
        .await
        .unwrap();
    if let Some(out) = out {
        let text = stdout(&out);
        let version: u32 = text.split_whitespace().next().unwrap().parse().unwrap();
        if version >= 170000 {
            assert!(text.ends_with("tls ok"), "{text}");
        } else {
            eprintln!("SKIPPED direct TLS: psycopg-binary's libpq is {version}, older than 17");
        }
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_inputs_are_refused_and_the_proxy_keeps_serving() {
    let (env, pki) = tls_env("require_tls = true\nallow_password_endpoint = true").await;
    let a = env.addr;
    // Plaintext bytes after 'S': the handshake fails, the connection is closed.
    let mut s = TcpStream::connect(a).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"S");
    s.write_all(b"\0\0\0\x08\x00\x03\x00\x00this is not TLS")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(
        !rest.starts_with(b"E"),
        "no plaintext Postgres message after 'S'"
    );

    // Direct TLS without ALPN: refused (PostgreSQL 17 requires ALPN there too).
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&pki.ca).unwrap();
    roots
        .add(rustls::pki_types::pem::PemObject::from_pem_slice(&pem).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(a).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("demo.db.localtest").unwrap();
    assert!(
        connector.connect(name, tcp).await.is_err(),
        "direct TLS without ALPN must fail"
    );

    // require_tls: plaintext is refused with 28000.
    let plain = format!(
        "host=127.0.0.1 port={} user=postgres sslmode=disable options=endpoint=demo",
        a.port()
    );
    let out = psql(&plain, "select 1");
    assert!(stderr(&out).contains("requires TLS"), "{}", stderr(&out));

    // The password convention over TLS without SNI (IP host): the endpoint comes from the
    // password; the proxy asks for it in cleartext only inside TLS.
    let ip = format!(
        "host=127.0.0.1 port={} user=postgres sslmode=require",
        a.port()
    );
    let out = std::process::Command::new("psql")
        .arg(&ip)
        .args(["-X", "-A", "-t", "-c", "select 'pw route'"])
        .env("PGPASSWORD", "endpoint=other;anything")
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "pw route");
    assert_eq!(env.stats("other").unwrap().starts, 1);

    // The proxy is fine after all of that.
    assert_eq!(
        stdout(&psql(
            &sni_conn(&env, &pki, "demo.db.localtest", ""),
            "select 3"
        )),
        "3"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_endpoint_answers_scram_for_the_client_and_never_in_plaintext() {
    let dir = tempdir();
    let pki = make_pki(dir.path(), "wild", "*.db.localtest");
    // Computes that require SCRAM for everyone: the proxy must authenticate with the real
    // password taken from `endpoint=ID;PASSWORD`.
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, "sekrit\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let extra = format!(
        "[tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\ndomains = [\"db.localtest\"]\nallow_password_endpoint = true\n[local]\nauth = \"scram-sha-256\"\ninitdb_args = [\"--no-sync\", \"--pwfile={}\"]\n",
        pki.cert.display(),
        pki.key.display(),
        pwfile.display()
    );
    let env = Env::start_in(dir, &extra, DEMO).await;
    let ip = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
        env.addr.port()
    );
    let run = |pw: &str, conn: &str| {
        std::process::Command::new("psql")
            .arg(conn)
            .args(["-X", "-A", "-t", "-c", "select current_user"])
            .env("PGPASSWORD", pw)
            .output()
            .unwrap()
    };
    assert_eq!(stdout(&run("endpoint=demo;sekrit", &ip)), "postgres");
    assert_eq!(stdout(&run("endpoint=demo$sekrit", &ip)), "postgres");
    let out = run("endpoint=demo;wrong", &ip);
    assert!(
        stderr(&out).contains("password authentication failed"),
        "{}",
        stderr(&out)
    );
    // SCRAM straight between client and compute (endpoint by options) is relayed untouched.
    assert_eq!(
        stdout(&run("sekrit", &format!("{ip} options=endpoint=demo"))),
        "postgres"
    );
    // Over plaintext the proxy never asks for a password: the endpoint is simply missing.
    let plain = format!(
        "host=127.0.0.1 port={} user=postgres sslmode=disable",
        env.addr.port()
    );
    let out = run("endpoint=demo;sekrit", &plain);
    assert!(
        stderr(&out).contains("endpoint ID is not specified"),
        "{}",
        stderr(&out)
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_tls_verifies_the_compute_against_the_ca_bundle() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    // Local computes listen on 127.0.0.1, which is the name pgwake verifies.
    let Pki {
        ca: ca_path,
        cert: cert_path,
        key: key_path,
    } = make_pki(dir.path(), "compute", "127.0.0.1");
    // Postgres insists its key is private to the user it runs as.
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    if unsafe { libc::geteuid() } == 0 {
        let out = std::process::Command::new("id")
            .args(["-u", "postgres"])
            .output()
            .unwrap();
        let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        std::os::unix::fs::chown(&key_path, Some(uid), None).unwrap();
    }
    let extra = format!(
        "[tls]\ncompute_tls = true\ncompute_ca = \"{}\"\n",
        ca_path.display()
    );
    let endpoints = format!(
        "[[endpoint]]\nid = \"secure\"\nbackend = \"local\"\nsettings = {{ ssl = \"on\", ssl_cert_file = \"{}\", ssl_key_file = \"{}\" }}\n\
         [[endpoint]]\nid = \"plain\"\nbackend = \"local\"\n",
        cert_path.display(),
        key_path.display()
    );
    let env = Env::start_in(dir, &extra, &endpoints).await;
    let client = env.client("secure").await;
    let row = client
        .query_one(
            "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the proxy-to-compute leg is TLS");
    assert!(
        row.get::<_, String>(1).starts_with("TLSv1."),
        "{}",
        row.get::<_, String>(1)
    );
    drop(client);
    // A compute that does not speak TLS is refused rather than used in the clear.
    let err = tokio_postgres::connect(&env.conn_str("plain"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("plaintext compute refused");
    assert_eq!(err.as_db_error().unwrap().code().code(), "08006");
    env.stop().await;
}
