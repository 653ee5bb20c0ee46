//! The idle tracker: per running compute, a timer that suspends it once nothing has used it
//! for its idle timeout, and a watch that notices when it goes away on its own. Both belong to
//! one start attempt and end when the endpoint moves past it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::warn;

use super::phase::SuspendReason;
use super::slot::Slot;
use super::Manager;
use crate::RunningCompute;

/// Starts tracking `compute`, the running compute of `slot`'s start `attempt`.
pub(super) fn track(
    manager: &Arc<Manager>,
    slot: &Arc<Slot>,
    attempt: u64,
    compute: Arc<dyn RunningCompute>,
) {
    tokio::spawn(crash_watch(
        Arc::clone(manager),
        Arc::clone(slot),
        attempt,
        compute,
    ));
    tokio::spawn(idle_timer(Arc::clone(manager), Arc::clone(slot), attempt));
}

/// A compute that goes away on its own is marked suspended, so the next client starts a new
/// one instead of being sent to a dead address.
async fn crash_watch(
    manager: Arc<Manager>,
    slot: Arc<Slot>,
    attempt: u64,
    compute: Arc<dyn RunningCompute>,
) {
    compute.exited().await;
    let crashed = slot.lock().exited(attempt);
    if crashed {
        warn!(endpoint = %slot.id, "compute exited unexpectedly; it will be started again on the next connect");
        slot.crashes.fetch_add(1, Ordering::Relaxed);
        manager
            .metrics
            .crashes
            .with_label_values(&[slot.id.as_str()])
            .inc();
        slot.notify();
        manager.slots.release_if_forgotten(&slot);
    }
}

/// Suspends the compute once it has been idle (nobody attached or waiting) for its idle
/// timeout; every change to the slot re-reads the deadline (a session's end restarts it).
async fn idle_timer(manager: Arc<Manager>, slot: Arc<Slot>, attempt: u64) {
    let mut rx = slot.changed.subscribe();
    loop {
        rx.borrow_and_update();
        let Some(deadline) = slot.lock().idle_deadline(attempt) else {
            return;
        };
        match deadline {
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(d) => {
                        manager.try_suspend(&slot, Some(attempt), SuspendReason::Idle).await;
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
}
