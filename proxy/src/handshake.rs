//! The startup handshake as a state machine over any byte stream: read packets until a
//! StartupMessage or CancelRequest, answering GSSENCRequest (and SSLRequest when TLS is not
//! available) with 'N', handing an SSLRequest back to the caller when it can do TLS; then take
//! the endpoint id out of the startup's `options`.
//!
//! Generic over the stream so that the same code runs on the client connection in `conn.rs`
//! (plain or TLS) and on an in-memory reader in the fuzz targets and their corpus tests.

use pgwake_router::EndpointId;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::error::ProxyError;
use crate::options::{extract_endpoint, mentions_endpoint, OptionsError};
use crate::wire::{read_startup_packet, ReadError, StartupMessage, StartupPacket};

/// At most this many SSLRequest/GSSENCRequest packets before the StartupMessage; libpq sends
/// at most one of each, and an unbounded loop would let a client hold a slot forever.
pub const MAX_NEGOTIATIONS: usize = 2;

/// What the client's first real packet asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum First {
    Startup(StartupMessage),
    Cancel {
        pid: i32,
        secret: Vec<u8>,
    },
    /// An SSLRequest, with TLS available: the caller answers 'S', runs the TLS handshake and
    /// calls [`read_startup`] again on the TLS stream.
    Tls,
}

/// Where the handshake stands with encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// Plain, and the proxy cannot do TLS: SSLRequest gets 'N'.
    Unavailable,
    /// Plain, TLS on offer: SSLRequest is returned as [`First::Tls`].
    Available,
    /// Already inside TLS: another negotiation request is a protocol violation.
    Established,
}

/// Reads startup-phase packets until a StartupMessage, a CancelRequest or (with TLS on offer)
/// an SSLRequest. Never reads past the packet that ends the loop.
pub async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    encryption: Encryption,
) -> Result<First, ProxyError> {
    let mut negotiations = 0;
    loop {
        let packet = read_startup_packet(client).await.map_err(|e| match e {
            ReadError::Eof => ProxyError::ClientGone,
            ReadError::Io(e) => ProxyError::ClientIo(e),
            ReadError::Wire(w) => ProxyError::Wire(w),
        })?;
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest
                if encryption == Encryption::Established =>
            {
                return Err(ProxyError::NegotiationInTls);
            }
            StartupPacket::SslRequest if encryption == Encryption::Available => {
                return Ok(First::Tls);
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                negotiations += 1;
                if negotiations > MAX_NEGOTIATIONS {
                    return Err(ProxyError::NegotiationLoop);
                }
                // 'N': no encryption of this kind here; libpq then sends its StartupMessage
                // in the clear (or gives up if it required encryption).
                client.write_all(b"N").await.map_err(ProxyError::ClientIo)?;
            }
            StartupPacket::CancelRequest { pid, secret } => {
                return Ok(First::Cancel { pid, secret })
            }
            StartupPacket::Startup(m) => return Ok(First::Startup(m)),
        }
    }
}

