use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgwake_compute_manager::{ComputeWaker, ErrorSource};
use pgwake_router::RoutingTable;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn, Instrument};

use crate::admin::Health;
use crate::cancel::CancelMap;
use crate::error::ProxyError;
use crate::limits::{Limits, LimitsConfig};
use crate::stream::ClientStream;
use crate::tls::{TlsAcceptor, TlsConfig};
use crate::wire::encode_error_response;
use crate::{conn, ProxyConfig, ProxyMetrics};

/// Peer cancel connections handled at once on `cancel_listen`.
pub const PEER_CANCELS_AT_ONCE: usize = 256;

/// Everything a connection needs, shared by all of them.
pub struct Proxy {
    pub(crate) cfg: ProxyConfig,
    pub(crate) table: Arc<RoutingTable>,
    pub(crate) manager: Arc<dyn ComputeWaker>,
    pub(crate) metrics: ProxyMetrics,
    pub(crate) limits: Limits,
    pub(crate) cancels: Arc<CancelMap>,
    pub(crate) health: Arc<Health>,
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) tls_cfg: TlsConfig,
    pub(crate) compute_tls: Option<tokio_rustls::TlsConnector>,
    sessions: AtomicU64,
    limit: Arc<Semaphore>,
}

/// What a [`Proxy`] is built from; the binary assembles it from the config file.
pub struct ProxyParts {
    pub cfg: ProxyConfig,
    pub table: Arc<RoutingTable>,
    /// The in-process manager, or a client of a remote one (`[compute] manager_url`).
    pub manager: Arc<dyn ComputeWaker>,
    pub metrics: ProxyMetrics,
    pub limits: LimitsConfig,
    pub health: Arc<Health>,
    pub tls_cfg: TlsConfig,
    /// `None` when no certificates are configured: SSLRequest is answered 'N'.
    pub tls: Option<TlsAcceptor>,
    /// `Some` when `[tls] compute_tls` is on.
    pub compute_tls: Option<Arc<rustls::ClientConfig>>,
}

impl Proxy {
    pub fn new(p: ProxyParts) -> Arc<Self> {
        let limit = Arc::new(Semaphore::new(p.cfg.max_connections));
        Arc::new(Self {
            cfg: p.cfg,
            table: p.table,
            manager: p.manager,
            metrics: p.metrics,
            limits: Limits::new(p.limits),
            cancels: CancelMap::new(),
            health: p.health,
            tls: p.tls,
            tls_cfg: p.tls_cfg,
            compute_tls: p.compute_tls.map(tokio_rustls::TlsConnector::from),
            sessions: AtomicU64::new(0),
            limit,
        })
    }

