//! The config file: one TOML document, every section with defaults, and a loader that reports
//! every problem at once instead of stopping at the first.

use std::path::Path;
use std::time::Duration;

use pgwake_compute_manager::kubernetes::leader::{
    DEFAULT_LEASE_DURATION, DEFAULT_LEASE_NAME, DEFAULT_RENEW_DEADLINE, DEFAULT_RETRY_PERIOD,
};
use pgwake_compute_manager::kubernetes::KubernetesConfig;
use pgwake_compute_manager::{LeaderConfig, LocalConfig, ManagerConfig};
use pgwake_proxy::tls::TlsConfig;
use pgwake_proxy::verifiers::EndpointAuth;
use pgwake_proxy::{AuthConfig, LimitsConfig, ProxyConfig};
use pgwake_router::{EndpointConfig, RoutingTable};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub compute: ComputeConfig,
    #[serde(default)]
    pub local: LocalConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub manager: ManagerServiceConfig,
    /// Present: the Kubernetes backend is enabled (and, unless `watch_endpoints = false`,
    /// `PgwakeEndpoint` resources feed the routing table).
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
    #[serde(default, rename = "endpoint")]
    pub endpoints: Vec<EndpointConfig>,
    /// Logins at the proxy (`[auth]`).
    #[serde(default)]
    pub auth: AuthConfig,
    /// The auth keys (`auth`, `roles_file`) of the same `[[endpoint]]` tables.
    #[serde(skip)]
    pub endpoint_auth: Vec<EndpointAuth>,
}

/// The `[admin]` table: the HTTP listener for `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Unset: no admin listener.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// The `[compute]` table: lifecycle policy shared by every backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeConfig {
    #[serde(default = "d_wake_timeout", with = "humantime_serde")]
    pub wake_timeout: Duration,
    #[serde(default = "d_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(default = "d_max_waiting")]
    pub max_waiting_per_endpoint: usize,
    #[serde(default)]
    pub max_starts_per_minute: u32,
    /// A shared compute manager service (`http://host:port`). Unset: the in-process manager
    /// (the embedded default). When set, this pgwake never starts computes itself.
    #[serde(default)]
    pub manager_url: Option<String>,
    /// With `manager_url`: how often this proxy reports its live sessions per endpoint to the
    /// manager, which keeps their computes from an idle suspend (each report holds for three
    /// intervals). Keep it well under the smallest `idle_timeout`: a new session is only
    /// covered by its wake until the next report.
    #[serde(default = "d_activity_interval", with = "humantime_serde")]
    pub activity_interval: Duration,
}

/// The `[manager]` table: serve the compute manager's HTTP API to other pgwake proxies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerServiceConfig {
    /// Unset: no API listener.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
    /// Several manager replicas, one leader (a `coordination.k8s.io` Lease in the
    /// `[kubernetes]` namespace): the others refuse wakes and report not ready until they win
    /// the Lease. Needs `listen` and `[kubernetes]`.
    #[serde(default)]
    pub leader_election: bool,
    #[serde(default = "d_lease_name")]
    pub lease_name: String,
    /// This replica's name in the Lease; unset: the `HOSTNAME` environment variable (the pod
    /// name in Kubernetes).
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default = "d_lease_duration", with = "humantime_serde")]
    pub lease_duration: Duration,
    #[serde(default = "d_renew_deadline", with = "humantime_serde")]
    pub renew_deadline: Duration,
    #[serde(default = "d_retry_period", with = "humantime_serde")]
    pub retry_period: Duration,
}

fn d_lease_name() -> String {
    DEFAULT_LEASE_NAME.into()
}
fn d_lease_duration() -> Duration {
    DEFAULT_LEASE_DURATION
}
fn d_renew_deadline() -> Duration {
    DEFAULT_RENEW_DEADLINE
}
fn d_retry_period() -> Duration {
    DEFAULT_RETRY_PERIOD
}

