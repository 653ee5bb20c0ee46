use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use ipnet::IpNet;
use serde::Deserialize;
use tokio::sync::watch;

use crate::EndpointId;

/// One `[[endpoint]]` entry of the config file, as written by the user.
// `deny_unknown_fields` does not work through `flatten`: the backend variants deny the keys
// that are neither these fields nor their own, so a misspelt key is an error, not a default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EndpointConfig {
    pub id: EndpointId,
    #[serde(flatten)]
    pub backend: BackendSpec,
    /// Overrides the global idle timeout for this endpoint.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Overrides the global `deep_sleep_after` (light sleep) for this endpoint; `"0s"` turns
    /// light sleep off for it.
    #[serde(default, with = "humantime_serde")]
    pub deep_sleep_after: Option<Duration>,
    /// Client networks allowed to connect (checked before any wake); empty allows all.
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// Client connections to this endpoint at once; unset uses the global per-endpoint limit.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// How clients log in (checked by the proxy before any wake); unset: `scram` when
    /// `roles_file` is set, else `passthrough`.
    #[serde(default)]
    pub auth: Option<AuthMode>,
    /// SCRAM verifiers of the roles that may log in, in pgbouncer's `auth_file` format.
    #[serde(default)]
    pub roles_file: Option<std::path::PathBuf>,
}

/// How an endpoint authenticates clients.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// SCRAM at the proxy with the endpoint's verifiers, before any wake.
    Scram,
    /// No check at the proxy: the compute authenticates, after the wake.
    Passthrough,
}

/// How the compute behind an endpoint is run.
// One per endpoint, shared behind an `Arc<Route>`: the Kubernetes variant's size costs nothing
// worth an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendSpec {
    /// A `postgres` process started by pgwake itself, data dir `<data_root>/<id>`.
    Local {
        /// Extra `postgres -c name=value` settings for this endpoint only.
        #[serde(default)]
        settings: BTreeMap<String, String>,
    },
    /// An always-on Postgres at a fixed `host:port`; never woken or suspended.
    Static { address: String },
    /// A compute run in Kubernetes as a StatefulSet scaled between 0 and 1 replicas (see the
    /// compute manager's `kubernetes` module). Written in the config file, or converted from a
    /// `PgwakeEndpoint` resource by [`crate::crd`].
    Kubernetes {
        /// Container image; it must run Postgres listening on `port`.
        image: String,
        /// Postgres's port inside the pod; unset uses the `[kubernetes]` default (5432).
        #[serde(default)]
        port: Option<u16>,
        /// Overrides the image's entrypoint / arguments.
        #[serde(default)]
        command: Vec<String>,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// A Secret in the compute's namespace whose keys become environment variables (for
        /// `POSTGRES_PASSWORD` and the like, which should not sit in the config).
        #[serde(default)]
        env_secret: Option<String>,
        /// Resource requests and limits, as Kubernetes quantities: `{ cpu = "250m" }`.
        #[serde(default)]
        requests: BTreeMap<String, String>,
        #[serde(default)]
        limits: BTreeMap<String, String>,
        /// Size of the PersistentVolumeClaim that keeps the data directory across suspends
        /// (`"1Gi"`); none for stateless computes whose data lives elsewhere (Neon).
        #[serde(default)]
        storage: Option<String>,
        #[serde(default)]
        storage_class: Option<String>,
        /// Scheduling and pod metadata for this endpoint's pod; from `PgwakeEndpoint`s only.
        #[serde(skip)]
        pod: PodOverrides,
    },
}

/// Per-endpoint additions to a Kubernetes compute's pod (`spec.compute` of a
/// `PgwakeEndpoint`): where it may run and how it is labelled for other tools. The scheduling
/// fields are kept as Kubernetes JSON and passed through as they are; the API server checks
/// them when the StatefulSet is written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodOverrides {
    /// `[Toleration]`: e.g. run on nodes tainted for databases.
    pub tolerations: Vec<serde_json::Value>,
    /// An `Affinity`: node affinity (zones, instance types), pod (anti-)affinity.
    pub affinity: Option<serde_json::Value>,
    pub priority_class_name: Option<String>,
    /// Annotations on the pod (not the StatefulSet): e.g. for a service mesh or a backup tool.
    pub annotations: BTreeMap<String, String>,
}

/// What the table answers for an id. Shared as `Arc<Route>` so a reload that replaces an entry
/// never disturbs a connection that already looked the old one up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub endpoint: EndpointId,
    pub backend: BackendSpec,
    pub idle_timeout: Option<Duration>,
    pub deep_sleep_after: Option<Duration>,
    pub allow: Vec<IpNet>,
    pub max_connections: Option<usize>,
}

