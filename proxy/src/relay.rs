//! Relay threads: each client session lives on one thread, on that thread's own single-threaded
//! runtime, from the moment it is handed over after `accept` until it closes.
//!
//! A work-stealing runtime moves a woken task to whichever worker is free, and every such
//! hand-over between workers is a futex wake-up: with a few busy sessions that was ~0.3 futex
//! calls per forwarded transaction, and the CPU per transaction grew with the number of clients
//! instead of shrinking as events batch up (issue 16). On a thread of its own a session's
//! readiness events, its wake-ups and its syscalls all stay on one core.
//!
//! One accept loop (on the main runtime) hands each connection over once, to the thread with
//! the fewest live sessions, rather than one `SO_REUSEPORT` listener per thread: the kernel
//! spreads REUSEPORT connections by a hash of their addresses, so 8 long-lived clients on 2
//! threads end up 6/2 or worse about a quarter of the time, and the busier thread then caps the
//! throughput; counting live sessions keeps them even. The hand-over costs one cross-thread
//! wake-up per connection, not per transaction, and keeps the fd reserve, PROXY protocol and the
//! startup limits in one place.
//!
//! Whatever a session calls that outlives it or belongs to the manager (wakes, idle timers,
//! leases' timers) runs on the main runtime: see [`crate::shared::Proxy::wake`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tracing::error;

/// Connections on their way to one relay thread. The thread takes them as fast as it can spawn
/// a task, so a full queue means that thread is stuck, and the connection goes to another.
const QUEUE: usize = 1024;

/// What a relay thread runs for one handed-over connection.
pub(crate) type Session = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Makes the session for a job on relay thread `index`; called on that thread.
pub(crate) type MakeSession<T> = Arc<dyn Fn(usize, T) -> Session + Send + Sync>;

/// How long a stopping relay thread waits for its blocking tasks (password hashing, which
/// takes milliseconds) before it lets them finish on their own.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// The relay threads, owned by the accept loop.
pub(crate) struct Relays<T> {
    threads: Vec<Relay<T>>,
    /// Where the search for the least busy thread starts, so that ties rotate.
    next: AtomicUsize,
    /// Told whenever a thread's last live session ends.
    emptied: Arc<Notify>,
}

struct Relay<T> {
    tx: mpsc::Sender<T>,
    /// Sessions on this thread now, from the hand-over until the session's task ends.
    live: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The number of relay threads `[proxy] relay_threads` asks for when it is not set: one per
/// core the process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl<T: Send + 'static> Relays<T> {
    /// Starts `n` threads (at least one), each with a single-threaded runtime that runs
    /// `session(index, job)` for every job handed to it.
    pub(crate) fn start(n: usize, session: MakeSession<T>) -> io::Result<Self> {
        let mut threads = Vec::with_capacity(n.max(1));
        let emptied = Arc::new(Notify::new());
        for index in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, rx) = mpsc::channel(QUEUE);
            let live = Arc::new(AtomicUsize::new(0));
            let thread = std::thread::Builder::new()
                .name(format!("pgwake-relay-{index}"))
                .spawn({
                    let live = Live {
                        count: Arc::clone(&live),
                        emptied: Arc::clone(&emptied),
                    };
                    let session = Arc::clone(&session);
                    move || run(index, rt, rx, live, session)
                })?;
            threads.push(Relay {
                tx,
                live,
                thread: Some(thread),
            });
        }
        Ok(Self {
            threads,
            next: AtomicUsize::new(0),
            emptied,
        })
    }

    /// Hands `job` to the running thread with the fewest live sessions and says which; gives
    /// the job back when no thread can take it (all stopped, or all stuck).
    pub(crate) fn dispatch(&self, mut job: T) -> Result<usize, T> {
        let n = self.threads.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        // Stable: among equally busy threads the rotation decides.
        order.sort_by_key(|&i| self.threads[i].live.load(Ordering::Relaxed));
        for i in order {
            let relay = &self.threads[i];
            relay.live.fetch_add(1, Ordering::Relaxed);
            match relay.tx.try_send(job) {
                Ok(()) => return Ok(i),
                Err(e) => {
                    relay.live.fetch_sub(1, Ordering::Relaxed);
                    job = match e {
                        mpsc::error::TrySendError::Full(job) => job,
                        mpsc::error::TrySendError::Closed(job) => job,
                    };
                }
            }
        }
        Err(job)
    }

    /// Live sessions per thread (tests and logs).
    pub(crate) fn live(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|r| r.live.load(Ordering::Relaxed))
            .collect()
    }

    /// Resolves once no thread has a live session. A session gives its place under the limits
    /// back a moment before its task ends (it may still be writing its last error to the
    /// client), so a drain that saw every place returned waits for this before [`Self::stop`].
    pub(crate) async fn idle(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self
                .threads
                .iter()
                .all(|r| r.live.load(Ordering::Acquire) == 0)
            {
                return;
            }
            emptied.await;
        }
    }

    /// Stops every thread: its runtime drops the sessions still on it (closing their sockets),
    /// and this returns once all threads have ended.
    pub(crate) async fn stop(mut self) {
        let threads: Vec<_> = self
            .threads
            .drain(..)
            .filter_map(|mut r| {
                drop(r.tx);
                r.thread.take()
            })
            .collect();
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                // A panic was logged by the thread itself.
                let _ = t.join();
            }
        })
        .await;
        if let Err(e) = joined {
            error!(error = %e, "waiting for the relay threads failed");
        }
    }
}

