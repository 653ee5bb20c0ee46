//! The front door: accepts client connections, speaks the startup phase of the Postgres protocol,
//! finds the endpoint, asks the compute manager for a running compute and relays bytes.

mod config;
mod conn;
mod error;
mod metrics;
pub mod options;
pub mod passthrough;
mod server;
pub mod wire;

pub use config::ProxyConfig;
pub use error::{ClientResponse, ProxyError};
pub use metrics::ProxyMetrics;
pub use server::Proxy;
