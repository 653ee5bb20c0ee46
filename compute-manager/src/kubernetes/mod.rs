//! Computes as Kubernetes workloads: one StatefulSet per endpoint, scaled between 0 and 1.
//!
//! # Why a StatefulSet at 0/1 replicas, not a Pod created from a template
//! - **Data survives a suspend.** The StatefulSet's volume claim template gives the endpoint one
//!   PersistentVolumeClaim that outlives its pod (`whenScaled: Retain`), bound to the same
//!   volume on every wake. With bare pods, pgwake would create, find and garbage-collect claims
//!   itself.
//! - **Stable identity.** The pod is always `<name>-0`, so a wake knows which pod to watch
//!   before it exists, and two pods of one endpoint never run at once (the controller starts
//!   the new pod only after the old one is gone), which one data directory requires.
//! - **Idempotent under races.** "Scale to 1" is a single field with optimistic concurrency
//!   (`resourceVersion`): several managers waking the same endpoint converge on one pod; a
//!   "create a pod" race needs deterministic names and delete-on-conflict handling instead.
//! - **Operable with stock tools.** `kubectl scale statefulset/pgwake-x --replicas=1` is a manual
//!   wake, `kubectl get sts` shows what runs, and the controller restarts a crashed pod.
//!
//! The cost is the controller's reaction time (a few hundred ms to create the pod), which is
//! small next to image start and Postgres recovery.
//!
//! # Protocol
//! - **wake**: read the StatefulSet; create it (replicas 1) if absent; if it is at 0, merge-patch
//!   `replicas: 1` with its `resourceVersion` (409 → read again). Then wait, on the pod watch
//!   (below), until pod `<name>-0` is Ready with an IP, and answer `podIP:port`. Failing
//!   containers (bad image, missing secret, crash loop) end the wait early with their reason.
//! - **stop**: merge-patch `replicas: 0` the same way, then wait until the pod is gone. The
//!   kubelet sends the image's stop signal (`postgres` images: SIGINT, a fast shutdown that
//!   writes a checkpoint) and waits `termination_grace` before killing.
//! - **adopt** (`running_endpoints`): one list of the StatefulSets labelled
//!   `app.kubernetes.io/managed-by=pgwake` with a `pgwake.io/endpoint` label, keeping those at
//!   `replicas` 1 or more. The manager leaves its pods running when it shuts down, so a new
//!   manager (a restart, or a standby that becomes leader) wakes each of these: the wake finds
//!   the StatefulSet at 1, waits for the pod to be Ready, and the endpoint's idle timer runs
//!   again.
//! - **exited**: a wait on the pod (from when the manager first asks) ends when it is
//!   deleted, replaced (new uid or IP), its container restarts, or it stays not-ready for
//!   `not_ready_grace`.
//! - **the pod watch** (`pod_watch.rs`): starts, stops and exit waits all read one watch (list,
//!   then watch; not polling) of the pods labelled as pgwake's computes in the namespace, not
//!   one each: a manager with 500 running computes holds one watch connection to the API
//!   server, not 500. It runs while anyone waits on a pod (and `LINGER` after), and retries
//!   its failures with the backoff below; a wait gives up on them as a single call would.
//! - API errors (5xx, 429, connection failures) are retried with exponential backoff, at most
//!   `api_retries` times per step; 4xx other than 404/409 fail at once as misconfiguration.
//! - A wake that fails or is abandoned (the manager's `wake_timeout`) scales the StatefulSet
//!   back to 0, so no compute runs that no manager tracks. With several managers for one
//!   endpoint, this can stop a pod another manager is waiting for: run one manager (or one
//!   leader, `leader::LeaderElector`) per endpoint.

mod config;
pub mod leader;
mod pod_watch;
pub mod provision;
mod workload;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Event as CoreEvent;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use pgwake_router::crd::{EndpointState, PgwakeEndpoint, PgwakeEndpointStatus};
use pgwake_router::{BackendSpec, EndpointId, Route};
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::{BackendError, ComputeAddr, ComputeBackend, RunningCompute, StartBlocker};
use pod_watch::{Health, PodWatch, Seen};

pub use config::{KubernetesConfig, NeonConfig};
pub use leader::{
    label_leader_pod, LeaderConfig, LeaderElector, LeaderError, LeaderState, Leadership,
    LABEL_LEADER,
};
pub use workload::{
    desired_statefulset, managed_selector, pod_name, pod_state, running_endpoint, workload_name,
    PodIdentity, PodState, ANNOTATION_TEMPLATE_HASH, LABEL_ENDPOINT, LABEL_MANAGED_BY, MANAGED_BY,
};

