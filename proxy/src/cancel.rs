//! Query cancellation through the proxy.
//!
//! The compute's `BackendKeyData` never reaches the client: the proxy hands out its own
//! (pid, secret) pair from a CSPRNG and keeps the real one, with the compute's address, for the
//! life of the session. A `CancelRequest` is forwarded only when both halves of a proxy-issued
//! key match, so a guessed or stale key reaches nobody, and a tenant can never aim a cancel
//! at another tenant's compute: the proxy, not the client, picks the address.
//!
//! Several proxy replicas: a cancel arrives on a fresh TCP connection, which a load balancer
//! may send to any replica, and only the replica that holds the session has its key. A replica
//! that gets a cancel whose key is not in its own map forwards the request, as is, to every
//! address of `[proxy] cancel_peers` (each name resolved at forward time, so a Kubernetes
//! headless Service yields every proxy pod), concurrently, each bounded by a short timeout and
//! the fan-out by [`MAX_PEER_ADDRS`]. Peers receive it on their `cancel_listen` listener, which
//! accepts nothing but a CancelRequest and checks it against the local map only: it never
//! forwards again, so there are no loops. The owner checks both halves of the key exactly as
//! for a direct cancel, so a forged key still has to match a 32-bit secret on the owner and
//! reaches nobody otherwise. No shared store is needed; the cost is one small connection per
//! replica for a cancel that lands on the wrong one.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use dashmap::DashMap;
use pgwake_compute_manager::ComputeAddr;
use pgwake_router::EndpointId;
use prometheus::IntCounterVec;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn, Instrument};

use crate::wire::{
    parse_startup_body, StartupPacket, CANCEL_REQUEST_CODE, MAX_CANCEL_SECRET_LEN,
    MIN_CANCEL_SECRET_LEN,
};

/// At most this many peer addresses receive one forwarded cancel.
pub const MAX_PEER_ADDRS: usize = 64;

/// Peer cancel connections handled at once on `cancel_listen`.
pub const PEER_CANCELS_AT_ONCE: usize = 256;

/// Sending a cancel to the compute: connect, send, and wait for its close.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);
/// Each step of a cancel between replicas: resolve, connect and send, or read the request.
const PEER_CANCEL_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything a CancelRequest needs, shared by the client listener and the peer listener: the
/// key map, where keys not issued here go, and the outcome counter.
pub(crate) struct Cancels {
    map: Arc<CancelMap>,
    peers: Vec<String>,
    /// `pgwake_cancel_requests_total` by outcome.
    outcomes: IntCounterVec,
}

impl Cancels {
    pub(crate) fn new(peers: Vec<String>, outcomes: IntCounterVec) -> Self {
        Self {
            map: CancelMap::new(),
            peers,
            outcomes,
        }
    }

    /// The map sessions register their keys in.
    pub(crate) fn map(&self) -> &Arc<CancelMap> {
        &self.map
    }

    /// A CancelRequest from a client: forwarded to the compute that issued the key; a key not
    /// handed out here goes to the peers (`cancel_peers`) when there are any, else is dropped
    /// without a word (as Postgres does).
    pub(crate) async fn handle_client_request(&self, pid: i32, secret: &[u8]) {
        match self.map.lookup(pid, secret) {
            Some(target) => self.forward_local(target).await,
            None if !self.peers.is_empty() => {
                // Not ours: another replica may hold the session; each checks the key itself.
                let delivered =
                    forward_to_peers(&self.peers, pid, secret, PEER_CANCEL_TIMEOUT).await;
                self.outcomes.with_label_values(&["sent_to_peers"]).inc();
                debug!(
                    delivered,
                    "cancel request with a key not issued here sent to peers"
                );
            }
            None => self.unknown_key(),
        }
    }

