//! One watch on all of pgwake's compute pods in the namespace, shared by every wake, stop and
//! exit watch of the backend.
//!
//! A watch per pod (`watch_object` with a field selector) is one long-lived HTTP/1.1
//! connection to the API server per running compute: 500 computes, 500 connections from the
//! leader, which API servers and their priority-and-fairness limits count against it. Here a
//! single label-selected watcher (list, then watch from its resourceVersion; a 410 Gone makes
//! it list again) feeds one `tokio::sync::watch` channel per pod name.
//!
//! Why channels per pod rather than kube's `reflector` store: the store answers "what is pod X
//! now", but not "tell me when X changes"; its waiters would be woken by every event of every
//! pod, an O(n) scan per event with n waiters. A channel per pod gives both: the current state
//! on subscribing, and a wake-up on changes of that pod only (one map look-up per event).
//!
//! A waiter sees its pod's latest state, not necessarily every state in between (two events
//! applied before it runs leave the second): what the backend asks (ready? gone? replaced,
//! restarted, not ready for `not_ready_grace`?) is read from a state, with the uid and the
//! restart count telling incarnations apart, so a skipped state hides only a blip shorter
//! than the event delivery.
//!
//! The watch runs while someone waits on a pod (a start, a stop, a running compute's exit
//! watch) and for [`LINGER`] after the last one leaves, so that a start followed by its exit
//! watch shares one list. It is started by the first subscriber and stops on its own once
//! idle, or when the backend is dropped: no task outlives its use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, watcher, Event};
use kube::Api;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use super::{backoff, managed_selector, ApiError, KubernetesConfig};

/// How long the watch stays up with nobody waiting on any pod.
pub(super) const LINGER: Duration = Duration::from_secs(30);

/// A pod as the shared watch last saw it.
#[derive(Debug, Clone)]
pub(super) enum Seen {
    /// The watch has not finished its first list yet.
    Unknown,
    /// Not there (never created, or deleted).
    Absent,
    Present(Arc<Pod>),
}

/// The watch's failures in a row (0 once an event arrives again) and the latest one.
#[derive(Debug, Clone, Default)]
pub(super) struct Health {
    pub failures: u32,
    pub error: Option<ApiError>,
}

/// The shared watch of one backend.
pub(super) struct PodWatch {
    api: Api<Pod>,
    cfg: KubernetesConfig,
    inner: Mutex<Inner>,
    health: watch::Sender<Health>,
}

#[derive(Default)]
struct Inner {
    /// Every pod the watch sees, and the pods someone waits on that it does not.
    pods: HashMap<String, watch::Sender<Seen>>,
    subscribers: usize,
    /// Since when nobody waits on any pod.
    idle_since: Option<Instant>,
    /// The first list of this run of the watch is done: a pod it has not seen is absent.
    synced: bool,
    task: Option<JoinHandle<()>>,
}