/// The name pgwake's changes carry in `managedFields`.
pub const FIELD_MANAGER: &str = "pgwake";
/// Longest wait between two tries of a failed API call.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Conflicts (another writer got there first) in a row before giving up; each one means
/// progress by someone, so this only guards against a livelock.
const MAX_CONFLICTS: u32 = 10;
/// How long a StatefulSet at 1 may have no pod before its Events are read for a
/// `FailedCreate`, and how often again while it still has none.
const FAILED_CREATE_CHECK: Duration = Duration::from_secs(2);
/// How much older than the start a `FailedCreate` Event may look and still count (the API
/// server's clock is not ours).
const CLOCK_SLACK: k8s_openapi::jiff::SignedDuration =
    k8s_openapi::jiff::SignedDuration::from_secs(5);

/// Runs computes as StatefulSets in one namespace. Cheap to clone.
#[derive(Clone)]
pub struct KubernetesBackend {
    shared: Arc<Shared>,
}

struct Shared {
    cfg: KubernetesConfig,
    client: Client,
    namespace: String,
    statefulsets: Api<StatefulSet>,
    /// The one watch of the compute pods that starts, stops and exit watches share.
    pod_watch: Arc<PodWatch>,
    endpoints: Api<PgwakeEndpoint>,
    events: Api<K8sEvent>,
    /// The core/v1 view of Events, where the StatefulSet controller's `FailedCreate` is found
    /// by field selector.
    core_events: Api<CoreEvent>,
    /// Starts that go on after their clients gave up (`start_timeout`), by endpoint. The flag
    /// says a new start has taken the compute over; whoever holds the lock decides.
    continued: std::sync::Mutex<HashMap<EndpointId, Arc<tokio::sync::Mutex<bool>>>>,
    /// Why each endpoint's latest start had no ready pod yet, for a client whose wait ends
    /// (`start_blocker`); gone once the start succeeds.
    pending: std::sync::Mutex<HashMap<EndpointId, Arc<PendingReason>>>,
    /// What was last written to each endpoint's status: conditions whose status does not
    /// change keep their `lastTransitionTime`, and `observedGeneration` carries over.
    written: std::sync::Mutex<HashMap<EndpointId, Written>>,
}

/// An endpoint's status as this manager last wrote it.
#[derive(Debug, Clone, Default)]
struct Written {
    status: Option<PgwakeEndpointStatus>,
    /// The generation of the resource whose spec the compute was last started from.
    observed_generation: Option<i64>,
}

impl KubernetesBackend {
    /// A backend using `client`; `cfg.namespace` unset means the client's default namespace.
    pub fn new(client: Client, cfg: KubernetesConfig) -> Result<Self, BackendError> {
        let errors = cfg.validate();
        if !errors.is_empty() {
            return Err(BackendError::Config(errors.join("; ")));
        }
        let namespace = cfg
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        Ok(Self {
            shared: Arc::new(Shared {
                statefulsets: Api::namespaced(client.clone(), &namespace),
                pod_watch: PodWatch::new(Api::namespaced(client.clone(), &namespace), cfg.clone()),
                endpoints: Api::namespaced(client.clone(), &namespace),
                events: Api::namespaced(client.clone(), &namespace),
                core_events: Api::namespaced(client.clone(), &namespace),
                continued: std::sync::Mutex::new(HashMap::new()),
                pending: std::sync::Mutex::new(HashMap::new()),
                written: std::sync::Mutex::new(HashMap::new()),
                client,
                namespace,
                cfg,
            }),
        })
    }

    /// A backend with the client inferred from the environment: the pod's service account in a
    /// cluster, else `KUBECONFIG` / `~/.kube/config`.
    pub async fn from_env(cfg: KubernetesConfig) -> Result<Self, BackendError> {
        let client = Client::try_default()
            .await
            .map_err(|e| BackendError::Config(format!("kubernetes client: {e}")))?;
        Self::new(client, cfg)
    }

    pub fn namespace(&self) -> &str {
        &self.shared.namespace
    }

    /// The client, to share with the router's `crd_source` (one connection pool).
    pub fn client(&self) -> Client {
        self.shared.client.clone()
    }

    pub fn config(&self) -> &KubernetesConfig {
        &self.shared.cfg
    }

    /// The StatefulSet that runs `id`'s compute.
    pub fn workload_name(&self, id: &EndpointId) -> String {
        workload_name(&self.shared.cfg.name_prefix, id)
    }
}

