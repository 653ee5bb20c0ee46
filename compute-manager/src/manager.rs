use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use pgwake_router::{BackendSpec, EndpointId, Route, RoutingTable};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::{
    BackendError, ComputeAddr, ComputeBackend, Leadership, ManagerMetrics, RunningCompute,
    WakeError,
};

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
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            wake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            max_waiting_per_endpoint: 1000,
            max_starts_per_minute: 0,
        }
    }
}

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
    fn as_str(self) -> &'static str {
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

/// At most this many replicas are remembered per endpoint: a report from one more (all others
/// still unexpired) is ignored, so a misbehaving client of the API cannot grow the map without
/// bound. Far more than any real deployment runs.
const MAX_REPLICAS_PER_ENDPOINT: usize = 1024;

/// The longest a report counts: a replica that vanishes without a last report of 0 (killed,
/// partitioned) holds its computes up at most this long, whatever ttl it asked for.
const MAX_REPORT_TTL: Duration = Duration::from_secs(600);

/// One proxy replica's last word about an endpoint.
#[derive(Debug, Clone, Copy)]
struct RemoteReport {
    sessions: usize,
    /// A replica that dies stops reporting; its sessions died with it, so its count only
    /// holds until then.
    expires_at: Instant,
}

/// Why a start runs: the backend call is the same, the bookkeeping differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartKind {
    /// A client needs the compute.
    Wake,
    /// The backend reports the compute already running ([`Manager::adopt_running`]).
    Adopt,
}

enum State {
    Suspended,
    Starting {
        attempt: u64,
    },
    Running {
        attempt: u64,
        compute: Arc<dyn RunningCompute>,
        idle_timeout: Duration,
    },
    Suspending,
    Failed {
        attempt: u64,
        error: Arc<BackendError>,
    },
}

impl State {
    fn phase(&self) -> Phase {
        match self {
            State::Suspended => Phase::Suspended,
            State::Starting { .. } => Phase::Starting,
            State::Running { .. } => Phase::Running,
            State::Suspending => Phase::Suspending,
            State::Failed { .. } => Phase::Failed,
        }
    }
}

struct Inner {
    state: State,
    /// Connections holding an [`ActivityGuard`]; a compute with any is never suspended.
    attached: usize,
    /// Clients held in `wake` for this endpoint.
    waiting: usize,
    /// Sessions attached through proxy replicas that hold no guard here (manager service
    /// mode), by replica id: counts above 0 only (a 0 removes the entry); expired entries
    /// count for nothing and are purged when the map is full.
    remote: HashMap<String, RemoteReport>,
    idle_since: Instant,
    attempt: u64,
    /// Start tokens left and when they were last counted (see `max_starts_per_minute`).
    start_tokens: f64,
    tokens_at: Instant,
}

impl Inner {
    /// Sessions that unexpired replica reports count at `now`.
    fn remote_sessions(&self, now: Instant) -> usize {
        self.remote
            .values()
            .filter(|r| r.expires_at > now)
            .fold(0, |n, r| n.saturating_add(r.sessions))
    }

    /// Moves to Starting under a new attempt number, which the start task and its watchers
    /// carry so that they never act on a later attempt's state.
    fn begin_start(&mut self) -> u64 {
        self.attempt += 1;
        self.state = State::Starting {
            attempt: self.attempt,
        };
        self.attempt
    }

    fn take_start_token(&mut self, per_minute: u32) -> bool {
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

struct Slot {
    id: EndpointId,
    inner: Mutex<Inner>,
    /// Bumped after every change a waiter or the idle task may care about. Subscribing before
    /// looking at `inner` means no change between the look and the wait is ever missed.
    changed: watch::Sender<()>,
    starts: AtomicU64,
    start_failures: AtomicU64,
    adoptions: AtomicU64,
    suspends: AtomicU64,
    crashes: AtomicU64,
    busy_deferrals: AtomicU64,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in a few lines of bookkeeping; carrying
        // on with the data is better than poisoning every future connect to the endpoint.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_replace(());
    }
}

/// What a client gets from [`Manager::wake`]: where to connect, and the guard that keeps the
/// compute from being suspended for as long as the connection lives.
pub struct Lease {
    pub addr: ComputeAddr,
    pub guard: ActivityGuard,
    /// True if this client had to wait for a start.
    pub cold: bool,
}

/// Held by every proxied connection. The last one dropped starts the idle timer.
pub struct ActivityGuard {
    slot: Option<Arc<Slot>>,
    /// Through a remote manager the session is counted in this proxy instead (and reported to
    /// the manager); held only for its drop, which does the uncounting.
    _remote: Option<crate::service::SessionGuard>,
}

impl ActivityGuard {
    /// A guard that tracks nothing: for computes that are never suspended (static routes).
    pub fn detached() -> Self {
        Self {
            slot: None,
            _remote: None,
        }
    }