impl Route {
    /// Whether a client at `ip` may use this endpoint. IPv4-mapped IPv6 addresses (what a
    /// dual-stack listener reports for IPv4 clients) are matched as IPv4.
    pub fn allows(&self, ip: IpAddr) -> bool {
        if self.allow.is_empty() {
            return true;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.allow.iter().any(|net| net.contains(&ip))
    }
}

impl From<EndpointConfig> for Route {
    fn from(c: EndpointConfig) -> Self {
        Route {
            endpoint: c.id,
            backend: c.backend,
            idle_timeout: c.idle_timeout,
            deep_sleep_after: c.deep_sleep_after,
            allow: c.allow,
            max_connections: c.max_connections,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("endpoint {0:?} is defined more than once")]
    Duplicate(String),
    #[error("endpoint {id:?}: static address {address:?} is not host:port")]
    BadAddress { id: String, address: String },
    #[error("endpoint {id:?}: {error}")]
    Setting {
        id: String,
        error: crate::settings::SettingError,
    },
}

/// Counts of what a [`RoutingTable::replace_all`] changed, for the reload log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TableDiff {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
}

/// Endpoint id → route. Reads are lock-free on the hot path (sharded `DashMap`), and a reload
/// applies a diff in place instead of swapping the whole map, so lookups racing a reload see
/// either the old or the new route for an id, never a missing one for an id in both.
#[derive(Debug, Default)]
pub struct RoutingTable {
    routes: DashMap<EndpointId, Arc<Route>>,
    /// Bumped after every change (a reload once, a source's upsert or remove each time), so
    /// that state kept per endpoint elsewhere (the compute manager's) can follow removals
    /// without polling the table.
    version: watch::Sender<u64>,
    /// Ids the config file defines. A reload replaces exactly these, so endpoints another
    /// source added (the Kubernetes CRD reflector) survive it, and the file wins a conflict.
    file_owned: Mutex<HashSet<EndpointId>>,
}

impl RoutingTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn lookup(&self, id: &EndpointId) -> Option<Arc<Route>> {
        self.routes.get(id).map(|r| Arc::clone(r.value()))
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Every route, sorted by id: a snapshot for listings (the management API), not for the
    /// connection path.
    pub fn routes(&self) -> Vec<Arc<Route>> {
        let mut all: Vec<Arc<Route>> = self.routes.iter().map(|r| Arc::clone(r.value())).collect();
        all.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        all
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn upsert(&self, route: Route) {
        self.insert(route);
        self.changed();
    }

    pub fn remove(&self, id: &EndpointId) -> Option<Arc<Route>> {
        let removed = self.routes.remove(id).map(|(_, r)| r);
        if removed.is_some() {
            self.changed();
        }
        removed
    }

    /// A receiver that sees every change of the table (coalesced: a slow
    /// reader sees the latest version, not each step), for followers such as the compute
    /// manager's `Manager::follow_table`.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn insert(&self, route: Route) {
        self.routes.insert(route.endpoint.clone(), Arc::new(route));
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn file_ids(&self) -> MutexGuard<'_, HashSet<EndpointId>> {
        self.file_owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_file_owned(&self, id: &EndpointId) -> bool {
        self.file_ids().contains(id)
    }

    /// For sources other than the config file: inserts or replaces `route` unless the config
    /// file defines the id. Returns whether it did.
    pub fn upsert_unless_file_owned(&self, route: Route) -> bool {
        let owned = self.file_ids();
        if owned.contains(&route.endpoint) {
            return false;
        }
        self.upsert(route);
        true
    }

    /// For sources other than the config file: removes `id` unless the config file defines it.
    pub fn remove_unless_file_owned(&self, id: &EndpointId) -> Option<Arc<Route>> {
        let owned = self.file_ids();
        if owned.contains(id) {
            return None;
        }
        self.remove(id)
    }

    /// Checks a full set of endpoint definitions, reporting every problem at once.
    pub fn validate(configs: &[EndpointConfig]) -> Vec<RouteError> {
        let mut errors = Vec::new();
        let mut seen = HashSet::new();
        for c in configs {
            if !seen.insert(&c.id) {
                errors.push(RouteError::Duplicate(c.id.to_string()));
            }
            if let BackendSpec::Local { settings } = &c.backend {
                for (k, v) in settings {
                    if let Err(error) = crate::settings::check(k, v) {
                        errors.push(RouteError::Setting {
                            id: c.id.to_string(),
                            error,
                        });
                    }
                }
            }
            if let BackendSpec::Static { address } = &c.backend {
                let ok = address
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
                if !ok {
                    errors.push(RouteError::BadAddress {
                        id: c.id.to_string(),
                        address: address.clone(),
                    });
                }
            }
        }
        errors
    }

    /// Makes the config file's part of the table hold exactly `configs` (entries from other
    /// sources stay), or changes nothing if they are invalid.
    pub fn replace_all(&self, configs: Vec<EndpointConfig>) -> Result<TableDiff, Vec<RouteError>> {
        let errors = Self::validate(&configs);
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut diff = TableDiff::default();
        let keep: HashSet<EndpointId> = configs.iter().map(|c| c.id.clone()).collect();
        let mut owned = self.file_ids();
        for c in configs {
            let route = Route::from(c);
            match self.routes.get(&route.endpoint) {
                Some(old) if **old == route => continue,
                Some(_) => diff.changed += 1,
                None => diff.added += 1,
            }
            self.insert(route);
        }
        for id in owned.difference(&keep) {
            if self.routes.remove(id).is_some() {
                diff.removed += 1;
            }
        }
        *owned = keep;
        if diff != TableDiff::default() {
            self.changed();
        }
        Ok(diff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(id: &str) -> EndpointConfig {
        EndpointConfig {
            id: EndpointId::parse(id).unwrap(),
            backend: BackendSpec::Local {
                settings: BTreeMap::new(),
            },
            idle_timeout: None,
            deep_sleep_after: None,
            allow: Vec::new(),
            max_connections: None,
            auth: None,
            roles_file: None,
        }
    }

    #[test]
    fn allowlist_matches_cidrs_and_mapped_v4() {
        let mut r = Route::from(local("a"));
        assert!(
            r.allows("203.0.113.9".parse().unwrap()),
            "empty list allows all"
        );
        r.allow = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        assert!(r.allows("10.1.2.3".parse().unwrap()));
        assert!(r.allows("::ffff:10.1.2.3".parse().unwrap()));
        assert!(r.allows("2001:db8::1".parse().unwrap()));
        assert!(!r.allows("11.0.0.1".parse().unwrap()));
        assert!(!r.allows("::ffff:11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn subscribers_see_each_change_once_and_no_change_at_all() {
        let t = RoutingTable::new();
        let mut rx = t.subscribe();
        t.replace_all(vec![local("a"), local("b")]).unwrap();
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        t.replace_all(vec![local("a"), local("b")]).unwrap();
        assert!(
            !rx.has_changed().unwrap(),
            "the same file again changes nothing"
        );
        t.replace_all(vec![local("a")]).unwrap();
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(t.remove(&EndpointId::parse("zz").unwrap()).is_none());
        assert!(!rx.has_changed().unwrap(), "nothing removed");
        t.remove(&EndpointId::parse("a").unwrap());
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn replace_all_applies_a_diff() {
        let t = RoutingTable::new();
        let d = t.replace_all(vec![local("a"), local("b")]).unwrap();
        assert_eq!(
            d,
            TableDiff {
                added: 2,
                changed: 0,
                removed: 0
            }
        );
        let before = t.lookup(&EndpointId::parse("a").unwrap()).unwrap();

        let mut b = local("b");
        b.idle_timeout = Some(Duration::from_secs(5));
        let d = t.replace_all(vec![local("a"), b, local("c")]).unwrap();
        assert_eq!(
            d,
            TableDiff {
                added: 1,
                changed: 1,
                removed: 0
            }
        );
        // Unchanged entries keep their Arc: no needless churn for readers.
        let after = t.lookup(&EndpointId::parse("a").unwrap()).unwrap();
        assert!(Arc::ptr_eq(&before, &after));

        let d = t.replace_all(vec![local("c")]).unwrap();
        assert_eq!(
            d,
            TableDiff {
                added: 0,
                changed: 0,
                removed: 2
            }
        );
        assert!(t.lookup(&EndpointId::parse("a").unwrap()).is_none());
    }

    #[test]
    fn reload_leaves_other_sources_alone_and_the_file_wins() {
        let t = RoutingTable::new();
        t.replace_all(vec![local("a")]).unwrap();
        assert!(t.upsert_unless_file_owned(Route::from(local("crd"))));
        assert!(
            !t.upsert_unless_file_owned(Route::from(local("a"))),
            "the file owns a"
        );
        let d = t.replace_all(vec![local("b")]).unwrap();
        assert_eq!(
            d,
            TableDiff {
                added: 1,
                changed: 0,
                removed: 1
            }
        );
        assert!(
            t.lookup(&EndpointId::parse("crd").unwrap()).is_some(),
            "survives reload"
        );
        assert!(t
            .remove_unless_file_owned(&EndpointId::parse("b").unwrap())
            .is_none());
        assert!(t.lookup(&EndpointId::parse("b").unwrap()).is_some());
        assert!(t
            .remove_unless_file_owned(&EndpointId::parse("crd").unwrap())
            .is_some());
    }

    #[test]
    fn invalid_set_keeps_old_table_and_reports_all_errors() {
        let t = RoutingTable::new();
        t.replace_all(vec![local("a")]).unwrap();
        let bad = EndpointConfig {
            id: EndpointId::parse("s").unwrap(),
            backend: BackendSpec::Static {
                address: "nohost".into(),
            },
            ..local("s")
        };
        let errs = t
            .replace_all(vec![local("b"), local("b"), bad])
            .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(t.lookup(&EndpointId::parse("a").unwrap()).is_some());
        assert!(t.lookup(&EndpointId::parse("b").unwrap()).is_none());
    }

    #[test]
    fn parses_toml_entries() {
        #[derive(Deserialize)]
        struct F {
            endpoint: Vec<EndpointConfig>,
        }
        let f: F = toml::from_str(
            r#"
            [[endpoint]]
            id = "demo"
            backend = "local"
            idle_timeout = "90s"
            settings = { shared_buffers = "16MB" }

            [[endpoint]]
            id = "ext"
            backend = "static"
            address = "127.0.0.1:5432"
            "#,
        )
        .unwrap();
        assert_eq!(f.endpoint[0].idle_timeout, Some(Duration::from_secs(90)));
        assert_eq!(
            f.endpoint[1].backend,
            BackendSpec::Static {
                address: "127.0.0.1:5432".into()
            }
        );
        assert!(toml::from_str::<F>("[[endpoint]]\nid = \"Bad\"\nbackend = \"local\"").is_err());
    }

    #[test]
    fn a_setting_pgwake_owns_or_a_malformed_name_is_refused_with_the_endpoint() {
        let mut c = local("a");
        c.backend = BackendSpec::Local {
            settings: [
                ("work_mem".to_string(), "4MB".to_string()),
                ("listen_addresses".to_string(), "*".to_string()),
                ("bad name".to_string(), "1".to_string()),
                // The operator may: it is their host.
                ("archive_command".to_string(), "true".to_string()),
            ]
            .into(),
        };
        let errors: Vec<String> = RoutingTable::validate(&[c])
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors.iter().all(|e| e.starts_with("endpoint \"a\": ")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.contains("listen_addresses")),
            "{errors:?}"
        );
        assert!(errors.iter().any(|e| e.contains("bad name")), "{errors:?}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        #[derive(Debug, Deserialize)]
        struct F {
            #[allow(dead_code)]
            endpoint: Vec<EndpointConfig>,
        }
        let entry = |extra: &str| {
            toml::from_str::<F>(&format!(
                "[[endpoint]]\nid = \"a\"\nbackend = \"local\"\nidle_timeout = \"5s\"\n\
                 allow = [\"10.0.0.0/8\"]\nmax_connections = 3\n{extra}"
            ))
        };
        entry("settings = { work_mem = \"4MB\" }").unwrap();
        let e = entry("idel_timeout = \"5s\"").unwrap_err().to_string();
        assert!(e.contains("idel_timeout"), "{e}");
        // A key of another backend is as wrong as a misspelt one.
        let e = entry("image = \"postgres:17\"").unwrap_err().to_string();
        assert!(e.contains("image"), "{e}");
        let k = "[[endpoint]]\nid = \"k\"\nbackend = \"kubernetes\"\nimage = \"pg\"\n\
                 port = 5432\ncommand = []\nargs = []\nenv = {}\nenv_secret = \"s\"\n\
                 requests = {}\nlimits = {}\nstorage = \"1Gi\"\nstorage_class = \"x\"\n\
                 idle_timeout = \"5s\"\n";
        toml::from_str::<F>(k).unwrap();
        let s =
            "[[endpoint]]\nid = \"s\"\nbackend = \"static\"\naddress = \"h:1\"\nsettings = {}\n";
        assert!(toml::from_str::<F>(s).is_err());
    }
}
