//! The startup phase of the Postgres frontend/backend protocol, as pure functions over bytes.
//!
//! Only what the proxy must understand before it knows where a connection goes is parsed here:
//! the untyped first packet (SSLRequest, GSSENCRequest, CancelRequest or StartupMessage) and the
//! ErrorResponse used to refuse a client. Everything after the startup is relayed, not parsed.
//!
//! Every length comes from the client, so each is checked against [`MAX_STARTUP_LEN`] before any
//! buffer is sized from it, and all offsets are derived with checked slicing.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest startup-phase packet accepted, including the 4-byte length. Postgres itself allows
/// 10000; the little extra headroom never lets a client make us buffer more than 10 KiB.
pub const MAX_STARTUP_LEN: usize = 10 * 1024;
/// Protocol "version" 1234.5679: the client asks for TLS before the real startup.
pub const SSL_REQUEST_CODE: u32 = 80877103;
/// Protocol "version" 1234.5680: the client asks for GSSAPI encryption.
pub const GSSENC_REQUEST_CODE: u32 = 80877104;
/// Protocol "version" 1234.5678: the client asks to cancel a query of another connection.
pub const CANCEL_REQUEST_CODE: u32 = 80877102;
/// Startup parameters accepted per packet. libpq sends fewer than ten; the cap keeps the
/// duplicate check and the per-connection state small.
pub const MAX_STARTUP_PARAMS: usize = 64;
/// Cancel secret length in protocol 3.0.
pub const MIN_CANCEL_SECRET_LEN: usize = 4;
/// Longest cancel secret allowed by protocol 3.2 (variable-length keys).
pub const MAX_CANCEL_SECRET_LEN: usize = 256;

/// The length field counts itself.
const LEN_FIELD: usize = 4;
/// Length field plus the request code / protocol version.
const MIN_STARTUP_LEN: usize = 8;
/// Protocol 3.0 is what every client speaks; 3.2 is PostgreSQL 18's; 3.1 was never sent by any
/// release but is part of the version range a 3.2 server must accept.
const PROTOCOL_MAJOR: u16 = 3;

/// One startup-phase packet from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    /// `secret` is 4 bytes in protocol 3.0 and 4..=256 bytes in 3.2.
    CancelRequest {
        pid: i32,
        secret: Vec<u8>,
    },
    Startup(StartupMessage),
}

/// A StartupMessage: protocol version and the `name=value` parameters, in the client's order.
/// Parameter names are unique in any message produced by [`parse_startup_body`].
///
/// Names and values are kept as the client's bytes: Postgres accepts any encoding here and
/// checks values against the client encoding itself, so the proxy must not insist on UTF-8
/// (an `application_name` in Latin-1 is legal) nor alter what it forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(Vec<u8>, Vec<u8>)>,
}

impl StartupMessage {
    /// The value of `key` as text; `None` when absent or not valid UTF-8 (see [`Self::get_bytes`]).
    pub fn get(&self, key: &str) -> Option<&str> {
        std::str::from_utf8(self.get_bytes(key)?).ok()
    }

