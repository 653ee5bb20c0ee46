//! cgroup v2 freezing for light sleep: each compute runs in a cgroup of its own under
//! pgwake's cgroup, `<own>/pgwake-computes/<data root key>/<endpoint id>`, and is frozen by
//! writing `1` to its `cgroup.freeze`. Unlike SIGSTOP this needs no list of processes (a child
//! forked during the freeze is frozen too) and leaves no process in state `T`: a frozen task
//! sleeps in the kernel's freezer, seen only in the cgroup's `cgroup.events` (`frozen 1`).
//!
//! The data root's key (a hash of its path) keeps apart the computes of several pgwakes that
//! share one cgroup, so that a pgwake's crash recovery thaws only what it left itself.
//! `cgroup.freeze` is a core file: no controller needs enabling, so a delegated cgroup
//! (systemd's `Delegate=yes`) or pgwake's being root on a writable cgroupfs is all it takes.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tracing::warn;

/// Where compute cgroups go: `[local] cgroup`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CgroupSetting {
    /// Under pgwake's own cgroup when it can create one there; SIGSTOP otherwise.
    #[default]
    Auto,
    /// SIGSTOP always.
    Off,
    /// Under this cgroup directory (in the cgroup v2 filesystem); SIGSTOP if that fails.
    Path(PathBuf),
}

impl<'de> Deserialize<'de> for CgroupSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            p if p.starts_with('/') => Ok(Self::Path(PathBuf::from(p))),
            other => Err(serde::de::Error::custom(format!(
                "cgroup must be \"auto\", \"off\" or an absolute path, not {other:?}"
            ))),
        }
    }
}

/// The directory name under pgwake's own cgroup.
const COMPUTES: &str = "pgwake-computes";
/// How often `cgroup.events` is read while waiting for a freeze to complete.
const EVENTS_POLL: Duration = Duration::from_millis(1);

/// The mount point of the cgroup v2 filesystem in a `/proc/self/mountinfo`, with the root of
/// the hierarchy it shows (not `/` inside some containers without a cgroup namespace).
pub fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace().skip(3);
        let root = unescape(fields.next()?);
        let mount = unescape(fields.next()?);
        Some((PathBuf::from(mount), root))
    })
}

/// mountinfo writes space, tab, newline and backslash as octal escapes (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 path of a `/proc/<pid>/cgroup` (its `0::` line).
pub fn own_cgroup(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim_end)
        .filter(|p| p.starts_with('/'))
}

/// Whether a `cgroup.events` says the cgroup is frozen (`frozen 1`); `None` if it has no
/// such line (a kernel before 5.2).
pub fn frozen_of_events(events: &str) -> Option<bool> {
    events.lines().find_map(|l| match l.split_once(' ')? {
        ("frozen", v) => Some(v.trim() == "1"),
        _ => None,
    })
}

/// The parent of this pgwake's compute cgroups, once it is known to work.
#[derive(Debug)]
pub struct Cgroups {
    dir: PathBuf,
}

