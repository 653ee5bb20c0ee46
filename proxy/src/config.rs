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
    /// Sessions at once: connections past their StartupMessage (those before it count under
    /// `[limits] max_pending_startups`); more are refused with 53300.
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
    /// TCP keepalive on client sockets, so that a client machine that vanished (powered off,
    /// dropped off the network) ends its session and lets its compute suspend.
    #[serde(default)]
    pub tcp_keepalive: TcpKeepaliveConfig,
    /// Threads that client sessions run on, each session on one of them from accept to close
    /// (see `relay`). Unset: one per core. 0: sessions run on the main runtime with everything
    /// else, as before there were relay threads.
    #[serde(default)]
    pub relay_threads: Option<usize>,
    /// For an endpoint whose sessions start less than this apart, one compute connection is
    /// opened ahead of the next client and closed unused at this age; `0s`: none. Keep it well
    /// under the computes' `authentication_timeout` (60 s by default).
    #[serde(default = "default_spare_max_age", with = "humantime_serde")]
    pub spare_max_age: Duration,
}

/// `[proxy.tcp_keepalive]`: probes start after `idle` without traffic, every `interval`, and
/// the connection is dropped after `count` unanswered ones. `idle = "0s"` turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpKeepaliveConfig {
    #[serde(default = "default_keepalive_idle", with = "humantime_serde")]
    pub idle: Duration,
    #[serde(default = "default_keepalive_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_keepalive_count")]
    pub count: u32,
}

impl TcpKeepaliveConfig {
    pub fn enabled(&self) -> bool {
        !self.idle.is_zero()
    }

    /// Turns keepalive on for `tcp` with these parameters (nothing when disabled). On a
    /// listening socket, every connection it accepts inherits them (Linux).
    pub fn apply<S: std::os::fd::AsFd>(&self, tcp: &S) -> std::io::Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        // The kernel counts in whole seconds and refuses 0.
        let secs = |d: Duration| Duration::from_secs(d.as_secs().max(1));
        let params = socket2::TcpKeepalive::new()
            .with_time(secs(self.idle))
            .with_interval(secs(self.interval))
            .with_retries(self.count.max(1));
        socket2::SockRef::from(tcp).set_tcp_keepalive(&params)
    }
}

impl Default for TcpKeepaliveConfig {
    fn default() -> Self {
        Self {
            idle: default_keepalive_idle(),
            interval: default_keepalive_interval(),
            count: default_keepalive_count(),
        }
    }
}

fn default_keepalive_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_keepalive_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalive_count() -> u32 {
    6
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
fn default_spare_max_age() -> Duration {
    Duration::from_secs(10)
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
            tcp_keepalive: TcpKeepaliveConfig::default(),
            auth_timeout: default_auth_timeout(),
            relay_threads: None,
            spare_max_age: default_spare_max_age(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_is_set_on_a_socket_with_the_configured_parameters() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        let sock = socket2::SockRef::from(&accepted);
        assert!(!sock.keepalive().unwrap(), "off until configured");

        let cfg: TcpKeepaliveConfig =
            toml::from_str("idle = \"7s\"\ninterval = \"3s\"\ncount = 4").unwrap();
        cfg.apply(&accepted).unwrap();
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 4);

        let (accepted2, _) = {
            let _c2 = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            l.accept().await.unwrap()
        };
        let off: TcpKeepaliveConfig = toml::from_str("idle = \"0s\"").unwrap();
        off.apply(&accepted2).unwrap();
        assert!(!socket2::SockRef::from(&accepted2).keepalive().unwrap());
        drop(client);
    }

    /// pgwake sets these on its listener only (`listener::bind_clients`) and relies on the
    /// kernel copying them into each accepted socket; this is that assumption, checked on the
    /// machine that runs it.
    #[tokio::test]
    async fn a_listeners_keepalive_and_nodelay_pass_to_the_sockets_it_accepts() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg: TcpKeepaliveConfig =
            toml::from_str("idle = \"9s\"\ninterval = \"2s\"\ncount = 3").unwrap();
        cfg.apply(&l).unwrap();
        socket2::SockRef::from(&l).set_tcp_nodelay(true).unwrap();
        let _client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(9));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 3);
        assert!(sock.tcp_nodelay().unwrap());
    }

    #[test]
    fn keepalive_defaults() {
        let d = ProxyConfig::default().tcp_keepalive;
        assert_eq!(
            (d.idle, d.interval, d.count),
            (Duration::from_secs(60), Duration::from_secs(10), 6)
        );
        assert!(d.enabled());
    }
}
