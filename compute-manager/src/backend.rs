use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use pgwake_router::{EndpointId, Route};

use crate::BackendError;

/// Where a running compute accepts Postgres connections, as `host:port`. Only the manager and
/// the routing table produce these: a client never picks the address (no open relay).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ComputeAddr(Arc<str>);

impl ComputeAddr {
    pub fn new(host_port: impl Into<Arc<str>>) -> Self {
        Self(host_port.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ComputeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ComputeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ComputeAddr({})", self.0)
    }
}

/// A way of running computes (local processes, Kubernetes workloads). Implementations are the
/// external boundary of the manager, so tests substitute scripted ones.
#[async_trait]
pub trait ComputeBackend: Send + Sync + 'static {
    /// Starts the compute for `route` and returns once it answers queries. Dropping the future
    /// must not leave a half-started compute behind.
    async fn start(&self, route: &Route) -> Result<Box<dyn RunningCompute>, BackendError>;

    /// Endpoints whose compute this backend finds running without having started it in this
    /// process: computes that outlive their manager (a restart, a leader handover), which a
    /// new manager adopts (`Manager::adopt_running`) so that their idle timers run again.
    /// `start` must then be idempotent for them: find the compute up and return it. The
    /// default is none, right for computes that die with the process (local `postgres`).
    async fn running_endpoints(&self) -> Result<Vec<EndpointId>, BackendError> {
        Ok(Vec::new())
    }
}

#[async_trait]
pub trait RunningCompute: Send + Sync + 'static {
    fn addr(&self) -> &ComputeAddr;

    /// Stops the compute cleanly (a checkpoint is written), and returns once it is gone.
    async fn stop(&self) -> Result<(), BackendError>;

    /// Resolves when the compute has gone away, whoever stopped it: lets the manager notice a
    /// crash without waiting for the next client to fail.
    async fn exited(&self);

    /// Client sessions connected to the compute, as the compute itself counts them, or `None`
    /// when it cannot be asked. Checked before every idle suspend, so that clients the manager
    /// holds no guard for (other proxy replicas, direct connections) keep the compute up.
    async fn client_connections(&self) -> Option<usize> {
        None
    }

    /// Whether the manager must stop this compute when it shuts down: true for processes
    /// that would otherwise be orphaned; false for computes another manager can take over.
    fn stop_on_shutdown(&self) -> bool {
        false
    }
}
