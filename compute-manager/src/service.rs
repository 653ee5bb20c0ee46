//! The compute manager as a service, so that N proxy replicas share one manager (one wake per
//! endpoint across all of them): a small JSON-over-HTTP API (hyper) and the client the proxy
//! uses (reqwest). Without `[compute] manager_url` the proxy uses the in-process manager; both
//! sit behind [`Waker`].
//!
//! API (all JSON):
//! - `POST /v1/endpoints/{id}/wake` → `{"address": "host:port", "cold": bool}`, or an error
//!   `{"kind", "retryable", "message"}` with 404 (unknown), 429 (limits), 503 (not ready).
//! - `POST /v1/endpoints/{id}/suspend` → `{"suspended": bool}` (refused while clients are
//!   attached, reported or on the compute; see `Manager::suspend`).
//! - `GET /v1/endpoints/{id}` → status; `GET /v1/endpoints` → status of every endpoint.
//! - `POST /v1/activity` with `{"replica": "<id>", "ttl_ms": n, "endpoints": {"<id>": n}}` →
//!   `{"recorded": n}`: a proxy replica's live sessions per endpoint (see below). At most
//!   [`MAX_REPORT_BYTES`]; malformed bodies get 400 with the error body above.
//! - Every path answers 503 `{"kind": "not_leader", "retryable": true}` while this manager is on
//!   standby (leader election): only the leader may wake or suspend, and a standby's status
//!   would describe computes it does not run.
//!
//! Idle suspension in this mode: the manager holds no guard for the proxies' sessions (a
//! proxy's connection outlives the wake request), so three things stand in for one. A wake
//! counts as activity (it restarts the idle timer). Every replica counts its own sessions per
//! endpoint (the guard in a [`RemoteManager`] lease counts) and reports the counts every
//! `activity_interval` ([`RemoteManager::run_reports`]); each report holds for a ttl of three
//! intervals, so a replica that dies stops holding computes soon after, while one lost report
//! does not let a busy compute go. While any replica's unexpired count is above 0 the manager
//! neither idles nor suspends on request (`Manager::report_activity`). As a second guard,
//! before suspending the manager still asks the compute itself whether any client backend is
//! connected (`RunningCompute::client_connections`, `pg_stat_activity` for local computes;
//! Kubernetes computes cannot be asked, so for them the reports are the guard). A client
//! attached through any replica therefore keeps its compute, as long as that replica's
//! reports reach the manager.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use pgwake_router::{EndpointId, Route, RoutingTable};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{ActivityGuard, ComputeAddr, EndpointStats, Leadership, Lease, Manager, WakeError};

/// What the proxy needs from a compute manager, in-process or remote.
#[async_trait]
pub trait Waker: Send + Sync + 'static {
    async fn wake(&self, route: &Arc<Route>) -> Result<Lease, WakeError>;
}

#[async_trait]
impl Waker for Arc<Manager> {
    async fn wake(&self, route: &Arc<Route>) -> Result<Lease, WakeError> {
        Manager::wake(self, route).await
    }
}

/// The in-process manager of a process that elects a leader: wakes only while leading, like
/// its API.
pub struct LeaderOnly {
    pub manager: Arc<Manager>,
    pub leadership: Leadership,
}

