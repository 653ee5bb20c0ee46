//! One endpoint's state and its transitions. Everything here runs under the slot's lock and
//! neither spawns nor awaits: the manager decides when a transition happens (a start finished,
//! the idle timer fired), the methods here what it does to the state, in one table:
//!
//! | from                     | method          | to         |
//! |--------------------------|-----------------|------------|
//! | Suspended, Failed        | `begin_start`   | Starting   |
//! | Starting (any attempt)   | `started`       | Running    |
//! | Starting (any attempt)   | `start_failed`  | Failed     |
//! | Running (same attempt)   | `exited`        | Suspended  |
//! | Running (idle, unused)   | `begin_suspend` | Suspending |
//! | Suspending               | `suspended`     | Suspended  |
//! | Suspending               | `frozen`        | Frozen     |
//! | Frozen                   | `begin_thaw`    | Starting   |
//! | Frozen (same freeze)     | `begin_deep_sleep` | Suspending |
//! | Frozen (same attempt)    | `exited`        | Suspended  |
//! | Suspending (a requested freeze that failed) | `resumed` | Running |
//!
//! A compute keeps its attempt number through freezes and thaws: it is the same compute, and
//! the watch that notices its exit (which carries the attempt) keeps watching it.
//!
//! Every transition moves the endpoint's phase gauges with it (O(1), under the same lock).
//!
//! An endpoint that leaves the routing table is `forgotten`; its slot is `removable` once it
//! is Suspended or Failed with nobody attached or waiting, and is then dropped (`gone`). A
//! forgotten endpoint that is still running is suspended by its idle timer as usual: its
//! sessions keep it, and no new ones can come (the proxy only wakes routed endpoints).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use pgwake_router::EndpointId;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::phase::{EndpointGauges, Phase, PhaseGauges, SuspendReason};
use crate::{BackendError, ComputeAddr, RunningCompute};

/// At most this many replicas are remembered per endpoint: a report from one more (all others
/// still unexpired) is ignored, so a misbehaving client of the API cannot grow the map without
/// bound. Far more than any real deployment runs.
pub(super) const MAX_REPLICAS_PER_ENDPOINT: usize = 1024;

/// The longest a report counts: a replica that vanishes without a last report of 0 (killed,
/// partitioned) holds its computes up at most this long, whatever ttl it asked for.
pub(super) const MAX_REPORT_TTL: Duration = Duration::from_secs(600);

/// One proxy replica's last word about an endpoint.
#[derive(Debug, Clone, Copy)]
pub(super) struct RemoteReport {
    pub(super) sessions: usize,
    /// A replica that dies stops reporting; its sessions died with it, so its count only
    /// holds until then.
    pub(super) expires_at: Instant,
}

pub(super) enum State {
    Suspended,
    Starting {
        attempt: u64,
        /// Letting a frozen compute run again, not starting one.
        thaw: bool,
    },
    Running {
        attempt: u64,
        compute: Arc<dyn RunningCompute>,
        idle_timeout: Duration,
    },
    /// A stop or a freeze of the compute of `attempt` in progress.
    Suspending {
        attempt: u64,
        idle_timeout: Duration,
    },
    /// Light sleep: the compute of `attempt` with its processes stopped.
    Frozen {
        attempt: u64,
        compute: Arc<dyn RunningCompute>,
        idle_timeout: Duration,
        /// Which freeze of the slot this is: a deep-sleep timer acts on its own freeze only.
        freeze: u64,
        /// Last activity before the freeze: the budget stops the least recently used first.
        last_used: Instant,
        memory: Option<u64>,
    },
    Failed {
        attempt: u64,
        error: Arc<BackendError>,
    },
}

impl State {
    pub(super) fn phase(&self) -> Phase {
        match self {
            State::Suspended => Phase::Suspended,
            State::Starting { .. } => Phase::Starting,
            State::Running { .. } => Phase::Running,
            State::Suspending { .. } => Phase::Suspending,
            State::Failed { .. } => Phase::Failed,
            State::Frozen { .. } => Phase::Frozen,
        }
    }
}

