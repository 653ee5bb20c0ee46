//! The serverless front door (`[http] listen`) for `@neondatabase/serverless`: Postgres over
//! WebSocket for its `Pool`/`Client`, SQL over HTTP (`POST /sql`, [`sql`]) for `neon()`. Each upgraded WebSocket becomes a byte stream
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
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;
use tracing::debug;

use crate::shared::Proxy;

pub mod sql;
pub mod ws;

use ws::{percent_decode, query_param};

pub use ws::WsStream;

/// The `[http]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Absent: no HTTP/WebSocket listener. Plaintext: put it behind a TLS-terminating load
    /// balancer, or bind it to loopback.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// `POST /sql` bodies larger than this are refused with 413.
    #[serde(default = "d_max_bytes")]
    pub max_request_bytes: usize,
    /// A `/sql` result larger than this (the sum of the compute's messages) ends the request
    /// with 507.
    #[serde(default = "d_max_bytes")]
    pub max_response_bytes: usize,
    /// A `/sql` request not answered within this is ended (57014); its compute connection is
    /// closed, which ends the query at the compute's next write.
    #[serde(default = "d_query_timeout", with = "humantime_serde")]
    pub query_timeout: Duration,
}

fn d_max_bytes() -> usize {
    10 << 20
}

fn d_query_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: None,
            max_request_bytes: d_max_bytes(),
            max_response_bytes: d_max_bytes(),
            query_timeout: d_query_timeout(),
        }
    }
}

type Body = Full<Bytes>;

impl Proxy {
    /// Serves `[http] listen` until `shutdown` resolves. Upgraded WebSockets are sessions like
    /// TCP clients: they count under `max_connections` and the drain of [`Proxy::serve`].
    pub async fn serve_http(
        self: Arc<Self>,
        listener: TcpListener,
        cfg: HttpConfig,
        shutdown: impl Future<Output = ()>,
    ) {
        let cfg = Arc::new(cfg);
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
            let (this, cfg) = (Arc::clone(&self), Arc::clone(&cfg));
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let (this, cfg) = (Arc::clone(&this), Arc::clone(&cfg));
                    async move { Ok::<_, Infallible>(this.route_http(&cfg, req, peer).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    }

    async fn route_http(
        self: &Arc<Self>,
        cfg: &HttpConfig,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        if ws::is_upgrade(&req) {
            return ws::upgrade(self, req, peer);
        }
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/sql") => sql::handle(self, cfg, req, peer).await,
            (&Method::OPTIONS, "/sql") => sql::cors_preflight(),
            (_, "/sql") => plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            _ => plain(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts")
}
