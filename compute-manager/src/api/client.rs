//! The proxy's side of the API: wakes through a remote manager, and reports this replica's
//! sessions to it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pgwake_router::{EndpointId, Route};
use tracing::{debug, warn};

use super::types::{ActivityReport, ErrorBody, WakeResponse};
use crate::manager::Sessions;
use crate::{
    Attached, ComputeAddr, ComputeWaker, SessionLease, StartBlocker, WakeError, WakeErrorKind,
};

/// The proxy's side of the API.
pub struct RemoteManager {
    base: String,
    http: reqwest::Client,
    wake_timeout: Duration,
    replica: String,
    pub(super) sessions: Arc<Sessions>,
}

impl RemoteManager {
    /// `base` is e.g. `http://pgwake-manager:9188`. `wake_timeout` bounds each request (the
    /// manager bounds the wake itself by its own `wake_timeout`).
    pub fn new(base: &str, wake_timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()?,
            wake_timeout,
            replica: format!("{:016x}", rand::random::<u64>()),
            sessions: Arc::default(),
        })
    }

    /// This replica's id in activity reports.
    pub fn replica_id(&self) -> &str {
        &self.replica
    }

    /// Sessions this replica holds on `endpoint` (woken through it and not yet closed).
    pub fn sessions(&self, endpoint: &EndpointId) -> usize {
        self.sessions.lock().get(endpoint).copied().unwrap_or(0)
    }

    /// Reports this replica's sessions every `interval` until `shutdown` resolves, then once
    /// more (by then the proxy has drained, so that last report releases its computes at once
    /// instead of after the ttl). A failed report is logged and the next tick carries the
    /// counts again; sessions never wait on reports.
    pub async fn run_reports(&self, interval: Duration, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        // `interval` panics on zero; the config refuses 0, this keeps the library total.
        let interval = interval.max(Duration::from_millis(1));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            let last = tokio::select! {
                _ = &mut shutdown => true,
                _ = tick.tick() => false,
            };
            match self.report_activity(interval).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    // One miss is covered by the ttl; a run of them may let computes go idle.
                    if failures >= 2 {
                        warn!(error = %e, failures, "activity report to the compute manager failed");
                    } else {
                        debug!(error = %e, "activity report to the compute manager failed");
                    }
                }
            }
            if last {
                return;
            }
        }
    }

    /// Sends one report: every endpoint with sessions, and a 0 for each that dropped to none
    /// since the last report that got through. Nothing is sent when there is nothing to say.
    pub async fn report_activity(&self, interval: Duration) -> Result<(), reqwest::Error> {
        let counts: Vec<(EndpointId, usize)> = self
            .sessions
            .lock()
            .iter()
            .map(|(id, n)| (id.clone(), *n))
            .collect();
        if counts.is_empty() {
            return Ok(());
        }
        let report = ActivityReport {
            replica: self.replica.clone(),
            ttl_ms: u64::try_from(interval.saturating_mul(3).as_millis()).unwrap_or(u64::MAX),
            endpoints: counts.iter().map(|(id, n)| (id.to_string(), *n)).collect(),
        };
        self.http
            .post(format!("{}/v1/activity", self.base))
            // Bounded so that a hung manager delays the next report by at most about one
            // interval (but never so short that a busy loopback times out).
            .timeout(interval.max(Duration::from_secs(1)))
            .json(&report)
            .send()
            .await?
            .error_for_status()?;
        // The manager has the 0s now. An endpoint that went to 0 after the snapshot keeps its
        // entry, so the next report carries that 0.
        let mut live = self.sessions.lock();
        for (id, sent) in counts {
            if sent == 0 && live.get(&id) == Some(&0) {
                live.remove(&id);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl ComputeWaker for RemoteManager {
    /// Retries what a manager failover or restart looks like (connection refused or reset,
    /// `not_leader`, `shutting_down`) with backoff until `wake_timeout`: the client is held
    /// across the handover instead of getting an error for it. Answers from a working manager
    /// (its own wake timeout, limits, unknown endpoints) are final.
    async fn wake(&self, route: &Arc<Route>) -> Result<Attached, WakeError> {
        let deadline = crate::manager::deadline(tokio::time::Instant::now(), self.wake_timeout);
        let mut backoff = Duration::from_millis(50);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.wake_once(route, left).await {
                Err(
                    e @ (WakeError::ManagerUnavailable(_)
                    | WakeError::NotLeader
                    | WakeError::ShuttingDown),
                ) => {
                    let now = tokio::time::Instant::now();
                    if now + backoff >= deadline {
                        return Err(e);
                    }
                    debug!(endpoint = %route.endpoint, error = %e, ?backoff, "compute manager not available; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
                }
                other => return other,
            }
        }
    }
}

/// Longest pause between two tries of an unavailable manager: a Lease handover takes about
/// the retry period (2 s), so waiting longer than this would only add latency.
const MAX_RETRY_BACKOFF: Duration = Duration::from_millis(500);

impl RemoteManager {
    async fn wake_once(&self, route: &Arc<Route>, left: Duration) -> Result<Attached, WakeError> {
        let url = format!("{}/v1/endpoints/{}/wake", self.base, route.endpoint);
        let resp = self
            .http
            .post(&url)
            // The manager bounds a wake by its own wake_timeout; the margin lets its 57P03
            // answer arrive instead of a client-side timeout.
            .timeout(left + Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| WakeError::ManagerUnavailable(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| WakeError::ManagerUnavailable(e.to_string()))?;
        if status.is_success() {
            let w: WakeResponse = serde_json::from_slice(&body)
                .map_err(|e| WakeError::ManagerUnavailable(format!("bad wake response: {e}")))?;
            return Ok(Attached {
                addr: ComputeAddr::new(w.address),
                lease: SessionLease::Remote(self.sessions.open(&route.endpoint)),
                cold: w.cold,
            });
        }
        let e: ErrorBody = serde_json::from_slice(&body)
            .map_err(|e| WakeError::ManagerUnavailable(format!("HTTP {status}: {e}")))?;
        Err(match WakeErrorKind::from_wire(&e.kind) {
            Some(WakeErrorKind::Timeout) => match e.blocker {
                Some(b) => WakeError::Stalled {
                    after: self.wake_timeout,
                    blocker: StartBlocker::from_wire(&b.reason, b.detail.as_deref()),
                },
                None => WakeError::Timeout(self.wake_timeout),
            },
            Some(WakeErrorKind::QueueFull) => WakeError::QueueFull,
            Some(WakeErrorKind::RateLimited) => WakeError::RateLimited,
            Some(WakeErrorKind::ShuttingDown) => WakeError::ShuttingDown,
            Some(WakeErrorKind::NotLeader) => WakeError::NotLeader,
            // A backend's failure (its message is client-safe already) or a kind this
            // version does not know.
            _ => WakeError::Remote {
                retryable: e.retryable,
                message: e.message,
            },
        })
    }
}