impl Default for ManagerServiceConfig {
    fn default() -> Self {
        Self {
            listen: None,
            leader_election: false,
            lease_name: d_lease_name(),
            identity: None,
            lease_duration: d_lease_duration(),
            renew_deadline: d_renew_deadline(),
            retry_period: d_retry_period(),
        }
    }
}

impl ManagerServiceConfig {
    /// The elector's settings; `hostname` (the `HOSTNAME` variable) names this replica unless
    /// `identity` does.
    pub fn leader_config(&self, hostname: Option<String>) -> Result<LeaderConfig, String> {
        let identity = self.identity.clone().or(hostname).ok_or_else(|| {
            "[manager]: leader_election needs identity or the HOSTNAME environment variable"
                .to_string()
        })?;
        Ok(LeaderConfig {
            lease_name: self.lease_name.clone(),
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
            ..LeaderConfig::new(identity)
        })
    }
}

fn d_wake_timeout() -> Duration {
    ManagerConfig::default().wake_timeout
}
fn d_idle_timeout() -> Duration {
    ManagerConfig::default().idle_timeout
}
fn d_activity_interval() -> Duration {
    Duration::from_secs(5)
}
fn d_max_waiting() -> usize {
    ManagerConfig::default().max_waiting_per_endpoint
}

impl Default for ComputeConfig {
    fn default() -> Self {
        Self {
            wake_timeout: d_wake_timeout(),
            idle_timeout: d_idle_timeout(),
            max_waiting_per_endpoint: d_max_waiting(),
            max_starts_per_minute: 0,
            manager_url: None,
            activity_interval: d_activity_interval(),
        }
    }
}

impl From<&ComputeConfig> for ManagerConfig {
    fn from(c: &ComputeConfig) -> Self {
        ManagerConfig {
            wake_timeout: c.wake_timeout,
            idle_timeout: c.idle_timeout,
            max_waiting_per_endpoint: c.max_waiting_per_endpoint,
            max_starts_per_minute: c.max_starts_per_minute,
        }
    }
}

/// Every problem found in a config file, one line each.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

/// Keys an `[[endpoint]]` may have; checked by hand because serde cannot deny unknown fields
/// through the `flatten` that endpoint entries use.
const ENDPOINT_KEYS: &[&str] = &[
    "id",
    "backend",
    "idle_timeout",
    "settings",
    "address",
    "allow",
    "max_connections",
    // Logins at the proxy (pgwake_proxy::verifiers).
    "auth",
    "roles_file",
    // backend = "kubernetes"
    "image",
    "port",
    "command",
    "args",
    "env",
    "env_secret",
    "requests",
    "limits",
    "storage",
    "storage_class",
];