#[async_trait]
impl Waker for LeaderOnly {
    async fn wake(&self, route: &Arc<Route>) -> Result<Lease, WakeError> {
        if !self.leadership.is_leader() {
            return Err(WakeError::NotLeader);
        }
        Manager::wake(&self.manager, route).await
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WakeResponse {
    pub address: String,
    pub cold: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: String,
    pub retryable: bool,
    /// Already stripped of internals (it is what a client may be shown).
    pub message: String,
}

/// The most an activity report may be: some 20,000 endpoints at once, far beyond one proxy's
/// working set, and small enough that a bad client cannot make the manager buffer much.
pub const MAX_REPORT_BYTES: usize = 1 << 20;

/// Replica ids are opaque labels for logs and the per-endpoint map; longer ones are refused
/// so that one report cannot fill the manager's memory with keys.
const MAX_REPLICA_ID_LEN: usize = 128;

/// `POST /v1/activity`: one proxy replica's live sessions per endpoint.
#[derive(Debug, Serialize, Deserialize)]
pub struct ActivityReport {
    /// Chosen at random when the replica starts: a restarted replica is a new one, and the
    /// old one's counts expire with their ttl.
    pub replica: String,
    /// How long the counts hold without a newer report.
    pub ttl_ms: u64,
    pub endpoints: HashMap<String, usize>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusBody {
    pub endpoint: String,
    pub phase: String,
    pub attached: usize,
    pub waiting: usize,
    pub starts: u64,
    pub start_failures: u64,
    /// Running computes taken over from a previous manager (`Manager::adopt_running`).
    #[serde(default)]
    pub adoptions: u64,
    pub suspends: u64,
    pub crashes: u64,
    pub busy_deferrals: u64,
    /// Sessions proxy replicas report attached to the compute (`POST /v1/activity`).
    #[serde(default)]
    pub remote_sessions: usize,
    pub address: Option<String>,
}

impl StatusBody {
    fn new(id: &EndpointId, s: EndpointStats) -> Self {
        Self {
            endpoint: id.to_string(),
            phase: s.phase.as_str().into(),
            attached: s.attached,
            waiting: s.waiting,
            starts: s.starts,
            start_failures: s.start_failures,
            adoptions: s.adoptions,
            suspends: s.suspends,
            crashes: s.crashes,
            busy_deferrals: s.busy_deferrals,
            remote_sessions: s.remote_sessions,
            address: s.addr.map(|a| a.to_string()),
        }
    }
}

/// Serves the API until `shutdown` resolves; while `leadership` is not leading, every request
/// is refused with 503 `not_leader` ([`Leadership::always`] for a manager without election).
pub async fn serve_api(
    listener: TcpListener,
    manager: Arc<Manager>,
    table: Arc<RoutingTable>,
    leadership: Leadership,
    shutdown: impl Future<Output = ()>,
) {
    let handle = move |req: Request<Incoming>| {
        let (m, t) = (Arc::clone(&manager), Arc::clone(&table));
        let leading = leadership.is_leader();
        async move {
            if leading {
                return route_request(req, &m, &t).await;
            }
            let e = WakeError::NotLeader;
            let mut resp = error(
                StatusCode::SERVICE_UNAVAILABLE,
                e.kind(),
                e.retryable(),
                e.user_message(),
            );
            // The proxy retries; on a fresh connection the Service can send it to the
            // leader, while a kept-alive one would bring it back here.
            resp.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            resp
        }
    };
    serve_http(listener, "manager API", handle, shutdown).await;
}

/// One small HTTP/1 server loop for pgwake's JSON and text listeners (this API and the proxy's
/// admin endpoints): every connection in its own task, `handle` called per request, until
/// `shutdown` resolves.
pub async fn serve_http<H, F>(
    listener: TcpListener,
    what: &'static str,
    handle: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    debug!(error = %e, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = handle(req);
                async move { Ok::<_, Infallible>(resp.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static response parts")
}

fn error(
    status: StatusCode,
    kind: &str,
    retryable: bool,
    message: String,
) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            kind: kind.into(),
            retryable,
            message,
        },
    )
}

async fn route_request(
    req: Request<Incoming>,
    manager: &Arc<Manager>,
    table: &RoutingTable,
) -> Response<Full<Bytes>> {
    let path: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (method, path.as_slice()) {
        (Method::GET, ["v1", "endpoints"]) => {
            let all: Vec<StatusBody> = manager
                .endpoints()
                .into_iter()
                .filter_map(|id| manager.stats(&id).map(|s| StatusBody::new(&id, s)))
                .collect();
            json(StatusCode::OK, &all)
        }
        (Method::POST, ["v1", "activity"]) => report_activity(req, manager, table).await,
        (method, ["v1", "endpoints", id, rest @ ..]) => {
            let Ok(id) = EndpointId::parse(id) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_endpoint",
                    false,
                    "invalid endpoint id".into(),
                );
            };
            let Some(route) = table.lookup(&id) else {
                return error(
                    StatusCode::NOT_FOUND,
                    "unknown_endpoint",
                    false,
                    format!("endpoint \"{id}\" does not exist"),
                );
            };
            match (method, rest) {
                (Method::POST, ["wake"]) => match manager.wake(&route).await {
                    // The proxy's connection is not ours to track: dropping the guard now
                    // restarts the idle timer, and from here on the proxy's activity reports
                    // (and the compute's own client count) guard the session.
                    Ok(lease) => json(
                        StatusCode::OK,
                        &WakeResponse {
                            address: lease.addr.to_string(),
                            cold: lease.cold,
                        },
                    ),
                    Err(e) => {
                        let status = match e {
                            WakeError::QueueFull | WakeError::RateLimited => {
                                StatusCode::TOO_MANY_REQUESTS
                            }
                            _ => StatusCode::SERVICE_UNAVAILABLE,
                        };
                        error(status, e.kind(), e.retryable(), e.user_message())
                    }
                },
                (Method::POST, ["suspend"]) => {
                    let suspended = manager.suspend(&id).await;
                    json(
                        StatusCode::OK,
                        &serde_json::json!({ "suspended": suspended }),
                    )
                }
                (Method::GET, []) => match manager.stats(&id) {
                    Some(s) => json(StatusCode::OK, &StatusBody::new(&id, s)),
                    None => json(
                        StatusCode::OK,
                        &serde_json::json!({ "endpoint": id.to_string(), "phase": "suspended" }),
                    ),
                },
                _ => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    false,
                    "no such operation".into(),
                ),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            false,
            "no such path".into(),
        ),
    }
}

async fn report_activity(
    req: Request<Incoming>,
    manager: &Manager,
    table: &RoutingTable,
) -> Response<Full<Bytes>> {
    let bad = |message: String| error(StatusCode::BAD_REQUEST, "bad_report", false, message);
    let body = match Limited::new(req.into_body(), MAX_REPORT_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad(format!("unreadable body: {e}")),
    };
    let report: ActivityReport = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("invalid activity report: {e}")),
    };
    if report.replica.is_empty() || report.replica.len() > MAX_REPLICA_ID_LEN {
        return bad(format!(
            "replica must be 1 to {MAX_REPLICA_ID_LEN} bytes long"
        ));
    }
    // Only endpoints in the routing table: the manager keeps per-endpoint state for each, so
    // made-up ids must not create any.
    let counts = report.endpoints.into_iter().filter_map(|(id, n)| {
        let id = EndpointId::parse(&id).ok()?;
        table.lookup(&id).is_some().then_some((id, n))
    });
    let recorded = manager.report_activity(
        &report.replica,
        counts,
        Duration::from_millis(report.ttl_ms),
    );
    json(StatusCode::OK, &serde_json::json!({ "recorded": recorded }))
}

