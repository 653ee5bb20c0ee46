//! Endpoints as Kubernetes objects: the `PgwakeEndpoint` custom resource (`pgwake.io/v1`), its
//! conversion into an [`EndpointConfig`], and a reflector-based source that keeps the routing
//! table in step with the resources in one namespace, so every proxy replica routes the same
//! endpoints without a restart.
//!
//! Its login settings (`spec.auth`, `spec.rolesSecret`) are not part of the route: the source
//! hands them to an [`AuthSink`] (the proxy's verifier store, fed from the named Secret by the
//! root crate's `roles_secret` module) before it routes the endpoint.
//!
//! The resource's name is the endpoint id. Its status subresource (state, address, last
//! activity) is written by the compute manager's Kubernetes backend, never by the router.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, ValidationRule,
};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{
    AuthMode, BackendSpec, EndpointConfig, EndpointId, InvalidEndpointId, PodOverrides, Route,
    RoutingTable,
};

/// Environment variables a Neon compute gets from `spec.neon` (the names Neon's own compute
/// wrapper reads).
pub const NEON_TENANT_ENV: &str = "TENANT_ID";
pub const NEON_TIMELINE_ENV: &str = "TIMELINE_ID";
pub const NEON_PAGESERVER_ENV: &str = "PAGESERVER_CONNSTRING";

/// What the endpoint runs and who may connect to it.
// The printer columns repeat `type_ = ...`, which the lint takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "pgwake.io",
    version = "v1",
    kind = "PgwakeEndpoint",
    namespaced,
    status = "PgwakeEndpointStatus",
    shortname = "pgwe",
    derive = "PartialEq",
    doc = "A Postgres endpoint that pgwake starts on the first connection and suspends when idle. The name is the endpoint id that clients pass (options=endpoint=NAME).",
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Failed\")].reason",
        priority = 1
    ),
    printcolumn(name = "Address", type_ = "string", json_path = ".status.address"),
    printcolumn(
        name = "Last-Activity",
        type_ = "date",
        json_path = ".status.lastActivity"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PgwakeEndpointSpec {
    /// How the compute's pod is built.
    pub compute: ComputeTemplate,
    /// How long the compute may sit with no client before it is suspended ("90s", "5m");
    /// unset uses pgwake's `compute.idle_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Client networks allowed to connect ("10.0.0.0/8", "192.0.2.7"); empty allows all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowlist: Vec<String>,
    /// Client connections to this endpoint at once; unset uses the proxy's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// For a Neon compute: the timeline it serves, passed to the container as environment
    /// variables TENANT_ID, TIMELINE_ID and PAGESERVER_CONNSTRING.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neon: Option<NeonTimeline>,
    /// How clients log in: "scram" (checked by pgwake with the verifiers of `rolesSecret`,
    /// before any wake) or "passthrough" (the compute checks, after the wake). Unset: "scram"
    /// with a `rolesSecret`, else "passthrough".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthMode>,
    /// A Secret in this namespace whose key holds the SCRAM verifiers of the roles that may
    /// log in, one `"role" "SCRAM-SHA-256$..."` line each (pgbouncer's auth_file format, as
    /// in pg_authid.rolpassword). pgwake's proxies need `get` on it (deploy/README.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles_secret: Option<RolesSecretRef>,
}

/// `spec.rolesSecret`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolesSecretRef {
    /// Name of the Secret, in the endpoint's namespace.
    pub name: String,
    /// Key in the Secret's data; unset: "roles".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl RolesSecretRef {
    /// The key read when `key` is unset.
    pub const DEFAULT_KEY: &'static str = "roles";

    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or(Self::DEFAULT_KEY)
    }
}

/// How a `PgwakeEndpoint`'s clients log in, as its [`AuthSink`] is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointAuthSpec {
    pub mode: AuthMode,
    /// Where its verifiers are; `None` with `mode` scram: nobody can log in.
    pub roles_secret: Option<RolesSecretRef>,
}

