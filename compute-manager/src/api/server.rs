//! The manager's HTTP server: routing of the API paths, and the small HTTP/1 loop pgwake's
//! other JSON and text listeners share.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use pgwake_router::{EndpointId, RoutingTable};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::debug;

use super::management::{self, Management};
use super::types::{
    ActivityReport, ApiErrorKind, BlockerBody, ErrorBody, StatusBody, WakeResponse,
    MAX_REPLICA_ID_LEN, MAX_REPORT_BYTES,
};
use crate::provision::EndpointBody;
use crate::{Leadership, Manager, WakeError};

/// Serves the API until `shutdown` resolves; while `leadership` is not leading, every request
/// is refused with 503 `not_leader` ([`Leadership::always`] for a manager without election).
pub async fn serve_api(
    listener: TcpListener,
    manager: Arc<Manager>,
    table: Arc<RoutingTable>,
    leadership: Leadership,
    shutdown: impl Future<Output = ()>,
) {
    serve_api_with(listener, manager, table, leadership, None, shutdown).await
}

/// [`serve_api`] with the management routes (creating and deleting endpoints) when
/// `management` is given; without it they answer 403 `management_disabled`.
pub async fn serve_api_with(
    listener: TcpListener,
    manager: Arc<Manager>,
    table: Arc<RoutingTable>,
    leadership: Leadership,
    management: Option<Management>,
    shutdown: impl Future<Output = ()>,
) {
    let handle = move |req: Request<Incoming>| {
        let (m, t) = (Arc::clone(&manager), Arc::clone(&table));
        let mgmt = management.clone();
        let leading = leadership.is_leader();
        async move {
            if leading {
                return route_request(req, &m, &t, mgmt.as_ref()).await;
            }
            let e = WakeError::NotLeader;
            let mut resp = error(
                StatusCode::SERVICE_UNAVAILABLE,
                ApiErrorKind::Wake(e.kind()),
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

pub(super) fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static response parts")
}

pub(super) fn error(
    status: StatusCode,
    kind: ApiErrorKind,
    retryable: bool,
    message: String,
) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            kind: kind.as_str().into(),
            retryable,
            message,
            blocker: None,
        },
    )
}

async fn route_request(
    req: Request<Incoming>,
    manager: &Arc<Manager>,
    table: &RoutingTable,
    mgmt: Option<&Management>,
) -> Response<Full<Bytes>> {
    let path: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (method, path.as_slice()) {
        // Every endpoint the manager has state for or the table routes (configured, created
        // through the API, from resources): reads stay open like the rest of this API, which
        // the proxies call; only the changes below need the management token.
        (Method::GET, ["v1", "endpoints"]) => {
            let mut ids = manager.endpoints();
            ids.extend(table.routes().iter().map(|r| r.endpoint.clone()));
            ids.sort();
            ids.dedup();
            // One listing for all: the management side's per-endpoint lookup reads its list.
            let known: HashMap<String, EndpointBody> = mgmt
                .map(|m| m.endpoints.list())
                .unwrap_or_default()
                .into_iter()
                .map(|e| (e.id.clone(), e))
                .collect();
            let all: Vec<StatusBody> = ids
                .iter()
                .map(|id| {
                    let body = match manager.stats(id) {
                        Some(s) => StatusBody::new(id, s),
                        None => StatusBody::never_woken(id),
                    };
                    match known.get(id.as_str()) {
                        Some(e) => body.with_management(e.clone()),
                        None => body,
                    }
                })
                .collect();
            json(StatusCode::OK, &all)
        }
        (Method::POST, ["v1", "endpoints"]) => management::create(req, mgmt).await,
        (Method::DELETE, ["v1", "endpoints", id]) => {
            let id = id.to_string();
            management::delete(req, mgmt, &id).await
        }
        (Method::POST, ["v1", "activity"]) => report_activity(req, manager, table).await,
        (method, ["v1", "endpoints", id, rest @ ..]) => {
            let Ok(id) = EndpointId::parse(id) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    ApiErrorKind::BadEndpoint,
                    false,
                    "invalid endpoint id".into(),
                );
            };
            let Some(route) = table.lookup(&id) else {
                return error(
                    StatusCode::NOT_FOUND,
                    ApiErrorKind::UnknownEndpoint,
                    false,
                    format!("endpoint \"{id}\" does not exist"),
                );
            };
            match (method, rest) {
                (Method::POST, ["wake"]) => match manager.wake(&route).await {
                    // The proxy's connection is not ours to track: dropping the lease now
                    // restarts the idle timer, and from here on the proxy's activity reports
                    // (and the compute's own client count) guard the session.
                    Ok(attached) => json(
                        StatusCode::OK,
                        &WakeResponse {
                            address: attached.addr.to_string(),
                            cold: attached.cold,
                        },
                    ),
                    Err(e) => {
                        let status = match e {
                            WakeError::QueueFull | WakeError::RateLimited => {
                                StatusCode::TOO_MANY_REQUESTS
                            }
                            _ => StatusCode::SERVICE_UNAVAILABLE,
                        };
                        let blocker = match &e {
                            WakeError::Stalled { blocker, .. } => Some(BlockerBody {
                                reason: blocker.reason().into(),
                                detail: blocker.detail().map(Into::into),
                            }),
                            _ => None,
                        };
                        json(
                            status,
                            &ErrorBody {
                                kind: ApiErrorKind::Wake(e.kind()).as_str().into(),
                                retryable: e.retryable(),
                                message: e.user_message(),
                                blocker,
                            },
                        )
                    }
                },
                (Method::POST, ["suspend"]) => {
                    let suspended = manager.suspend(&id).await;
                    json(
                        StatusCode::OK,
                        &serde_json::json!({ "suspended": suspended }),
                    )
                }
                (Method::GET, []) => json(StatusCode::OK, &status(manager, mgmt, &id)),
                _ => error(
                    StatusCode::NOT_FOUND,
                    ApiErrorKind::NotFound,
                    false,
                    "no such operation".into(),
                ),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            ApiErrorKind::NotFound,
            false,
            "no such path".into(),
        ),
    }
}

/// `id`'s status, with what the management side knows of it when that is on.
fn status(manager: &Manager, mgmt: Option<&Management>, id: &EndpointId) -> StatusBody {
    let body = match manager.stats(id) {
        Some(s) => StatusBody::new(id, s),
        None => StatusBody::never_woken(id),
    };
    match mgmt.and_then(|m| m.endpoints.get(id)) {
        Some(e) => body.with_management(e),
        None => body,
    }
}

async fn report_activity(
    req: Request<Incoming>,
    manager: &Manager,
    table: &RoutingTable,
) -> Response<Full<Bytes>> {
    let bad = |message: String| {
        error(
            StatusCode::BAD_REQUEST,
            ApiErrorKind::BadReport,
            false,
            message,
        )
    };
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
