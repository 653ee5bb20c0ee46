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

use super::cgroup::ComputeCgroup;

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
    proc_state(pid) == Some('Z')
}

/// The state letter of `pid` (`R`, `S`, `T` for stopped, `Z`...), `None` if it is gone.
pub fn proc_state(pid: i32) -> Option<char> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| state_of_stat(&stat))
}

/// The state field of a `/proc/<pid>/stat` line. The command name before it is in
/// parentheses and may itself hold spaces and parentheses, so the field is found after the
/// last `)`.
fn state_of_stat(stat: &str) -> Option<char> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.strip_prefix(' ')?.chars().next()
}

/// Stopped by a signal (`T`), as a frozen compute's processes are.
pub fn stopped(pid: i32) -> bool {
    proc_state(pid) == Some('T')
}

/// How long a freeze may take to see every process of the cluster stopped. SIGSTOP takes
/// effect when the kernel next schedules the process, well within this.
pub(super) const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Stops every process of the cluster in `dir` whose postmaster is `postmaster` (SIGSTOP),
/// and returns them once each is seen stopped. The postmaster goes first so that it forks no
/// new child meanwhile; the children are then looked up again until a pass finds none left
/// running (one forked just before the postmaster stopped). Returns `None`, with everything
/// it stopped running again, if the postmaster is gone or the processes do not stop in time.
pub async fn freeze(dir: &Path, postmaster: i32) -> Option<Vec<i32>> {
    let deadline = tokio::time::Instant::now() + FREEZE_TIMEOUT;
    if kill(Pid::from_raw(postmaster), Signal::SIGSTOP).is_err() {
        return None;
    }
    let mut frozen = vec![postmaster];
    loop {
        let new: Vec<i32> = cluster_procs(dir)
            .into_iter()
            .map(|p| p.pid)
            .filter(|p| !frozen.contains(p))
            .collect();
        for &pid in &new {
            // A child that exited meanwhile is simply not part of the freeze.
            if kill(Pid::from_raw(pid), Signal::SIGSTOP).is_ok() {
                frozen.push(pid);
            }
        }
        let settled = new.is_empty()
            && frozen
                .iter()
                .all(|&p| matches!(proc_state(p), Some('T' | 'Z') | None));
        if settled {
            // The postmaster itself must be there: a gone one is a crashed compute.
            if proc_state(postmaster) != Some('T') {
                thaw(&frozen);
                return None;
            }
            return Some(frozen);
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(dir = %dir.display(), "the processes of the compute did not all stop in time; leaving it running");
            thaw(&frozen);
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Lets `pids` (a [`freeze`]'s list, postmaster first) run again: children first, so that a
/// postmaster that wakes up to a signal finds its children running to answer it.
pub fn thaw(pids: &[i32]) {
    for &pid in pids.iter().rev() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
    }
}

/// The memory a cluster holds: the sum of its processes' proportional set size (`Pss` of
/// `/proc/<pid>/smaps_rollup`). Pss splits each shared page between the processes that map
/// it, so shared_buffers, which every backend maps, counts once for the cluster instead of
/// once per process as a sum of RSS would. A process whose smaps cannot be read counts its
/// RSS instead (an overestimate, never an underestimate). `None` if nothing could be read.
pub fn memory(pids: &[i32]) -> Option<u64> {
    let mut total: Option<u64> = None;
    for &pid in pids {
        let bytes = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|t| pss_of_rollup(&t))
            .or_else(|| rss_of_statm(pid));
        if let Some(b) = bytes {
            total = Some(total.unwrap_or(0).saturating_add(b));
        }
    }
    total
}

/// The `Pss:` line of an `smaps_rollup`, in bytes.
fn pss_of_rollup(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        _ => None,
    }
}

fn rss_of_statm(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    pages.checked_mul(page)
}

/// Lets a cluster run when dropped: the guard of the task that owns its postmaster. If that
/// task goes away without a stop (its runtime shut down, as at the end of a test, or pgwake
/// leaving on an error path), `kill_on_drop` kills the postmaster; a frozen cluster's
/// children would then stay frozen forever, orphaned. Let run, they see their postmaster gone
/// and exit. Does nothing (and reads nothing under /proc) unless `maybe_frozen` says a freeze
/// began and no thaw followed: every postmaster exit drops one.
pub struct ThawOnDrop {
    dir: std::path::PathBuf,
    cgroup: Option<ComputeCgroup>,
    maybe_frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ThawOnDrop {
    pub fn new(
        dir: std::path::PathBuf,
        cgroup: Option<ComputeCgroup>,
        maybe_frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Self {
            dir,
            cgroup,
            maybe_frozen,
        }
    }
}

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        if !self.maybe_frozen.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if let Some(cg) = self.cgroup.as_ref().filter(|cg| cg.freezing()) {
            cg.thaw();
        }
        thaw_stopped(&self.dir, &cluster_procs(&self.dir));
    }
}

/// Finds the clusters under `data_root` that a previous pgwake left frozen (it was killed
/// while they were: nothing else would ever let them run again) and lets them run and shut
/// down: a SIGCONT to each of their processes and a fast shutdown (SIGINT) to the
/// postmaster, the one its death signal (`PR_SET_PDEATHSIG`) already queued. The next start
/// of the endpoint waits for that shutdown like for any postmaster left behind ([`clear`]).
/// Returns the data directories it thawed.
pub fn thaw_left_frozen(data_root: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(data_root) else {
        return Vec::new();
    };
    let mut thawed = Vec::new();
    for dir in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        if !dir.join("postmaster.pid").is_file() {
            continue;
        }
        if thaw_stopped(&dir, &cluster_procs(&dir)) {
            thawed.push(dir);
        }
    }
    thawed
}

