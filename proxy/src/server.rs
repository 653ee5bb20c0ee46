//! The accept loops: `Proxy::serve` for clients (with the fd reserve and the drain on
//! shutdown) and the peer cancel listener; each accepted client runs `conn::handle` in a task.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgwake_compute_manager::ErrorSource;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, error, info, warn, Instrument};

use crate::error::ProxyError;
use crate::shared::Proxy;
use crate::stream::ClientStream;
use crate::wire::encode_error_response;
use crate::{cancel, conn, fd};

/// Connections taken from the accept queue per wakeup before the loop looks at shutdown again.
const ACCEPT_BATCH: usize = 128;

impl Proxy {
    /// `[limits]` from a reloaded config: applies to the next connection.
    pub fn set_limits(&self, limits: crate::limits::LimitsConfig) {
        self.limits.set_config(limits);
    }

    /// Accepts connections until `shutdown` resolves, then waits up to `drain_timeout` for live
    /// sessions to end on their own before returning (the caller's runtime then cuts the rest).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        self.health.set_ready(true);
        let mut reserve = fd::FdReserve::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                res = listener.accept() => match res {
                    Ok((stream, peer)) => {
                        self.spawn_connection(stream, peer);
                        self.accept_queued(&listener);
                    }
                    Err(e) if fd::is_exhaustion(&e) => {
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
        let live = |this: &Self| {
            let sessions = total as usize - this.limit.available_permits();
            let starting = this.pending_total as usize - this.pending.available_permits();
            (sessions, starting)
        };
        let (sessions, starting) = live(&self);
        info!(sessions, starting, "stopped accepting; draining sessions");
        // Connections still in their startup first: each either becomes a session (and takes
        // a session place, which the second wait then waits for) or ends.
        let drained = tokio::time::timeout(self.cfg.drain_timeout, async {
            let _starting = self.pending.acquire_many(self.pending_total).await;
            let _sessions = self.limit.acquire_many(total).await;
        })
        .await;
        if drained.is_err() {
            let (sessions, starting) = live(&self);
            warn!(
                left = sessions + starting,
                "drain timeout; closing remaining sessions"
            );
        }
    }

    /// Serves the peer listener (`cancel_listen`) until `shutdown` resolves: CancelRequests
    /// forwarded by other replicas, checked against this replica's sessions only. At most
    /// [`cancel::PEER_CANCELS_AT_ONCE`] at once; more are closed unread (a cancel is best effort).
    pub async fn serve_cancel_peers(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) {
        cancel::serve_peers(Arc::clone(&self.cancels), listener, shutdown).await
    }

    /// Takes the connections already waiting in the kernel's accept queue, up to
    /// [`ACCEPT_BATCH`], without going back through the select: under a burst the queue fills
    /// faster than one accept per wakeup empties it, and a full queue drops SYNs (the client
    /// then waits a second for the retransmission). An error ends the batch: EMFILE recurs at
    /// the main loop's next `accept` (the connection is still queued), and the others concern a
    /// connection that is already gone.
    fn accept_queued(self: &Arc<Self>, listener: &TcpListener) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for _ in 0..ACCEPT_BATCH {
            match listener.poll_accept(&mut cx) {
                std::task::Poll::Ready(Ok((stream, peer))) => self.spawn_connection(stream, peer),
                // Pending: the queue is empty (the select registers the real waker next).
                _ => return,
            }
        }
    }

    /// Out of fds, a client would wait in the listen backlog with no answer until a session
    /// ends. Closing the reserve frees one fd: accept the client with it, tell it 53300 and
    /// close it, then take the fd back for the next time.
    fn refuse_one(self: &Arc<Self>, listener: &TcpListener, reserve: fd::Reserved) {
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
            refuse(&this, &mut stream, ProxyError::TooManyConnections).await;
            drop(stream);
            reserve.refill();
        });
    }

    fn spawn_connection(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        self.spawn_client(ClientStream::Plain(stream), peer);
    }

    /// Runs one client (TCP, or an upgraded WebSocket from [`crate::serverless`]) in a task.
    pub(crate) fn spawn_client(self: &Arc<Self>, mut stream: ClientStream, peer: SocketAddr) {
        self.metrics.accepted.inc();
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let span =
            tracing::info_span!("conn", session, client = %peer, endpoint = tracing::field::Empty);
        let this = Arc::clone(self);
        // Taken here, in accept order, so that the cap is exact under a burst.
        let starting = Arc::clone(&self.pending).try_acquire_owned();
        tokio::spawn(
            async move {
                let Ok(starting) = starting else {
                    refuse(&this, &mut stream, ProxyError::TooManyPendingStartups).await;
                    return;
                };
                this.metrics.active.inc();
                let res = conn::handle(&this, &mut stream, peer, starting).await;
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
async fn refuse(proxy: &Proxy, stream: &mut ClientStream, why: ProxyError) {
    conn::read_first_message_briefly(stream).await;
    proxy.finish(stream, Err(why)).await;
}
