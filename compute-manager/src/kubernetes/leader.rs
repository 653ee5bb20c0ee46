//! Leader election on a `coordination.k8s.io/v1` Lease, so that several compute managers may
//! run and exactly one of them wakes and suspends computes.
//!
//! Why a leader at all: each manager keeps its own idle timers and its own view of which
//! computes run. Two active managers would scale a StatefulSet to 0 while the other is waking
//! it, or scale back a failed wake under the other's clients.
//!
//! The protocol is client-go's (`tools/leaderelection`), so it behaves as operators expect:
//! - **acquire**: every `retry_period`, read the Lease. Absent: create it (409: someone else was
//!   faster, read again next round). Held by another: take it over only once its record has
//!   not changed for its `leaseDurationSeconds`, measured on *this* process's clock from the
//!   moment this process first saw that record. Renew times written by another node's clock are
//!   never compared with ours, so clock skew between nodes cannot shorten a lease.
//! - **write**: always a replace (PUT) carrying the `resourceVersion` that was read, so two
//!   candidates racing for one expired Lease cannot both win (the loser gets 409 and reads
//!   again).
//! - **renew**: every `retry_period`. A leader that has not renewed within `renew_deadline` of
//!   its last successful renewal gives up. Because `renew_deadline < lease_duration` and any
//!   other candidate can only start counting after our last write, the deposed leader stops
//!   before anyone else may take over.
//! - **release**: on a clean shutdown the leader clears `holderIdentity` and sets
//!   `leaseDurationSeconds: 1`, so a standby takes over within one `retry_period` instead of
//!   waiting a whole lease duration. The compute pods keep running through a handover; the new
//!   leader adopts them (`Manager::adopt_when_ready`), so their idle timers run there.
//!
//! Losing the lease is final for this process ([`LeaderElector::run`] returns an error): a
//! deposed leader's idle timers and in-flight wakes would otherwise keep acting on computes that
//! the new leader now owns. Ending the process (Kubernetes restarts it as a standby) is the
//! one way to be sure none of that state survives.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease as CoordinationLease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::FIELD_MANAGER;

/// Where and how long leadership is held. Defaults are client-go's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderConfig {
    /// The Lease's name, in the backend's namespace.
    pub lease_name: String,
    /// This candidate's name in `holderIdentity`; unique per process (the pod name).
    pub identity: String,
    /// How long a Lease that stopped changing stays with its holder.
    pub lease_duration: Duration,
    /// How long a leader keeps trying to renew before it gives up.
    pub renew_deadline: Duration,
    /// Time between two reads (standby) or renewals (leader).
    pub retry_period: Duration,
}

pub const DEFAULT_LEASE_NAME: &str = "pgwake-manager";
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

impl LeaderConfig {
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            lease_name: DEFAULT_LEASE_NAME.into(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// Every problem at once. The ordering of the three durations is what makes a deposed
    /// leader stop before a successor starts.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.lease_name.is_empty() {
            errors.push("lease_name must not be empty".into());
        }
        if self.identity.is_empty() {
            errors.push("identity must not be empty".into());
        }
        if self.lease_duration.as_secs() < 1 || self.lease_duration.subsec_nanos() != 0 {
            errors.push("lease_duration must be whole seconds, at least 1s".into());
        }
        if self.renew_deadline >= self.lease_duration {
            errors.push("renew_deadline must be shorter than lease_duration".into());
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            errors.push("retry_period must be more than 0 and shorter than renew_deadline".into());
        }
        errors
    }
}

/// Where this process stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaderState {
    /// Waiting for the Lease: serve nothing that changes a compute.
    Standby,
    Leading,
    /// Was leader and could not renew: stop at once (the process ends).
    Lost,
}

/// A read-only view of [`LeaderState`], for the manager API and readiness.
#[derive(Debug, Clone)]
pub struct Leadership(watch::Receiver<LeaderState>);

