//! The serverless front door (`[http] listen`): Postgres over WebSocket for
//! `@neondatabase/serverless`'s `Pool`/`Client`. Each upgraded WebSocket becomes a byte stream
//! ([`ws::WsStream`]) that runs the same per-connection path as a TCP client (`conn::handle`):
//! startup, endpoint, login, limits, wake, relay and cancel keys all apply unchanged.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;
use tracing::debug;

use crate::shared::Proxy;

pub mod ws;

pub use ws::WsStream;

/// The `[http]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Absent: no HTTP/WebSocket listener. Plaintext: put it behind a TLS-terminating load
    /// balancer, or bind it to loopback.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

type Body = Full<Bytes>;

impl Proxy {
    /// Serves `[http] listen` until `shutdown` resolves. Upgraded WebSockets are sessions like
    /// TCP clients: they count under `max_connections` and the drain of [`Proxy::serve`].
    pub async fn serve_http(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => return,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning on the error.
                        debug!(error = %e, "http accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let this = Arc::clone(&this);
                    async move { Ok::<_, Infallible>(this.route_http(req, peer)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    }

    fn route_http(self: &Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        if ws::is_upgrade(&req) {
            return ws::upgrade(self, req, peer);
        }
        plain(StatusCode::NOT_FOUND, "not found\n")
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts")
}
