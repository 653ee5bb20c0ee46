//! The compute manager as a service, so that N proxy replicas share one manager (one wake per
//! endpoint across all of them): a small JSON-over-HTTP API (hyper) and the client the proxy
//! uses (reqwest). Without `[compute] manager_url` the proxy uses the in-process manager; both
//! sit behind [`Waker`].
//!
//! API (all JSON):
//! - `POST /v1/endpoints/{id}/wake` → `{"address": "host:port", "cold": bool}`, or an error
//!   `{"kind", "retryable", "message"}` with 404 (unknown), 429 (limits), 503 (not ready).
//! - `POST /v1/endpoints/{id}/suspend` → `{"suspended": bool}` (refused while clients are
//!   attached; see `Manager::suspend`).
//! - `GET /v1/endpoints/{id}` → status; `GET /v1/endpoints` → status of every endpoint.
//! - Every path answers 503 `{"kind": "not_leader", "retryable": true}` while this manager is on
//!   standby (leader election): only the leader may wake or suspend, and a standby's status
//!   would describe computes it does not run.
//!
//! Idle suspension in this mode: the manager cannot see the proxies' connections, so a wake
//! counts as activity (it restarts the idle timer) and, before suspending, the manager asks
//! the compute itself whether any client backend is connected (`RunningCompute::
//! client_connections`). A client attached through any replica therefore keeps its compute.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use pgwake_router::{EndpointId, Route, RoutingTable};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::debug;

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

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusBody {
    pub endpoint: String,
    pub phase: String,
    pub attached: usize,
    pub waiting: usize,
    pub starts: u64,
    pub start_failures: u64,
    pub suspends: u64,
    pub crashes: u64,
    pub busy_deferrals: u64,
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
            suspends: s.suspends,
            crashes: s.crashes,
            busy_deferrals: s.busy_deferrals,
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
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "manager API accept failed");
                    continue;
                }
            },
        };
        let (m, t, l) = (Arc::clone(&manager), Arc::clone(&table), leadership.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (m, t) = (Arc::clone(&m), Arc::clone(&t));
                let leading = l.is_leader();
                async move {
                    if !leading {
                        let e = WakeError::NotLeader;
                        return Ok::<_, Infallible>(error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            e.kind(),
                            e.retryable(),
                            e.user_message(),
                        ));
                    }
                    Ok(route_request(req, &m, &t).await)
                }
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
                    // restarts the idle timer, and the compute's own client count guards the
                    // session from here on.
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

/// The proxy's side of the API.
pub struct RemoteManager {
    base: String,
    http: reqwest::Client,
    wake_timeout: Duration,
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
        })
    }
}

#[async_trait]
impl Waker for RemoteManager {
    async fn wake(&self, route: &Arc<Route>) -> Result<Lease, WakeError> {
        let url = format!("{}/v1/endpoints/{}/wake", self.base, route.endpoint);
        let resp = self
            .http
            .post(&url)
            .timeout(self.wake_timeout + Duration::from_secs(5))
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
                guard: ActivityGuard::detached(),
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
mod tests {
    use super::*;
    use crate::{Backends, LeaderState, ManagerConfig, ManagerMetrics};

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
        // What a proxy makes of it: a retryable error, not a failed compute.
        let remote = RemoteManager::new(&base, Duration::from_secs(5)).unwrap();
        let route = Arc::new(Route {
            endpoint: EndpointId::parse("demo").unwrap(),
            backend: pgwake_router::BackendSpec::Static {
                address: "127.0.0.1:5432".into(),
            },
            idle_timeout: None,
            allow: Vec::new(),
            max_connections: None,
        });
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
}
