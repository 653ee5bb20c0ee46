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
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use serde::Deserialize;
use tokio::net::TcpListener;
use tracing::debug;

use crate::shared::Proxy;

mod pool;
pub mod sql;
pub mod ws;

use ws::{percent_decode, query_param};

pub use ws::WsStream;

/// The `[http]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Absent: no HTTP/WebSocket listener.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// HTTPS/WSS with the `[tls]` certificates (chosen by SNI as for Postgres clients); off:
    /// plaintext, for a TLS-terminating load balancer in front or loopback.
    #[serde(default)]
    pub tls: bool,
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
    /// A `/sql` compute connection left idle this long is closed; `0s`: no pool (each request
    /// opens and logs in its own).
    #[serde(default = "d_pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
}

fn d_pool_idle_timeout() -> Duration {
    Duration::from_secs(60)
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
            tls: false,
            max_request_bytes: d_max_bytes(),
            max_response_bytes: d_max_bytes(),
            query_timeout: d_query_timeout(),
            pool_idle_timeout: d_pool_idle_timeout(),
        }
    }
}

type Body = Full<Bytes>;

/// What the connection under a request is.
pub(crate) struct Link {
    /// HTTPS: a WebSocket session on it counts as TLS for `[tls] require_tls`.
    pub(crate) secure: bool,
    /// The TLS SNI, which names the endpoint before the `Host` header does.
    pub(crate) sni: Option<String>,
}

impl Proxy {
    /// Serves `[http] listen` until `shutdown` resolves. Upgraded WebSockets are sessions like
    /// TCP clients: they count under `max_connections` and the drain of [`Proxy::serve`].
    pub async fn serve_http(
        self: Arc<Self>,
        listener: TcpListener,
        cfg: HttpConfig,
        shutdown: impl Future<Output = ()>,
    ) {
        let pool = Arc::new(pool::Pool::new(cfg.pool_idle_timeout));
        if !cfg.pool_idle_timeout.is_zero() {
            let (weak, every) = (Arc::downgrade(&pool), cfg.pool_idle_timeout / 2);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(pool) = weak.upgrade() else { return };
                    pool.sweep();
                }
            });
        }
        let cfg = Arc::new(cfg);
        // The Postgres listener's certificates and SNI choice, with HTTP's ALPN instead of
        // `postgresql` (browsers and fetch offer `http/1.1`, and rustls refuses a mismatch).
        let https = match (&self.tls, cfg.tls) {
            (Some(acceptor), true) => {
                let mut config = ServerConfig::clone(acceptor.config());
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
            _ => None,
        };
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
            let (this, cfg, https, pool) = (
                Arc::clone(&self),
                Arc::clone(&cfg),
                https.clone(),
                Arc::clone(&pool),
            );
            tokio::spawn(async move {
                let Some(acceptor) = https else {
                    let link = Link {
                        secure: false,
                        sni: None,
                    };
                    return this.serve_conn(cfg, pool, stream, peer, link).await;
                };
                let handshake =
                    tokio::time::timeout(this.cfg.startup_timeout, acceptor.accept(stream));
                match handshake.await {
                    Ok(Ok(tls)) => {
                        let sni = tls.get_ref().1.server_name().map(str::to_string);
                        let link = Link { secure: true, sni };
                        this.serve_conn(cfg, pool, tls, peer, link).await
                    }
                    Ok(Err(e)) => debug!(client = %peer, error = %e, "https handshake failed"),
                    Err(_) => debug!(client = %peer, "https handshake timed out"),
                }
            });
        }
    }

    async fn serve_conn<IO>(
        self: Arc<Self>,
        cfg: Arc<HttpConfig>,
        pool: Arc<pool::Pool>,
        io: IO,
        peer: SocketAddr,
        link: Link,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let link = Arc::new(link);
        let header_timeout = self.cfg.startup_timeout;
        let svc = hyper::service::service_fn(move |req| {
            let (this, cfg, link) = (Arc::clone(&self), Arc::clone(&cfg), Arc::clone(&link));
            let pool = Arc::clone(&pool);
            async move { Ok::<_, Infallible>(this.route_http(&cfg, &pool, &link, req, peer).await) }
        });
        // A client that opens a connection and trickles its headers is dropped after the
        // startup timeout, as a TCP client that never sends its StartupMessage is.
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades()
            .await;
    }

    async fn route_http(
        self: &Arc<Self>,
        cfg: &HttpConfig,
        pool: &pool::Pool,
        link: &Link,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        if ws::is_upgrade(&req) {
            return ws::upgrade(self, link, req, peer);
        }
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/sql") => sql::handle(self, cfg, pool, link, req, peer).await,
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
