//! Keeps the proxy's verifiers of local computes current: the login roles of each running
//! compute of an `auth = "scram"` endpoint are read from its `pg_authid` every
//! `[auth] learn_interval`, kept in `<data_root>/<id>.roles` (mode 0600) and loaded into the
//! verifier store, so the next wake is checked before the compute runs again; and once more
//! just before each suspend (the manager's [`SuspendHook`]), so a role created in the last
//! session is known at the next wake. At start the files written by earlier runs are loaded.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use pgwake_compute_manager::roles::{
    read_role_verifiers, superuser_password, write_roles_file, RoleVerifier,
};
use pgwake_compute_manager::{ComputeAddr, LocalBackend, Manager, Phase, SuspendHook};
use pgwake_proxy::scram::Verifier;
use pgwake_proxy::verifiers::{read_roles_file, RoleMap, VerifierStore};
use pgwake_router::{BackendSpec, EndpointId, RoutingTable};
use tracing::{debug, info, warn};

const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Learner {
    pub table: Arc<RoutingTable>,
    /// Weak: the manager holds the learner as its suspend hook.
    pub manager: Weak<Manager>,
    pub local: Arc<LocalBackend>,
    pub store: Arc<VerifierStore>,
    pub interval: Duration,
}

impl Learner {
    fn roles_path(&self, id: &EndpointId) -> PathBuf {
        self.local.data_dir(id).with_extension("roles")
    }

    fn local_scram_endpoints(&self) -> Vec<EndpointId> {
        self.store
            .scram_endpoints()
            .into_iter()
            .filter(|id| {
                self.table
                    .lookup(id)
                    .is_some_and(|r| matches!(r.backend, BackendSpec::Local { .. }))
            })
            .collect()
    }

    /// Loads the roles files earlier runs wrote.
    pub fn load_saved(&self) {
        for id in self.local_scram_endpoints() {
            let path = self.roles_path(&id);
            if !path.exists() {
                continue;
            }
            match read_roles_file(&path) {
                Ok(roles) => {
                    debug!(endpoint = %id, roles = roles.len(), "learned roles loaded");
                    self.store.set_learned(&id, roles);
                }
                Err(errs) => {
                    for e in errs {
                        warn!(endpoint = %id, "learned roles file: {e}");
                    }
                }
            }
        }
    }

    /// Reads the roles of every running compute once.
    pub async fn learn_once(&self) {
        let Some(manager) = self.manager.upgrade() else {
            return;
        };
        for id in self.local_scram_endpoints() {
            let Some(stats) = manager.stats(&id) else {
                continue;
            };
            if let (Phase::Running, Some(addr)) = (stats.phase, stats.addr) {
                self.learn(&id, &addr).await;
            }
        }
    }

    /// Reads the roles of `id`'s compute at `addr`, and saves and loads them if they changed.
    async fn learn(&self, id: &EndpointId, addr: &ComputeAddr) {
        let cfg = self.local.config();
        let password = superuser_password(&cfg.initdb_args);
        let rows = match read_role_verifiers(
            addr,
            &cfg.superuser,
            password.as_deref(),
            READ_TIMEOUT,
        )
        .await
        {
            Ok(rows) => rows,
            Err(e) => {
                warn!(endpoint = %id, error = %e, "could not read the compute's login roles");
                return;
            }
        };
        let roles = to_role_map(id, &rows);
        if *self.store.learned(id) == roles {
            return;
        }
        if let Err(e) = write_roles_file(&self.roles_path(id), &rows) {
            warn!(endpoint = %id, error = %e, "could not save the compute's login roles");
        }
        info!(endpoint = %id, roles = roles.len(), "login roles learned from the compute");
        self.store.set_learned(id, roles);
    }

    /// Learns every `interval` until the task is aborted.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.learn_once().await;
        }
    }
}

#[async_trait::async_trait]
impl SuspendHook for Learner {
    async fn before_suspend(&self, endpoint: &EndpointId, addr: &ComputeAddr) {
        if self.local_scram_endpoints().contains(endpoint) {
            self.learn(endpoint, addr).await;
        }
    }
}

fn to_role_map(id: &EndpointId, rows: &[RoleVerifier]) -> RoleMap {
    rows.iter()
        .filter_map(|r| match r.verifier.parse::<Verifier>() {
            Ok(v) => Some((r.role.clone(), v)),
            Err(e) => {
                warn!(endpoint = %id, role = %r.role, "login role skipped: {e}");
                None
            }
        })
        .collect()
}
