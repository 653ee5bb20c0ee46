//! State machine tests against a scripted backend, with tokio's paused clock: timers fire
//! exactly when the test advances time, so nothing here sleeps for real.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

use async_trait::async_trait;
use pgwake_router::{BackendSpec, EndpointId, Route};

use super::*;

#[derive(Default)]
struct Script {
    start_delay: Duration,
    stop_delay: Duration,
    fail: bool,
    /// Fails before postgres's own start-up, as a data directory still held by a previous
    /// compute does.
    fail_early: bool,
    stop_on_shutdown: bool,
    /// What `running_endpoints` reports (computes a previous manager left running); `start`
    /// for one of them plays the backend finding it up.
    running: Vec<EndpointId>,
    /// `running_endpoints` fails instead.
    list_fails: bool,
    /// Computes can be frozen (light sleep), taking `freeze_delay`, holding `memory`.
    freezable: bool,
    freeze_delay: Duration,
    memory: Option<u64>,
    /// A thaw reports the compute did not come back.
    thaw_fails: bool,
}

struct FakeBackend {
    script: Mutex<Script>,
    starts: AtomicUsize,
    stops: Arc<AtomicUsize>,
    freezes: Arc<AtomicUsize>,
    thaws: Arc<AtomicUsize>,
    last: Mutex<Option<watch::Sender<bool>>>,
}

impl FakeBackend {
    fn new(script: Script) -> Arc<Self> {
        Arc::new(Self {
            script: Mutex::new(script),
            starts: AtomicUsize::new(0),
            stops: Arc::new(AtomicUsize::new(0)),
            freezes: Arc::new(AtomicUsize::new(0)),
            thaws: Arc::new(AtomicUsize::new(0)),
            last: Mutex::new(None),
        })
    }

    fn crash(&self) {
        self.last
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .send_replace(true);
    }
}

