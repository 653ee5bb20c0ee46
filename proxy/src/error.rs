use pgwake_compute_manager::{ErrorSource, WakeError};
use pgwake_router::{EndpointId, InvalidEndpointId};

use crate::options::OptionsError;
use crate::wire::WireError;

/// How to tell the client. `None` from [`ProxyError::client_response`] means close silently:
/// either the client is gone, or (like Postgres on `authentication_timeout`) there is nobody
/// useful to tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    pub sqlstate: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

/// Everything that can end a connection before or during forwarding.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("client i/o: {0}")]
    ClientIo(#[source] std::io::Error),
    #[error("client closed the connection during startup")]
    ClientGone,
    #[error("startup not completed within the startup timeout")]
    StartupTimeout,
    #[error("protocol violation: {0}")]
    Wire(#[from] WireError),
    #[error("too many SSL/GSS negotiation requests")]
    NegotiationLoop,
    #[error("startup message has no user")]
    NoUser,
    #[error("no endpoint id in the connection")]
    NoEndpoint,
    #[error("invalid endpoint id: {0}")]
    InvalidEndpoint(#[from] InvalidEndpointId),
    #[error("bad options: {0}")]
    Options(#[from] OptionsError),
    #[error("endpoint {0} not found")]
    UnknownEndpoint(EndpointId),
    #[error("endpoint {endpoint}: {source}")]
    Wake {
        endpoint: EndpointId,
        #[source]
        source: WakeError,
    },
    #[error("endpoint {endpoint}: connect to compute {addr}: {source}")]
    ComputeConnect {
        endpoint: EndpointId,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("too many connections")]
    TooManyConnections,
    #[error("too many connections still in their startup")]
    TooManyPendingStartups,
    #[error("too many connections from the client address")]
    TooManyFromAddress,
    #[error("{0}")]
    ProxyHeader(#[source] crate::proxy_protocol::ProxyHeaderError),
    #[error("client address over its connection rate")]
    RateLimited,
    #[error("endpoint {0}: client address not in the allowlist")]
    NotAllowed(EndpointId),
    #[error("endpoint {0}: connection limit reached")]
    EndpointFull(EndpointId),
    #[error("TLS: {0}")]
    Tls(#[source] crate::tls::TlsError),
    #[error("SNI: {0}")]
    Sni(#[from] crate::tls::SniError),
    #[error("endpoint {sni} from SNI differs from endpoint {options} in options")]
    EndpointConflict {
        sni: EndpointId,
        options: EndpointId,
    },
    #[error("plaintext connection refused: TLS is required")]
    TlsRequired,
    #[error("SSLRequest or GSSENCRequest inside TLS")]
    NegotiationInTls,
    #[error("login: {0}")]
    Login(#[from] crate::login::LoginError),
    #[error("endpoint {endpoint}: compute protocol: {source}")]
    ComputeProtocol {
        endpoint: EndpointId,
        #[source]
        source: std::io::Error,
    },
}

impl ProxyError {
    pub fn source_side(&self) -> ErrorSource {
        match self {
            Self::ClientIo(_)
            | Self::ClientGone
            | Self::StartupTimeout
            | Self::Wire(_)
            | Self::NegotiationLoop
            | Self::NoUser
            | Self::NoEndpoint
            | Self::InvalidEndpoint(_)
            | Self::Options(_)
            | Self::UnknownEndpoint(_)
            | Self::TooManyConnections
            | Self::TooManyPendingStartups
            | Self::TooManyFromAddress
            | Self::ProxyHeader(_)
            | Self::RateLimited
            | Self::NotAllowed(_)
            | Self::EndpointFull(_)
            | Self::Sni(_)
            | Self::EndpointConflict { .. }
            | Self::TlsRequired
            | Self::NegotiationInTls => ErrorSource::Client,
            Self::Tls(e) => e.source_side(),
            Self::Login(_) => ErrorSource::Client,
            Self::Wake { source, .. } => source.source_side(),
            Self::ComputeConnect { .. } | Self::ComputeProtocol { .. } => ErrorSource::Compute,
        }
    }

    /// Whether a client retrying the same connection later may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Wake { source, .. } => source.retryable(),
            Self::ComputeConnect { .. }
            | Self::ComputeProtocol { .. }
            | Self::TooManyConnections
            | Self::TooManyPendingStartups
            | Self::TooManyFromAddress
            | Self::RateLimited
            | Self::EndpointFull(_)
            | Self::ClientIo(_)
            | Self::Login(crate::login::LoginError::Throttled(_)) => true,
            _ => false,
        }
    }

    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ClientIo(_) => "client_io",
            Self::Login(e) => e.kind(),
            Self::ClientGone => "client_gone",
            Self::StartupTimeout => "startup_timeout",
            Self::Wire(_) | Self::NegotiationLoop => "protocol",
            Self::NoUser => "no_user",
            Self::NoEndpoint => "no_endpoint",
            Self::InvalidEndpoint(_) | Self::Options(_) => "bad_endpoint",
            Self::UnknownEndpoint(_) => "unknown_endpoint",
            Self::Wake { .. } => "wake",
            Self::ComputeConnect { .. } => "compute_connect",
            Self::TooManyConnections => "too_many_connections",
            Self::TooManyPendingStartups => "too_many_pending_startups",
            Self::TooManyFromAddress => "too_many_per_ip",
            Self::ProxyHeader(_) => "proxy_header",
            Self::RateLimited => "rate_limited",
            Self::NotAllowed(_) => "not_allowed",
            Self::EndpointFull(_) => "endpoint_full",
            Self::ComputeProtocol { .. } => "compute_protocol",
            Self::Tls(e) => e.kind(),
            Self::Sni(_) => "bad_sni",
            Self::EndpointConflict { .. } => "endpoint_conflict",
            Self::TlsRequired => "tls_required",
            Self::NegotiationInTls => "protocol",
        }
    }

    pub fn client_response(&self) -> Option<ClientResponse> {
        let r = |sqlstate, message: String, hint: Option<&str>| {
            Some(ClientResponse {
                sqlstate,
                message,
                hint: hint.map(str::to_string),
            })
        };
        match self {
            // A bad PROXY header comes from a misconfigured load balancer, which would not
            // understand a Postgres message either.
            // A failed TLS handshake leaves no channel a Postgres message could go through.
            Self::ClientIo(_)
            | Self::ClientGone
            | Self::StartupTimeout
            | Self::ProxyHeader(_)
            | Self::Tls(_) => None,
            Self::Sni(e) => r("08004", format!("{e}"), None),
            Self::Login(e) => e.client_response().map(|(sqlstate, message, hint)| ClientResponse {
                sqlstate,
                message,
                hint,
            }),
            Self::EndpointConflict { sni, options } => r(
                "08004",
                format!(
                    "the host name selects endpoint \"{sni}\" but options select endpoint \"{options}\""
                ),
                Some("Remove endpoint= from options, or connect to the endpoint's own host name."),
            ),
            Self::TlsRequired => r("28000", "this server requires TLS (sslmode=require)".into(), None),
            Self::NegotiationInTls => r("08P01", "encryption negotiation inside TLS".into(), None),
            Self::Wire(WireError::UnsupportedProtocol { major, minor }) => r(
                "0A000",
                format!("unsupported frontend protocol {major}.{minor}: only protocol 3 is supported"),
                None,
            ),
            Self::Wire(e) => r("08P01", format!("invalid startup packet: {e}"), None),
            Self::NegotiationLoop => r("08P01", "too many encryption negotiation requests".into(), None),
            Self::NoUser => r("28000", "no PostgreSQL user name specified in startup packet".into(), None),
            Self::NoEndpoint => r(
                "08004",
                "endpoint ID is not specified".into(),
                Some(
                    "Connect to the endpoint's host name (<id>.<domain>) with TLS so the proxy \
                     sees it via SNI, or pass options='endpoint=<id>' in the connection string \
                     (PGOPTIONS='endpoint=<id>').",
                ),
            ),
            Self::InvalidEndpoint(e) => r("08004", format!("invalid endpoint ID: {e}"), None),
            Self::Options(e) => r("08004", format!("invalid endpoint option: {e}"), None),
            Self::UnknownEndpoint(id) => r("3D000", format!("endpoint \"{id}\" does not exist"), None),
            Self::Wake { endpoint, source } => {
                let code = match source {
                    WakeError::QueueFull | WakeError::RateLimited => "53300",
                    WakeError::ShuttingDown => "57P01",
                    e if e.retryable() => "57P03",
                    _ => "08006",
                };
                r(code, format!("endpoint \"{endpoint}\": {}", source.user_message()), None)
            }
            Self::ComputeConnect { endpoint, .. } => r(
                "08006",
                format!("endpoint \"{endpoint}\": could not connect to the compute"),
                None,
            ),
            Self::TooManyConnections => r("53300", "too many connections to the proxy".into(), None),
            Self::TooManyPendingStartups => r(
                "53300",
                "too many connections to the proxy are still starting up; retry later".into(),
                None,
            ),
            Self::TooManyFromAddress => r(
                "53300",
                "too many connections from this address".into(),
                None,
            ),
            Self::RateLimited => r(
                "53300",
                "too many new connections from this address; retry later".into(),
                None,
            ),
            Self::NotAllowed(id) => r(
                "28000",
                format!("endpoint \"{id}\": connections from this address are not allowed"),
                None,
            ),
            Self::EndpointFull(id) => r(
                "53300",
                format!("endpoint \"{id}\": too many connections"),
                None,
            ),
            Self::ComputeProtocol { endpoint, .. } => r(
                "08006",
                format!("endpoint \"{endpoint}\": the compute closed the connection during start-up"),
                None,
            ),
        }
    }
}