    /// Accepts connections until `shutdown` resolves, then waits up to `drain_timeout` for live
    /// sessions to end on their own before returning (the caller's runtime then cuts the rest).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        self.health.set_ready(true);
        let mut reserve = FdReserve::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                res = listener.accept() => match res {
                    Ok((stream, peer)) => self.spawn_connection(stream, peer),
                    Err(e) if is_fd_exhaustion(&e) => {
                        match reserve.take() {
                            Some(reserve) => self.refuse_one(&listener, reserve),
                            // Still refusing the last one: back off instead of spinning.
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err(e) => {
                        // ECONNABORTED and friends: the listener stays.
                        error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
        // Not ready from the first moment of the drain, so a load balancer stops sending.
        self.health.set_ready(false);
        drop(listener);
        let total = self.cfg.max_connections as u32;
        let live = total as usize - self.limit.available_permits();
        info!(live, "stopped accepting; draining sessions");
        if tokio::time::timeout(self.cfg.drain_timeout, self.limit.acquire_many(total))
            .await
            .is_err()
        {
            warn!(
                left = total as usize - self.limit.available_permits(),
                "drain timeout; closing remaining sessions"
            );
        }
    }

    /// Serves the peer listener (`cancel_listen`) until `shutdown` resolves: CancelRequests
    /// forwarded by other replicas, checked against this replica's sessions only. At most
    /// [`PEER_CANCELS_AT_ONCE`] at once; more are closed unread (a cancel is best effort).
    pub async fn serve_cancel_peers(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let limit = Arc::new(Semaphore::new(PEER_CANCELS_AT_ONCE));
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                res = listener.accept() => match res {
                    Ok((stream, peer)) => {
                        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                            debug!(%peer, "too many peer cancels at once; closed");
                            continue;
                        };
                        let this = Arc::clone(&self);
                        let span = tracing::debug_span!("peer_cancel", peer = %peer, endpoint = tracing::field::Empty);
                        tokio::spawn(
                            async move {
                                conn::peer_cancel(&this, stream, peer).await;
                                drop(permit);
                            }
                            .instrument(span),
                        );
                    }
                    Err(e) => {
                        error!(error = %e, "cancel listener accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
    }

    /// Out of fds, a client would wait in the listen backlog with no answer until a session
    /// ends. Closing the reserve frees one fd: accept the client with it, tell it 53300 and
    /// close it, then take the fd back for the next time.
    fn refuse_one(self: &Arc<Self>, listener: &TcpListener, reserve: Reserved) {
        reserve.release();
        // The EMFILE came from a pending connection, so this accept is ready at once; if the
        // client gave up meanwhile there is nothing to refuse.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let std::task::Poll::Ready(Ok((stream, peer))) = listener.poll_accept(&mut cx) else {
            reserve.refill();
            return;
        };
        self.metrics.accepted.inc();
        warn!(client = %peer, "out of file descriptors; refusing a connection (raise the fd limit or lower max_connections)");
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut stream = ClientStream::Plain(stream);
            refuse(&this, &mut stream).await;
            drop(stream);
            reserve.refill();
        });
    }

    fn spawn_connection(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        self.metrics.accepted.inc();
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let span =
            tracing::info_span!("conn", session, client = %peer, endpoint = tracing::field::Empty);
        let this = Arc::clone(self);
        let permit = Arc::clone(&self.limit).try_acquire_owned();
        tokio::spawn(
            async move {
                let mut stream = ClientStream::Plain(stream);
                let Ok(_permit) = permit else {
                    refuse(&this, &mut stream).await;
                    return;
                };
                this.metrics.active.inc();
                let res = conn::handle(&this, &mut stream, peer).await;
                this.finish(&mut stream, res.map(|_| ())).await;
                this.metrics.active.dec();
            }
            .instrument(span),
        );
    }

    async fn finish(&self, stream: &mut ClientStream, res: Result<(), ProxyError>) {
        let err = match res {
            Ok(()) => {
                self.metrics.closed.with_label_values(&["ok"]).inc();
                return;
            }
            Err(e) => e,
        };
        let side = match err.source_side() {
            ErrorSource::Client => "client",
            ErrorSource::Compute => "compute",
            ErrorSource::Internal => "internal",
        };
        self.metrics.closed.with_label_values(&["error"]).inc();
        self.metrics
            .errors
            .with_label_values(&[err.kind(), side])
            .inc();
        match err.source_side() {
            // Load balancers' TCP health checks connect and close without a byte: not news.
            ErrorSource::Client if matches!(err, ProxyError::ClientGone) => {
                debug!(kind = err.kind(), "client closed before startup")
            }
            ErrorSource::Client => info!(error = %err, kind = err.kind(), "connection refused"),
            _ => {
                warn!(error = %err, kind = err.kind(), retryable = err.retryable(), "connection failed")
            }
        }
        if let Some(resp) = err.client_response() {
            let mut buf = BytesMut::new();
            encode_error_response(
                &mut buf,
                "FATAL",
                resp.sqlstate,
                &resp.message,
                None,
                resp.hint.as_deref(),
            );
            // Best effort: the client may already be gone, and must not hold us up.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                stream.write_all(&buf).await?;
                stream.shutdown().await
            })
            .await;
        }
    }
}

/// Answers a client the proxy has no room for with 53300, as Postgres answers "too many
/// clients": after reading its first message (an SSLRequest, which the error then answers
/// instead of 'S'/'N', or the StartupMessage), so that closing with that message unread does
/// not turn the close into a reset that can destroy the error before the client reads it.
async fn refuse(proxy: &Proxy, stream: &mut ClientStream) {
    let mut first = [0u8; 1024];
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::io::AsyncReadExt::read(stream, &mut first),
    )
    .await;
    proxy
        .finish(stream, Err(ProxyError::TooManyConnections))
        .await;
}

/// Whether an I/O error means this process (EMFILE) or the system (ENFILE) has no fd left.
pub(crate) fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// One fd held back so that a client can still be told "no" when the process runs out (the
/// accept-EMFILE trick of libev and Node): the fd is freed for one refusal and taken back once
/// that client's socket is closed. Refusals overlap only if an fd frees up in between.
struct FdReserve {
    slot: Arc<std::sync::Mutex<Option<std::fs::File>>>,
}

/// The reserve, handed to one refusal.
struct Reserved {
    slot: Arc<std::sync::Mutex<Option<std::fs::File>>>,
}

impl FdReserve {
    fn new() -> Self {
        Self {
            slot: Arc::new(std::sync::Mutex::new(open_reserve())),
        }
    }

    /// The reserve for one refusal, if an fd is held: the one kept open, or, while another
    /// refusal has it (or it could not be reopened after one), a new one opened here.
    fn take(&mut self) -> Option<Reserved> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = open_reserve();
        }
        slot.is_some().then(|| Reserved {
            slot: Arc::clone(&self.slot),
        })
    }
}

impl Reserved {
    /// Closes the reserve fd, so that the next accept can have its number.
    fn release(&self) {
        drop(self.slot.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Takes an fd back once the refused client's socket is closed; if another connection got
    /// there first, `FdReserve::take` tries again at the next EMFILE.
    fn refill(self) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = open_reserve();
    }
}

fn open_reserve() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}