    /// A CancelRequest from another replica (`cancel_listen`): checked against this replica's
    /// sessions only, never forwarded to peers again.
    async fn handle_peer_request(&self, mut s: TcpStream, peer: SocketAddr) {
        match read_peer_request(&mut s, PEER_CANCEL_TIMEOUT).await {
            Ok((pid, secret)) => match self.map.lookup(pid, &secret) {
                Some(target) => self.forward_local(target).await,
                None => self.unknown_key(),
            },
            Err(e) => {
                self.outcomes.with_label_values(&["peer_refused"]).inc();
                debug!(%peer, error = %e, "cancel listener closed a connection that sent no CancelRequest");
            }
        }
    }

    fn unknown_key(&self) {
        self.outcomes.with_label_values(&["unknown_key"]).inc();
        debug!("cancel request with an unknown key dropped");
    }

    /// Forwards to the compute of a session of this replica whose key matched both halves.
    async fn forward_local(&self, target: CancelTarget) {
        tracing::Span::current().record("endpoint", target.endpoint.as_str());
        match forward(&target, CANCEL_TIMEOUT).await {
            Ok(()) => {
                self.outcomes.with_label_values(&["forwarded"]).inc();
                info!("cancel request forwarded");
            }
            Err(e) => {
                self.outcomes.with_label_values(&["failed"]).inc();
                warn!(error = %e, "cancel request could not be forwarded");
            }
        }
    }
}

