//! What the management API does with a request: checks it against the routing table, picks
//! the id, calls the provisioner of the right backend, and routes (or unroutes) the result.
//! Creates and deletes run one at a time: they are rare, and a copy must not race a delete of
//! the same parent or a second create of the same id.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use pgwake_router::{AuthMode, EndpointConfig, EndpointId, Route, RoutingTable};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    generate_id, BackendKind, CreateRequest, EndpointSettings, ProvisionError, Provisioners,
    StoredEndpoint,
};
use crate::Manager;

/// Attempts at a fresh generated id before giving up (each collision is about 1 in 10^10).
const ID_ATTEMPTS: usize = 20;

/// How clients reach the proxy, for the connection strings the API hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    /// Host name or address clients use for the proxy.
    pub host: String,
    pub port: u16,
    /// With TLS: the domain whose first label names the endpoint (`<id>.<domain>`).
    pub domain: Option<String>,
    pub user: String,
    pub dbname: String,
}

impl ConnectInfo {
    /// A libpq URI for endpoint `id`: by SNI (`<id>.<domain>`, TLS required) when a domain is
    /// configured, else with the endpoint in the `options` parameter.
    pub fn uri(&self, id: &EndpointId) -> String {
        let Self {
            host,
            port,
            user,
            dbname,
            ..
        } = self;
        match &self.domain {
            Some(domain) => {
                format!("postgres://{user}@{id}.{domain}:{port}/{dbname}?sslmode=require")
            }
            None => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                format!("postgres://{user}@{host}:{port}/{dbname}?options=endpoint%3D{id}")
            }
        }
    }
}

/// `POST /v1/endpoints`. Every key is optional: no `id` picks one, no `parent` makes an empty
/// endpoint; a branch takes its parent's settings where the request gives none.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Without a parent: where the endpoint runs (`local` unless given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
    /// A branch of a Neon endpoint starting at this LSN (`X/Y`) of the parent's timeline,
    /// instead of its present state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// Light sleep: how long a frozen compute stays frozen (`"0s"`: stopped at once).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub deep_sleep_after: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<ipnet::IpNet>>,
    /// `postgres -c` settings (local endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<BTreeMap<String, String>>,
}

/// The answer to a create: the endpoint, and how to connect to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreatedBody {
    pub id: String,
    pub parent: Option<String>,
    pub backend: BackendKind,
    pub connection_uri: String,
}

/// Where an endpoint in the routing table comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointOrigin {
    /// An `[[endpoint]]` of the config file.
    Config,
    /// Created through this API.
    Api,
    /// Another source (a `PgwakeEndpoint` resource).
    Resource,
}

/// One endpoint of `GET /v1/endpoints` (management view).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointBody {
    pub id: String,
    pub backend: BackendKind,
    pub origin: EndpointOrigin,
    pub parent: Option<String>,
    /// The manager's phase (`suspended` for one never woken).
    pub phase: String,
    pub address: Option<String>,
    pub connection_uri: String,
}

