//! The API and [`RemoteManager`] over real HTTP on port 0, against a compute that cannot count
//! its own clients (as a Kubernetes one): the activity reports alone must keep it up. Real
//! time with short durations; every wait is for a condition, with a deadline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use pgwake_router::BackendSpec;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper::StatusCode;
use pgwake_router::{EndpointId, Route, RoutingTable};
use tokio::net::TcpListener;

use super::*;
use crate::{
    BackendError, Backends, ComputeAddr, ComputeBackend, ComputeWaker, Leadership, Manager,
    ManagerConfig, ManagerMetrics, Phase, RunningCompute, WakeError,
};

/// The proxy's report task, as `Pgwake::start` runs it; send on the sender to stop it (it then
/// makes its last report).
fn spawn_reports(
    remote: &Arc<RemoteManager>,
    interval: Duration,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let r = Arc::clone(remote);
    let task = tokio::spawn(async move {
        r.run_reports(interval, async move {
            let _ = stopped.await;
        })
        .await
    });
    (stop, task)
}

const IDLE: Duration = Duration::from_millis(300);
const INTERVAL: Duration = Duration::from_millis(50);
const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Backend {
    stops: Arc<AtomicUsize>,
}

struct Compute {
    addr: ComputeAddr,
    stops: Arc<AtomicUsize>,
    exited: watch::Sender<bool>,
}

#[async_trait]
impl ComputeBackend for Backend {
    async fn start(&self, _route: &Route) -> Result<Box<dyn RunningCompute>, BackendError> {
        Ok(Box::new(Compute {
            addr: ComputeAddr::new("127.0.0.1:1"),
            stops: Arc::clone(&self.stops),
            exited: watch::channel(false).0,
        }))
    }
}

// `client_connections` keeps its default: None, the compute cannot be asked.
#[async_trait]
impl RunningCompute for Compute {
    fn addr(&self) -> &ComputeAddr {
        &self.addr
    }
    async fn stop(&self) -> Result<(), BackendError> {
        self.stops.fetch_add(1, Ordering::SeqCst);
        self.exited.send_replace(true);
        Ok(())
    }
    async fn exited(&self) {
        let _ = self.exited.subscribe().wait_for(|e| *e).await;
    }
}

struct Harness {
    manager: Arc<Manager>,
    backend: Arc<Backend>,
    api: SocketAddr,
    route: Arc<Route>,
    _stop_api: oneshot::Sender<()>,
}