    /// The value of `key` exactly as the client sent it.
    pub fn get_bytes(&self, key: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(k, _)| k == key.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// Replaces the value of `key`, or appends the parameter if it is absent.
    pub fn set(&mut self, key: &str, value: String) {
        let value = value.into_bytes();
        match self.params.iter_mut().find(|(k, _)| k == key.as_bytes()) {
            Some((_, v)) => *v = value,
            None => self.params.push((key.as_bytes().to_vec(), value)),
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Vec<u8>> {
        let idx = self.params.iter().position(|(k, _)| k == key.as_bytes())?;
        Some(self.params.remove(idx).1)
    }

    /// Appends the whole packet (length, version, parameters, terminating NUL) to `dst`.
    ///
    /// NUL bytes inside names and values are dropped, and parameters whose name is then empty
    /// are skipped: either would otherwise end a field early and let a value smuggle extra
    /// parameters (e.g. `user`) into the packet sent to the compute.
    ///
    /// # Panics
    /// If the packet would exceed `i32::MAX` bytes, which a message parsed from a packet of at
    /// most [`MAX_STARTUP_LEN`] bytes cannot reach through ordinary edits.
    pub fn encode(&self, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_u32(0);
        dst.put_u16(self.major);
        dst.put_u16(self.minor);
        for (key, value) in &self.params {
            if key.iter().all(|&b| b == 0) {
                continue;
            }
            put_cstr(dst, key);
            put_cstr(dst, value);
        }
        dst.put_u8(0);
        patch_len(dst, start);
    }
}

/// Why a startup-phase packet was rejected. The messages are safe to show to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("invalid startup packet length {len} (minimum is {min})", min = MIN_STARTUP_LEN)]
    TooShort { len: usize },
    #[error("invalid startup packet length {len} (maximum is {max})", max = MAX_STARTUP_LEN)]
    TooLong { len: usize },
    /// The peer closed the connection inside a packet. `expected` is how many bytes of the
    /// packet were needed at that point (4 while the length field itself was being read).
    #[error("incomplete startup packet: expected {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("unsupported frontend protocol {major}.{minor}: only protocol 3 is supported")]
    UnsupportedProtocol { major: u16, minor: u16 },
    /// An SSLRequest, GSSENCRequest or CancelRequest whose length does not fit its layout.
    #[error("invalid length {len} for request code {code}")]
    InvalidRequestLength { code: u32, len: usize },
    #[error("too many startup parameters (maximum is {max})", max = MAX_STARTUP_PARAMS)]
    TooManyParams,
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
}

/// Failure of [`read_startup_packet`].
///
/// A peer that closes the connection part-way through a packet is reported as
/// `Wire(WireError::Truncated { .. })`, not as `Io(UnexpectedEof)`: it is a client protocol
/// violation, and keeping `Io` for transport failures lets callers classify errors by variant.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("I/O error while reading startup packet: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection before sending the first byte of a packet: common for
    /// health checks and port scanners, so callers usually log it quietly.
    #[error("connection closed before a startup packet")]
    Eof,
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Reads exactly one startup-phase packet from `r`.
///
/// Never reads past the packet's end: after an SSLRequest the next bytes are a TLS ClientHello
/// that belongs to the TLS acceptor. The length field is validated before the body buffer is
/// allocated, so at most [`MAX_STARTUP_LEN`] bytes are ever allocated. There is no timeout here;
/// the caller bounds the whole handshake.
pub async fn read_startup_packet<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<StartupPacket, ReadError> {
    let mut len_field = [0u8; LEN_FIELD];
    let got = read_up_to(r, &mut len_field).await?;
    if got == 0 {
        return Err(ReadError::Eof);
    }
    if got < LEN_FIELD {
        return Err(WireError::Truncated {
            expected: LEN_FIELD,
            got,
        }
        .into());
    }
    // On a target where usize is narrower than u32, an unrepresentable length is too long anyway.
    let len = usize::try_from(u32::from_be_bytes(len_field)).unwrap_or(usize::MAX);
    check_packet_len(len)?;
    let body_len = len
        .checked_sub(LEN_FIELD)
        .ok_or(WireError::TooShort { len })?;

    let mut body = vec![0u8; body_len];
    let got = read_up_to(r, &mut body).await?;
    if got < body_len {
        return Err(WireError::Truncated {
            expected: len,
            got: got.saturating_add(LEN_FIELD),
        }
        .into());
    }
    Ok(parse_startup_body(&body)?)
}

/// Parses the body of a startup-phase packet: everything after the 4-byte length field.
pub fn parse_startup_body(body: &[u8]) -> Result<StartupPacket, WireError> {
    let len = body.len().saturating_add(LEN_FIELD);
    check_packet_len(len)?;
    let (code, rest) = body
        .split_first_chunk::<4>()
        .ok_or(WireError::TooShort { len })?;
    let code = u32::from_be_bytes(*code);
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            if !rest.is_empty() {
                return Err(WireError::InvalidRequestLength { code, len });
            }
            Ok(if code == SSL_REQUEST_CODE {
                StartupPacket::SslRequest
            } else {
                StartupPacket::GssEncRequest
            })
        }
        CANCEL_REQUEST_CODE => {
            let bad_len = || WireError::InvalidRequestLength { code, len };
            let (pid, secret) = rest.split_first_chunk::<4>().ok_or_else(bad_len)?;
            if !(MIN_CANCEL_SECRET_LEN..=MAX_CANCEL_SECRET_LEN).contains(&secret.len()) {
                return Err(bad_len());
            }
            Ok(StartupPacket::CancelRequest {
                pid: i32::from_be_bytes(*pid),
                secret: secret.to_vec(),
            })
        }
        version => parse_startup_message(version, rest).map(StartupPacket::Startup),
    }
}

