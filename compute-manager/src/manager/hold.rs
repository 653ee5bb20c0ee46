//! Holding an endpoint still while something outside a session reads its data: a branch copies
//! its parent's data directory, a delete removes it. A running compute is kept running by a
//! session lease (its data is read through Postgres); a suspended one is kept from starting,
//! since its files are read directly and a postgres starting on them mid-copy would change
//! them under the copy. A frozen one (light sleep) is stopped first, then held suspended.

use std::sync::{Arc, Weak};
use std::time::Duration;

use pgwake_router::EndpointId;
use tokio::time::Instant;

use super::slot::{Slot, Slots, State};
use super::{LocalSession, Manager};
use crate::{ComputeAddr, WakeError};

/// What [`Manager::hold`] found and now holds.
pub enum Held {
    /// The compute runs at `addr`; `lease` counts as an attached session, so no idle or
    /// requested suspend stops it until the lease is dropped.
    Running {
        addr: ComputeAddr,
        lease: LocalSession,
    },
    /// Nothing runs, and no wake starts a compute until this is dropped (clients wait, within
    /// their wake timeout).
    Suspended(SuspendedHold),
}

/// Keeps a suspended endpoint from starting for as long as it lives.
pub struct SuspendedHold {
    slot: Arc<Slot>,
    slots: Weak<Slots>,
}

impl Drop for SuspendedHold {
    fn drop(&mut self) {
        let removable = {
            let mut st = self.slot.lock();
            st.held -= 1;
            st.removable()
        };
        // Clients that waited for the hold go round and start the compute.
        self.slot.notify();
        if removable {
            if let Some(slots) = self.slots.upgrade() {
                slots.release_if_forgotten(&self.slot);
            }
        }
    }
}

impl Manager {
    /// Holds `id` as it is: running (with a lease) or suspended (no start until the hold is
    /// dropped). An endpoint that is starting or suspending is waited for, at most `within`
    /// ([`WakeError::Timeout`]). Never starts a compute.
    pub async fn hold(
        self: &Arc<Self>,
        id: &EndpointId,
        within: Duration,
    ) -> Result<Held, WakeError> {
        let deadline = super::deadline(Instant::now(), within);
        loop {
            let frozen;
            if self.closing.load(std::sync::atomic::Ordering::Acquire) {
                return Err(WakeError::ShuttingDown);
            }
            let slot = self.slot(id);
            let mut rx = slot.changed.subscribe();
            rx.borrow_and_update();
            {
                let mut st = slot.lock();
                if st.gone {
                    drop(st);
                    self.slots.drop_gone(&slot);
                    continue;
                }
                if let Some(addr) = st.attach() {
                    drop(st);
                    return Ok(Held::Running {
                        addr,
                        lease: LocalSession::new(Arc::clone(&slot), &self.slots),
                    });
                }
                if matches!(st.state, State::Suspended | State::Failed { .. }) {
                    st.held += 1;
                    drop(st);
                    return Ok(Held::Suspended(SuspendedHold {
                        slot,
                        slots: Arc::downgrade(&self.slots),
                    }));
                }
                frozen = matches!(st.state, State::Frozen { .. });
            }
            // A frozen postgres has unwritten pages in its shared memory, so its files are no
            // consistent copy: stop it (as deep sleep would), then hold it suspended. A
            // suspend that another path already began is waited for below like any other.
            if frozen && self.suspend(id).await {
                continue;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(WakeError::Timeout(within));
            }
        }
    }
}
