//! The serverless driver `@neondatabase/serverless` (real, from npm; drizzle-orm on top)
//! through pgwake's `[http]` listener: Postgres over WebSocket and SQL over HTTP into real
//! computes.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

const PASSWORD: &str = "sekrit";

fn driver_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Whether node and the driver (`npm ci` in tests/drivers) are there; skips (or, under
/// `PGWAKE_REQUIRE_DRIVERS`, fails) as tests/drivers.rs does.
fn have_neon_driver() -> bool {
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let installed = ["@neondatabase/serverless", "drizzle-orm"].iter().all(|m| {
        driver_dir()
            .join("node_modules")
            .join(m)
            .join("package.json")
            .exists()
    });
    if node && installed {
        return true;
    }
    assert!(
        std::env::var_os("PGWAKE_REQUIRE_DRIVERS").is_none(),
        "node, @neondatabase/serverless and drizzle-orm are required (cd tests/drivers && npm ci)"
    );
    eprintln!("SKIPPED: node or @neondatabase/serverless missing (cd tests/drivers && npm ci)");
    false
}

/// Computes that require SCRAM with one role `postgres`/[`PASSWORD`]; with `roles_file`, the
/// endpoint checks logins at the proxy too (`auth = "scram"`), otherwise it is passthrough.
fn scram_computes(dir: &Path, roles_file: bool) -> (String, String) {
    let verifier = postgres_protocol::password::scram_sha_256(PASSWORD.as_bytes());
    let pwfile = dir.join("pw");
    std::fs::write(&pwfile, format!("{verifier}\n")).unwrap();
    std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[local]\nauth = \"scram-sha-256\"\ninitdb_args = [\"--no-sync\", \"--pwfile={}\"]\n",
        pwfile.display()
    );
    let mut endpoint = "[[endpoint]]\nid = \"demo\"\nbackend = \"local\"\n".to_string();
    if roles_file {
        let roles = dir.join("demo.roles");
        std::fs::write(&roles, format!("\"postgres\" \"{verifier}\"\n")).unwrap();
        endpoint += &format!("roles_file = \"{}\"\n", roles.display());
    }
    (extra, endpoint)
}

/// Runs tests/drivers/`script` with `args` and returns its stdout, failing on a non-zero exit.
async fn node(script: &str, args: Vec<String>) -> String {
    node_with(script, args, Vec::new()).await
}

async fn node_with(script: &str, args: Vec<String>, env: Vec<(&'static str, String)>) -> String {
    let path = driver_dir().join(script);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(path)
            .args(args)
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "node failed: {stderr}\nstdout: {}",
        stdout(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const WS_OK: &str =
    "select1 1\nparams 42 hé {\"a\":[1,2]}\ntx 2\nerror 22012\n5MB 5242880\nafter error 2\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neon_driver_over_websocket_with_login_at_the_proxy() {
    if !have_neon_driver() {
        return;
    }
    let dir = tempdir();
    let (extra, endpoint) = scram_computes(dir.path(), true);
    let env = Env::start_in(dir, &extra, &endpoint).await;
    let port = env.pgwake().http_addr().unwrap().port();
    let args = vec![
        port.to_string(),
        "demo".into(),
        PASSWORD.into(),
        "scram".into(),
    ];
    let out = node("neon_ws.mjs", args).await;
    assert_eq!(out, format!("{WS_OK}wrong password 28P01\n"));
    assert_eq!(env.stats("demo").unwrap().starts, 1);
    env.stop().await;
}

/// A passthrough endpoint: the compute asks for SCRAM, and pgwake answers it with the
/// cleartext password the driver pipelined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neon_driver_over_websocket_passthrough() {
    if !have_neon_driver() {
        return;
    }
    let dir = tempdir();
    let (extra, endpoint) = scram_computes(dir.path(), false);
    let env = Env::start_in(dir, &extra, &endpoint).await;
    let port = env.pgwake().http_addr().unwrap().port();
    let out = node(
        "neon_ws.mjs",
        vec![port.to_string(), "demo".into(), PASSWORD.into()],
    )
    .await;
    assert_eq!(out, WS_OK);
    env.stop().await;
}

/// `neon()`: queries, types, batches (committed and rolled back), errors with their SQLSTATE,
/// and a wrong password refused at the proxy before any wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neon_driver_sql_over_http() {
    if !have_neon_driver() {
        return;
    }
    let dir = tempdir();
    let (extra, endpoint) = scram_computes(dir.path(), true);
    let env = Env::start_in(dir, &extra, &endpoint).await;
    let port = env.pgwake().http_addr().unwrap().port();
    let args = vec![port.to_string(), "demo".into(), PASSWORD.into()];
    let out = node("neon_http.mjs", args).await;
    assert_eq!(
        out,
        "params 42 hé null\n\
         types 9007199254740993 1.50 {\"a\":[1,2]} [1,2,3] 0102 2024-01-02T03:04:05.000Z [4,5]\n\
         full SELECT 2 a 23 [[1],[2]]\n\
         batch 2 1\n\
         batch error 22012\n\
         rolled back 1\n\
         read only 25006\n\
         5MB 5242880\n\
         error 22012\n\
         syntax 42601\n\
         wrong password 28P01\n"
    );
    assert_eq!(env.stats("demo").unwrap().starts, 1);
    env.stop().await;
}