/// Appends an ErrorResponse ('E') with fields S, V, C, M and optionally D and H.
///
/// NUL bytes are dropped from every string because a NUL ends a field on the wire; messages may
/// quote client-supplied text such as an endpoint name.
///
/// # Panics
/// If the message would exceed `i32::MAX` bytes.
pub fn encode_error_response(
    dst: &mut BytesMut,
    severity: &str,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) {
    dst.put_u8(b'E');
    let start = dst.len();
    dst.put_u32(0);
    // 'S' may be localized by a real server; 'V' (since 9.6) never is. We send both so old and
    // new clients alike find the severity.
    put_field(dst, b'S', severity);
    put_field(dst, b'V', severity);
    put_field(dst, b'C', sqlstate);
    put_field(dst, b'M', message);
    if let Some(detail) = detail {
        put_field(dst, b'D', detail);
    }
    if let Some(hint) = hint {
        put_field(dst, b'H', hint);
    }
    dst.put_u8(0);
    patch_len(dst, start);
}

/// [`encode_error_response`] into a fresh buffer.
pub fn error_response(
    severity: &str,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> Bytes {
    let mut buf = BytesMut::new();
    encode_error_response(&mut buf, severity, sqlstate, message, detail, hint);
    buf.freeze()
}

fn check_packet_len(len: usize) -> Result<(), WireError> {
    if len < MIN_STARTUP_LEN {
        return Err(WireError::TooShort { len });
    }
    if len > MAX_STARTUP_LEN {
        return Err(WireError::TooLong { len });
    }
    Ok(())
}

fn parse_startup_message(version: u32, mut rest: &[u8]) -> Result<StartupMessage, WireError> {
    let [a, b, c, d] = version.to_be_bytes();
    let major = u16::from_be_bytes([a, b]);
    let minor = u16::from_be_bytes([c, d]);
    // Any 3.x is forwarded as is: the compute answers a minor it does not speak with
    // NegotiateProtocolVersion, exactly as it would for a direct client, so pgwake needs no
    // list of minors that would go stale with every Postgres release.
    if major != PROTOCOL_MAJOR {
        return Err(WireError::UnsupportedProtocol { major, minor });
    }

    let mut params: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    loop {
        let (key, after_key) =
            split_cstr(rest).ok_or(WireError::Malformed("expected terminator as last byte"))?;
        if key.is_empty() {
            // The empty name is the list terminator. Postgres requires it to be the last byte;
            // so do we, so that nothing can hide behind it.
            if !after_key.is_empty() {
                return Err(WireError::Malformed("data after terminator"));
            }
            break;
        }
        let (value, after_value) =
            split_cstr(after_key).ok_or(WireError::Malformed("parameter without value"))?;
        if params.len() >= MAX_STARTUP_PARAMS {
            return Err(WireError::TooManyParams);
        }
        // Postgres silently lets a later duplicate win. If the proxy routed on the first `user`
        // or `options` while the compute applied the last, the two would disagree on who is
        // connecting; rejecting removes the ambiguity.
        if params.iter().any(|(k, _)| k == key) {
            return Err(WireError::Malformed("duplicate parameter"));
        }
        params.push((key.to_vec(), value.to_vec()));
        rest = after_value;
    }
    Ok(StartupMessage {
        major,
        minor,
        params,
    })
}

/// Splits a NUL-terminated string off the front of `buf`; `None` if there is no NUL.
fn split_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = buf.iter().position(|&b| b == 0)?;
    let (s, rest) = buf.split_at(nul);
    Some((s, rest.get(1..)?))
}

