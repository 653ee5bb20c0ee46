//! PROXY protocol v1/v2 on the listener, so that behind a TCP load balancer (AWS NLB, HAProxy,
//! a Kubernetes Service) the real client address reaches logs, limits and allowlists.
//!
//! Reads exactly the header's bytes and nothing more: what follows belongs to the Postgres
//! startup (or a TLS ClientHello) and must stay in the socket for the next reader.

use std::net::SocketAddr;

use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolMode {
    /// Never look for a header: a client could otherwise claim any address.
    #[default]
    Off,
    /// Use a header when the connection starts with one (mixed LB and direct traffic).
    Optional,
    /// Every connection must start with a header; others are closed.
    Required,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("connection has no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("PROXY protocol header longer than {MAX_V2_PAYLOAD} bytes")]
    TooLong,
    #[error("reading PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// v1 lines are at most 107 bytes including CRLF (the spec's worst case, TCP6 with ports).
const MAX_V1_LEN: usize = 107;
/// v2 addresses are at most 216 bytes (UNIX); the rest is TLVs, which we do not use. A cap
/// keeps a hostile 64 KiB length from costing memory per connection.
const MAX_V2_PAYLOAD: usize = 1024;
/// Signature, version/command, family/protocol and the 2-byte length.
const V2_HEAD_LEN: usize = 16;

/// What [`parse_header`] found at the start of a connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParsedHeader {
    /// A header of `len` bytes; `client` as in [`read_header`].
    Header {
        client: Option<SocketAddr>,
        len: usize,
    },
    /// The bytes do not start like a PROXY header (a Postgres startup or a TLS record).
    NoHeader,
}

/// The same decisions as [`read_header`] in optional mode, as a pure function over the first
/// bytes of a connection (for fuzzing and tests). `buf` is taken as everything the peer sent:
/// a header cut short is reported as the socket reader would see it, `UnexpectedEof`.
pub fn parse_header(buf: &[u8]) -> Result<ParsedHeader, ProxyHeaderError> {
    let eof = || ProxyHeaderError::Io(std::io::ErrorKind::UnexpectedEof.into());
    match buf.first() {
        None => Err(eof()),
        Some(b'\r') => {
            let head: &[u8; V2_HEAD_LEN] = buf.first_chunk().ok_or_else(eof)?;
            let len = V2_HEAD_LEN + v2_payload_len(head)?;
            let header = buf.get(..len).ok_or_else(eof)?;
            let client = parse_v2(header)?;
            Ok(ParsedHeader::Header { client, len })
        }
        Some(b'P') => {
            // As `read_v1`: the line ends at the first CRLF, and at most MAX_V1_LEN bytes are
            // looked at.
            let window = &buf[..buf.len().min(MAX_V1_LEN)];
            match window.windows(2).position(|w| w == b"\r\n") {
                Some(i) => {
                    let len = i + 2;
                    let client = parse_v1(&buf[..len])?;
                    Ok(ParsedHeader::Header { client, len })
                }
                None if window.len() >= MAX_V1_LEN => {
                    Err(ProxyHeaderError::Malformed("v1 line too long".into()))
                }
                None => Err(eof()),
            }
        }
        Some(_) => Ok(ParsedHeader::NoHeader),
    }
}

/// The client address as far as the header tells: `Some` for a proxied TCP connection, `None`
/// when there is no header (optional mode) or the header is LOCAL/UNKNOWN (a load balancer's
/// own health check), in which case the socket's peer is the client.
pub async fn read_header(
    stream: &mut TcpStream,
    mode: ProxyProtocolMode,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if mode == ProxyProtocolMode::Off {
        return Ok(None);
    }
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    if n == 0 {
        return Err(ProxyHeaderError::Io(
            std::io::ErrorKind::UnexpectedEof.into(),
        ));
    }
    // A Postgres startup begins with a big-endian length under 16 MiB (first byte 0) and a
    // TLS record with 0x16, so one byte tells the three apart.
    match first[0] {
        b'\r' => read_v2(stream).await,
        b'P' => read_v1(stream).await,
        _ if mode == ProxyProtocolMode::Required => Err(ProxyHeaderError::Missing),
        _ => Ok(None),
    }
}

async fn read_v2(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut head = [0u8; V2_HEAD_LEN];
    stream.read_exact(&mut head).await?;
    let len = v2_payload_len(&head)?;
    let mut buf = Vec::with_capacity(V2_HEAD_LEN + len);
    buf.extend_from_slice(&head);
    buf.resize(V2_HEAD_LEN + len, 0);
    stream.read_exact(&mut buf[V2_HEAD_LEN..]).await?;
    parse_v2(&buf)
}

/// Checks the fixed 16-byte v2 head and returns the length of what follows it.
fn v2_payload_len(head: &[u8; V2_HEAD_LEN]) -> Result<usize, ProxyHeaderError> {
    if head[..12] != V2_SIGNATURE {
        return Err(ProxyHeaderError::Malformed("bad v2 signature".into()));
    }
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    if len > MAX_V2_PAYLOAD {
        return Err(ProxyHeaderError::TooLong);
    }
    Ok(len)
}

fn parse_v2(buf: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::v2::{Addresses, Command, Header};
    let h = Header::try_from(buf).map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
    if h.command == Command::Local {
        return Ok(None);
    }
    Ok(match h.addresses {
        Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unspecified | Addresses::Unix(_) => None,
    })
}

async fn read_v1(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // Byte by byte: v1 has no length field, and reading ahead would swallow the startup
    // packet. At most 107 small reads, only for the legacy text format.
    let mut line = Vec::with_capacity(MAX_V1_LEN);
    loop {
        let b = stream.read_u8().await?;
        line.push(b);
        if line.ends_with(b"\r\n") {
            break;
        }
        if line.len() >= MAX_V1_LEN {
            return Err(ProxyHeaderError::Malformed("v1 line too long".into()));
        }
    }
    parse_v1(&line)
}

fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::v1::{Addresses, Header};
    // The v1 header is US-ASCII by spec. Checking that here, rather than only UTF-8, also keeps
    // ppp 2.3 from panicking: it slices the line two bytes past the first '\r', which is not a
    // char boundary when a multi-byte character follows a stray '\r' (found by fuzzing).
    if !line.is_ascii() {
        return Err(ProxyHeaderError::Malformed("not ASCII".into()));
    }
    let text =
        std::str::from_utf8(line).map_err(|_| ProxyHeaderError::Malformed("not ASCII".into()))?;
    let h = Header::try_from(text).map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
    Ok(match h.addresses {
        Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unknown => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn v2(src: &str, dst: &str) -> Vec<u8> {
        let src: SocketAddr = src.parse().unwrap();
        let dst: SocketAddr = dst.parse().unwrap();
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (src, dst),
        )
        .build()
        .unwrap()
    }

    /// Writes `bytes` from a client, runs `read_header` on the server side, and returns its
    /// result plus whatever the server can still read afterwards.
    async fn run(
        bytes: Vec<u8>,
        mode: ProxyProtocolMode,
    ) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&bytes).await.unwrap();
            c.shutdown().await.unwrap();
            c
        });
        let (mut s, _) = l.accept().await.unwrap();
        let r = read_header(&mut s, mode).await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        drop(client.await);
        (r, rest)
    }

    #[tokio::test]
    async fn v2_ipv4_and_ipv6_leave_the_startup_in_the_socket() {
        let mut b = v2("10.1.2.3:5555", "10.0.0.1:5432");
        b.extend_from_slice(&[0, 0, 0, 8, 4, 210, 22, 47]);
        let (r, rest) = run(b, ProxyProtocolMode::Required).await;
        assert_eq!(r.unwrap(), Some("10.1.2.3:5555".parse().unwrap()));
        assert_eq!(rest, [0, 0, 0, 8, 4, 210, 22, 47]);

        let b = v2("[2001:db8::7]:1234", "[2001:db8::1]:5432");
        let (r, _) = run(b, ProxyProtocolMode::Optional).await;
        assert_eq!(r.unwrap(), Some("[2001:db8::7]:1234".parse().unwrap()));
    }

    /// The pure parser and the socket reader agree on every case the socket tests use, and on
    /// how many bytes the header took.
    #[tokio::test]
    async fn parse_header_agrees_with_read_header() {
        let mut cases: Vec<Vec<u8>> = vec![
            v2("10.1.2.3:5555", "10.0.0.1:5432"),
            v2("[2001:db8::7]:1234", "[2001:db8::1]:5432"),
            b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 5432\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY TCP4 nonsense here 1 2\r\n".to_vec(),
            [b'P'; 200].to_vec(),
            b"PROXY TCP4 1.2.3.4".to_vec(),
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c".to_vec(),
            vec![0, 0, 0, 8, 4, 210, 22, 47],
            b"\r\n".to_vec(),
        ];
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        cases.push(huge);
        for case in cases {
            let mut with_rest = case.clone();
            with_rest.extend_from_slice(b"REST");
            let pure = parse_header(&with_rest);
            let (sock, rest) = run(with_rest.clone(), ProxyProtocolMode::Optional).await;
            let what = String::from_utf8_lossy(&case).into_owned();
            match (pure, sock) {
                (Ok(ParsedHeader::Header { client, len }), Ok(c)) => {
                    assert_eq!(client, c, "{what}");
                    assert_eq!(&with_rest[len..], &rest[..], "{what}");
                }
                (Ok(ParsedHeader::NoHeader), Ok(None)) => assert_eq!(rest, with_rest),
                (Err(_), Err(_)) => {}
                (p, s) => panic!("{what}: pure {p:?} vs socket {s:?}"),
            }
        }
    }

    #[tokio::test]
    async fn v2_local_is_the_load_balancers_own_check() {
        let b = ppp::v2::Builder::new(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        let (r, _) = run(b, ProxyProtocolMode::Required).await;
        assert_eq!(r.unwrap(), None);
    }

    #[tokio::test]
    async fn v1_tcp4_tcp6_unknown() {
        let (r, rest) = run(
            b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 5432\r\nXYZ".to_vec(),
            ProxyProtocolMode::Optional,
        )
        .await;
        assert_eq!(r.unwrap(), Some("192.0.2.1:56324".parse().unwrap()));
        assert_eq!(rest, b"XYZ");
        let (r, _) = run(
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n".to_vec(),
            ProxyProtocolMode::Optional,
        )
        .await;
        assert_eq!(r.unwrap(), Some("[2001:db8::1]:1".parse().unwrap()));
        let (r, _) = run(b"PROXY UNKNOWN\r\n".to_vec(), ProxyProtocolMode::Optional).await;
        assert_eq!(r.unwrap(), None);
    }

    #[tokio::test]
    async fn modes_and_malformed_headers() {
        let startup = vec![0, 0, 0, 8, 4, 210, 22, 47];
        let (r, rest) = run(startup.clone(), ProxyProtocolMode::Optional).await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(
            rest, startup,
            "optional mode without a header consumes nothing"
        );
        let (r, _) = run(startup.clone(), ProxyProtocolMode::Required).await;
        assert!(matches!(r, Err(ProxyHeaderError::Missing)));
        let (r, rest) = run(b"PROXY TCP4 1.2.3.4".to_vec(), ProxyProtocolMode::Off).await;
        assert_eq!(r.unwrap(), None, "off mode trusts no header");
        assert_eq!(rest, b"PROXY TCP4 1.2.3.4");

        for bad in [
            b"PROXY TCP4 nonsense here 1 2\r\n".to_vec(),
            // A stray CR before a multi-byte character used to panic inside ppp.
            b"PRUN\x011.\r\xd9\xa8n\r\n".to_vec(),
            "PROXY TCP4 1.2.3.4 \r\u{e9} 5.6.7.8 1 2\r\n"
                .as_bytes()
                .to_vec(),
            [b'P'; 200].to_vec(),
            b"PROXY TCP4 1.2.3.4".to_vec(),
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c".to_vec(),
        ] {
            let (r, _) = run(bad.clone(), ProxyProtocolMode::Required).await;
            assert!(r.is_err(), "{:?}", String::from_utf8_lossy(&bad));
        }
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let (r, _) = run(huge, ProxyProtocolMode::Required).await;
        assert!(matches!(r, Err(ProxyHeaderError::TooLong)));
    }
}