impl Leadership {
    /// For a manager without election: always the leader.
    pub fn always() -> Self {
        Self(watch::channel(LeaderState::Leading).1)
    }

    /// A view driven by hand (tests, or another election mechanism).
    pub fn manual(initial: LeaderState) -> (watch::Sender<LeaderState>, Self) {
        let (tx, rx) = watch::channel(initial);
        (tx, Self(rx))
    }

    pub fn state(&self) -> LeaderState {
        *self.0.borrow()
    }

    pub fn is_leader(&self) -> bool {
        self.state() == LeaderState::Leading
    }

    /// The next state, or `None` once the elector has stopped.
    pub async fn changed(&mut self) -> Option<LeaderState> {
        self.0.changed().await.ok()?;
        Some(*self.0.borrow_and_update())
    }

    /// Resolves once this process leads (at once without election): `true`; or `false` if it
    /// never will (leadership lost, or the elector stopped while on standby).
    pub async fn leading(&self) -> bool {
        let mut rx = self.0.clone();
        let state = rx
            .wait_for(|s| *s != LeaderState::Standby)
            .await
            .map(|s| *s);
        matches!(state, Ok(LeaderState::Leading))
    }

    /// Resolves when leadership is lost; never for a manager that releases it cleanly or has
    /// no election.
    pub async fn lost(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|s| *s == LeaderState::Lost).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "lease {lease}: not renewed within {deadline:?}; this manager is no longer the leader"
    )]
    RenewDeadline { lease: String, deadline: Duration },
    #[error("lease {lease}: taken over by {holder}; this manager is no longer the leader")]
    TakenOver { lease: String, holder: String },
}

/// What one read-and-write round found.
enum Attempt {
    Acquired,
    Held { holder: String },
    Failed(kube::Error),
}

/// The record last read, and when (on our clock) it was first seen in that version.
struct Observed {
    lease: CoordinationLease,
    at: Instant,
}

pub struct LeaderElector {
    api: Api<CoordinationLease>,
    cfg: LeaderConfig,
    state: watch::Sender<LeaderState>,
    observed: Option<Observed>,
}

impl LeaderElector {
    /// An elector for the Lease `cfg.lease_name` in `namespace`, starting on standby.
    pub fn new(client: Client, namespace: &str, cfg: LeaderConfig) -> (Self, Leadership) {
        let (state, rx) = watch::channel(LeaderState::Standby);
        (
            Self {
                api: Api::namespaced(client, namespace),
                cfg,
                state,
                observed: None,
            },
            Leadership(rx),
        )
    }