fn put_cstr(dst: &mut BytesMut, s: impl AsRef<[u8]>) {
    for part in s.as_ref().split(|&b| b == 0) {
        dst.put_slice(part);
    }
    dst.put_u8(0);
}

fn put_field(dst: &mut BytesMut, tag: u8, value: &str) {
    dst.put_u8(tag);
    put_cstr(dst, value);
}

/// Writes the length of everything from `start` to the end of `dst` into the 4 bytes at `start`.
fn patch_len(dst: &mut BytesMut, start: usize) {
    let len = dst
        .len()
        .checked_sub(start)
        .and_then(|n| i32::try_from(n).ok())
        .expect("protocol message longer than i32::MAX bytes");
    dst[start..start + LEN_FIELD].copy_from_slice(&len.to_be_bytes());
}

/// Fills as much of `buf` as the reader provides before EOF and returns how much that was.
/// Unlike `read_exact`, the count lets the caller tell a clean EOF from a truncated packet.
async fn read_up_to<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while let Some(unfilled) = buf.get_mut(filled..).filter(|b| !b.is_empty()) {
        match r.read(unfilled).await {
            Ok(0) => break,
            // `read` never reports more than the slice it was given, so this stays <= buf.len().
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;

    fn startup(major: u16, minor: u16, params: &[(&str, &str)]) -> StartupMessage {
        StartupMessage {
            major,
            minor,
            params: params
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    /// A whole packet: length field computed from `body`.
    fn packet(body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len() + 4).unwrap();
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    /// A startup body with the given version and raw parameter bytes.
    fn startup_body(major: u16, minor: u16, params: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&major.to_be_bytes());
        out.extend_from_slice(&minor.to_be_bytes());
        out.extend_from_slice(params);
        out
    }

    fn parse(params: &[u8]) -> Result<StartupPacket, WireError> {
        parse_startup_body(&startup_body(3, 0, params))
    }

    #[test]
    fn startup_roundtrip() {
        let msg = startup(
            3,
            0,
            &[
                ("user", "alice"),
                ("database", "app db"),
                ("options", "-c endpoint=ep-one -c search_path=a\\ b"),
                ("application_name", "psql ✓"),
                ("client_encoding", ""),
            ],
        );
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len());
        assert_eq!(buf.last(), Some(&0));
        assert_eq!(
            parse_startup_body(&buf[4..]),
            Ok(StartupPacket::Startup(msg))
        );
    }

    #[test]
    fn startup_encoding_bytes() {
        let mut buf = BytesMut::new();
        startup(3, 0, &[("user", "a")]).encode(&mut buf);
        assert_eq!(&buf[..], b"\0\0\0\x10\0\x03\0\0user\0a\0\0");
    }

    #[test]
    fn encode_strips_nul_so_values_cannot_inject_params() {
        let msg = startup(3, 0, &[("user", "a\0database\0b"), ("\0", "x")]);
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        assert_eq!(
            parse_startup_body(&buf[4..]),
            Ok(StartupPacket::Startup(startup(
                3,
                0,
                &[("user", "adatabaseb")]
            )))
        );
    }

    #[test]
    fn accepts_every_protocol_3_minor() {
        for minor in [0, 1, 2, 3, 9, u16::MAX] {
            assert_eq!(
                parse_startup_body(&startup_body(3, minor, b"user\0u\0\0")),
                Ok(StartupPacket::Startup(startup(3, minor, &[("user", "u")])))
            );
        }
    }

    #[test]
    fn rejects_unsupported_protocols() {
        for (major, minor) in [(2, 0), (4, 0), (1234, 5681), (0, 0)] {
            assert_eq!(
                parse_startup_body(&startup_body(major, minor, b"user\0u\0\0")),
                Err(WireError::UnsupportedProtocol { major, minor })
            );
        }
    }

    #[test]
    fn user_is_not_required() {
        assert_eq!(parse(b"\0"), Ok(StartupPacket::Startup(startup(3, 0, &[]))));
    }

    /// Postgres accepts any bytes in names and values (it checks encodings itself); the proxy
    /// keeps them and forwards them unchanged.
    #[test]
    fn non_utf8_params_are_kept_byte_for_byte() {
        let raw = b"user\0u\0application_name\0\xff\xfe\0x\xc3\0\xc3\0\0";
        let Ok(StartupPacket::Startup(m)) = parse(raw) else {
            panic!("non-UTF-8 parameters are accepted")
        };
        assert_eq!(m.get("user"), Some("u"));
        assert_eq!(m.get_bytes("application_name"), Some(&b"\xff\xfe"[..]));
        assert_eq!(m.get("application_name"), None, "not text");
        let mut out = BytesMut::new();
        m.encode(&mut out);
        assert_eq!(&out[8..], raw, "re-encoded unchanged");
    }

    #[test]
    fn rejects_malformed_params() {
        let cases: &[(&[u8], WireError)] = &[
            // Only the version: no terminator at all (Postgres rejects this too).
            (
                b"",
                WireError::Malformed("expected terminator as last byte"),
            ),
            (
                b"user\0u\0",
                WireError::Malformed("expected terminator as last byte"),
            ),
            (
                b"user",
                WireError::Malformed("expected terminator as last byte"),
            ),
            (b"user\0", WireError::Malformed("parameter without value")),
            (b"user\0u", WireError::Malformed("parameter without value")),
            // Key with an empty value but no terminator after it.
            (
                b"user\0\0",
                WireError::Malformed("expected terminator as last byte"),
            ),
            // An empty key is the terminator, so anything after it is trailing data.
            (b"\0u\0\0", WireError::Malformed("data after terminator")),
            (
                b"user\0u\0\0\0",
                WireError::Malformed("data after terminator"),
            ),
            (
                b"user\0a\0user\0b\0\0",
                WireError::Malformed("duplicate parameter"),
            ),
        ];
        for (params, want) in cases {
            assert_eq!(parse(params).as_ref(), Err(want), "params {params:?}");
        }
    }

    #[test]
    fn param_count_limit() {
        let params = |n: usize| {
            let mut out = Vec::new();
            for i in 0..n {
                out.extend_from_slice(format!("k{i}\0v\0").as_bytes());
            }
            out.push(0);
            out
        };
        match parse(&params(MAX_STARTUP_PARAMS)) {
            Ok(StartupPacket::Startup(m)) => assert_eq!(m.params.len(), MAX_STARTUP_PARAMS),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            parse(&params(MAX_STARTUP_PARAMS + 1)),
            Err(WireError::TooManyParams)
        );
    }

    #[test]
    fn body_length_limits() {
        assert_eq!(
            parse_startup_body(&[0, 3, 0]),
            Err(WireError::TooShort { len: 7 })
        );
        assert_eq!(parse_startup_body(&[]), Err(WireError::TooShort { len: 4 }));
        let huge = vec![0u8; MAX_STARTUP_LEN - 3];
        assert_eq!(
            parse_startup_body(&huge),
            Err(WireError::TooLong {
                len: MAX_STARTUP_LEN + 1
            })
        );
        // Exactly the maximum is allowed: one parameter padded to fill the packet.
        let mut params = b"user\0".to_vec();
        params.resize(MAX_STARTUP_LEN - 4 - 4 - 2, b'x');
        params.extend_from_slice(b"\0\0");
        let body = startup_body(3, 0, &params);
        assert_eq!(body.len() + 4, MAX_STARTUP_LEN);
        assert!(parse_startup_body(&body).is_ok());
    }

    #[test]
    fn ssl_and_gssenc_requests() {
        assert_eq!(
            parse_startup_body(&SSL_REQUEST_CODE.to_be_bytes()),
            Ok(StartupPacket::SslRequest)
        );
        assert_eq!(
            parse_startup_body(&GSSENC_REQUEST_CODE.to_be_bytes()),
            Ok(StartupPacket::GssEncRequest)
        );
        for code in [SSL_REQUEST_CODE, GSSENC_REQUEST_CODE] {
            let mut body = code.to_be_bytes().to_vec();
            body.extend_from_slice(&[0, 0, 0, 0]);
            assert_eq!(
                parse_startup_body(&body),
                Err(WireError::InvalidRequestLength { code, len: 12 })
            );
        }
    }

    #[test]
    fn cancel_requests() {
        let cancel = |secret_len: usize| {
            let mut body = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
            body.extend_from_slice(&(-7i32).to_be_bytes());
            body.extend((0..secret_len).map(|i| i as u8));
            body
        };
        for secret_len in [4, 32, 256] {
            assert_eq!(
                parse_startup_body(&cancel(secret_len)),
                Ok(StartupPacket::CancelRequest {
                    pid: -7,
                    secret: (0..secret_len).map(|i| i as u8).collect(),
                })
            );
        }
        for secret_len in [0, 3, 257] {
            assert_eq!(
                parse_startup_body(&cancel(secret_len)),
                Err(WireError::InvalidRequestLength {
                    code: CANCEL_REQUEST_CODE,
                    len: 12 + secret_len,
                })
            );
        }
        let mut short = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        short.extend_from_slice(&[0, 0]);
        assert_eq!(
            parse_startup_body(&short),
            Err(WireError::InvalidRequestLength {
                code: CANCEL_REQUEST_CODE,
                len: 10,
            })
        );
    }

    #[test]
    fn startup_message_accessors() {
        let mut msg = startup(3, 0, &[("user", "a"), ("options", "x")]);
        assert_eq!(msg.get("user"), Some("a"));
        assert_eq!(msg.get("database"), None);
        msg.set("user", "b".into());
        msg.set("database", "d".into());
        assert_eq!(msg.get("user"), Some("b"));
        assert_eq!(msg.remove("options"), Some("x".into()));
        assert_eq!(msg.remove("options"), None);
        assert_eq!(msg, startup(3, 0, &[("user", "b"), ("database", "d")]));
    }

    fn wire_err(res: Result<StartupPacket, ReadError>) -> WireError {
        match res {
            Err(ReadError::Wire(e)) => e,
            other => panic!("expected a wire error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn read_leaves_following_bytes_unread() {
        let msg = startup(3, 0, &[("user", "u"), ("database", "d")]);
        let mut bytes = BytesMut::new();
        msg.encode(&mut bytes);
        bytes.extend_from_slice(b"\x16\x03\x01next phase");
        let mut r: &[u8] = &bytes;
        assert_eq!(
            read_startup_packet(&mut r).await.unwrap(),
            StartupPacket::Startup(msg)
        );
        assert_eq!(r, b"\x16\x03\x01next phase");
    }

    #[tokio::test]
    async fn read_ssl_request_then_startup() {
        let msg = startup(3, 2, &[("user", "u")]);
        let mut bytes = packet(&SSL_REQUEST_CODE.to_be_bytes());
        let mut encoded = BytesMut::new();
        msg.encode(&mut encoded);
        bytes.extend_from_slice(&encoded);
        let mut r: &[u8] = &bytes;
        assert_eq!(
            read_startup_packet(&mut r).await.unwrap(),
            StartupPacket::SslRequest
        );
        assert_eq!(r, &encoded[..], "only the SSLRequest was consumed");
        assert_eq!(
            read_startup_packet(&mut r).await.unwrap(),
            StartupPacket::Startup(msg)
        );
        assert!(matches!(
            read_startup_packet(&mut r).await,
            Err(ReadError::Eof)
        ));
    }

    #[tokio::test]
    async fn read_rejects_bad_length_field_before_reading_body() {
        for (len, want) in [
            (0u32, WireError::TooShort { len: 0 }),
            (7, WireError::TooShort { len: 7 }),
            (
                (MAX_STARTUP_LEN + 1) as u32,
                WireError::TooLong {
                    len: MAX_STARTUP_LEN + 1,
                },
            ),
            (
                u32::MAX,
                WireError::TooLong {
                    len: u32::MAX as usize,
                },
            ),
        ] {
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend_from_slice(b"body");
            let mut r: &[u8] = &bytes;
            assert_eq!(wire_err(read_startup_packet(&mut r).await), want);
            assert_eq!(r, b"body", "nothing after the length field was read");
        }
    }

    #[tokio::test]
    async fn read_truncated() {
        let mut r: &[u8] = &[];
        assert!(matches!(
            read_startup_packet(&mut r).await,
            Err(ReadError::Eof)
        ));

        let mut r: &[u8] = &[0, 0];
        assert_eq!(
            wire_err(read_startup_packet(&mut r).await),
            WireError::Truncated {
                expected: 4,
                got: 2
            }
        );

        let full = packet(&startup_body(3, 0, b"user\0u\0\0"));
        let mut r: &[u8] = &full[..full.len() - 3];
        assert_eq!(
            wire_err(read_startup_packet(&mut r).await),
            WireError::Truncated {
                expected: full.len(),
                got: full.len() - 3
            }
        );
    }

    #[tokio::test]
    async fn read_surfaces_parse_errors() {
        let bytes = packet(&startup_body(2, 0, b"user\0u\0\0"));
        let mut r: &[u8] = &bytes;
        assert_eq!(
            wire_err(read_startup_packet(&mut r).await),
            WireError::UnsupportedProtocol { major: 2, minor: 0 }
        );
    }

    /// Hands out one byte per `read`, like a client writing byte by byte.
    struct Trickle<'a>(&'a [u8]);

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some((first, rest)) = self.0.split_first() {
                buf.put_slice(&[*first]);
                self.0 = rest;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn read_reassembles_partial_reads() {
        let mut body = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 42, 1, 2, 3, 4]);
        let mut bytes = packet(&body);
        bytes.extend_from_slice(b"rest");
        let mut r = Trickle(&bytes);
        assert_eq!(
            read_startup_packet(&mut r).await.unwrap(),
            StartupPacket::CancelRequest {
                pid: 42,
                secret: vec![1, 2, 3, 4]
            }
        );
        assert_eq!(r.0, b"rest");
    }

    #[test]
    fn error_response_bytes() {
        let got = error_response(
            "FATAL",
            "57P03",
            "endpoint \"ep-a\" is starting",
            Some("try again"),
            Some("wait"),
        );
        let mut want: Vec<u8> = vec![b'E'];
        let fields: &[u8] =
            b"SFATAL\0VFATAL\0C57P03\0Mendpoint \"ep-a\" is starting\0Dtry again\0Hwait\0\0";
        want.extend_from_slice(&u32::try_from(4 + fields.len()).unwrap().to_be_bytes());
        want.extend_from_slice(fields);
        assert_eq!(&got[..], &want[..]);
        // Same thing, fully spelled out, so a mistake in the length arithmetic above cannot hide.
        assert_eq!(
            &error_response("ERROR", "08000", "x", None, None)[..],
            b"E\0\0\0\x1dSERROR\0VERROR\0C08000\0Mx\0\0"
        );
    }

    #[test]
    fn error_response_strips_nul() {
        let got = error_response("FATAL", "08\x0000", "a\0b", None, Some("h\0"));
        assert_eq!(&got[..], b"E\0\0\0\x20SFATAL\0VFATAL\0C0800\0Mab\0Hh\0\0");
    }

    #[test]
    fn encode_appends_to_existing_buffer() {
        let mut buf = BytesMut::from(&b"prefix"[..]);
        encode_error_response(&mut buf, "ERROR", "08000", "x", None, None);
        assert_eq!(&buf[..6], b"prefix");
        assert_eq!(
            &buf[6..],
            &error_response("ERROR", "08000", "x", None, None)[..]
        );
    }
}