/// The body of relay thread `index`: runs the sessions handed to it until the accept loop
/// drops its sender, then drops the ones still running.
fn run<T: Send + 'static>(
    index: usize,
    rt: tokio::runtime::Runtime,
    mut rx: mpsc::Receiver<T>,
    live: Live,
    session: MakeSession<T>,
) {
    let _exit = PanicLog(index);
    rt.block_on(async {
        while let Some(job) = rx.recv().await {
            let done = SessionEnd(live.clone());
            let session = session(index, job);
            tokio::spawn(async move {
                session.await;
                drop(done);
            });
        }
    });
    rt.shutdown_timeout(BLOCKING_GRACE);
}

/// One thread's live sessions. A clone held by a session's task gives its place back however
/// the task ends (done, panicked, or dropped with the runtime); the thread's own is never
/// dropped while it runs.
#[derive(Clone)]
struct Live {
    count: Arc<AtomicUsize>,
    emptied: Arc<Notify>,
}

impl Live {
    fn session_ended(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.emptied.notify_waiters();
        }
    }
}

struct SessionEnd(Live);

impl Drop for SessionEnd {
    fn drop(&mut self) {
        self.0.session_ended();
    }
}

/// A relay thread that panics outside a session (a panicking session only ends its own task)
/// says so: its sessions are gone, and the accept loop, finding its queue closed, sends new
/// connections to the other threads.
struct PanicLog(usize);

impl Drop for PanicLog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!(
                relay = self.0,
                "relay thread panicked; its sessions were closed and new connections go to the other relay threads"
            );
        }
    }
}

impl<T> Drop for Relays<T> {
    /// Dropped without [`Relays::stop`] (the accept loop's task was cancelled): the threads
    /// still end, once their queues close, without anyone waiting for them.
    fn drop(&mut self) {
        self.threads.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;
    use std::thread::ThreadId;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    type Seen = Arc<Mutex<Vec<(usize, Vec<ThreadId>)>>>;

    /// An echo session that notes its thread at every step.
    fn echo_sessions(seen: Seen) -> MakeSession<std::net::TcpStream> {
        Arc::new(move |index, stream: std::net::TcpStream| {
            let seen = Arc::clone(&seen);
            Box::pin(async move {
                let mut threads = vec![std::thread::current().id()];
                let mut s = TcpStream::from_std(stream).unwrap();
                let mut buf = [0u8; 64];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    threads.push(std::thread::current().id());
                    if n == 0 {
                        break;
                    }
                    s.write_all(&buf[..n]).await.unwrap();
                }
                seen.lock().unwrap().push((index, threads));
            })
        })
    }

