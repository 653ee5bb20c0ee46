//! Branches on Neon storage with the Kubernetes backend: a branch is a new timeline on the
//! pageserver (a copy-on-write child of the parent's timeline, at its head or at an LSN) and
//! a `PgwakeEndpoint` that serves it with the parent's compute settings.
//!
//! [`NeonBrancher`] does both in order and undoes the first when the second fails, so a failed
//! branch leaves no timeline and no resource behind. The pageserver's API is in
//! [`pageserver`]; the resources are built and created by `kubernetes::provision`.

pub mod ids;
pub mod pageserver;

#[cfg(test)]
pub(crate) mod fake_pageserver;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use kube::Client;
use pgwake_router::crd::{NeonTimeline, PgwakeEndpoint, PgwakeEndpointSpec};
use pgwake_router::EndpointId;
use tracing::{info, warn};

pub use ids::{InvalidNeonId, Lsn, TenantId, TimelineId};
pub use pageserver::{
    BranchRequest, PageserverClient, PageserverError, PageserverErrorKind, TimelineInfo,
};

use crate::kubernetes::provision::{
    branch_endpoint, new_endpoint, EndpointResources, EndpointSelector, ProvisionError,
    ProvisionErrorKind,
};
use crate::kubernetes::KubernetesConfig;
use crate::ErrorSource;

/// What kind of failure a [`NeonBranchError`] is, for the API's status and `kind` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NeonBranchErrorKind {
    /// The parent endpoint, or its timeline in storage, does not exist.
    UnknownParent,
    /// The endpoint to delete does not exist.
    NotFound,
    /// The new id is taken.
    Duplicate,
    /// A branch of an endpoint without Neon storage; a spec that would not route.
    Invalid,
    /// The LSN cannot be branched from.
    BadLsn,
    /// The timeline to remove has branches.
    HasBranches,
    /// Storage or Kubernetes did not answer after every try.
    Unavailable,
    /// RBAC, the pageserver's token, answers outside the spec.
    Internal,
}

impl NeonBranchErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownParent => "unknown_parent",
            Self::NotFound => "not_found",
            Self::Duplicate => "duplicate",
            Self::Invalid => "invalid",
            Self::BadLsn => "bad_lsn",
            Self::HasBranches => "has_branches",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    pub fn source(self) -> ErrorSource {
        match self {
            Self::Unavailable | Self::Internal => ErrorSource::Internal,
            _ => ErrorSource::Client,
        }
    }

    /// The HTTP status a management API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::UnknownParent | Self::NotFound => 404,
            Self::Duplicate | Self::HasBranches => 409,
            Self::Invalid | Self::BadLsn => 422,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }
}

/// A branch, endpoint or deletion failed. `Display` is for the operator's log;
/// [`NeonBranchError::client_message`] for API clients.
#[derive(Debug, thiserror::Error)]
pub enum NeonBranchError {
    /// The parent endpoint does not exist.
    #[error("parent endpoint {0} not found")]
    UnknownParent(EndpointId),
    #[error("endpoint {id}: spec.neon.{field} {value:?}: {reason}")]
    BadParentSpec {
        id: EndpointId,
        field: &'static str,
        value: String,
        reason: InvalidNeonId,
    },
    /// `[kubernetes]` cannot be used for branches (no `[kubernetes.neon]`, a selector that
    /// cannot be read).
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Pageserver(#[from] PageserverError),
    #[error(transparent)]
    Kubernetes(#[from] ProvisionError),
}

impl NeonBranchError {
    pub fn kind(&self) -> NeonBranchErrorKind {
        use NeonBranchErrorKind as K;
        match self {
            Self::UnknownParent(_) => K::UnknownParent,
            Self::BadParentSpec { .. } => K::Invalid,
            Self::Config(_) => K::Internal,
            Self::Pageserver(e) => match e.kind() {
                PageserverErrorKind::NotFound => K::UnknownParent,
                PageserverErrorKind::BadLsn => K::BadLsn,
                PageserverErrorKind::HasChildren => K::HasBranches,
                PageserverErrorKind::Unavailable => K::Unavailable,
                PageserverErrorKind::Conflict
                | PageserverErrorKind::Unauthorized
                | PageserverErrorKind::Internal => K::Internal,
            },
            Self::Kubernetes(e) => match e.kind() {
                ProvisionErrorKind::AlreadyExists => K::Duplicate,
                ProvisionErrorKind::NotFound => K::NotFound,
                ProvisionErrorKind::Invalid | ProvisionErrorKind::NotNeon => K::Invalid,
                ProvisionErrorKind::Unavailable => K::Unavailable,
                ProvisionErrorKind::Forbidden | ProvisionErrorKind::Internal => K::Internal,
            },
        }
    }

    pub fn retryable(&self) -> bool {
        self.kind() == NeonBranchErrorKind::Unavailable
    }

    /// Built from the caller's own ids and fixed words only.
    pub fn client_message(&self) -> String {
        match self {
            Self::UnknownParent(_) => self.to_string(),
            Self::BadParentSpec { id, field, .. } => {
                format!("endpoint {id} has an invalid spec.neon.{field}")
            }
            Self::Config(_) => "internal error".into(),
            Self::Pageserver(e) => e.client_message().to_string(),
            Self::Kubernetes(e) => e.client_message(),
        }
    }
}

/// A branch that now exists: its resource (routed once the reflector sees it) and timeline.
#[derive(Debug, Clone)]
pub struct BranchCreated {
    pub endpoint: PgwakeEndpoint,
    pub tenant: TenantId,
    pub timeline: TimelineId,
    pub parent_timeline: TimelineId,
    /// Where the branch starts on the parent's timeline (the pageserver's answer).
    pub ancestor_lsn: Option<Lsn>,
}

/// What a deletion removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// The timeline deleted from storage (only when asked, and only for Neon endpoints).
    pub timeline: Option<(TenantId, TimelineId)>,
}

/// Creates and deletes endpoints and Neon branches as `PgwakeEndpoint`s in one namespace.
/// Only endpoints that `[kubernetes] endpoint_selector` selects are this installation's: a
/// new one gets the labels it requires, others are not branched or deleted.
#[derive(Clone)]
pub struct NeonBrancher {
    pageserver: PageserverClient,
    resources: EndpointResources,
    selector: EndpointSelector,
}

impl NeonBrancher {
    /// `cfg.namespace` unset means the client's default namespace.
    pub fn new(
        pageserver: PageserverClient,
        client: Client,
        cfg: &KubernetesConfig,
    ) -> Result<Self, NeonBranchError> {
        let selector = EndpointSelector::parse(cfg.endpoint_selector.as_deref())
            .map_err(|e| NeonBranchError::Config(format!("kubernetes.endpoint_selector: {e}")))?;
        Ok(Self {
            pageserver,
            resources: EndpointResources::new(client, cfg),
            selector,
        })
    }

