//! Query cancellation through the proxy.
//!
//! The compute's `BackendKeyData` never reaches the client: the proxy hands out its own
//! (pid, secret) pair from a CSPRNG and keeps the real one, with the compute's address, for the
//! life of the session. A `CancelRequest` is forwarded only when both halves of a proxy-issued
//! key match, so a guessed or stale key reaches nobody, and a tenant can never aim a cancel
//! at another tenant's compute: the proxy, not the client, picks the address.
//!
//! Several proxy replicas: a cancel arrives on a fresh TCP connection, which a load balancer
//! may send to any replica. The design for that (not implemented: one replica per address
//! is all this version runs) is to make the issued pid carry the issuing replica: the top 8
//! bits of the (positive) pid are a replica index known to all replicas (e.g. the StatefulSet
//! ordinal), the rest random. A replica that gets a cancel for a pid that is not its own
//! forwards the 16 bytes as is, over a connection to that replica's address (resolved from a
//! headless Service), where the key is checked as below. No shared store and no broadcast are
//! needed, and a forged key still has to match a 32-bit secret on the owner replica.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use dashmap::DashMap;
use pgwake_compute_manager::ComputeAddr;
use pgwake_router::EndpointId;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire::CANCEL_REQUEST_CODE;

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
        let mut rng = rand::rngs::OsRng;
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

/// Sends the real CancelRequest to the compute and waits for it to close the connection
/// (which is all Postgres ever answers), bounded by `timeout`.
pub async fn forward(target: &CancelTarget, timeout: Duration) -> std::io::Result<()> {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(target.addr.as_str()).await?;
        let mut msg = BytesMut::with_capacity(12 + target.secret.len());
        msg.put_u32((12 + target.secret.len()) as u32);
        msg.put_u32(CANCEL_REQUEST_CODE);
        msg.put_i32(target.pid);
        msg.put_slice(&target.secret);
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
}