/// Takes the endpoint id out of the startup's `options`, leaving every other option for the
/// compute. `None` when options name no endpoint (SNI or the password may still).
pub fn take_endpoint(startup: &mut StartupMessage) -> Result<Option<EndpointId>, ProxyError> {
    let Some(options) = startup.get_bytes("options") else {
        return Ok(None);
    };
    let options = match std::str::from_utf8(options) {
        Ok(text) => text,
        // Postgres takes any bytes here; pgwake needs to read (and remove) only an endpoint
        // option, so anything else is forwarded untouched.
        Err(_) if !mentions_endpoint(options) => return Ok(None),
        Err(_) => return Err(OptionsError::NotUtf8.into()),
    };
    let extracted = extract_endpoint(options)?;
    match extracted.rest {
        Some(rest) => startup.set("options", rest),
        None => {
            startup.remove("options");
        }
    }
    extracted
        .endpoint
        .map(|id| EndpointId::parse(&id).map_err(ProxyError::from))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> StartupMessage {
        StartupMessage {
            major: 3,
            minor: 0,
            params: params
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn endpoint_is_taken_and_other_options_kept() {
        let mut s = startup(&[("user", "u"), ("options", "-c geqo=off endpoint=ep-1")]);
        assert_eq!(take_endpoint(&mut s).unwrap().unwrap().as_str(), "ep-1");
        assert_eq!(s.get("options"), Some("-c geqo=off"));

        let mut s = startup(&[("user", "u"), ("options", "--endpoint=ep-1")]);
        take_endpoint(&mut s).unwrap();
        assert_eq!(s.get("options"), None);
    }

    #[test]
    fn non_utf8_options_pass_untouched_unless_they_name_an_endpoint() {
        let mut s = startup(&[("user", "u")]);
        s.params
            .push((b"options".to_vec(), b"-c application_name=\xff".to_vec()));
        let before = s.clone();
        assert_eq!(take_endpoint(&mut s).unwrap(), None);
        assert_eq!(s, before, "forwarded as is");

        let mut s = startup(&[("user", "u")]);
        s.params
            .push((b"options".to_vec(), b"endpoint=ep \xff".to_vec()));
        assert!(matches!(
            take_endpoint(&mut s),
            Err(ProxyError::Options(OptionsError::NotUtf8))
        ));
    }

    #[test]
    fn endpoint_errors() {
        let mut s = startup(&[("user", "u")]);
        assert!(matches!(take_endpoint(&mut s), Ok(None)));
        let mut s = startup(&[("user", "u"), ("options", "-c geqo=off")]);
        assert!(matches!(take_endpoint(&mut s), Ok(None)));
        let mut s = startup(&[("user", "u"), ("options", "endpoint=Bad_Id")]);
        assert!(matches!(
            take_endpoint(&mut s),
            Err(ProxyError::InvalidEndpoint(_))
        ));
        let mut s = startup(&[("user", "u"), ("options", "endpoint=a endpoint=b")]);
        assert!(matches!(take_endpoint(&mut s), Err(ProxyError::Options(_))));
    }

    /// Client bytes in, server bytes out, over an in-memory stream.
    async fn run_with(
        input: &[u8],
        enc: Encryption,
    ) -> (Result<First, ProxyError>, Vec<u8>, usize) {
        let mut reader = input;
        let mut written = Vec::new();
        let res = {
            let mut s = tokio::io::join(&mut reader, &mut written);
            read_startup(&mut s, enc).await
        };
        (res, written, input.len() - reader.len())
    }

    async fn run(input: &[u8]) -> (Result<First, ProxyError>, Vec<u8>, usize) {
        run_with(input, Encryption::Unavailable).await
    }

    fn packet(body: &[u8]) -> Vec<u8> {
        let mut out = u32::try_from(body.len() + 4)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn negotiations_are_answered_and_bounded() {
        let ssl = packet(&crate::wire::SSL_REQUEST_CODE.to_be_bytes());
        let gss = packet(&crate::wire::GSSENC_REQUEST_CODE.to_be_bytes());
        let mut start = packet(b"\0\x03\0\0user\0u\0\0");
        start.extend_from_slice(b"trailing");
        let input = [ssl.clone(), gss.clone(), start].concat();
        let (res, written, consumed) = run(&input).await;
        assert_eq!(res.unwrap(), First::Startup(startup(&[("user", "u")])));
        assert_eq!(written, b"NN");
        assert_eq!(consumed, input.len() - b"trailing".len());

        let input = [ssl.clone(), ssl.clone(), ssl].concat();
        let (res, written, _) = run(&input).await;
        assert!(matches!(res, Err(ProxyError::NegotiationLoop)));
        assert_eq!(written, b"NN");

        let (res, _, _) = run(b"").await;
        assert!(matches!(res, Err(ProxyError::ClientGone)));
    }

    #[tokio::test]
    async fn ssl_request_is_handed_back_when_tls_is_on_offer() {
        let ssl = packet(&crate::wire::SSL_REQUEST_CODE.to_be_bytes());
        let gss = packet(&crate::wire::GSSENC_REQUEST_CODE.to_be_bytes());
        let input = [gss.clone(), ssl.clone(), b"ClientHello".to_vec()].concat();
        let (res, written, consumed) = run_with(&input, Encryption::Available).await;
        assert_eq!(res.unwrap(), First::Tls);
        assert_eq!(written, b"N", "GSS refused, SSL left to the caller");
        assert_eq!(
            consumed,
            gss.len() + ssl.len(),
            "the ClientHello stays unread"
        );

        for req in [ssl, gss] {
            let (res, written, _) = run_with(&req, Encryption::Established).await;
            assert!(matches!(res, Err(ProxyError::NegotiationInTls)));
            assert!(written.is_empty());
        }
    }
}