#[async_trait]
impl ComputeBackend for KubernetesBackend {
    async fn start(&self, route: &Route) -> Result<Box<dyn RunningCompute>, BackendError> {
        let s = &self.shared;
        if !matches!(route.backend, BackendSpec::Kubernetes { .. }) {
            return Err(BackendError::Config(format!(
                "endpoint {} is not a kubernetes endpoint",
                route.endpoint
            )));
        }
        let desired = desired_statefulset(&s.cfg, &s.namespace, route)?;
        let started = Instant::now();
        let now = k8s_openapi::jiff::Timestamp::now();
        let since = now.checked_sub(CLOCK_SLACK).unwrap_or(now);
        // A start that went on without clients (start_timeout) is taken over: it leaves the
        // StatefulSet alone from now on, or has already scaled it back to 0 when this gets
        // the lock.
        let continued = s
            .continued
            .lock()
            .ok()
            .and_then(|mut c| c.remove(&route.endpoint));
        if let Some(c) = continued {
            *c.lock().await = true;
        }
        let name = self.workload_name(&route.endpoint);
        let pod = pod_name(&name);
        let port = workload::compute_port(&s.cfg, route);
        let scaled = s.scale(&name, 1, Some(&desired)).await?;
        // Armed until the compute is handed over: a start that fails or is abandoned from here
        // on scales back down.
        let pending = Arc::new(std::sync::Mutex::new(None));
        if let Ok(mut p) = s.pending.lock() {
            p.insert(route.endpoint.clone(), Arc::clone(&pending));
        }
        let mut cleanup = ScaleDownOnDrop {
            shared: Some(Arc::clone(s)),
            name: name.clone(),
            id: route.endpoint.clone(),
            failure: None,
            pending: Arc::clone(&pending),
            go_on: s.cfg.start_timeout.map(|t| GoOn {
                port,
                deadline: crate::manager::deadline(started, t),
                since,
            }),
        };
        if scaled == Scaled::Changed {
            s.write_status(
                &route.endpoint,
                EndpointState::Starting,
                None,
                None,
                Some(route),
            )
            .await;
        }
        let identity = match s.wait_ready(&name, port, since, &pending).await {
            Ok(identity) => identity,
            Err(e) => {
                // The status written after scaling back down says why (condition Failed).
                cleanup.failure = Some(failure_reason(&e));
                return Err(e);
            }
        };
        if let Ok(mut p) = s.pending.lock() {
            if p.get(&route.endpoint)
                .is_some_and(|p| Arc::ptr_eq(p, &pending))
            {
                p.remove(&route.endpoint);
            }
        }
        let addr = ComputeAddr::new(identity.addr.to_string());
        s.write_status(
            &route.endpoint,
            EndpointState::Running,
            Some(&addr),
            None,
            Some(route),
        )
        .await;
        cleanup.shared = None;
        info!(endpoint = %route.endpoint, pod, addr = %addr, "compute pod ready");
        Ok(Box::new(PodCompute {
            shared: Arc::clone(s),
            id: route.endpoint.clone(),
            name,
            addr,
            identity,
            stopping: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// One list of the StatefulSets this backend manages (by label), keeping those that want a
    /// pod. `start` for one of them finds it at 1 and waits for the pod to be Ready, without
    /// a status change to Starting.
    async fn running_endpoints(&self) -> Result<Vec<EndpointId>, BackendError> {
        let s = &self.shared;
        let lp = ListParams::default().labels(&managed_selector());
        let mut retry = Retry::new(&s.cfg);
        let list = loop {
            match s.statefulsets.list(&lp).await {
                Ok(list) => break list,
                Err(e) => {
                    let error = match ApiError::from(e) {
                        // Nothing to read again: a 404/409 on a list is not a write conflict.
                        ApiError::Conflict => ApiError::Transient("list conflict".into()),
                        other => other,
                    };
                    retry.failed("list statefulsets", error).await?;
                }
            }
        };
        let mut ids: Vec<EndpointId> = list
            .items
            .iter()
            .filter_map(|sts| running_endpoint(&s.cfg.name_prefix, sts))
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    fn start_blocker(&self, id: &EndpointId) -> Option<StartBlocker> {
        let pending = Arc::clone(self.shared.pending.lock().ok()?.get(id)?);
        let pending = pending.lock().ok()?;
        let (reason, message) = pending.as_ref()?;
        Some(workload::start_blocker(reason, message))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scaled {
    /// It already had the wanted replicas (or, scaling down, did not exist).
    Already,
    Changed,
}

/// Counts failures of API calls in a row and sleeps between tries.
struct Retry<'a> {
    cfg: &'a KubernetesConfig,
    failures: u32,
    conflicts: u32,
}

impl<'a> Retry<'a> {
    fn new(cfg: &'a KubernetesConfig) -> Self {
        Self {
            cfg,
            failures: 0,
            conflicts: 0,
        }
    }

    /// Sleeps before the next try, or says why there is none.
    async fn failed(&mut self, what: &str, error: ApiError) -> Result<(), BackendError> {
        match error {
            ApiError::Transient(e) => {
                self.failures += 1;
                if self.failures > self.cfg.api_retries {
                    return Err(BackendError::io(
                        format!("kubernetes: {what} (gave up after {} tries)", self.failures),
                        std::io::Error::other(e),
                    ));
                }
                let backoff = backoff(self.cfg, self.failures);
                warn!(error = %e, attempt = self.failures, ?backoff, "kubernetes: {what} failed; retrying");
                tokio::time::sleep(backoff).await;
                Ok(())
            }
            ApiError::Conflict => {
                self.conflicts += 1;
                if self.conflicts > MAX_CONFLICTS {
                    return Err(BackendError::io(
                        format!(
                            "kubernetes: {what}: still conflicting after {MAX_CONFLICTS} tries"
                        ),
                        std::io::Error::other("conflict"),
                    ));
                }
                debug!("kubernetes: {what}: conflict; reading again");
                Ok(())
            }
            ApiError::Permanent(e) => Err(BackendError::Config(format!("kubernetes: {what}: {e}"))),
        }
    }
}

/// The wait before try `failures + 1`: `retry_backoff` doubled per failure, at most 5 s.
fn backoff(cfg: &KubernetesConfig, failures: u32) -> Duration {
    cfg.retry_backoff
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// How an API failure is handled.
#[derive(Debug, Clone)]
enum ApiError {
    /// Someone else changed (or created, or deleted) the object: read it again and redo.
    Conflict,
    /// Might work if tried again: 5xx, 429, timeouts, connection errors.
    Transient(String),
    /// Will not work until an operator changes something: RBAC, invalid object, bad request.
    Permanent(String),
}

impl From<kube::Error> for ApiError {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) if s.code == 409 || s.code == 404 => ApiError::Conflict,
            kube::Error::Api(s) if s.code == 429 || s.code >= 500 => {
                ApiError::Transient(e.to_string())
            }
            kube::Error::Api(_)
            | kube::Error::SerdeError(_)
            | kube::Error::BuildRequest(_)
            | kube::Error::InferConfig(_) => ApiError::Permanent(e.to_string()),
            _ => ApiError::Transient(e.to_string()),
        }
    }
}

impl From<watcher::Error> for ApiError {
    fn from(e: watcher::Error) -> Self {
        match e {
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => match ApiError::from(e) {
                // A 404/409 on list or watch is not a write conflict: nothing to re-read.
                ApiError::Conflict => ApiError::Transient("list/watch conflict".into()),
                other => other,
            },
            // Includes 410 Gone (watch too old): the watcher re-lists on the next poll.
            watcher::Error::WatchError(s) if s.code == 403 || s.code == 401 => {
                ApiError::Permanent(s.to_string())
            }
            other => ApiError::Transient(other.to_string()),
        }
    }
}

impl Shared {
    /// Makes the StatefulSet `name` have `replicas` (creating it from `desired` if absent and
    /// `desired` is given).
    async fn scale(
        &self,
        name: &str,
        replicas: i32,
        desired: Option<&StatefulSet>,
    ) -> Result<Scaled, BackendError> {
        let mut retry = Retry::new(&self.cfg);
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        loop {
            let current = match self.statefulsets.get_opt(name).await {
                Ok(c) => c,
                Err(e) => {
                    retry.failed("read statefulset", e.into()).await?;
                    continue;
                }
            };
            // The failures are not reset by a read that works: a read followed by a write that
            // fails, again and again, must still run out of tries.
            let Some(current) = current else {
                let Some(desired) = desired else {
                    return Ok(Scaled::Already);
                };
                info!(statefulset = name, "creating compute statefulset");
                let post = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PostParams::default()
                };
                let mut desired = desired.clone();
                if self.cfg.delete_with_endpoint {
                    let endpoint = desired
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(workload::LABEL_ENDPOINT))
                        .cloned()
                        .unwrap_or_default();
                    match self.endpoints.get_opt(&endpoint).await {
                        Ok(Some(ep)) => workload::owned_by(&mut desired, &ep),
                        // A config-file endpoint has no resource to be deleted with.
                        Ok(None) => {}
                        Err(e) => {
                            retry.failed("read PgwakeEndpoint", e.into()).await?;
                            continue;
                        }
                    }
                }
                match self.statefulsets.create(&post, &desired).await {
                    Ok(_) => return Ok(Scaled::Changed),
                    Err(e) => {
                        retry.failed("create statefulset", e.into()).await?;
                        continue;
                    }
                }
            };
            let have = current.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            if (replicas == 0) == (have == 0) {
                if let (Some(d), true) = (desired, have > 0) {
                    if workload::template_hash(d) != workload::template_hash(&current) {
                        info!(statefulset = name, "compute is running an older template; it changes at the next wake from suspended");
                    }
                }
                return Ok(Scaled::Already);
            }
            let Some(rv) = current.metadata.resource_version.as_deref() else {
                return Err(BackendError::Config(format!(
                    "statefulset {name} has no resourceVersion"
                )));
            };
            let new_template = desired
                .filter(|d| workload::template_hash(d) != workload::template_hash(&current))
                .map(|d| (&current, d));
            let patch = workload::scale_patch(rv, replicas, new_template);
            info!(
                statefulset = name,
                replicas,
                template_changed = new_template.is_some(),
                "scaling compute"
            );
            match self
                .statefulsets
                .patch(name, &pp, &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(Scaled::Changed),
                Err(e) => retry.failed("scale statefulset", e.into()).await?,
            }
        }
    }

    /// Watches the pod of StatefulSet `name` until it is ready, or its containers are
    /// failing. Meanwhile `pending` holds why it is not ready yet, in Kubernetes' words, for
    /// the status written if the start is abandoned.
    ///
    /// A StatefulSet that creates no pod says why only in an Event: while there is no pod,
    /// its `FailedCreate` Events since `since` are read every [`FAILED_CREATE_CHECK`], and one
    /// ends the wait (a quota, Pod Security admission or a webhook refuses the pod until
    /// someone acts).
    async fn wait_ready(
        &self,
        name: &str,
        port: u16,
        since: k8s_openapi::jiff::Timestamp,
        pending: &PendingReason,
    ) -> Result<PodIdentity, BackendError> {
        let pod = pod_name(name);
        let pod = pod.as_str();
        let mut watch = self.pod_watch.subscribe(pod);
        let mut last_logged = None;
        let set_pending = |reason: Option<(String, String)>| {
            if let Ok(mut slot) = pending.lock() {
                *slot = reason;
            }
        };
        let mut look_for_failed_create: Option<Instant> = None;
        loop {
            watch_failed(&self.cfg, &watch.health())?;
            match watch.seen() {
                Seen::Unknown => {}
                Seen::Absent => {
                    set_pending(Some(workload::no_pod_reason(name)));
                    look_for_failed_create
                        .get_or_insert_with(|| Instant::now() + FAILED_CREATE_CHECK);
                }
                Seen::Present(p) => {
                    look_for_failed_create = None;
                    set_pending(workload::pending_reason(&p));
                    match pod_state(&p, port) {
                        PodState::Ready(identity) => return Ok(identity),
                        PodState::Failing { reason, message } => {
                            return Err(BackendError::Blocked {
                                blocker: workload::start_blocker(&reason, &message),
                                message,
                            })
                        }
                        PodState::NotReady => {
                            let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                            if phase != last_logged {
                                debug!(pod, ?phase, "waiting for compute pod");
                                last_logged = phase;
                            }
                        }
                    }
                }
            }
            tokio::select! {
                () = watch.changed() => {}
                () = sleep_until_opt(look_for_failed_create) => {
                    look_for_failed_create = Some(Instant::now() + FAILED_CREATE_CHECK);
                    if let Some(message) = self.failed_create(name, since).await {
                        return Err(BackendError::Blocked {
                            blocker: workload::start_blocker("FailedCreate", &message),
                            message,
                        });
                    }
                }
            }
        }
    }

    /// The message of the StatefulSet controller's latest `FailedCreate` Event for `name` seen
    /// since `since`. Best effort: a failed read leaves the wait to its timeout, as before.
    async fn failed_create(
        &self,
        name: &str,
        since: k8s_openapi::jiff::Timestamp,
    ) -> Option<String> {
        let lp = ListParams::default().fields(&format!(
            "involvedObject.kind=StatefulSet,involvedObject.name={name},reason=FailedCreate"
        ));
        let list = match self.core_events.list(&lp).await {
            Ok(list) => list,
            Err(e) => {
                debug!(statefulset = name, error = %e, "could not read its events");
                return None;
            }
        };
        list.items
            .into_iter()
            .filter_map(|e| Some((workload::last_seen(&e)?, e.message?)))
            .filter(|(seen, _)| *seen >= since)
            .max_by_key(|(seen, _)| *seen)
            .map(|(_, message)| message)
    }

    /// Watches pod `pod` until it is gone.
    async fn wait_gone(&self, pod: &str) -> Result<(), BackendError> {
        let mut watch = self.pod_watch.subscribe(pod);
        loop {
            watch_failed(&self.cfg, &watch.health())?;
            if matches!(watch.seen(), Seen::Absent) {
                return Ok(());
            }
            watch.changed().await;
        }
    }

    /// Best effort: the status is for people, so a failure is logged and the wake goes on.
    /// Endpoints from the config file have no resource; their 404 is expected.
    async fn set_status(&self, id: &EndpointId, state: EndpointState, addr: Option<&ComputeAddr>) {
        self.set_status_failed(id, state, addr, None).await
    }

    /// Scales the StatefulSet of a start nobody waits for any more back to 0 and, once it is,
    /// says Suspended, with `failure` (if the start failed) under the Failed condition.
    async fn undo_start(&self, id: &EndpointId, name: &str, failure: Option<(String, String)>) {
        match self.scale(name, 0, None).await {
            Ok(_) => {
                self.set_status_failed(id, EndpointState::Suspended, None, failure)
                    .await
            }
            Err(e) => warn!(error = %e, "could not scale the compute back to 0"),
        }
    }

    /// [`Self::set_status`], with the condition Failed set to `failure` (reason, message).
    async fn set_status_failed(
        &self,
        id: &EndpointId,
        state: EndpointState,
        addr: Option<&ComputeAddr>,
        failure: Option<(String, String)>,
    ) {
        self.write_status(id, state, addr, failure, None).await
    }

    /// [`Self::set_status_failed`] by a start of `started_from`: once the resource's spec (as
    /// the patch returns it) is the one that route was made from, its `metadata.generation`
    /// is the `observedGeneration` from then on. A manager that has not written an
    /// endpoint's status yet (after a restart) leaves `observedGeneration` as stored and
    /// dates every condition now.
    async fn write_status(
        &self,
        id: &EndpointId,
        state: EndpointState,
        addr: Option<&ComputeAddr>,
        failure: Option<(String, String)>,
        started_from: Option<&Route>,
    ) {
        if !self.cfg.update_status {
            return;
        }
        let written = self
            .written
            .lock()
            .ok()
            .and_then(|w| w.get(id).cloned())
            .unwrap_or_default();
        let mut status = PgwakeEndpointStatus::new(
            state,
            addr.map(|a| a.to_string()),
            failure.clone(),
            &k8s_openapi::jiff::Timestamp::now().to_string(),
            written.status.as_ref(),
        );
        status.observed_generation = written.observed_generation;
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let patch = Patch::Merge(json!({ "status": status }));
        match self.endpoints.patch_status(id.as_str(), &pp, &patch).await {
            Ok(endpoint) => {
                let observed_generation = match started_from {
                    Some(route)
                        if endpoint.endpoint_config().ok().map(Route::from).as_ref()
                            == Some(route) =>
                    {
                        endpoint.metadata.generation
                    }
                    _ => written.observed_generation,
                };
                if let Ok(mut w) = self.written.lock() {
                    w.insert(
                        id.clone(),
                        Written {
                            status: Some(status),
                            observed_generation,
                        },
                    );
                }
                if let Some((reason, message)) = &failure {
                    self.failure_event(&endpoint, reason, message).await;
                }
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                debug!(endpoint = %id, "no PgwakeEndpoint to write status to");
            }
            Err(e) => warn!(endpoint = %id, error = %e, "could not update PgwakeEndpoint status"),
        }
    }

    /// A Warning Event on the endpoint (`kubectl describe pgwe`, `kubectl get events`), for a
    /// start that failed or a compute that went away. Best effort, like the status.
    async fn failure_event(&self, endpoint: &PgwakeEndpoint, reason: &str, message: &str) {
        let event = workload::failure_event(endpoint, reason, message, &self.namespace);
        if let Err(e) = self.events.create(&PostParams::default(), &event).await {
            warn!(endpoint = endpoint.metadata.name.as_deref().unwrap_or_default(), error = %e, "could not record an Event");
        }
    }

    async fn stop(&self, id: &EndpointId, name: &str) -> Result<(), BackendError> {
        if self.scale(name, 0, None).await? == Scaled::Changed {
            self.set_status(id, EndpointState::Suspending, None).await;
        }
        let pod = pod_name(name);
        match tokio::time::timeout(self.cfg.stop_timeout, self.wait_gone(&pod)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(BackendError::io(
                    format!(
                        "kubernetes: pod {pod} still there after {:?}",
                        self.cfg.stop_timeout
                    ),
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ))
            }
        }
        self.set_status(id, EndpointState::Suspended, None).await;
        Ok(())
    }
}

/// Whether a wait on the shared pod watch gives up on the watch's failures: at once on a
/// permanent one (RBAC), after `api_retries` in a row otherwise, as [`Retry`] does for one
/// call. The watch itself goes on retrying for the other waiters.
fn watch_failed(cfg: &KubernetesConfig, health: &Health) -> Result<(), BackendError> {
    match &health.error {
        Some(ApiError::Permanent(e)) => Err(BackendError::Config(format!(
            "kubernetes: watch compute pods: {e}"
        ))),
        Some(ApiError::Transient(e)) if health.failures > cfg.api_retries => Err(BackendError::io(
            format!(
                "kubernetes: watch compute pods (gave up after {} tries)",
                health.failures
            ),
            std::io::Error::other(e.clone()),
        )),
        _ => Ok(()),
    }
}

/// The Failed condition's reason and message for a start that failed with `e`: Kubernetes'
/// own reason where the pod had one (ImagePullBackOff, CrashLoopBackOff, ...).
fn failure_reason(e: &BackendError) -> (String, String) {
    match e {
        BackendError::StartFailed { status, log_tail } => (status.clone(), log_tail.clone()),
        BackendError::Blocked { blocker, message } => {
            (blocker.reason().to_string(), message.clone())
        }
        BackendError::StartTimeout(_) => ("StartTimedOut".to_string(), e.to_string()),
        other => ("StartFailed".to_string(), other.to_string()),
    }
}

/// Why a starting compute's pod is not ready yet (reason, message), as last seen.
type PendingReason = std::sync::Mutex<Option<(String, String)>>;

/// Scales the StatefulSet back to 0 when dropped while armed (a failed or abandoned start).
struct ScaleDownOnDrop {
    shared: Option<Arc<Shared>>,
    name: String,
    id: EndpointId,
    /// Why the start failed, for the status; `None` for an abandoned start (its clients gave
    /// up), whose status then says why its pod was still not ready (`pending`).
    failure: Option<(String, String)>,
    pending: Arc<PendingReason>,
    /// With `start_timeout`: an abandoned start then goes on until its pod is ready or the
    /// deadline passes.
    go_on: Option<GoOn>,
}

/// How an abandoned start goes on (`start_timeout`).
#[derive(Clone, Copy)]
struct GoOn {
    /// The compute's port.
    port: u16,
    /// The start's deadline.
    deadline: Instant,
    /// When the start began, by the wall clock less [`CLOCK_SLACK`], for `wait_ready`.
    since: k8s_openapi::jiff::Timestamp,
}

impl Drop for ScaleDownOnDrop {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (name, id) = (std::mem::take(&mut self.name), self.id.clone());
        if let (None, Some(go_on)) = (&self.failure, self.go_on) {
            if go_on.deadline > Instant::now() {
                let slot = Arc::new(tokio::sync::Mutex::new(false));
                if let Ok(mut c) = shared.continued.lock() {
                    c.insert(id.clone(), Arc::clone(&slot));
                }
                let pending = Arc::clone(&self.pending);
                let span = tracing::info_span!("continued_start", endpoint = %id);
                rt.spawn(continue_start(shared, id, name, go_on, pending, slot).instrument(span));
                return;
            }
        }
        let failure = self.failure.take().or_else(|| {
            let (reason, message) = self.pending.lock().ok()?.take()?;
            Some((
                reason,
                format!("not ready when the start was abandoned: {message}"),
            ))
        });
        rt.spawn(
            async move {
                warn!("compute start failed or was abandoned; scaling it back to 0");
                shared.undo_start(&id, &name, failure).await;
            }
            .instrument(tracing::info_span!("abandoned_start", endpoint = %self.id)),
        );
    }
}

