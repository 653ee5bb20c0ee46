//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the corpus regression test in
//! `proxy/tests/fuzz_corpus.rs`, so a crash found by the fuzzer is replayed by plain
//! `cargo test` through exactly the same code.
//!
//! Each function takes arbitrary bytes, runs one parser, and panics only if the parser breaks
//! one of its own promises (a roundtrip, a length bound): errors for bad input are expected.

use bytes::BytesMut;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

use crate::handshake::{read_startup, take_endpoint, Encryption, First, MAX_NEGOTIATIONS};
use crate::options::{extract_endpoint, join_options, split_options};
use crate::proxy_protocol::{parse_header, ParsedHeader};
use crate::wire::{parse_startup_body, StartupPacket, MAX_STARTUP_LEN};

/// `wire::parse_startup_body` on the bytes after a length field; a parsed StartupMessage must
/// encode to a packet that parses back to the same message.
pub fn startup_body(data: &[u8]) {
    let Ok(packet) = parse_startup_body(data) else {
        return;
    };
    if let StartupPacket::Startup(msg) = packet {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        assert!(buf.len() <= MAX_STARTUP_LEN, "re-encoded packet grew");
        assert_eq!(
            parse_startup_body(&buf[4..]),
            Ok(StartupPacket::Startup(msg.clone())),
            "startup roundtrip"
        );
        if let Some(options) = msg.get("options") {
            options_str(options);
        }
    }
}

/// `options::split_options` and `options::extract_endpoint` on the bytes as UTF-8 (lossily, so
/// every input reaches the parser).
pub fn options(data: &[u8]) {
    options_str(&String::from_utf8_lossy(data));
}

fn options_str(s: &str) {
    let args = split_options(s);
    // join_options writes what split_options reads back (an empty argument survives only last,
    // and split_options never yields one elsewhere).
    assert_eq!(
        split_options(&join_options(&args)),
        args,
        "join/split roundtrip"
    );
    let Ok(extracted) = extract_endpoint(s) else {
        return;
    };
    if let Some(rest) = &extracted.rest {
        // What is forwarded to the compute has no endpoint left in it and means the same
        // thing when it is extracted from again.
        let again = extract_endpoint(rest).expect("the forwarded rest parses");
        assert_eq!(
            again.endpoint, None,
            "endpoint left in the forwarded options"
        );
        assert_eq!(again.rest.as_deref(), Some(rest.as_str()), "rest is stable");
    }
}

/// `proxy_protocol::parse_header`: a header never claims more bytes than were given.
pub fn proxy_header(data: &[u8]) {
    if let Ok(ParsedHeader::Header { len, .. }) = parse_header(data) {
        assert!(len <= data.len(), "header longer than its input");
        assert_eq!(
            parse_header(&data[..len]).ok(),
            parse_header(data).ok(),
            "the header alone parses the same"
        );
    }
}

/// The handshake as `conn.rs` runs it (negotiations answered with 'N', then the endpoint taken
/// from the startup), over an in-memory stream that hands the bytes out in chunks whose size
/// comes from the first input byte, so partial reads are exercised too; its top bits pick the
/// encryption state (no TLS, TLS on offer, inside TLS).
pub fn handshake(data: &[u8]) {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 16) + 1;
    let encryption = match first >> 6 {
        0 | 1 => Encryption::Unavailable,
        2 => Encryption::Available,
        _ => Encryption::Established,
    };
    let mut reader = Chunked { data: input, chunk };
    let mut written = Vec::new();
    let res = block_on(async {
        let mut stream = tokio::io::join(&mut reader, &mut written);
        read_startup(&mut stream, encryption).await
    });
    let consumed = input.len() - reader.data.len();
    assert!(written.len() <= MAX_NEGOTIATIONS, "too many 'N' answers");
    assert!(
        written.iter().all(|&b| b == b'N'),
        "unexpected answer bytes"
    );
    assert!(
        consumed <= (MAX_NEGOTIATIONS + 1) * MAX_STARTUP_LEN,
        "read past the handshake"
    );
    if let Ok(First::Startup(mut msg)) = res {
        if let Ok(Some(id)) = take_endpoint(&mut msg) {
            assert!(!id.as_str().is_empty());
            if let Some(rest) = msg.get("options") {
                assert_eq!(extract_endpoint(rest).map(|e| e.endpoint), Ok(None));
            }
        }
    }
}

/// Hands out at most `chunk` bytes per read.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, rest) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// Runs a future whose I/O is all in memory (it never waits on anything) to completion.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("current-thread runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

/// The SCRAM parsers (`scram`, `verifiers`) on arbitrary bytes. The first byte picks the
/// parser; for the exchanges, a NUL splits the first message from the second. Verifiers must
/// roundtrip through their text form.
pub fn scram(data: &[u8]) {
    use crate::scram::{sasl, ChannelBinding, ClientKey, ComputeLogin, ServerExchange, Verifier};
    // A fixed verifier (password "pencil"): the exchanges run deterministically.
    const VERIFIER: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
        WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (first, second) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let verifier: Verifier = VERIFIER.parse().expect("fixed verifier");
    match mode % 5 {
        0 => {
            if let Ok(v) = String::from_utf8_lossy(rest).parse::<Verifier>() {
                assert_eq!(
                    v.to_string().parse::<Verifier>(),
                    Ok(v),
                    "verifier roundtrip"
                );
            }
        }
        1 => {
            let _ = crate::verifiers::parse_roles_file(&String::from_utf8_lossy(rest));
        }
        2 => {
            let cb = if mode & 0x80 == 0 {
                ChannelBinding::None
            } else {
                ChannelBinding::TlsServerEndPoint(vec![7; 32])
            };
            let mechanism: &[u8] = if mode & 0x40 == 0 {
                b"SCRAM-SHA-256"
            } else {
                b"SCRAM-SHA-256-PLUS"
            };
            if let Ok(f) = ServerExchange::new(verifier, cb).client_first_with_nonce(
                mechanism,
                first,
                "fuzzfuzzfuzzfuzzfuzzfuzz",
            ) {
                let _ = f.client_final(second);
            }
        }
        3 => {
            if let Ok((mechanism, data)) = sasl::parse_initial_response(rest) {
                if let Some(m) = crate::scram::Mechanism::from_name(mechanism) {
                    let mut buf = BytesMut::new();
                    sasl::initial_response(m, data, &mut buf);
                    assert_eq!(
                        sasl::parse_initial_response(&buf[5..]),
                        Ok((mechanism, data)),
                        "SASLInitialResponse roundtrip"
                    );
                }
            }
            let _ = sasl::parse_mechanisms(rest).count();
        }
        _ => {
            let mut login = ComputeLogin::with_nonce(
                ClientKey::new([1; 32]),
                verifier,
                "fuzzfuzzfuzzfuzzfuzzfuzz".into(),
            );
            if login.server_first(first).is_ok() {
                let _ = login.server_final(second);
            }
        }
    }
}
