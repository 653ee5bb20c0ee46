//! The exchange for an endpoint or role the proxy has no verifier for. It must not differ
//! from a real one in anything a client sees: the salt and iteration count are the same on
//! every attempt (a changing salt would give it away), the messages have the same shapes, and
//! it fails at the proof with the wrong-password error, after the same amount of work.

use rand::RngCore;

use super::keys::{hmac, Key, KEY_LEN};
use super::server::{ChannelBinding, ServerExchange};
use super::verifier::Verifier;

/// The iteration count of every mock verifier: PostgreSQL's default, which nearly every real
/// verifier has, so that the count does not single out the fakes.
const MOCK_ITERATIONS: u32 = 4096;
/// PostgreSQL's salt length.
const MOCK_SALT_LEN: usize = 16;

/// The per-process key the fake salts are derived from. Random at start: the fakes are
/// stable for the life of the process, and not predictable from outside.
pub struct MockSecret(Key);

impl MockSecret {
    pub fn random() -> Self {
        let mut key = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self(key)
    }

    #[cfg(test)]
    pub(crate) fn from_bytes(key: Key) -> Self {
        Self(key)
    }

    /// The fake verifier of `role` at `endpoint`.
    pub fn verifier(&self, endpoint: &str, role: &str) -> Verifier {
        let derive = |label: &[u8]| {
            hmac(
                &self.0,
                &[label, &[0], endpoint.as_bytes(), &[0], role.as_bytes()],
            )
        };
        Verifier {
            iterations: MOCK_ITERATIONS,
            salt: derive(b"salt")[..MOCK_SALT_LEN].to_vec(),
            stored_key: derive(b"stored key"),
            server_key: derive(b"server key"),
        }
    }

    /// An exchange that always ends in [`super::ScramError::AuthFailed`].
    pub fn exchange(&self, endpoint: &str, role: &str, cb: ChannelBinding) -> ServerExchange {
        ServerExchange::mock(self.verifier(endpoint, role), cb)
    }
}

impl std::fmt::Debug for MockSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MockSecret(..)")
    }
}
