//! The SCRAM-SHA-256 primitives: H, HMAC, XOR, and a constant-time comparison.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

pub(crate) const KEY_LEN: usize = 32;

pub(crate) type Key = [u8; KEY_LEN];

/// The ClientKey of a role (`HMAC(SaltedPassword, "Client Key")`): enough to log in as the
/// role to any server holding its verifier, so it lives only as long as one login, is wiped
/// when dropped and never printed.
pub struct ClientKey(Key);

impl ClientKey {
    pub(crate) fn new(key: Key) -> Self {
        Self(key)
    }

    pub(crate) fn as_bytes(&self) -> &Key {
        &self.0
    }
}

impl Drop for ClientKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKey(..)")
    }
}

pub(crate) fn sha256(data: &[u8]) -> Key {
    Sha256::digest(data).into()
}

pub(crate) fn hmac(key: &[u8], parts: &[&[u8]]) -> Key {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

pub(crate) fn xor(a: &Key, b: &Key) -> Key {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// Equality that takes the same time wherever the first difference is.
pub(crate) fn ct_eq(a: &Key, b: &Key) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// `Hi(password, salt, i)` (PBKDF2-HMAC-SHA-256 with one block), for building test verifiers.
#[cfg(test)]
pub(crate) fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> Key {
    let mut u = hmac(password, &[salt, &[0, 0, 0, 1]]);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &[&u]);
        out = xor(&out, &u);
    }
    out
}