    /// Campaigns until leader, leads until `shutdown` resolves (then releases the Lease and
    /// returns `Ok`), or fails to renew (then returns the error: the caller must stop acting as
    /// manager at once; see the module docs).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), LeaderError> {
        tokio::pin!(shutdown);
        let renewed = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            at = self.acquire() => at,
        };
        info!(lease = %self.cfg.lease_name, identity = %self.cfg.identity, "became the leader");
        self.state.send_replace(LeaderState::Leading);
        let lost = tokio::select! {
            _ = &mut shutdown => None,
            e = self.keep_leading(renewed) => Some(e),
        };
        match lost {
            Some(e) => {
                self.state.send_replace(LeaderState::Lost);
                error!(error = %e, "lost leadership");
                Err(e)
            }
            None => {
                self.release().await;
                self.state.send_replace(LeaderState::Standby);
                Ok(())
            }
        }
    }

    /// Rounds until the Lease is ours; returns when the winning round started.
    async fn acquire(&mut self) -> Instant {
        let mut last_holder = None;
        loop {
            let start = Instant::now();
            match tokio::time::timeout(self.cfg.renew_deadline, self.try_acquire_or_renew(false))
                .await
            {
                Ok(Attempt::Acquired) => return start,
                Ok(Attempt::Held { holder }) => {
                    if last_holder.as_ref() != Some(&holder) {
                        info!(lease = %self.cfg.lease_name, %holder, "standing by: the lease is held");
                        last_holder = Some(holder);
                    }
                }
                Ok(Attempt::Failed(e)) => {
                    debug!(lease = %self.cfg.lease_name, error = %e, "could not acquire the lease")
                }
                Err(_) => warn!(lease = %self.cfg.lease_name, "lease request timed out"),
            }
            tokio::time::sleep(self.cfg.retry_period).await;
        }
    }

    /// Renews every `retry_period` until a renewal misses its deadline (counted from the start
    /// of the last successful one) or someone else holds the Lease.
    async fn keep_leading(&mut self, mut renewed: Instant) -> LeaderError {
        loop {
            tokio::time::sleep(self.cfg.retry_period).await;
            let deadline = renewed + self.cfg.renew_deadline;
            loop {
                let start = Instant::now();
                if start >= deadline {
                    return self.deadline_missed();
                }
                match tokio::time::timeout_at(deadline, self.try_acquire_or_renew(true)).await {
                    Err(_) => return self.deadline_missed(),
                    Ok(Attempt::Acquired) => {
                        renewed = start;
                        break;
                    }
                    Ok(Attempt::Held { holder }) => {
                        return LeaderError::TakenOver {
                            lease: self.cfg.lease_name.clone(),
                            holder,
                        }
                    }
                    Ok(Attempt::Failed(e)) => {
                        warn!(lease = %self.cfg.lease_name, error = %e, "could not renew the lease")
                    }
                }
                let next = Instant::now() + self.cfg.retry_period;
                tokio::time::sleep_until(next.min(deadline)).await;
            }
        }
    }

    fn deadline_missed(&self) -> LeaderError {
        LeaderError::RenewDeadline {
            lease: self.cfg.lease_name.clone(),
            deadline: self.cfg.renew_deadline,
        }
    }

    fn post_params() -> PostParams {
        PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        }
    }

    fn observe(&mut self, lease: CoordinationLease, at: Instant) {
        self.observed = Some(Observed { lease, at });
    }

    /// One round: read, then create, take over or renew if we may. `leading`: we hold the
    /// Lease, so any other holder means it was taken from us (no expiry wait applies).
    async fn try_acquire_or_renew(&mut self, leading: bool) -> Attempt {
        let now = Instant::now();
        let name = self.cfg.lease_name.clone();
        let current = match self.api.get_opt(&name).await {
            Err(e) => return Attempt::Failed(e),
            Ok(None) => {
                let lease = CoordinationLease {
                    metadata: ObjectMeta {
                        name: Some(name),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        // The first term, not a transition.
                        lease_transitions: Some(0),
                        ..self.record(&LeaseSpec::default(), false)
                    }),
                };
                return match self.api.create(&Self::post_params(), &lease).await {
                    Ok(created) => {
                        self.observe(created, now);
                        Attempt::Acquired
                    }
                    Err(e) => Attempt::Failed(e),
                };
            }
            Ok(Some(lease)) => lease,
        };
        let changed = self.observed.as_ref().is_none_or(|o| {
            o.lease.metadata.resource_version != current.metadata.resource_version
                || o.lease.spec != current.spec
        });
        if changed {
            self.observe(current.clone(), now);
        }
        let at = self.observed.as_ref().map_or(now, |o| o.at);
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.cfg.identity;
        if !holder.is_empty() && !mine {
            if leading {
                return Attempt::Held { holder };
            }
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .filter(|s| *s > 0)
                .map_or(self.cfg.lease_duration, Duration::from_secs);
            if now < at + duration {
                return Attempt::Held { holder };
            }
            info!(lease = %self.cfg.lease_name, %holder, "the lease expired; taking over");
        }
        let mut next = current;
        next.metadata.managed_fields = None;
        next.spec = Some(self.record(&spec, mine));
        match self
            .api
            .replace(&self.cfg.lease_name, &Self::post_params(), &next)
            .await
        {
            Ok(written) => {
                self.observe(written, now);
                Attempt::Acquired
            }
            Err(e) => Attempt::Failed(e),
        }
    }

    /// The record that makes us the holder: a takeover (`!mine`) starts a new term.
    fn record(&self, old: &LeaseSpec, mine: bool) -> LeaseSpec {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let transitions = old.lease_transitions.unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(secs(self.cfg.lease_duration)),
            acquire_time: if mine {
                old.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if mine { transitions } else { transitions + 1 }),
            ..old.clone()
        }
    }

    /// Hands the Lease back so that a standby need not wait for it to expire. Best effort: on
    /// failure the Lease simply expires.
    async fn release(&mut self) {
        let Some(observed) = self.observed.take() else {
            return;
        };
        let mut lease = observed.lease;
        let spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        lease.metadata.managed_fields = None;
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..spec
        });
        let pp = Self::post_params();
        let release = self.api.replace(&self.cfg.lease_name, &pp, &lease);
        match tokio::time::timeout(self.cfg.renew_deadline, release).await {
            Ok(Ok(_)) => info!(lease = %self.cfg.lease_name, "released the lease"),
            Ok(Err(e)) => {
                warn!(lease = %self.cfg.lease_name, error = %e, "could not release the lease; it expires on its own")
            }
            Err(_) => {
                warn!(lease = %self.cfg.lease_name, "releasing the lease timed out; it expires on its own")
            }
        }
    }
}

