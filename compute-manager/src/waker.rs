//! What the proxy needs from a compute manager, in-process or remote: a running compute for a
//! route. Without `[compute] manager_url` the proxy uses the in-process manager ([`Manager`],
//! or [`LeaderOnly`] under leader election); with it, [`RemoteManager`](crate::RemoteManager).

use std::sync::Arc;

use async_trait::async_trait;
use pgwake_router::Route;

use crate::{Attached, Leadership, Manager, WakeError};

/// Wakes computes for the proxy. (Not `Waker`: that is `std::task::Waker`.)
#[async_trait]
pub trait ComputeWaker: Send + Sync + 'static {
    async fn wake(&self, route: &Arc<Route>) -> Result<Attached, WakeError>;

    /// The running compute for `route` if getting it needs no waiting, no task and no I/O
    /// ([`Manager::wake_now`]); `None` means: call [`ComputeWaker::wake`].
    fn wake_now(&self, _route: &Arc<Route>) -> Option<Attached> {
        None
    }
}

#[async_trait]
impl ComputeWaker for Arc<Manager> {
    async fn wake(&self, route: &Arc<Route>) -> Result<Attached, WakeError> {
        Manager::wake(self, route).await
    }

    fn wake_now(&self, route: &Arc<Route>) -> Option<Attached> {
        Manager::wake_now(self, route)
    }
}

/// The in-process manager of a process that elects a leader: wakes only while leading, like
/// its API.
pub struct LeaderOnly {
    pub manager: Arc<Manager>,
    pub leadership: Leadership,
}

#[async_trait]
impl ComputeWaker for LeaderOnly {
    async fn wake(&self, route: &Arc<Route>) -> Result<Attached, WakeError> {
        if !self.leadership.is_leader() {
            return Err(WakeError::NotLeader);
        }
        Manager::wake(&self.manager, route).await
    }

    fn wake_now(&self, route: &Arc<Route>) -> Option<Attached> {
        // Not leading: `wake` says so.
        self.leadership
            .is_leader()
            .then(|| Manager::wake_now(&self.manager, route))
            .flatten()
    }
}
