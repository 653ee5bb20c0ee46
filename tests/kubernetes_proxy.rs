//! A scale-out proxy pod starting, against a fake Kubernetes API server: with the proxy config
//! shipped in deploy/overlays/scale-out/proxy.toml, pgwake lists and then watches the PgwakeEndpoints,
//! gets the roles Secret one of them names (and makes no other API call: the proxy Role
//! allows nothing else), answers /readyz 503 until the list is in its routing table and the
//! Secret read, then is ready, routes the endpoints and checks logins to the secured one with
//! the Secret's verifier before any wake.
//!
//! Its own test binary: it points KUBECONFIG at the fake server for the whole process.

mod common;

use std::sync::Arc;
use std::time::Duration;

use pgwake::{Config, Pgwake};
use pgwake_router::EndpointId;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

const LIST: &str = r#"{"apiVersion":"pgwake.io/v1","kind":"PgwakeEndpointList","metadata":{"resourceVersion":"7"},"items":[{"apiVersion":"pgwake.io/v1","kind":"PgwakeEndpoint","metadata":{"name":"demo","namespace":"pgwake","resourceVersion":"7"},"spec":{"compute":{"image":"postgres:16"}}},{"apiVersion":"pgwake.io/v1","kind":"PgwakeEndpoint","metadata":{"name":"secured","namespace":"pgwake","resourceVersion":"7"},"spec":{"compute":{"image":"postgres:16"},"rolesSecret":{"name":"demo-roles"}}}]}"#;

const SECRET_GET: &str = "GET /api/v1/namespaces/pgwake/secrets/demo-roles";

/// Secret demo-roles as the API server returns it: role alice, password "right".
fn roles_secret() -> String {
    let roles = format!(
        "\"alice\" \"{}\"\n",
        postgres_protocol::password::scram_sha_256(b"right")
    );
    serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": { "name": "demo-roles", "namespace": "pgwake", "resourceVersion": "3" },
        "data": { "roles": k8s_openapi::ByteString(roles.into_bytes()) },
    })
    .to_string()
}

/// The SQLSTATE a login to `endpoint` ends with (`None`: it succeeded).
async fn login(
    proxy: std::net::SocketAddr,
    endpoint: &str,
    user: &str,
    password: &str,
) -> Option<String> {
    let conn = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=postgres options=endpoint={endpoint} connect_timeout=20",
        proxy.port()
    );
    match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
        Ok(_) => None,
        Err(e) => Some(
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.code().code().to_string()),
        ),
    }
}

/// Records every request as "METHOD uri", answers a list once `release` is notified, and
/// holds a watch open without an event.
async fn fake_api(
    listener: TcpListener,
    seen: mpsc::UnboundedSender<String>,
    release: Arc<Notify>,
) {
    common::fake_http_server(listener, move |method, uri| {
        let (seen, release) = (seen.clone(), Arc::clone(&release));
        async move {
            seen.send(format!("{method} {uri}")).unwrap();
            if uri.contains("watch=true") {
                return None;
            }
            if format!("{method} {uri}") == SECRET_GET {
                return Some(("200 OK", roles_secret()));
            }
            release.notified().await;
            Some(("200 OK", LIST.to_string()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_is_ready_once_the_endpoints_are_loaded_and_calls_only_what_its_role_allows() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    tokio::spawn(fake_api(listener, tx, Arc::clone(&release)));

    let dir = tempfile::tempdir().unwrap();
    // The only test in this binary: nothing else reads the environment meanwhile.
    common::use_fake_kube_api(dir.path(), api);

    let mut config = Config::parse(&common::shipped_config(
        "deploy/overlays/scale-out/proxy.toml",
    ))
    .unwrap();
    assert!(config.compute.manager_url.is_some());
    config.proxy.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    // No manager: a login that passes the proxy's check fails at the wake, quickly.
    config.compute.manager_url = Some("http://127.0.0.1:1".into());
    config.compute.wake_timeout = Duration::from_secs(2);
    let pgwake = Pgwake::start(config).await.unwrap();
    let admin = pgwake.admin_addr().unwrap();

    // The list is held: not ready, and the endpoint is unknown so far.
    let first = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("no API request")
        .unwrap();
    assert_eq!(
        first,
        "GET /apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints?&limit=500"
    );
    let (status, body) = common::http_get(admin, "/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "routing table not loaded yet\n")
    );
    let demo = EndpointId::parse("demo").unwrap();
    assert!(pgwake.table.lookup(&demo).is_none());

    release.notify_one();
    // The watch, and the get of the one roles Secret named, in either order.
    let mut next = Vec::new();
    for _ in 0..2 {
        next.push(
            tokio::time::timeout(Duration::from_secs(10), seen.recv())
                .await
                .expect("no watch or Secret get")
                .unwrap(),
        );
    }
    next.sort();
    assert_eq!(
        next,
        [
            "GET /api/v1/namespaces/pgwake/secrets/demo-roles",
            "GET /apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=7"
        ]
    );
    let mut ready = false;
    for _ in 0..100 {
        if common::http_get(admin, "/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "/readyz never turned 200");
    assert!(pgwake.table.lookup(&demo).is_some());

    // Checked with the Secret's verifier at the proxy: a wrong password and a role the Secret
    // does not list are refused there (28P01); the right one passes and only then wakes,
    // which fails here for want of a manager (not 28P01).
    let proxy = pgwake.local_addr();
    assert_eq!(
        login(proxy, "secured", "alice", "wrong").await.as_deref(),
        Some("28P01")
    );
    assert_eq!(
        login(proxy, "secured", "bob", "right").await.as_deref(),
        Some("28P01")
    );
    let woken = login(proxy, "secured", "alice", "right").await;
    assert!(
        woken.is_some() && woken.as_deref() != Some("28P01"),
        "{woken:?}"
    );

    // A list and a watch of pgwakeendpoints and a get of the named Secret, nothing else: the
    // proxy Role in deploy/overlays/scale-out/10-rbac.yaml. The watcher may repeat its list or
    // watch (the fake ends each watch at once) and the Secret may be read again; any other
    // request in this window is one the Role would refuse.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let endpoints = "GET /apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints?";
    while let Ok(request) = seen.try_recv() {
        assert!(
            request == SECRET_GET || request.starts_with(endpoints),
            "unexpected API request: {request}"
        );
    }
    pgwake.shutdown().await;
}
