use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::proxy_protocol::ProxyProtocolMode;

/// The `[proxy]` table of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// From accept to a complete StartupMessage (including SSL negotiation). A client that
    /// is slower is disconnected without a message, as Postgres does on
    /// `authentication_timeout`.
    #[serde(default = "default_startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// TCP connect to a compute that the manager reported running.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Client connections at once, in every state; more are refused with 53300.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// On shutdown, how long live sessions may continue before they are cut.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// PROXY protocol (v1 and v2) on the listener: off, optional or required.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocolMode,
    /// Peer listener for CancelRequests forwarded by other replicas: it accepts nothing else
    /// and checks them against this replica's sessions only (it never forwards again).
    #[serde(default)]
    pub cancel_listen: Option<SocketAddr>,
    /// Where a CancelRequest whose key this replica did not issue is forwarded: "host:port"
    /// entries, each resolved at forward time (a headless Service name yields every replica).
    #[serde(default)]
    pub cancel_peers: Vec<String>,
    /// The login exchange at the proxy (SCRAM endpoints), from the first authentication
    /// request to the proof: a client that stops at the challenge is closed, and never holds
    /// a compute.
    #[serde(default = "default_auth_timeout", with = "humantime_serde")]
    pub auth_timeout: Duration,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4432))
}
fn default_startup_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_auth_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            startup_timeout: default_startup_timeout(),
            connect_timeout: default_connect_timeout(),
            max_connections: default_max_connections(),
            drain_timeout: default_drain_timeout(),
            proxy_protocol: ProxyProtocolMode::Off,
            cancel_listen: None,
            cancel_peers: Vec::new(),
            auth_timeout: default_auth_timeout(),
        }
    }
}
