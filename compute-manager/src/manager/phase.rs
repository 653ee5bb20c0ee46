//! What the manager says about an endpoint's compute: its phase, why it was suspended, its
//! counters, and the gauges that show the phases.

use pgwake_router::EndpointId;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec};

use crate::{ComputeAddr, ManagerMetrics};

/// The lifecycle of one endpoint's compute, as the manager sees it.
///
/// `Frozen` is light sleep: no client, every process of the compute stopped, its memory kept,
/// so a wake only lets it run again (see [`crate::RunningCompute::freeze`]). It is a phase of
/// its own rather than a kind of `Suspended` because the manager holds the compute in it and
/// acts on it: a wake thaws instead of starting, a timer or the memory budget stops it, and a
/// shutdown must stop it like a running one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Suspended,
    Starting,
    Running,
    Suspending,
    Failed,
    Frozen,
}

impl Phase {
    /// Every phase, in the order of their discriminants (index `phase as usize`).
    pub const ALL: [Phase; 6] = [
        Phase::Suspended,
        Phase::Starting,
        Phase::Running,
        Phase::Suspending,
        Phase::Failed,
        Phase::Frozen,
    ];

    /// Where the compute is, for status and the tier metrics: the transitions (starting,
    /// suspending) count as running, as their processes are.
    pub fn tier(self) -> Tier {
        match self {
            Phase::Starting | Phase::Running | Phase::Suspending => Tier::Running,
            Phase::Frozen => Tier::Frozen,
            Phase::Suspended | Phase::Failed => Tier::Stopped,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Suspended => "suspended",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Suspending => "suspending",
            Phase::Failed => "failed",
            Phase::Frozen => "frozen",
        }
    }
}

/// How far asleep a compute is, which decides what a wake costs: nothing (running), letting
/// its processes run again (frozen, milliseconds), or a start (stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Running,
    Frozen,
    Stopped,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Running => "running",
            Tier::Frozen => "frozen",
            Tier::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendReason {
    Idle,
    Requested,
    Shutdown,
    /// Frozen for its `deep_sleep_after`.
    DeepSleep,
    /// Frozen, and the least recently used while frozen computes held more than
    /// `max_frozen_memory`.
    MemoryBudget,
}

impl SuspendReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SuspendReason::Idle => "idle",
            SuspendReason::Requested => "requested",
            SuspendReason::Shutdown => "shutdown",
            SuspendReason::DeepSleep => "deep_sleep",
            SuspendReason::MemoryBudget => "memory_budget",
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
    /// Times the compute went into light sleep, and times a wake let it run again.
    pub freezes: u64,
    pub thaws: u64,
    /// What the frozen compute holds (measured when it froze), while it is frozen.
    pub frozen_memory: Option<u64>,
}

/// The phase gauges, kept incrementally: a transition moves one endpoint's series and two
/// totals (O(1)), instead of recounting every endpoint.
#[derive(Clone)]
pub(super) struct PhaseGauges {
    /// `pgwake_computes{state}`, indexed by `Phase as usize`.
    totals: [IntGauge; 6],
    endpoint_state: IntGaugeVec,
    crashes: IntCounterVec,
}

impl PhaseGauges {
    pub(super) fn new(metrics: &ManagerMetrics) -> Self {
        Self {
            totals: Phase::ALL.map(|p| metrics.computes.with_label_values(&[p.as_str()])),
            endpoint_state: metrics.endpoint_state.clone(),
            crashes: metrics.crashes.clone(),
        }
    }

    /// The series of a new endpoint, which starts Suspended.
    pub(super) fn endpoint(&self, id: &EndpointId) -> EndpointGauges {
        let state = Phase::ALL.map(|p| {
            self.endpoint_state
                .with_label_values(&[id.as_str(), p.as_str()])
        });
        state[Phase::Suspended as usize].set(1);
        self.totals[Phase::Suspended as usize].inc();
        EndpointGauges {
            id: id.clone(),
            phase: Phase::Suspended,
            state,
            all: self.clone(),
        }
    }
}

/// One endpoint's `pgwake_endpoint_state` series (1 for its phase, 0 for the others), moved by
/// the slot under its lock so that concurrent transitions cannot apply out of order.
pub(super) struct EndpointGauges {
    id: EndpointId,
    phase: Phase,
    state: [IntGauge; 6],
    all: PhaseGauges,
}

impl EndpointGauges {
    pub(super) fn set(&mut self, to: Phase) {
        let from = std::mem::replace(&mut self.phase, to);
        if from == to {
            return;
        }
        self.state[from as usize].set(0);
        self.state[to as usize].set(1);
        self.all.totals[from as usize].dec();
        self.all.totals[to as usize].inc();
    }

    /// Removes every series labelled with this endpoint, and its count from the totals: the
    /// endpoint is gone, and must not stay in the exposition for the life of the process.
    pub(super) fn remove(&self) {
        for p in Phase::ALL {
            // Only fails for a series already gone.
            let _ = self
                .all
                .endpoint_state
                .remove_label_values(&[self.id.as_str(), p.as_str()]);
        }
        let _ = self.all.crashes.remove_label_values(&[self.id.as_str()]);
        self.all.totals[self.phase as usize].dec();
    }
}
