//! Endpoints created and deleted on request: the `PgwakeEndpoint` of a new endpoint, or of a
//! branch of a Neon endpoint, built from the caller's spec or from the parent's, and the API
//! calls that create, read and delete them. Routing follows from the resource (the router's
//! reflector), and so does the compute (the backend builds the StatefulSet on the first wake).
//!
//! Deleting a resource deletes its StatefulSet and volume only as configured for any deleted
//! endpoint (`delete_with_endpoint`, `delete_volume_with_endpoint`): a StatefulSet made with the
//! endpoint as its owner goes with it, others stay (at 0 replicas once suspended).

use std::collections::BTreeMap;

use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use pgwake_router::crd::{NeonTimeline, PgwakeEndpoint, PgwakeEndpointSpec};
use pgwake_router::EndpointId;
use tracing::{debug, info};

use super::{backoff, KubernetesConfig, FIELD_MANAGER};
use crate::ErrorSource;

/// The endpoint a branch was made from (a label, so that `-l pgwake.io/parent=main` lists a
/// parent's branches).
pub const LABEL_PARENT: &str = "pgwake.io/parent";
/// The timeline of the parent that the branch's timeline starts from.
pub const ANNOTATION_PARENT_TIMELINE: &str = "pgwake.io/parent-timeline";
/// The LSN the branch starts at, when the caller gave one (else the parent's head then).
pub const ANNOTATION_BRANCH_LSN: &str = "pgwake.io/branch-lsn";

/// What kind of failure a [`ProvisionError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProvisionErrorKind {
    AlreadyExists,
    NotFound,
    /// The spec would not route, or the API server's validation refused it.
    Invalid,
    /// A branch was asked of an endpoint without `spec.neon`.
    NotNeon,
    /// The manager's Role does not allow the call.
    Forbidden,
    /// 5xx, 429, timeouts, connection errors, after every try.
    Unavailable,
    Internal,
}

impl ProvisionErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AlreadyExists => "already_exists",
            Self::NotFound => "not_found",
            Self::Invalid => "invalid",
            Self::NotNeon => "not_neon",
            Self::Forbidden => "forbidden",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    pub fn source(self) -> ErrorSource {
        match self {
            Self::AlreadyExists | Self::NotFound | Self::Invalid | Self::NotNeon => {
                ErrorSource::Client
            }
            Self::Forbidden | Self::Unavailable | Self::Internal => ErrorSource::Internal,
        }
    }
}