/// Told how each routed `PgwakeEndpoint`'s clients log in, before its route enters the table
/// (so that no login reaches an endpoint whose mode the proxy does not know yet), on every
/// event for it (unchanged specs included: implementations compare), and with `None` once it
/// is no longer routed by this source.
pub trait AuthSink: Send + Sync {
    fn endpoint_auth(&self, id: &EndpointId, auth: Option<&EndpointAuthSpec>);
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeTemplate {
    /// Container image that runs Postgres, e.g. "postgres:16".
    pub image: String,
    /// Postgres's port in the container; unset uses pgwake's `kubernetes.port` (5432).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Overrides the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Overrides the image's arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables of the Postgres container.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Name of a Secret in this namespace whose keys become environment variables (for
    /// POSTGRES_PASSWORD and the like).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_secret: Option<String>,
    /// Resource requests and limits, as Kubernetes quantities.
    #[serde(default, skip_serializing_if = "ComputeResources::is_empty")]
    pub resources: ComputeResources,
    /// A PersistentVolumeClaim that keeps the data directory across suspends. Leave it out
    /// only for computes whose data lives elsewhere (Neon): without it, a suspend loses the
    /// data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<ComputeStorage>,
    /// Tolerations of the compute's pod, as in a pod spec (e.g. to run on nodes tainted for
    /// databases).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<serde_json::Value>,
    /// Affinity of the compute's pod, as in a pod spec (node affinity for zones or instance
    /// types, pod anti-affinity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<serde_json::Value>,
    /// PriorityClass of the compute's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Annotations on the compute's pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct ComputeResources {
    /// e.g. {"cpu": "250m", "memory": "256Mi"}
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

impl ComputeResources {
    fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.limits.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeStorage {
    /// Size of the volume, e.g. "1Gi". Changing it later has no effect on an existing claim.
    pub size: String,
    /// StorageClass of the claim; unset uses the cluster's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NeonTimeline {
    pub tenant_id: String,
    pub timeline_id: String,
    /// e.g. "postgresql://no_user@pageserver:6400"
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pageserver_connstring: Option<String>,
}

/// What the compute manager last did with the endpoint. Every field is always written (a
/// `null` clears it), so a merge patch of the whole status replaces it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PgwakeEndpointStatus {
    /// Suspended, Starting, Running or Suspending.
    #[serde(default)]
    pub state: EndpointState,
    /// Where the running compute accepts connections (pod IP and port).
    pub address: Option<String>,
    /// When a client last woke the compute or the compute was last suspended (RFC 3339).
    pub last_activity: Option<String>,
    /// `Ready` (the compute accepts connections), `Suspended` (scaled to zero) and `Failed`
    /// (its last start failed: `reason` and `message` say why, until a start succeeds), in the
    /// usual Kubernetes shape, for `kubectl wait --for=condition=Ready` and for tools that
    /// read conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<EndpointCondition>,
    /// The `metadata.generation` whose spec the compute was last started from. Left out (so
    /// kept as stored) when the manager does not know it yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One of the status conditions ([`PgwakeEndpointStatus::conditions`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointCondition {
    /// Ready, Suspended or Failed.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// CamelCase, for machines: e.g. Unschedulable, ImagePullBackOff, StartTimedOut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For people: what Kubernetes said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

impl PgwakeEndpointStatus {
    /// The status for `state`: its conditions follow from it, and from `failure`, the
    /// `(reason, message)` of a start that just failed. A condition whose status is unchanged
    /// since `previous` keeps its transition time.
    pub fn new(
        state: EndpointState,
        address: Option<String>,
        failure: Option<(String, String)>,
        now: &str,
        previous: Option<&PgwakeEndpointStatus>,
    ) -> Self {
        let condition = |type_: &str, on: bool, reason: Option<String>, message: Option<String>| {
            let status = if on { "True" } else { "False" }.to_string();
            let since = previous
                .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
                .filter(|c| c.status == status)
                .and_then(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.to_string());
            EndpointCondition {
                type_: type_.to_string(),
                status,
                reason,
                message,
                last_transition_time: Some(since),
            }
        };
        let failed = failure.is_some();
        let (reason, message) = failure.unzip();
        Self {
            state,
            address,
            last_activity: Some(now.to_string()),
            conditions: vec![
                condition("Ready", state == EndpointState::Running, None, None),
                condition("Suspended", state == EndpointState::Suspended, None, None),
                condition("Failed", failed, reason, message),
            ],
            observed_generation: None,
        }
    }

    /// The condition of `type_`, if any.
    pub fn condition(&self, type_: &str) -> Option<&EndpointCondition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum EndpointState {
    #[default]
    Suspended,
    Starting,
    Running,
    Suspending,
}

/// Why a resource cannot be routed. Reported all at once, one line each, in the source's log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrdError {
    #[error("name {name:?} is not a valid endpoint id: {reason}")]
    BadName {
        name: String,
        reason: InvalidEndpointId,
    },
    #[error("spec.compute.image is empty")]
    NoImage,
    #[error("spec.idleTimeout {value:?}: {reason}")]
    BadIdleTimeout { value: String, reason: String },
    #[error("spec.allowlist entry {0:?} is neither a network (10.0.0.0/8) nor an address")]
    BadNetwork(String),
    #[error("spec.compute.env sets {0}, which spec.neon also sets")]
    EnvConflict(&'static str),
}

impl PgwakeEndpoint {
    /// How clients log in: `auth` as written, else scram when there is a `rolesSecret` to
    /// check against, else passthrough (the rule of the config file's `roles_file`).
    pub fn auth_spec(&self) -> EndpointAuthSpec {
        let roles_secret = self.spec.roles_secret.clone();
        let mode = self.spec.auth.unwrap_or(if roles_secret.is_some() {
            AuthMode::Scram
        } else {
            AuthMode::Passthrough
        });
        EndpointAuthSpec { mode, roles_secret }
    }

    /// The endpoint id: the resource's name.
    pub fn endpoint_id(&self) -> Result<EndpointId, CrdError> {
        let name = self.name_any();
        EndpointId::parse(&name).map_err(|reason| CrdError::BadName { name, reason })
    }

    /// The routing entry for this resource, or every reason it has none.
    pub fn endpoint_config(&self) -> Result<EndpointConfig, Vec<CrdError>> {
        let mut errors = Vec::new();
        let spec = &self.spec;
        let id = self.endpoint_id().map_err(|e| errors.push(e)).ok();
        if spec.compute.image.trim().is_empty() {
            errors.push(CrdError::NoImage);
        }
        let idle_timeout = match &spec.idle_timeout {
            None => None,
            Some(v) => match humantime_serde::re::humantime::parse_duration(v) {
                Ok(d) if d > Duration::ZERO => Some(d),
                Ok(_) => {
                    errors.push(CrdError::BadIdleTimeout {
                        value: v.clone(),
                        reason: "must be more than zero".into(),
                    });
                    None
                }
                Err(e) => {
                    errors.push(CrdError::BadIdleTimeout {
                        value: v.clone(),
                        reason: e.to_string(),
                    });
                    None
                }
            },
        };
        let allow = spec
            .allowlist
            .iter()
            .filter_map(|s| match parse_network(s) {
                Some(n) => Some(n),
                None => {
                    errors.push(CrdError::BadNetwork(s.clone()));
                    None
                }
            })
            .collect();
        let mut env = spec.compute.env.clone();
        if let Some(neon) = &spec.neon {
            let vars = [
                (NEON_TENANT_ENV, Some(&neon.tenant_id)),
                (NEON_TIMELINE_ENV, Some(&neon.timeline_id)),
                (NEON_PAGESERVER_ENV, neon.pageserver_connstring.as_ref()),
            ];
            for (name, value) in vars {
                let Some(value) = value else { continue };
                if env.insert(name.to_string(), value.clone()).is_some() {
                    errors.push(CrdError::EnvConflict(name));
                }
            }
        }
        let (Some(id), true) = (id, errors.is_empty()) else {
            return Err(errors);
        };
        let c = &spec.compute;
        Ok(EndpointConfig {
            id,
            backend: BackendSpec::Kubernetes {
                image: c.image.clone(),
                port: c.port,
                command: c.command.clone(),
                args: c.args.clone(),
                env,
                env_secret: c.env_secret.clone(),
                requests: c.resources.requests.clone(),
                limits: c.resources.limits.clone(),
                storage: c.storage.as_ref().map(|s| s.size.clone()),
                storage_class: c.storage.as_ref().and_then(|s| s.storage_class.clone()),
                pod: PodOverrides {
                    tolerations: c.tolerations.clone(),
                    affinity: c.affinity.clone(),
                    priority_class_name: c.priority_class_name.clone(),
                    annotations: c.pod_annotations.clone(),
                },
            },
            idle_timeout,
            // Light sleep is for local computes; Kubernetes ones cannot be frozen.
            deep_sleep_after: None,
            allow,
            max_connections: spec.max_connections.map(|n| n as usize),
            auth: Some(self.auth_spec().mode),
            roles_file: None,
        })
    }
}

/// "10.0.0.0/8" or a bare address, which means just that host.
fn parse_network(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Go-style and humantime durations as pgwake reads them ("90s", "5m", "1h 30m").
const DURATION_RULE: &str =
    "self.matches('^([0-9]+ ?(ms|s|sec|secs|m|min|mins|h|hr|hrs|hour|hours|d|day|days) ?)+$')";

/// The CRD: what kube derives from the types, plus what the derive cannot express: the
/// `pgwake` category (`kubectl get pgwake`), and CEL validation (`x-kubernetes-validations`)
/// so that the API server rejects what pgwake would refuse to route, at `kubectl apply`,
/// instead of a warning in pgwake's log: the name as an endpoint id, durations, allowlist
/// networks, resource quantities, and storage changes that cannot work (a StatefulSet's claim
/// templates are immutable: adding storage later would leave the data on ephemeral disk,
/// removing it would hide the volume). CIDR and IP checks need Kubernetes 1.31.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = PgwakeEndpoint::crd();
    crd.spec.names.categories = Some(vec!["pgwake".to_string()]);
    for version in &mut crd.spec.versions {
        let root = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .expect("kube derives a schema");
        add_rule(
            root,
            &format!(
                "self.metadata.name.size() <= {} && self.metadata.name.matches('^[a-z0-9]([a-z0-9-]*[a-z0-9])?$')",
                EndpointId::MAX_LEN
            ),
            "metadata.name is the endpoint id: up to 63 of [a-z0-9-], not starting or ending with '-'",
        );
        let spec = prop(root, "spec");
        add_rule(
            prop(spec, "idleTimeout"),
            DURATION_RULE,
            "idleTimeout is a duration such as \"90s\", \"5m\" or \"1h 30m\"",
        );
        add_rule(
            prop(spec, "allowlist")
                .items
                .as_mut()
                .and_then(|i| match i {
                    JSONSchemaPropsOrArray::Schema(s) => Some(s.as_mut()),
                    JSONSchemaPropsOrArray::Schemas(_) => None,
                })
                .expect("allowlist has an item schema"),
            "isCIDR(self) || isIP(self)",
            "allowlist entries are networks (10.0.0.0/8) or addresses (192.0.2.7)",
        );
        let compute = prop(spec, "compute");
        add_rule(
            compute,
            "has(self.storage) == has(oldSelf.storage)",
            "storage cannot be added to or removed from an existing endpoint: create a new endpoint",
        );
        let storage = prop(compute, "storage");
        add_rule(
            storage,
            "self == oldSelf",
            "storage is immutable: the volume claim is created once",
        );
        add_rule(
            prop(storage, "size"),
            "isQuantity(self)",
            "size is a quantity such as 1Gi",
        );
        // Pod-spec JSON passed through: a structural schema that keeps every field (the API
        // server checks them when the StatefulSet is written).
        let any_object = || JSONSchemaProps {
            type_: Some("object".into()),
            x_kubernetes_preserve_unknown_fields: Some(true),
            ..JSONSchemaProps::default()
        };
        let tolerations = prop(compute, "tolerations");
        tolerations.items = Some(JSONSchemaPropsOrArray::Schema(Box::new(any_object())));
        let affinity = prop(compute, "affinity");
        *affinity = JSONSchemaProps {
            description: affinity.description.take(),
            nullable: affinity.nullable,
            ..any_object()
        };
        // The derive describes the enum, not the field.
        prop(spec, "auth").description = Some(
            "How clients log in: \"scram\" (checked by pgwake with the verifiers of rolesSecret, before any wake) or \"passthrough\" (the compute checks, after the wake). Unset: \"scram\" with a rolesSecret, else \"passthrough\".".into(),
        );
        add_rule(
            spec,
            "!has(self.auth) || self.auth != 'scram' || has(self.rolesSecret)",
            "auth: scram needs a rolesSecret holding the roles' verifiers",
        );
        let secret = prop(spec, "rolesSecret");
        add_rule(
            prop(secret, "name"),
            "self.size() <= 253 && self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')",
            "name is a Secret's name",
        );
        add_rule(
            prop(secret, "key"),
            "self.size() <= 253 && self.matches('^[-._a-zA-Z0-9]+$')",
            "key is a key of the Secret's data",
        );
        let compute = prop(spec, "compute");
        let resources = prop(compute, "resources");
        for key in ["requests", "limits"] {
            add_rule(
                prop(resources, key),
                "self.all(k, isQuantity(self[k]))",
                "resources are quantities such as 250m or 256Mi",
            );
        }
    }
    crd
}

fn prop<'a>(schema: &'a mut JSONSchemaProps, name: &str) -> &'a mut JSONSchemaProps {
    schema
        .properties
        .as_mut()
        .and_then(|p| p.get_mut(name))
        .unwrap_or_else(|| panic!("no property {name} in the derived schema"))
}

fn add_rule(schema: &mut JSONSchemaProps, rule: &str, message: &str) {
    schema
        .x_kubernetes_validations
        .get_or_insert_with(Vec::new)
        .push(ValidationRule {
            rule: rule.to_string(),
            message: Some(message.to_string()),
            ..ValidationRule::default()
        });
}

/// The CRD as YAML, exactly as committed in `deploy/base/crd.yaml` (a test keeps the two equal).
pub fn crd_yaml() -> String {
    let crd = crd();
    let body = serde_yaml::to_string(&crd).expect("a CRD always serializes");
    format!(
        "# Generated from router/src/crd.rs by `cargo run -p pgwake-router --bin crdgen`; do not edit.\n{body}"
    )
}

/// Applies watcher events to a routing table. Only ids this source put in the table are ever
/// changed or removed: an id the config file already routes wins, and the resource is skipped
/// with a warning.
#[derive(Default)]
pub struct CrdSync {
    owned: HashSet<EndpointId>,
    /// Ids seen since the last `Init` (a re-list), to drop the ones deleted while the watch
    /// was down once the list is complete.
    relisted: Option<HashSet<EndpointId>>,
    auth: Option<Arc<dyn AuthSink>>,
}

impl std::fmt::Debug for CrdSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrdSync")
            .field("owned", &self.owned)
            .field("relisted", &self.relisted)
            .field("auth", &self.auth.is_some())
            .finish()
    }
}

