//! The config file: one TOML document, every section with defaults, and a loader that reports
//! every problem at once instead of stopping at the first.

use std::path::{Path, PathBuf};
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
use serde::de::DeserializeOwned;
use serde::Deserialize;

#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub compute: ComputeConfig,
    pub local: LocalConfig,
    pub limits: LimitsConfig,
    pub admin: AdminConfig,
    /// `[http]`: the serverless drivers' listener (Postgres over WebSocket).
    pub http: pgwake_proxy::serverless::HttpConfig,
    pub tls: TlsConfig,
    pub manager: ManagerServiceConfig,
    /// Present: the Kubernetes backend is enabled (and, unless `watch_endpoints = false`,
    /// `PgwakeEndpoint` resources feed the routing table).
    pub kubernetes: Option<KubernetesConfig>,
    /// The `[reload]` table: what a SIGHUP may do to the endpoint list.
    pub reload: ReloadConfig,
    /// The `[api]` table: the management API (endpoints and branches on demand).
    pub api: ApiConfig,
    /// The `[[endpoint]]` tables.
    pub endpoints: Vec<EndpointConfig>,
    /// The file as written (no defaults filled in): a reload compares it key by key to name
    /// what changed.
    pub(crate) file: toml::Table,
    /// Logins at the proxy (`[auth]`).
    pub auth: AuthConfig,
    /// The auth keys (`auth`, `roles_file`) of the `[[endpoint]]` tables, for the proxy's
    /// verifier store.
    pub endpoint_auth: Vec<EndpointAuth>,
}

/// The `[reload]` table. A file cut short while an editor or `cat > file` writes it parses as
/// a valid file with fewer (or no) endpoints; this is the guard against applying one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// A reload that would remove more than this share of the file's endpoints is refused
    /// (one that would remove all of them always is).
    #[serde(default = "d_max_removed_share")]
    pub max_removed_share: f64,
    /// Apply reloads of this file whatever they remove.
    #[serde(default)]
    pub force: bool,
}

fn d_max_removed_share() -> f64 {
    0.5
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            max_removed_share: d_max_removed_share(),
            force: false,
        }
    }
}

/// The `[api]` table: creating and deleting endpoints (and branches) through the compute
/// manager's HTTP API (`[manager] listen`), and what the connection strings it hands out say.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The bearer token of the management routes; prefer `management_token_file`. Neither
    /// set: the management routes are off (403).
    #[serde(default)]
    pub management_token: Option<String>,
    /// A file whose content (trimmed) is the token (a mounted Secret).
    #[serde(default)]
    pub management_token_file: Option<PathBuf>,
    /// The host clients use for the proxy in the connection strings; unset: the `[proxy]
    /// listen` address, or 127.0.0.1 when that is a wildcard.
    #[serde(default)]
    pub public_host: Option<String>,
    /// The port in the connection strings; unset: the proxy's listening port.
    #[serde(default)]
    pub public_port: Option<u16>,
    /// The user and database in the connection strings; unset: `[local] superuser`, `postgres`.
    #[serde(default)]
    pub connect_user: Option<String>,
    #[serde(default)]
    pub connect_dbname: Option<String>,
}

impl ApiConfig {
    /// The management token, read from its file if need be; `None` when none is configured.
    pub fn token(&self) -> Result<Option<String>, String> {
        match (&self.management_token, &self.management_token_file) {
            (Some(_), Some(_)) => {
                Err("set management_token or management_token_file, not both".into())
            }
            (Some(t), None) => Ok(Some(t.trim().to_string())),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| format!("management_token_file {}: {e}", path.display())),
            (None, None) => Ok(None),
        }
    }
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
    /// Light sleep for local computes: after `idle_timeout` an idle compute is frozen (its
    /// processes stopped, its memory kept, woken in milliseconds) and only stopped after this
    /// long frozen. `"0s"` (the default) stops it at once. Endpoints may override it.
    #[serde(default, with = "humantime_serde")]
    pub deep_sleep_after: Duration,
    /// The most memory frozen computes may hold together (bytes, or `"512MiB"`); past it the
    /// least recently used are stopped. 0: no limit.
    #[serde(default = "d_max_frozen_memory")]
    pub max_frozen_memory: pgwake_compute_manager::local::LogSize,
}

