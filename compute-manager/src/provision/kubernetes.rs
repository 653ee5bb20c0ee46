//! The Kubernetes backend's [`Provisioner`]: a new endpoint is a Neon branch of an existing
//! `PgwakeEndpoint`, made by [`NeonBrancher`] (a timeline on the pageserver, then the
//! resource). The resource is the durable record, so [`Provisioner::created`] lists nothing:
//! the `PgwakeEndpoint` reflector routes it here and in every proxy, after a restart too.
//!
//! A compute on Kubernetes without Neon storage keeps its data on a volume that no API can
//! copy consistently while it runs, so plain Kubernetes endpoints are made by applying a
//! resource, not here.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pgwake_router::EndpointId;
use tracing::info;

use super::{CreateRequest, Created, ProvisionError, Provisioner, StoredEndpoint};
use crate::neon::{Lsn, NeonBranchError, NeonBranchErrorKind, NeonBrancher};
use crate::Manager;

pub struct KubernetesProvisioner {
    brancher: NeonBrancher,
    manager: Arc<Manager>,
    /// How long a delete waits for the endpoint to finish starting or suspending.
    hold_timeout: Duration,
}

impl KubernetesProvisioner {
    pub fn new(brancher: NeonBrancher, manager: Arc<Manager>, hold_timeout: Duration) -> Self {
        Self {
            brancher,
            manager,
            hold_timeout,
        }
    }
}

/// `id`: the endpoint being created or deleted.
fn neon_error(id: &EndpointId, e: NeonBranchError) -> ProvisionError {
    use NeonBranchErrorKind as K;
    let message = e.client_message();
    match e.kind() {
        K::UnknownParent | K::NotFound => ProvisionError::Missing(message),
        K::Duplicate => ProvisionError::Duplicate(id.clone()),
        K::HasBranches => ProvisionError::Conflict(message),
        K::Invalid | K::BadLsn => ProvisionError::InvalidRequest(message),
        K::Unavailable => ProvisionError::Unavailable(message),
        K::Internal => ProvisionError::internal(format!("neon endpoint {id}"), e),
    }
}

#[async_trait]
impl Provisioner for KubernetesProvisioner {
    async fn create(&self, req: CreateRequest) -> Result<Created, ProvisionError> {
        let Some(parent) = &req.parent else {
            return Err(ProvisionError::InvalidRequest(
                "on the kubernetes backend a new endpoint is a branch of a Neon endpoint: \
                 give a parent, or apply a PgwakeEndpoint"
                    .into(),
            ));
        };
        let lsn = req
            .lsn
            .as_deref()
            .map(Lsn::parse)
            .transpose()
            .map_err(|e| ProvisionError::InvalidRequest(format!("lsn: {e}")))?;
        let branch = self
            .brancher
            .create_branch(&parent.endpoint, &req.id, lsn)
            .await
            .map_err(|e| neon_error(&req.id, e))?;
        info!(
            endpoint = %req.id,
            parent = %parent.endpoint,
            timeline = %branch.timeline,
            "neon branch created"
        );
        let config = branch.endpoint.endpoint_config().map_err(|errors| {
            let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
            ProvisionError::internal("route the new PgwakeEndpoint", reasons.join("; "))
        })?;
        Ok(Created { config })
    }

    async fn delete(&self, id: &EndpointId, remove_data: bool) -> Result<(), ProvisionError> {
        let held = super::hold_for_delete(&self.manager, id, self.hold_timeout).await?;
        let deleted = self
            .brancher
            .delete(id, remove_data)
            .await
            .map_err(|e| neon_error(id, e))?;
        info!(endpoint = %id, timeline_removed = deleted.timeline.is_some(), "kubernetes endpoint deleted");
        drop(held);
        Ok(())
    }

    fn created(&self) -> Vec<StoredEndpoint> {
        Vec::new()
    }

    fn exists(&self, _id: &EndpointId) -> Result<bool, ProvisionError> {
        // Routed resources are in the table already; one the reflector has not seen yet is
        // refused by the API server (AlreadyExists → duplicate).
        Ok(false)
    }
}