/// One `POST /sql` with the driver's headers; returns the status and the JSON body.
async fn post_sql(
    http: &reqwest::Client,
    port: u16,
    conn: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, serde_json::Value) {
    let mut req = http
        .post(format!("http://127.0.0.1:{port}/sql"))
        .header("Neon-Raw-Text-Output", "true")
        .header("Neon-Array-Mode", "true")
        .body(body);
    if let Some(c) = conn {
        req = req.header("Neon-Connection-String", c);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, json)
}

/// Bad requests are clear HTTP errors and wake nothing; the first good request wakes the
/// suspended endpoint, and so does one after a suspend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_http_refusals_wake_nothing_and_a_request_wakes() {
    let dir = tempdir();
    let (extra, endpoint) = scram_computes(dir.path(), true);
    let extra = extra.replace(
        "[http]\nlisten = \"127.0.0.1:0\"\n",
        "[http]\nlisten = \"127.0.0.1:0\"\nmax_request_bytes = 4096\n",
    );
    let env = Env::start_in(dir, &extra, &endpoint).await;
    let port = env.pgwake().http_addr().unwrap().port();
    let http = reqwest::Client::new();
    let good = format!("postgresql://postgres:{PASSWORD}@demo.pgwake.test/postgres");
    let select1 = r#"{"query":"select $1::int + 1 as n","params":["1"]}"#;

    let (s, b) = post_sql(&http, port, None, select1).await;
    assert_eq!(
        (s, b["message"].as_str()),
        (400, Some("missing Neon-Connection-String header"))
    );
    let (s, b) = post_sql(&http, port, Some(&good), "{not json").await;
    assert_eq!(
        (s, b["message"].as_str()),
        (400, Some("request body is not valid JSON"))
    );
    let big = format!(r#"{{"query":"select '{}'","params":[]}}"#, "x".repeat(8192));
    let (s, _) = post_sql(&http, port, Some(&good), big).await;
    assert_eq!(s, 413);
    let unknown = format!("postgresql://postgres:{PASSWORD}@nope.pgwake.test/postgres");
    // This deployment checks logins at the proxy, so an unknown id looks like a wrong password.
    let (s, b) = post_sql(&http, port, Some(&unknown), select1).await;
    assert_eq!((s, b["code"].as_str()), (400, Some("28P01")), "{b}");
    let wrong = "postgresql://postgres:wrong@demo.pgwake.test/postgres";
    let (s, b) = post_sql(&http, port, Some(wrong), select1).await;
    assert_eq!((s, b["code"].as_str()), (400, Some("28P01")), "{b}");
    assert_eq!(env.stats("demo").map_or(0, |s| s.starts), 0);

    let preflight = http
        .request(
            reqwest::Method::OPTIONS,
            format!("http://127.0.0.1:{port}/sql"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status().as_u16(), 200);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");

    let started = std::time::Instant::now();
    let (s, b) = post_sql(&http, port, Some(&good), select1).await;
    let cold = started.elapsed();
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["rows"], serde_json::json!([["2"]]));
    assert_eq!(
        (b["command"].as_str(), b["rowCount"].as_u64()),
        (Some("SELECT"), Some(1))
    );
    assert_eq!(b["fields"][0]["name"], "n");
    assert_eq!(b["fields"][0]["dataTypeID"], 23);
    assert_eq!(env.stats("demo").unwrap().starts, 1);
    eprintln!("cold /sql request (initdb and first start): {cold:?}");

    // The pool: the next requests with the same login reuse one compute connection.
    let pid = r#"{"query":"select pg_backend_pid()","params":[]}"#;
    let (_, a) = post_sql(&http, port, Some(&good), pid).await;
    let (_, b) = post_sql(&http, port, Some(&good), pid).await;
    assert_eq!(a["rows"], b["rows"], "a pooled connection was not reused");
    // ...and nothing a request set reaches the next one on that connection.
    let set = r#"{"query":"select set_config('search_path', 'leaked', false), pg_backend_pid()","params":[]}"#;
    let (_, c) = post_sql(&http, port, Some(&good), set).await;
    let show = r#"{"query":"select current_setting('search_path'), pg_backend_pid()","params":[]}"#;
    let (_, d) = post_sql(&http, port, Some(&good), show).await;
    // Array mode: [set_config, pid] and [current_setting, pid].
    assert!(c["rows"][0][1].is_string(), "{c}");
    assert_eq!(
        c["rows"][0][1], d["rows"][0][1],
        "not the pooled connection: {c} {d}"
    );
    assert!(d["rows"][0][0].is_string(), "{d}");
    assert_ne!(d["rows"][0][0], "leaked", "{d}");

    // Its idle connection holds no lease: the suspend goes ahead and closes it, and the next
    // request finds it dead and wakes the endpoint on a fresh one.
    env.suspend("demo").await;
    let started = std::time::Instant::now();
    let (s, b) = post_sql(&http, port, Some(&good), select1).await;
    eprintln!(
        "/sql request to a suspended endpoint: {:?}",
        started.elapsed()
    );
    assert_eq!((s, &b["rows"]), (200, &serde_json::json!([["2"]])));
    assert_eq!(env.stats("demo").unwrap().starts, 2);
    let count = |status: &str, kind: &str| {
        env.pgwake()
            .registry
            .gather()
            .iter()
            .filter(|f| f.get_name() == "pgwake_sql_requests_total")
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                let l = m.get_label();
                l.iter()
                    .any(|l| l.get_name() == "status" && l.get_value() == status)
                    && l.iter()
                        .any(|l| l.get_name() == "kind" && l.get_value() == kind)
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum::<u64>()
    };
    assert_eq!(count("400", "bad_request"), 2);
    assert_eq!(count("413", "request_too_large"), 1);
    // The wrong password and the unknown endpoint.
    assert_eq!(count("400", "auth_failed"), 2);
    assert_eq!(count("200", "ok"), 6);
    env.stop().await;
}

