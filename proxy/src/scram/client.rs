//! The client side of SCRAM-SHA-256 towards a compute, with the ClientKey instead of the
//! password. The proof needs only `ClientKey` and `StoredKey = H(ClientKey)`; checking the
//! compute's signature needs the ServerKey from the verifier, so a server that does not hold
//! the role's verifier cannot pass for the compute.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;

use super::keys::{ct_eq, hmac, sha256, xor, ClientKey};
use super::server::{Attrs, MAX_MESSAGE_LEN};
use super::verifier::{decode_key, Verifier};
use super::ScramError;

/// Random bytes in our nonce (libpq uses 18).
const NONCE_LEN: usize = 18;
/// The GS2 header we send: no channel binding. The compute connection is the proxy's own
/// (plain, or TLS verified against `[tls] compute_ca`), and the signature check below already
/// tells the real compute from an impostor.
const GS2_HEADER: &str = "n,,";

/// A login to the compute in progress.
pub struct ComputeLogin {
    client_key: ClientKey,
    verifier: Verifier,
    client_first_bare: String,
    nonce: String,
    auth_message: Option<String>,
}

impl std::fmt::Debug for ComputeLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeLogin").finish_non_exhaustive()
    }
}

impl ComputeLogin {
    /// Starts a login; [`Self::client_first`] is the SASLInitialResponse payload, with
    /// mechanism SCRAM-SHA-256.
    pub fn new(client_key: ClientKey, verifier: Verifier) -> Self {
        let mut raw = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        Self::with_nonce(client_key, verifier, B64.encode(raw))
    }

    pub(crate) fn with_nonce(client_key: ClientKey, verifier: Verifier, nonce: String) -> Self {
        Self {
            client_key,
            verifier,
            // The user name is empty, as libpq sends it: the server takes the startup user.
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            auth_message: None,
        }
    }

    pub fn client_first(&self) -> Vec<u8> {
        format!("{GS2_HEADER}{}", self.client_first_bare).into_bytes()
    }

    /// Reads the compute's server-first message (AuthenticationSASLContinue) and returns the
    /// client-final message with the proof.
    pub fn server_first(&mut self, message: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg = compute_text(message)?;
        let mut attrs = Attrs(msg);
        let malformed = |_| ScramError::Compute("malformed server-first message");
        let nonce = attrs.next_value('r').map_err(malformed)?;
        let salt = attrs.next_value('s').map_err(malformed)?;
        let iterations = attrs.next_value('i').map_err(malformed)?;
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(&self.nonce) {
            return Err(ScramError::Compute("server nonce does not extend ours"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::Compute("salt is not base64"))?;
        if salt != self.verifier.salt || iterations.parse() != Ok(self.verifier.iterations) {
            return Err(ScramError::Compute(
                "the compute's salt or iteration count differs from the verifier the proxy \
                 holds (the role's password changed at the compute)",
            ));
        }
        let without_proof = format!("c={},r={nonce}", B64.encode(GS2_HEADER));
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let stored_key = sha256(self.client_key.as_bytes());
        let signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let proof = xor(self.client_key.as_bytes(), &signature);
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the compute's server-final message (AuthenticationSASLFinal).
    pub fn server_final(&self, message: &[u8]) -> Result<(), ScramError> {
        let auth_message = self
            .auth_message
            .as_ref()
            .ok_or(ScramError::Compute("server-final before server-first"))?;
        let msg = compute_text(message)?;
        let mut attrs = Attrs(msg);
        let (name, value) = attrs
            .next_any()
            .map_err(|_| ScramError::Compute("malformed server-final message"))?;
        match name {
            'v' => {}
            'e' => return Err(ScramError::Compute("the compute refused the proof")),
            _ => return Err(ScramError::Compute("malformed server-final message")),
        }
        let signature =
            decode_key(value).ok_or(ScramError::Compute("malformed server signature"))?;
        let expected = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        if !ct_eq(&signature, &expected) {
            return Err(ScramError::ComputeSignature);
        }
        Ok(())
    }
}

fn compute_text(message: &[u8]) -> Result<&str, ScramError> {
    if message.len() > MAX_MESSAGE_LEN {
        return Err(ScramError::Compute("SCRAM message too long"));
    }
    std::str::from_utf8(message).map_err(|_| ScramError::Compute("SCRAM message is not UTF-8"))
}
