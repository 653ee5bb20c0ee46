//! Endpoints on demand: "create a branch, get a connection string". A [`Provisioner`] makes an
//! endpoint's compute and data exist, durably, for one kind of backend; [`Endpoints`] (the
//! management API's side) picks the id, checks the request against the routing table, calls
//! the provisioner of the right backend and routes the result.
//!
//! - `ids`: `ep-<adjective>-<noun>-<number>` ids, Neon's shape;
//! - `state`: the local backend's durable list of the endpoints it created;
//! - `local`: the [`Provisioner`] of the local backend (branches as copies of the parent's
//!   data directory);
//! - `service`: [`Endpoints`].

mod ids;
mod kubernetes;
mod local;
mod service;
mod state;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pgwake_router::{AuthMode, EndpointConfig, EndpointId, Route};

pub use ids::generate_id;
pub use kubernetes::KubernetesProvisioner;
pub use local::LocalProvisioner;
pub use service::{ConnectInfo, CreateBody, CreatedBody, EndpointBody, EndpointOrigin, Endpoints};
pub use state::{StateFile, StateFileError, StoredEndpoint};

/// What a new endpoint is to be: its id (already chosen and checked against the routing
/// table), its parent when it is a branch, and its settings (the parent's where the caller
/// gave none).
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub id: EndpointId,
    /// The parent's route as the table has it.
    pub parent: Option<Arc<Route>>,
    /// Where on the parent's history the branch starts (`X/Y`; Neon branches only). `None`:
    /// its present state.
    pub lsn: Option<String>,
    pub settings: EndpointSettings,
}

/// The per-endpoint keys of an `[[endpoint]]` that an API-created endpoint may set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSettings {
    pub idle_timeout: Option<Duration>,
    pub deep_sleep_after: Option<Duration>,
    pub max_connections: Option<usize>,
    pub auth: Option<AuthMode>,
    pub roles_file: Option<std::path::PathBuf>,
    pub allow: Vec<ipnet::IpNet>,
    /// `postgres -c` settings (local computes).
    pub settings: BTreeMap<String, String>,
}

/// A created endpoint, as the routing table and the verifier store take it.
#[derive(Debug, Clone)]
pub struct Created {
    pub config: EndpointConfig,
}

/// Stops `id`'s compute and keeps it stopped for as long as the returned hold lives, so that
/// its endpoint can go without a wake starting it again meanwhile; `Busy` (with how many
/// sessions use it) if clients are on it.
async fn hold_for_delete(
    manager: &Arc<crate::Manager>,
    id: &EndpointId,
    timeout: Duration,
) -> Result<crate::SuspendedHold, ProvisionError> {
    // Stops the compute unless clients use it (then the hold says how many).
    manager.suspend(id).await;
    let held = manager
        .hold(id, timeout)
        .await
        .map_err(|e| hold_error(id, e))?;
    match held {
        crate::Held::Suspended(hold) => Ok(hold),
        crate::Held::Running { lease, .. } => {
            // Less the hold's own lease.
            let sessions = manager.stats(id).map_or(1, |s| {
                (s.attached + s.remote_sessions).saturating_sub(1).max(1)
            });
            drop(lease);
            Err(ProvisionError::Busy {
                id: id.clone(),
                sessions,
            })
        }
    }
}

/// A hold on `id` that failed: the endpoint kept starting or suspending past the wait, or the
/// manager is shutting down.
fn hold_error(id: &EndpointId, e: crate::WakeError) -> ProvisionError {
    ProvisionError::internal(format!("hold endpoint {id}"), e)
}

/// Makes endpoints exist on one backend, durably (they are routed again after a restart), and
/// removes them. Implementations: [`LocalProvisioner`]; the Kubernetes/Neon one plugs in at
/// [`Provisioners::kubernetes`].
#[async_trait]
pub trait Provisioner: Send + Sync + 'static {
    /// Creates `req.id`: a branch of `req.parent` (a consistent copy of its data at this
    /// moment) or a new empty endpoint. On error nothing of it is left behind.
    async fn create(&self, req: CreateRequest) -> Result<Created, ProvisionError>;
    /// Stops `id`'s compute (refused while sessions use it) and forgets it; removes its data
    /// too when `remove_data`.
    async fn delete(&self, id: &EndpointId, remove_data: bool) -> Result<(), ProvisionError>;
    /// The endpoints this provisioner created and still keeps, to route at start.
    fn created(&self) -> Vec<StoredEndpoint>;
    /// Whether anything of `id` exists on this backend (data, a resource) that a new endpoint
    /// of that id would collide with.
    fn exists(&self, id: &EndpointId) -> Result<bool, ProvisionError>;
}

/// Which backend kind a new endpoint goes to: its parent's, else the request's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Local,
    Kubernetes,
    Static,
}

impl BackendKind {
    pub fn of(spec: &pgwake_router::BackendSpec) -> Self {
        match spec {
            pgwake_router::BackendSpec::Local { .. } => Self::Local,
            pgwake_router::BackendSpec::Kubernetes { .. } => Self::Kubernetes,
            pgwake_router::BackendSpec::Static { .. } => Self::Static,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Kubernetes => "kubernetes",
            Self::Static => "static",
        }
    }
}