pub(super) struct Inner {
    pub(super) state: State,
    /// Sessions holding a local [`SessionLease`](super::SessionLease); a compute with any is
    /// never suspended.
    pub(super) attached: usize,
    /// Clients held in `wake` for this endpoint.
    pub(super) waiting: usize,
    /// Sessions attached through proxy replicas that hold no lease here (manager service
    /// mode), by replica id: counts above 0 only (a 0 removes the entry); expired entries
    /// count for nothing and are purged when the map is full.
    pub(super) remote: HashMap<String, RemoteReport>,
    pub(super) idle_since: Instant,
    attempt: u64,
    /// Holds that keep a Suspended endpoint from starting while its data directory is read
    /// from outside (a branch copies it); see [`super::Held`].
    pub(super) held: usize,
    /// The endpoint left the routing table: drop the slot once it is `removable`.
    pub(super) forgotten: bool,
    /// Dropped from the manager's map: a wake that finds this takes a fresh slot instead.
    pub(super) gone: bool,
    gauges: EndpointGauges,
    /// How long the running compute may stay frozen before it is stopped (zero: it is stopped
    /// at once, no light sleep). Set with each start from its route.
    pub(super) deep_sleep_after: Duration,
    /// Freezes so far, numbering each one.
    freezes: u64,
    /// Start tokens left and when they were last counted (see `max_starts_per_minute`).
    start_tokens: f64,
    tokens_at: Instant,
}

impl Inner {
    pub(super) fn new(max_starts_per_minute: u32, gauges: EndpointGauges) -> Self {
        let now = Instant::now();
        Self {
            state: State::Suspended,
            attached: 0,
            waiting: 0,
            remote: HashMap::new(),
            idle_since: now,
            attempt: 0,
            held: 0,
            forgotten: false,
            gone: false,
            gauges,
            deep_sleep_after: Duration::ZERO,
            freezes: 0,
            start_tokens: f64::from(max_starts_per_minute),
            tokens_at: now,
        }
    }

    pub(super) fn phase(&self) -> Phase {
        self.state.phase()
    }

    fn set_state(&mut self, state: State) {
        self.gauges.set(state.phase());
        self.state = state;
    }

    /// Whether a forgotten endpoint's slot may go now: nothing runs, nobody is attached or
    /// waiting (so no task and no client will touch it again).
    pub(super) fn removable(&self) -> bool {
        self.forgotten
            && !self.gone
            && matches!(self.state, State::Suspended | State::Failed { .. })
            && self.attached == 0
            && self.waiting == 0
            && self.held == 0
    }

    /// Marks the slot dropped and removes its metric series; the caller then takes it out of
    /// the manager's map.
    pub(super) fn remove(&mut self) {
        self.gone = true;
        self.gauges.remove();
    }

    /// Sessions that unexpired replica reports count at `now`.
    pub(super) fn remote_sessions(&self, now: Instant) -> usize {
        self.remote
            .values()
            .filter(|r| r.expires_at > now)
            .fold(0, |n, r| n.saturating_add(r.sessions))
    }

    /// The running compute's address, counting one more attached session; `None` unless
    /// Running.
    pub(super) fn attach(&mut self) -> Option<ComputeAddr> {
        let State::Running { compute, .. } = &self.state else {
            return None;
        };
        let addr = compute.addr().clone();
        self.attached += 1;
        Some(addr)
    }

    /// One attached session ended. Returns whether it was the last (the idle time starts).
    pub(super) fn detach(&mut self) -> bool {
        self.attached -= 1;
        let now_idle = self.attached == 0;
        if now_idle {
            self.idle_since = Instant::now();
        }
        now_idle
    }

    /// Suspended or Failed → Starting, under a new attempt number, which the start task and
    /// its watchers carry so that they never act on a later attempt's state.
    pub(super) fn begin_start(&mut self) -> u64 {
        debug_assert!(!self.gone, "a dropped slot never starts");
        self.attempt += 1;
        self.set_state(State::Starting {
            attempt: self.attempt,
            thaw: false,
        });
        self.attempt
    }