struct FakeCompute {
    addr: ComputeAddr,
    stop_on_shutdown: bool,
    stop_delay: Duration,
    stops: Arc<AtomicUsize>,
    exited: watch::Sender<bool>,
    freezable: bool,
    freeze_delay: Duration,
    memory: Option<u64>,
    thaw_fails: bool,
    freezes: Arc<AtomicUsize>,
    thaws: Arc<AtomicUsize>,
    frozen: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl ComputeBackend for FakeBackend {
    async fn start(&self, _route: &Route) -> Result<Box<dyn RunningCompute>, BackendError> {
        let n = self.starts.fetch_add(1, Ordering::SeqCst);
        let (delay, fail, fail_early, stop_delay) = {
            let s = self.script.lock().unwrap();
            (s.start_delay, s.fail, s.fail_early, s.stop_delay)
        };
        tokio::time::sleep(delay).await;
        if fail_early {
            return Err(BackendError::DataDirBusy("postmaster.pid of pid 42".into()));
        }
        if fail {
            return Err(BackendError::StartFailed {
                status: "exit 1".into(),
                log_tail: "FATAL: secret internal path /var/lib/x".into(),
            });
        }
        let (tx, _) = watch::channel(false);
        *self.last.lock().unwrap() = Some(tx.clone());
        let s = self.script.lock().unwrap();
        Ok(Box::new(FakeCompute {
            addr: ComputeAddr::new(format!("127.0.0.1:{}", 10000 + n)),
            stop_on_shutdown: s.stop_on_shutdown,
            stop_delay,
            stops: Arc::clone(&self.stops),
            exited: tx,
            freezable: s.freezable,
            freeze_delay: s.freeze_delay,
            memory: s.memory,
            thaw_fails: s.thaw_fails,
            freezes: Arc::clone(&self.freezes),
            thaws: Arc::clone(&self.thaws),
            frozen: Default::default(),
        }))
    }

    async fn running_endpoints(&self) -> Result<Vec<EndpointId>, BackendError> {
        let s = self.script.lock().unwrap();
        if s.list_fails {
            return Err(BackendError::io(
                "list",
                std::io::Error::other("API unreachable"),
            ));
        }
        Ok(s.running.clone())
    }
}

#[async_trait]
impl RunningCompute for FakeCompute {
    fn addr(&self) -> &ComputeAddr {
        &self.addr
    }
    fn stop_on_shutdown(&self) -> bool {
        self.stop_on_shutdown
    }
    async fn stop(&self) -> Result<(), BackendError> {
        // As the local backend's: a frozen compute is let run before its stop.
        self.frozen.store(false, Ordering::SeqCst);
        tokio::time::sleep(self.stop_delay).await;
        self.stops.fetch_add(1, Ordering::SeqCst);
        self.exited.send_replace(true);
        Ok(())
    }
    async fn exited(&self) {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }
    async fn freeze(&self) -> Result<bool, BackendError> {
        if !self.freezable {
            return Ok(false);
        }
        tokio::time::sleep(self.freeze_delay).await;
        self.freezes.fetch_add(1, Ordering::SeqCst);
        self.frozen.store(true, Ordering::SeqCst);
        Ok(true)
    }
    async fn thaw(&self) -> Result<(), BackendError> {
        let was = self.frozen.swap(false, Ordering::SeqCst);
        self.thaws.fetch_add(1, Ordering::SeqCst);
        if self.thaw_fails && was {
            return Err(BackendError::ThawFailed("scripted".into()));
        }
        Ok(())
    }
    fn memory(&self) -> Option<u64> {
        self.memory
    }
}

fn route(id: &str, idle: Option<Duration>) -> Arc<Route> {
    Arc::new(Route {
        endpoint: EndpointId::parse(id).unwrap(),
        backend: BackendSpec::Local {
            settings: BTreeMap::new(),
        },
        idle_timeout: idle,
        deep_sleep_after: None,
        allow: Vec::new(),
        max_connections: None,
    })
}

fn manager(backend: Arc<FakeBackend>, cfg: ManagerConfig) -> Arc<Manager> {
    let metrics = ManagerMetrics::new(&prometheus::Registry::new()).unwrap();
    Manager::new(cfg, Backends::all(backend), metrics)
}

fn cfg() -> ManagerConfig {
    ManagerConfig {
        wake_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(300),
        max_waiting_per_endpoint: 1000,
        max_starts_per_minute: 0,
        deep_sleep_after: Duration::ZERO,
        max_frozen_memory: 0,
    }
}

async fn phase_within(m: &Manager, id: &EndpointId, p: Phase, within: Duration) {
    tokio::time::timeout(within, m.wait_for_phase(id, p))
        .await
        .unwrap_or_else(|_| panic!("{id} not {p:?} within {within:?}: {:?}", m.stats(id)));
}

#[tokio::test(start_paused = true)]
async fn many_clients_one_start() {
    let b = FakeBackend::new(Script {
        start_delay: Duration::from_millis(50),
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    let leases = futures::future::join_all((0..200).map(|_| m.wake(&r))).await;
    assert_eq!(b.starts.load(Ordering::SeqCst), 1);
    let addrs: std::collections::HashSet<_> = leases
        .iter()
        .map(|l| l.as_ref().unwrap().addr.clone())
        .collect();
    assert_eq!(addrs.len(), 1);
    assert!(leases.iter().all(|l| l.as_ref().unwrap().cold));
    let st = m.stats(&r.endpoint).unwrap();
    assert_eq!(
        (st.phase, st.attached, st.waiting, st.starts),
        (Phase::Running, 200, 0, 1)
    );
    drop(leases);
    assert_eq!(m.stats(&r.endpoint).unwrap().attached, 0);
    // A warm wake does not start anything.
    let l = m.wake(&r).await.unwrap();
    assert!(!l.cold);
    assert_eq!(b.starts.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn idle_timer_starts_at_last_guard_and_respects_override() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", Some(Duration::from_secs(10)));
    let a = m.wake(&r).await.unwrap();
    let c = m.wake(&r).await.unwrap();
    drop(a);
    // One guard left: no amount of time suspends it.
    tokio::time::sleep(Duration::from_secs(1000)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Running);
    drop(c);
    tokio::time::sleep(Duration::from_millis(9_900)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Running);
    phase_within(
        &m,
        &r.endpoint,
        Phase::Suspended,
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(b.stops.load(Ordering::SeqCst), 1);
    assert_eq!(m.stats(&r.endpoint).unwrap().suspends, 1);
}

#[tokio::test(start_paused = true)]
async fn activity_resets_the_idle_timer() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    drop(m.wake(&r).await.unwrap());
    tokio::time::sleep(Duration::from_secs(200)).await;
    drop(m.wake(&r).await.unwrap());
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Running);
    phase_within(&m, &r.endpoint, Phase::Suspended, Duration::from_secs(101)).await;
}

#[tokio::test(start_paused = true)]
async fn explicit_suspend_refuses_while_attached() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    let l = m.wake(&r).await.unwrap();
    assert!(!m.suspend(&r.endpoint).await);
    drop(l);
    assert!(m.suspend(&r.endpoint).await);
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Suspended);
}

#[tokio::test(start_paused = true)]
async fn client_arriving_during_suspend_waits_then_wakes() {
    let b = FakeBackend::new(Script {
        stop_delay: Duration::from_secs(2),
        start_delay: Duration::from_millis(100),
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    drop(m.wake(&r).await.unwrap());
    let m2 = Arc::clone(&m);
    let id = r.endpoint.clone();
    let suspend = tokio::spawn(async move { m2.suspend(&id).await });
    phase_within(
        &m,
        &r.endpoint,
        Phase::Suspending,
        Duration::from_millis(10),
    )
    .await;
    let t0 = Instant::now();
    let lease = m.wake(&r).await.unwrap();
    assert!(suspend.await.unwrap());
    assert!(
        t0.elapsed() >= Duration::from_millis(2100),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(b.stops.load(Ordering::SeqCst), 1);
    assert_eq!(b.starts.load(Ordering::SeqCst), 2);
    assert!(lease.cold);
}

#[tokio::test(start_paused = true)]
async fn failure_reaches_every_waiter_and_next_connect_retries() {
    let b = FakeBackend::new(Script {
        start_delay: Duration::from_millis(20),
        fail: true,
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    let res = futures::future::join_all((0..10).map(|_| m.wake(&r))).await;
    for e in res {
        let e = e.err().unwrap();
        assert_eq!(
            e.kind(),
            crate::WakeErrorKind::Backend(crate::BackendErrorKind::StartFailed)
        );
        assert!(
            !e.user_message().contains("/var/lib"),
            "{}",
            e.user_message()
        );
    }
    assert_eq!(b.starts.load(Ordering::SeqCst), 1);
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Failed);
    b.script.lock().unwrap().fail = false;
    m.wake(&r).await.unwrap();
    assert_eq!(b.starts.load(Ordering::SeqCst), 2);
    assert_eq!(m.stats(&r.endpoint).unwrap().start_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn wake_is_bounded_by_wake_timeout() {
    let b = FakeBackend::new(Script {
        start_delay: Duration::from_secs(3600),
        ..Default::default()
    });
    let m = manager(
        Arc::clone(&b),
        ManagerConfig {
            wake_timeout: Duration::from_secs(5),
            ..cfg()
        },
    );
    let r = route("ep", None);
    let t0 = Instant::now();
    let e = m.wake(&r).await.err().unwrap();
    assert!(matches!(e, WakeError::Timeout(_)), "{e:?}");
    assert!(t0.elapsed() <= Duration::from_secs(6));
    // The start task gives up too, so the endpoint is not stuck in Starting.
    phase_within(&m, &r.endpoint, Phase::Failed, Duration::from_secs(1)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().waiting, 0);
}

#[tokio::test(start_paused = true)]
async fn a_new_config_bounds_the_next_wake() {
    let b = FakeBackend::new(Script {
        start_delay: Duration::from_secs(3600),
        ..Default::default()
    });
    let m = manager(
        Arc::clone(&b),
        ManagerConfig {
            wake_timeout: Duration::from_secs(600),
            ..cfg()
        },
    );
    // A config reload shortens it before the wake.
    m.set_config(ManagerConfig {
        wake_timeout: Duration::from_secs(5),
        ..m.config()
    });
    let r = route("ep", None);
    let t0 = Instant::now();
    let e = m.wake(&r).await.err().unwrap();
    assert!(
        matches!(e, WakeError::Timeout(t) if t == Duration::from_secs(5)),
        "{e:?}"
    );
    assert!(t0.elapsed() <= Duration::from_secs(6));
}

#[tokio::test(start_paused = true)]
async fn held_queue_is_bounded_and_released_by_dropped_waiters() {
    let b = FakeBackend::new(Script {
        start_delay: Duration::from_secs(1),
        ..Default::default()
    });
    let m = manager(
        Arc::clone(&b),
        ManagerConfig {
            max_waiting_per_endpoint: 2,
            ..cfg()
        },
    );
    let r = route("ep", None);
    let (m1, r1) = (Arc::clone(&m), Arc::clone(&r));
    let w1 = tokio::spawn(async move { m1.wake(&r1).await.map(|_| ()) });
    let (m2, r2) = (Arc::clone(&m), Arc::clone(&r));
    let w2 = tokio::spawn(async move { m2.wake(&r2).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().waiting, 2);
    assert!(matches!(m.wake(&r).await, Err(WakeError::QueueFull)));
    w2.abort();
    let _ = w2.await;
    assert_eq!(m.stats(&r.endpoint).unwrap().waiting, 1);
    w1.await.unwrap().unwrap();
    assert_eq!(m.stats(&r.endpoint).unwrap().waiting, 0);
}

#[tokio::test(start_paused = true)]
async fn crash_is_noticed_and_next_connect_restarts() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    let first = m.wake(&r).await.unwrap();
    b.crash();
    phase_within(&m, &r.endpoint, Phase::Suspended, Duration::from_millis(10)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().crashes, 1);
    let second = m.wake(&r).await.unwrap();
    assert_ne!(first.addr, second.addr);
    assert_eq!(b.starts.load(Ordering::SeqCst), 2);
    // The dead compute's guard going away must not disturb the new one.
    drop(first);
    assert_eq!(m.stats(&r.endpoint).unwrap().attached, 1);
}

/// The synchronous wake a relay thread tries first: it attaches to a running compute (a lease
/// like any other: the idle timer waits for it) and leaves everything else to `wake`.
#[tokio::test(start_paused = true)]
async fn wake_now_attaches_only_to_a_running_compute() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", Some(Duration::from_secs(10)));
    assert!(m.wake_now(&r).is_none(), "never woken: a start is wake's");
    let first = m.wake(&r).await.unwrap();
    let now = m.wake_now(&r).expect("running");
    assert!(!now.cold);
    assert_eq!(now.addr, first.addr);
    assert_eq!(m.stats(&r.endpoint).unwrap().attached, 2);
    drop(first);
    // Its lease alone keeps the compute up, however long.
    tokio::time::sleep(Duration::from_secs(1000)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Running);
    drop(now);
    phase_within(&m, &r.endpoint, Phase::Suspended, Duration::from_secs(11)).await;
    assert!(m.wake_now(&r).is_none(), "suspended: a start is wake's");
    assert_eq!(b.starts.load(Ordering::SeqCst), 1);
    m.shutdown().await;
    assert!(m.wake_now(&r).is_none(), "shutting down");
}

/// Timeouts no clock reaches mean never, for a wake and a hold alike, instead of a panic.
#[tokio::test(start_paused = true)]
async fn timeouts_past_the_clocks_range_mean_never() {
    let b = FakeBackend::new(Script::default());
    let m = manager(
        Arc::clone(&b),
        ManagerConfig {
            wake_timeout: Duration::MAX,
            ..cfg()
        },
    );
    let r = route("ep", Some(Duration::MAX));
    drop(m.wake(&r).await.unwrap());
    tokio::time::sleep(Duration::from_secs(365 * 24 * 3600)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Running);
    m.suspend(&r.endpoint).await;
    assert!(matches!(
        m.hold(&r.endpoint, Duration::MAX).await,
        Ok(crate::Held::Suspended(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn static_routes_bypass_the_state_machine() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = Arc::new(Route {
        endpoint: EndpointId::parse("ext").unwrap(),
        backend: BackendSpec::Static {
            address: "db.internal:5432".into(),
        },
        idle_timeout: None,
        deep_sleep_after: None,
        allow: Vec::new(),
        max_connections: None,
    });
    let l = m.wake(&r).await.unwrap();
    assert_eq!(l.addr.as_str(), "db.internal:5432");
    let now = m.wake_now(&r).expect("static: always at once");
    assert_eq!(now.addr.as_str(), "db.internal:5432");
    assert_eq!(b.starts.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_own_processes_and_refuses_new_wakes() {
    let b = FakeBackend::new(Script {
        stop_on_shutdown: true,
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let _held = m.wake(&route("a", None)).await.unwrap();
    drop(m.wake(&route("b", None)).await.unwrap());
    m.shutdown().await;
    assert_eq!(b.stops.load(Ordering::SeqCst), 2);
    assert!(matches!(
        m.wake(&route("a", None)).await,
        Err(WakeError::ShuttingDown)
    ));
}

#[tokio::test(start_paused = true)]
async fn start_rate_is_limited_per_endpoint() {
    let b = FakeBackend::new(Script::default());
    let m = manager(
        Arc::clone(&b),
        ManagerConfig {
            max_starts_per_minute: 2,
            ..cfg()
        },
    );
    let r = route("ep", None);
    for _ in 0..2 {
        drop(m.wake(&r).await.unwrap());
        assert!(m.suspend(&r.endpoint).await);
    }
    assert!(matches!(m.wake(&r).await, Err(WakeError::RateLimited)));
    // Warm connects to another endpoint are not affected, and the bucket refills.
    drop(m.wake(&route("other", None)).await.unwrap());
    tokio::time::sleep(Duration::from_secs(30)).await;
    drop(m.wake(&r).await.unwrap());
    assert_eq!(b.starts.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn only_starts_that_reach_postgres_spend_the_start_budget() {
    let b = FakeBackend::new(Script {
        fail_early: true,
        ..Script::default()
    });
    let m = manager(
        Arc::clone(&b),
        ManagerConfig {
            max_starts_per_minute: 2,
            ..cfg()
        },
    );
    let r = route("ep", None);
    // A previous compute holding the directory fails every start at once: that costs nothing,
    // so once it is gone the endpoint starts at once instead of staying refused (53300).
    for _ in 0..5 {
        let e = m.wake(&r).await.err().expect("start fails");
        assert!(matches!(e, WakeError::Backend(_)), "{e:?}");
    }
    b.script.lock().unwrap().fail_early = false;
    drop(m.wake(&r).await.unwrap());
    assert_eq!(b.starts.load(Ordering::SeqCst), 6);

    // Failures inside postgres's start-up (a crash loop) do spend it.
    let b = FakeBackend::new(Script {
        fail: true,
        ..Script::default()
    });
    let m = manager(
        Arc::clone(&b),
        ManagerConfig {
            max_starts_per_minute: 2,
            ..cfg()
        },
    );
    for _ in 0..2 {
        assert!(matches!(m.wake(&r).await, Err(WakeError::Backend(_))));
    }
    assert!(matches!(m.wake(&r).await, Err(WakeError::RateLimited)));
    assert_eq!(b.starts.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn shutdown_leaves_computes_another_manager_can_take_over() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    drop(m.wake(&route("a", None)).await.unwrap());
    m.shutdown().await;
    assert_eq!(b.stops.load(Ordering::SeqCst), 0);
    assert_eq!(
        m.stats(&EndpointId::parse("a").unwrap()).unwrap().phase,
        Phase::Running
    );
}

fn report(m: &Manager, replica: &str, id: &EndpointId, sessions: usize, ttl: Duration) -> usize {
    m.report_activity(replica, [(id.clone(), sessions)], ttl)
}

// The fake compute cannot count its clients (like a Kubernetes one): only the replica reports
// stand between a session held through another proxy and an idle suspend.
#[tokio::test(start_paused = true)]
async fn remote_sessions_keep_a_compute_that_cannot_count_its_clients() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", Some(Duration::from_secs(10)));
    // The remote manager's wake: the guard goes at once.
    drop(m.wake(&r).await.unwrap());
    let ttl = Duration::from_secs(60);
    report(&m, "replica-a", &r.endpoint, 1, ttl);
    // A requested suspend is refused too.
    assert!(!m.suspend(&r.endpoint).await);
    // Reports less often than idle_timeout, but within their ttl: the idle timer fires in
    // between and must be deferred by the reports alone.
    for _ in 0..5 {
        assert_eq!(report(&m, "replica-a", &r.endpoint, 1, ttl), 1);
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Running);
    }
    let st = m.stats(&r.endpoint).unwrap();
    assert!(st.busy_deferrals >= 5, "{st:?}");
    assert_eq!(st.remote_sessions, 1);
    // The last session through the replica closes: its 0 releases the compute, which then
    // goes after idle_timeout (counted from the report), not before.
    let t0 = Instant::now();
    report(&m, "replica-a", &r.endpoint, 0, ttl);
    assert_eq!(m.stats(&r.endpoint).unwrap().remote_sessions, 0);
    phase_within(&m, &r.endpoint, Phase::Suspended, Duration::from_secs(30)).await;
    assert!(
        t0.elapsed() >= Duration::from_secs(10),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(b.stops.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_stops_reporting_holds_its_computes_only_until_the_ttl() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", Some(Duration::from_secs(10)));
    drop(m.wake(&r).await.unwrap());
    let t0 = Instant::now();
    report(&m, "gone", &r.endpoint, 3, Duration::from_secs(45));
    // Busy for the ttl, idle checks deferring meanwhile...
    tokio::time::sleep(Duration::from_secs(40)).await;
    let st = m.stats(&r.endpoint).unwrap();
    assert_eq!((st.phase, st.remote_sessions), (Phase::Running, 3));
    assert!(st.busy_deferrals >= 1, "{st:?}");
    // ...then the next idle check after the expiry suspends it.
    phase_within(&m, &r.endpoint, Phase::Suspended, Duration::from_secs(30)).await;
    assert!(
        t0.elapsed() >= Duration::from_secs(45),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(m.stats(&r.endpoint).unwrap().remote_sessions, 0);
}

#[tokio::test(start_paused = true)]
async fn expired_reports_do_not_block_a_suspend() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    drop(m.wake(&r).await.unwrap());
    report(&m, "a", &r.endpoint, 1, Duration::from_secs(5));
    report(&m, "b", &r.endpoint, 2, Duration::from_secs(10));
    assert_eq!(m.stats(&r.endpoint).unwrap().remote_sessions, 3);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().remote_sessions, 2);
    assert!(!m.suspend(&r.endpoint).await);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().remote_sessions, 0);
    assert!(m.suspend(&r.endpoint).await);
}

#[tokio::test(start_paused = true)]
async fn reports_count_per_replica_and_skip_endpoints_never_woken() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    drop(m.wake(&r).await.unwrap());
    let ttl = Duration::from_secs(30);
    let other = EndpointId::parse("never-woken").unwrap();
    assert_eq!(
        m.report_activity("a", [(r.endpoint.clone(), 2), (other.clone(), 5)], ttl),
        1
    );
    assert!(
        m.stats(&other).is_none(),
        "no state for endpoints never woken"
    );
    // A newer report from the same replica replaces its count; another replica adds to it.
    report(&m, "a", &r.endpoint, 1, ttl);
    report(&m, "b", &r.endpoint, 4, ttl);
    assert_eq!(m.stats(&r.endpoint).unwrap().remote_sessions, 5);
    report(&m, "b", &r.endpoint, 0, ttl);
    assert_eq!(m.stats(&r.endpoint).unwrap().remote_sessions, 1);
    // Each replica id is a map entry: past the cap, a new replica is ignored while the
    // others are unexpired, and accepted once they have expired.
    for i in 0..MAX_REPLICAS_PER_ENDPOINT - 1 {
        report(&m, &format!("r{i}"), &r.endpoint, 1, ttl);
    }
    assert_eq!(report(&m, "late", &r.endpoint, 1, ttl), 0);
    assert_eq!(
        m.stats(&r.endpoint).unwrap().remote_sessions,
        MAX_REPLICAS_PER_ENDPOINT
    );
    tokio::time::sleep(ttl).await;
    assert_eq!(report(&m, "late", &r.endpoint, 1, ttl), 1);
    assert_eq!(m.stats(&r.endpoint).unwrap().remote_sessions, 1);
}

fn id(s: &str) -> EndpointId {
    EndpointId::parse(s).unwrap()
}

fn table(routes: &[&Arc<Route>]) -> RoutingTable {
    let t = RoutingTable::new();
    for r in routes {
        t.upsert(Route::clone(r));
    }
    t
}

// `starts` counts the computes this manager started; an adopted compute was started by the
// manager before it, so it counts in `adoptions` (the backend's start is still called: it
// finds the compute up).
#[tokio::test(start_paused = true)]
async fn an_adopted_compute_runs_without_a_client_and_is_suspended_after_idle_timeout() {
    let b = FakeBackend::new(Script {
        start_delay: Duration::from_millis(300),
        running: vec![id("ep")],
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", Some(Duration::from_secs(10)));
    assert_eq!(m.adopt_running(&table(&[&r])).await, 1);
    let st = m.stats(&r.endpoint).unwrap();
    assert_eq!((st.phase, st.waiting, st.attached), (Phase::Starting, 0, 0));
    phase_within(&m, &r.endpoint, Phase::Running, Duration::from_secs(1)).await;
    let adopted_at = Instant::now();
    let st = m.stats(&r.endpoint).unwrap();
    assert_eq!(
        (st.starts, st.adoptions, st.start_failures, st.attached),
        (0, 1, 0, 0)
    );
    assert_eq!(b.starts.load(Ordering::SeqCst), 1, "one backend call");
    // The whole idle_timeout counts from the adoption, then the idle timer suspends it.
    tokio::time::sleep(Duration::from_millis(9_900)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Running);
    phase_within(
        &m,
        &r.endpoint,
        Phase::Suspended,
        Duration::from_millis(200),
    )
    .await;
    assert!(adopted_at.elapsed() >= Duration::from_secs(10));
    assert_eq!(b.stops.load(Ordering::SeqCst), 1);
    assert_eq!(m.stats(&r.endpoint).unwrap().suspends, 1);
}

#[tokio::test(start_paused = true)]
async fn reports_count_for_an_adopted_compute_and_a_wake_finds_it_warm() {
    let b = FakeBackend::new(Script {
        running: vec![id("ep")],
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", Some(Duration::from_secs(10)));
    // Before the adoption the manager has never heard of it: the report is skipped.
    let ttl = Duration::from_secs(60);
    assert_eq!(report(&m, "replica-a", &r.endpoint, 1, ttl), 0);
    assert_eq!(m.adopt_running(&table(&[&r])).await, 1);
    phase_within(&m, &r.endpoint, Phase::Running, Duration::from_millis(10)).await;
    // Now the replica's report is recorded and holds the compute past idle_timeout.
    assert_eq!(report(&m, "replica-a", &r.endpoint, 1, ttl), 1);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let st = m.stats(&r.endpoint).unwrap();
    assert_eq!((st.phase, st.remote_sessions), (Phase::Running, 1));
    assert!(st.busy_deferrals >= 1, "{st:?}");
    // A client of this manager attaches to it without a start.
    let lease = m.wake(&r).await.unwrap();
    assert!(!lease.cold);
    assert_eq!(b.starts.load(Ordering::SeqCst), 1);
    drop(lease);
    report(&m, "replica-a", &r.endpoint, 0, ttl);
    phase_within(&m, &r.endpoint, Phase::Suspended, Duration::from_secs(11)).await;
    let st = m.stats(&r.endpoint).unwrap();
    assert_eq!((st.starts, st.adoptions, st.suspends), (0, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn adoption_takes_only_routed_endpoints_that_are_not_known_yet() {
    let b = FakeBackend::new(Script {
        running: vec![id("ep"), id("unrouted"), id("ext"), id("woken")],
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let (ep, woken) = (route("ep", None), route("woken", None));
    let ext = Arc::new(Route {
        endpoint: id("ext"),
        backend: BackendSpec::Static {
            address: "db.internal:5432".into(),
        },
        idle_timeout: None,
        deep_sleep_after: None,
        allow: Vec::new(),
        max_connections: None,
    });
    let lease = m.wake(&woken).await.unwrap();
    assert_eq!(m.adopt_running(&table(&[&ep, &ext, &woken])).await, 1);
    phase_within(&m, &ep.endpoint, Phase::Running, Duration::from_millis(10)).await;
    assert!(
        m.stats(&id("unrouted")).is_none(),
        "not in the routing table"
    );
    assert!(
        m.stats(&id("ext")).is_none(),
        "routed to no backend that runs it"
    );
    let st = m.stats(&woken.endpoint).unwrap();
    assert_eq!((st.starts, st.adoptions, st.attached), (1, 0, 1));
    assert_eq!(b.starts.load(Ordering::SeqCst), 2);
    drop(lease);
    // Once shutting down, nothing more is adopted.
    m.shutdown().await;
    b.script.lock().unwrap().running = vec![id("late")];
    assert_eq!(m.adopt_running(&table(&[&route("late", None)])).await, 0);
}

#[tokio::test(start_paused = true)]
async fn failed_adoptions_leave_the_next_wake_to_start_the_compute() {
    let b = FakeBackend::new(Script {
        running: vec![id("ep")],
        list_fails: true,
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    let t = table(&[&r]);
    // The list fails: nothing adopted, no state.
    assert_eq!(m.adopt_running(&t).await, 0);
    assert!(m.stats(&r.endpoint).is_none());
    // The start fails: logged, and the endpoint is Failed without a client having waited.
    {
        let mut s = b.script.lock().unwrap();
        s.list_fails = false;
        s.fail = true;
    }
    assert_eq!(m.adopt_running(&t).await, 1);
    phase_within(&m, &r.endpoint, Phase::Failed, Duration::from_millis(10)).await;
    let st = m.stats(&r.endpoint).unwrap();
    assert_eq!((st.starts, st.start_failures, st.adoptions), (0, 0, 0));
    // The next wake starts it as usual.
    b.script.lock().unwrap().fail = false;
    let lease = m.wake(&r).await.unwrap();
    assert!(lease.cold);
    let st = m.stats(&r.endpoint).unwrap();
    assert_eq!((st.phase, st.starts, st.adoptions), (Phase::Running, 1, 0));
    assert_eq!(b.starts.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn adoption_waits_for_leadership_then_for_the_routes() {
    let b = FakeBackend::new(Script {
        running: vec![id("ep")],
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let t = Arc::new(RoutingTable::new());
    let (leader, leadership) = Leadership::manual(crate::LeaderState::Standby);
    let (loaded, loaded_rx) = watch::channel(false);
    let task = {
        let (m, t) = (Arc::clone(&m), Arc::clone(&t));
        tokio::spawn(async move {
            m.adopt_when_ready(&t, leadership, loaded_rx, Duration::from_secs(60))
                .await
        })
    };
    // A standby adopts nothing, however long it waits (the paused clock runs every task until
    // it waits before it advances).
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(b.starts.load(Ordering::SeqCst), 0);
    leader.send_replace(crate::LeaderState::Leading);
    // Leading, but the routes are not loaded: still nothing (well within the bound).
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!task.is_finished());
    assert_eq!(b.starts.load(Ordering::SeqCst), 0);
    t.upsert(Route::clone(&route("ep", None)));
    loaded.send_replace(true);
    assert_eq!(task.await.unwrap(), Some(1));
    phase_within(&m, &id("ep"), Phase::Running, Duration::from_millis(10)).await;
    assert_eq!(m.stats(&id("ep")).unwrap().adoptions, 1);
}

#[tokio::test(start_paused = true)]
async fn adoption_waits_for_the_routes_at_most_the_bound_and_never_after_a_lost_lease() {
    let b = FakeBackend::new(Script {
        running: vec![id("ep")],
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let t = table(&[&route("ep", None)]);
    // The routes never finish loading: after the bound, what the table has is adopted.
    let (_loading, loaded_rx) = watch::channel(false);
    let t0 = Instant::now();
    let n = m
        .adopt_when_ready(
            &t,
            Leadership::always(),
            loaded_rx.clone(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(n, Some(1));
    assert_eq!(t0.elapsed(), Duration::from_secs(60));
    // A manager that loses the Lease before it ever leads adopts nothing.
    let m = manager(Arc::clone(&b), cfg());
    let (leader, leadership) = Leadership::manual(crate::LeaderState::Standby);
    leader.send_replace(crate::LeaderState::Lost);
    let (_loaded, loaded_rx) = watch::channel(true);
    assert_eq!(
        m.adopt_when_ready(&t, leadership, loaded_rx, Duration::from_secs(60))
            .await,
        None
    );
    assert!(m.stats(&id("ep")).is_none());
}

fn table_entry(i: usize) -> pgwake_router::EndpointConfig {
    pgwake_router::EndpointConfig {
        id: EndpointId::parse(&format!("ep{i}")).unwrap(),
        backend: BackendSpec::Local {
            settings: BTreeMap::new(),
        },
        idle_timeout: None,
        deep_sleep_after: None,
        allow: Vec::new(),
        max_connections: None,
        auth: None,
        roles_file: None,
    }
}

fn routed(table: &RoutingTable, i: usize) -> Arc<Route> {
    table
        .lookup(&EndpointId::parse(&format!("ep{i}")).unwrap())
        .unwrap()
}

/// Series of the endpoint-labelled metrics (`pgwake_endpoint_state`, `pgwake_compute_crashes_total`).
fn endpoint_series(m: &Manager) -> usize {
    use prometheus::core::Collector;
    let families = m
        .metrics
        .endpoint_state
        .collect()
        .into_iter()
        .chain(m.metrics.crashes.collect());
    families.map(|f| f.get_metric().len()).sum()
}

fn computes_total(m: &Manager) -> i64 {
    Phase::ALL
        .iter()
        .map(|p| m.metrics.computes.with_label_values(&[p.as_str()]).get())
        .sum()
}

/// Slot locks taken so far, on every slot but `except`.
fn locks_elsewhere(m: &Manager, except: &EndpointId) -> u64 {
    m.slots
        .all()
        .iter()
        .filter(|s| s.id != *except)
        .map(|s| s.locks.load(Ordering::Relaxed))
        .sum()
}

#[tokio::test(start_paused = true)]
async fn a_forgotten_endpoint_keeps_its_compute_until_idle_then_its_state_goes() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let (gone, kept) = (route("gone", None), route("kept", None));
    let session = m.wake(&gone).await.unwrap();
    drop(m.wake(&kept).await.unwrap());
    assert!(m.forget(&gone.endpoint));
    assert!(!m.forget(&EndpointId::parse("never").unwrap()));
    // Running with a session: the compute stays, and so does its state.
    assert_eq!(m.stats(&gone.endpoint).unwrap().phase, Phase::Running);
    tokio::time::sleep(cfg().idle_timeout * 2).await;
    assert_eq!(m.stats(&gone.endpoint).unwrap().phase, Phase::Running);
    assert_eq!(endpoint_series(&m), 2 * Phase::ALL.len());
    drop(session);
    // The idle timer suspends it as usual, and the suspend drops the slot and its series.
    tokio::time::timeout(cfg().idle_timeout * 2, async {
        while m.stats(&gone.endpoint).is_some() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await
    .expect("the forgotten endpoint's state is dropped after its idle suspend");
    assert_eq!(b.stops.load(Ordering::SeqCst), 2, "both computes stopped");
    assert_eq!(m.endpoints(), vec![kept.endpoint.clone()]);
    assert_eq!(
        endpoint_series(&m),
        Phase::ALL.len(),
        "only the kept endpoint's series"
    );
    assert_eq!(computes_total(&m), 1);
    // Back in the table: a fresh slot, started once.
    drop(m.wake(&gone).await.unwrap());
    assert_eq!(m.stats(&gone.endpoint).unwrap().starts, 1);
    assert_eq!(endpoint_series(&m), 2 * Phase::ALL.len());
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_of_a_forgotten_endpoint_goes_when_its_clients_do() {
    let b = FakeBackend::new(Script {
        start_delay: Duration::from_millis(50),
        fail: true,
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    let m2 = Arc::clone(&m);
    let r2 = Arc::clone(&r);
    let waiting = tokio::spawn(async move { m2.wake(&r2).await.map(|_| ()) });
    phase_within(&m, &r.endpoint, Phase::Starting, Duration::from_millis(10)).await;
    m.forget(&r.endpoint);
    assert!(m.stats(&r.endpoint).is_some(), "a client waits on it");
    assert!(waiting.await.unwrap().is_err());
    assert_eq!(m.stats(&r.endpoint), None);
    assert_eq!(endpoint_series(&m), 0);
    assert_eq!(computes_total(&m), 0);
}

#[tokio::test(start_paused = true)]
async fn the_manager_follows_removals_from_the_table() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let table = Arc::new(RoutingTable::new());
    table
        .replace_all((0..3).map(table_entry).collect())
        .unwrap();
    let follow = {
        let (m, t) = (Arc::clone(&m), Arc::clone(&table));
        tokio::spawn(async move { m.follow_table(&t).await })
    };
    for i in 0..3 {
        let r = routed(&table, i);
        drop(m.wake(&r).await.unwrap());
        assert!(m.suspend(&r.endpoint).await);
    }
    table.replace_all(vec![table_entry(1)]).unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while m.endpoints().len() > 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("removed endpoints forgotten without a call");
    assert_eq!(m.endpoints(), vec![EndpointId::parse("ep1").unwrap()]);
    m.shutdown().await;
    tokio::time::timeout(Duration::from_secs(1), follow)
        .await
        .expect("follow_table ends with the manager")
        .unwrap();
}

/// The growth bug (issue 10): a table of 100,000 endpoints churning by 10,000 per reload, with
/// 1,000 wakes and suspends per round, keeps no state for removed endpoints, and a transition
/// touches only its own slot.
#[tokio::test(start_paused = true)]
async fn churning_a_large_table_returns_to_the_baseline() {
    const TABLE: usize = 100_000;
    const CHURN: usize = 10_000;
    const WAKES: usize = 1_000;
    const KEPT: usize = 100;
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let table = RoutingTable::new();
    table
        .replace_all((0..TABLE).map(table_entry).collect())
        .unwrap();
    // Endpoints that stay in the table throughout (the removals take the lowest ids).
    for i in TABLE - KEPT..TABLE {
        let r = routed(&table, i);
        drop(m.wake(&r).await.unwrap());
        assert!(m.suspend(&r.endpoint).await);
    }
    let baseline = (m.endpoints().len(), endpoint_series(&m), computes_total(&m));
    assert_eq!(baseline, (KEPT, KEPT * Phase::ALL.len(), KEPT as i64));

    for round in 0..3 {
        let (lo, hi) = (round * CHURN, TABLE + round * CHURN);
        // Wake endpoints that this reload removes; half still have a session at the reload.
        let mut sessions = Vec::new();
        for i in lo..lo + WAKES {
            let r = routed(&table, i);
            let a = m.wake(&r).await.unwrap();
            if i % 2 == 0 {
                sessions.push((r, a));
            } else {
                drop(a);
                assert!(m.suspend(&r.endpoint).await);
            }
        }
        let diff = table
            .replace_all((lo + CHURN..hi + CHURN).map(table_entry).collect())
            .unwrap();
        assert_eq!((diff.added, diff.removed), (CHURN, CHURN));
        assert_eq!(m.retain(&table), WAKES, "round {round}");
        assert_eq!(
            m.endpoints().len(),
            KEPT + WAKES / 2,
            "the suspended ones went at once, the running ones stay"
        );
        for (r, a) in sessions {
            drop(a);
            assert!(m.suspend(&r.endpoint).await);
        }
        assert_eq!(
            (m.endpoints().len(), endpoint_series(&m), computes_total(&m)),
            baseline,
            "round {round}"
        );
    }

    // O(1) per transition: a wake and a suspend lock their own slot and no other.
    let r = routed(&table, TABLE - 1);
    let before = locks_elsewhere(&m, &r.endpoint);
    drop(m.wake(&r).await.unwrap());
    assert!(m.suspend(&r.endpoint).await);
    assert_eq!(locks_elsewhere(&m, &r.endpoint), before);
}

/// A client that looked the slot up just before the endpoint left the table (and the slot was
/// dropped) never starts a compute on it: it takes the one new slot, so that two clients
/// cannot start two computes for one endpoint across the removal.
#[tokio::test(start_paused = true)]
async fn a_wake_that_finds_its_slot_dropped_takes_a_new_one() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    let stale = m.slot(&r.endpoint);
    assert!(m.forget(&r.endpoint));
    assert!(stale.lock().gone);
    let deadline = Instant::now() + Duration::from_secs(1);
    assert!(
        m.wake_slot(
            &stale,
            &r,
            deadline,
            Duration::from_secs(1),
            &mut Tier::Running
        )
        .await
        .is_none(),
        "no start on a dropped slot"
    );
    assert_eq!(b.starts.load(Ordering::SeqCst), 0);
    let a = m.wake(&r).await.unwrap();
    assert_eq!(b.starts.load(Ordering::SeqCst), 1);
    assert!(!Arc::ptr_eq(&stale, &m.slot(&r.endpoint)));
    assert_eq!(m.stats(&r.endpoint).unwrap().attached, 1);
    drop(a);
}

fn light(deep_sleep_after: u64, max_frozen_memory: u64) -> ManagerConfig {
    ManagerConfig {
        idle_timeout: Duration::from_secs(10),
        deep_sleep_after: Duration::from_secs(deep_sleep_after),
        max_frozen_memory,
        ..cfg()
    }
}

fn freezable() -> Script {
    Script {
        freezable: true,
        stop_on_shutdown: true,
        memory: Some(10 << 20),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_compute_freezes_and_a_stampede_thaws_it_once_without_a_start() {
    let b = FakeBackend::new(freezable());
    let m = manager(Arc::clone(&b), light(600, 0));
    let r = route("ep", None);
    drop(m.wake(&r).await.unwrap());
    phase_within(&m, &r.endpoint, Phase::Frozen, Duration::from_secs(11)).await;
    let st = m.stats(&r.endpoint).unwrap();
    assert_eq!(
        (st.freezes, st.suspends, st.frozen_memory),
        (1, 0, Some(10 << 20))
    );
    assert_eq!(st.phase.tier(), Tier::Frozen);
    assert_eq!(b.stops.load(Ordering::SeqCst), 0);
    let leases = futures::future::join_all((0..100).map(|_| m.wake(&r))).await;
    assert!(leases.iter().all(|l| l.as_ref().is_ok_and(|l| l.cold)));
    assert_eq!(
        b.thaws.load(Ordering::SeqCst),
        1,
        "one thaw for the stampede"
    );
    assert_eq!(
        b.starts.load(Ordering::SeqCst),
        1,
        "no start: the compute was kept"
    );
    let st = m.stats(&r.endpoint).unwrap();
    assert_eq!((st.phase, st.thaws, st.attached), (Phase::Running, 1, 100));
    assert_eq!(
        m.metrics
            .wake_tier_seconds
            .with_label_values(&["frozen"])
            .get_sample_count(),
        100
    );
    drop(leases);
    // Frozen again after the idle timeout, and a crash while frozen is noticed.
    phase_within(&m, &r.endpoint, Phase::Frozen, Duration::from_secs(11)).await;
    b.crash();
    phase_within(&m, &r.endpoint, Phase::Suspended, Duration::from_secs(1)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().crashes, 1);
}

#[tokio::test(start_paused = true)]
async fn a_frozen_compute_is_stopped_after_deep_sleep_after_and_zero_keeps_the_old_stop() {
    let b = FakeBackend::new(freezable());
    let m = manager(Arc::clone(&b), light(60, 0));
    let r = route("ep", None);
    drop(m.wake(&r).await.unwrap());
    phase_within(&m, &r.endpoint, Phase::Frozen, Duration::from_secs(11)).await;
    let frozen_at = Instant::now();
    phase_within(&m, &r.endpoint, Phase::Suspended, Duration::from_secs(61)).await;
    assert!(frozen_at.elapsed() >= Duration::from_secs(60));
    assert_eq!(b.stops.load(Ordering::SeqCst), 1);
    assert_eq!(
        m.metrics.suspends.with_label_values(&["deep_sleep"]).get(),
        1
    );
    // Off for this endpoint: stopped at the idle timeout, never frozen.
    let off = Arc::new(Route {
        deep_sleep_after: Some(Duration::ZERO),
        ..(*route("off", None)).clone()
    });
    drop(m.wake(&off).await.unwrap());
    phase_within(&m, &off.endpoint, Phase::Suspended, Duration::from_secs(11)).await;
    assert_eq!(m.stats(&off.endpoint).unwrap().freezes, 0);
    assert_eq!(b.freezes.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_client_arriving_during_a_freeze_waits_and_is_served_by_a_thaw() {
    let b = FakeBackend::new(Script {
        freeze_delay: Duration::from_secs(2),
        ..freezable()
    });
    let m = manager(Arc::clone(&b), light(600, 0));
    let r = route("ep", None);
    drop(m.wake(&r).await.unwrap());
    phase_within(&m, &r.endpoint, Phase::Suspending, Duration::from_secs(11)).await;
    let lease = m.wake(&r).await.unwrap();
    assert!(lease.cold);
    assert_eq!(
        (
            b.freezes.load(Ordering::SeqCst),
            b.thaws.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    assert_eq!(b.starts.load(Ordering::SeqCst), 1);
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Running);
}

#[tokio::test(start_paused = true)]
async fn past_the_memory_budget_the_least_recently_used_frozen_computes_are_stopped() {
    let b = FakeBackend::new(freezable());
    // Room for two computes of 10 MiB.
    let m = manager(Arc::clone(&b), light(3600, 25 << 20));
    let ids = ["a", "b", "c"];
    for id in ids {
        drop(m.wake(&route(id, None)).await.unwrap());
        // Used a second apart: a is the least recently used.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for id in ["b", "c"] {
        phase_within(
            &m,
            &route(id, None).endpoint,
            Phase::Frozen,
            Duration::from_secs(20),
        )
        .await;
    }
    phase_within(
        &m,
        &route("a", None).endpoint,
        Phase::Suspended,
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(m.stats(&route("a", None).endpoint).unwrap().freezes, 1);
    assert_eq!(b.stops.load(Ordering::SeqCst), 1);
    assert_eq!(
        m.metrics
            .suspends
            .with_label_values(&["memory_budget"])
            .get(),
        1
    );
    // Shutdown stops the frozen ones too.
    m.shutdown().await;
    assert_eq!(b.stops.load(Ordering::SeqCst), 3);
    for id in ids {
        assert_eq!(
            m.stats(&route(id, None).endpoint).unwrap().phase,
            Phase::Suspended
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_compute_that_does_not_thaw_is_stopped_and_started_again() {
    let b = FakeBackend::new(Script {
        thaw_fails: true,
        ..freezable()
    });
    let m = manager(Arc::clone(&b), light(600, 0));
    let r = route("ep", None);
    drop(m.wake(&r).await.unwrap());
    phase_within(&m, &r.endpoint, Phase::Frozen, Duration::from_secs(11)).await;
    let lease = m.wake(&r).await.unwrap();
    assert!(lease.cold);
    assert_eq!(b.starts.load(Ordering::SeqCst), 2);
    assert_eq!(b.stops.load(Ordering::SeqCst), 1);
    assert_eq!(m.metrics.thaws.with_label_values(&["failed"]).get(), 1);
    let st = m.stats(&r.endpoint).unwrap();
    assert_eq!((st.phase, st.crashes), (Phase::Running, 0));
}

#[tokio::test(start_paused = true)]
async fn a_requested_freeze_holds_until_a_wake_and_one_that_cannot_freeze_keeps_running() {
    let b = FakeBackend::new(freezable());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    let lease = m.wake(&r).await.unwrap();
    assert!(!m.freeze(&r.endpoint).await, "a session is attached");
    drop(lease);
    assert!(m.freeze(&r.endpoint).await);
    // No deep-sleep timer for a requested freeze (and light sleep is off in `cfg`).
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Frozen);
    drop(m.wake(&r).await.unwrap());
    assert_eq!(b.thaws.load(Ordering::SeqCst), 1);

    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", Some(Duration::from_secs(10)));
    drop(m.wake(&r).await.unwrap());
    assert!(!m.freeze(&r.endpoint).await);
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Running);
    // Its idle timer runs again: it is suspended as usual.
    phase_within(&m, &r.endpoint, Phase::Suspended, Duration::from_secs(11)).await;
}

#[tokio::test(start_paused = true)]
async fn a_frozen_endpoint_that_leaves_the_table_is_stopped_and_its_state_goes() {
    let b = FakeBackend::new(freezable());
    let m = manager(Arc::clone(&b), light(3600, 0));
    let r = route("ep", None);
    drop(m.wake(&r).await.unwrap());
    phase_within(&m, &r.endpoint, Phase::Frozen, Duration::from_secs(11)).await;
    assert!(m.forget(&r.endpoint));
    tokio::time::timeout(Duration::from_secs(1), async {
        while m.stats(&r.endpoint).is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("state dropped once stopped");
    assert_eq!(b.stops.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_held_suspended_endpoint_starts_only_once_the_hold_ends() {
    let b = FakeBackend::new(Script::default());
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", None);
    let Held::Suspended(hold) = m.hold(&r.endpoint, Duration::from_secs(1)).await.unwrap() else {
        panic!("never woken: suspended");
    };
    let waker = tokio::spawn({
        let (m, r) = (Arc::clone(&m), Arc::clone(&r));
        async move { m.wake(&r).await.map(|a| a.cold) }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(b.starts.load(Ordering::SeqCst), 0, "no start while held");
    assert_eq!(m.stats(&r.endpoint).unwrap().waiting, 1);
    drop(hold);
    assert!(
        waker.await.unwrap().unwrap(),
        "the held client waited for a start"
    );
    assert_eq!(b.starts.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_held_running_endpoint_is_not_suspended_until_the_lease_goes() {
    let b = FakeBackend::new(Script {
        start_delay: Duration::from_secs(1),
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let r = route("ep", Some(Duration::from_secs(10)));
    // Starting: the hold waits for the start to end (bounded), then leases the compute.
    let starting = tokio::spawn({
        let (m, r) = (Arc::clone(&m), Arc::clone(&r));
        async move { drop(m.wake(&r).await) }
    });
    tokio::task::yield_now().await;
    let held = m.hold(&r.endpoint, Duration::from_secs(5)).await.unwrap();
    starting.await.unwrap();
    let Held::Running { addr, lease } = held else {
        panic!("running");
    };
    assert_eq!(addr.as_str(), "127.0.0.1:10000");
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert!(
        !m.suspend(&r.endpoint).await,
        "the lease counts as a session"
    );
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Running);
    drop(lease);
    phase_within(&m, &r.endpoint, Phase::Suspended, Duration::from_secs(11)).await;

    // A hold that cannot settle within its bound says so.
    let b = FakeBackend::new(Script {
        start_delay: Duration::from_secs(60),
        ..Default::default()
    });
    let m = manager(Arc::clone(&b), cfg());
    let wake = tokio::spawn({
        let (m, r) = (Arc::clone(&m), Arc::clone(&r));
        async move { drop(m.wake(&r).await) }
    });
    tokio::task::yield_now().await;
    let err = m.hold(&r.endpoint, Duration::from_secs(1)).await.err();
    assert!(matches!(err, Some(WakeError::Timeout(_))));
    wake.abort();
}

#[tokio::test(start_paused = true)]
async fn a_held_frozen_endpoint_is_stopped_first_then_held_suspended() {
    let b = FakeBackend::new(freezable());
    let m = manager(Arc::clone(&b), light(600, 0));
    let r = route("ep", None);
    drop(m.wake(&r).await.unwrap());
    phase_within(&m, &r.endpoint, Phase::Frozen, Duration::from_secs(11)).await;
    let held = m.hold(&r.endpoint, Duration::from_secs(5)).await.unwrap();
    let Held::Suspended(hold) = held else {
        panic!("a frozen compute's files are no copy: it must be stopped and held suspended");
    };
    assert_eq!(b.stops.load(Ordering::SeqCst), 1);
    assert_eq!(m.stats(&r.endpoint).unwrap().phase, Phase::Suspended);
    drop(hold);
}
