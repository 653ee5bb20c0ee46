//! The server side of SCRAM-SHA-256(-PLUS), as PostgreSQL's `auth-scram.c` runs it: the
//! username in the SCRAM message is ignored (the startup packet's user is the role), no
//! authorization identity, no extensions, `tls-server-end-point` the only channel binding.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;

use super::keys::{ct_eq, hmac, sha256, xor, ClientKey, KEY_LEN};
use super::verifier::Verifier;
use super::ScramError;

/// Random bytes in the server's part of the nonce (PostgreSQL uses 18).
const SERVER_NONCE_LEN: usize = 18;
/// Longest client nonce accepted; libpq sends 24 characters.
const MAX_CLIENT_NONCE_LEN: usize = 256;
/// Longest SCRAM message accepted from a client; real ones are under 200 bytes.
pub const MAX_MESSAGE_LEN: usize = 2048;

const GS2_TLS_SERVER_END_POINT: &str = "p=tls-server-end-point,,";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    ScramSha256,
    ScramSha256Plus,
}

impl Mechanism {
    pub const fn name(self) -> &'static str {
        match self {
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha256Plus => "SCRAM-SHA-256-PLUS",
        }
    }

    pub fn from_name(name: &[u8]) -> Option<Self> {
        match name {
            b"SCRAM-SHA-256" => Some(Self::ScramSha256),
            b"SCRAM-SHA-256-PLUS" => Some(Self::ScramSha256Plus),
            _ => None,
        }
    }
}

/// What the client's connection can bind to: nothing (plain TCP) or the hash of the
/// certificate the proxy presented on it ([`super::tls_server_end_point`]).
#[derive(Clone, PartialEq, Eq)]
pub enum ChannelBinding {
    None,
    TlsServerEndPoint(Vec<u8>),
}

impl ChannelBinding {
    /// The mechanisms to offer in AuthenticationSASL, preferred first: a client that can bind
    /// to the channel should, so PLUS comes first over TLS.
    pub fn mechanisms(&self) -> &'static [Mechanism] {
        match self {
            Self::None => &[Mechanism::ScramSha256],
            Self::TlsServerEndPoint(_) => &[Mechanism::ScramSha256Plus, Mechanism::ScramSha256],
        }
    }
}

impl std::fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::TlsServerEndPoint(_) => f.write_str("TlsServerEndPoint"),
        }
    }
}

/// One exchange with one client, before the client-first message.
pub struct ServerExchange {
    verifier: Verifier,
    /// False for the mock exchange of an unknown endpoint or role: it runs every step the same
    /// way and fails at the proof.
    real: bool,
    cb: ChannelBinding,
}

/// After the server-first message: waiting for the client's proof.
pub struct ServerFirst {
    verifier: Verifier,
    real: bool,
    /// `c=` the client must send: base64 of its GS2 header (plus our certificate hash).
    expected_cbind: String,
    nonce: String,
    client_first_bare: String,
    message: String,
}

/// A verified client.
#[derive(Debug)]
pub struct Success {
    /// The AuthenticationSASLFinal payload (`v=<ServerSignature>`).
    pub server_final: String,
    /// Recovered from the proof; logs in to the compute ([`super::ComputeLogin`]).
    pub client_key: ClientKey,
}

impl ServerExchange {
    pub fn new(verifier: Verifier, cb: ChannelBinding) -> Self {
        Self {
            verifier,
            real: true,
            cb,
        }
    }

    pub(crate) fn mock(verifier: Verifier, cb: ChannelBinding) -> Self {
        Self {
            verifier,
            real: false,
            cb,
        }
    }