impl CrdSync {
    pub fn new() -> Self {
        Self::default()
    }

    /// A sync that also tells `auth` how each routed endpoint's clients log in.
    pub fn with_auth(auth: Arc<dyn AuthSink>) -> Self {
        Self {
            auth: Some(auth),
            ..Self::default()
        }
    }

    fn forget(&mut self, table: &RoutingTable, id: &EndpointId) {
        table.remove_unless_file_owned(id);
        self.owned.remove(id);
        if let Some(a) = &self.auth {
            a.endpoint_auth(id, None);
        }
    }

    /// The ids this source currently routes.
    pub fn owned(&self) -> impl Iterator<Item = &EndpointId> {
        self.owned.iter()
    }

    pub fn apply(&mut self, table: &RoutingTable, event: watcher::Event<PgwakeEndpoint>) {
        match event {
            watcher::Event::Init => self.relisted = Some(HashSet::new()),
            watcher::Event::InitApply(ep) => {
                if let Some(id) = self.upsert(table, &ep) {
                    if let Some(seen) = &mut self.relisted {
                        seen.insert(id);
                    }
                }
            }
            watcher::Event::InitDone => {
                let Some(seen) = self.relisted.take() else {
                    return;
                };
                let gone: Vec<EndpointId> = self.owned.difference(&seen).cloned().collect();
                for id in gone {
                    info!(endpoint = %id, "PgwakeEndpoint gone; endpoint removed");
                    self.forget(table, &id);
                }
            }
            watcher::Event::Apply(ep) => {
                self.upsert(table, &ep);
            }
            watcher::Event::Delete(ep) => {
                let Ok(id) = ep.endpoint_id() else { return };
                if self.owned.contains(&id) {
                    info!(endpoint = %id, "PgwakeEndpoint deleted; endpoint removed");
                    self.forget(table, &id);
                }
            }
        }
    }