impl PodWatch {
    pub(super) fn new(api: Api<Pod>, cfg: KubernetesConfig) -> Arc<Self> {
        Arc::new(Self {
            api,
            cfg,
            inner: Mutex::new(Inner::default()),
            health: watch::Sender::new(Health::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing here panics while holding the lock; a poisoned one is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pod `pod` as the shared watch sees it, from now on; starts the watch if it is not
    /// running.
    pub(super) fn subscribe(self: &Arc<Self>, pod: &str) -> PodSubscription {
        let mut inner = self.lock();
        // A task that ended without clearing its slot panicked: what it saw may be stale.
        if inner.task.as_ref().is_some_and(JoinHandle::is_finished) {
            inner.task = None;
            inner.synced = false;
        }
        inner.subscribers += 1;
        inner.idle_since = None;
        let initial = if inner.synced {
            Seen::Absent
        } else {
            Seen::Unknown
        };
        let rx = inner
            .pods
            .entry(pod.to_string())
            .or_insert_with(|| watch::Sender::new(initial))
            .subscribe();
        if inner.task.is_none() {
            debug!("starting the compute pod watch");
            let span = tracing::info_span!("compute_pod_watch");
            inner.task = Some(tokio::spawn(
                run(Arc::downgrade(self), self.api.clone(), self.cfg.clone()).instrument(span),
            ));
        }
        PodSubscription {
            hub: Arc::clone(self),
            pod: pod.to_string(),
            rx: Some(rx),
            health: self.health.subscribe(),
        }
    }

    /// How many wait on a pod now.
    #[cfg(test)]
    pub(super) fn subscribers(&self) -> usize {
        self.lock().subscribers
    }

    /// Whether the watch task runs.
    #[cfg(test)]
    pub(super) fn running(&self) -> bool {
        self.lock().task.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn unsubscribe(&self, pod: &str, rx: watch::Receiver<Seen>) {
        let mut inner = self.lock();
        drop(rx);
        inner.subscribers = inner.subscribers.saturating_sub(1);
        if inner.subscribers == 0 {
            inner.idle_since = Some(Instant::now());
        }
        if let Some(tx) = inner.pods.get(pod) {
            if tx.receiver_count() == 0 && !matches!(*tx.borrow(), Seen::Present(_)) {
                inner.pods.remove(pod);
            }
        }
    }

    /// Applies one event of the watcher; `relist` collects the pods of a list in progress.
    fn apply(&self, event: Event<Pod>, relist: &mut Option<HashMap<String, Arc<Pod>>>) {
        match event {
            Event::Init => *relist = Some(HashMap::new()),
            Event::InitApply(pod) => {
                if let (Some(list), Some((name, pod))) = (relist.as_mut(), slim(pod)) {
                    list.insert(name, pod);
                }
            }
            Event::InitDone => {
                let mut listed = relist.take().unwrap_or_default();
                let mut inner = self.lock();
                inner.pods.retain(|name, tx| match listed.remove(name) {
                    Some(pod) => {
                        set(tx, Seen::Present(pod));
                        true
                    }
                    None => {
                        set(tx, Seen::Absent);
                        tx.receiver_count() > 0
                    }
                });
                for (name, pod) in listed {
                    inner
                        .pods
                        .insert(name, watch::Sender::new(Seen::Present(pod)));
                }
                inner.synced = true;
            }
            Event::Apply(pod) => {
                if let Some((name, pod)) = slim(pod) {
                    let mut inner = self.lock();
                    match inner.pods.get(&name) {
                        Some(tx) => set(tx, Seen::Present(pod)),
                        None => {
                            inner
                                .pods
                                .insert(name, watch::Sender::new(Seen::Present(pod)));
                        }
                    }
                }
            }
            Event::Delete(pod) => {
                if let Some(name) = pod.metadata.name {
                    let mut inner = self.lock();
                    if let Some(tx) = inner.pods.get(&name) {
                        if tx.receiver_count() == 0 {
                            inner.pods.remove(&name);
                        } else {
                            set(tx, Seen::Absent);
                        }
                    }
                }
            }
        }
    }

    /// Ends this run of the watch if nobody has waited on a pod for [`LINGER`]; the next
    /// subscriber starts a new one.
    fn stop_if_idle(&self) -> bool {
        let mut inner = self.lock();
        let idle =
            inner.subscribers == 0 && inner.idle_since.is_some_and(|t| t.elapsed() >= LINGER);
        if idle {
            debug!("nobody waits on a compute pod; stopping the pod watch");
            // The task is this one, about to return: dropping its handle does not stop it.
            *inner = Inner::default();
            self.health.send_replace(Health::default());
        }
        idle
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        if let Some(task) = self.lock().task.take() {
            task.abort();
        }
    }
}

/// The pod's name, and the pod without what nobody here reads (its spec and managed fields
/// are most of its size, and 500 of them are kept).
fn slim(mut pod: Pod) -> Option<(String, Arc<Pod>)> {
    let name = pod.metadata.name.clone()?;
    pod.spec = None;
    pod.metadata.managed_fields = None;
    Some((name, Arc::new(pod)))
}

/// Sends `seen` unless it is what the channel already holds (a relist repeats every pod).
fn set(tx: &watch::Sender<Seen>, seen: Seen) {
    tx.send_if_modified(|old| {
        let same = match (&*old, &seen) {
            (Seen::Absent, Seen::Absent) => true,
            (Seen::Present(a), Seen::Present(b)) => {
                a.metadata.uid == b.metadata.uid
                    && a.metadata.resource_version == b.metadata.resource_version
            }
            _ => false,
        };
        if !same {
            *old = seen;
        }
        !same
    });
}

/// The watch: events into `hub` until it is idle or gone. Failures are retried with the
/// backend's backoff for as long as it takes (an unreachable API server says nothing about
/// the pods); waiters see them in [`Health`] and decide whether to give up.
async fn run(hub: Weak<PodWatch>, api: Api<Pod>, cfg: KubernetesConfig) {
    let selector = managed_selector();
    let mut events = watcher(api, watcher::Config::default().labels(&selector)).boxed();
    let mut relist = None;
    let mut failures = 0u32;
    let mut idle_check = tokio::time::interval_at(Instant::now() + LINGER, LINGER);
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = idle_check.tick() => {
                match hub.upgrade() {
                    Some(h) if !h.stop_if_idle() => continue,
                    _ => return,
                }
            }
        };
        let Some(h) = hub.upgrade() else { return };
        match event {
            // The watcher's stream never ends; the next subscriber starts a new one.
            None => {
                let mut inner = h.lock();
                inner.task = None;
                inner.synced = false;
                return;
            }
            Some(Ok(event)) => {
                // Not `Init`: the watcher says it before each try of its list, which may fail.
                if failures > 0 && !matches!(event, Event::Init) {
                    failures = 0;
                    h.health.send_replace(Health::default());
                }
                h.apply(event, &mut relist);
            }
            // The watch fell too far behind (the API server compacted its history): the
            // watcher lists again at once; nothing failed.
            Some(Err(watcher::Error::WatchError(s))) if s.code == 410 => {
                debug!("compute pod watch expired; listing again");
            }
            Some(Err(e)) => {
                failures += 1;
                let backoff = backoff(&cfg, failures);
                warn!(error = %e, ?backoff, "watching compute pods failed; retrying");
                let error = ApiError::from(e);
                h.health.send_replace(Health {
                    failures,
                    error: Some(error),
                });
                drop(h);
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// One pod, as the shared watch sees it; keeps the watch running while it lives.
pub(super) struct PodSubscription {
    hub: Arc<PodWatch>,
    pod: String,
    rx: Option<watch::Receiver<Seen>>,
    health: watch::Receiver<Health>,
}

impl PodSubscription {
    /// The pod's latest state; [`Self::changed`] then waits for the next one.
    pub(super) fn seen(&mut self) -> Seen {
        self.rx
            .as_mut()
            .map_or(Seen::Unknown, |rx| rx.borrow_and_update().clone())
    }

    /// The watch's latest health; [`Self::changed`] then waits for the next one.
    pub(super) fn health(&mut self) -> Health {
        self.health.borrow_and_update().clone()
    }

    /// Resolves when the pod or the watch's health changed since last read.
    pub(super) async fn changed(&mut self) {
        let Self { rx, health, .. } = self;
        let pod = async {
            let open = match rx.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => false,
            };
            // The channel outlives every subscription to it.
            if !open {
                std::future::pending::<()>().await
            }
        };
        let health = async {
            if health.changed().await.is_err() {
                std::future::pending::<()>().await
            }
        };
        tokio::select! {
            () = pod => {}
            () = health => {}
        }
    }
}

impl Drop for PodSubscription {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            self.hub.unsubscribe(&self.pod, rx);
        }
    }
}