    /// Reads the SASLInitialResponse (mechanism and client-first message) and builds the
    /// server-first message.
    pub fn client_first(self, mechanism: &[u8], message: &[u8]) -> Result<ServerFirst, ScramError> {
        let mut raw = [0u8; SERVER_NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        self.client_first_with_nonce(mechanism, message, &B64.encode(raw))
    }

    pub(crate) fn client_first_with_nonce(
        self,
        mechanism: &[u8],
        message: &[u8],
        server_nonce: &str,
    ) -> Result<ServerFirst, ScramError> {
        let mechanism = Mechanism::from_name(mechanism)
            .filter(|m| self.cb.mechanisms().contains(m))
            .ok_or(ScramError::ChannelBinding(
                "client selected an invalid SASL authentication mechanism",
            ))?;
        let msg = text(message)?;
        let plus = mechanism == Mechanism::ScramSha256Plus;

        // gs2-header: cbind-flag "," [authzid] ","
        let (gs2_len, cb_data): (usize, &[u8]) = match msg.as_bytes().first() {
            Some(b'n') | Some(b'y') if plus => {
                return Err(ScramError::ChannelBinding(
                    "the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not \
                     include channel binding data",
                ))
            }
            Some(b'n') => (1, &[]),
            Some(b'y') => {
                // The client can bind but thinks we cannot: over TLS that is a downgrade.
                if matches!(self.cb, ChannelBinding::TlsServerEndPoint(_)) {
                    return Err(ScramError::ChannelBinding(
                        "the client supports SCRAM channel binding but thinks the server does \
                         not; however, this server does support channel binding",
                    ));
                }
                (1, &[])
            }
            Some(b'p') => {
                let ChannelBinding::TlsServerEndPoint(data) = &self.cb else {
                    return Err(ScramError::ChannelBinding(
                        "the client selected SCRAM-SHA-256 without channel binding, but the \
                         SCRAM message includes channel binding data",
                    ));
                };
                if !plus {
                    return Err(ScramError::ChannelBinding(
                        "the client selected SCRAM-SHA-256 without channel binding, but the \
                         SCRAM message includes channel binding data",
                    ));
                }
                if !msg.starts_with("p=tls-server-end-point,") {
                    return Err(ScramError::ChannelBinding(
                        "unsupported SCRAM channel-binding type",
                    ));
                }
                ("p=tls-server-end-point".len(), data.as_slice())
            }
            _ => return Err(ScramError::Malformed("unexpected channel-binding flag")),
        };
        let rest = msg[gs2_len..]
            .strip_prefix(',')
            .ok_or(ScramError::Malformed(
                "comma expected after the channel-binding flag",
            ))?;
        if rest.starts_with("a=") {
            return Err(ScramError::Malformed(
                "client uses authorization identity, but it is not supported",
            ));
        }
        let bare = rest
            .strip_prefix(',')
            .ok_or(ScramError::Malformed("comma expected after the GS2 header"))?;
        let gs2_header = &msg[..msg.len() - bare.len()];
        if bare.starts_with("m=") {
            return Err(ScramError::Malformed(
                "client requires an unsupported SCRAM extension",
            ));
        }
        let mut attrs = Attrs(bare);
        // The user name is ignored, as PostgreSQL does: the role is the startup packet's user.
        attrs.next_value('n')?;
        let client_nonce = attrs.next_value('r')?;
        if client_nonce.is_empty()
            || client_nonce.len() > MAX_CLIENT_NONCE_LEN
            || !client_nonce.bytes().all(is_printable)
        {
            return Err(ScramError::Malformed(
                "non-printable characters in SCRAM nonce",
            ));
        }
        // Optional extensions: none are supported, so they are skipped.
        while !attrs.is_empty() {
            attrs.next_any()?;
        }

        let mut cbind = gs2_header.as_bytes().to_vec();
        cbind.extend_from_slice(cb_data);
        debug_assert!(!plus || gs2_header == GS2_TLS_SERVER_END_POINT);
        let nonce = format!("{client_nonce}{server_nonce}");
        let message = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        Ok(ServerFirst {
            verifier: self.verifier,
            real: self.real,
            expected_cbind: B64.encode(cbind),
            nonce,
            client_first_bare: bare.to_string(),
            message,
        })
    }
}

impl ServerFirst {
    /// The AuthenticationSASLContinue payload.
    pub fn message(&self) -> &[u8] {
        self.message.as_bytes()
    }