    fn local(slot: Arc<Slot>) -> Self {
        Self {
            slot: Some(slot),
            _remote: None,
        }
    }

    pub(crate) fn remote(session: crate::service::SessionGuard) -> Self {
        Self {
            slot: None,
            _remote: Some(session),
        }
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let mut st = slot.lock();
            st.attached -= 1;
            let now_idle = st.attached == 0;
            if now_idle {
                st.idle_since = Instant::now();
            }
            drop(st);
            if now_idle {
                slot.notify();
            }
        }
    }
}

/// Decrements the waiting count however `wake` ends, including when the client goes away and
/// its future is dropped mid-wait.
struct WaitingGuard<'a> {
    slot: &'a Slot,
    metrics: &'a ManagerMetrics,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.slot.lock().waiting -= 1;
        self.metrics.held_clients.dec();
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
    slots: DashMap<EndpointId, Arc<Slot>>,
    metrics: ManagerMetrics,
    closing: AtomicBool,
}

impl Manager {
    pub fn new(cfg: ManagerConfig, backends: Backends, metrics: ManagerMetrics) -> Arc<Self> {
        Arc::new(Self {
            cfg: Mutex::new(cfg),
            backends,
            slots: DashMap::new(),
            metrics,
            closing: AtomicBool::new(false),
        })
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
        if let Some(s) = self.slots.get(id) {
            return Arc::clone(&s);
        }
        let slot = self.slots.entry(id.clone()).or_insert_with(|| {
            Arc::new(Slot {
                id: id.clone(),
                inner: Mutex::new(Inner {
                    state: State::Suspended,
                    attached: 0,
                    waiting: 0,
                    remote: HashMap::new(),
                    idle_since: Instant::now(),
                    attempt: 0,
                    start_tokens: f64::from(self.config().max_starts_per_minute),
                    tokens_at: Instant::now(),
                }),
                changed: watch::channel(()).0,
                starts: AtomicU64::new(0),
                start_failures: AtomicU64::new(0),
                adoptions: AtomicU64::new(0),
                suspends: AtomicU64::new(0),
                crashes: AtomicU64::new(0),
                busy_deferrals: AtomicU64::new(0),
            })
        });
        Arc::clone(&slot)
    }