impl Drop for Cgroups {
    /// Removes the computes' cgroups that hold no process any more (those of computes whose
    /// postmaster task ended without a stop: the task removes its cgroup only after a stop)
    /// and then the parent, so that a test's or a moved data root's leave nothing behind. A
    /// cgroup with processes in it cannot be removed, and is left to the next start.
    fn drop(&mut self) {
        for (_, cg) in self.existing() {
            let _ = std::fs::remove_dir(&cg.dir);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The cgroup of one compute.
#[derive(Debug, Clone)]
pub struct ComputeCgroup {
    dir: PathBuf,
}

impl Cgroups {
    /// Finds where compute cgroups go and checks that they work: creates the directory and a
    /// probe cgroup in it, freezes and thaws it, and runs a short process into it the way a
    /// postmaster is (its `cgroup.procs` opened here, written after the fork, as the user
    /// `uid`/`gid`). `Err` says why not, for the log.
    pub fn probe(
        setting: &CgroupSetting,
        data_root: &Path,
        run_as: Option<(u32, u32)>,
    ) -> Result<Self, String> {
        let parent = match setting {
            CgroupSetting::Off => return Err("[local] cgroup = \"off\"".into()),
            CgroupSetting::Path(p) => p.clone(),
            CgroupSetting::Auto => {
                let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
                    .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
                let (mount, root) =
                    cgroup2_mount(&mountinfo).ok_or("no cgroup v2 filesystem is mounted")?;
                let cgroup = std::fs::read_to_string("/proc/self/cgroup")
                    .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
                let own = own_cgroup(&cgroup).ok_or("pgwake is in no cgroup v2 cgroup")?;
                let own = own.strip_prefix(root.trim_end_matches('/')).unwrap_or(own);
                mount.join(own.trim_start_matches('/')).join(COMPUTES)
            }
        };
        let dir = parent.join(root_key(data_root));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let this = Self { dir };
        // Dropped on failure, which removes the directory again.
        let probe = this.compute(".probe");
        probe.create()?;
        let result = probe.try_it(run_as);
        probe.remove();
        result.map(|()| this)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn compute(&self, endpoint: &str) -> ComputeCgroup {
        ComputeCgroup {
            dir: self.dir.join(endpoint),
        }
    }

    /// The compute cgroups a previous pgwake left, by endpoint id.
    pub fn existing(&self) -> Vec<(String, ComputeCgroup)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("cgroup.freeze").is_file())
            .filter_map(|e| {
                let id = e.file_name().to_str()?.to_string();
                Some((id, ComputeCgroup { dir: e.path() }))
            })
            .collect()
    }
}

/// A stable short name for a data root (FNV-1a of its path): the same after a restart.
fn root_key(data_root: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data_root.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("root-{h:016x}")
}

impl ComputeCgroup {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn create(&self) -> Result<(), String> {
        match std::fs::create_dir(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                Err(format!("creating {}: {e}", self.dir.display()))
            }
            _ => Ok(()),
        }
    }

    /// `cgroup.procs`, opened for the `pre_exec` of a process that is to start in this
    /// cgroup (see [`join`]).
    pub fn procs_file(&self) -> std::io::Result<OwnedFd> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))?;
        Ok(f.into())
    }

    fn try_it(&self, run_as: Option<(u32, u32)>) -> Result<(), String> {
        self.set_frozen(true)
            .and_then(|()| self.set_frozen(false))
            .map_err(|e| format!("writing {}/cgroup.freeze: {e}", self.dir.display()))?;
        let fd = self
            .procs_file()
            .map_err(|e| format!("opening {}/cgroup.procs: {e}", self.dir.display()))?;
        let mut cmd = std::process::Command::new("true");
        cmd.stdin(std::process::Stdio::null());
        if let Some((uid, gid)) = run_as {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let raw = fd.as_raw_fd();
        // SAFETY: `join` is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || join(raw));
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("moving a process into {}: {e}", self.dir.display()))?;
        let _ = child.wait();
        Ok(())
    }

    pub fn set_frozen(&self, frozen: bool) -> std::io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.freeze"))?
            .write_all(if frozen { b"1" } else { b"0" })
    }

    /// Whether every process of the cgroup is frozen (`cgroup.events`), as opposed to asked
    /// to be (`cgroup.freeze`).
    pub fn frozen(&self) -> Option<bool> {
        let events = std::fs::read_to_string(self.dir.join("cgroup.events")).ok()?;
        frozen_of_events(&events)
    }

    /// Whether the cgroup is asked to be frozen.
    pub fn freezing(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1")
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Freezes the cgroup and returns its processes once the kernel reports it frozen; `None`,
    /// with the cgroup thawed, if that takes longer than `timeout`.
    pub async fn freeze(&self, timeout: Duration) -> Option<Vec<i32>> {
        let deadline = tokio::time::Instant::now() + timeout;
        if let Err(e) = self.set_frozen(true) {
            warn!(cgroup = %self.dir.display(), error = %e, "could not freeze the compute's cgroup");
            return None;
        }
        loop {
            if self.frozen() == Some(true) {
                return Some(self.pids());
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(cgroup = %self.dir.display(), "the compute's cgroup did not freeze in time; leaving it running");
                self.thaw();
                return None;
            }
            tokio::time::sleep(EVENTS_POLL).await;
        }
    }

    pub fn thaw(&self) {
        if let Err(e) = self.set_frozen(false) {
            warn!(cgroup = %self.dir.display(), error = %e, "could not thaw the compute's cgroup");
        }
    }

    /// Removes the cgroup once its processes are gone (a cgroup with processes cannot be).
    pub fn remove(&self) {
        match std::fs::remove_dir(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                warn!(cgroup = %self.dir.display(), error = %e, "could not remove the compute's cgroup");
            }
            _ => {}
        }
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is open as `fd` ("0" is
/// the writer itself). Only `write`: it runs between fork and exec. The kernel checks the
/// permission with the credentials of the opener (since 5.16), so the file opened by pgwake
/// works after the switch to the run-as user.
pub fn join(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: writes one byte from a static buffer to a file descriptor.
    if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_hybrid_and_unified_layouts() {
        let hybrid = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n\
                      42 25 0:39 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".into()))
        );
        let unified = "33 28 0:29 / /sys/fs/cgroup rw,nosuid,nodev shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some((PathBuf::from("/sys/fs/cgroup"), "/".into()))
        );
        let container = "1 0 0:29 /kubepods/pod1 /sys/fs/cgroup\\040x ro - cgroup2 cgroup ro\n";
        assert_eq!(
            cgroup2_mount(container),
            Some((PathBuf::from("/sys/fs/cgroup x"), "/kubepods/pod1".into()))
        );
        assert_eq!(cgroup2_mount(&hybrid.replace("cgroup2", "cgroup")), None);
        assert_eq!(cgroup2_mount("garbage\n\n - cgroup2"), None);
        assert_eq!(unescape("a\\134b\\04"), "a\\b\\04");
    }

    #[test]
    fn the_own_cgroup_is_the_v2_line() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/system.slice/pgwake.service\n";
        assert_eq!(own_cgroup(hybrid), Some("/system.slice/pgwake.service"));
        assert_eq!(own_cgroup("0::/\n"), Some("/"));
        assert_eq!(own_cgroup("4:memory:/x\n"), None);
        assert_eq!(own_cgroup("0::\n"), None);
    }

    #[test]
    fn frozen_is_read_from_cgroup_events() {
        assert_eq!(frozen_of_events("populated 1\nfrozen 1\n"), Some(true));
        assert_eq!(frozen_of_events("populated 1\nfrozen 0\n"), Some(false));
        assert_eq!(frozen_of_events("populated 0\n"), None);
    }

    #[test]
    fn the_setting_is_auto_off_or_an_absolute_path() {
        let parse = |s: &str| {
            CgroupSetting::deserialize(
                serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s),
            )
        };
        assert_eq!(parse("auto").unwrap(), CgroupSetting::Auto);
        assert_eq!(parse("off").unwrap(), CgroupSetting::Off);
        assert_eq!(
            parse("/sys/fs/cgroup/x").unwrap(),
            CgroupSetting::Path("/sys/fs/cgroup/x".into())
        );
        assert!(parse("relative").is_err());
    }

    #[test]
    fn a_directory_that_is_no_cgroup_is_refused_and_left_as_it_was() {
        let not_cgroupfs = tempfile::tempdir().unwrap();
        let setting = CgroupSetting::Path(not_cgroupfs.path().join("computes"));
        let why = Cgroups::probe(&setting, Path::new("/data"), None).unwrap_err();
        assert!(why.contains("cgroup.freeze"), "{why}");
        let left: Vec<_> = std::fs::read_dir(not_cgroupfs.path().join("computes"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let off = Cgroups::probe(&CgroupSetting::Off, Path::new("/data"), None);
        assert!(off.is_err());
    }

    /// Freezes a process through a cgroup under pgwake's own where this machine lets it
    /// (root on a writable cgroupfs); skipped, and says so, where it does not.
    #[tokio::test]
    async fn a_process_started_in_its_cgroup_is_frozen_and_thawed_through_it() {
        let root = tempfile::tempdir().unwrap();
        let cgroups = match Cgroups::probe(&CgroupSetting::Auto, root.path(), None) {
            Ok(c) => c,
            Err(why) => {
                eprintln!("skipped: no usable cgroup here: {why}");
                return;
            }
        };
        let cg = cgroups.compute("test");
        cg.create().unwrap();
        let fd = cg.procs_file().unwrap();
        let raw = fd.as_raw_fd();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("60");
        // SAFETY: `join` is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || join(raw));
        }
        let mut child = cmd.spawn().unwrap();
        let pid = child.id() as i32;
        assert_eq!(cg.pids(), vec![pid]);
        let t = std::time::Instant::now();
        assert_eq!(cg.freeze(Duration::from_secs(5)).await, Some(vec![pid]));
        let froze = t.elapsed();
        assert!(cg.freezing() && cg.frozen() == Some(true));
        // Not stopped by a signal: only the cgroup knows.
        assert_ne!(super::super::procs::proc_state(pid), Some('T'));
        let t = std::time::Instant::now();
        cg.thaw();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cg.frozen() != Some(false) {
            assert!(std::time::Instant::now() < deadline, "still frozen");
            std::thread::yield_now();
        }
        eprintln!(
            "cgroup freeze {froze:?}, thaw {:?} ({})",
            t.elapsed(),
            cg.dir().display()
        );
        child.kill().unwrap();
        child.wait().unwrap();
        cg.remove();
        assert!(!cg.dir().exists());
        assert_eq!(cgroups.existing().len(), 0);
        let parent = cgroups.dir.clone();
        drop(cgroups);
        assert!(!parent.exists());
    }
}