    /// Checks the client-final message and its proof.
    pub fn client_final(self, message: &[u8]) -> Result<Success, ScramError> {
        let msg = text(message)?;
        let mut attrs = Attrs(msg);
        let cbind = attrs.next_value('c')?;
        if cbind != self.expected_cbind {
            return Err(ScramError::ChannelBinding(
                "SCRAM channel binding check failed",
            ));
        }
        if attrs.next_value('r')? != self.nonce {
            return Err(ScramError::Malformed("SCRAM nonce does not match"));
        }
        // Extensions before the proof are skipped; the proof is last.
        let without_proof_len;
        let proof = loop {
            let before = attrs.0;
            let (name, value) = attrs.next_any()?;
            if name == 'p' {
                if !attrs.is_empty() {
                    return Err(ScramError::Malformed("garbage at the end of client-final"));
                }
                without_proof_len = msg.len() - before.len() - 1;
                break value;
            }
            if attrs.is_empty() {
                return Err(ScramError::Malformed("no proof in client-final"));
            }
        };
        let proof: [u8; KEY_LEN] = super::verifier::decode_key(proof)
            .ok_or(ScramError::Malformed("invalid ClientProof"))?;

        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare,
            self.message,
            &msg[..without_proof_len]
        );
        let v = &self.verifier;
        let client_signature = hmac(&v.stored_key, &[auth_message.as_bytes()]);
        let client_key = ClientKey::new(xor(&proof, &client_signature));
        let matches = ct_eq(&sha256(client_key.as_bytes()), &v.stored_key);
        // A mock exchange has computed the same things and fails here like a wrong password.
        if !(matches & self.real) {
            return Err(ScramError::AuthFailed);
        }
        let server_signature = hmac(&v.server_key, &[auth_message.as_bytes()]);
        Ok(Success {
            server_final: format!("v={}", B64.encode(server_signature)),
            client_key,
        })
    }
}

/// `printable` in RFC 5802: `%x21-2B / %x2D-7E` (visible ASCII but ',').
fn is_printable(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

fn text(message: &[u8]) -> Result<&str, ScramError> {
    if message.len() > MAX_MESSAGE_LEN {
        return Err(ScramError::Malformed("SCRAM message too long"));
    }
    std::str::from_utf8(message).map_err(|_| ScramError::Malformed("SCRAM message is not UTF-8"))
}

/// A cursor over `a=value,b=value,...`.
pub(crate) struct Attrs<'a>(pub(crate) &'a str);

impl<'a> Attrs<'a> {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The next attribute, whatever its name.
    pub(crate) fn next_any(&mut self) -> Result<(char, &'a str), ScramError> {
        let (item, rest) = match self.0.split_once(',') {
            Some((item, rest)) => (item, Some(rest)),
            None => (self.0, None),
        };
        let mut chars = item.chars();
        let name = chars
            .next()
            .filter(char::is_ascii_alphabetic)
            .ok_or(ScramError::Malformed("attribute expected"))?;
        let value = chars
            .as_str()
            .strip_prefix('=')
            .ok_or(ScramError::Malformed(
                "'=' expected after an attribute name",
            ))?;
        self.0 = match rest {
            // A trailing comma would leave an empty attribute: that is malformed, not the end.
            Some("") => return Err(ScramError::Malformed("empty attribute")),
            Some(rest) => rest,
            None => "",
        };
        Ok((name, value))
    }

    /// The next attribute, which must be `name`.
    pub(crate) fn next_value(&mut self, name: char) -> Result<&'a str, ScramError> {
        match self.next_any()? {
            (n, value) if n == name => Ok(value),
            _ => Err(ScramError::Malformed("unexpected attribute")),
        }
    }
}
