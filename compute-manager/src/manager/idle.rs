//! The idle tracker: per running compute, a timer that suspends it once nothing has used it
//! for its idle timeout, and a watch that notices when it goes away on its own. Both belong to
//! one start attempt and end when the endpoint moves past it. A frozen compute has a third:
//! the deep-sleep timer of its freeze.

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
    track_idle(manager, slot, attempt);
}

/// Starts the idle timer alone: for a thawed compute, whose exit watch has run all along.
pub(super) fn track_idle(manager: &Arc<Manager>, slot: &Arc<Slot>, attempt: u64) {
    tokio::spawn(idle_timer(Arc::clone(manager), Arc::clone(slot), attempt));
}

/// Stops the compute of freeze number `freeze` at `at`, unless a wake (or anything else)
/// ends that freeze first.
pub(super) fn track_deep_sleep(
    manager: &Arc<Manager>,
    slot: &Arc<Slot>,
    freeze: u64,
    at: tokio::time::Instant,
) {
    let manager = Arc::clone(manager);
    let slot = Arc::clone(slot);
    tokio::spawn(async move {
        let mut rx = slot.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if !slot.lock().in_freeze(freeze) {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {
                    manager.deep_sleep(&slot, Some(freeze), SuspendReason::DeepSleep).await;
                    return;
                }
                r = rx.changed() => if r.is_err() { return },
            }
        }
    });
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
                        // Done once it suspended or froze the compute: a thaw (which keeps the
                        // attempt) may have made it Running again already, with a timer of
                        // its own.
                        if manager.try_suspend(&slot, Some(attempt), SuspendReason::Idle).await {
                            return;
                        }
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
