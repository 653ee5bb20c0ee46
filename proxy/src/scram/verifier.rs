//! The SCRAM-SHA-256 verifier of a role, in the form `pg_authid.rolpassword` stores it:
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 fields).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use super::keys::{Key, KEY_LEN};

/// Iteration counts accepted in a verifier. PostgreSQL's default is 4096; the bound keeps a
/// hostile roles file from making the cleartext-password path (which runs `Hi` itself) cost
/// seconds per login.
pub const MAX_ITERATIONS: u32 = 1_000_000;
/// Salt lengths accepted (decoded bytes). PostgreSQL generates 16.
pub const MAX_SALT_LEN: usize = 1024;

/// A role's SCRAM-SHA-256 verifier. Knowing it lets the proxy check a client's proof and
/// recognise the real compute, but not log in: that takes the ClientKey, which only a client
/// that knows the password can send.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub(crate) iterations: u32,
    pub(crate) salt: Vec<u8>,
    pub(crate) stored_key: Key,
    pub(crate) server_key: Key,
}

/// Why a string is not a usable verifier. The text never contains the string itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifierError {
    #[error(
        "not a SCRAM-SHA-256 verifier (md5 and plain passwords cannot be checked at the proxy)"
    )]
    NotScram,
    #[error("malformed SCRAM-SHA-256 verifier: {0}")]
    Malformed(&'static str),
    #[error("SCRAM-SHA-256 verifier iteration count is 0 or above {MAX_ITERATIONS}")]
    Iterations,
    #[error("SCRAM-SHA-256 verifier salt is empty or longer than {MAX_SALT_LEN} bytes")]
    Salt,
}

impl Verifier {
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// The verifier PostgreSQL would store for this password, salt and iteration count
    /// (without SASLprep: tests use ASCII passwords).
    #[cfg(test)]
    pub(crate) fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        use super::keys::{hmac, salted_password, sha256};
        let salted = salted_password(password.as_bytes(), salt, iterations);
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&hmac(&salted, &[b"Client Key"])),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }
}

impl FromStr for Verifier {
    type Err = VerifierError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(VerifierError::NotScram)?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(VerifierError::Malformed("no '$' before the keys"))?;
        let (iterations, salt) = params.split_once(':').ok_or(VerifierError::Malformed(
            "no ':' between iterations and salt",
        ))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or(VerifierError::Malformed("no ':' between the keys"))?;
        if !iterations.bytes().all(|b| b.is_ascii_digit()) || iterations.len() > 10 {
            return Err(VerifierError::Iterations);
        }
        let iterations: u32 = iterations.parse().map_err(|_| VerifierError::Iterations)?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(VerifierError::Iterations);
        }
        // Base64 of MAX_SALT_LEN bytes; checked before decoding so nothing large is allocated.
        if salt.is_empty() || salt.len() > MAX_SALT_LEN.div_ceil(3) * 4 {
            return Err(VerifierError::Salt);
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| VerifierError::Malformed("salt is not base64"))?;
        if salt.is_empty() || salt.len() > MAX_SALT_LEN {
            return Err(VerifierError::Salt);
        }
        Ok(Self {
            iterations,
            salt,
            stored_key: decode_key(stored_key).ok_or(VerifierError::Malformed(
                "StoredKey is not 32 bytes of base64",
            ))?,
            server_key: decode_key(server_key).ok_or(VerifierError::Malformed(
                "ServerKey is not 32 bytes of base64",
            ))?,
        })
    }
}

pub(crate) fn decode_key(s: &str) -> Option<Key> {
    // 32 bytes are 44 base64 characters; anything longer is refused before decoding.
    if s.len() != KEY_LEN.div_ceil(3) * 4 {
        return None;
    }
    B64.decode(s).ok()?.try_into().ok()
}

impl fmt::Display for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// Only the public parameters: a verifier is not a secret one can log in with, but it allows
/// an offline guessing attack, so logs never show the keys.
impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}
