//! Spare compute connections: for an endpoint that clients connect to often, one TCP
//! connection to its running compute is opened ahead of the next client, so that client's
//! session starts without waiting for the connect and for Postgres to fork its backend.
//!
//! A spare is a plain TCP connection on which nothing has been sent: Postgres has forked a
//! backend that waits for a StartupMessage (`authentication_timeout`, 60 s by default, and
//! without a word in its log if none comes). The next client's own startup goes over it, so the
//! session is exactly what a fresh connection would have given; only the fork happened earlier.
//!
//! What keeps that safe:
//! - A spare is used only for the endpoint and the compute address it was opened for, and only
//!   while it is younger than `[proxy] spare_max_age` (kept well under
//!   `authentication_timeout`), and only when a non-blocking peek finds it open and silent.
//! - A spare holds no session lease: it never keeps a compute awake, and a compute suspended
//!   or frozen meanwhile leaves a spare that is dead or too old, and so discarded.
//! - A spare that dies after that check but before the compute's first answer costs a retry on
//!   a fresh connection (`compute::start_session`), not the client's session.
//! - Only endpoints with demand get one: a spare is opened after a session starts when the
//!   endpoint's previous session started less than `spare_max_age` before, so an endpoint used
//!   once in a while never pays for backends nobody uses. At most one spare per endpoint.
//! - A spare that nobody takes is closed when it reaches `spare_max_age`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use pgwake_compute_manager::ComputeAddr;
use pgwake_router::EndpointId;
use prometheus::IntCounterVec;
use tracing::debug;

/// What became of a spare, the label of `pgwake_spare_connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A client's session started on it.
    Used,
    /// Reached `spare_max_age` unused and was closed.
    Expired,
    /// Found closed (or talking) when taken, or closed before the compute's first answer.
    Dead,
    /// The endpoint's compute had moved to another address.
    Moved,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Used => "used",
            Outcome::Expired => "expired",
            Outcome::Dead => "dead",
            Outcome::Moved => "moved",
        }
    }
}

/// The spares of every endpoint with recent demand.
pub(crate) struct Spares {
    max_age: Duration,
    connect_timeout: Duration,
    endpoints: DashMap<EndpointId, Entry>,
    next_id: AtomicU64,
    /// Sessions seen, to sweep the endpoints without demand now and then.
    starts: AtomicU64,
    outcomes: IntCounterVec,
}

/// Every this many sessions, endpoints whose last session is older than `max_age` and that
/// have no spare are forgotten (a spare's own expiry forgets the others): an endpoint seen once
/// and then deleted must not stay in the map.
const SWEEP_EVERY: u64 = 1024;

#[derive(Default)]
struct Entry {
    /// When the endpoint's last session started (taken a spare or not).
    last_start: Option<Instant>,
    spare: Option<Spare>,
    /// A spare is being opened; no second one is.
    opening: bool,
}

impl Entry {
    /// The endpoint's last session started less than `max_age` before `now`: it has demand.
    fn recent(&self, now: Instant, max_age: Duration) -> bool {
        self.last_start
            .is_some_and(|t| now.duration_since(t) < max_age)
    }

    /// Nothing to keep: no spare, none being opened, and no recent session.
    fn idle(&self, now: Instant, max_age: Duration) -> bool {
        self.spare.is_none() && !self.opening && !self.recent(now, max_age)
    }
}

struct Spare {
    id: u64,
    addr: ComputeAddr,
    /// Deregistered from any runtime, so the relay thread that takes it registers it on its
    /// own (a socket polled by another thread's driver would cost a cross-thread wake-up per
    /// message).
    sock: std::net::TcpStream,
    born: Instant,
}

impl Spares {
    /// `None` when `max_age` is zero (spares off).
    pub(crate) fn new(
        max_age: Duration,
        connect_timeout: Duration,
        outcomes: IntCounterVec,
    ) -> Option<Arc<Self>> {
        if max_age.is_zero() {
            return None;
        }
        Some(Arc::new(Self {
            max_age,
            connect_timeout,
            endpoints: DashMap::new(),
            next_id: AtomicU64::new(1),
            starts: AtomicU64::new(0),
            outcomes,
        }))
    }

