//! The operators' HTTP listener: `GET /metrics` (Prometheus text), `GET /healthz` (the process
//! is alive) and `GET /readyz` (accepting new connections; false from the moment a drain
//! starts, so a load balancer stops sending new clients before any is refused).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Readiness, shared by the admin listener, whoever starts a drain, and the routing table's
/// source.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    /// False while the routing table waits for its first complete load from a watched source
    /// (the `PgwakeEndpoint` resources): until then an endpoint that exists would be refused
    /// as unknown, so a load balancer must not send clients yet.
    routes_loaded: watch::Sender<bool>,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(true),
            routes_loaded: watch::Sender::new(true),
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn set_routes_loaded(&self, loaded: bool) {
        self.routes_loaded.send_replace(loaded);
    }

    pub fn routes_loaded(&self) -> bool {
        *self.routes_loaded.borrow()
    }

    /// Follows [`Health::routes_loaded`], for whoever must wait for the first complete load
    /// (the manager's adoption of running computes).
    pub fn watch_routes_loaded(&self) -> watch::Receiver<bool> {
        self.routes_loaded.subscribe()
    }

    pub fn is_ready(&self) -> bool {
        // Not leadership: a standby compute manager is Ready too, so that its Deployment's
        // rollouts complete; its Service selects the leader by a pod label instead.
        self.ready.load(Ordering::Acquire) && self.routes_loaded()
    }
}

pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) {
    let handle = move |req: Request<Incoming>| {
        let resp = respond(&req, &registry, &health);
        std::future::ready(resp)
    };
    pgwake_compute_manager::serve_http(listener, "admin", handle, shutdown).await;
}

fn respond(req: &Request<Incoming>, registry: &Registry, health: &Health) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let enc = TextEncoder::new();
            let mut buf = Vec::new();
            if enc.encode(&registry.gather(), &mut buf).is_err() {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
            }
            Response::builder()
                .header("content-type", enc.format_type())
                .body(Full::new(Bytes::from(buf)))
                .expect("metrics response")
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" if !health.routes_loaded() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "routing table not loaded yet\n",
        ),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_loaded_routes_and_no_drain() {
        let h = Health::new();
        assert!(h.is_ready());
        h.set_routes_loaded(false);
        assert!(!h.is_ready());
        h.set_routes_loaded(true);
        assert!(h.is_ready());
        h.set_ready(false);
        assert!(!h.is_ready());
        // A drain wins over a late first load.
        h.set_routes_loaded(true);
        assert!(!h.is_ready());
    }

    #[tokio::test]
    async fn readyz_is_503_until_the_routes_are_loaded() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new();
        health.set_routes_loaded(false);
        tokio::spawn(serve(
            listener,
            Registry::new(),
            Arc::clone(&health),
            std::future::pending(),
        ));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let r = get("/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("routing table not loaded yet"), "{r}");
        // Alive all the same: the liveness probe must not restart it.
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        health.set_routes_loaded(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    }
}
