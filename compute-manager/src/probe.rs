//! The readiness probe: the one place the manager speaks the Postgres protocol, and only enough
//! of it to tell "starting up" (57P03) from "accepting connections".

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    /// Past the start-up gate: authentication (or a non-57P03 error) was offered.
    Ready,
    /// The server answered 57P03: still starting, recovering, or shutting down.
    StartingUp,
    /// Nothing listens yet.
    Refused,
    /// Something answered that is not a Postgres server in a state we understand.
    Unexpected(String),
}

const MAX_FIRST_MESSAGE: u32 = 8192;

/// One probe attempt; bounded by `timeout` so a wedged listener cannot hold a wake forever.
pub async fn probe_ready(addr: SocketAddr, user: &str, timeout: Duration) -> ProbeResult {
    bounded(timeout, probe_once(addr, user)).await
}

async fn bounded(
    timeout: Duration,
    probe: impl std::future::Future<Output = ProbeResult>,
) -> ProbeResult {
    tokio::time::timeout(timeout, probe)
        .await
        .unwrap_or_else(|_| ProbeResult::Unexpected("probe timed out".into()))
}

/// The probe's connection, or what its failure says.
async fn connect(addr: SocketAddr) -> Result<TcpStream, ProbeResult> {
    match TcpStream::connect(addr).await {
        Ok(s) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(ProbeResult::Refused),
        Err(e) => Err(ProbeResult::Unexpected(format!("connect: {e}"))),
    }
}

/// What a failed read of the server's first answer says: a postmaster that accepted but
/// closed (it died, or refuses during shutdown) is not up; anything else is unexpected.
fn read_failure(e: std::io::Error) -> ProbeResult {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            ProbeResult::StartingUp
        }
        _ => ProbeResult::Unexpected(format!("read: {e}")),
    }
}

async fn probe_once(addr: SocketAddr, user: &str) -> ProbeResult {
    let mut s = match connect(addr).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut msg = BytesMut::with_capacity(64);
    msg.put_u32(0); // length, patched below
    msg.put_u32(196608); // protocol 3.0
    for (k, v) in [("user", user), ("database", "postgres")] {
        msg.put_slice(k.as_bytes());
        msg.put_u8(0);
        msg.put_slice(v.as_bytes());
        msg.put_u8(0);
    }
    msg.put_u8(0);
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_be_bytes());
    if let Err(e) = s.write_all(&msg).await {
        return ProbeResult::Unexpected(format!("write: {e}"));
    }

    let mut head = [0u8; 5];
    if let Err(e) = s.read_exact(&mut head).await {
        return read_failure(e);
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    match head[0] {
        b'R' | b'v' => {
            // Terminate, so the server logs a clean disconnect rather than an EOF.
            let _ = s.write_all(&[b'X', 0, 0, 0, 4]).await;
            ProbeResult::Ready
        }
        b'E' => {
            if !(4..=MAX_FIRST_MESSAGE).contains(&len) {
                return ProbeResult::Unexpected(format!("error message length {len}"));
            }
            let mut body = vec![0u8; (len - 4) as usize];
            if s.read_exact(&mut body).await.is_err() {
                return ProbeResult::Unexpected("truncated error message".into());
            }
            match sqlstate(&body) {
                Some(b"57P03") => ProbeResult::StartingUp,
                // Any other error (unknown role, too many connections) comes from a backend that
                // got past the start-up gate, so the server accepts connections.
                Some(_) => ProbeResult::Ready,
                None => ProbeResult::Unexpected("error without SQLSTATE".into()),
            }
        }
        other => ProbeResult::Unexpected(format!("first message type {other:#04x}")),
    }
}

/// The postmaster of a server that was ready before answers for itself: an SSLRequest is
/// answered (`N` or `S`) by the backend the postmaster forks for the connection, before any
/// startup work, so this proves the postmaster accepts and forks without paying for a backend's
/// initialisation (the bulk of a full probe's cost). It cannot tell "starting up" from
/// "ready" (that answer comes only after the startup packet): use it where the caller knows
/// the server got past that, e.g. one that was frozen while ready.
pub async fn probe_accepting(addr: SocketAddr, timeout: Duration) -> ProbeResult {
    bounded(timeout, accepting_once(addr)).await
}

/// `SSLRequest`: length 8, code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

async fn accepting_once(addr: SocketAddr) -> ProbeResult {
    let mut s = match connect(addr).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(e) = s.write_all(&SSL_REQUEST).await {
        return ProbeResult::Unexpected(format!("write: {e}"));
    }
    let mut answer = [0u8; 1];
    match s.read_exact(&mut answer).await {
        // Closing now is quiet on the server: a backend that gets no startup packet after
        // its SSL answer logs nothing.
        Ok(_) if matches!(answer[0], b'N' | b'S') => ProbeResult::Ready,
        // An ErrorResponse this early: the postmaster refused the connection (e.g. it is
        // shutting down or out of processes).
        Ok(_) if answer[0] == b'E' => ProbeResult::StartingUp,
        Ok(_) => ProbeResult::Unexpected(format!("SSL answer {:#04x}", answer[0])),
        Err(e) => read_failure(e),
    }
}

fn sqlstate(mut body: &[u8]) -> Option<&[u8]> {
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            return None;
        }
        let end = rest.iter().position(|&b| b == 0)?;
        if field == b'C' {
            return Some(&rest[..end]);
        }
        body = &rest[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sqlstate_among_fields() {
        let body = b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0";
        assert_eq!(sqlstate(body), Some(&b"57P03"[..]));
        assert_eq!(sqlstate(b"SFATAL\0\0"), None);
        assert_eq!(sqlstate(b"SFATAL"), None);
        assert_eq!(sqlstate(b""), None);
    }

    /// A one-connection server that checks it got an SSLRequest and answers `answer`.
    async fn ssl_answering(answer: &'static [u8]) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = [0u8; 8];
            s.read_exact(&mut req).await.unwrap();
            assert_eq!(req, SSL_REQUEST);
            s.write_all(answer).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn accepting_reads_the_answer_to_an_ssl_request() {
        let t = Duration::from_secs(5);
        assert_eq!(
            probe_accepting(ssl_answering(b"N").await, t).await,
            ProbeResult::Ready
        );
        assert_eq!(
            probe_accepting(ssl_answering(b"S").await, t).await,
            ProbeResult::Ready
        );
        assert_eq!(
            probe_accepting(ssl_answering(b"E").await, t).await,
            ProbeResult::StartingUp
        );
        assert_eq!(
            probe_accepting(ssl_answering(b"").await, t).await,
            ProbeResult::StartingUp
        );
        assert!(matches!(
            probe_accepting(ssl_answering(b"H").await, t).await,
            ProbeResult::Unexpected(_)
        ));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = l.local_addr().unwrap();
        drop(l);
        assert_eq!(probe_accepting(gone, t).await, ProbeResult::Refused);
    }

    #[tokio::test]
    async fn refused_and_unexpected() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        assert_eq!(
            probe_ready(addr, "postgres", Duration::from_secs(1)).await,
            ProbeResult::Refused
        );

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                .await
                .unwrap();
        });
        assert!(matches!(
            probe_ready(addr, "postgres", Duration::from_secs(1)).await,
            ProbeResult::Unexpected(_)
        ));
        server.await.unwrap();
    }
}
