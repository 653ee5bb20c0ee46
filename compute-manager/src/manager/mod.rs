//! The compute manager: one slot per endpoint it has seen, a single-flight wake per slot, and
//! an idle tracker per running compute.
//!
//! - `slot`: an endpoint's state and its transitions (no tasks, no I/O);
//! - `lease`: what a session holds while attached ([`Attached`], [`SessionLease`]);
//! - `idle`: the idle timer and the crash watch of a running compute;
//! - `phase`: phases, suspend reasons and per-endpoint stats;
//! - `budget`: which frozen computes the memory budget stops.
//!
//! Light sleep: with a `deep_sleep_after`, an idle compute is frozen (Running → Suspending →
//! Frozen) instead of stopped, under the same lock and checks as a suspend. A wake of a frozen
//! compute thaws it (Frozen → Starting → Running), single-flight like a start but without a
//! start token. A timer per freeze, the memory budget, a requested suspend or the manager's
//! shutdown stop it (Frozen → Suspending → Suspended), letting it run first.

mod budget;
mod hold;
mod idle;
mod lease;
mod phase;
mod slot;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use pgwake_router::{BackendSpec, EndpointId, Route, RoutingTable};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

pub use hold::{Held, SuspendedHold};
pub(crate) use lease::Sessions;
pub use lease::{Attached, LocalSession, RemoteSession, SessionLease};
use phase::PhaseGauges;
pub use phase::{EndpointStats, Phase, SuspendReason, Tier};
use slot::{RemoteReport, Slot, Slots, State, MAX_REPLICAS_PER_ENDPOINT, MAX_REPORT_TTL};

use crate::{
    BackendError, ComputeAddr, ComputeBackend, Leadership, ManagerMetrics, RunningCompute,
    WakeError,
};

/// How far away a deadline is that no clock reaches: about a century.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `start + d`, where `d` may be any duration a config file, the management API or a resource
/// gave (`idle_timeout = "1000000000000y"`): `Instant + Duration` panics past the clock's range,
/// which would end the idle tracker of that endpoint (its compute then never suspends). Such
/// a deadline is a century away instead, which means never.
pub(crate) fn deadline(start: Instant, d: Duration) -> Instant {
    start.checked_add(d).unwrap_or_else(|| start + NEVER)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManagerConfig {
    /// How long a client may be held while its compute starts.
    pub wake_timeout: Duration,
    /// How long a managed compute may sit with no client before it is suspended.
    pub idle_timeout: Duration,
    /// Clients held per endpoint at once; more are refused rather than queued without bound.
    pub max_waiting_per_endpoint: usize,
    /// Starts per endpoint per minute (a token bucket with a burst of the same size); 0 is
    /// unlimited. Stops a crash loop or a client hammering a failing endpoint from turning
    /// into a start loop.
    pub max_starts_per_minute: u32,
    /// Light sleep: an idle compute is frozen (its processes stopped, its memory kept) and
    /// stopped only after this long frozen. Zero: stopped at once (no light sleep). Routes
    /// may override it; backends that cannot freeze stop their computes at once anyway.
    pub deep_sleep_after: Duration,
    /// The most memory (bytes) frozen computes may hold together; past it the least recently
    /// used are stopped. 0: no limit.
    pub max_frozen_memory: u64,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            wake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            max_waiting_per_endpoint: 1000,
            max_starts_per_minute: 0,
            deep_sleep_after: Duration::ZERO,
            max_frozen_memory: 0,
        }
    }
}

/// How long a shutdown waits for a stop or freeze that was already under way when it began.
const SHUTDOWN_SETTLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The longest a [`SuspendHook`] may hold up a suspend.
const SUSPEND_HOOK_TIMEOUT: Duration = Duration::from_secs(15);

/// Called once a compute is about to be stopped by a suspend (idle, requested or at
/// shutdown), no client attached, while it still answers: the last chance to read state from
/// it (the proxy's copy of its login roles). Bounded by a timeout; a slow or failing hook
/// delays the suspend, never prevents it.
#[async_trait]
pub trait SuspendHook: Send + Sync + 'static {
    async fn before_suspend(&self, endpoint: &EndpointId, addr: &ComputeAddr);
}

/// Why a start runs: the backend call is the same, the bookkeeping differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartKind {
    /// A client needs the compute.
    Wake,
    /// The backend reports the compute already running ([`Manager::adopt_running`]).
    Adopt,
}

/// What a client's look at a slot set off.
enum Wakeup {
    Start(u64),
    Thaw(u64, Arc<dyn RunningCompute>),
}

/// Decrements the waiting count however `wake` ends, including when the client goes away and
/// its future is dropped mid-wait.
struct WaitingGuard<'a> {
    slot: &'a Arc<Slot>,
    manager: &'a Manager,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        let removable = {
            let mut st = self.slot.lock();
            st.waiting -= 1;
            st.removable()
        };
        self.manager.metrics.held_clients.dec();
        if removable {
            // The last client of a failed start of an endpoint that left the table.
            self.manager.slots.release_if_forgotten(self.slot);
        }
    }
}

/// The backends a manager can start computes with, by the kind a route names.
#[derive(Clone, Default)]
pub struct Backends {
    pub local: Option<Arc<dyn ComputeBackend>>,
    pub kubernetes: Option<Arc<dyn ComputeBackend>>,
}

