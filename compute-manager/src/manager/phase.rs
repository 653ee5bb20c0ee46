//! What the manager says about an endpoint's compute: its phase, why it was suspended, its
//! counters.

use crate::ComputeAddr;

/// The lifecycle of one endpoint's compute, as the manager sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Suspended,
    Starting,
    Running,
    Suspending,
    Failed,
}

impl Phase {
    /// Every phase, in the order of their discriminants (index `phase as usize`).
    pub const ALL: [Phase; 5] = [
        Phase::Suspended,
        Phase::Starting,
        Phase::Running,
        Phase::Suspending,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Suspended => "suspended",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Suspending => "suspending",
            Phase::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendReason {
    Idle,
    Requested,
    Shutdown,
}

impl SuspendReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SuspendReason::Idle => "idle",
            SuspendReason::Requested => "requested",
            SuspendReason::Shutdown => "shutdown",
        }
    }
}

/// Counters and state of one endpoint, for tests, status APIs and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStats {
    pub phase: Phase,
    pub attached: usize,
    pub waiting: usize,
    /// Computes this manager started: wakes that called the backend, whatever the outcome.
    /// Not adoptions, which take over a compute another manager started.
    pub starts: u64,
    /// Wakes whose start failed (adoptions that fail are logged, not counted here).
    pub start_failures: u64,
    /// Running computes this manager took over at its start ([`Manager::adopt_running`]).
    ///
    /// [`Manager::adopt_running`]: crate::Manager::adopt_running
    pub adoptions: u64,
    pub suspends: u64,
    pub crashes: u64,
    /// Suspends called off because the compute still had client sessions (by the compute's own
    /// count, or by unexpired reports from proxy replicas).
    pub busy_deferrals: u64,
    /// Sessions that proxy replicas reported attached to this compute (unexpired reports only).
    pub remote_sessions: usize,
    pub addr: Option<ComputeAddr>,
}