    /// Frozen → Starting (a thaw), under the compute's own attempt number. Returns the attempt
    /// and the compute to thaw.
    pub(super) fn begin_thaw(&mut self) -> Option<(u64, Arc<dyn RunningCompute>)> {
        let State::Frozen {
            attempt, compute, ..
        } = &self.state
        else {
            return None;
        };
        let (attempt, compute) = (*attempt, Arc::clone(compute));
        self.set_state(State::Starting {
            attempt,
            thaw: true,
        });
        Some((attempt, compute))
    }

    /// Suspending → Frozen: the freeze of `compute` (the one `begin_suspend` returned)
    /// finished. Returns the freeze's number, or `None` if the slot is not suspending
    /// (nothing else moves it out of Suspending, so only a bug would).
    pub(super) fn frozen(
        &mut self,
        compute: Arc<dyn RunningCompute>,
        memory: Option<u64>,
    ) -> Option<u64> {
        let State::Suspending {
            attempt,
            idle_timeout,
        } = self.state
        else {
            return None;
        };
        self.freezes += 1;
        self.set_state(State::Frozen {
            attempt,
            compute,
            idle_timeout,
            freeze: self.freezes,
            last_used: self.idle_since,
            memory,
        });
        Some(self.freezes)
    }

    /// Frozen → Suspending, to stop the compute (deep sleep, the memory budget, a shutdown):
    /// of freeze number `freeze` if given. Returns the compute to stop.
    pub(super) fn begin_deep_sleep(
        &mut self,
        freeze: Option<u64>,
    ) -> Option<Arc<dyn RunningCompute>> {
        let State::Frozen {
            attempt,
            compute,
            idle_timeout,
            freeze: f,
            ..
        } = &self.state
        else {
            return None;
        };
        if freeze.is_some_and(|x| x != *f) {
            return None;
        }
        let compute = Arc::clone(compute);
        self.set_state(State::Suspending {
            attempt: *attempt,
            idle_timeout: *idle_timeout,
        });
        Some(compute)
    }

    /// What the memory budget needs of a frozen compute: its freeze, when it was last used,
    /// and its memory.
    pub(super) fn frozen_entry(&self) -> Option<(u64, Instant, Option<u64>)> {
        match &self.state {
            State::Frozen {
                freeze,
                last_used,
                memory,
                ..
            } => Some((*freeze, *last_used, *memory)),
            _ => None,
        }
    }

    /// Whether the slot is still in freeze number `freeze`.
    pub(super) fn in_freeze(&self, freeze: u64) -> bool {
        matches!(self.state, State::Frozen { freeze: f, .. } if f == freeze)
    }

    /// The start of `attempt` returned a compute: Running, with a whole idle timeout ahead
    /// (an adopted compute too).
    pub(super) fn started(
        &mut self,
        attempt: u64,
        compute: Arc<dyn RunningCompute>,
        idle_timeout: Duration,
    ) {
        self.set_state(State::Running {
            attempt,
            compute,
            idle_timeout,
        });
        self.idle_since = Instant::now();
    }

    /// The start of `attempt` failed: the clients that joined it get `error`, the next wake
    /// starts again.
    pub(super) fn start_failed(&mut self, attempt: u64, error: Arc<BackendError>) {
        self.set_state(State::Failed { attempt, error });
    }

    /// The compute of `attempt` went away on its own. Returns whether that was a crash (it was
    /// still the running one): it is then Suspended, and the next client starts a new one.
    pub(super) fn exited(&mut self, attempt: u64) -> bool {
        let crashed = matches!(
            self.state,
            State::Running { attempt: a, .. } | State::Frozen { attempt: a, .. } if a == attempt
        );
        if crashed {
            self.set_state(State::Suspended);
        }
        crashed
    }