    pub(crate) fn count(&self, outcome: Outcome) {
        self.outcomes.with_label_values(&[outcome.label()]).inc();
    }

    /// A session of `endpoint` is starting on the compute at `addr`: gives back the spare for
    /// that compute if there is a usable one and, when the endpoint has demand, the ticket
    /// that opens the next spare once dropped.
    pub(crate) fn take(
        self: &Arc<Self>,
        endpoint: &EndpointId,
        addr: &ComputeAddr,
    ) -> (Option<std::net::TcpStream>, Option<NextSpare>) {
        self.take_at(endpoint, addr, Instant::now())
    }

    fn take_at(
        self: &Arc<Self>,
        endpoint: &EndpointId,
        addr: &ComputeAddr,
        now: Instant,
    ) -> (Option<std::net::TcpStream>, Option<NextSpare>) {
        if self.starts.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.endpoints.retain(|_, e| !e.idle(now, self.max_age));
        }
        let (spare, open) = {
            let mut entry = self.endpoints.entry(endpoint.clone()).or_default();
            let recent = entry.recent(now, self.max_age);
            entry.last_start = Some(now);
            let spare = entry.spare.take();
            let open = recent && !entry.opening;
            if open {
                entry.opening = true;
            }
            (spare, open)
        };
        let next = open.then(|| NextSpare {
            spares: Arc::clone(self),
            endpoint: endpoint.clone(),
            addr: addr.clone(),
        });
        let Some(spare) = spare else {
            return (None, next);
        };
        let outcome = if spare.addr != *addr {
            Outcome::Moved
        } else if now.duration_since(spare.born) >= self.max_age {
            Outcome::Expired
        } else if !open_and_silent(&spare.sock) {
            Outcome::Dead
        } else {
            return (Some(spare.sock), next);
        };
        debug!(
            outcome = outcome.label(),
            "spare compute connection not used"
        );
        self.count(outcome);
        (None, next)
    }

    /// Opens a spare to `addr` in a task of the current runtime, and closes it at `max_age`
    /// if nobody took it. Outside a runtime (never the case for a session) nothing happens.
    fn open(self: &Arc<Self>, endpoint: EndpointId, addr: ComputeAddr) {
        // Whatever ends this open without a spare (no runtime, or a runtime shutting down that
        // drops the task unpolled), the endpoint must not be left "opening" for ever, which
        // would stop its spares.
        let pending = Opening {
            spares: Arc::clone(self),
            endpoint: endpoint.clone(),
            filed: false,
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let spares = Arc::clone(self);
        rt.spawn(async move {
            let sock = match tokio::time::timeout(
                spares.connect_timeout,
                tokio::net::TcpStream::connect(addr.as_str()),
            )
            .await
            {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    tcp.into_std().ok()
                }
                Ok(Err(e)) => {
                    debug!(%addr, error = %e, "could not open a spare compute connection");
                    None
                }
                Err(_) => None,
            };
            let Some(sock) = sock else {
                return;
            };
            let id = spares.next_id.fetch_add(1, Ordering::Relaxed);
            let spare = Spare {
                id,
                addr,
                sock,
                born: Instant::now(),
            };
            if !pending.file(spare) {
                return;
            }
            tokio::time::sleep(spares.max_age).await;
            spares.expire(&endpoint, id);
        });
    }

    /// Files a newly opened spare (or the failure to open one). False when it was not kept.
    fn opened(&self, endpoint: &EndpointId, spare: Option<Spare>) -> bool {
        let Some(mut entry) = self.endpoints.get_mut(endpoint) else {
            return false;
        };
        entry.opening = false;
        // Sessions take the entry's spare whenever they start and only one spare is opened at
        // a time, so the entry holds none here.
        let kept = spare.is_some();
        entry.spare = spare;
        kept
    }

    /// Closes spare `id` if it is still unused, and forgets the endpoint when it has had no
    /// session since: its next session then opens no spare (it shows no demand).
    fn expire(&self, endpoint: &EndpointId, id: u64) {
        let idle = |e: &Entry| e.idle(Instant::now(), self.max_age);
        let forget = {
            let Some(mut entry) = self.endpoints.get_mut(endpoint) else {
                return;
            };
            if entry.spare.as_ref().is_some_and(|s| s.id == id) {
                entry.spare = None;
                self.count(Outcome::Expired);
            }
            idle(&entry)
        };
        if forget {
            self.endpoints.remove_if(endpoint, |_, e| idle(e));
        }
    }

    /// Spares waiting now (tests).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.endpoints.iter().filter(|e| e.spare.is_some()).count()
    }
}