pub struct Endpoints {
    table: Arc<RoutingTable>,
    manager: Arc<Manager>,
    provisioners: Provisioners,
    connect: ConnectInfo,
    /// The config file's endpoints as last loaded: a branch of one inherits its keys.
    configured: Mutex<Vec<EndpointConfig>>,
    ops: tokio::sync::Mutex<()>,
    /// Called after every create and delete (the proxy reloads its verifiers).
    on_change: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Endpoints {
    pub fn new(
        table: Arc<RoutingTable>,
        manager: Arc<Manager>,
        provisioners: Provisioners,
        connect: ConnectInfo,
        configured: Vec<EndpointConfig>,
    ) -> Arc<Self> {
        Arc::new(Self {
            table,
            manager,
            provisioners,
            connect,
            configured: Mutex::new(configured),
            ops: tokio::sync::Mutex::new(()),
            on_change: OnceLock::new(),
        })
    }

    /// Runs `f` after every create and delete from now on (set once).
    pub fn set_on_change(&self, f: Box<dyn Fn() + Send + Sync>) {
        if self.on_change.set(f).is_err() {
            warn!("the endpoints' change hook is already set");
        }
    }

    fn changed(&self) {
        if let Some(f) = self.on_change.get() {
            f();
        }
    }

    /// The config file's endpoints as last loaded.
    pub fn configured(&self) -> Vec<EndpointConfig> {
        self.configured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The config file's endpoints after a reload.
    pub fn set_configured(&self, configured: Vec<EndpointConfig>) {
        *self.configured.lock().unwrap_or_else(|p| p.into_inner()) = configured;
    }

    fn stored(&self) -> Vec<StoredEndpoint> {
        self.provisioners.all().flat_map(|p| p.created()).collect()
    }

    /// The endpoints created through the API, as `[[endpoint]]`s.
    pub fn created(&self) -> Vec<EndpointConfig> {
        self.stored().iter().map(StoredEndpoint::config).collect()
    }

    /// Routes every created endpoint that the table lacks (at start, and after a reload in
    /// case the file had defined one of their ids meanwhile). Returns how many are routed.
    pub fn restore(&self) -> usize {
        let mut routed = 0;
        for c in self.created() {
            let id = c.id.clone();
            if self.table.is_file_owned(&id) {
                warn!(endpoint = %id, "an endpoint created through the API is also defined in the config file; the file's definition is used");
                continue;
            }
            let route = Route::from(c);
            if self.table.lookup(&id).as_deref() != Some(&route) {
                self.table.upsert_unless_file_owned(route);
            }
            routed += 1;
        }
        routed
    }

    fn parent_config(&self, route: &Route) -> EndpointConfig {
        let id = &route.endpoint;
        let configured = self.configured.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configured.iter().find(|c| &c.id == id) {
            return c.clone();
        }
        drop(configured);
        if let Some(c) = self.created().into_iter().find(|c| &c.id == id) {
            return c;
        }
        EndpointConfig {
            id: id.clone(),
            backend: route.backend.clone(),
            idle_timeout: route.idle_timeout,
            deep_sleep_after: route.deep_sleep_after,
            allow: route.allow.clone(),
            max_connections: route.max_connections,
            auth: None,
            roles_file: None,
        }
    }

    pub async fn create(&self, body: CreateBody) -> Result<CreatedBody, ProvisionError> {
        let _one = self.ops.lock().await;
        let parent = match &body.parent {
            Some(p) => {
                let id = EndpointId::parse(p)
                    .map_err(|e| ProvisionError::InvalidRequest(format!("parent: {e}")))?;
                Some(
                    self.table
                        .lookup(&id)
                        .ok_or(ProvisionError::UnknownEndpoint(id))?,
                )
            }
            None => None,
        };
        let kind = match (&parent, body.backend) {
            (Some(p), Some(k)) if k != BackendKind::of(&p.backend) => {
                return Err(ProvisionError::InvalidRequest(format!(
                    "a branch runs on its parent's backend ({}), not {}",
                    BackendKind::of(&p.backend).as_str(),
                    k.as_str()
                )))
            }
            (Some(p), _) => BackendKind::of(&p.backend),
            (None, k) => k.unwrap_or(BackendKind::Local),
        };
        if let Some(lsn) = &body.lsn {
            if parent.is_none() || kind != BackendKind::Kubernetes {
                return Err(ProvisionError::InvalidRequest(
                    "lsn is for branches of Neon endpoints (kubernetes backend); a local branch \
                     copies its parent as it is now"
                        .into(),
                ));
            }
            crate::neon::Lsn::parse(lsn)
                .map_err(|e| ProvisionError::InvalidRequest(format!("lsn: {e}")))?;
        }
        let provisioner = self.provisioners.for_kind(kind)?;
        let taken = |id: &EndpointId| -> Result<bool, ProvisionError> {
            Ok(self.table.lookup(id).is_some() || provisioner.exists(id)?)
        };
        let id = match &body.id {
            Some(s) => {
                let id = EndpointId::parse(s)
                    .map_err(|e| ProvisionError::InvalidRequest(format!("id: {e}")))?;
                if taken(&id)? {
                    return Err(ProvisionError::Duplicate(id));
                }
                id
            }
            None => {
                let mut found = None;
                for _ in 0..ID_ATTEMPTS {
                    let id = generate_id(&mut rand::thread_rng());
                    if !taken(&id)? {
                        found = Some(id);
                        break;
                    }
                }
                found.ok_or_else(|| {
                    ProvisionError::internal("pick an endpoint id", "every attempt collided")
                })?
            }
        };
        // The caller holds a token to create endpoints, not a shell on the host: no setting
        // that runs programs as the compute's user, none that pgwake owns.
        for (k, v) in body.settings.iter().flatten() {
            pgwake_router::settings::check_unprivileged(k, v)
                .map_err(|e| ProvisionError::InvalidRequest(format!("settings: {e}")))?;
        }
        let inherited = parent.as_ref().map(|p| self.parent_config(p));
        let from = |f: fn(&EndpointConfig) -> EndpointSettings| {
            inherited.as_ref().map(f).unwrap_or_default()
        };
        let base = from(|c| EndpointSettings {
            idle_timeout: c.idle_timeout,
            deep_sleep_after: c.deep_sleep_after,
            max_connections: c.max_connections,
            auth: c.auth,
            roles_file: c.roles_file.clone(),
            allow: c.allow.clone(),
            settings: match &c.backend {
                pgwake_router::BackendSpec::Local { settings } => settings.clone(),
                _ => BTreeMap::new(),
            },
        });
        let settings = EndpointSettings {
            idle_timeout: body.idle_timeout.or(base.idle_timeout),
            deep_sleep_after: body.deep_sleep_after.or(base.deep_sleep_after),
            max_connections: body.max_connections.or(base.max_connections),
            auth: body.auth.or(base.auth),
            roles_file: base.roles_file,
            allow: body.allow.unwrap_or(base.allow),
            settings: body.settings.unwrap_or(base.settings),
        };
        let created = provisioner
            .create(CreateRequest {
                id: id.clone(),
                parent: parent.clone(),
                lsn: body.lsn.clone(),
                settings,
            })
            .await?;
        self.table
            .upsert_unless_file_owned(Route::from(created.config));
        self.changed();
        let parent = parent.map(|p| p.endpoint.to_string());
        info!(endpoint = %id, parent = parent.as_deref().unwrap_or("-"), backend = kind.as_str(), "endpoint created");
        Ok(CreatedBody {
            connection_uri: self.connect.uri(&id),
            id: id.to_string(),
            parent,
            backend: kind,
        })
    }

    pub async fn delete(&self, id: &EndpointId, remove_data: bool) -> Result<(), ProvisionError> {
        let _one = self.ops.lock().await;
        if self.table.is_file_owned(id) {
            return Err(ProvisionError::Configured(id.clone()));
        }
        let provisioner = match self
            .provisioners
            .all()
            .find(|p| p.created().iter().any(|e| &e.id == id))
        {
            Some(p) => p,
            // A resource another source routes (a PgwakeEndpoint): its backend deletes it.
            None => match self.table.lookup(id) {
                Some(r) => self.provisioners.for_kind(BackendKind::of(&r.backend))?,
                None => return Err(ProvisionError::UnknownEndpoint(id.clone())),
            },
        };
        // No new connection finds it from here on; sessions that already did keep it up, and
        // then the delete is refused and the route comes back.
        let route = self.table.remove_unless_file_owned(id);
        if let Err(e) = provisioner.delete(id, remove_data).await {
            // Still there (busy, or the state file could not be written): routed again. One
            // that is gone but whose data could not all be removed stays gone.
            let kept = provisioner.created().iter().any(|c| &c.id == id);
            if let (Some(r), true) = (route, kept) {
                self.table.upsert_unless_file_owned(Route::clone(&r));
            }
            return Err(e);
        }
        // The delete's own hold may have made the manager state for an endpoint that left
        // the table before it: dropped now, with its metric series.
        self.manager.forget(id);
        self.changed();
        info!(endpoint = %id, remove_data, "endpoint deleted");
        Ok(())
    }

    /// Every routed endpoint with its origin and phase.
    pub fn list(&self) -> Vec<EndpointBody> {
        let stored = self.stored();
        self.table
            .routes()
            .iter()
            .map(|r| self.body(r, &stored))
            .collect()
    }

    pub fn get(&self, id: &EndpointId) -> Option<EndpointBody> {
        let r = self.table.lookup(id)?;
        Some(self.body(&r, &self.stored()))
    }

    fn body(&self, r: &Route, stored: &[StoredEndpoint]) -> EndpointBody {
        let id = &r.endpoint;
        let created = stored.iter().find(|e| &e.id == id);
        let origin = if self.table.is_file_owned(id) {
            EndpointOrigin::Config
        } else if created.is_some() {
            EndpointOrigin::Api
        } else {
            EndpointOrigin::Resource
        };
        let stats = self.manager.stats(id);
        EndpointBody {
            id: id.to_string(),
            backend: BackendKind::of(&r.backend),
            origin,
            parent: created
                .and_then(|e| e.parent.as_ref())
                .map(|p| p.to_string()),
            phase: stats
                .as_ref()
                .map_or("suspended", |s| s.phase.as_str())
                .to_string(),
            address: stats.and_then(|s| s.addr).map(|a| a.to_string()),
            connection_uri: self.connect.uri(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::ProvisionErrorKind;

    #[test]
    fn connection_uris_by_sni_or_options() {
        let id = EndpointId::parse("ep-quiet-river-123456").unwrap();
        let mut c = ConnectInfo {
            host: "127.0.0.1".into(),
            port: 4432,
            domain: None,
            user: "postgres".into(),
            dbname: "postgres".into(),
        };
        assert_eq!(
            c.uri(&id),
            "postgres://postgres@127.0.0.1:4432/postgres?options=endpoint%3Dep-quiet-river-123456"
        );
        c.host = "::1".into();
        assert!(c.uri(&id).starts_with("postgres://postgres@[::1]:4432/"));
        c.domain = Some("db.example.com".into());
        assert_eq!(
            c.uri(&id),
            "postgres://postgres@ep-quiet-river-123456.db.example.com:4432/postgres?sslmode=require"
        );
    }

    fn service(table: Arc<RoutingTable>) -> Arc<Endpoints> {
        let manager = Manager::new(
            crate::ManagerConfig::default(),
            crate::Backends::default(),
            crate::ManagerMetrics::new(&prometheus::Registry::new()).unwrap(),
        );
        let connect = ConnectInfo {
            host: "127.0.0.1".into(),
            port: 4432,
            domain: None,
            user: "postgres".into(),
            dbname: "postgres".into(),
        };
        Endpoints::new(table, manager, Provisioners::default(), connect, Vec::new())
    }

    #[tokio::test]
    async fn backends_without_a_provisioner_refuse_clearly_and_bad_input_first() {
        let table = Arc::new(RoutingTable::new());
        table.upsert(Route {
            endpoint: EndpointId::parse("fixed").unwrap(),
            backend: pgwake_router::BackendSpec::Static {
                address: "127.0.0.1:5432".into(),
            },
            idle_timeout: None,
            deep_sleep_after: None,
            allow: Vec::new(),
            max_connections: None,
        });
        let e = service(Arc::clone(&table));
        let kind = |r: Result<CreatedBody, ProvisionError>| r.unwrap_err().kind();
        let body = |json: &str| serde_json::from_str::<CreateBody>(json).unwrap();
        assert_eq!(
            kind(e.create(body(r#"{"parent":"nope"}"#)).await),
            ProvisionErrorKind::UnknownEndpoint
        );
        assert_eq!(
            kind(e.create(body(r#"{"parent":"Bad"}"#)).await),
            ProvisionErrorKind::InvalidRequest
        );
        let err = e
            .create(body(r#"{"backend":"kubernetes"}"#))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ProvisionErrorKind::Unsupported);
        assert!(err.user_message().contains("kubernetes backend"), "{err}");
        assert_eq!(
            kind(e.create(body(r#"{"parent":"fixed"}"#)).await),
            ProvisionErrorKind::Unsupported,
            "a static parent has nothing to copy"
        );
        assert_eq!(
            kind(
                e.create(body(r#"{"parent":"fixed","backend":"local"}"#))
                    .await
            ),
            ProvisionErrorKind::InvalidRequest
        );
        let id = EndpointId::parse("fixed").unwrap();
        assert_eq!(
            e.delete(&id, false).await.unwrap_err().kind(),
            ProvisionErrorKind::Unsupported
        );
        assert!(
            table.lookup(&id).is_some(),
            "a refused delete unroutes nothing"
        );
        assert_eq!(
            e.delete(&EndpointId::parse("gone").unwrap(), false)
                .await
                .unwrap_err()
                .kind(),
            ProvisionErrorKind::UnknownEndpoint
        );
        let listed = e.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].origin, EndpointOrigin::Resource);
    }

    #[test]
    fn create_bodies_refuse_unknown_keys() {
        let b: CreateBody =
            serde_json::from_str(r#"{"parent":"main","idle_timeout":"5m","auth":"scram"}"#)
                .unwrap();
        assert_eq!(b.idle_timeout, Some(Duration::from_secs(300)));
        assert!(serde_json::from_str::<CreateBody>(r#"{"parnet":"main"}"#).is_err());
    }
}