/// Thaws the cluster in `dir`, whose processes are `procs`, if any of them is stopped, and
/// asks its postmaster for a fast shutdown. Returns whether it did.
fn thaw_stopped(dir: &Path, procs: &[ClusterProc]) -> bool {
    if !procs.iter().any(|p| stopped(p.pid)) {
        return false;
    }
    warn!(dir = %dir.display(), pids = ?procs.iter().map(|p| p.pid).collect::<Vec<_>>(), "found a compute left frozen by a previous pgwake; letting it run and shut down");
    for p in procs.iter().filter(|p| !p.postmaster) {
        let _ = kill(Pid::from_raw(p.pid), Signal::SIGCONT);
    }
    for p in procs.iter().filter(|p| p.postmaster) {
        let _ = kill(Pid::from_raw(p.pid), Signal::SIGINT);
        let _ = kill(Pid::from_raw(p.pid), Signal::SIGCONT);
    }
    true
}

/// Thaws the frozen cgroup `cg` of the cluster in `dir`, whose processes are `procs`, and
/// asks its postmaster for a fast shutdown.
pub fn thaw_cgroup(dir: &Path, cg: &ComputeCgroup, procs: &[ClusterProc]) {
    warn!(dir = %dir.display(), cgroup = %cg.dir().display(), "found a compute left frozen in its cgroup by a previous pgwake; letting it run and shut down");
    for p in procs.iter().filter(|p| p.postmaster) {
        let _ = kill(Pid::from_raw(p.pid), Signal::SIGINT);
    }
    cg.thaw();
}

/// Returns once no process of the cluster in `dir` is left. A live postmaster (one a previous
/// pgwake left behind, shutting down since that pgwake died) is waited for: it is finishing a
/// checkpoint. Children whose postmaster is gone are killed: they are orphans that serve
/// nobody, and while they hold the old shared memory no new postmaster can start. Unbounded:
/// the caller bounds it (the manager's `wake_timeout`).
pub async fn clear(dir: &Path, cgroup: Option<&ComputeCgroup>) {
    let mut waited_for: Option<i32> = None;
    let mut killed: Vec<i32> = Vec::new();
    loop {
        let procs = cluster_procs(dir);
        if procs.is_empty() {
            return;
        }
        // A frozen postmaster never exits by itself (a pgwake killed while it was frozen,
        // before the next one thawed what it left: see [`thaw_left_frozen`]).
        thaw_stopped(dir, &procs);
        // Nor does one in a frozen cgroup, whose processes show no `T`.
        if let Some(cg) = cgroup.filter(|cg| cg.freezing()) {
            thaw_cgroup(dir, cg, &procs);
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
    fn the_state_is_read_after_the_last_parenthesis_of_the_name() {
        assert_eq!(state_of_stat("42 (postgres) T 1 42 42 0"), Some('T'));
        assert_eq!(state_of_stat("42 (a) b) S 1 2"), Some('S'));
        assert_eq!(state_of_stat("42 (x (y)) Z 1"), Some('Z'));
        assert_eq!(state_of_stat("42 (no state)"), None);
        assert_eq!(state_of_stat("garbage"), None);
        assert_eq!(state_of_stat(""), None);
    }

    #[test]
    fn pss_is_read_in_bytes_and_anything_odd_is_none() {
        let rollup = "55d0c4a5e000-7ffd1a7f9000 ---p 00000000 00:00 0   [rollup]\n\
                      Rss:               20480 kB\n\
                      Pss:                9120 kB\n\
                      Pss_Anon:           1200 kB\n";
        assert_eq!(pss_of_rollup(rollup), Some(9120 * 1024));
        assert_eq!(pss_of_rollup("Rss: 1 kB\n"), None);
        assert_eq!(pss_of_rollup("Pss: x kB\n"), None);
        assert_eq!(pss_of_rollup("Pss: 12 MB\n"), None);
        assert_eq!(pss_of_rollup("Pss: 99999999999999999999 kB\n"), None);
    }

    #[tokio::test]
    async fn a_frozen_process_is_stopped_until_thawed_and_its_memory_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .current_dir(dir.path())
            .spawn()
            .unwrap();
        let pid = sleeper.id() as i32;
        // Not a postgres, so no child is looked for: the postmaster alone is frozen.
        let t = std::time::Instant::now();
        let frozen = freeze(dir.path(), pid).await.unwrap();
        let froze = t.elapsed();
        assert_eq!(frozen, vec![pid]);
        assert!(stopped(pid));
        assert!(memory(&frozen).is_some_and(|m| m > 0));
        let t = std::time::Instant::now();
        thaw(&frozen);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while stopped(pid) {
            assert!(std::time::Instant::now() < deadline, "still stopped");
            std::thread::yield_now();
        }
        eprintln!("SIGSTOP freeze {froze:?}, thaw {:?}", t.elapsed());
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        assert_eq!(freeze(dir.path(), pid).await, None, "a reaped process");
    }

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