/// An open in progress; dropped before it filed a spare, it files none (`opening` cleared).
struct Opening {
    spares: Arc<Spares>,
    endpoint: EndpointId,
    filed: bool,
}

impl Opening {
    /// Files the spare; false when it was not kept.
    fn file(mut self, spare: Spare) -> bool {
        self.filed = true;
        self.spares.opened(&self.endpoint, Some(spare))
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if !self.filed {
            self.spares.opened(&self.endpoint, None);
        }
    }
}

/// Opens an endpoint's next spare when dropped. A session keeps it until the client's login
/// at the compute is done, so the compute forks the next backend after the client's own is
/// ready rather than while it starts: measured on two cores shared by client, proxy and
/// Postgres, a fork at the same time as the login made the connection slower, not faster.
pub(crate) struct NextSpare {
    spares: Arc<Spares>,
    endpoint: EndpointId,
    addr: ComputeAddr,
}

impl Drop for NextSpare {
    fn drop(&mut self) {
        let endpoint = self.endpoint.clone();
        self.spares.open(endpoint, self.addr.clone());
    }
}

/// The spare's peer has neither closed nor sent anything: a backend waiting for its startup.
fn open_and_silent(sock: &std::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    // The socket is non-blocking (from `into_std`): "would block" is the answer wanted.
    matches!(sock.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use prometheus::Opts;
    use tokio::net::TcpListener;

    use super::*;

    fn spares(max_age: Duration) -> Arc<Spares> {
        let outcomes =
            IntCounterVec::new(Opts::new("spares", "spares"), &["outcome"]).expect("metric");
        Spares::new(max_age, Duration::from_secs(5), outcomes).expect("enabled")
    }

    fn count(s: &Spares, outcome: Outcome) -> u64 {
        s.outcomes.with_label_values(&[outcome.label()]).get()
    }

    fn id(s: &str) -> EndpointId {
        EndpointId::parse(s).unwrap()
    }

    async fn listener() -> (TcpListener, ComputeAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = ComputeAddr::new(l.local_addr().unwrap().to_string());
        (l, addr)
    }

    fn blocking(tcp: tokio::net::TcpStream) -> std::net::TcpStream {
        let tcp = tcp.into_std().unwrap();
        tcp.set_nonblocking(false).unwrap();
        tcp
    }

    async fn within(mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "condition not met in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn zero_max_age_turns_spares_off() {
        let outcomes = IntCounterVec::new(Opts::new("s", "s"), &["outcome"]).unwrap();
        assert!(Spares::new(Duration::ZERO, Duration::from_secs(1), outcomes).is_none());
    }

    #[tokio::test]
    async fn the_second_session_in_a_row_opens_a_spare_for_the_third() {
        let (l, addr) = listener().await;
        let s = spares(Duration::from_secs(30));
        let ep = id("ep-a");
        assert!(s.take(&ep, &addr).0.is_none(), "no demand yet, no spare");
        tokio::task::yield_now().await;
        assert_eq!(s.waiting(), 0, "a single session opens nothing");
        let (none, next) = s.take(&ep, &addr);
        assert!(none.is_none(), "second session: none yet");
        assert!(next.is_some(), "but it opens one, when done with it");
        tokio::task::yield_now().await;
        assert!(
            s.endpoints.get(&ep).unwrap().spare.is_none(),
            "not while the session holds the ticket"
        );
        drop(next);
        let mut backend = blocking(l.accept().await.unwrap().0);
        within(|| s.waiting() == 1).await;
        let mut sock = s
            .take(&ep, &addr)
            .0
            .expect("the third session gets the spare");
        assert_eq!(count(&s, Outcome::Used), 0, "the caller counts a use");
        sock.set_nonblocking(false).unwrap();
        sock.write_all(b"startup").unwrap();
        let mut got = [0u8; 7];
        tokio::task::spawn_blocking(move || backend.read_exact(&mut got).map(|_| got))
            .await
            .unwrap()
            .map(|got| assert_eq!(&got, b"startup"))
            .unwrap();
    }

    #[tokio::test]
    async fn a_spare_for_another_address_or_a_closed_one_is_not_used() {
        let (l, addr) = listener().await;
        let (other, other_addr) = listener().await;
        let s = spares(Duration::from_secs(30));
        let ep = id("ep-b");
        s.take(&ep, &addr);
        s.take(&ep, &addr);
        let (_backend, _) = l.accept().await.unwrap();
        within(|| s.waiting() == 1).await;
        assert!(s.take(&ep, &other_addr).0.is_none(), "compute moved");
        assert_eq!(count(&s, Outcome::Moved), 1);

        // That take opened a spare to the new address; let it arrive, then make the compute
        // there close it, as a restarted or suspended compute does.
        let (backend, _) = other.accept().await.unwrap();
        within(|| s.waiting() == 1).await;
        drop(backend);
        // The peek sees the close once the FIN has arrived.
        within(|| {
            let e = s.endpoints.get(&ep).unwrap();
            !open_and_silent(&e.spare.as_ref().unwrap().sock)
        })
        .await;
        assert!(
            s.take(&ep, &other_addr).0.is_none(),
            "closed by the compute"
        );
        assert_eq!(count(&s, Outcome::Dead), 1);
    }

    #[tokio::test]
    async fn an_unused_spare_is_closed_at_max_age_and_the_endpoint_forgotten() {
        let (l, addr) = listener().await;
        let s = spares(Duration::from_millis(300));
        let ep = id("ep-c");
        s.take(&ep, &addr);
        s.take(&ep, &addr);
        let mut backend = blocking(l.accept().await.unwrap().0);
        within(|| s.waiting() == 1).await;
        // The compute sees the close: the backend waiting for a startup goes away.
        let n = tokio::task::spawn_blocking(move || backend.read(&mut [0u8; 16]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "closed without a byte sent");
        assert_eq!(count(&s, Outcome::Expired), 1);
        within(|| s.endpoints.is_empty()).await;
        // No demand any more: the next session opens nothing.
        assert!(s.take(&ep, &addr).1.is_none());
        tokio::task::yield_now().await;
        assert_eq!(s.waiting(), 0);
    }

    #[tokio::test]
    async fn endpoints_without_demand_are_swept() {
        let (_l, addr) = listener().await;
        let s = spares(Duration::from_millis(50));
        for i in 0..10 {
            s.take(&id(&format!("once-{i}")), &addr);
        }
        assert_eq!(s.endpoints.len(), 10);
        let later = Instant::now() + Duration::from_millis(60);
        for _ in 10..SWEEP_EVERY {
            s.take_at(&id("busy"), &addr, later);
        }
        assert!(
            s.endpoints.iter().all(|e| e.key().as_str() == "busy"),
            "the endpoints seen once, long ago, are gone"
        );
    }

    /// A relay runtime that stops drops the task opening a spare without running it: the
    /// endpoint must not stay "opening" (which would stop its spares for good).
    #[test]
    fn an_open_dropped_with_its_runtime_leaves_the_endpoint_free() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = spares(Duration::from_secs(30));
        let (ep, addr) = (id("ep-e"), ComputeAddr::new("127.0.0.1:9"));
        {
            let _in = rt.enter();
            drop(s.take(&ep, &addr));
            drop(s.take(&ep, &addr));
        }
        assert!(s.endpoints.get(&ep).unwrap().opening, "spawned, not run");
        drop(rt);
        assert!(!s.endpoints.get(&ep).unwrap().opening);
    }

    #[tokio::test]
    async fn an_unreachable_compute_leaves_no_spare_and_no_lasting_state() {
        let (l, addr) = listener().await;
        drop(l);
        let s = spares(Duration::from_secs(30));
        let ep = id("ep-d");
        s.take(&ep, &addr);
        s.take(&ep, &addr);
        within(|| !s.endpoints.get(&ep).unwrap().opening).await;
        assert_eq!(s.waiting(), 0);
        // The failure does not stop the next attempt.
        let (spare, next) = s.take(&ep, &addr);
        assert!(spare.is_none() && next.is_some());
        drop(next);
        assert!(s.endpoints.get(&ep).unwrap().opening);
    }
}