impl Config {
    /// Through a shared manager a new session is covered by its wake only until this replica's
    /// next activity report; for computes that cannot count their own clients (Kubernetes), an
    /// idle timeout shorter than two report intervals could suspend the compute under it.
    /// Returns `(activity_interval, shortest idle_timeout in this file)` when that is so.
    /// Not an error: local computes are also guarded by their own client count, and the
    /// manager's idle timeouts may be configured elsewhere.
    pub fn slow_activity_reports(&self) -> Option<(Duration, Duration)> {
        let c = &self.compute;
        c.manager_url.as_ref()?;
        let shortest = self
            .endpoints
            .iter()
            .filter_map(|r| r.idle_timeout)
            .chain([c.idle_timeout])
            .min()?;
        (shortest < c.activity_interval * 2).then_some((c.activity_interval, shortest))
    }

    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
        Self::parse(&text).map_err(|ConfigErrors(errs)| {
            ConfigErrors(
                errs.into_iter()
                    .map(|e| format!("{}: {e}", path.display()))
                    .collect(),
            )
        })
    }

    pub fn parse(text: &str) -> Result<Self, ConfigErrors> {
        let raw: toml::Table =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        let mut errors = Vec::new();
        // Each section is deserialized on its own so that one bad section does not hide the
        // errors of the others.
        let section = |name: &str| {
            raw.get(name)
                .cloned()
                .unwrap_or(toml::Value::Table(Default::default()))
        };
        for key in raw.keys() {
            if ![
                "proxy",
                "compute",
                "local",
                "limits",
                "admin",
                "tls",
                "manager",
                "kubernetes",
                "endpoint",
                "auth",
            ]
            .contains(&key.as_str())
            {
                errors.push(format!("unknown section or key {key:?}"));
            }
        }
        let take = |name: &str, errors: &mut Vec<String>| -> Option<toml::Value> {
            let v = section(name);
            if !v.is_table() {
                errors.push(format!("{name}: expected a table"));
                return None;
            }
            Some(v)
        };
        let proxy = take("proxy", &mut errors).and_then(|v| {
            v.try_into::<ProxyConfig>()
                .map_err(|e| errors.push(format!("[proxy]: {}", e.message())))
                .ok()
        });
        let compute = take("compute", &mut errors).and_then(|v| {
            v.try_into::<ComputeConfig>()
                .map_err(|e| errors.push(format!("[compute]: {}", e.message())))
                .ok()
        });
        let local = take("local", &mut errors).and_then(|v| {
            v.try_into::<LocalConfig>()
                .map_err(|e| errors.push(format!("[local]: {}", e.message())))
                .ok()
        });
        let limits = take("limits", &mut errors).and_then(|v| {
            v.try_into::<LimitsConfig>()
                .map_err(|e| errors.push(format!("[limits]: {}", e.message())))
                .ok()
        });
        let admin = take("admin", &mut errors).and_then(|v| {
            v.try_into::<AdminConfig>()
                .map_err(|e| errors.push(format!("[admin]: {}", e.message())))
                .ok()
        });
        let tls = take("tls", &mut errors).and_then(|v| {
            v.try_into::<TlsConfig>()
                .map_err(|e| errors.push(format!("[tls]: {}", e.message())))
                .ok()
        });
        let auth = take("auth", &mut errors).and_then(|v| {
            v.try_into::<AuthConfig>()
                .map_err(|e| errors.push(format!("[auth]: {}", e.message())))
                .ok()
        });
        let manager = take("manager", &mut errors).and_then(|v| {
            v.try_into::<ManagerServiceConfig>()
                .map_err(|e| errors.push(format!("[manager]: {}", e.message())))
                .ok()
        });
        if let Some(c) = &compute {
            if let Some(u) = &c.manager_url {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    errors.push(format!(
                        "[compute]: manager_url {u:?} must be an http:// URL"
                    ));
                }
            }
        }
        let kubernetes = match raw.get("kubernetes") {
            None => Some(None),
            Some(v) => match v.clone().try_into::<KubernetesConfig>() {
                Ok(k) => {
                    errors.extend(
                        k.validate()
                            .into_iter()
                            .map(|e| format!("[kubernetes]: {e}")),
                    );
                    Some(Some(k))
                }
                Err(e) => {
                    errors.push(format!("[kubernetes]: {}", e.message()));
                    None
                }
            },
        };
        if let Some(t) = &tls {
            errors.extend(t.validate().into_iter().map(|e| format!("[tls]: {e}")));
        }
        if let Some(m) = manager.as_ref().filter(|m| m.leader_election) {
            if !matches!(kubernetes, Some(Some(_))) {
                errors.push(
                    "[manager]: leader_election needs a [kubernetes] section (the Lease lives in its namespace)"
                        .into(),
                );
            }
            if m.listen.is_none() {
                errors.push(
                    "[manager]: leader_election is for compute manager replicas: set listen".into(),
                );
            }
            if compute.as_ref().is_some_and(|c| c.manager_url.is_some()) {
                errors.push(
                    "[manager]: leader_election with [compute] manager_url: this pgwake wakes nothing itself"
                        .into(),
                );
            }
            // The identity comes from the environment at start; check everything else now.
            let placeholder = Some("identity-from-hostname".to_string());
            match m.leader_config(placeholder) {
                Ok(l) => errors.extend(l.validate().into_iter().map(|e| format!("[manager]: {e}"))),
                Err(e) => errors.push(e),
            }
        }
        let mut endpoints = Vec::new();
        let mut endpoint_auth = Vec::new();
        match raw.get("endpoint") {
            None => {}
            Some(toml::Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let label = item
                        .get("id")
                        .and_then(|v| v.as_str())
                        .map(|id| format!("[[endpoint]] #{} ({id:?})", i + 1))
                        .unwrap_or_else(|| format!("[[endpoint]] #{}", i + 1));
                    if let Some(t) = item.as_table() {
                        for k in t.keys() {
                            if !ENDPOINT_KEYS.contains(&k.as_str()) {
                                errors.push(format!("{label}: unknown key {k:?}"));
                            }
                        }
                    }
                    match item.clone().try_into::<EndpointConfig>() {
                        Ok(e) => endpoints.push(e),
                        Err(e) => errors.push(format!("{label}: {}", e.message())),
                    }
                    match item.clone().try_into::<EndpointAuth>() {
                        Ok(a) => endpoint_auth.push(a),
                        Err(e) => errors.push(format!("{label}: {}", e.message())),
                    }
                }
            }
            Some(_) => errors.push("endpoint: use [[endpoint]] tables".into()),
        }
        errors.extend(
            RoutingTable::validate(&endpoints)
                .into_iter()
                .map(|e| e.to_string()),
        );
        if let Some(c) = &compute {
            for (name, d) in [
                ("wake_timeout", c.wake_timeout),
                ("idle_timeout", c.idle_timeout),
                ("activity_interval", c.activity_interval),
            ] {
                if d.is_zero() {
                    errors.push(format!("[compute]: {name} must be more than 0"));
                }
            }
            if c.max_waiting_per_endpoint == 0 {
                errors.push("[compute]: max_waiting_per_endpoint must be at least 1".into());
            }
        }
        if let Some(p) = &proxy {
            if p.max_connections == 0 {
                errors.push("[proxy]: max_connections must be at least 1".into());
            }
            if p.startup_timeout.is_zero() {
                errors.push("[proxy]: startup_timeout must be more than 0".into());
            }
            for peer in &p.cancel_peers {
                let port = peer.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
                if !matches!(port, Some((h, Ok(_))) if !h.is_empty()) {
                    errors.push(format!(
                        "[proxy]: cancel_peers entry {peer:?} is not \"host:port\""
                    ));
                }
            }
        }
        if let Some(a) = &auth {
            if a.learn_interval.is_zero() {
                errors.push("[auth]: learn_interval must be more than 0".into());
            }
        }
        if let Some(l) = &limits {
            if l.connections_per_ip_per_second < 0.0 || l.connections_per_ip_burst < 0.0 {
                errors.push("[limits]: rates must not be negative".into());
            }
        }
        match (
            proxy, compute, local, limits, admin, tls, manager, kubernetes, auth,
        ) {
            (
                Some(proxy),
                Some(compute),
                Some(local),
                Some(limits),
                Some(admin),
                Some(tls),
                Some(manager),
                Some(kubernetes),
                Some(auth),
            ) if errors.is_empty() => Ok(Config {
                proxy,
                compute,
                local,
                limits,
                admin,
                tls,
                manager,
                kubernetes,
                endpoints,
                auth,
                endpoint_auth,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_configs_parse() {
        for f in ["config/local.toml", "config/full.toml"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            Config::load(&p).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }

    #[test]
    fn cancel_peers_are_host_port() {
        let c = Config::parse(
            r#"
            [proxy]
            cancel_listen = "0.0.0.0:5433"
            cancel_peers = ["pgwake-peers.pgwake.svc.cluster.local:5433", "10.0.0.1:5433", "[::1]:5433"]
            "#,
        )
        .unwrap();
        assert_eq!(c.proxy.cancel_listen.unwrap().port(), 5433);
        assert_eq!(c.proxy.cancel_peers.len(), 3);
        let d = Config::parse("").unwrap();
        assert!(d.proxy.cancel_listen.is_none() && d.proxy.cancel_peers.is_empty());

        let e = Config::parse(
            r#"
            [proxy]
            cancel_peers = ["pgwake-peers", ":5433", "host:http", "ok:1"]
            "#,
        )
        .unwrap_err()
        .to_string();
        for bad in ["pgwake-peers", ":5433", "host:http"] {
            assert!(e.contains(&format!("{bad:?}")), "{bad} reported: {e}");
        }
        assert!(!e.contains("\"ok:1\""), "{e}");
    }

    #[test]
    fn reports_slower_than_half_the_idle_timeout_are_flagged() {
        let cfg = |idle: &str| {
            Config::parse(&format!(
                r#"
                [compute]
                manager_url = "http://127.0.0.1:9188"
                activity_interval = "5s"
                [[endpoint]]
                id = "a"
                backend = "local"
                idle_timeout = "{idle}"
                "#
            ))
            .unwrap()
        };
        assert_eq!(
            cfg("9s").slow_activity_reports(),
            Some((Duration::from_secs(5), Duration::from_secs(9)))
        );
        assert_eq!(cfg("10s").slow_activity_reports(), None);
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let errs = Config::parse(
            r#"
            bogus = 1
            [proxy]
            listen = "not an address"
            [compute]
            idle_timeout = "0s"
            activity_interval = "0s"
            [local]
            colour = "blue"
            [[endpoint]]
            id = "Bad"
            backend = "local"
            [[endpoint]]
            id = "s"
            backend = "static"
            address = "nohost"
            [[endpoint]]
            id = "t"
            backend = "local"
            idel_timeout = "5s"
            "#,
        )
        .unwrap_err()
        .0;
        let all = errs.join("\n");
        for needle in [
            "bogus",
            "[proxy]",
            "idle_timeout must",
            "activity_interval must",
            "colour",
            "\"Bad\"",
            "nohost",
            "idel_timeout",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn leader_election_needs_kubernetes_and_a_manager_listener() {
        let all = Config::parse("[manager]\nleader_election = true\nrenew_deadline = \"20s\"\n")
            .unwrap_err()
            .0
            .join("\n");
        for needle in [
            "[kubernetes]",
            "set listen",
            "renew_deadline must be shorter",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        let c = Config::parse(
            "[manager]\nlisten = \"127.0.0.1:0\"\nleader_election = true\nidentity = \"m-1\"\n\
             [kubernetes]\nnamespace = \"pgwake\"\n",
        )
        .unwrap();
        let l = c.manager.leader_config(Some("from-env".into())).unwrap();
        assert_eq!(l.identity, "m-1");
        assert_eq!(l.lease_name, "pgwake-manager");
        assert_eq!(l.lease_duration, Duration::from_secs(15));
        assert_eq!(l.renew_deadline, Duration::from_secs(10));
        assert_eq!(l.retry_period, Duration::from_secs(2));
        let mut m = c.manager.clone();
        m.identity = None;
        assert_eq!(
            m.leader_config(Some("pod-a".into())).unwrap().identity,
            "pod-a"
        );
        assert!(m.leader_config(None).unwrap_err().contains("HOSTNAME"));
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:4432");
        assert_eq!(c.proxy.startup_timeout, Duration::from_secs(10));
        assert_eq!(c.compute.wake_timeout, Duration::from_secs(30));
        assert_eq!(c.compute.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.compute.activity_interval, Duration::from_secs(5));
        assert!(c.endpoints.is_empty());
    }
}