    /// Running → Suspending if the compute (of `attempt`, when given) may stop now for
    /// `reason`: nobody attached, waiting or reported (unless shutting down), and for an idle
    /// suspend, idle for its whole timeout. Returns the compute to stop. Decided under the
    /// same lock a connecting client takes to attach: from here on, new clients wait for the
    /// stop and then start the compute again.
    pub(super) fn begin_suspend(
        &mut self,
        attempt: Option<u64>,
        reason: SuspendReason,
        now: Instant,
    ) -> Option<Arc<dyn RunningCompute>> {
        let (compute, a, idle_timeout) = match &self.state {
            State::Running {
                attempt: a,
                compute,
                idle_timeout,
            } if attempt.is_none_or(|x| x == *a) => {
                // A report can land while the compute was being asked (see `try_suspend`).
                let busy = self.attached > 0 || self.waiting > 0 || self.remote_sessions(now) > 0;
                let idle_enough = reason != SuspendReason::Idle
                    || now >= super::deadline(self.idle_since, *idle_timeout);
                if (busy && reason != SuspendReason::Shutdown) || !idle_enough {
                    return None;
                }
                (Arc::clone(compute), *a, *idle_timeout)
            }
            _ => return None,
        };
        self.set_state(State::Suspending {
            attempt: a,
            idle_timeout,
        });
        Some(compute)
    }

    /// Suspending → Running again: a requested freeze that could not be done, for the same
    /// attempt and compute, its idle time going on from where it was.
    /// Returns the attempt, whose idle timer ended with the suspend and must run again.
    pub(super) fn resumed(&mut self, compute: Arc<dyn RunningCompute>) -> Option<u64> {
        let State::Suspending {
            attempt,
            idle_timeout,
        } = self.state
        else {
            return None;
        };
        self.set_state(State::Running {
            attempt,
            compute,
            idle_timeout,
        });
        Some(attempt)
    }

    /// The stop begun by `begin_suspend` (or `begin_deep_sleep`) finished.
    pub(super) fn suspended(&mut self) {
        self.set_state(State::Suspended);
    }

    /// When the compute of `attempt` becomes idle enough to suspend: `Some(None)` while it is
    /// in use, `None` once it is no longer that attempt's running compute (the idle tracker
    /// stops).
    pub(super) fn idle_deadline(&self, attempt: u64) -> Option<Option<Instant>> {
        match self.state {
            State::Running {
                attempt: a,
                idle_timeout,
                ..
            } if a == attempt => Some(
                (self.attached == 0 && self.waiting == 0)
                    .then(|| super::deadline(self.idle_since, idle_timeout)),
            ),
            _ => None,
        }
    }

    /// Returns the token of a start that failed before postgres's own start-up (see
    /// [`crate::BackendError::reached_startup`]): such failures are cheap, and counting them would
    /// keep an endpoint refused after their cause (a previous compute still exiting) is gone.
    pub(super) fn give_back_start_token(&mut self, per_minute: u32) {
        if per_minute > 0 {
            self.start_tokens = (self.start_tokens + 1.0).min(f64::from(per_minute));
        }
    }

