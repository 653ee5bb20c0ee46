//! Turns "endpoint X is needed" into "a Postgres for X answers at this address", and suspends
//! computes nobody uses. The manager knows nothing of the client protocol; the proxy knows
//! nothing of how a compute is started.
//!
//! Modules depend one way: `api::client` → `waker` → `manager`; `api::server` → `manager`;
//! `manager` → `backend`, `error`, `metrics`, `kubernetes::leader` (and nothing of `api` or
//! `waker`); the backends (`local`, `kubernetes`) → `backend`, `error`, `probe`. Inside
//! `manager`: `lease` → `slot` → `phase`; `idle` → the `Manager` (it suspends through it).

pub mod api;
mod backend;
mod error;
pub mod kubernetes;
pub mod local;
mod manager;
mod metrics;
pub mod neon;
mod probe;
pub mod provision;
pub mod roles;
pub mod waker;

pub use api::{serve_api, serve_api_with, serve_http, ApiToken, Management, RemoteManager};
pub use backend::{ComputeAddr, ComputeBackend, RunningCompute};
pub use error::{
    BackendError, BackendErrorKind, ErrorSource, StartBlocker, WakeError, WakeErrorKind,
};
pub use kubernetes::{
    KubernetesBackend, KubernetesConfig, LeaderConfig, LeaderElector, LeaderError, LeaderState,
    Leadership,
};
pub use local::{LocalBackend, LocalConfig};
pub use manager::{
    Attached, Backends, EndpointStats, Held, LocalSession, Manager, ManagerConfig, Phase,
    RemoteSession, SessionLease, SuspendHook, SuspendReason, SuspendedHold,
};
pub use metrics::ManagerMetrics;
pub use probe::{probe_ready, ProbeResult};
pub use waker::{ComputeWaker, LeaderOnly};
