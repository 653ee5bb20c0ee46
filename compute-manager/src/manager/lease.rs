//! What a proxied session holds while it is attached to a compute: the lease that keeps the
//! compute from being suspended under it. Where the session is counted depends on where the
//! manager runs: in this process (the slot's attached count), or in a remote manager (the
//! proxy replica's own counts, which it reports to that manager).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use pgwake_router::EndpointId;

use super::slot::{Slot, Slots};
use crate::ComputeAddr;

/// What a client gets from a wake ([`Manager::wake`](crate::Manager::wake),
/// [`ComputeWaker::wake`](crate::ComputeWaker::wake)): where to connect, and the lease that
/// keeps the compute from being suspended for as long as the connection lives.
pub struct Attached {
    pub addr: ComputeAddr,
    pub lease: SessionLease,
    /// True if this client had to wait for a start.
    pub cold: bool,
}

/// Held by every proxied connection for as long as it lives; dropping it ends the session's
/// claim on the compute (the last one dropped starts the idle timer).
pub enum SessionLease {
    /// Tracks nothing: for computes that are never suspended (static routes).
    Detached,
    /// Counted in this process's manager.
    Local(LocalSession),
    /// Counted in this proxy replica, which reports its counts to a remote manager.
    Remote(RemoteSession),
}

/// A session attached to a compute of the in-process manager.
pub struct LocalSession {
    slot: Arc<Slot>,
    /// To drop the slot of an endpoint that left the routing table when its last session ends
    /// (after a crash; a running compute goes through its idle timer first).
    slots: Weak<Slots>,
}

impl LocalSession {
    /// Takes over one count of `slot`'s attached sessions (the caller added it under the lock).
    pub(super) fn new(slot: Arc<Slot>, slots: &Arc<Slots>) -> Self {
        Self {
            slot,
            slots: Arc::downgrade(slots),
        }
    }
}

impl Drop for LocalSession {
    fn drop(&mut self) {
        let (now_idle, removable) = {
            let mut st = self.slot.lock();
            (st.detach(), st.removable())
        };
        if now_idle {
            self.slot.notify();
        }
        if removable {
            if let Some(slots) = self.slots.upgrade() {
                slots.release_if_forgotten(&self.slot);
            }
        }
    }
}

/// Sessions one proxy replica holds, per endpoint, for its activity reports to a remote
/// manager. An endpoint whose count drops to 0 stays in the map until a report has carried
/// that 0 to the manager.
#[derive(Default)]
pub(crate) struct Sessions(Mutex<HashMap<EndpointId, usize>>);

impl Sessions {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<EndpointId, usize>> {
        // Plain counters: carrying on after a panic elsewhere beats losing every report.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn open(self: &Arc<Self>, endpoint: &EndpointId) -> RemoteSession {
        *self.lock().entry(endpoint.clone()).or_insert(0) += 1;
        RemoteSession {
            sessions: Arc::clone(self),
            endpoint: endpoint.clone(),
        }
    }
}

/// One proxied session counted in its replica's reports, uncounted on drop.
pub struct RemoteSession {
    sessions: Arc<Sessions>,
    endpoint: EndpointId,
}

impl Drop for RemoteSession {
    fn drop(&mut self) {
        if let Some(n) = self.sessions.lock().get_mut(&self.endpoint) {
            *n = n.saturating_sub(1);
        }
    }
}
