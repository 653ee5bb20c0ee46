//! The front door: accepts client connections, speaks the startup phase of the Postgres protocol,
//! finds the endpoint, asks the compute manager for a running compute and relays bytes.

pub mod admin;
mod auth;
pub mod cancel;
mod compute;
mod config;
mod conn;
mod error;
pub mod fd;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod limits;
pub mod listener;
pub mod login;
mod metrics;
pub mod options;
pub mod passthrough;
pub mod proxy_protocol;
mod relay;
pub mod scram;
mod server;
pub mod serverless;
mod shared;
mod spare;
mod stream;
pub mod throttle;
pub mod tls;
pub mod verifiers;
pub mod wire;

pub use admin::Health;
pub use config::{ProxyConfig, TcpKeepaliveConfig};
pub use error::{ClientResponse, ProxyError};
pub use limits::LimitsConfig;
pub use login::{Auth, AuthConfig};
pub use metrics::ProxyMetrics;
pub use proxy_protocol::ProxyProtocolMode;
pub use relay::default_threads as default_relay_threads;
pub use shared::{Proxy, ProxyParts};