/// Waits (polling through `/sql` itself, with a deadline) until `n` queries sleep at the
/// compute; false if they never do.
async fn sleepers_become(http: &reqwest::Client, port: u16, conn: &str, n: u64) -> bool {
    let q = r#"{"query":"select count(*) from pg_stat_activity where wait_event = 'PgSleep'","params":[]}"#;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        let (s, b) = post_sql(http, port, Some(conn), q).await;
        assert_eq!(s, 200, "{b}");
        if b["rows"][0][0].as_str() == Some(&n.to_string()) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// A client that goes away mid-query, and a query over `query_timeout`, leave nothing running
/// at the compute: the proxy cancels the query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_http_cancels_abandoned_and_timed_out_queries() {
    use tokio::io::AsyncWriteExt;
    let dir = tempdir();
    let (extra, endpoint) = scram_computes(dir.path(), true);
    let extra = extra.replace(
        "[http]\nlisten = \"127.0.0.1:0\"\n",
        "[http]\nlisten = \"127.0.0.1:0\"\nquery_timeout = \"3s\"\n",
    );
    let env = Env::start_in(dir, &extra, &endpoint).await;
    let port = env.pgwake().http_addr().unwrap().port();
    let http = reqwest::Client::new();
    let conn = format!("postgresql://postgres:{PASSWORD}@demo.pgwake.test/postgres");
    assert!(sleepers_become(&http, port, &conn, 0).await);

    let body = r#"{"query":"select pg_sleep(60)","params":[]}"#;
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "POST /sql HTTP/1.1\r\nHost: demo\r\nNeon-Connection-String: {conn}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw.write_all(req.as_bytes()).await.unwrap();
    assert!(
        sleepers_become(&http, port, &conn, 1).await,
        "the query never started"
    );
    drop(raw);
    assert!(
        sleepers_become(&http, port, &conn, 0).await,
        "the abandoned query still runs"
    );

    let (s, b) = post_sql(&http, port, Some(&conn), body).await;
    assert_eq!((s, b["code"].as_str()), (400, Some("57014")), "{b}");
    assert!(
        sleepers_become(&http, port, &conn, 0).await,
        "the timed-out query still runs"
    );
    env.stop().await;
}

