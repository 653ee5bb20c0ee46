//! The local backend's [`Provisioner`]: an endpoint is an entry in the state file (its
//! `[[endpoint]]` keys) and, for a branch, a copy of the parent's cluster made while the
//! manager holds the parent still (see [`crate::local::CopySource`]). A new endpoint without a
//! parent gets its cluster at its first wake, like a configured one.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use pgwake_router::{BackendSpec, EndpointId};
use tracing::{info, warn};

use super::{CreateRequest, Created, ProvisionError, Provisioner, StateFile, StoredEndpoint};
use crate::local::{BranchCopy, CopySource};
use crate::{Held, LocalBackend, Manager};

pub struct LocalProvisioner {
    backend: Arc<LocalBackend>,
    manager: Arc<Manager>,
    state: StateFile,
    /// How long a create or delete waits for the endpoint to finish starting or suspending.
    hold_timeout: Duration,
}

impl LocalProvisioner {
    /// Reads the state file of `backend`'s data root (an unreadable one is an error).
    pub fn open(
        backend: Arc<LocalBackend>,
        manager: Arc<Manager>,
        hold_timeout: Duration,
    ) -> Result<Self, super::StateFileError> {
        let state = StateFile::open(StateFile::path_in(&backend.config().data_root))?;
        Ok(Self {
            backend,
            manager,
            state,
            hold_timeout,
        })
    }
}

/// Whether a failed copy ran out of disk (`cp` and `pg_basebackup` say so in their output).
fn no_space(e: &crate::BackendError) -> bool {
    let text = e.to_string();
    text.contains("No space left on device")
        || matches!(e, crate::BackendError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
}

#[async_trait]
impl Provisioner for LocalProvisioner {
    async fn create(&self, req: CreateRequest) -> Result<Created, ProvisionError> {
        let id = req.id;
        self.backend
            .ensure_data_root()
            .map_err(|e| ProvisionError::internal("check the data root", e))?;
        if self.exists(&id)? {
            return Err(ProvisionError::Duplicate(id));
        }
        let mut copied = false;
        if let Some(parent) = &req.parent {
            if !matches!(parent.backend, BackendSpec::Local { .. }) {
                return Err(ProvisionError::InvalidRequest(format!(
                    "parent \"{}\" is not a local endpoint",
                    parent.endpoint
                )));
            }
            let from = &parent.endpoint;
            let held = self
                .manager
                .hold(from, self.hold_timeout)
                .await
                .map_err(|e| super::hold_error(from, e))?;
            let source = match &held {
                Held::Running { addr, .. } => CopySource::Running(addr),
                Held::Suspended(_) => CopySource::Files,
            };
            let result = self.backend.branch_data(from, &id, source).await;
            drop(held);
            match result {
                Ok(BranchCopy::Copied) => copied = true,
                Ok(BranchCopy::ParentEmpty) => {
                    info!(parent = %from, endpoint = %id, "the parent has no data yet; the branch starts empty like it")
                }
                Err(e) => {
                    warn!(parent = %from, endpoint = %id, error = %e, "branch copy failed; nothing was created");
                    return Err(ProvisionError::Copy {
                        parent: from.clone(),
                        no_space: no_space(&e),
                        source: e,
                    });
                }
            }
        }
        let s = req.settings;
        let stored = StoredEndpoint {
            id: id.clone(),
            parent: req.parent.as_ref().map(|p| p.endpoint.clone()),
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            idle_timeout: s.idle_timeout,
            deep_sleep_after: s.deep_sleep_after,
            max_connections: s.max_connections,
            auth: s.auth,
            roles_file: s.roles_file,
            allow: s.allow,
            settings: s.settings,
        };
        if let Err(e) = self.state.insert(stored.clone()) {
            // Not routed after a restart means not created: the copy goes too.
            if copied {
                if let Err(e) = self.backend.remove_data(&id) {
                    warn!(endpoint = %id, error = %e, "could not remove the copy of an endpoint that was not created");
                }
            }
            return Err(ProvisionError::internal("write the endpoint state file", e));
        }
        Ok(Created {
            config: stored.config(),
        })
    }

    async fn delete(&self, id: &EndpointId, remove_data: bool) -> Result<(), ProvisionError> {
        if self.state.get(id).is_none() {
            return Err(ProvisionError::UnknownEndpoint(id.clone()));
        }
        self.backend
            .ensure_data_root()
            .map_err(|e| ProvisionError::internal("check the data root", e))?;
        let held = super::hold_for_delete(&self.manager, id, self.hold_timeout).await?;
        self.state
            .remove(id)
            .map_err(|e| ProvisionError::internal("write the endpoint state file", e))?;
        if remove_data {
            self.backend
                .remove_data(id)
                .map_err(|e| ProvisionError::internal(format!("remove the data of {id}"), e))?;
        }
        drop(held);
        Ok(())
    }

    fn created(&self) -> Vec<StoredEndpoint> {
        self.state.list()
    }

    fn exists(&self, id: &EndpointId) -> Result<bool, ProvisionError> {
        Ok(self.state.get(id).is_some()
            || self
                .backend
                .has_data(id)
                .map_err(|e| ProvisionError::internal("look at the data root", e))?)
    }
}