    /// Returns a running compute for `route`, starting it if needed. However many clients call
    /// this at once for a suspended endpoint, exactly one start happens and all of them wait on
    /// it, each for at most `wake_timeout`.
    pub async fn wake(self: &Arc<Self>, route: &Arc<Route>) -> Result<Lease, WakeError> {
        let started = Instant::now();
        if let BackendSpec::Static { address } = &route.backend {
            // Always on: nothing to start or suspend, and re-reading the route on every connect
            // means a reload that moves the address takes effect at once.
            self.metrics.wakes.with_label_values(&["warm"]).inc();
            return Ok(Lease {
                addr: ComputeAddr::new(address.as_str()),
                guard: ActivityGuard::detached(),
                cold: false,
            });
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(WakeError::ShuttingDown);
        }
        let result = self.wake_managed(route, started).await;
        let outcome = match &result {
            Ok(l) if l.cold => "cold",
            Ok(_) => "warm",
            Err(e) => e.kind(),
        };
        self.metrics.wakes.with_label_values(&[outcome]).inc();
        if let Ok(l) = &result {
            self.metrics
                .wake_seconds
                .with_label_values(&[if l.cold { "cold" } else { "warm" }])
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn wake_managed(
        self: &Arc<Self>,
        route: &Arc<Route>,
        started: Instant,
    ) -> Result<Lease, WakeError> {
        let slot = self.slot(&route.endpoint);
        let wake_timeout = self.config().wake_timeout;
        let deadline = started + wake_timeout;
        let mut rx = slot.changed.subscribe();
        let mut joined: Option<u64> = None;
        let mut waiting: Option<WaitingGuard<'_>> = None;
        loop {
            rx.borrow_and_update();
            let spawn_attempt = {
                let mut st = slot.lock();
                match &st.state {
                    State::Running { compute, .. } => {
                        let addr = compute.addr().clone();
                        st.attached += 1;
                        drop(st);
                        return Ok(Lease {
                            addr,
                            guard: ActivityGuard::local(Arc::clone(&slot)),
                            cold: joined.is_some() || waiting.is_some(),
                        });
                    }
                    State::Failed { attempt, error } if Some(*attempt) == joined => {
                        return Err(WakeError::Backend(Arc::clone(error)));
                    }
                    _ => {}
                }
                if waiting.is_none() {
                    if st.waiting >= self.config().max_waiting_per_endpoint {
                        return Err(WakeError::QueueFull);
                    }
                    st.waiting += 1;
                    self.metrics.held_clients.inc();
                    waiting = Some(WaitingGuard {
                        slot: &slot,
                        metrics: &self.metrics,
                    });
                }
                match st.state {
                    State::Suspended | State::Failed { .. } => {
                        if !st.take_start_token(self.config().max_starts_per_minute) {
                            return Err(WakeError::RateLimited);
                        }
                        let attempt = st.begin_start();
                        joined = Some(attempt);
                        Some(attempt)
                    }
                    State::Starting { attempt } => {
                        joined = Some(attempt);
                        None
                    }
                    // Wait for the stop to finish, then go round and start it again.
                    State::Suspending => None,
                    State::Running { .. } => unreachable!("handled above"),
                }
            };
            if let Some(attempt) = spawn_attempt {
                slot.notify();
                self.spawn_start(
                    Arc::clone(&slot),
                    Arc::clone(route),
                    attempt,
                    StartKind::Wake,
                );
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(WakeError::Timeout(wake_timeout));
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
                            st.state = State::Running {
                                attempt,
                                compute: Arc::clone(&compute),
                                idle_timeout,
                            };
                            // An adopted compute, too, gets a whole idle_timeout from here.
                            st.idle_since = Instant::now();
                        }
                        this.spawn_watchers(&slot, attempt, compute, idle_timeout);
                    }
                    Err(error) => {
                        match kind {
                            StartKind::Wake => {
                                warn!(error = %error, kind = error.kind(), "compute failed to start");
                                slot.start_failures.fetch_add(1, Ordering::Relaxed);
                            }
                            StartKind::Adopt => warn!(error = %error, kind = error.kind(), "could not adopt the running compute; the next wake starts it as usual"),
                        }
                        counter.with_label_values(&[error.kind()]).inc();
                        slot.lock().state = State::Failed {
                            attempt,
                            error: Arc::new(error),
                        };
                    }
                }
                this.update_phase_gauges();
                slot.notify();
            }
            .instrument(span),
        );
    }

    fn spawn_watchers(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        attempt: u64,
        compute: Arc<dyn RunningCompute>,
        idle_timeout: Duration,
    ) {
        // Crash watch: a compute that goes away on its own is marked suspended, so the next
        // client starts a new one instead of being sent to a dead address.
        let this = Arc::clone(self);
        let s = Arc::clone(slot);
        tokio::spawn(async move {
            compute.exited().await;
            let crashed = {
                let mut st = s.lock();
                let crashed = matches!(st.state, State::Running { attempt: a, .. } if a == attempt);
                if crashed {
                    st.state = State::Suspended;
                }
                crashed
            };
            if crashed {
                warn!(endpoint = %s.id, "compute exited unexpectedly; it will be started again on the next connect");
                s.crashes.fetch_add(1, Ordering::Relaxed);
                this.metrics
                    .crashes
                    .with_label_values(&[s.id.as_str()])
                    .inc();
                this.update_phase_gauges();
                s.notify();
            }
        });

        let this = Arc::clone(self);
        let s = Arc::clone(slot);
        tokio::spawn(async move {
            let mut rx = s.changed.subscribe();
            loop {
                rx.borrow_and_update();
                let deadline = {
                    let st = s.lock();
                    match st.state {
                        State::Running { attempt: a, .. } if a == attempt => {}
                        _ => return,
                    }
                    (st.attached == 0 && st.waiting == 0).then(|| st.idle_since + idle_timeout)
                };
                match deadline {
                    Some(d) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(d) => {
                                this.try_suspend(&s, Some(attempt), SuspendReason::Idle).await;
                            }
                            r = rx.changed() => if r.is_err() { return },
                        }
                    }
                    None => {
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
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
                    warn!(error = %e, kind = e.kind(), "could not list the running computes; they are adopted at their next wake");
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
        let slot = self.slot(&route.endpoint);
        let attempt = {
            let mut st = slot.lock();
            if !matches!(st.state, State::Suspended | State::Failed { .. }) {
                return false;
            }
            st.begin_start()
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

    /// Suspends the compute if nobody is attached or waiting. Returns whether it did.
    async fn try_suspend(&self, slot: &Slot, attempt: Option<u64>, reason: SuspendReason) -> bool {
        // Proxies of other replicas (or anything connected straight to the compute) hold no
        // guard here, so an idle or requested suspend also looks at the replicas' activity
        // reports and asks the compute itself. Done before taking the decision under the lock,
        // and the idle condition is checked again after it: a wake or report in between
        // restarts the timer and cancels the suspend.
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
        let compute = {
            let mut st = slot.lock();
            let compute = match &st.state {
                State::Running {
                    attempt: a,
                    compute,
                    idle_timeout,
                } if attempt.is_none_or(|x| x == *a) => {
                    // A report can land while the compute was being asked above.
                    let busy =
                        st.attached > 0 || st.waiting > 0 || st.remote_sessions(Instant::now()) > 0;
                    let idle_enough = reason != SuspendReason::Idle
                        || Instant::now() >= st.idle_since + *idle_timeout;
                    if (busy && reason != SuspendReason::Shutdown) || !idle_enough {
                        return false;
                    }
                    Arc::clone(compute)
                }
                _ => return false,
            };
            // Decided under the same lock a connecting client takes to attach: from here on,
            // new clients wait for the stop and then start the compute again.
            st.state = State::Suspending;
            compute
        };
        slot.notify();
        info!(endpoint = %slot.id, reason = reason.as_str(), "suspending compute");
        let t0 = Instant::now();
        if let Err(e) = compute.stop().await {
            warn!(endpoint = %slot.id, error = %e, "compute stop reported an error");
        }
        info!(endpoint = %slot.id, elapsed_ms = t0.elapsed().as_millis() as u64, "compute suspended");
        slot.lock().state = State::Suspended;
        slot.suspends.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .suspends
            .with_label_values(&[reason.as_str()])
            .inc();
        self.update_phase_gauges();
        slot.notify();
        true
    }

    /// Suspends `id` now if no client is attached or waiting, reported by a proxy replica, or
    /// connected to the compute (the operator's or a test's way to do what the idle timer does). Returns whether a compute was stopped.
    pub async fn suspend(&self, id: &EndpointId) -> bool {
        let Some(slot) = self.slots.get(id).map(|s| Arc::clone(&s)) else {
            return false;
        };
        self.try_suspend(&slot, None, SuspendReason::Requested)
            .await
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
            let Some(slot) = self.slots.get(&id).map(|s| Arc::clone(&s)) else {
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
        let mut ids: Vec<EndpointId> = self.slots.iter().map(|s| s.key().clone()).collect();
        ids.sort();
        ids
    }

    pub fn stats(&self, id: &EndpointId) -> Option<EndpointStats> {
        let slot = self.slots.get(id)?;
        let st = slot.lock();
        Some(EndpointStats {
            phase: st.state.phase(),
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
        })
    }

    /// Resolves once `id` is in `phase` (used by tests and by status waits).
    pub async fn wait_for_phase(&self, id: &EndpointId, phase: Phase) {
        let slot = self.slot(id);
        let mut rx = slot.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if slot.lock().state.phase() == phase {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn update_phase_gauges(&self) {
        const ALL: [Phase; 5] = [
            Phase::Suspended,
            Phase::Starting,
            Phase::Running,
            Phase::Suspending,
            Phase::Failed,
        ];
        let mut counts = [0i64; 5];
        for s in self.slots.iter() {
            let phase = s.lock().state.phase();
            counts[phase as usize] += 1;
            for p in ALL {
                self.metrics
                    .endpoint_state
                    .with_label_values(&[s.id.as_str(), p.as_str()])
                    .set(i64::from(p == phase));
            }
        }
        for (p, c) in ALL.into_iter().zip(counts) {
            self.metrics
                .computes
                .with_label_values(&[p.as_str()])
                .set(c);
        }
    }

    /// Refuses new wakes and stops the computes that cannot outlive this process (the local
    /// backend's `postgres` children). Others (Kubernetes workloads) keep running for the next
    /// manager, which adopts them when it starts or becomes leader
    /// ([`Manager::adopt_when_ready`]).
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::Release);
        let slots: Vec<Arc<Slot>> = self
            .slots
            .iter()
            .map(|s| Arc::clone(&s))
            .filter(|s| match &s.lock().state {
                State::Running { compute, .. } => compute.stop_on_shutdown(),
                _ => false,
            })
            .collect();
        let stops = slots
            .iter()
            .map(|s| self.try_suspend(s, None, SuspendReason::Shutdown));
        futures::future::join_all(stops).await;
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