impl Backends {
    /// One backend for every kind (tests, and single-backend setups).
    pub fn all(backend: Arc<dyn ComputeBackend>) -> Self {
        Self {
            local: Some(Arc::clone(&backend)),
            kubernetes: Some(backend),
        }
    }

    fn for_spec(&self, spec: &BackendSpec) -> Result<&Arc<dyn ComputeBackend>, BackendError> {
        let (backend, section) = match spec {
            BackendSpec::Local { .. } => (&self.local, "[local]"),
            BackendSpec::Kubernetes { .. } => (&self.kubernetes, "[kubernetes]"),
            BackendSpec::Static { .. } => {
                return Err(BackendError::Config(
                    "static endpoints are never started".into(),
                ))
            }
        };
        backend.as_ref().ok_or_else(|| {
            BackendError::Config(format!(
                "endpoint needs the {section} backend, which is not configured"
            ))
        })
    }
}

pub struct Manager {
    /// Swapped by [`Manager::set_config`] (a config reload); read once per use.
    cfg: Mutex<ManagerConfig>,
    backends: Backends,
    slots: Arc<Slots>,
    metrics: ManagerMetrics,
    closing: AtomicBool,
    /// Set by [`Manager::shutdown`]; ends [`Manager::follow_table`].
    closed: watch::Sender<bool>,
    suspend_hook: OnceLock<Arc<dyn SuspendHook>>,
    /// This manager, for the tasks a freeze leaves behind (its deep-sleep timer, the memory
    /// budget), which the `&self` paths that freeze cannot hand an `Arc` to.
    me: Weak<Manager>,
}

