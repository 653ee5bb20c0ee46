//! The processes of one local cluster, whoever their parent is now, found through /proc.
//!
//! Postgres puts every child of the postmaster in its own session (`setsid` in
//! `InitPostmasterChild`), so a process group or session does not hold a cluster together:
//! a signal to the postmaster's group reaches the postmaster alone. What every process of a
//! cluster shares is its working directory, the data directory. A process counts as the
//! cluster's only if it also runs a `postgres` executable, so an operator's shell sitting in
//! the directory is never touched.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::warn;

/// How often /proc is looked at while waiting for a cluster's processes to go.
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterProc {
    pub pid: i32,
    /// The postmaster keeps its command line; its children retitle themselves `postgres: ...`.
    pub postmaster: bool,
}

/// Live (not zombie) postgres processes whose working directory is `dir`.
pub fn cluster_procs(dir: &Path) -> Vec<ClusterProc> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir))
        .filter(|pid| runs_postgres(*pid) && !zombie(*pid))
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some(ClusterProc {
                pid,
                postmaster: !cmdline.starts_with(b"postgres: "),
            })
        })
        .collect()
}

fn runs_postgres(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
        // A binary replaced by a package upgrade shows as "postgres (deleted)".
        exe.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == "postgres" || n == "postgres (deleted)")
    })
}

/// A zombie has exited; it only waits for its parent (or init) to reap it.
fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_some_and(|state| state == "Z")
    })
}

/// Returns once no process of the cluster in `dir` is left. A live postmaster (one a previous
/// pgwake left behind, shutting down since that pgwake died) is waited for: it is finishing a
/// checkpoint. Children whose postmaster is gone are killed: they are orphans that serve
/// nobody, and while they hold the old shared memory no new postmaster can start. Unbounded:
/// the caller bounds it (the manager's `wake_timeout`).
pub async fn clear(dir: &Path) {
    let mut waited_for: Option<i32> = None;
    let mut killed: Vec<i32> = Vec::new();
    loop {
        let procs = cluster_procs(dir);
        if procs.is_empty() {
            return;
        }
        if let Some(pm) = procs.iter().find(|p| p.postmaster) {
            if waited_for != Some(pm.pid) {
                warn!(dir = %dir.display(), pid = pm.pid, "a previous postmaster of this data directory is still running (left by a pgwake that stopped without stopping it?); waiting for it to exit");
                waited_for = Some(pm.pid);
            }
        } else {
            let new: Vec<i32> = procs
                .iter()
                .map(|p| p.pid)
                .filter(|p| !killed.contains(p))
                .collect();
            kill_orphans(dir, &new);
            killed.extend(new);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Kills what is left of a cluster whose postmaster has exited.
fn kill_orphans(dir: &Path, pids: &[i32]) {
    if pids.is_empty() {
        return;
    }
    warn!(dir = %dir.display(), ?pids, "killing the orphaned processes of a postmaster that died");
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_in_the_directory_that_is_not_postgres_is_not_the_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .current_dir(dir.path())
            .spawn()
            .unwrap();
        assert_eq!(cluster_procs(dir.path()), Vec::new());
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
    }
}