    /// `n` clients, each accepted and handed to `relays` before the next connects, all kept open.
    async fn dispatched_clients(relays: &Relays<std::net::TcpStream>, n: usize) -> Vec<TcpStream> {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..n {
            let c = TcpStream::connect(addr).await.unwrap();
            let (s, _) = l.accept().await.unwrap();
            relays
                .dispatch(s.into_std().unwrap())
                .map_err(drop)
                .unwrap();
            clients.push(c);
        }
        clients
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_spread_over_every_thread_and_each_stays_on_one() {
        const THREADS: usize = 3;
        const CLIENTS: usize = 12;
        let seen: Seen = Arc::default();
        let relays = Relays::start(THREADS, echo_sessions(Arc::clone(&seen))).unwrap();
        let clients = dispatched_clients(&relays, CLIENTS).await;
        // All open at once, so the least busy thread is a different one each time.
        assert_eq!(relays.live(), vec![CLIENTS / THREADS; THREADS]);
        let rounds = clients.into_iter().map(|mut c| async move {
            for i in 0..20u8 {
                c.write_all(&[i; 10]).await.unwrap();
                let mut back = [0u8; 10];
                c.read_exact(&mut back).await.unwrap();
                assert_eq!(back, [i; 10]);
                // Give other tasks the chance to be scheduled in between.
                tokio::task::yield_now().await;
            }
        });
        futures_join_all(rounds).await;
        for (i, n) in relays.live().into_iter().enumerate() {
            assert!(
                n <= CLIENTS / THREADS,
                "relay {i}: {n} live after its clients left"
            );
        }
        within(|| seen.lock().unwrap().len() == CLIENTS).await;
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        let mut per_relay: HashMap<usize, HashSet<ThreadId>> = HashMap::new();
        for (index, threads) in seen.iter() {
            let first = threads[0];
            assert!(
                threads.iter().all(|t| *t == first),
                "a session moved between threads"
            );
            per_relay.entry(*index).or_default().insert(first);
        }
        assert_eq!(
            per_relay.len(),
            THREADS,
            "every relay thread served sessions"
        );
        let distinct: HashSet<_> = per_relay.values().flatten().collect();
        assert_eq!(distinct.len(), THREADS, "one OS thread per relay");
        assert!(!distinct.contains(&std::thread::current().id()));
        relays.stop().await;
    }

    #[tokio::test]
    async fn idle_waits_for_the_last_session_on_every_thread() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let make: MakeSession<()> = Arc::new(move |_, ()| {
            let mut rx = rx.clone();
            Box::pin(async move {
                let _ = rx.wait_for(|end| *end).await;
            })
        });
        let relays = Relays::start(2, make).unwrap();
        tokio::time::timeout(Duration::from_secs(10), relays.idle())
            .await
            .expect("idle with no sessions");
        for _ in 0..4 {
            relays.dispatch(()).unwrap();
        }
        assert_eq!(relays.live(), vec![2, 2]);
        {
            let idle = relays.idle();
            tokio::pin!(idle);
            assert!(
                futures_poll_once(idle.as_mut()).await.is_none(),
                "sessions live"
            );
            tx.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(10), idle)
                .await
                .expect("idle once every session ended");
        }
        assert_eq!(relays.live(), vec![0, 0]);
        relays.stop().await;
    }

    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| match Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }

    #[tokio::test]
    async fn stop_closes_the_sessions_still_running() {
        let seen: Seen = Arc::default();
        let relays = Relays::start(2, echo_sessions(seen)).unwrap();
        let clients = dispatched_clients(&relays, 4).await;
        relays.stop().await;
        for mut c in clients {
            let mut buf = [0u8; 1];
            // Closed by the proxy side: EOF (or a reset), not a hang.
            let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
                .await
                .expect("session closed by stop");
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        }
    }

    enum Job {
        PanicInSession,
        PanicInThread,
        Park,
    }

    impl Relays<Job> {
        /// A hand-over to one chosen thread, counted like [`Relays::dispatch`] counts it.
        fn send_to(&self, i: usize, job: Job) {
            self.threads[i].live.fetch_add(1, Ordering::Relaxed);
            self.threads[i].tx.try_send(job).map_err(drop).unwrap();
        }
    }

    #[tokio::test]
    async fn a_relay_thread_that_panics_leaves_the_others_serving() {
        let make: MakeSession<Job> = Arc::new(|_, job| match job {
            Job::PanicInSession => Box::pin(async { panic!("a session panics") }),
            Job::PanicInThread => panic!("the relay loop panics"),
            Job::Park => Box::pin(std::future::pending()),
        });
        let relays = Relays::start(2, make).unwrap();
        // A panicking session ends its own task only.
        relays.send_to(0, Job::PanicInSession);
        within(|| relays.live()[0] == 0).await;
        assert!(!relays.threads[0].tx.is_closed(), "thread 0 survived");
        // Thread 0 itself dies: its queue closes and every connection goes to thread 1.
        relays.send_to(0, Job::PanicInThread);
        within(|| relays.threads[0].tx.is_closed()).await;
        for _ in 0..4 {
            assert_eq!(relays.dispatch(Job::Park).map_err(drop), Ok(1));
        }
        assert_eq!(relays.live(), vec![0, 4]);
        relays.stop().await;
    }

    async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut set = tokio::task::JoinSet::new();
        for f in futs {
            set.spawn(f);
        }
        while let Some(done) = set.join_next().await {
            done.unwrap();
        }
    }

    async fn within(mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "condition not met");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