    /// With the pageserver client of `cfg.neon`, which must be set.
    pub fn from_config(client: Client, cfg: &KubernetesConfig) -> Result<Self, NeonBranchError> {
        let neon = cfg.neon.as_ref().ok_or_else(|| {
            NeonBranchError::Config("branches on Neon need [kubernetes.neon]".into())
        })?;
        Self::new(PageserverClient::new(neon)?, client, cfg)
    }

    /// The resource of `id`, if it is this installation's.
    async fn endpoint(&self, id: &EndpointId) -> Result<Option<PgwakeEndpoint>, NeonBranchError> {
        let ep = self.resources.get_opt(id).await?;
        Ok(ep.filter(|ep| {
            self.selector
                .matches(ep.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
        }))
    }

    /// `ep`'s labels completed for the selector, or why they cannot match it.
    fn selected(&self, mut ep: PgwakeEndpoint) -> Result<PgwakeEndpoint, NeonBranchError> {
        let labels = ep.metadata.labels.take().unwrap_or_default();
        let labels = self
            .selector
            .complete(labels)
            .map_err(|reason| ProvisionError::Invalid {
                id: ep.metadata.name.clone().unwrap_or_default(),
                reasons: vec![reason],
            })?;
        ep.metadata.labels = (!labels.is_empty()).then_some(labels);
        Ok(ep)
    }

    pub fn namespace(&self) -> &str {
        self.resources.namespace()
    }

    /// Branches `parent` into `new_id`: a timeline branched from the parent's at `lsn` (unset:
    /// its head when the pageserver gets the call), then the endpoint's resource. If the
    /// resource cannot be created, the timeline is deleted again.
    pub async fn create_branch(
        &self,
        parent: &EndpointId,
        new_id: &EndpointId,
        lsn: Option<Lsn>,
    ) -> Result<BranchCreated, NeonBranchError> {
        let parent_ep = self
            .endpoint(parent)
            .await?
            .ok_or_else(|| NeonBranchError::UnknownParent(parent.clone()))?;
        let Some(neon) = &parent_ep.spec.neon else {
            return Err(ProvisionError::NotNeon(parent.clone()).into());
        };
        let (tenant, parent_timeline) = neon_ids(parent, neon)?;
        // Everything that can be checked before storage changes: the resource builds and
        // routes, and the id is free (a race for it is caught by the create below).
        let timeline = TimelineId::generate();
        let lsn_text = lsn.map(|l| l.to_string());
        let resource = self.selected(branch_endpoint(
            &parent_ep,
            new_id,
            &timeline.to_string(),
            lsn_text.as_deref(),
        )?)?;
        if self.resources.get_opt(new_id).await?.is_some() {
            return Err(ProvisionError::AlreadyExists(new_id.clone()).into());
        }
        let request = BranchRequest {
            tenant,
            new_timeline_id: timeline,
            ancestor_timeline_id: parent_timeline,
            ancestor_start_lsn: lsn,
            // A branch always has its ancestor's version; the pageserver accepts the field
            // but ignores it, and refuses versions it does not know (PG_VERSION "18" on an
            // older pageserver would fail the branch for nothing).
            pg_version: None,
        };
        let info = match self.pageserver.create_branch(&request).await {
            Ok(info) => info,
            Err(e) => {
                // A create that failed after its tries may still have been done.
                if matches!(
                    e.kind(),
                    PageserverErrorKind::Unavailable | PageserverErrorKind::Internal
                ) {
                    self.undo_timeline(tenant, timeline).await;
                }
                return Err(e.into());
            }
        };
        let endpoint = match self.resources.create(&resource).await {
            Ok(ep) => ep,
            Err(e) if e.kind() == ProvisionErrorKind::Unavailable => {
                // The create may have been done with every answer lost: look before undoing,
                // so that no resource is left serving a deleted timeline.
                match self.resources.get_opt(new_id).await {
                    Ok(Some(found)) if found.spec == resource.spec => found,
                    Ok(_) => {
                        self.undo_timeline(tenant, timeline).await;
                        return Err(e.into());
                    }
                    Err(again) => {
                        warn!(endpoint = %new_id, %tenant, %timeline, error = %again,
                            "cannot tell whether the branch's resource was created; its timeline is kept");
                        return Err(e.into());
                    }
                }
            }
            Err(e) => {
                self.undo_timeline(tenant, timeline).await;
                return Err(e.into());
            }
        };
        info!(endpoint = %new_id, %parent, %tenant, %timeline, lsn = ?info.ancestor_lsn, "branch created");
        Ok(BranchCreated {
            endpoint,
            tenant,
            timeline,
            parent_timeline,
            ancestor_lsn: info.ancestor_lsn,
        })
    }

    /// Creates the resource of a new endpoint `id` with the caller's `spec` (and `labels`).
    /// For a Neon spec, its timeline must exist already.
    pub async fn create_endpoint(
        &self,
        id: &EndpointId,
        spec: PgwakeEndpointSpec,
        labels: BTreeMap<String, String>,
    ) -> Result<PgwakeEndpoint, NeonBranchError> {
        let resource =
            self.selected(new_endpoint(id, spec, labels, self.resources.namespace())?)?;
        Ok(self.resources.create(&resource).await?)
    }

    /// Deletes the endpoint's resource (stop its compute first: the manager's suspend), and
    /// with `remove_timeline` its Neon timeline. A timeline with branches is refused before
    /// anything is deleted.
    pub async fn delete(
        &self,
        id: &EndpointId,
        remove_timeline: bool,
    ) -> Result<Deleted, NeonBranchError> {
        let ep = self
            .endpoint(id)
            .await?
            .ok_or_else(|| ProvisionError::NotFound(id.clone()))?;
        let timeline = match (&ep.spec.neon, remove_timeline) {
            (Some(neon), true) => {
                let (tenant, timeline) = neon_ids(id, neon)?;
                let timelines = match self.pageserver.timelines(tenant).await {
                    // Storage does not know the tenant: the wrong pageserver, or a tenant
                    // deleted there. Nothing is deleted until an operator looks.
                    Err(e) if e.kind() == PageserverErrorKind::NotFound => {
                        return Err(NeonBranchError::Config(format!(
                            "endpoint {id}: tenant {tenant} is not on the pageserver: {e}"
                        )))
                    }
                    r => r?,
                };
                let children = timelines
                    .into_iter()
                    .filter(|t| t.ancestor_timeline_id == Some(timeline))
                    .count();
                if children > 0 {
                    return Err(PageserverError::has_children(tenant, timeline, children).into());
                }
                Some((tenant, timeline))
            }
            (None, true) => return Err(ProvisionError::NotNeon(id.clone()).into()),
            (_, false) => None,
        };
        self.resources.delete(id).await?;
        if let Some((tenant, tl)) = timeline {
            if let Err(e) = self.pageserver.delete_timeline(tenant, tl).await {
                warn!(endpoint = %id, %tenant, timeline = %tl, error = %e,
                    "endpoint deleted, its timeline not");
                return Err(e.into());
            }
        }
        Ok(Deleted { timeline })
    }

    /// Deletes a timeline this call created, best effort: the pageserver deletes it in the
    /// background, and a failure here is logged with the ids an operator needs to finish it.
    async fn undo_timeline(&self, tenant: TenantId, timeline: TimelineId) {
        match self.pageserver.delete_timeline(tenant, timeline).await {
            Ok(()) => info!(%tenant, %timeline, "branch undone: timeline deleted"),
            Err(e) => warn!(%tenant, %timeline, error = %e,
                "branch failed and its timeline could not be deleted; delete it by hand"),
        }
    }
}

/// The tenant and timeline of `id`'s `spec.neon`.
fn neon_ids(
    id: &EndpointId,
    neon: &NeonTimeline,
) -> Result<(TenantId, TimelineId), NeonBranchError> {
    let bad = |field, value: &str, reason| NeonBranchError::BadParentSpec {
        id: id.clone(),
        field,
        value: value.to_string(),
        reason,
    };
    let tenant =
        TenantId::parse(&neon.tenant_id).map_err(|r| bad("tenantId", &neon.tenant_id, r))?;
    let timeline = TimelineId::parse(&neon.timeline_id)
        .map_err(|r| bad("timelineId", &neon.timeline_id, r))?;
    Ok((tenant, timeline))
}