/// The provisioner of each backend kind; `None` where endpoints cannot be created (yet).
#[derive(Clone, Default)]
pub struct Provisioners {
    pub local: Option<Arc<dyn Provisioner>>,
    /// PgwakeEndpoints (and Neon timelines for branches). Not built yet: requests for this
    /// backend get [`ProvisionErrorKind::Unsupported`].
    pub kubernetes: Option<Arc<dyn Provisioner>>,
}

impl Provisioners {
    pub fn for_kind(&self, kind: BackendKind) -> Result<&Arc<dyn Provisioner>, ProvisionError> {
        let p = match kind {
            BackendKind::Local => &self.local,
            BackendKind::Kubernetes => &self.kubernetes,
            // Nothing to create: a static endpoint is an address, written in the file.
            BackendKind::Static => &None,
        };
        p.as_ref().ok_or(ProvisionError::Unsupported(kind))
    }

    fn all(&self) -> impl Iterator<Item = &Arc<dyn Provisioner>> {
        [&self.local, &self.kubernetes].into_iter().flatten()
    }
}

/// What was wrong, for the status code and the `kind` of the API's error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisionErrorKind {
    InvalidRequest,
    UnknownEndpoint,
    Duplicate,
    /// The endpoint is defined in the config file: edit the file instead.
    Configured,
    /// Sessions use the endpoint's compute.
    Busy,
    /// Refused as things stand (e.g. a timeline that still has branches).
    Conflict,
    NoSpace,
    CopyFailed,
    Unsupported,
    /// Storage or the cluster did not answer; the same request may succeed later.
    Unavailable,
    Internal,
}

impl ProvisionErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::UnknownEndpoint => "unknown_endpoint",
            Self::Duplicate => "duplicate_endpoint",
            Self::Configured => "configured_endpoint",
            Self::Busy => "endpoint_busy",
            Self::Conflict => "conflict",
            Self::NoSpace => "insufficient_storage",
            Self::CopyFailed => "copy_failed",
            Self::Unsupported => "unsupported_backend",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// Whether the same request may succeed later unchanged.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::Busy | Self::NoSpace | Self::CopyFailed | Self::Unavailable | Self::Internal
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("endpoint \"{0}\" does not exist")]
    UnknownEndpoint(EndpointId),
    /// Something the request names does not exist (the message says what).
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("endpoint \"{0}\" already exists")]
    Duplicate(EndpointId),
    #[error("endpoint \"{0}\" is defined in the config file; remove it there (and reload)")]
    Configured(EndpointId),
    #[error("endpoint \"{id}\" has {sessions} client sessions; retry once they have ended")]
    Busy { id: EndpointId, sessions: usize },
    #[error("creating endpoints on the {} backend is not supported by this pgwake", .0.as_str())]
    Unsupported(BackendKind),
    /// Copying the parent's data failed; `no_space` when the disk was full.
    #[error("copying the data of \"{parent}\" failed: {source}")]
    Copy {
        parent: EndpointId,
        no_space: bool,
        #[source]
        source: crate::BackendError,
    },
    #[error("{context}: {message}")]
    Internal { context: String, message: String },
}

impl ProvisionError {
    pub fn kind(&self) -> ProvisionErrorKind {
        match self {
            Self::InvalidRequest(_) => ProvisionErrorKind::InvalidRequest,
            Self::UnknownEndpoint(_) | Self::Missing(_) => ProvisionErrorKind::UnknownEndpoint,
            Self::Conflict(_) => ProvisionErrorKind::Conflict,
            Self::Unavailable(_) => ProvisionErrorKind::Unavailable,
            Self::Duplicate(_) => ProvisionErrorKind::Duplicate,
            Self::Configured(_) => ProvisionErrorKind::Configured,
            Self::Busy { .. } => ProvisionErrorKind::Busy,
            Self::Unsupported(_) => ProvisionErrorKind::Unsupported,
            Self::Copy { no_space: true, .. } => ProvisionErrorKind::NoSpace,
            Self::Copy { .. } => ProvisionErrorKind::CopyFailed,
            Self::Internal { .. } => ProvisionErrorKind::Internal,
        }
    }

    /// What the API's caller is told: internals (paths, tool output) stay in the log.
    pub fn user_message(&self) -> String {
        match self {
            Self::Copy {
                parent,
                no_space: true,
                ..
            } => format!(
                "not enough disk space to copy the data of \"{parent}\"; nothing was created"
            ),
            Self::Copy { parent, .. } => format!(
                "copying the data of \"{parent}\" failed (see the pgwake log); nothing was created"
            ),
            Self::Internal { .. } => "internal error (see the pgwake log)".into(),
            other => other.to_string(),
        }
    }

    pub(crate) fn internal(context: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::Internal {
            context: context.into(),
            message: e.to_string(),
        }
    }
}