/// An abandoned start that goes on (`start_timeout`): waits for the pod to be ready until
/// `deadline`, then, unless a new start took it over meanwhile, scales the StatefulSet back to
/// 0 (nobody is waiting for it; what was slow, the image pull or initdb, is done for the next
/// wake) and writes the status.
async fn continue_start(
    shared: Arc<Shared>,
    id: EndpointId,
    name: String,
    go_on: GoOn,
    pending: Arc<PendingReason>,
    slot: Arc<tokio::sync::Mutex<bool>>,
) {
    let GoOn {
        port,
        deadline,
        since,
    } = go_on;
    info!("no client waits for the compute any more; its start goes on");
    let outcome =
        tokio::time::timeout_at(deadline, shared.wait_ready(&name, port, since, &pending)).await;
    // Held until the StatefulSet is back at 0, so that a start taking over waits for that.
    let taken_over = slot.lock().await;
    if *taken_over {
        debug!("a new start took the compute over");
        return;
    }
    if let Ok(mut c) = shared.continued.lock() {
        if c.get(&id).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            c.remove(&id);
        }
    }
    let failure = match &outcome {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(failure_reason(e)),
        Err(_) => {
            let why = pending
                .lock()
                .ok()
                .and_then(|mut p| p.take())
                .map(|(reason, message)| format!("{reason}: {message}"))
                .unwrap_or_else(|| "no reason given".into());
            Some((
                "StartTimedOut".to_string(),
                format!("not ready within start_timeout: {why}"),
            ))
        }
    };
    match &failure {
        None => info!("compute ready, with no client waiting; scaling it back to 0"),
        Some((reason, _)) => warn!(reason, "continued start failed; scaling it back to 0"),
    }
    shared.undo_start(&id, &name, failure).await;
    drop(taken_over);
}