/// Sessions one proxy replica holds, per endpoint, for its activity reports. An endpoint whose
/// count drops to 0 stays in the map until a report has carried that 0 to the manager.
#[derive(Default)]
struct Sessions(Mutex<HashMap<EndpointId, usize>>);

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<EndpointId, usize>> {
        // Plain counters: carrying on after a panic elsewhere beats losing every report.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(self: &Arc<Self>, endpoint: &EndpointId) -> SessionGuard {
        *self.lock().entry(endpoint.clone()).or_insert(0) += 1;
        SessionGuard {
            sessions: Arc::clone(self),
            endpoint: endpoint.clone(),
        }
    }
}

/// One proxied session counted in its replica's reports, uncounted on drop.
pub(crate) struct SessionGuard {
    sessions: Arc<Sessions>,
    endpoint: EndpointId,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Some(n) = self.sessions.lock().get_mut(&self.endpoint) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The proxy's side of the API.
pub struct RemoteManager {
    base: String,
    http: reqwest::Client,
    wake_timeout: Duration,
    replica: String,
    sessions: Arc<Sessions>,
}

impl RemoteManager {
    /// `base` is e.g. `http://pgwake-manager:9188`. `wake_timeout` bounds each request (the
    /// manager bounds the wake itself by its own `wake_timeout`).
    pub fn new(base: &str, wake_timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()?,
            wake_timeout,
            replica: format!("{:016x}", rand::random::<u64>()),
            sessions: Arc::default(),
        })
    }

    /// This replica's id in activity reports.
    pub fn replica_id(&self) -> &str {
        &self.replica
    }

    /// Sessions this replica holds on `endpoint` (woken through it and not yet closed).
    pub fn sessions(&self, endpoint: &EndpointId) -> usize {
        self.sessions.lock().get(endpoint).copied().unwrap_or(0)
    }

    /// Reports this replica's sessions every `interval` until `shutdown` resolves, then once
    /// more (by then the proxy has drained, so that last report releases its computes at once
    /// instead of after the ttl). A failed report is logged and the next tick carries the
    /// counts again; sessions never wait on reports.
    pub async fn run_reports(&self, interval: Duration, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        // `interval` panics on zero; the config refuses 0, this keeps the library total.
        let interval = interval.max(Duration::from_millis(1));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            let last = tokio::select! {
                _ = &mut shutdown => true,
                _ = tick.tick() => false,
            };
            match self.report_activity(interval).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    // One miss is covered by the ttl; a run of them may let computes go idle.
                    if failures >= 2 {
                        warn!(error = %e, failures, "activity report to the compute manager failed");
                    } else {
                        debug!(error = %e, "activity report to the compute manager failed");
                    }
                }
            }
            if last {
                return;
            }
        }
    }

    /// Sends one report: every endpoint with sessions, and a 0 for each that dropped to none
    /// since the last report that got through. Nothing is sent when there is nothing to say.
    pub async fn report_activity(&self, interval: Duration) -> Result<(), reqwest::Error> {
        let counts: Vec<(EndpointId, usize)> = self
            .sessions
            .lock()
            .iter()
            .map(|(id, n)| (id.clone(), *n))
            .collect();
        if counts.is_empty() {
            return Ok(());
        }
        let report = ActivityReport {
            replica: self.replica.clone(),
            ttl_ms: u64::try_from(interval.saturating_mul(3).as_millis()).unwrap_or(u64::MAX),
            endpoints: counts.iter().map(|(id, n)| (id.to_string(), *n)).collect(),
        };
        self.http
            .post(format!("{}/v1/activity", self.base))
            // Bounded so that a hung manager delays the next report by at most about one
            // interval (but never so short that a busy loopback times out).
            .timeout(interval.max(Duration::from_secs(1)))
            .json(&report)
            .send()
            .await?
            .error_for_status()?;
        // The manager has the 0s now. An endpoint that went to 0 after the snapshot keeps its
        // entry, so the next report carries that 0.
        let mut live = self.sessions.lock();
        for (id, sent) in counts {
            if sent == 0 && live.get(&id) == Some(&0) {
                live.remove(&id);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Waker for RemoteManager {
    /// Retries what a manager failover or restart looks like (connection refused or reset,
    /// `not_leader`, `shutting_down`) with backoff until `wake_timeout`: the client is held
    /// across the handover instead of getting an error for it. Answers from a working manager
    /// (its own wake timeout, limits, unknown endpoints) are final.
    async fn wake(&self, route: &Arc<Route>) -> Result<Lease, WakeError> {
        let deadline = tokio::time::Instant::now() + self.wake_timeout;
        let mut backoff = Duration::from_millis(50);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.wake_once(route, left).await {
                Err(
                    e @ (WakeError::ManagerUnavailable(_)
                    | WakeError::NotLeader
                    | WakeError::ShuttingDown),
                ) => {
                    let now = tokio::time::Instant::now();
                    if now + backoff >= deadline {
                        return Err(e);
                    }
                    debug!(endpoint = %route.endpoint, error = %e, ?backoff, "compute manager not available; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
                }
                other => return other,
            }
        }
    }
}

/// Longest pause between two tries of an unavailable manager: a Lease handover takes about
/// the retry period (2 s), so waiting longer than this would only add latency.
const MAX_RETRY_BACKOFF: Duration = Duration::from_millis(500);

impl RemoteManager {
    async fn wake_once(&self, route: &Arc<Route>, left: Duration) -> Result<Lease, WakeError> {
        let url = format!("{}/v1/endpoints/{}/wake", self.base, route.endpoint);
        let resp = self
            .http
            .post(&url)
            // The manager bounds a wake by its own wake_timeout; the margin lets its 57P03
            // answer arrive instead of a client-side timeout.
            .timeout(left + Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| WakeError::ManagerUnavailable(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| WakeError::ManagerUnavailable(e.to_string()))?;
        if status.is_success() {
            let w: WakeResponse = serde_json::from_slice(&body)
                .map_err(|e| WakeError::ManagerUnavailable(format!("bad wake response: {e}")))?;
            return Ok(Lease {
                addr: ComputeAddr::new(w.address),
                guard: ActivityGuard::remote(self.sessions.open(&route.endpoint)),
                cold: w.cold,
            });
        }
        let e: ErrorBody = serde_json::from_slice(&body)
            .map_err(|e| WakeError::ManagerUnavailable(format!("HTTP {status}: {e}")))?;
        Err(match e.kind.as_str() {
            "timeout" => WakeError::Timeout(self.wake_timeout),
            "queue_full" => WakeError::QueueFull,
            "rate_limited" => WakeError::RateLimited,
            "shutting_down" => WakeError::ShuttingDown,
            "not_leader" => WakeError::NotLeader,
            _ => WakeError::Remote {
                retryable: e.retryable,
                message: e.message,
            },
        })
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
