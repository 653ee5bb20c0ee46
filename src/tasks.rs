//! Every background task of a running pgwake, grouped by the stage of shutdown that stops it.
//! Nothing is spawned detached: a task belongs to a stage, sees that stage's cancellation, and
//! [`Tasks::stop`] waits for all of the stage's tasks before shutdown moves on.

use std::future::Future;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tracing::error;

/// When a task stops during shutdown, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// The client listener: stopping it starts the drain, which ends with the last session.
    Serve,
    /// What must outlive the drain: the peer cancel listener (the sessions of a draining
    /// replica stay cancellable from the others) and the activity reports (the last one tells
    /// the manager that the sessions are gone).
    AfterDrain,
    /// Routing sources, adoption of running computes, the certificate watcher: nothing for
    /// them to do once the manager stops its computes.
    Sources,
    /// Leader election: the Lease is released only after this replica's computes are stopped,
    /// so that a successor never acts on computes still being stopped.
    Election,
    /// The admin and manager API listeners: health checks answer (readyz 503) until the end.
    Last,
}

const STAGES: usize = 5;

impl Stage {
    fn index(self) -> usize {
        match self {
            Stage::Serve => 0,
            Stage::AfterDrain => 1,
            Stage::Sources => 2,
            Stage::Election => 3,
            Stage::Last => 4,
        }
    }
}

struct Group {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

pub(crate) struct Tasks {
    groups: [Group; STAGES],
}

impl Tasks {
    pub(crate) fn new() -> Self {
        Self {
            groups: std::array::from_fn(|_| Group {
                cancel: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        }
    }

    /// Runs `task(shutdown)` in `stage`; `shutdown` resolves when that stage is stopped. A
    /// panic ends only this task and is logged with `name`.
    pub(crate) fn spawn<F>(
        &self,
        stage: Stage,
        name: &'static str,
        task: impl FnOnce(WaitForCancellationFutureOwned) -> F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        let group = &self.groups[stage.index()];
        let inner = tokio::spawn(task(group.cancel.clone().cancelled_owned()));
        group.tracker.spawn(async move {
            if let Err(e) = inner.await {
                error!(task = name, error = %e, "background task failed");
            }
        });
    }

    /// Signals the stage's tasks to stop and waits until all of them have.
    pub(crate) async fn stop(&self, stage: Stage) {
        let group = &self.groups[stage.index()];
        group.cancel.cancel();
        group.tracker.close();
        group.tracker.wait().await;
    }
}

impl Drop for Tasks {
    /// A pgwake dropped without a shutdown still stops its tasks (without waiting for them).
    fn drop(&mut self) {
        for g in &self.groups {
            g.cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn a_stage_stops_only_its_own_tasks_and_waits_for_them() {
        let tasks = Tasks::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        for (stage, name) in [(Stage::Serve, "serve"), (Stage::Last, "admin")] {
            let log = Arc::clone(&log);
            tasks.spawn(stage, name, |shutdown| async move {
                shutdown.await;
                // Stopping takes a while; `stop` must wait for it.
                tokio::task::yield_now().await;
                log.lock().unwrap().push(name);
            });
        }
        tasks.stop(Stage::Serve).await;
        assert_eq!(*log.lock().unwrap(), ["serve"]);
        tasks.stop(Stage::Last).await;
        assert_eq!(*log.lock().unwrap(), ["serve", "admin"]);
    }

    #[tokio::test]
    async fn a_panicking_task_does_not_hang_its_stage() {
        let tasks = Tasks::new();
        tasks.spawn(Stage::Sources, "boom", |_| async { panic!("boom") });
        tasks.stop(Stage::Sources).await;
    }

    #[tokio::test]
    async fn dropping_stops_every_stage() {
        let tasks = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tasks.spawn(Stage::Election, "elector", |shutdown| async move {
            shutdown.await;
            let _ = tx.send(());
        });
        drop(tasks);
        rx.await.expect("the task saw its shutdown");
    }
}