/// The `[manager]` table: serve the compute manager's HTTP API to other pgwake proxies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerServiceConfig {
    /// Unset: no API listener.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
    /// Several manager replicas, one leader (a `coordination.k8s.io` Lease in the
    /// `[kubernetes]` namespace): the others refuse wakes until they win the Lease; the leader
    /// labels its pod `pgwake.io/leader=true` for the Service. Needs `listen` and
    /// `[kubernetes]`.
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
fn d_max_frozen_memory() -> pgwake_compute_manager::local::LogSize {
    pgwake_compute_manager::local::LogSize(1 << 30)
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
            deep_sleep_after: Duration::ZERO,
            max_frozen_memory: d_max_frozen_memory(),
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
            deep_sleep_after: c.deep_sleep_after,
            max_frozen_memory: c.max_frozen_memory.0,
        }
    }
}

/// Every problem found in a config file, one line each.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

/// A top-level table of the config file. The loader deserializes each one on its own, so that
/// one bad section does not hide the errors of the others, then asks it for the problems serde
/// cannot see.
trait Section: DeserializeOwned + Default {
    /// What a file without this section means: every key at its default.
    fn absent() -> Result<Self, toml::de::Error> {
        toml::Value::Table(Default::default()).try_into()
    }

    /// Pushes one line per problem; the loader prefixes the section's name.
    fn validate(&self, _errors: &mut Vec<String>) {}
}

/// More sessions than this is a typo, not a machine.
const MAX_CONNECTIONS: usize = 10_000_000;

/// The largest `authentication_timeout` Postgres accepts: a spare compute connection older than
/// that has been closed by the compute.
const MAX_SPARE_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// More relay threads than this is a typo, not a machine.
const MAX_RELAY_THREADS: usize = 1024;

impl Section for ProxyConfig {
    fn validate(&self, errors: &mut Vec<String>) {
        if self.max_connections == 0 {
            errors.push("max_connections must be at least 1".into());
        }
        if self.max_connections > MAX_CONNECTIONS {
            // Each session holds two sockets: far past any fd limit, and past what the
            // session semaphore can count.
            errors.push(format!("max_connections must be at most {MAX_CONNECTIONS}"));
        }
        if self.startup_timeout.is_zero() {
            errors.push("startup_timeout must be more than 0".into());
        }
        if self.relay_threads.is_some_and(|n| n > MAX_RELAY_THREADS) {
            errors.push(format!(
                "relay_threads must be at most {MAX_RELAY_THREADS} (unset: one per core)"
            ));
        }
        if self.spare_max_age > MAX_SPARE_AGE {
            // Postgres's largest authentication_timeout: an older spare is always gone.
            errors.push(format!(
                "spare_max_age must be at most {}s (\"0s\": no spare connections)",
                MAX_SPARE_AGE.as_secs()
            ));
        }
        for peer in &self.cancel_peers {
            let port = peer.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
            if !matches!(port, Some((h, Ok(_))) if !h.is_empty()) {
                errors.push(format!("cancel_peers entry {peer:?} is not \"host:port\""));
            }
        }
    }
}

impl Section for ComputeConfig {
    fn validate(&self, errors: &mut Vec<String>) {
        if let Some(u) = &self.manager_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                errors.push(format!("manager_url {u:?} must be an http:// URL"));
            }
        }
        for (name, d) in [
            ("wake_timeout", self.wake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("activity_interval", self.activity_interval),
        ] {
            if d.is_zero() {
                errors.push(format!("{name} must be more than 0"));
            }
        }
        if self.max_waiting_per_endpoint == 0 {
            errors.push("max_waiting_per_endpoint must be at least 1".into());
        }
    }
}