impl Manager {
    pub fn new(cfg: ManagerConfig, backends: Backends, metrics: ManagerMetrics) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            slots: Arc::new(Slots::new(
                cfg.max_starts_per_minute,
                PhaseGauges::new(&metrics),
            )),
            cfg: Mutex::new(cfg),
            backends,
            metrics,
            closing: AtomicBool::new(false),
            closed: watch::channel(false).0,
            suspend_hook: OnceLock::new(),
        })
    }

    /// Runs `hook` before every suspend from now on. Set once; a second hook is refused and
    /// handed back.
    pub fn set_suspend_hook(&self, hook: Arc<dyn SuspendHook>) -> Result<(), Arc<dyn SuspendHook>> {
        self.suspend_hook.set(hook)
    }

    pub fn config(&self) -> ManagerConfig {
        *self.cfg.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies from now on: to wakes that begin, starts that follow (a compute keeps the idle
    /// timeout it started with) and start-rate buckets as they refill.
    pub fn set_config(&self, cfg: ManagerConfig) {
        *self.cfg.lock().unwrap_or_else(|p| p.into_inner()) = cfg;
    }

    fn slot(&self, id: &EndpointId) -> Arc<Slot> {
        self.slots.get_or_create(id)
    }

    /// Forgets `id`, which left the routing table: its slot and metric series are dropped once
    /// it is Suspended or Failed with no session attached and no client waiting. A running
    /// compute is not stopped early; its idle timer suspends it as usual (sessions of a
    /// removed endpoint keep their compute until they end). Returns whether the manager had
    /// state for it.
    pub fn forget(&self, id: &EndpointId) -> bool {
        let Some(slot) = self.slots.get(id) else {
            return false;
        };
        slot.lock().forgotten = true;
        self.stop_if_frozen(&slot);
        self.slots.release_if_forgotten(&slot);
        true
    }

    /// Stops the frozen compute of an endpoint that left the table: no client can wake it
    /// again, and it would hold its memory until its deep sleep (or for ever, frozen on
    /// request).
    fn stop_if_frozen(&self, slot: &Arc<Slot>) {
        if slot.lock().frozen_entry().is_none() {
            return;
        }
        if let Some(this) = self.me.upgrade() {
            let slot = Arc::clone(slot);
            tokio::spawn(async move {
                this.deep_sleep(&slot, None, SuspendReason::Requested).await;
            });
        }
    }

    /// Forgets every endpoint `table` no longer routes to a managed backend (absent, or now
    /// static), and un-forgets those it routes again. Returns how many are forgotten (some of
    /// them may still be running). O(endpoints the manager has seen): once per table change,
    /// never per wake or suspend.
    pub fn retain(&self, table: &RoutingTable) -> usize {
        let slots: Vec<Arc<Slot>> = self.slots.all();
        let mut forgotten = 0;
        for slot in slots {
            let routed = table
                .lookup(&slot.id)
                .is_some_and(|r| !matches!(r.backend, BackendSpec::Static { .. }));
            slot.lock().forgotten = !routed;
            if !routed {
                forgotten += 1;
                self.stop_if_frozen(&slot);
                self.slots.release_if_forgotten(&slot);
            }
        }
        forgotten
    }

    /// Follows `table`'s changes with [`Manager::retain`] until [`Manager::shutdown`], so that
    /// endpoints removed by a reload or by the Kubernetes source release their state without
    /// anyone polling. Run it once per manager, next to the table's sources.
    pub async fn follow_table(&self, table: &RoutingTable) {
        let mut changes = table.subscribe();
        let mut closed = self.closed.subscribe();
        loop {
            changes.borrow_and_update();
            let forgotten = self.retain(table);
            debug!(forgotten, "compute manager followed a routing table change");
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = closed.wait_for(|c| *c) => return,
            }
        }
    }

    /// Returns a running compute for `route`, starting it if needed. However many clients call
    /// this at once for a suspended endpoint, exactly one start happens and all of them wait on
    /// it, each for at most `wake_timeout`.
    pub async fn wake(self: &Arc<Self>, route: &Arc<Route>) -> Result<Attached, WakeError> {
        // A running compute is attached by `wake_slot` below, as in `wake_now`; only the static
        // route needs no slot.
        if let Some(attached) = self.attach_static(route) {
            return Ok(attached);
        }
        let started = Instant::now();
        if self.closing.load(Ordering::Acquire) {
            return Err(WakeError::ShuttingDown);
        }
        let mut tier = Tier::Running;
        let result = self.wake_managed(route, started, &mut tier).await;
        let outcome = match &result {
            Ok(l) if l.cold => "cold",
            Ok(_) => "warm",
            Err(e) => e.kind().as_str(),
        };
        self.metrics.wakes.with_label_values(&[outcome]).inc();
        if let Ok(l) = &result {
            self.observe_wake(l.cold, tier, started);
        }
        result
    }

    /// The wake that needs no waiting, done on the caller's thread: a static route, or an
    /// endpoint whose compute runs. `None` for everything else (a start, a thaw, a wait, a
    /// manager shutting down), which [`Manager::wake`] does. Attaching is a counter under the
    /// slot's lock and the lease's drop a notification, so nothing here spawns a task: a relay
    /// thread can call it without handing the connection to the manager's runtime and back.
    pub fn wake_now(self: &Arc<Self>, route: &Arc<Route>) -> Option<Attached> {
        let started = Instant::now();
        if let Some(attached) = self.attach_static(route) {
            return Some(attached);
        }
        if self.closing.load(Ordering::Acquire) {
            return None;
        }
        let slot = self.slots.get(&route.endpoint)?;
        let addr = {
            let mut st = slot.lock();
            if st.gone {
                return None;
            }
            st.attach()?
        };
        let attached = Attached {
            addr,
            lease: SessionLease::Local(LocalSession::new(slot, &self.slots)),
            cold: false,
        };
        self.metrics.wakes.with_label_values(&["warm"]).inc();
        self.observe_wake(false, Tier::Running, started);
        Some(attached)
    }

    /// A static route's address. Always on: nothing to start or suspend, and re-reading the
    /// route on every connect means a reload that moves the address takes effect at once.
    fn attach_static(&self, route: &Route) -> Option<Attached> {
        let BackendSpec::Static { address } = &route.backend else {
            return None;
        };
        self.metrics.wakes.with_label_values(&["warm"]).inc();
        Some(Attached {
            addr: ComputeAddr::new(address.as_str()),
            lease: SessionLease::Detached,
            cold: false,
        })
    }

    fn observe_wake(&self, cold: bool, tier: Tier, started: Instant) {
        let took = started.elapsed().as_secs_f64();
        self.metrics
            .wake_seconds
            .with_label_values(&[if cold { "cold" } else { "warm" }])
            .observe(took);
        self.metrics
            .wake_tier_seconds
            .with_label_values(&[tier.as_str()])
            .observe(took);
    }

    async fn wake_managed(
        self: &Arc<Self>,
        route: &Arc<Route>,
        started: Instant,
        tier: &mut Tier,
    ) -> Result<Attached, WakeError> {
        let wake_timeout = self.config().wake_timeout;
        let deadline = deadline(started, wake_timeout);
        loop {
            let slot = self.slot(&route.endpoint);
            if let Some(result) = self
                .wake_slot(&slot, route, deadline, wake_timeout, tier)
                .await
            {
                return result;
            }
            // Dropped between the look-up and the lock: the endpoint had left the table (this
            // client looked it up just before) or has come back; either way, a new slot.
            self.slots.drop_gone(&slot);
        }
    }

    /// [`Manager::wake_managed`] on one slot; `None` if that slot is `gone`. Sets `tier` to
    /// where this client found the compute (the first time it had to wait for it).
    async fn wake_slot(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        route: &Arc<Route>,
        deadline: Instant,
        wake_timeout: Duration,
        tier: &mut Tier,
    ) -> Option<Result<Attached, WakeError>> {
        let cfg = self.config();
        let mut rx = slot.changed.subscribe();
        let mut joined: Option<u64> = None;
        let mut waiting: Option<WaitingGuard<'_>> = None;
        loop {
            rx.borrow_and_update();
            let spawn_attempt = {
                let mut st = slot.lock();
                if st.gone {
                    // Only before this client counts as waiting: a slot with waiters stays.
                    return None;
                }
                if let Some(addr) = st.attach() {
                    drop(st);
                    return Some(Ok(Attached {
                        addr,
                        lease: SessionLease::Local(LocalSession::new(
                            Arc::clone(slot),
                            &self.slots,
                        )),
                        cold: joined.is_some() || waiting.is_some(),
                    }));
                }
                if let State::Failed { attempt, error } = &st.state {
                    if Some(*attempt) == joined {
                        return Some(Err(WakeError::Backend(Arc::clone(error))));
                    }
                }
                if waiting.is_none() {
                    if st.waiting >= cfg.max_waiting_per_endpoint {
                        return Some(Err(WakeError::QueueFull));
                    }
                    st.waiting += 1;
                    self.metrics.held_clients.inc();
                    waiting = Some(WaitingGuard {
                        slot,
                        manager: self,
                    });
                }
                match &st.state {
                    // Its data is being copied (a branch): wait for the hold to end.
                    State::Suspended | State::Failed { .. } if st.held > 0 => None,
                    State::Suspended | State::Failed { .. } => {
                        if joined.is_none() {
                            *tier = Tier::Stopped;
                        }
                        if !st.take_start_token(cfg.max_starts_per_minute) {
                            return Some(Err(WakeError::RateLimited));
                        }
                        let attempt = st.begin_start();
                        joined = Some(attempt);
                        Some(Wakeup::Start(attempt))
                    }
                    // Fast and harmless to repeat: no start token.
                    State::Frozen { .. } => st.begin_thaw().map(|(attempt, compute)| {
                        *tier = Tier::Frozen;
                        joined = Some(attempt);
                        Wakeup::Thaw(attempt, compute)
                    }),
                    State::Starting { attempt, thaw } => {
                        if joined.is_none() {
                            *tier = if *thaw { Tier::Frozen } else { Tier::Stopped };
                        }
                        joined = Some(*attempt);
                        None
                    }
                    // Wait for the stop or freeze to finish, then go round and start or thaw.
                    State::Suspending { .. } => None,
                    State::Running { .. } => unreachable!("handled above"),
                }
            };
            match spawn_attempt {
                Some(Wakeup::Start(attempt)) => {
                    slot.notify();
                    self.spawn_start(
                        Arc::clone(slot),
                        Arc::clone(route),
                        attempt,
                        StartKind::Wake,
                    );
                }
                Some(Wakeup::Thaw(attempt, compute)) => {
                    slot.notify();
                    self.spawn_thaw(Arc::clone(slot), Arc::clone(route), attempt, compute);
                }
                None => {}
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let blocker = self
                    .backends
                    .for_spec(&route.backend)
                    .ok()
                    .and_then(|b| b.start_blocker(&route.endpoint));
                return Some(Err(match blocker {
                    Some(blocker) => WakeError::Stalled {
                        after: wake_timeout,
                        blocker,
                    },
                    None => WakeError::Timeout(wake_timeout),
                }));
            }
        }
    }

    /// The start runs in its own task so that a client giving up does not cancel it for the
    /// others, and a start is never duplicated.
    fn spawn_start(
        self: &Arc<Self>,
        slot: Arc<Slot>,
        route: Arc<Route>,
        attempt: u64,
        kind: StartKind,
    ) {
        let this = Arc::clone(self);
        let span = match kind {
            StartKind::Wake => tracing::info_span!("start", endpoint = %slot.id, attempt),
            StartKind::Adopt => tracing::info_span!("adopt", endpoint = %slot.id, attempt),
        };
        tokio::spawn(
            async move {
                let t0 = Instant::now();
                if kind == StartKind::Wake {
                    slot.starts.fetch_add(1, Ordering::Relaxed);
                }
                // A start that outlives every client's wait is pointless and would hold the
                // endpoint in Starting forever if the backend hangs.
                let wake_timeout = this.config().wake_timeout;
                let res = match this.backends.for_spec(&route.backend) {
                    Ok(backend) => match tokio::time::timeout(wake_timeout, backend.start(&route)).await {
                        Ok(r) => r,
                        Err(_) => Err(BackendError::StartTimeout(wake_timeout)),
                    },
                    Err(e) => Err(e),
                };
                let idle_timeout = route.idle_timeout.unwrap_or(this.config().idle_timeout);
                let counter = match kind {
                    StartKind::Wake => &this.metrics.starts,
                    StartKind::Adopt => &this.metrics.adoptions,
                };
                match res {
                    Ok(compute) => {
                        let compute: Arc<dyn RunningCompute> = Arc::from(compute);
                        let elapsed_ms = t0.elapsed().as_millis() as u64;
                        match kind {
                            StartKind::Wake => info!(addr = %compute.addr(), elapsed_ms, "compute running"),
                            StartKind::Adopt => {
                                slot.adoptions.fetch_add(1, Ordering::Relaxed);
                                info!(addr = %compute.addr(), elapsed_ms, "running compute adopted");
                            }
                        }
                        counter.with_label_values(&["ok"]).inc();
                        {
                            let mut st = slot.lock();
                            st.deep_sleep_after = this.deep_sleep_after(&route);
                            st.started(attempt, Arc::clone(&compute), idle_timeout);
                        }
                        idle::track(&this, &slot, attempt, compute);
                    }
                    Err(error) => {
                        match kind {
                            StartKind::Wake => {
                                warn!(error = %error, kind = error.kind().as_str(), "compute failed to start");
                                slot.start_failures.fetch_add(1, Ordering::Relaxed);
                            }
                            StartKind::Adopt => warn!(error = %error, kind = error.kind().as_str(), "could not adopt the running compute; the next wake starts it as usual"),
                        }
                        counter.with_label_values(&[error.kind().as_str()]).inc();
                        let mut st = slot.lock();
                        if kind == StartKind::Wake && !error.reached_startup() {
                            st.give_back_start_token(this.config().max_starts_per_minute);
                        }
                        st.start_failed(attempt, Arc::new(error));
                    }
                }
                slot.notify();
                // A failed adoption has no client to wait for; a failed wake's clients
                // release the slot as they leave (`WaitingGuard`).
                this.slots.release_if_forgotten(&slot);
            }
            .instrument(span),
        );
    }

    fn deep_sleep_after(&self, route: &Route) -> Duration {
        route
            .deep_sleep_after
            .unwrap_or(self.config().deep_sleep_after)
    }

    /// Lets the frozen `compute` of `attempt` run again, in its own task for the same reasons
    /// as a start. One that does not come back is stopped and a new one started, for the
    /// clients that wait.
    fn spawn_thaw(
        self: &Arc<Self>,
        slot: Arc<Slot>,
        route: Arc<Route>,
        attempt: u64,
        compute: Arc<dyn RunningCompute>,
    ) {
        let this = Arc::clone(self);
        let span = tracing::info_span!("thaw", endpoint = %slot.id, attempt);
        tokio::spawn(
            async move {
                let t0 = Instant::now();
                let wake_timeout = this.config().wake_timeout;
                let res = match tokio::time::timeout(wake_timeout, compute.thaw()).await {
                    Ok(r) => r,
                    Err(_) => Err(BackendError::StartTimeout(wake_timeout)),
                };
                slot.thaws.fetch_add(1, Ordering::Relaxed);
                match res {
                    Ok(()) => {
                        debug!(elapsed_us = t0.elapsed().as_micros() as u64, "compute thawed");
                        this.metrics.thaws.with_label_values(&["ok"]).inc();
                        let idle_timeout =
                            route.idle_timeout.unwrap_or(this.config().idle_timeout);
                        {
                            let mut st = slot.lock();
                            st.deep_sleep_after = this.deep_sleep_after(&route);
                            st.started(attempt, compute, idle_timeout);
                        }
                        // The exit watch of this attempt still runs; only the idle timer
                        // ended with the freeze.
                        idle::track_idle(&this, &slot, attempt);
                        slot.notify();
                    }
                    Err(error) => {
                        warn!(error = %error, "frozen compute did not come back; stopping it and starting a new one");
                        this.metrics.thaws.with_label_values(&["failed"]).inc();
                        if let Err(e) = compute.stop().await {
                            warn!(error = %e, "stopping the compute that did not thaw reported an error");
                        }
                        let attempt = slot.lock().begin_start();
                        slot.notify();
                        this.spawn_start(slot, route, attempt, StartKind::Wake);
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Takes over the computes that run without this manager having started them, so that
    /// their idle timers run and activity reports for them count: the manager before this one
    /// (a restart, a leader handover) left them running (see [`Manager::shutdown`]), and a
    /// manager only learns of an endpoint otherwise when a client wakes it.
    ///
    /// Asks every backend for its [`ComputeBackend::running_endpoints`]; each endpoint that
    /// `table` routes to that same backend, and that has no state here yet (or a failed
    /// start), goes through the start a wake makes, with no client held: the backend finds the
    /// compute up and returns it, the endpoint is Running, and its idle timeout counts from
    /// then. Clients that connect meanwhile wait for that start like for any other. An
    /// adoption takes no token of `max_starts_per_minute` (it happens once per endpoint when
    /// a manager takes over) and counts in [`EndpointStats::adoptions`], not `starts`.
    /// Failures are logged: the next wake starts the compute as usual.
    ///
    /// Returns how many adoptions began; they finish in the background
    /// ([`Manager::wait_for_phase`]).
    pub async fn adopt_running(self: &Arc<Self>, table: &RoutingTable) -> usize {
        let mut backends: Vec<&Arc<dyn ComputeBackend>> = Vec::new();
        for b in [&self.backends.local, &self.backends.kubernetes]
            .into_iter()
            .flatten()
        {
            if !backends.iter().any(|x| Arc::ptr_eq(*x, b)) {
                backends.push(b);
            }
        }
        let mut adopted = 0;
        for backend in backends {
            let ids = match backend.running_endpoints().await {
                Ok(ids) => ids,
                Err(e) => {
                    warn!(error = %e, kind = e.kind().as_str(), "could not list the running computes; they are adopted at their next wake");
                    continue;
                }
            };
            for id in ids {
                let Some(route) = table.lookup(&id) else {
                    warn!(endpoint = %id, "a compute runs for an endpoint that is not in the routing table; leaving it alone");
                    continue;
                };
                let routed_here = self
                    .backends
                    .for_spec(&route.backend)
                    .is_ok_and(|b| Arc::ptr_eq(b, backend));
                if !routed_here {
                    warn!(endpoint = %id, "a compute runs for an endpoint that the routing table sends to another backend; leaving it alone");
                    continue;
                }
                if self.adopt(route) {
                    adopted += 1;
                }
            }
        }
        if adopted > 0 {
            info!(computes = adopted, "adopting running computes");
        }
        adopted
    }

    /// Starts adopting `route`'s running compute, unless the endpoint is already running,
    /// starting or suspending here (a wake got there first) or the manager is shutting down.
    fn adopt(self: &Arc<Self>, route: Arc<Route>) -> bool {
        if self.closing.load(Ordering::Acquire) {
            return false;
        }
        let (slot, attempt) = loop {
            let slot = self.slot(&route.endpoint);
            let mut st = slot.lock();
            if st.gone {
                drop(st);
                self.slots.drop_gone(&slot);
                continue;
            }
            if !matches!(st.state, State::Suspended | State::Failed { .. }) || st.held > 0 {
                return false;
            }
            let attempt = st.begin_start();
            drop(st);
            break (slot, attempt);
        };
        slot.notify();
        self.spawn_start(slot, route, attempt, StartKind::Adopt);
        true
    }

    /// [`Manager::adopt_running`] once this manager may act: when `leadership` says it leads
    /// (at once without leader election), and then when `routes_loaded` turns true (the
    /// routing table's first complete load from a watched source; an endpoint missing from
    /// the table is not adopted) or `routes_wait` has passed, whichever comes first. Returns
    /// `None` without adopting if this manager never leads (lost, or the election stopped).
    pub async fn adopt_when_ready(
        self: &Arc<Self>,
        table: &RoutingTable,
        leadership: Leadership,
        mut routes_loaded: watch::Receiver<bool>,
        routes_wait: Duration,
    ) -> Option<usize> {
        if !leadership.leading().await {
            return None;
        }
        let loaded = tokio::time::timeout(routes_wait, routes_loaded.wait_for(|l| *l))
            .await
            .map(|r| r.is_ok());
        match loaded {
            Ok(true) => {}
            Ok(false) => {
                warn!("the routing table will not finish loading; adopting the running computes of the endpoints it has")
            }
            Err(_) => {
                warn!(waited = ?routes_wait, "the routing table is not loaded yet; adopting the running computes of the endpoints it has, the others at their next wake")
            }
        }
        Some(self.adopt_running(table).await)
    }

    /// Suspends the compute if nobody is attached or waiting: an idle one with light sleep is
    /// frozen, the others stopped. Returns whether it did.
    async fn try_suspend(
        &self,
        slot: &Arc<Slot>,
        attempt: Option<u64>,
        reason: SuspendReason,
    ) -> bool {
        // Proxies of other replicas (or anything connected straight to the compute) hold no
        // guard here, so an idle or requested suspend also looks at the replicas' activity
        // reports and asks the compute itself. Done before taking the decision under the lock,
        // and the idle condition is checked again after it: a wake or report in between
        // restarts the timer and cancels the suspend.
        if !self.suspend_allowed(slot, reason).await {
            return false;
        }
        let (compute, deep_sleep_after) = {
            let mut st = slot.lock();
            let Some(compute) = st.begin_suspend(attempt, reason, Instant::now()) else {
                return false;
            };
            (compute, st.deep_sleep_after)
        };
        slot.notify();
        if reason == SuspendReason::Idle
            && !deep_sleep_after.is_zero()
            && self
                .freeze_compute(slot, &compute, Some(deep_sleep_after))
                .await
        {
            return true;
        }
        self.stop_compute(slot, compute, reason).await;
        true
    }

    /// Whether nothing outside this manager's own count holds the compute for a suspend for
    /// `reason` (a shutdown suspends regardless): no proxy replica reports sessions and the
    /// compute counts no clients. A compute found busy restarts its idle time.
    async fn suspend_allowed(&self, slot: &Arc<Slot>, reason: SuspendReason) -> bool {
        if reason != SuspendReason::Shutdown {
            let (running, remote) = {
                let st = slot.lock();
                let running = match &st.state {
                    State::Running { compute, .. } => Some(Arc::clone(compute)),
                    _ => None,
                };
                (running, st.remote_sessions(Instant::now()))
            };
            let Some(running) = running else { return false };
            // Replica reports first: they are free to check, and they are the only guard for
            // computes that cannot count their own clients (Kubernetes).
            let clients = if remote > 0 {
                Some(("proxy replicas", remote))
            } else {
                running
                    .client_connections()
                    .await
                    .filter(|n| *n > 0)
                    .map(|n| ("compute", n))
            };
            if let Some((source, n)) = clients {
                debug!(endpoint = %slot.id, clients = n, source, "compute has clients; not suspending");
                slot.busy_deferrals.fetch_add(1, Ordering::Relaxed);
                slot.lock().idle_since = Instant::now();
                slot.notify();
                return false;
            }
        }
        true
    }

    /// Freezes `compute`, which `slot` is suspending: Frozen, with a timer that stops it after
    /// `deep_sleep_after` (none: frozen until something else ends it), and the memory budget
    /// checked. Returns false, with the compute left for the caller to stop or resume, if it
    /// cannot be frozen or the manager is shutting down.
    async fn freeze_compute(
        &self,
        slot: &Arc<Slot>,
        compute: &Arc<dyn RunningCompute>,
        deep_sleep_after: Option<Duration>,
    ) -> bool {
        if self.closing.load(Ordering::Acquire) {
            return false;
        }
        match compute.freeze().await {
            Ok(true) => {}
            Ok(false) => {
                self.metrics.freezes.with_label_values(&["refused"]).inc();
                return false;
            }
            Err(e) => {
                warn!(endpoint = %slot.id, error = %e, "could not freeze the compute; stopping it");
                self.metrics.freezes.with_label_values(&["refused"]).inc();
                return false;
            }
        }
        let memory = compute.memory();
        let freeze = {
            let mut st = slot.lock();
            // Checked under the lock a shutdown takes to find frozen computes: either it sees
            // this one frozen and stops it, or this sees it closing and stops it here.
            if self.closing.load(Ordering::Acquire) {
                None
            } else {
                st.frozen(Arc::clone(compute), memory)
            }
        };
        let Some(freeze) = freeze else {
            return false;
        };
        info!(endpoint = %slot.id, memory, "compute frozen (light sleep)");
        slot.freezes.fetch_add(1, Ordering::Relaxed);
        self.metrics.freezes.with_label_values(&["ok"]).inc();
        slot.notify();
        if let Some(this) = self.me.upgrade() {
            if let Some(after) = deep_sleep_after {
                idle::track_deep_sleep(&this, slot, freeze, deadline(Instant::now(), after));
            }
            tokio::spawn(async move { this.enforce_memory_budget().await });
        }
        true
    }

    /// Stops the frozen computes the memory budget cannot hold, least recently used first.
    /// O(endpoints) per freeze: freezes come at most once per idle timeout per endpoint.
    async fn enforce_memory_budget(&self) {
        let budget = self.config().max_frozen_memory;
        if budget == 0 {
            return;
        }
        let frozen: Vec<(Arc<Slot>, u64, budget::Frozen)> = self
            .slots
            .all()
            .into_iter()
            .filter_map(|s| {
                let (freeze, last_used, memory) = s.lock().frozen_entry()?;
                Some((s, freeze, budget::Frozen { last_used, memory }))
            })
            .collect();
        let entries: Vec<budget::Frozen> = frozen.iter().map(|f| f.2).collect();
        for i in budget::evictions(&entries, budget) {
            let (slot, freeze, _) = &frozen[i];
            info!(endpoint = %slot.id, "frozen computes exceed max_frozen_memory; stopping the least recently used");
            self.deep_sleep(slot, Some(*freeze), SuspendReason::MemoryBudget)
                .await;
        }
    }

    /// Stops `slot`'s frozen compute (of freeze number `freeze`, if given). Returns whether it
    /// did.
    async fn deep_sleep(
        &self,
        slot: &Arc<Slot>,
        freeze: Option<u64>,
        reason: SuspendReason,
    ) -> bool {
        let Some(compute) = slot.lock().begin_deep_sleep(freeze) else {
            return false;
        };
        slot.notify();
        // Let it run first: the suspend hook asks it for state, and a stop is a signal a
        // stopped process would not act on. One that does not come back is stopped anyway.
        if let Err(e) = compute.thaw().await {
            warn!(endpoint = %slot.id, error = %e, "the frozen compute did not come back before its stop");
        }
        self.stop_compute(slot, compute, reason).await;
        true
    }

    /// Stops `compute`, which `slot` is suspending, after the suspend hook.
    async fn stop_compute(
        &self,
        slot: &Arc<Slot>,
        compute: Arc<dyn RunningCompute>,
        reason: SuspendReason,
    ) {
        if let Some(hook) = self.suspend_hook.get() {
            let ran = tokio::time::timeout(
                SUSPEND_HOOK_TIMEOUT,
                hook.before_suspend(&slot.id, compute.addr()),
            )
            .await;
            if ran.is_err() {
                warn!(endpoint = %slot.id, "the before-suspend hook did not finish in time; suspending anyway");
            }
        }
        info!(endpoint = %slot.id, reason = reason.as_str(), "suspending compute");
        let t0 = Instant::now();
        if let Err(e) = compute.stop().await {
            warn!(endpoint = %slot.id, error = %e, "compute stop reported an error");
        }
        info!(endpoint = %slot.id, elapsed_ms = t0.elapsed().as_millis() as u64, "compute suspended");
        slot.lock().suspended();
        slot.suspends.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .suspends
            .with_label_values(&[reason.as_str()])
            .inc();
        slot.notify();
        self.slots.release_if_forgotten(slot);
    }

    /// Suspends `id` now if no client is attached or waiting, reported by a proxy replica, or
    /// connected to the compute (the operator's or a test's way to do what the idle timer does). Returns whether a compute was stopped.
    pub async fn suspend(&self, id: &EndpointId) -> bool {
        let Some(slot) = self.slots.get(id) else {
            return false;
        };
        if self.deep_sleep(&slot, None, SuspendReason::Requested).await {
            return true;
        }
        self.try_suspend(&slot, None, SuspendReason::Requested)
            .await
    }

    /// Freezes `id` now, as its idle timer would once idle (light sleep), if nobody is attached
    /// or waiting, reported by a proxy replica, or connected to the compute, and its backend
    /// can freeze it. Unlike the timer it does not look at `deep_sleep_after`: the compute
    /// stays frozen until a wake, a requested suspend, the memory budget or shutdown (a
    /// benchmark's or a test's way to reach the frozen tier without waiting). Returns whether
    /// it froze; when it cannot be frozen it keeps running.
    pub async fn freeze(&self, id: &EndpointId) -> bool {
        let Some(slot) = self.slots.get(id) else {
            return false;
        };
        if !self.suspend_allowed(&slot, SuspendReason::Requested).await {
            return false;
        }
        let Some(compute) =
            slot.lock()
                .begin_suspend(None, SuspendReason::Requested, Instant::now())
        else {
            return false;
        };
        slot.notify();
        if self.freeze_compute(&slot, &compute, None).await {
            return true;
        }
        // Could not freeze: it goes back to running, as if nothing had happened.
        let attempt = slot.lock().resumed(compute);
        slot.notify();
        if let (Some(attempt), Some(this)) = (attempt, self.me.upgrade()) {
            idle::track_idle(&this, &slot, attempt);
        }
        false
    }

    /// Records what proxy replica `replica` says about its sessions: `(endpoint, sessions)`
    /// pairs, each valid for `ttl` (the replica repeats the report well within it). A count
    /// above 0 is activity, like a wake, and keeps the compute from an idle or requested
    /// suspend until a report of 0 or the expiry; 0 forgets the replica's entry and, like the
    /// last guard dropped, restarts the idle timer.
    ///
    /// Endpoints the manager has never woken are skipped: they have no compute to keep, and
    /// the replica repeats the report, so it counts from the first one after the next wake.
    /// The caller (the API) drops ids that are not in the routing table. Returns how many
    /// counts were recorded.
    pub fn report_activity(
        &self,
        replica: &str,
        counts: impl IntoIterator<Item = (EndpointId, usize)>,
        ttl: Duration,
    ) -> usize {
        let now = Instant::now();
        let expires_at = now + ttl.min(MAX_REPORT_TTL);
        let mut recorded = 0;
        for (id, sessions) in counts {
            let Some(slot) = self.slots.get(&id) else {
                continue;
            };
            let mut st = slot.lock();
            if sessions == 0 {
                // The replica's last session closed: like the last guard dropped, that starts
                // the idle time (an expired entry already stopped counting long ago).
                if st
                    .remote
                    .remove(replica)
                    .is_some_and(|r| r.expires_at > now)
                {
                    st.idle_since = now;
                    drop(st);
                    slot.notify();
                }
                recorded += 1;
                continue;
            }
            if !st.remote.contains_key(replica) && st.remote.len() >= MAX_REPLICAS_PER_ENDPOINT {
                st.remote.retain(|_, r| r.expires_at > now);
                if st.remote.len() >= MAX_REPLICAS_PER_ENDPOINT {
                    drop(st);
                    warn!(endpoint = %id, replica, "too many proxy replicas reporting; report ignored");
                    continue;
                }
            }
            st.remote.insert(
                replica.to_owned(),
                RemoteReport {
                    sessions,
                    expires_at,
                },
            );
            st.idle_since = now;
            drop(st);
            slot.notify();
            recorded += 1;
        }
        recorded
    }

    /// Endpoints the manager has seen (woken at least once).
    pub fn endpoints(&self) -> Vec<EndpointId> {
        let mut ids: Vec<EndpointId> = self.slots.all().iter().map(|s| s.id.clone()).collect();
        ids.sort();
        ids
    }

    pub fn stats(&self, id: &EndpointId) -> Option<EndpointStats> {
        let slot = self.slots.get(id)?;
        let st = slot.lock();
        Some(EndpointStats {
            phase: st.phase(),
            attached: st.attached,
            waiting: st.waiting,
            starts: slot.starts.load(Ordering::Relaxed),
            start_failures: slot.start_failures.load(Ordering::Relaxed),
            adoptions: slot.adoptions.load(Ordering::Relaxed),
            suspends: slot.suspends.load(Ordering::Relaxed),
            crashes: slot.crashes.load(Ordering::Relaxed),
            busy_deferrals: slot.busy_deferrals.load(Ordering::Relaxed),
            remote_sessions: st.remote_sessions(Instant::now()),
            addr: match &st.state {
                State::Running { compute, .. } => Some(compute.addr().clone()),
                _ => None,
            },
            freezes: slot.freezes.load(Ordering::Relaxed),
            thaws: slot.thaws.load(Ordering::Relaxed),
            frozen_memory: st.frozen_entry().and_then(|(_, _, m)| m),
        })
    }

    /// Resolves once `id` is in `phase` (used by tests and by status waits).
    pub async fn wait_for_phase(&self, id: &EndpointId, phase: Phase) {
        let slot = self.slot(id);
        let mut rx = slot.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if slot.lock().phase() == phase {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Refuses new wakes and stops the computes that cannot outlive this process (the local
    /// backend's `postgres` children). Others (Kubernetes workloads) keep running for the next
    /// manager, which adopts them when it starts or becomes leader
    /// ([`Manager::adopt_when_ready`]).
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::Release);
        self.closed.send_replace(true);
        let all: Vec<Arc<Slot>> = self.slots.all();
        let mut running = Vec::new();
        let mut frozen = Vec::new();
        let mut settling = Vec::new();
        for s in all {
            match &s.lock().state {
                State::Running { compute, .. } if compute.stop_on_shutdown() => {
                    running.push(Arc::clone(&s))
                }
                State::Frozen { compute, .. } if compute.stop_on_shutdown() => {
                    frozen.push(Arc::clone(&s))
                }
                // A stop or freeze under way (a freeze that ends now stops its compute: it
                // sees `closing`). A start or thaw under way is left as before: a postgres it
                // leaves running gets its death signal (fast shutdown) when pgwake exits.
                State::Suspending { .. } => settling.push(Arc::clone(&s)),
                _ => {}
            }
        }
        let stops = running
            .iter()
            .map(|s| self.try_suspend(s, None, SuspendReason::Shutdown));
        let deep = frozen
            .iter()
            .map(|s| self.deep_sleep(s, None, SuspendReason::Shutdown));
        futures::future::join(
            futures::future::join_all(stops),
            futures::future::join_all(deep),
        )
        .await;
        // A stop under way is waited for, so that the process does not exit under it (a
        // freeze that finished then would leave its compute stopped for good).
        let waits = settling.iter().map(|s| async move {
            let mut rx = s.changed.subscribe();
            let settled = async {
                loop {
                    rx.borrow_and_update();
                    if !matches!(s.lock().state, State::Suspending { .. }) {
                        return;
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(SHUTDOWN_SETTLE_TIMEOUT, settled).await;
        });
        futures::future::join_all(waits).await;
    }
}

#[cfg(test)]
mod tests;