/// A running compute pod.
struct PodCompute {
    shared: Arc<Shared>,
    id: EndpointId,
    name: String,
    addr: ComputeAddr,
    identity: PodIdentity,
    /// Set by `stop`: the pod going away is then this backend's doing, not an exit.
    stopping: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl RunningCompute for PodCompute {
    fn addr(&self) -> &ComputeAddr {
        &self.addr
    }

    async fn stop(&self) -> Result<(), BackendError> {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared.stop(&self.id, &self.name).await
    }

    /// Once the pod is gone on its own (evicted, OOM-killed, deleted, not ready for
    /// `not_ready_grace`), the manager marks the compute suspended. The StatefulSet is still
    /// at 1, though: its controller would recreate the pod, which would then run with no idle
    /// timer, and the status would keep the old address. So it is scaled to 0 first (a
    /// replacement pod gets a clean shutdown; the next client starts it again, with an idle
    /// timer), and the status says Suspended, with the reason under the Failed condition.
    async fn exited(&self) {
        let pod = pod_name(&self.name);
        let why = monitor_pod(&self.shared, &pod, &self.identity)
            .instrument(tracing::info_span!("compute_pod", endpoint = %self.id))
            .await;
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            info!(endpoint = %self.id, pod, why, "compute pod gone");
            return;
        }
        warn!(endpoint = %self.id, pod, why, "compute pod gone on its own; scaling its statefulset to 0");
        if let Err(e) = self.shared.scale(&self.name, 0, None).await {
            warn!(endpoint = %self.id, error = %e, "could not scale the exited compute to 0");
        }
        self.shared
            .set_status_failed(
                &self.id,
                EndpointState::Suspended,
                None,
                Some(("ComputeExited".into(), why)),
            )
            .await;
    }
}