/// The label the leading manager keeps on its own pod; Service `pgwake-manager` selects it, so
/// the proxies reach the leader while every replica stays Ready (a standby that is not Ready
/// would keep a Deployment's rollout from ever completing).
pub const LABEL_LEADER: &str = "pgwake.io/leader";

/// Keeps [`LABEL_LEADER`]`: "true"` on pod `pod` while `leadership` says this process leads,
/// and removes it otherwise: at start (a restarted container keeps its pod, and the pod its
/// labels), on losing leadership, when the elector stops and when `shutdown` resolves.
///
/// Best effort: a failed patch is tried again every `retry`, and a stale label is harmless (a
/// standby's API answers 503 `not_leader`, which the proxies retry). A 404 means this process
/// does not run in pod `pod` (outside Kubernetes, or a wrong name): it stops labelling.
pub async fn label_leader_pod(
    client: Client,
    namespace: &str,
    pod: &str,
    mut leadership: Leadership,
    retry: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    tokio::pin!(shutdown);
    // What the pod carries as far as this process knows; unknown at first.
    let mut labelled: Option<bool> = None;
    loop {
        let want = leadership.is_leader();
        if labelled != Some(want) {
            match set_leader_label(&pods, pod, want).await {
                Ok(()) => labelled = Some(want),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    warn!(pod, "no pod of this name to label as leader; the manager Service cannot select the leader");
                    return;
                }
                Err(e) => {
                    warn!(pod, error = %e, leader = want, "could not update the leader label; retrying")
                }
            }
        }
        let settled = labelled == Some(want);
        tokio::select! {
            state = leadership.changed() => {
                if state.is_none() {
                    break;
                }
            }
            () = tokio::time::sleep(retry), if !settled => {}
            () = &mut shutdown => break,
        }
    }
    if labelled != Some(false) {
        if let Err(e) = set_leader_label(&pods, pod, false).await {
            warn!(pod, error = %e, "could not remove the leader label");
        }
    }
}

/// Merge-patches [`LABEL_LEADER`] on `pod`: `"true"`, or null (removed).
async fn set_leader_label(pods: &Api<Pod>, pod: &str, leader: bool) -> Result<(), kube::Error> {
    let value = if leader { json!("true") } else { Value::Null };
    let patch = json!({ "metadata": { "labels": { LABEL_LEADER: value } } });
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    pods.patch(pod, &pp, &Patch::Merge(&patch)).await?;
    info!(pod, leader, "leader label updated");
    Ok(())
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

#[cfg(test)]
#[path = "leader_tests.rs"]
mod tests;