/// drizzle-orm on `drizzle-orm/neon-http`: insert … returning, select, update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drizzle_orm_over_sql_over_http() {
    if !have_neon_driver() {
        return;
    }
    let dir = tempdir();
    let (extra, endpoint) = scram_computes(dir.path(), true);
    let env = Env::start_in(dir, &extra, &endpoint).await;
    let port = env.pgwake().http_addr().unwrap().port();
    let args = vec![port.to_string(), "demo".into(), PASSWORD.into()];
    let out = node("drizzle_http.mjs", args).await;
    assert_eq!(
        out,
        "drizzle 1 hello {\"tags\":[\"a\",\"b\"]} true\nupdated 1\n"
    );
    env.stop().await;
}

/// `[http] tls = true`: wss:// and https:// with the `[tls]` certificates (checked by the
/// driver against the test CA), under `require_tls`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neon_driver_over_tls() {
    if !have_neon_driver() {
        return;
    }
    let dir = tempdir();
    let (ca_path, tls) = test_certificates(dir.path());
    let (extra, endpoint) = scram_computes(dir.path(), true);
    let extra = extra.replace("[http]\n", "[http]\ntls = true\n") + &tls;
    let env = Env::start_in(dir, &extra, &endpoint).await;
    let port = env.pgwake().http_addr().unwrap().port();
    let vars = || {
        vec![
            ("PGWAKE_TLS", "1".to_string()),
            ("NODE_EXTRA_CA_CERTS", ca_path.display().to_string()),
        ]
    };
    let args = vec![
        port.to_string(),
        "demo".into(),
        PASSWORD.into(),
        "scram".into(),
    ];
    let out = node_with("neon_ws.mjs", args, vars()).await;
    assert_eq!(out, format!("{WS_OK}wrong password 28P01\n"));
    let args = vec![port.to_string(), "demo".into(), PASSWORD.into()];
    let out = node_with("neon_http.mjs", args, vars()).await;
    assert!(out.starts_with("params 42 hé null\n"), "{out}");
    assert!(out.ends_with("wrong password 28P01\n"), "{out}");
    env.stop().await;
}

/// A test CA and a certificate for 127.0.0.1 signed by it, in `dir`; returns the CA's path and
/// the `[tls]` table (with `require_tls`) that serves the certificate.
fn test_certificates(dir: &Path) -> (std::path::PathBuf, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: with rcgen's default on both, the leaf looks self-signed.
    params
        .distinguished_name
        .push(DnType::CommonName, "pgwake serverless test CA");
    let ca = params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (ca_path, cert, key_path) = (dir.join("ca.pem"), dir.join("c.pem"), dir.join("c.key"));
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let tls = format!(
        "[tls]\nrequire_tls = true\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        cert.display(),
        key_path.display()
    );
    (ca_path, tls)
}

/// Under `require_tls`, a plaintext `[http]` listener refuses `/sql` like a TCP client
/// without TLS (28000), before any wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_sql_refused_under_require_tls() {
    let dir = tempdir();
    let (_, tls) = test_certificates(dir.path());
    let (extra, endpoint) = scram_computes(dir.path(), true);
    let env = Env::start_in(dir, &(extra + &tls), &endpoint).await;
    let port = env.pgwake().http_addr().unwrap().port();
    let conn = format!("postgresql://postgres:{PASSWORD}@demo.pgwake.test/postgres");
    let body = r#"{"query":"select 1","params":[]}"#;
    let (s, b) = post_sql(&reqwest::Client::new(), port, Some(&conn), body).await;
    assert_eq!((s, b["code"].as_str()), (400, Some("28000")), "{b}");
    assert_eq!(env.stats("demo").map_or(0, |s| s.starts), 0);
    env.stop().await;
}
