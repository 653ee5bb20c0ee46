//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, on both sides of the proxy:
//! the server side towards clients ([`server`]), checked against the endpoint's stored
//! verifiers before anything is woken, and the client side towards the compute ([`client`]),
//! which logs in with the ClientKey recovered from the client's proof (no cleartext password
//! is ever seen or stored).
//!
//! Everything here is a pure function over bytes: no sockets, no clocks. Every input comes
//! from a client, a compute or a file, so malformed input is an error, never a panic.

mod channel_binding;
pub mod client;
mod keys;
mod mock;
pub mod sasl;
pub mod server;
mod verifier;

#[cfg(test)]
mod tests;

pub use channel_binding::{tls_server_end_point, ChannelBindingError};
pub use client::ComputeLogin;
pub use keys::ClientKey;
pub use mock::MockSecret;
pub use server::{ChannelBinding, Mechanism, ServerExchange, ServerFirst, Success};
pub use verifier::{Verifier, VerifierError};

/// Why an exchange failed. Each variant says whose fault it was; the user-facing text never
/// says which check failed beyond what PostgreSQL itself would say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The client broke the SCRAM message syntax (PostgreSQL: 08P01 "malformed SCRAM
    /// message").
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client asked for a mechanism or a channel binding this connection does not offer,
    /// or its channel binding data do not match this connection's.
    #[error("SCRAM channel binding: {0}")]
    ChannelBinding(&'static str),
    /// Wrong password, unknown role or unknown endpoint: deliberately one variant.
    #[error("password authentication failed")]
    AuthFailed,
    /// The compute's SCRAM messages do not fit the verifier the proxy holds (another salt or
    /// iteration count: the password changed at the compute and the proxy has not learned it),
    /// or are malformed.
    #[error("compute SCRAM exchange: {0}")]
    Compute(&'static str),
    /// The compute could not prove that it knows the verifier: not the compute the proxy
    /// meant to talk to, or its password changed.
    #[error("compute's SCRAM server signature does not match the verifier")]
    ComputeSignature,
}

impl ScramError {
    /// The SQLSTATE PostgreSQL uses for the same failure.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "08P01",
            Self::ChannelBinding(_) => "28000",
            Self::AuthFailed => "28P01",
            Self::Compute(_) | Self::ComputeSignature => "08006",
        }
    }

    /// Whether the client is to blame (for metrics and throttling).
    pub fn is_client_fault(&self) -> bool {
        matches!(
            self,
            Self::Malformed(_) | Self::ChannelBinding(_) | Self::AuthFailed
        )
    }
}

/// Checks a cleartext password (the `endpoint=ID;PASSWORD` fallback, where the client only
/// answers a cleartext request) by running the client's side of SCRAM with it against the
/// verifier, so it costs and fails exactly like a SCRAM login. The password itself goes no
/// further: the compute is logged in to with the returned ClientKey.
pub fn verify_password(exchange: ServerExchange, password: &[u8]) -> Result<ClientKey, ScramError> {
    use postgres_protocol::authentication::sasl::{self as pg, ScramSha256};
    let mut client = ScramSha256::new(password, pg::ChannelBinding::unsupported());
    let first =
        exchange.client_first(Mechanism::ScramSha256.name().as_bytes(), client.message())?;
    client
        .update(first.message())
        .map_err(|_| ScramError::AuthFailed)?;
    Ok(first.client_final(client.message())?.client_key)
}