impl Section for LocalConfig {
    fn validate(&self, errors: &mut Vec<String>) {
        if self.log_max_size.0 < pgwake_compute_manager::local::MIN_LOG_SIZE {
            errors.push(format!(
                "log_max_size must be at least {} bytes (64KiB)",
                pgwake_compute_manager::local::MIN_LOG_SIZE
            ));
        }
        for (k, v) in &self.settings {
            if let Err(e) = pgwake_router::settings::check(k, v) {
                errors.push(format!("settings: {e}"));
            }
        }
    }
}

impl Section for LimitsConfig {
    fn validate(&self, errors: &mut Vec<String>) {
        if self.connections_per_ip_per_second < 0.0 || self.connections_per_ip_burst < 0.0 {
            errors.push("rates must not be negative".into());
        }
    }
}

impl Section for AdminConfig {}

impl Section for ApiConfig {
    fn validate(&self, errors: &mut Vec<String>) {
        match self.token() {
            Ok(Some(t)) if t.is_empty() => errors.push("the management token is empty".into()),
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
    }
}

impl Section for pgwake_proxy::serverless::HttpConfig {
    fn validate(&self, errors: &mut Vec<String>) {
        if self.max_request_bytes == 0 || self.max_response_bytes == 0 {
            errors.push("max_request_bytes and max_response_bytes must be at least 1".into());
        }
        if self.query_timeout.is_zero() {
            errors.push("query_timeout must be more than 0".into());
        }
    }
}

impl Section for AuthConfig {
    fn validate(&self, errors: &mut Vec<String>) {
        if self.learn_interval.is_zero() {
            errors.push("learn_interval must be more than 0".into());
        }
        if self.roles_secret_interval.is_zero() {
            errors.push("roles_secret_interval must be more than 0".into());
        }
    }
}

impl Section for ReloadConfig {
    fn validate(&self, errors: &mut Vec<String>) {
        if !(0.0..=1.0).contains(&self.max_removed_share) {
            errors.push("max_removed_share must be between 0 and 1".into());
        }
    }
}

impl Section for TlsConfig {
    fn validate(&self, errors: &mut Vec<String>) {
        errors.extend(TlsConfig::validate(self).iter().map(|e| e.to_string()));
    }
}

impl Section for ManagerServiceConfig {
    fn validate(&self, errors: &mut Vec<String>) {
        if !self.leader_election {
            return;
        }
        if self.listen.is_none() {
            errors.push("leader_election is for compute manager replicas: set listen".into());
        }
        // The identity comes from the environment at start; check everything else now.
        if let Ok(l) = self.leader_config(Some("identity-from-hostname".into())) {
            errors.extend(l.validate());
        }
    }
}

impl Section for Option<KubernetesConfig> {
    /// No `[kubernetes]`: no Kubernetes backend.
    fn absent() -> Result<Self, toml::de::Error> {
        Ok(None)
    }

    fn validate(&self, errors: &mut Vec<String>) {
        if let Some(k) = self {
            errors.extend(k.validate());
        }
    }
}

/// Takes the sections out of a parsed file one by one, collecting every error, and remembers
/// which names it was asked for: any other top-level key is unknown.
struct Loader<'a> {
    file: &'a toml::Table,
    known: Vec<&'static str>,
    errors: Vec<String>,
}

