//! The accept loops: `Proxy::serve` for clients (with the fd reserve and the drain on
//! shutdown) and the peer cancel listener; each accepted client runs `conn::handle` in a task,
//! on one of the relay threads (`relay`) unless `[proxy] relay_threads = 0`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgwake_compute_manager::ErrorSource;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, TryAcquireError};
use tracing::{debug, error, info, warn, Instrument, Span};

use crate::error::ProxyError;
use crate::relay::{self, MakeSession, Relays};
use crate::shared::Proxy;
use crate::stream::ClientStream;
use crate::wire::encode_error_response;
use crate::{cancel, conn, fd};

/// Connections taken from the accept queue per wakeup before the loop looks at shutdown again.
const ACCEPT_BATCH: usize = 128;

/// How long a connection's final error may take to reach its client.
const FINISH_TIMEOUT: Duration = Duration::from_secs(1);

/// A client connection on its way from the accept loop to a relay thread. Deregistered from
/// the accept loop's runtime (a std socket) until the relay thread registers it on its own.
pub(crate) struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    starting: Result<OwnedSemaphorePermit, TryAcquireError>,
    span: Span,
}

impl Proxy {
    /// `[limits]` from a reloaded config: applies to the next connection.
    pub fn set_limits(&self, limits: crate::limits::LimitsConfig) {
        self.limits.set_config(limits);
    }

    /// Accepts connections until `shutdown` resolves, then waits up to `drain_timeout` for live
    /// sessions to end on their own before returning. The sessions left then are closed when
    /// the relay threads stop; without relay threads, the caller's runtime cuts them.
    ///
    /// `listener` comes from [`crate::listener::bind_clients`]: the sockets it accepts have
    /// TCP_NODELAY and the client keepalive from it, and no session sets them again.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let relays = self.start_relays();
        self.health.set_ready(true);
        let mut reserve = fd::FdReserve::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                res = listener.accept() => match res {
                    Ok((stream, peer)) => {
                        self.spawn_connection(relays.as_ref(), stream, peer);
                        self.accept_queued(&listener, relays.as_ref());
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
        } else if let Some(relays) = &relays {
            // Places are given back before a session's last error is written to its client.
            let _ = tokio::time::timeout(FINISH_TIMEOUT, relays.idle()).await;
        }
        if let Some(relays) = relays {
            let live = relays.live();
            if live.iter().any(|&n| n > 0) {
                info!(?live, "stopping the relay threads");
            }
            relays.stop().await;
        }
    }

    /// `[proxy] relay_threads` threads for the sessions, or `None` when it is 0 or the threads
    /// cannot be started (then sessions run on this runtime, which works, only slower).
    fn start_relays(self: &Arc<Self>) -> Option<Relays<Accepted>> {
        let n = self
            .cfg
            .relay_threads
            .unwrap_or_else(relay::default_threads);
        if n == 0 {
            return None;
        }
        let this = Arc::clone(self);
        let make: MakeSession<Accepted> =
            Arc::new(move |index, job| Box::pin(Arc::clone(&this).run_relayed(index, job)));
        match Relays::start(n, make) {
            Ok(relays) => {
                info!(threads = n, "relay threads started");
                Some(relays)
            }
            Err(e) => {
                error!(error = %e, "could not start the relay threads; sessions run on the main runtime");
                None
            }
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
    fn accept_queued(self: &Arc<Self>, listener: &TcpListener, relays: Option<&Relays<Accepted>>) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for _ in 0..ACCEPT_BATCH {
            match listener.poll_accept(&mut cx) {
                std::task::Poll::Ready(Ok((stream, peer))) => {
                    self.spawn_connection(relays, stream, peer)
                }
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

    /// Hands a TCP client to the least busy relay thread (or, without them, to a task here).
    fn spawn_connection(
        self: &Arc<Self>,
        relays: Option<&Relays<Accepted>>,
        stream: TcpStream,
        peer: SocketAddr,
    ) {
        let Some(relays) = relays else {
            return self.spawn_client(ClientStream::Plain(stream), peer);
        };
        let (span, starting) = self.admit_connection(peer);
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(parent: &span, error = %e, "could not hand the connection to a relay thread");
                return;
            }
        };
        let job = Accepted {
            stream,
            peer,
            starting,
            span,
        };
        if let Err(job) = relays.dispatch(job) {
            let Accepted {
                stream,
                peer,
                starting,
                span,
            } = job;
            // Every relay thread is gone (each logged its panic) or stuck: serve the client
            // here rather than not at all.
            error!(parent: &span, "no relay thread takes connections; serving this one on the main runtime");
            let session = Arc::clone(self).registered_session(stream, peer, starting);
            tokio::spawn(session.instrument(span));
        }
    }

    /// Runs one client (TCP, or an upgraded WebSocket from [`crate::serverless`]) in a task on
    /// the current runtime.
    pub(crate) fn spawn_client(self: &Arc<Self>, stream: ClientStream, peer: SocketAddr) {
        let (span, starting) = self.admit_connection(peer);
        tokio::spawn(
            Arc::clone(self)
                .session(stream, peer, starting)
                .instrument(span),
        );
    }

    /// Counts an accepted client and takes its place under `max_pending_startups`: here, in
    /// accept order, so that the cap is exact under a burst.
    fn admit_connection(
        &self,
        peer: SocketAddr,
    ) -> (Span, Result<OwnedSemaphorePermit, TryAcquireError>) {
        self.metrics.accepted.inc();
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "conn",
            session,
            client = %peer,
            relay = tracing::field::Empty,
            endpoint = tracing::field::Empty
        );
        (span, Arc::clone(&self.pending).try_acquire_owned())
    }

    /// A handed-over connection on relay thread `index`, registered with that thread's runtime.
    async fn run_relayed(self: Arc<Self>, index: usize, job: Accepted) {
        let Accepted {
            stream,
            peer,
            starting,
            span,
        } = job;
        span.record("relay", index);
        self.metrics
            .relay_sessions
            .with_label_values(&[&index.to_string()])
            .inc();
        self.registered_session(stream, peer, starting)
            .instrument(span)
            .await
    }

    /// The session of a connection handed over from the accept loop, once it is registered
    /// with the runtime it runs on (a relay thread's, or the main one if none takes it).
    async fn registered_session(
        self: Arc<Self>,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        starting: Result<OwnedSemaphorePermit, TryAcquireError>,
    ) {
        match TcpStream::from_std(stream) {
            Ok(s) => self.session(ClientStream::Plain(s), peer, starting).await,
            Err(e) => warn!(error = %e, "could not register the connection with its runtime"),
        }
    }

    async fn session(
        self: Arc<Self>,
        mut stream: ClientStream,
        peer: SocketAddr,
        starting: Result<OwnedSemaphorePermit, TryAcquireError>,
    ) {
        let Ok(starting) = starting else {
            refuse(&self, &mut stream, ProxyError::TooManyPendingStartups).await;
            return;
        };
        self.metrics.active.inc();
        let res = conn::handle(&self, &mut stream, peer, starting).await;
        self.finish(&mut stream, res.map(|_| ())).await;
        self.metrics.active.dec();
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
            let _ = tokio::time::timeout(FINISH_TIMEOUT, async {
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