/// Resolves, with the reason, once the pod that was ready as `identity` is no longer usable.
/// Failures of the watch are not an exit: it retries them for as long as it takes, since an
/// unreachable API server says nothing about the pod.
async fn monitor_pod(shared: &Shared, pod: &str, identity: &PodIdentity) -> String {
    let grace = shared.cfg.not_ready_grace;
    let mut watch = shared.pod_watch.subscribe(pod);
    let mut not_ready_since: Option<Instant> = None;
    loop {
        // Read, so that `changed` waits for the next failure or recovery.
        watch.health();
        match watch.seen() {
            Seen::Unknown => {}
            Seen::Absent => return "pod deleted".into(),
            Seen::Present(p) => {
                if p.metadata.uid.as_deref() != Some(identity.uid.as_str()) {
                    return "pod replaced".into();
                }
                if p.metadata.deletion_timestamp.is_some() {
                    return "pod terminating".into();
                }
                match pod_state(&p, identity.addr.port()) {
                    PodState::Ready(now) if now.addr != identity.addr => {
                        return format!("pod address changed to {}", now.addr)
                    }
                    PodState::Ready(now) if now.restarts != identity.restarts => {
                        return "container restarted".into()
                    }
                    PodState::Ready(_) => not_ready_since = None,
                    PodState::Failing { reason, .. } => return reason,
                    PodState::NotReady => {
                        not_ready_since.get_or_insert_with(Instant::now);
                    }
                }
            }
        }
        let deadline = not_ready_since.map(|t| t + grace);
        tokio::select! {
            () = watch.changed() => {}
            () = sleep_until_opt(deadline) => return format!("not ready for {grace:?}"),
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod deploy_tests;

#[cfg(test)]
mod mock_api;

#[cfg(test)]
mod fake_pods;

#[cfg(test)]
mod provision_tests;