    pub(super) fn take_start_token(&mut self, per_minute: u32) -> bool {
        if per_minute == 0 {
            return true;
        }
        let now = Instant::now();
        let burst = f64::from(per_minute);
        let refill = now.saturating_duration_since(self.tokens_at).as_secs_f64() * burst / 60.0;
        self.start_tokens = (self.start_tokens + refill).min(burst);
        self.tokens_at = now;
        if self.start_tokens >= 1.0 {
            self.start_tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub(super) struct Slot {
    pub(super) id: EndpointId,
    inner: Mutex<Inner>,
    /// Bumped after every change a waiter or the idle task may care about. Subscribing before
    /// looking at `inner` means no change between the look and the wait is ever missed.
    pub(super) changed: watch::Sender<()>,
    pub(super) starts: AtomicU64,
    pub(super) start_failures: AtomicU64,
    pub(super) adoptions: AtomicU64,
    pub(super) suspends: AtomicU64,
    pub(super) crashes: AtomicU64,
    pub(super) busy_deferrals: AtomicU64,
    pub(super) freezes: AtomicU64,
    pub(super) thaws: AtomicU64,
    /// Times the lock was taken: tests check that a transition locks only its own slot.
    #[cfg(test)]
    pub(super) locks: AtomicU64,
}

impl Slot {
    pub(super) fn new(id: EndpointId, max_starts_per_minute: u32, gauges: EndpointGauges) -> Self {
        Self {
            id,
            inner: Mutex::new(Inner::new(max_starts_per_minute, gauges)),
            changed: watch::channel(()).0,
            starts: AtomicU64::new(0),
            start_failures: AtomicU64::new(0),
            adoptions: AtomicU64::new(0),
            suspends: AtomicU64::new(0),
            crashes: AtomicU64::new(0),
            busy_deferrals: AtomicU64::new(0),
            freezes: AtomicU64::new(0),
            thaws: AtomicU64::new(0),
            #[cfg(test)]
            locks: AtomicU64::new(0),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        #[cfg(test)]
        self.locks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A panic while holding this lock would be a bug in a few lines of bookkeeping; carrying
        // on with the data is better than poisoning every future connect to the endpoint.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn notify(&self) {
        self.changed.send_replace(());
    }
}

/// Every endpoint's slot, by id; what a slot needs to drop itself from here is all that
/// sessions and waiters hold besides their slot.
pub(super) struct Slots {
    map: DashMap<EndpointId, Arc<Slot>>,
    max_starts_per_minute: u32,
    gauges: PhaseGauges,
}

impl Slots {
    pub(super) fn new(max_starts_per_minute: u32, gauges: PhaseGauges) -> Self {
        Self {
            map: DashMap::new(),
            max_starts_per_minute,
            gauges,
        }
    }

    pub(super) fn get(&self, id: &EndpointId) -> Option<Arc<Slot>> {
        self.map.get(id).map(|s| Arc::clone(&s))
    }

    /// The endpoint's slot, created Suspended if it has none. It may turn out `gone` (dropped a
    /// moment ago because the endpoint left the table): whoever would start it calls
    /// [`Slots::drop_gone`] and takes a new one.
    pub(super) fn get_or_create(&self, id: &EndpointId) -> Arc<Slot> {
        if let Some(s) = self.get(id) {
            return s;
        }
        let slot = self.map.entry(id.clone()).or_insert_with(|| {
            Arc::new(Slot::new(
                id.clone(),
                self.max_starts_per_minute,
                self.gauges.endpoint(id),
            ))
        });
        Arc::clone(&slot)
    }

    /// A snapshot, so that no slot is locked while the map is (a slot's removal takes them the
    /// other way round).
    pub(super) fn all(&self) -> Vec<Arc<Slot>> {
        self.map.iter().map(|s| Arc::clone(&s)).collect()
    }

    /// Takes a `gone` slot out of the map, if it is still there.
    pub(super) fn drop_gone(&self, slot: &Arc<Slot>) {
        self.map.remove_if(&slot.id, |_, s| Arc::ptr_eq(s, slot));
    }

    /// Drops the slot of an endpoint that left the routing table once nothing can use it any
    /// more (see the module's notes), with its metric series. Called after each change that
    /// can make a forgotten slot removable.
    pub(super) fn release_if_forgotten(&self, slot: &Arc<Slot>) {
        {
            let mut st = slot.lock();
            if !st.removable() {
                return;
            }
            // Series first, under the lock: a new slot for the same id (the endpoint came
            // back) can only be made once this one is out of the map, below, so its series
            // are never the ones removed here.
            st.remove();
        }
        debug!(endpoint = %slot.id, "endpoint left the routing table; its state is dropped");
        self.drop_gone(slot);
        slot.notify();
    }
}

#[cfg(test)]
mod tests {
    //! The transition table, without tasks or a runtime.

    use async_trait::async_trait;

    use super::*;
    use crate::ManagerMetrics;

    struct Compute(ComputeAddr);

    #[async_trait]
    impl RunningCompute for Compute {
        fn addr(&self) -> &ComputeAddr {
            &self.0
        }
        async fn stop(&self) -> Result<(), BackendError> {
            Ok(())
        }
        async fn exited(&self) {}
    }

    fn compute() -> Arc<dyn RunningCompute> {
        Arc::new(Compute(ComputeAddr::new("127.0.0.1:5432")))
    }

    const IDLE: Duration = Duration::from_secs(60);

    fn metrics() -> ManagerMetrics {
        ManagerMetrics::new(&prometheus::Registry::new()).unwrap()
    }

    fn inner(max_starts_per_minute: u32) -> Inner {
        let gauges = PhaseGauges::new(&metrics()).endpoint(&EndpointId::parse("ep").unwrap());
        Inner::new(max_starts_per_minute, gauges)
    }

    fn running() -> (Inner, u64) {
        let mut st = inner(0);
        let attempt = st.begin_start();
        st.started(attempt, compute(), IDLE);
        (st, attempt)
    }

    #[test]
    fn a_start_runs_under_a_new_attempt_and_ends_running_or_failed() {
        let mut st = inner(0);
        assert_eq!(st.phase(), Phase::Suspended);
        assert_eq!(st.attach(), None, "nothing to attach to before it runs");
        let first = st.begin_start();
        assert_eq!(st.phase(), Phase::Starting);
        st.start_failed(first, Arc::new(BackendError::Config("x".into())));
        assert_eq!(st.phase(), Phase::Failed);
        let second = st.begin_start();
        assert!(second > first);
        st.started(second, compute(), IDLE);
        assert_eq!(st.phase(), Phase::Running);
        assert_eq!(st.attach(), Some(ComputeAddr::new("127.0.0.1:5432")));
        assert_eq!(st.attached, 1);
    }

    #[test]
    fn only_the_running_attempt_crashes() {
        let (mut st, attempt) = running();
        assert!(
            !st.exited(attempt - 1),
            "an older attempt's exit is old news"
        );
        assert_eq!(st.phase(), Phase::Running);
        assert!(st.exited(attempt));
        assert_eq!(st.phase(), Phase::Suspended);
        assert!(!st.exited(attempt), "once is enough");
    }

    /// An idle timeout no clock reaches (`"1000000000000y"` from a file or the API) means
    /// never: before, the idle tracker panicked adding it to an Instant, and its compute was
    /// never suspended again.
    #[test]
    fn an_idle_timeout_past_the_clocks_range_means_never() {
        let mut st = inner(0);
        let attempt = st.begin_start();
        st.started(attempt, compute(), Duration::MAX);
        let now = st.idle_since;
        let deadline = st.idle_deadline(attempt).unwrap().unwrap();
        assert!(deadline > now + Duration::from_secs(50 * 365 * 24 * 3600));
        assert!(st
            .begin_suspend(
                Some(attempt),
                SuspendReason::Idle,
                now + Duration::from_secs(3600)
            )
            .is_none());
    }

    #[test]
    fn a_suspend_needs_an_unused_compute_idle_for_its_timeout() {
        let (mut st, attempt) = running();
        let now = st.idle_since;
        // Idle, but not for long enough; a requested suspend does not wait.
        assert!(st
            .begin_suspend(Some(attempt), SuspendReason::Idle, now)
            .is_none());
        assert_eq!(st.idle_deadline(attempt), Some(Some(now + IDLE)));
        let later = now + IDLE;

        st.attach();
        assert_eq!(st.idle_deadline(attempt), Some(None), "in use: no deadline");
        for reason in [SuspendReason::Idle, SuspendReason::Requested] {
            assert!(
                st.begin_suspend(None, reason, later).is_none(),
                "{reason:?}"
            );
        }
        assert!(st.detach(), "the last session");
        st.waiting = 1;
        assert!(st
            .begin_suspend(None, SuspendReason::Requested, later)
            .is_none());
        st.waiting = 0;
        st.remote.insert(
            "replica".into(),
            RemoteReport {
                sessions: 2,
                expires_at: later + Duration::from_secs(1),
            },
        );
        assert!(st
            .begin_suspend(None, SuspendReason::Requested, later)
            .is_none());
        assert!(
            st.begin_suspend(Some(attempt + 1), SuspendReason::Shutdown, later)
                .is_none(),
            "another attempt's timer"
        );
        // Shutdown stops it whoever still uses it.
        assert!(st
            .begin_suspend(Some(attempt), SuspendReason::Shutdown, later)
            .is_some());
        assert_eq!(st.phase(), Phase::Suspending);
        assert_eq!(st.idle_deadline(attempt), None, "the idle tracker stops");
        assert_eq!(st.attach(), None, "new clients wait for the stop");
        st.suspended();
        assert_eq!(st.phase(), Phase::Suspended);
    }

    #[test]
    fn an_expired_report_does_not_hold_the_compute() {
        let (mut st, _) = running();
        let later = st.idle_since + IDLE;
        st.remote.insert(
            "replica".into(),
            RemoteReport {
                sessions: 2,
                expires_at: later,
            },
        );
        assert!(st.begin_suspend(None, SuspendReason::Idle, later).is_some());
    }

    #[test]
    fn start_tokens_refill_at_the_configured_rate() {
        let mut st = inner(2);
        assert!(st.take_start_token(2));
        assert!(st.take_start_token(2));
        assert!(!st.take_start_token(2), "the burst is spent");
        // Half a minute refills one of two per minute.
        st.tokens_at -= Duration::from_secs(30);
        assert!(st.take_start_token(2));
        assert!(!st.take_start_token(2));
        assert!(inner(0).take_start_token(0), "0 is unlimited");
    }
}

#[cfg(test)]
mod gauge_tests {
    use super::*;
    use crate::ManagerMetrics;

    fn value(m: &ManagerMetrics, endpoint: &str, phase: Phase) -> Option<i64> {
        let name = "pgwake_endpoint_state";
        let mut found = None;
        for fam in prometheus::core::Collector::collect(&m.endpoint_state) {
            assert_eq!(fam.get_name(), name);
            for metric in fam.get_metric() {
                let labels: Vec<(&str, &str)> = metric
                    .get_label()
                    .iter()
                    .map(|l| (l.get_name(), l.get_value()))
                    .collect();
                if labels.contains(&("endpoint", endpoint))
                    && labels.contains(&("state", phase.as_str()))
                {
                    found = Some(metric.get_gauge().get_value() as i64);
                }
            }
        }
        found
    }

    #[test]
    fn transitions_move_the_gauges_and_removal_takes_the_series() {
        let m = ManagerMetrics::new(&prometheus::Registry::new()).unwrap();
        let all = PhaseGauges::new(&m);
        let total = |p: Phase| m.computes.with_label_values(&[p.as_str()]).get();
        let mut a = Inner::new(0, all.endpoint(&EndpointId::parse("a").unwrap()));
        let _b = Inner::new(0, all.endpoint(&EndpointId::parse("b").unwrap()));
        assert_eq!(total(Phase::Suspended), 2);
        let attempt = a.begin_start();
        assert_eq!((total(Phase::Suspended), total(Phase::Starting)), (1, 1));
        assert_eq!(value(&m, "a", Phase::Starting), Some(1));
        assert_eq!(value(&m, "a", Phase::Suspended), Some(0));
        a.start_failed(attempt, Arc::new(BackendError::Config("x".into())));
        assert_eq!((total(Phase::Starting), total(Phase::Failed)), (0, 1));

        assert!(!a.removable(), "still routed");
        a.forgotten = true;
        a.waiting = 1;
        assert!(!a.removable(), "a client waits");
        a.waiting = 0;
        assert!(a.removable());
        a.remove();
        assert!(!a.removable(), "once");
        for p in Phase::ALL {
            assert_eq!(value(&m, "a", p), None, "{p:?}");
        }
        assert_eq!(value(&m, "b", Phase::Suspended), Some(1));
        assert_eq!((total(Phase::Failed), total(Phase::Suspended)), (0, 1));
    }
}
