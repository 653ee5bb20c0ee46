//! The compute manager as a shared service: proxies configured with `manager_url` wake through
//! its HTTP API, several proxy replicas share one compute, and idle suspension follows the
//! sessions the replicas report and the compute's own client count rather than any one
//! proxy's view.

mod common;

use std::time::Duration;

use common::*;
use pgwake_compute_manager::Phase;

const LONG: Duration = Duration::from_secs(60);

const ENDPOINTS: &str = "[[endpoint]]\nid = \"demo\"\nbackend = \"local\"\nidle_timeout = \"1s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_share_one_manager_and_idle_follows_the_computes_clients() {
    let manager = Env::start("[manager]\nlisten = \"127.0.0.1:0\"", ENDPOINTS).await;
    let api = manager.pgwake().manager_api_addr().unwrap();
    // Reports less often than idle_timeout (1 s), so that idle checks run in between and the
    // deferrals below are seen.
    let remote = format!("[compute]\nmanager_url = \"http://{api}\"\nactivity_interval = \"2s\"");
    let proxy_a = Env::start(&remote, ENDPOINTS).await;
    let proxy_b = Env::start(&remote, ENDPOINTS).await;

    // A client through replica A: cold start happens in the manager, not in the proxy.
    let a = proxy_a.client("demo").await;
    assert_eq!(
        a.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    assert_eq!(manager.stats("demo").unwrap().starts, 1);
    assert!(
        proxy_a.stats("demo").is_none(),
        "the proxy never starts computes itself"
    );
    // Replica B reaches the same compute.
    let b_out = proxy_b.psql("demo", "select current_setting('port')");
    let a_port: String = a
        .query_one("select current_setting('port')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stdout(&b_out), a_port);
    assert_eq!(manager.stats("demo").unwrap().starts, 1);
    // A reports its open session; B's psql has ended, so B reports (at most) a last 0.
    wait_until(LONG, || manager.stats("demo").unwrap().remote_sessions == 1)
        .await
        .expect("replica A's session reported");

    // The manager holds no guard for A's session, and idle_timeout is 1 s: its idle checks
    // find A's reported session (and a client on the compute) and keep deferring. Wait for
    // two of them.
    wait_until(LONG, || manager.stats("demo").unwrap().busy_deferrals >= 2)
        .await
        .expect("idle checks ran");
    assert_eq!(manager.stats("demo").unwrap().phase, Phase::Running);
    assert_eq!(
        a.query_one("select 2", &[]).await.unwrap().get::<_, i32>(0),
        2,
        "session intact"
    );

    // The API: status, a refused suspend while the client is attached, unknown endpoints.
    let (code, body) = http(api, "GET", "/v1/endpoints/demo").await;
    assert_eq!(code, 200);
    assert!(body.contains("\"phase\":\"running\""), "{body}");
    assert!(body.contains("\"remote_sessions\":1"), "{body}");
    let (code, body) = http(api, "POST", "/v1/endpoints/demo/suspend").await;
    assert_eq!((code, body.as_str()), (200, "{\"suspended\":false}"));
    assert_eq!(http(api, "POST", "/v1/endpoints/nope/wake").await.0, 404);
    let (code, body) = http(api, "GET", "/v1/endpoints").await;
    assert_eq!(code, 200);
    assert!(
        body.starts_with('[') && body.contains("\"endpoint\":\"demo\""),
        "{body}"
    );

    // The last client leaves: A reports its 0, and the manager's idle timer suspends the
    // compute.
    drop(a);
    wait_until(LONG, || manager.stats("demo").unwrap().remote_sessions == 0)
        .await
        .expect("replica A's 0 reported");
    manager.wait_phase("demo", Phase::Suspended, LONG).await;
    // And the next client through B wakes it again through the API.
    assert_eq!(stdout(&proxy_b.psql("demo", "select 'again'")), "again");
    assert_eq!(manager.stats("demo").unwrap().starts, 2);

    proxy_a.stop().await;
    proxy_b.stop().await;
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_manager_is_a_retryable_error_for_the_client() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Env::start(
        &format!("[compute]\nmanager_url = \"http://{closed}\"\nwake_timeout = \"1s\""),
        ENDPOINTS,
    )
    .await;
    let err = tokio_postgres::connect(&proxy.conn_str("demo"), tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "57P03");
    assert!(db.message().contains("not reachable"), "{}", db.message());
    assert!(
        !db.message().contains(&closed.to_string()),
        "address leaked: {}",
        db.message()
    );
    proxy.stop().await;
}
