//! `tls-server-end-point` channel binding data (RFC 5929 §4.1): the hash of the certificate
//! the server presented, with the hash of the certificate's own signature algorithm (SHA-256
//! when that is MD5 or SHA-1). A client that checks it knows no one between it and the proxy
//! re-terminated TLS with another certificate.

use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::tls::x509::{signature_algorithm, DerError};

impl From<DerError> for ChannelBindingError {
    fn from(e: DerError) -> Self {
        Self::Certificate(e.to_string())
    }
}

/// 1.2.840.113549.1.1.x: PKCS #1 RSA signatures.
const RSA_PKCS1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
/// 1.2.840.10045.4: ECDSA signatures.
const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelBindingError {
    /// The certificate could not be read (the text is for operators' logs).
    #[error("{0}")]
    Certificate(String),
    /// Ed25519, RSA-PSS and the like: no hash RFC 5929 could use (PostgreSQL refuses channel
    /// binding with such certificates too), so SCRAM-SHA-256-PLUS is not offered.
    #[error("the certificate's signature algorithm has no hash for tls-server-end-point")]
    UnsupportedSignature,
}

#[derive(Clone, Copy)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

/// The channel binding data for the DER leaf certificate the proxy presents.
pub fn tls_server_end_point(cert_der: &[u8]) -> Result<Vec<u8>, ChannelBindingError> {
    let hash = hash_for(signature_algorithm(cert_der)?)?;
    Ok(match hash {
        Hash::Sha256 => Sha256::digest(cert_der).to_vec(),
        Hash::Sha384 => Sha384::digest(cert_der).to_vec(),
        Hash::Sha512 => Sha512::digest(cert_der).to_vec(),
    })
}

fn hash_for(oid: &[u8]) -> Result<Hash, ChannelBindingError> {
    let unsupported = Err(ChannelBindingError::UnsupportedSignature);
    if let Some(&[n]) = oid.strip_prefix(RSA_PKCS1) {
        return match n {
            // md5WithRSA, sha1WithRSA: upgraded to SHA-256 as the RFC says.
            4 | 5 | 11 => Ok(Hash::Sha256),
            12 => Ok(Hash::Sha384),
            13 => Ok(Hash::Sha512),
            _ => unsupported,
        };
    }
    if oid == ECDSA_SHA1 {
        return Ok(Hash::Sha256);
    }
    if let Some(&[n]) = oid.strip_prefix(ECDSA_SHA2) {
        return match n {
            2 => Ok(Hash::Sha256),
            3 => Ok(Hash::Sha384),
            4 => Ok(Hash::Sha512),
            _ => unsupported,
        };
    }
    unsupported
}