impl<'a> Loader<'a> {
    fn new(file: &'a toml::Table) -> Self {
        Self {
            file,
            known: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// The section `[name]`, its defaults when absent. On an error the defaults stand in, so
    /// that the checks across sections still run; the config is refused anyway.
    fn section<T: Section>(&mut self, name: &'static str) -> T {
        self.known.push(name);
        let parsed = match self.file.get(name) {
            None => T::absent(),
            Some(v @ toml::Value::Table(_)) => v.clone().try_into::<T>(),
            Some(_) => {
                self.errors.push(format!("{name}: expected a table"));
                return T::default();
            }
        };
        match parsed {
            Ok(section) => {
                let mut errors = Vec::new();
                section.validate(&mut errors);
                self.errors
                    .extend(errors.into_iter().map(|e| format!("[{name}]: {e}")));
                section
            }
            Err(e) => {
                self.errors.push(format!("[{name}]: {}", e.message()));
                T::default()
            }
        }
    }

    /// The `[[endpoint]]` entries that parse; each one that does not is reported with its
    /// position and id. The router's types refuse unknown keys themselves.
    fn endpoints(&mut self) -> Vec<EndpointConfig> {
        self.known.push("endpoint");
        let items = match self.file.get("endpoint") {
            None => return Vec::new(),
            Some(toml::Value::Array(items)) => items,
            Some(_) => {
                self.errors.push("endpoint: use [[endpoint]] tables".into());
                return Vec::new();
            }
        };
        let mut endpoints = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item.clone().try_into::<EndpointConfig>() {
                Ok(e) => endpoints.push(e),
                Err(e) => {
                    let label = match item.get("id").and_then(|v| v.as_str()) {
                        Some(id) => format!("[[endpoint]] #{} ({id:?})", i + 1),
                        None => format!("[[endpoint]] #{}", i + 1),
                    };
                    self.errors.push(format!("{label}: {}", e.message()));
                }
            }
        }
        self.errors.extend(
            RoutingTable::validate(&endpoints)
                .into_iter()
                .map(|e| e.to_string()),
        );
        endpoints
    }

    fn finish(mut self) -> Vec<String> {
        for key in self.file.keys() {
            if !self.known.contains(&key.as_str()) {
                self.errors.push(format!("unknown section or key {key:?}"));
            }
        }
        self.errors
    }
}

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
        let file: toml::Table =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        Self::from_file(file)
    }

    /// A config from a parsed file (`parse` without the TOML syntax step).
    pub(crate) fn from_file(file: toml::Table) -> Result<Self, ConfigErrors> {
        let mut load = Loader::new(&file);
        let endpoints = load.endpoints();
        let config = Config {
            proxy: load.section("proxy"),
            compute: load.section("compute"),
            local: load.section("local"),
            limits: load.section("limits"),
            admin: load.section("admin"),
            http: load.section("http"),
            tls: load.section("tls"),
            manager: load.section("manager"),
            kubernetes: load.section("kubernetes"),
            reload: load.section("reload"),
            api: load.section("api"),
            auth: load.section("auth"),
            endpoint_auth: endpoints.iter().map(EndpointAuth::from).collect(),
            endpoints,
            file: file.clone(),
        };
        let mut errors = load.finish();
        config.validate(&mut errors);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The checks that need more than one section.
    fn validate(&self, errors: &mut Vec<String>) {
        if matches!(self.api.token(), Ok(Some(_))) && self.manager.listen.is_none() {
            errors.push(
                "[api]: the management API is served on the compute manager's listener: set [manager] listen"
                    .into(),
            );
        }
        if self.http.tls && self.tls.certificates.is_empty() {
            errors.push("[http]: tls = true needs [tls] certificates".into());
        }
        if self.manager.leader_election {
            if self.kubernetes.is_none() {
                errors.push(
                    "[manager]: leader_election needs a [kubernetes] section (the Lease lives in its namespace)"
                        .into(),
                );
            }
            if self.compute.manager_url.is_some() {
                errors.push(
                    "[manager]: leader_election with [compute] manager_url: this pgwake wakes nothing itself"
                        .into(),
                );
            }
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
    fn the_management_token_needs_the_manager_listener_and_one_source() {
        let c = Config::parse(
            "[manager]\nlisten = \"127.0.0.1:0\"\n[api]\nmanagement_token = \" t \"\n",
        )
        .unwrap();
        assert_eq!(c.api.token().unwrap().as_deref(), Some("t"));
        let errs = Config::parse("[api]\nmanagement_token = \"t\"\n")
            .unwrap_err()
            .0;
        assert!(
            errs.iter().any(|e| e.contains("set [manager] listen")),
            "{errs:?}"
        );
        let errs = Config::parse(
            "[manager]\nlisten = \"127.0.0.1:0\"\n[api]\nmanagement_token = \"t\"\nmanagement_token_file = \"/nonexistent\"\n",
        )
        .unwrap_err()
        .0;
        assert!(errs.iter().any(|e| e.contains("not both")), "{errs:?}");
        let errs = Config::parse(
            "[manager]\nlisten = \"127.0.0.1:0\"\n[api]\nmanagement_token_file = \"/nonexistent/token\"\n",
        )
        .unwrap_err()
        .0;
        assert!(
            errs.iter().any(|e| e.contains("/nonexistent/token")),
            "{errs:?}"
        );
        let errs = Config::parse(
            "[manager]\nlisten = \"127.0.0.1:0\"\n[api]\nmanagement_token = \"  \"\n",
        )
        .unwrap_err()
        .0;
        assert!(errs.iter().any(|e| e.contains("empty")), "{errs:?}");
        assert_eq!(Config::parse("").unwrap().api.token().unwrap(), None);
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
    fn the_compute_log_size_is_checked() {
        let err = |v: &str| {
            Config::parse(&format!("[local]\nlog_max_size = {v}\n"))
                .unwrap_err()
                .0
                .join("\n")
        };
        assert!(err("\"1KiB\"").contains("log_max_size must be at least 65536 bytes"));
        assert!(err("\"ten\"").contains("is not a size"));
        let ok = Config::parse("[local]\nlog_max_size = \"1MiB\"\n").unwrap();
        assert_eq!(ok.local.log_max_size.0, 1 << 20);
    }

    #[test]
    fn max_connections_is_bounded_both_ways() {
        for (v, msg) in [
            ("0", "at least 1"),
            ("100000000000000000000", ""),
            ("10000001", "at most 10000000"),
        ] {
            let text = format!("[proxy]\nmax_connections = {v}\n");
            let errors = Config::parse(&text).unwrap_err().0.join("\n");
            assert!(
                errors.contains("max_connections") && errors.contains(msg),
                "{v}: {errors}"
            );
        }
        Config::parse("[proxy]\nmax_connections = 10000000\n").unwrap();
    }

    #[test]
    fn settings_pgwake_owns_are_refused_in_the_file_and_others_kept() {
        let errors = Config::parse(
            "[local]\nsettings = { port = \"1\", work_mem = \"4MB\" }\n\
             [[endpoint]]\nid = \"a\"\nbackend = \"local\"\n\
             settings = { listen_addresses = \"*\" }\n",
        )
        .unwrap_err()
        .0
        .join("\n");
        assert!(errors.contains("\"port\" is pgwake's own"), "{errors}");
        assert!(
            errors.contains("\"listen_addresses\" is pgwake's own"),
            "{errors}"
        );
        assert!(!errors.contains("work_mem"), "{errors}");
        // The operator may run programs on their own host.
        Config::parse(
            "[local]\nsettings = { archive_mode = \"on\", archive_command = \"true\" }\n",
        )
        .unwrap();
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
    fn a_section_left_out_takes_its_defaults() {
        let c = Config::parse("").unwrap();
        assert!(c.kubernetes.is_none(), "no [kubernetes]: no backend");
        let c = Config::parse("[kubernetes]\n").unwrap();
        assert!(c.kubernetes.is_some(), "an empty [kubernetes] enables it");
        let e = Config::parse("proxy = 1\nkubernetes = \"x\"\n")
            .unwrap_err()
            .0;
        assert_eq!(
            e,
            ["proxy: expected a table", "kubernetes: expected a table"],
            "{e:?}"
        );
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
        assert_eq!(c.proxy.relay_threads, None, "one per core");
    }

    #[test]
    fn relay_threads_are_bounded() {
        let c = Config::parse("[proxy]\nrelay_threads = 0").unwrap();
        assert_eq!(c.proxy.relay_threads, Some(0));
        let e = Config::parse("[proxy]\nrelay_threads = 100000")
            .unwrap_err()
            .0;
        assert_eq!(
            e,
            ["[proxy]: relay_threads must be at most 1024 (unset: one per core)"],
            "{e:?}"
        );
    }
}