async fn harness() -> Harness {
    let backend = Arc::new(Backend::default());
    let manager = Manager::new(
        ManagerConfig {
            idle_timeout: IDLE,
            ..ManagerConfig::default()
        },
        Backends::all(Arc::clone(&backend) as _),
        ManagerMetrics::new(&prometheus::Registry::new()).unwrap(),
    );
    let table = Arc::new(RoutingTable::new());
    let route = Route {
        endpoint: EndpointId::parse("ep").unwrap(),
        // The kind only picks the backend; `Backends::all` gives the same fake for each.
        backend: BackendSpec::Local {
            settings: BTreeMap::new(),
        },
        idle_timeout: None,
        deep_sleep_after: None,
        allow: Vec::new(),
        max_connections: None,
    };
    table.upsert(route.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_api(
        listener,
        Arc::clone(&manager),
        table,
        crate::Leadership::always(),
        async move {
            let _ = stopped.await;
        },
    ));
    Harness {
        manager,
        backend,
        api,
        route: Arc::new(route),
        _stop_api: stop,
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A backend whose start never ends, and which says why (as a pod that cannot be scheduled).
struct Stuck;

#[async_trait]
impl ComputeBackend for Stuck {
    async fn start(&self, _route: &Route) -> Result<Box<dyn RunningCompute>, BackendError> {
        std::future::pending().await
    }

    fn start_blocker(&self, _id: &EndpointId) -> Option<crate::StartBlocker> {
        Some(crate::StartBlocker::new(
            "Unschedulable",
            Some("insufficient memory"),
        ))
    }
}

/// A wake that times out at the manager tells a proxy on the other side of the API why, as
/// the proxy's own manager would.
#[tokio::test]
async fn a_remote_proxy_learns_why_a_wake_timed_out() {
    let wake_timeout = Duration::from_secs(1);
    let manager = Manager::new(
        ManagerConfig {
            wake_timeout,
            ..ManagerConfig::default()
        },
        Backends::all(Arc::new(Stuck) as _),
        ManagerMetrics::new(&prometheus::Registry::new()).unwrap(),
    );
    let table = Arc::new(RoutingTable::new());
    let route = Route {
        endpoint: EndpointId::parse("ep").unwrap(),
        backend: BackendSpec::Local {
            settings: BTreeMap::new(),
        },
        idle_timeout: None,
        deep_sleep_after: None,
        allow: Vec::new(),
        max_connections: None,
    };
    table.upsert(route.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_api(
        listener,
        manager,
        table,
        crate::Leadership::always(),
        async move {
            let _ = stopped.await;
        },
    ));
    let remote = RemoteManager::new(&format!("http://{api}"), wake_timeout).unwrap();
    let e = match remote.wake(&Arc::new(route)).await {
        Err(e) => e,
        Ok(_) => panic!("woke a compute that never starts"),
    };
    assert!(matches!(e, WakeError::Stalled { .. }), "{e:?}");
    assert!(e.retryable());
    assert_eq!(
        e.user_message(),
        "the compute did not become ready within 1s: Unschedulable (insufficient memory)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_held_through_a_remote_manager_keeps_its_compute() {
    let h = harness().await;
    let id = h.route.endpoint.clone();
    let remote = Arc::new(RemoteManager::new(&format!("http://{}", h.api), DEADLINE).unwrap());
    let (stop_reports, reports) = spawn_reports(&remote, INTERVAL);

    let lease = remote.wake(&h.route).await.unwrap();
    assert_eq!(remote.sessions(&id), 1);
    until("the manager counts the session", || {
        h.manager.stats(&id).unwrap().remote_sessions == 1
    })
    .await;
    // Several idle timeouts with the session open: never suspended.
    let t0 = Instant::now();
    while t0.elapsed() < IDLE * 4 {
        assert_eq!(h.manager.stats(&id).unwrap().phase, Phase::Running);
        tokio::time::sleep(INTERVAL).await;
    }
    assert_eq!(h.backend.stops.load(Ordering::SeqCst), 0);
    // A requested suspend through the API is refused as well.
    let refused: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{}/v1/endpoints/ep/suspend", h.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(refused, serde_json::json!({ "suspended": false }));

    // The session ends: the next report carries its 0 and the idle timer takes the compute.
    drop(lease);
    assert_eq!(remote.sessions(&id), 0);
    tokio::time::timeout(DEADLINE, h.manager.wait_for_phase(&id, Phase::Suspended))
        .await
        .unwrap_or_else(|_| panic!("not suspended: {:?}", h.manager.stats(&id)));
    let st = h.manager.stats(&id).unwrap();
    assert_eq!((st.suspends, st.remote_sessions), (1, 0));
    assert_eq!(h.backend.stops.load(Ordering::SeqCst), 1);
    let _ = stop_reports.send(());
    tokio::time::timeout(DEADLINE, reports)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_report_on_shutdown_releases_the_compute_at_once() {
    let h = harness().await;
    let id = h.route.endpoint.clone();
    let remote = Arc::new(RemoteManager::new(&format!("http://{}", h.api), DEADLINE).unwrap());
    let lease = remote.wake(&h.route).await.unwrap();
    // An interval far beyond the test: only explicit reports and the last one are sent.
    let hour = Duration::from_secs(3600);
    remote.report_activity(hour).await.unwrap();
    assert_eq!(h.manager.stats(&id).unwrap().remote_sessions, 1);
    let (stop_reports, reports) = spawn_reports(&remote, hour);
    drop(lease);
    let _ = stop_reports.send(());
    tokio::time::timeout(DEADLINE, reports)
        .await
        .unwrap()
        .unwrap();
    // Well before the hour-long ttl: the shutdown report carried the 0.
    assert_eq!(h.manager.stats(&id).unwrap().remote_sessions, 0);
    // And the 0 went out once: nothing is left to report.
    assert!(remote.sessions.lock().is_empty());
}

#[tokio::test]
async fn bad_activity_reports_are_refused_and_unknown_endpoints_ignored() {
    let h = harness().await;
    let url = format!("http://{}/v1/activity", h.api);
    let http = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        http.post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, needle) in [
        (b"{not json".to_vec(), "invalid activity report"),
        (br#"{"replica": "r", "ttl_ms": 1}"#.to_vec(), "endpoints"),
        (
            format!(
                r#"{{"replica": "{}", "ttl_ms": 1, "endpoints": {{}}}}"#,
                "x".repeat(200)
            )
            .into_bytes(),
            "replica must be",
        ),
        (
            br#"{"replica": "", "ttl_ms": 1, "endpoints": {}}"#.to_vec(),
            "replica must be",
        ),
        (vec![b' '; MAX_REPORT_BYTES + 1], "unreadable body"),
    ] {
        let resp = post(body).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let e: ErrorBody = resp.json().await.unwrap();
        assert_eq!(e.kind, "bad_report");
        assert!(
            e.message.contains(needle),
            "{needle:?} not in {:?}",
            e.message
        );
    }
    // Woken, unknown and invalid ids in one report: only the routed one is recorded.
    drop(h.manager.wake(&h.route).await.unwrap());
    let resp = post(
        br#"{"replica": "r", "ttl_ms": 60000, "endpoints": {"ep": 2, "nope": 1, "Bad Id!": 1}}"#
            .to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v, serde_json::json!({ "recorded": 1 }));
    let nope = EndpointId::parse("nope").unwrap();
    assert!(h.manager.stats(&nope).is_none());
    let status: StatusBody = http
        .get(format!("http://{}/v1/endpoints/ep", h.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status.remote_sessions, 2);
}

/// Leader election: a standby refuses everything as retryable until it leads.
mod standby {
    use super::*;
    use crate::LeaderState;

    /// Static: the manager answers a wake for it at once, so only the API path is tested.
    fn static_demo() -> Arc<Route> {
        Arc::new(Route {
            endpoint: EndpointId::parse("demo").unwrap(),
            backend: pgwake_router::BackendSpec::Static {
                address: "127.0.0.1:5432".into(),
            },
            idle_timeout: None,
            deep_sleep_after: None,
            allow: Vec::new(),
            max_connections: None,
        })
    }

    async fn call(http: &reqwest::Client, method: &str, url: &str) -> (u16, serde_json::Value) {
        let resp = http
            .request(method.parse().unwrap(), url)
            .send()
            .await
            .unwrap();
        let code = resp.status().as_u16();
        (code, resp.json().await.unwrap())
    }

    #[tokio::test]
    async fn a_standby_manager_refuses_every_request_as_retryable_until_it_leads() {
        let manager = Manager::new(
            ManagerConfig::default(),
            Backends {
                local: None,
                kubernetes: None,
            },
            ManagerMetrics::new(&prometheus::Registry::new()).unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, leadership) = Leadership::manual(LeaderState::Standby);
        tokio::spawn(serve_api(
            listener,
            manager,
            Arc::new(RoutingTable::new()),
            leadership,
            std::future::pending(),
        ));
        let http = reqwest::Client::new();
        let base = format!("http://{addr}");

        for (method, path) in [
            ("POST", "/v1/endpoints/demo/wake"),
            ("POST", "/v1/endpoints/demo/suspend"),
            ("GET", "/v1/endpoints/demo"),
            ("GET", "/v1/endpoints"),
        ] {
            let (code, body) = call(&http, method, &format!("{base}{path}")).await;
            assert_eq!(code, 503, "{method} {path}");
            assert_eq!(body["kind"], "not_leader", "{body}");
            assert_eq!(body["retryable"], true, "{body}");
            assert!(
                body["message"].as_str().unwrap().contains("retry"),
                "{body}"
            );
        }
        // What a proxy makes of it once its wake_timeout has passed in retries: a retryable
        // error, not a failed compute.
        let remote = RemoteManager::new(&base, Duration::from_millis(300)).unwrap();
        let route = static_demo();
        let err = remote.wake(&route).await.err().expect("refused");
        assert!(matches!(err, WakeError::NotLeader), "{err:?}");
        assert!(err.retryable());

        // Leader now: requests reach the manager (an unknown endpoint is its answer).
        state.send_replace(LeaderState::Leading);
        let (code, body) = call(&http, "GET", &format!("{base}/v1/endpoints")).await;
        assert_eq!((code, body), (200, serde_json::json!([])));
        let (code, body) = call(&http, "POST", &format!("{base}/v1/endpoints/demo/wake")).await;
        assert_eq!(code, 404);
        assert_eq!(body["kind"], "unknown_endpoint");

        // Deposed: refused again at once.
        state.send_replace(LeaderState::Lost);
        let (code, body) = call(&http, "GET", &format!("{base}/v1/endpoints")).await;
        assert_eq!((code, body["kind"].as_str()), (503, Some("not_leader")));
    }

    #[tokio::test]
    async fn a_wake_is_held_across_a_leader_handover() {
        let manager = Manager::new(
            ManagerConfig::default(),
            Backends::default(),
            ManagerMetrics::new(&prometheus::Registry::new()).unwrap(),
        );
        let route = static_demo();
        let table = Arc::new(RoutingTable::new());
        table.upsert(Route::clone(&route));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (state, leadership) = Leadership::manual(LeaderState::Standby);
        tokio::spawn(serve_api(
            listener,
            manager,
            table,
            leadership,
            std::future::pending(),
        ));
        let remote = Arc::new(RemoteManager::new(&base, Duration::from_secs(30)).unwrap());
        let r = Arc::clone(&remote);
        let rt = Arc::clone(&route);
        let mut wake = tokio::spawn(async move { r.wake(&rt).await.map(|l| l.addr) });
        // Without retries the standby's first refusal would end the wake right away.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut wake)
                .await
                .is_err(),
            "the wake ended while the manager was on standby"
        );
        state.send_replace(LeaderState::Leading);
        let addr = tokio::time::timeout(DEADLINE, wake)
            .await
            .expect("wake finished after the handover")
            .unwrap()
            .expect("woken by the new leader");
        assert_eq!(addr.as_str(), "127.0.0.1:5432");
    }
}