/// A `PgwakeEndpoint` could not be built, created, read or deleted. `Display` is for the
/// operator's log; [`ProvisionError::client_message`] for API clients.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("endpoint {0} already exists")]
    AlreadyExists(EndpointId),
    #[error("endpoint {0} not found")]
    NotFound(EndpointId),
    #[error("endpoint {id}: {}", reasons.join("; "))]
    Invalid { id: String, reasons: Vec<String> },
    #[error("endpoint {0} is not on Neon storage (it has no spec.neon)")]
    NotNeon(EndpointId),
    #[error("the compute manager may not {verb} PgwakeEndpoints (add it to its Role, deploy/README.md): {message}")]
    Forbidden { verb: &'static str, message: String },
    #[error("Kubernetes API unavailable ({verb} PgwakeEndpoint): {message}")]
    Unavailable { verb: &'static str, message: String },
    #[error("Kubernetes API ({verb} PgwakeEndpoint): {message}")]
    Internal { verb: &'static str, message: String },
}

impl ProvisionError {
    pub fn kind(&self) -> ProvisionErrorKind {
        match self {
            Self::AlreadyExists(_) => ProvisionErrorKind::AlreadyExists,
            Self::NotFound(_) => ProvisionErrorKind::NotFound,
            Self::Invalid { .. } => ProvisionErrorKind::Invalid,
            Self::NotNeon(_) => ProvisionErrorKind::NotNeon,
            Self::Forbidden { .. } => ProvisionErrorKind::Forbidden,
            Self::Unavailable { .. } => ProvisionErrorKind::Unavailable,
            Self::Internal { .. } => ProvisionErrorKind::Internal,
        }
    }

    pub fn retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// What an API client may be told: its own ids and the spec's problems, never the API
    /// server's text.
    pub fn client_message(&self) -> String {
        match self {
            Self::AlreadyExists(_) | Self::NotFound(_) | Self::NotNeon(_) => self.to_string(),
            Self::Invalid { id, reasons } if !reasons.is_empty() => {
                format!("endpoint {id}: {}", reasons.join("; "))
            }
            Self::Invalid { id, .. } => format!("endpoint {id}: refused by validation"),
            Self::Forbidden { .. } => {
                "the compute manager is not allowed to manage endpoints".into()
            }
            Self::Unavailable { .. } => "Kubernetes is unavailable; try again later".into(),
            Self::Internal { .. } => "internal error".into(),
        }
    }
}

/// The resource of a new endpoint `id` with `spec`; `labels` are added to its metadata (e.g.
/// to match `[kubernetes] endpoint_selector`). Refused if it would not route.
pub fn new_endpoint(
    id: &EndpointId,
    spec: PgwakeEndpointSpec,
    labels: BTreeMap<String, String>,
    namespace: &str,
) -> Result<PgwakeEndpoint, ProvisionError> {
    let mut ep = PgwakeEndpoint::new(id.as_str(), spec);
    ep.metadata.namespace = Some(namespace.to_string());
    if !labels.is_empty() {
        ep.metadata.labels = Some(labels);
    }
    checked(ep)
}

/// The resource of `new_id`, a branch of `parent` served by `timeline` of the parent's tenant:
/// the parent's spec (compute settings, logins, limits) and labels, with `spec.neon` pointing
/// at the new timeline on the parent's pageserver, and the parent recorded
/// ([`LABEL_PARENT`], [`ANNOTATION_PARENT_TIMELINE`], [`ANNOTATION_BRANCH_LSN`]).
pub fn branch_endpoint(
    parent: &PgwakeEndpoint,
    new_id: &EndpointId,
    timeline: &str,
    lsn: Option<&str>,
) -> Result<PgwakeEndpoint, ProvisionError> {
    let parent_id = parent.endpoint_id().map_err(|e| ProvisionError::Invalid {
        id: parent.metadata.name.clone().unwrap_or_default(),
        reasons: vec![e.to_string()],
    })?;
    let Some(neon) = &parent.spec.neon else {
        return Err(ProvisionError::NotNeon(parent_id));
    };
    let mut spec = parent.spec.clone();
    spec.neon = Some(NeonTimeline {
        tenant_id: neon.tenant_id.clone(),
        timeline_id: timeline.to_string(),
        pageserver_connstring: neon.pageserver_connstring.clone(),
    });
    let mut ep = PgwakeEndpoint::new(new_id.as_str(), spec);
    ep.metadata.namespace = parent.metadata.namespace.clone();
    let mut labels = parent.metadata.labels.clone().unwrap_or_default();
    labels.insert(LABEL_PARENT.into(), parent_id.to_string());
    ep.metadata.labels = Some(labels);
    let mut annotations = BTreeMap::from([(
        ANNOTATION_PARENT_TIMELINE.to_string(),
        neon.timeline_id.clone(),
    )]);
    if let Some(lsn) = lsn {
        annotations.insert(ANNOTATION_BRANCH_LSN.into(), lsn.to_string());
    }
    ep.metadata.annotations = Some(annotations);
    checked(ep)
}

/// `ep` if it would route, as the router's reflector will read it.
fn checked(ep: PgwakeEndpoint) -> Result<PgwakeEndpoint, ProvisionError> {
    match ep.endpoint_config() {
        Ok(_) => Ok(ep),
        Err(errors) => Err(ProvisionError::Invalid {
            id: ep.metadata.name.clone().unwrap_or_default(),
            reasons: errors.iter().map(ToString::to_string).collect(),
        }),
    }
}

/// The `PgwakeEndpoint`s of one namespace, created, read and deleted with the backend's retry
/// rules (`api_retries`, `retry_backoff`). Cheap to clone.
#[derive(Clone)]
pub struct EndpointResources {
    api: Api<PgwakeEndpoint>,
    namespace: String,
    cfg: KubernetesConfig,
}

/// A failed call, classified once for all three verbs.
enum Failure {
    Status(u16, String),
    Transport(String),
}

impl EndpointResources {
    /// `cfg.namespace` unset means the client's default namespace.
    pub fn new(client: Client, cfg: &KubernetesConfig) -> Self {
        let namespace = cfg
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        Self {
            api: Api::namespaced(client, &namespace),
            namespace,
            cfg: cfg.clone(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The resource of `id`; [`ProvisionError::NotFound`] if there is none.
    pub async fn get(&self, id: &EndpointId) -> Result<PgwakeEndpoint, ProvisionError> {
        self.get_opt(id)
            .await?
            .ok_or_else(|| ProvisionError::NotFound(id.clone()))
    }

    pub async fn get_opt(&self, id: &EndpointId) -> Result<Option<PgwakeEndpoint>, ProvisionError> {
        let mut failures = 0;
        loop {
            match self.api.get_opt(id.as_str()).await {
                Ok(ep) => return Ok(ep),
                Err(e) => self.after("get", id, e, &mut failures).await?,
            }
        }
    }

    /// Creates `ep` in this namespace. An id in use is [`ProvisionError::AlreadyExists`],
    /// unless an earlier try of this call created it (its answer lost): the resource found
    /// then has exactly `ep`'s spec, labels and annotations.
    pub async fn create(&self, ep: &PgwakeEndpoint) -> Result<PgwakeEndpoint, ProvisionError> {
        let id = ep.endpoint_id().map_err(|e| ProvisionError::Invalid {
            id: ep.metadata.name.clone().unwrap_or_default(),
            reasons: vec![e.to_string()],
        })?;
        let mut ep = ep.clone();
        ep.metadata.namespace = Some(self.namespace.clone());
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let mut failures = 0;
        loop {
            match self.api.create(&pp, &ep).await {
                Ok(created) => {
                    info!(endpoint = %id, "PgwakeEndpoint created");
                    return Ok(created);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    if failures > 0 {
                        if let Some(found) = self.get_opt(&id).await? {
                            if found.spec == ep.spec
                                && found.metadata.labels == ep.metadata.labels
                                && found.metadata.annotations == ep.metadata.annotations
                            {
                                debug!(endpoint = %id, "created by an earlier try");
                                return Ok(found);
                            }
                        }
                    }
                    return Err(ProvisionError::AlreadyExists(id));
                }
                Err(kube::Error::Api(s)) if s.code == 422 => {
                    // The CRD's schema and rules: the same checks `checked` made, and more.
                    return Err(ProvisionError::Invalid {
                        id: id.to_string(),
                        reasons: vec![s.message.clone()],
                    });
                }
                Err(e) => self.after("create", &id, e, &mut failures).await?,
            }
        }
    }

    /// Deletes the resource of `id` ([`ProvisionError::NotFound`] if there is none). Its
    /// StatefulSet and volume follow `delete_with_endpoint` and `delete_volume_with_endpoint`.
    pub async fn delete(&self, id: &EndpointId) -> Result<(), ProvisionError> {
        let mut failures = 0;
        loop {
            match self.api.delete(id.as_str(), &DeleteParams::default()).await {
                Ok(_) => {
                    info!(endpoint = %id, "PgwakeEndpoint deleted");
                    return Ok(());
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    // Gone: by an earlier try of this call whose answer was lost, or never there.
                    return if failures > 0 {
                        Ok(())
                    } else {
                        Err(ProvisionError::NotFound(id.clone()))
                    };
                }
                Err(e) => self.after("delete", id, e, &mut failures).await?,
            }
        }
    }

    /// Waits before the next try of a failed call, or ends it with its error.
    async fn after(
        &self,
        verb: &'static str,
        id: &EndpointId,
        e: kube::Error,
        failures: &mut u32,
    ) -> Result<(), ProvisionError> {
        let failure = match &e {
            kube::Error::Api(s) => Failure::Status(s.code, e.to_string()),
            kube::Error::SerdeError(_) | kube::Error::BuildRequest(_) => {
                Failure::Status(0, e.to_string())
            }
            _ => Failure::Transport(e.to_string()),
        };
        let (retry, message) = match failure {
            Failure::Status(403, m) => return Err(ProvisionError::Forbidden { verb, message: m }),
            Failure::Status(404, _) if verb == "create" => {
                // The namespace, or the CRD, is missing.
                return Err(ProvisionError::Internal {
                    verb,
                    message: e.to_string(),
                });
            }
            Failure::Status(code, m) => (code == 429 || code >= 500, m),
            Failure::Transport(m) => (true, m),
        };
        if !retry {
            return Err(ProvisionError::Internal { verb, message });
        }
        *failures += 1;
        if *failures > self.cfg.api_retries {
            return Err(ProvisionError::Unavailable { verb, message });
        }
        let wait = backoff(&self.cfg, *failures);
        debug!(endpoint = %id, verb, error = %message, ?wait, "PgwakeEndpoint call failed; retrying");
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// One term of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// `[kubernetes] endpoint_selector`, read as Kubernetes reads a label selector: which
/// `PgwakeEndpoint`s this installation routes. An endpoint made here must match it (else
/// nobody would route it), and one that does not is not this installation's to branch or
/// delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSelector {
    terms: Vec<Term>,
}

impl EndpointSelector {
    /// `None` or empty: every endpoint.
    pub fn parse(selector: Option<&str>) -> Result<Self, String> {
        let Some(s) = selector.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(Self::default());
        };
        // Commas separate terms, except inside the parentheses of `in` and `notin`.
        let mut parts = Vec::new();
        let (mut depth, mut start) = (0i32, 0);
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
            if depth < 0 {
                return Err(format!("unbalanced parentheses in {s:?}"));
            }
        }
        if depth != 0 {
            return Err(format!("unbalanced parentheses in {s:?}"));
        }
        parts.push(&s[start..]);
        let set = |values: &str| -> Result<Vec<String>, String> {
            let inner = values
                .trim()
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or_else(|| format!("a set must be in parentheses: {values:?}"))?;
            Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
        };
        let terms = parts
            .into_iter()
            .map(|t| {
                let t = t.trim();
                let key = |k: &str| -> Result<String, String> {
                    let k = k.trim();
                    let label_char =
                        |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/');
                    if k.is_empty() || !k.chars().all(label_char) {
                        return Err(format!("bad term {t:?}"));
                    }
                    Ok(k.to_string())
                };
                if let Some(k) = t.strip_prefix('!') {
                    Ok(Term::NotExists(key(k)?))
                } else if let Some((k, v)) = t.split_once(" notin ") {
                    Ok(Term::NotIn(key(k)?, set(v)?))
                } else if let Some((k, v)) = t.split_once(" in ") {
                    Ok(Term::In(key(k)?, set(v)?))
                } else if let Some((k, v)) = t.split_once("!=") {
                    Ok(Term::NotEq(key(k)?, v.trim().to_string()))
                } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                    Ok(Term::Eq(key(k)?, v.trim().to_string()))
                } else {
                    Ok(Term::Exists(key(t)?))
                }
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { terms })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::NotEq(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::NotExists(k) => !labels.contains_key(k),
            Term::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Term::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
        })
    }

    /// `labels` with the labels that equality terms (`tier=dev`, and `in` with one value)
    /// require added; `Err` (with the label keys at fault) if they then still do not match.
    pub fn complete(
        &self,
        mut labels: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, String> {
        for t in &self.terms {
            match t {
                Term::Eq(k, v) => {
                    labels.entry(k.clone()).or_insert_with(|| v.clone());
                }
                Term::In(k, vs) if vs.len() == 1 => {
                    labels.entry(k.clone()).or_insert_with(|| vs[0].clone());
                }
                _ => {}
            }
        }
        if self.matches(&labels) {
            return Ok(labels);
        }
        let keys: Vec<&str> = self
            .terms
            .iter()
            .filter(|t| {
                !Self {
                    terms: vec![(*t).clone()],
                }
                .matches(&labels)
            })
            .map(|t| match t {
                Term::Eq(k, _)
                | Term::NotEq(k, _)
                | Term::Exists(k)
                | Term::NotExists(k)
                | Term::In(k, _)
                | Term::NotIn(k, _) => k.as_str(),
            })
            .collect();
        Err(format!(
            "its labels do not match this installation's endpoint selector (labels {})",
            keys.join(", ")
        ))
    }
}