/// Serves the peer listener (`cancel_listen`) until `shutdown` resolves: CancelRequests
/// forwarded by other replicas, checked against this replica's sessions only. At most
/// [`PEER_CANCELS_AT_ONCE`] at once; more are closed unread (a cancel is best effort).
pub(crate) async fn serve_peers(
    cancels: Arc<Cancels>,
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
                    let cancels = Arc::clone(&cancels);
                    let span = tracing::debug_span!("peer_cancel", peer = %peer, endpoint = tracing::field::Empty);
                    tokio::spawn(
                        async move {
                            cancels.handle_peer_request(stream, peer).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
                // Out of fds: the main listener's reserve answers clients and logs it; here the
                // backlog waits for a session to end, and an ERROR every 10 ms would flood the log.
                Err(e) if crate::fd::is_exhaustion(&e) => {
                    debug!(error = %e, "cancel listener out of file descriptors; retrying");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    error!(error = %e, "cancel listener accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// Where the cancel must go, and the compute's real key.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub endpoint: EndpointId,
    pub addr: ComputeAddr,
    pub pid: i32,
    pub secret: Vec<u8>,
}

struct Entry {
    secret: Vec<u8>,
    target: CancelTarget,
}

/// Proxy-issued pid → the session's real key.
#[derive(Default)]
pub struct CancelMap {
    sessions: DashMap<i32, Entry>,
}

/// Removes the session's key when the session ends.
pub struct CancelGuard {
    map: Arc<CancelMap>,
    pid: i32,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.map.sessions.remove(&self.pid);
    }
}

impl CancelMap {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Issues a fresh (pid, secret) for `target`; the secret has the same length as the
    /// compute's (4 bytes in protocol 3.0, longer in 3.2), so the client sees a normal key.
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> (i32, Vec<u8>, CancelGuard) {
        // ThreadRng is a CSPRNG (ChaCha, reseeded from the OS), so keys stay unguessable
        // without the two getrandom(2) calls per session that OsRng made.
        let mut rng = rand::thread_rng();
        let mut secret = vec![0u8; target.secret.len().max(4)];
        rng.fill_bytes(&mut secret);
        loop {
            // Positive and non-zero: some clients treat pid <= 0 as "no key".
            let pid = (rng.next_u32() & 0x7fff_ffff) as i32;
            if pid == 0 {
                continue;
            }
            if let dashmap::Entry::Vacant(v) = self.sessions.entry(pid) {
                v.insert(Entry {
                    secret: secret.clone(),
                    target,
                });
                let guard = CancelGuard {
                    map: Arc::clone(self),
                    pid,
                };
                return (pid, secret, guard);
            }
        }
    }

    /// The target for a proxy-issued key, if both halves match.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<CancelTarget> {
        let e = self.sessions.get(&pid)?;
        constant_time_eq(&e.secret, secret).then(|| e.target.clone())
    }
}

/// Compares without an early exit, so response timing says nothing about how much of a
/// guessed secret was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Appends a CancelRequest for (pid, secret).
fn encode_cancel(dst: &mut BytesMut, pid: i32, secret: &[u8]) {
    dst.put_u32((12 + secret.len()) as u32);
    dst.put_u32(CANCEL_REQUEST_CODE);
    dst.put_i32(pid);
    dst.put_slice(secret);
}

/// Why the peer listener closed a connection without looking anything up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerRequestError {
    #[error("length {0} does not fit a CancelRequest")]
    Length(u32),
    #[error("request code {0} is not a CancelRequest")]
    Code(u32),
}

/// Checks the first 8 bytes (length, code) a peer sent, before reading any more; returns how
/// many bytes follow (pid and secret). Anything but a CancelRequest is refused here, so the
/// peer listener never allocates from a length it has not bounded.
pub fn peer_request_header(head: [u8; 8]) -> Result<usize, PeerRequestError> {
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let min = 12 + MIN_CANCEL_SECRET_LEN as u32;
    let max = 12 + MAX_CANCEL_SECRET_LEN as u32;
    if !(min..=max).contains(&len) {
        return Err(PeerRequestError::Length(len));
    }
    if code != CANCEL_REQUEST_CODE {
        return Err(PeerRequestError::Code(code));
    }
    Ok(len as usize - 8)
}

/// Parses a peer's whole CancelRequest (length field included) into (pid, secret).
pub fn parse_peer_request(packet: &[u8]) -> Result<(i32, Vec<u8>), PeerRequestError> {
    let head: [u8; 8] = packet
        .get(..8)
        .and_then(|h| h.try_into().ok())
        .ok_or(PeerRequestError::Length(packet.len() as u32))?;
    let rest = peer_request_header(head)?;
    if packet.len() != 8 + rest {
        return Err(PeerRequestError::Length(packet.len() as u32));
    }
    match parse_startup_body(&packet[4..]) {
        Ok(StartupPacket::CancelRequest { pid, secret }) => Ok((pid, secret)),
        // The header check above admits only well-formed CancelRequests.
        _ => Err(PeerRequestError::Length(packet.len() as u32)),
    }
}

/// Reads one CancelRequest from a peer connection, bounded by `timeout`.
pub async fn read_peer_request(
    s: &mut TcpStream,
    timeout: Duration,
) -> std::io::Result<(i32, Vec<u8>)> {
    let invalid = |e: PeerRequestError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    tokio::time::timeout(timeout, async {
        let mut head = [0u8; 8];
        s.read_exact(&mut head).await?;
        let rest = peer_request_header(head).map_err(invalid)?;
        let mut packet = head.to_vec();
        packet.resize(8 + rest, 0);
        s.read_exact(&mut packet[8..]).await?;
        parse_peer_request(&packet).map_err(invalid)
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Sends a CancelRequest whose key is not ours to every address of `peers` (each resolved now),
/// concurrently, each bounded by `timeout`, at most [`MAX_PEER_ADDRS`] in all. Returns how many
/// addresses took it; the peers answer nothing, as Postgres does not.
pub async fn forward_to_peers(
    peers: &[String],
    pid: i32,
    secret: &[u8],
    timeout: Duration,
) -> usize {
    let mut addrs = Vec::new();
    for peer in peers {
        match tokio::time::timeout(timeout, tokio::net::lookup_host(peer.as_str())).await {
            Ok(Ok(resolved)) => {
                for a in resolved {
                    if addrs.len() < MAX_PEER_ADDRS && !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
            }
            Ok(Err(e)) => debug!(%peer, error = %e, "cancel peer did not resolve"),
            Err(_) => debug!(%peer, "cancel peer lookup timed out"),
        }
    }
    let mut msg = BytesMut::with_capacity(12 + secret.len());
    encode_cancel(&mut msg, pid, secret);
    let msg = msg.freeze();
    let mut sends = tokio::task::JoinSet::new();
    for addr in addrs {
        let msg = msg.clone();
        sends.spawn(async move {
            let res = tokio::time::timeout(timeout, async {
                let mut s = TcpStream::connect(addr).await?;
                s.write_all(&msg).await?;
                // The peer closes once it has checked the key (and, if the session is
                // its own, passed the cancel to the compute).
                let mut sink = [0u8; 16];
                while s.read(&mut sink).await? > 0 {}
                std::io::Result::Ok(())
            })
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            if let Err(e) = &res {
                debug!(%addr, error = %e, "cancel not delivered to peer");
            }
            res.is_ok()
        });
    }
    let mut delivered = 0;
    while let Some(r) = sends.join_next().await {
        delivered += usize::from(matches!(r, Ok(true)));
    }
    delivered
}

/// Sends the real CancelRequest to the compute and waits for it to close the connection
/// (which is all Postgres ever answers), bounded by `timeout`.
pub async fn forward(target: &CancelTarget, timeout: Duration) -> std::io::Result<()> {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(target.addr.as_str()).await?;
        let mut msg = BytesMut::with_capacity(12 + target.secret.len());
        encode_cancel(&mut msg, target.pid, &target.secret);
        s.write_all(&msg).await?;
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        Ok(())
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(secret: &[u8]) -> CancelTarget {
        CancelTarget {
            endpoint: EndpointId::parse("ep").unwrap(),
            addr: ComputeAddr::new("127.0.0.1:1"),
            pid: 42,
            secret: secret.to_vec(),
        }
    }

    #[test]
    fn issued_keys_map_back_and_are_removed_with_the_session() {
        let m = CancelMap::new();
        let (pid, secret, guard) = m.register(target(&[1, 2, 3, 4]));
        assert!(pid > 0);
        assert_eq!(secret.len(), 4);
        let t = m.lookup(pid, &secret).unwrap();
        assert_eq!((t.pid, t.secret.as_slice()), (42, &[1u8, 2, 3, 4][..]));
        // Wrong secret, wrong length, wrong pid: nothing.
        let mut wrong = secret.clone();
        wrong[3] ^= 1;
        assert!(m.lookup(pid, &wrong).is_none());
        assert!(m.lookup(pid, &secret[..3]).is_none());
        assert!(m.lookup(pid.wrapping_add(1), &secret).is_none());
        drop(guard);
        assert!(m.lookup(pid, &secret).is_none());
        assert!(m.is_empty());
    }

    #[test]
    fn keys_are_unique_and_not_the_computes() {
        let m = CancelMap::new();
        let guards: Vec<_> = (0..10_000).map(|_| m.register(target(&[9; 32]))).collect();
        assert_eq!(m.len(), 10_000);
        assert!(guards
            .iter()
            .all(|(_, s, _)| s.len() == 32 && s != &vec![9u8; 32]));
    }

    #[tokio::test]
    async fn forward_sends_the_real_key() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut t = target(&[5, 6, 7, 8]);
        t.addr = ComputeAddr::new(l.local_addr().unwrap().to_string());
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 16];
            s.read_exact(&mut buf).await.unwrap();
            buf
        });
        forward(&t, Duration::from_secs(5)).await.unwrap();
        let got = server.await.unwrap();
        assert_eq!(
            got,
            [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 42, 5, 6, 7, 8]
        );
    }

    fn cancel_bytes(pid: i32, secret: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_cancel(&mut b, pid, secret);
        b.to_vec()
    }

    #[test]
    fn peer_requests_are_cancel_requests_only() {
        let ok = cancel_bytes(7, &[1, 2, 3, 4]);
        assert_eq!(ok.len(), 16);
        assert_eq!(parse_peer_request(&ok), Ok((7, vec![1, 2, 3, 4])));
        // Protocol 3.2's longer secrets pass too.
        assert_eq!(
            parse_peer_request(&cancel_bytes(7, &[9; 32])),
            Ok((7, vec![9; 32]))
        );

        // Wrong length field: too short, too long, absurd.
        for len in [0u32, 8, 15, 12 + 257, u32::MAX] {
            let mut b = ok.clone();
            b[..4].copy_from_slice(&len.to_be_bytes());
            assert_eq!(
                peer_request_header(b[..8].try_into().unwrap()),
                Err(PeerRequestError::Length(len))
            );
            assert!(parse_peer_request(&b).is_err());
        }
        // Length field and packet disagree.
        assert!(parse_peer_request(&ok[..15]).is_err());
        assert!(parse_peer_request(&[ok.as_slice(), &[0]].concat()).is_err());
        assert!(parse_peer_request(&ok[..7]).is_err());

        // Right length, other codes: SSLRequest, GSSENCRequest, protocol 3.0 startup.
        for code in [80877103u32, 80877104, 196608] {
            let mut b = ok.clone();
            b[4..8].copy_from_slice(&code.to_be_bytes());
            assert_eq!(parse_peer_request(&b), Err(PeerRequestError::Code(code)));
        }
    }

    #[tokio::test]
    async fn read_peer_request_refuses_garbage_and_slow_peers() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let send = |bytes: Vec<u8>| async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&bytes).await.unwrap();
            c
        };
        let _c = send(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await;
        let (mut s, _) = l.accept().await.unwrap();
        let e = read_peer_request(&mut s, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);

        let _c = send(cancel_bytes(-3, &[4, 3, 2, 1])).await;
        let (mut s, _) = l.accept().await.unwrap();
        let got = read_peer_request(&mut s, Duration::from_secs(5)).await;
        assert_eq!(got.unwrap(), (-3, vec![4, 3, 2, 1]));

        // Half a request, then silence: the timeout ends it (virtual clock, no waiting).
        let _c = send(cancel_bytes(1, &[0; 4])[..10].to_vec()).await;
        let (mut s, _) = l.accept().await.unwrap();
        tokio::time::pause();
        let e = read_peer_request(&mut s, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn forward_to_peers_reaches_every_resolved_address() {
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A closed port: counted as not delivered, does not hold up the others.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let peers = vec![
            a.local_addr().unwrap().to_string(),
            b.local_addr().unwrap().to_string(),
            a.local_addr().unwrap().to_string(),
            closed_addr.to_string(),
            "no-such-host.invalid:5433".to_string(),
        ];
        let serve = |l: tokio::net::TcpListener| {
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                read_peer_request(&mut s, Duration::from_secs(5))
                    .await
                    .unwrap()
            })
        };
        let (ta, tb) = (serve(a), serve(b));
        let n = forward_to_peers(&peers, 99, &[1, 1, 2, 3], Duration::from_secs(2)).await;
        assert_eq!(n, 2, "each distinct reachable address once");
        assert_eq!(ta.await.unwrap(), (99, vec![1, 1, 2, 3]));
        assert_eq!(tb.await.unwrap(), (99, vec![1, 1, 2, 3]));
    }

    #[tokio::test]
    async fn forward_to_peers_is_bounded() {
        let mut peers = Vec::new();
        let mut accepts = Vec::new();
        for _ in 0..MAX_PEER_ADDRS + 6 {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            peers.push(l.local_addr().unwrap().to_string());
            // Takes the request and closes, as a peer with no such session does.
            accepts.push(tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                read_peer_request(&mut s, Duration::from_secs(5))
                    .await
                    .unwrap();
            }));
        }
        let n = forward_to_peers(&peers, 5, &[0; 4], Duration::from_secs(5)).await;
        assert_eq!(n, MAX_PEER_ADDRS);
        let reached = accepts.iter().filter(|t| t.is_finished()).count();
        for t in accepts {
            t.abort();
        }
        assert!(reached <= MAX_PEER_ADDRS, "{reached}");
    }
}
