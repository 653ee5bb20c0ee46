//! Turns "endpoint X is needed" into "a Postgres for X answers at this address", and suspends
//! computes nobody uses. The manager knows nothing of the client protocol; the proxy knows
//! nothing of how a compute is started.

mod backend;
mod error;
pub mod kubernetes;
pub mod local;
mod manager;
mod metrics;
mod probe;
pub mod roles;
pub mod service;

pub use backend::{ComputeAddr, ComputeBackend, RunningCompute};
pub use error::{BackendError, ErrorSource, WakeError};
pub use kubernetes::{
    KubernetesBackend, KubernetesConfig, LeaderConfig, LeaderElector, LeaderError, LeaderState,
    Leadership,
};
pub use local::{LocalBackend, LocalConfig};
pub use manager::{
    ActivityGuard, Backends, EndpointStats, Lease, Manager, ManagerConfig, Phase, SuspendReason,
};
pub use metrics::ManagerMetrics;
pub use probe::{probe_ready, ProbeResult};
pub use service::{RemoteManager, Waker};