    /// The config file took `id` over: its auth is the file's now.
    fn disown(&mut self, id: &EndpointId) {
        self.owned.remove(id);
        if let Some(a) = &self.auth {
            a.endpoint_auth(id, None);
        }
    }

    /// Returns the id if the resource is (still) routed by this source.
    fn upsert(&mut self, table: &RoutingTable, ep: &PgwakeEndpoint) -> Option<EndpointId> {
        let name = ep.name_any();
        let config = match ep.endpoint_config() {
            Ok(c) => c,
            Err(errors) => {
                for e in &errors {
                    warn!(resource = %name, error = %e, "PgwakeEndpoint not routed");
                }
                // Like a bad config file on reload: the last good definition stays in force.
                let id = ep.endpoint_id().ok()?;
                return self.owned.contains(&id).then_some(id);
            }
        };
        let route = Route::from(config);
        let id = route.endpoint.clone();
        if table.is_file_owned(&id) {
            warn!(endpoint = %id, "PgwakeEndpoint skipped: the config file already defines this endpoint");
            self.disown(&id);
            return None;
        }
        // Before the route: a login that finds the route finds its auth mode too.
        if let Some(a) = &self.auth {
            a.endpoint_auth(&id, Some(&ep.auth_spec()));
        }
        match table.lookup(&id) {
            Some(old) if *old == route => return Some(id),
            Some(_) => info!(endpoint = %id, "PgwakeEndpoint changed"),
            None => info!(endpoint = %id, "PgwakeEndpoint added"),
        }
        if !table.upsert_unless_file_owned(route) {
            self.disown(&id);
            return None;
        }
        self.owned.insert(id.clone());
        Some(id)
    }
}

/// Watches the `PgwakeEndpoint`s in `namespace` (optionally only those matching
/// `label_selector`) and keeps their routes in `table`. Returns the reflector's store (the
/// resources as last seen; `store.wait_until_ready()` resolves after the first full list) and
/// the future that does the work, to be spawned; it runs until dropped. API errors are retried
/// with the watcher's default backoff and logged, and the table keeps its last routes meanwhile.
pub fn crd_source(
    client: Client,
    namespace: &str,
    label_selector: Option<&str>,
    table: Arc<RoutingTable>,
) -> (
    Store<PgwakeEndpoint>,
    impl Future<Output = ()> + Send + 'static,
) {
    crd_source_with_auth(client, namespace, label_selector, table, None)
}

/// [`crd_source`] that also tells `auth` how each endpoint's clients log in
/// ([`CrdSync::with_auth`]).
pub fn crd_source_with_auth(
    client: Client,
    namespace: &str,
    label_selector: Option<&str>,
    table: Arc<RoutingTable>,
    auth: Option<Arc<dyn AuthSink>>,
) -> (
    Store<PgwakeEndpoint>,
    impl Future<Output = ()> + Send + 'static,
) {
    let api: Api<PgwakeEndpoint> = Api::namespaced(client, namespace);
    let mut cfg = watcher::Config::default();
    if let Some(sel) = label_selector {
        cfg = cfg.labels(sel);
    }
    let (reader, writer) = reflector::store();
    let events = watcher(api, cfg).default_backoff().reflect(writer);
    let ns = namespace.to_string();
    let run = async move {
        let mut sync = match auth {
            Some(a) => CrdSync::with_auth(a),
            None => CrdSync::new(),
        };
        let mut events = std::pin::pin!(events);
        info!(namespace = %ns, "watching PgwakeEndpoints");
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => sync.apply(&table, event),
                Err(e) => {
                    warn!(namespace = %ns, error = %e, "watching PgwakeEndpoints failed; retrying")
                }
            }
        }
        debug!("PgwakeEndpoint watch ended");
    };
    (reader, run)
}

/// [`crd_source`] for callers that do not need the store.
pub async fn run_crd_source(
    client: Client,
    namespace: &str,
    label_selector: Option<&str>,
    table: Arc<RoutingTable>,
) {
    crd_source(client, namespace, label_selector, table).1.await
}

#[cfg(test)]
#[path = "crd_tests.rs"]
mod tests;
