//! The embedded default backend: one real `postgres` process per endpoint, started directly
//! (not through `pg_ctl`, which polls every 100 ms) on a free loopback port, with its data
//! directory under `data_root/<endpoint>` created on first wake: a copy of a template cluster
//! made by `initdb` once (see [`template`]), or, with `template = false`, `initdb` itself.
//!
//! A data directory that once existed is never created again: the data root carries a marker
//! and a record per initialised endpoint (see [`datadir`]), and a missing one is refused.
//! Before a postgres starts, whatever is left of the previous one in its data directory is
//! waited for or cleared away (see [`procs`]).
//!
//! Light sleep (see [`RunningCompute::freeze`]) freezes a compute's cgroup where pgwake can
//! make one (see [`cgroup`]); else it stops every process of the compute with SIGSTOP, found
//! through /proc (each child of a postmaster is in its own session, so no process group holds
//! them), and continues them with SIGCONT. A pgwake killed meanwhile leaves them frozen; the
//! next one finds them at its start and lets them shut down.

mod branch;
mod cgroup;
mod datadir;
mod log;
mod procs;
mod template;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, Uid, User};
use pgwake_router::{BackendSpec, Route};
use serde::Deserialize;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

pub use branch::{BranchCopy, CopySource};
pub use cgroup::CgroupSetting;
use cgroup::{Cgroups, ComputeCgroup};
pub(crate) use datadir::write_durably;
use log::LogPump;
pub use log::{LogSize, MIN_LOG_SIZE};

use crate::probe::probe_accepting;
use crate::{probe_ready, BackendError, ComputeAddr, ComputeBackend, ProbeResult, RunningCompute};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Holds one data directory per endpoint and its log file `<id>.log` (with `<id>.log.1`).
    #[serde(default = "default_data_root")]
    pub data_root: PathBuf,
    /// Whether pgwake may create `data_root` (and mark it as its own) when it is missing or
    /// empty. Off, a missing or empty unmarked data root is refused: it is more likely a volume
    /// that is not mounted than a first start. Meant for a first start, a demo, or a data root
    /// that is thrown away anyway (an emptyDir).
    #[serde(default)]
    pub create_data_root: bool,
    /// Where `postgres` and `initdb` live; else `PATH`, `pg_config --bindir`, then the newest
    /// `/usr/lib/postgresql/*/bin` (Debian's layout).
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// OS user that runs `initdb`/`postgres` when pgwake runs as root (Postgres refuses root).
    /// Defaults to `postgres` under root, and to pgwake's own user otherwise.
    #[serde(default)]
    pub run_as: Option<String>,
    /// The cluster's bootstrap superuser, also used by the readiness probe.
    #[serde(default = "default_superuser")]
    pub superuser: String,
    /// initdb's `--auth` for new clusters. `trust` suits a demo on loopback; use
    /// `scram-sha-256` with `initdb_args = ["--pwfile=..."]` for anything shared.
    #[serde(default = "default_auth")]
    pub auth: String,
    #[serde(default)]
    pub initdb_args: Vec<String>,
    /// `postgres -c name=value` settings for every local endpoint.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// How long a fast shutdown may take before escalating to immediate shutdown.
    #[serde(default = "default_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// Largest size of a compute's log `<id>.log` (bytes, or `"10MiB"`): past it the file
    /// becomes `<id>.log.1`, replacing the previous one, so a log takes at most twice this.
    #[serde(default)]
    pub log_max_size: LogSize,
    /// Whether a new endpoint's cluster is a copy of a template cluster (made by initdb once
    /// per PostgreSQL major version and initdb arguments, under `.pgwake/templates`) instead
    /// of its own initdb. Clusters copied from one template share its database system
    /// identifier.
    #[serde(default = "default_template")]
    pub template: bool,
    /// With `template`: give each copy a database system identifier of its own, as initdb
    /// would (written into its `pg_control`, then `pg_resetwal -f` writes WAL that carries
    /// it). For endpoints that tools key on the identifier for (pgBackRest, Barman, physical
    /// replicas); costs a `pg_resetwal` run on each new endpoint's first wake.
    #[serde(default)]
    pub fresh_system_identifier: bool,
    /// How light sleep freezes a compute: `auto` (a cgroup v2 cgroup per compute under
    /// pgwake's own cgroup, SIGSTOP where pgwake cannot make one), `off` (SIGSTOP), or the
    /// cgroup directory to make them under.
    #[serde(default)]
    pub cgroup: CgroupSetting,
}

fn default_data_root() -> PathBuf {
    PathBuf::from(".pgwake/data")
}
fn default_superuser() -> String {
    "postgres".into()
}
fn default_auth() -> String {
    "trust".into()
}
fn default_template() -> bool {
    true
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            data_root: default_data_root(),
            create_data_root: false,
            bin_dir: None,
            run_as: None,
            superuser: default_superuser(),
            auth: default_auth(),
            initdb_args: Vec::new(),
            settings: BTreeMap::new(),
            stop_timeout: default_stop_timeout(),
            log_max_size: LogSize::default(),
            template: default_template(),
            fresh_system_identifier: false,
            cgroup: CgroupSetting::Auto,
        }
    }
}

#[derive(Debug, Clone)]
struct Bins {
    postgres: PathBuf,
    initdb: PathBuf,
}

#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// Where the port of the next `postgres` comes from.
type PortPicker = Box<dyn Fn() -> Result<u16, BackendError> + Send + Sync>;

pub struct LocalBackend {
    cfg: LocalConfig,
    run_as: Option<RunAs>,
    bins: OnceLock<Bins>,
    pick_port: PortPicker,
    /// Serialises changes to the data root's marker (starts of different endpoints run
    /// concurrently).
    root_lock: std::sync::Mutex<()>,
    /// Single-flight for template creation: the first wakes of many new endpoints at once
    /// wait for one initdb instead of each running its own.
    template_lock: tokio::sync::Mutex<()>,
    /// `postgres -V` of [`Self::bins`], for the template's key.
    pg_version: OnceLock<String>,
    /// Where compute cgroups go; `None`: light sleep uses SIGSTOP.
    cgroups: Option<Cgroups>,
}

/// How often a starting compute is probed. The gap between "port open" and "ready" is ~15 ms
/// on a warm cache, so a coarser poll would add most of its period to every cold start.
const PROBE_INTERVAL: Duration = Duration::from_millis(2);
/// How often `postmaster.pid` is read while waiting for the "ready" status: a small file
/// read, far cheaper than a probe connection, so it can be frequent.
const PID_FILE_INTERVAL: Duration = Duration::from_millis(1);
/// How long the output of a postgres that exited during start-up may take to reach its log.
const LOG_SETTLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the processes of a postmaster that died may take to go after SIGKILL.
const ORPHANS_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at picking a free port, for the race where another process binds it first.
const PORT_ATTEMPTS: usize = 3;

impl LocalBackend {
    /// Checks what can be checked without starting anything. Missing binaries are not an error
    /// here: the proxy should still serve static endpoints, and clients of local ones get a
    /// clear error at wake time.
    pub fn new(cfg: LocalConfig) -> Result<Self, BackendError> {
        let run_as = match (&cfg.run_as, Uid::effective().is_root()) {
            (Some(_), _) | (None, true) => {
                let name = cfg.run_as.as_deref().unwrap_or("postgres");
                let user = User::from_name(name)
                    .map_err(|e| BackendError::Config(format!("looking up user {name:?}: {e}")))?
                    .ok_or_else(|| {
                        BackendError::Config(format!(
                            "user {name:?} does not exist (Postgres cannot run as root; set local.run_as)"
                        ))
                    })?;
                if user.uid.is_root() {
                    return Err(BackendError::Config("local.run_as must not be root".into()));
                }
                if !Uid::effective().is_root() && user.uid != Uid::effective() {
                    return Err(BackendError::Config(format!(
                        "local.run_as = {name:?} needs pgwake to run as root"
                    )));
                }
                Some(RunAs {
                    uid: user.uid.as_raw(),
                    gid: user.gid.as_raw(),
                })
            }
            (None, false) => None,
        };
        for (k, v) in &cfg.settings {
            pgwake_router::settings::check(k, v)
                .map_err(|e| BackendError::Config(format!("[local] settings: {e}")))?;
        }
        let cfg = LocalConfig {
            data_root: absolute(&cfg.data_root)?,
            ..cfg
        };
        let cgroups = match Cgroups::probe(
            &cfg.cgroup,
            &cfg.data_root,
            run_as.map(|u| (u.uid, u.gid)),
        ) {
            Ok(c) => {
                info!(cgroups = %c.dir().display(), "light sleep freezes computes through their cgroup v2 cgroups");
                Some(c)
            }
            // Usual in containers (a read-only cgroupfs), so no warning unless a path was
            // asked for.
            Err(why) if matches!(cfg.cgroup, CgroupSetting::Path(_)) => {
                warn!(%why, "light sleep freezes computes with SIGSTOP: the configured cgroup cannot hold them");
                None
            }
            Err(why) => {
                info!(%why, "light sleep freezes computes with SIGSTOP: no cgroup for them");
                None
            }
        };
        // A pgwake killed while computes were frozen (light sleep) left them frozen for good:
        // they would hold their memory and data directory until someone thaws them. Now,
        // not at their next wake: an endpoint nobody wakes again must not stay frozen.
        for (id, cg) in cgroups.iter().flat_map(|c| c.existing()) {
            let dir = cfg.data_root.join(&id);
            if cg.freezing() {
                procs::thaw_cgroup(&dir, &cg, &procs::cluster_procs(&dir));
                info!(dir = %dir.display(), "thawed a compute left frozen; it shuts down, and its next wake starts it again");
            } else if cg.pids().is_empty() {
                cg.remove();
            }
        }
        for dir in procs::thaw_left_frozen(&cfg.data_root) {
            info!(dir = %dir.display(), "thawed a compute left frozen; it shuts down, and its next wake starts it again");
        }
        Ok(Self {
            cfg,
            run_as,
            bins: OnceLock::new(),
            pick_port: Box::new(free_port),
            root_lock: std::sync::Mutex::new(()),
            template_lock: tokio::sync::Mutex::new(()),
            pg_version: OnceLock::new(),
            cgroups,
        })
    }

    /// Replaces how ports are picked (by default: whatever the kernel hands out for port 0).
    /// For fault tests, which hand out a port another program holds to exercise the retry.
    #[doc(hidden)]
    pub fn with_port_picker(
        mut self,
        pick: impl Fn() -> Result<u16, BackendError> + Send + Sync + 'static,
    ) -> Self {
        self.pick_port = Box::new(pick);
        self
    }

    pub fn config(&self) -> &LocalConfig {
        &self.cfg
    }

    /// The cgroup of `id`'s compute, if computes get one.
    fn cgroup(&self, id: &pgwake_router::EndpointId) -> Option<ComputeCgroup> {
        self.cgroups.as_ref().map(|c| c.compute(id.as_str()))
    }

    fn bins(&self) -> Result<&Bins, BackendError> {
        if let Some(b) = self.bins.get() {
            return Ok(b);
        }
        let b = find_bins(self.cfg.bin_dir.as_deref())?;
        Ok(self.bins.get_or_init(|| b))
    }

    pub fn data_dir(&self, id: &pgwake_router::EndpointId) -> PathBuf {
        self.cfg.data_root.join(id.as_str())
    }

    fn chown(&self, path: &Path) -> Result<(), BackendError> {
        if let Some(u) = self.run_as {
            std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
                .map_err(|e| BackendError::io(format!("chown {}", path.display()), e))?;
        }
        Ok(())
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.stdin(Stdio::null()).kill_on_drop(true);
        // Own process group: a Ctrl-C on pgwake's terminal must not reach the computes directly;
        // pgwake stops them itself, in order.
        c.process_group(0);
        if let Some(u) = self.run_as {
            c.uid(u.uid).gid(u.gid);
        }
        c
    }

    /// Checks the data root before every start: it may have gone away (a volume unmounted)
    /// since the last one.
    fn check_data_root(&self) -> Result<(), BackendError> {
        let root = &self.cfg.data_root;
        let _serial = self.root_lock.lock().unwrap_or_else(|e| e.into_inner());
        let existed = datadir::exists(root)?;
        datadir::check_root(root, self.cfg.create_data_root)?;
        if !existed {
            self.chown(root)?;
        }
        Ok(())
    }

    /// Makes sure `id` has a cluster in `dir`: refuses a recorded one that is gone, runs initdb
    /// for a new one. Returns whether `dir` holds a cluster that is not recorded yet: one from
    /// before the records, recorded once postgres has started on it (a stray `PG_VERSION` is
    /// not a cluster).
    async fn ensure_cluster(
        &self,
        id: &pgwake_router::EndpointId,
        dir: &Path,
        bins: &Bins,
    ) -> Result<bool, BackendError> {
        let root = &self.cfg.data_root;
        // initdb works in a temporary directory next to the final one (same filesystem, so the
        // rename is atomic); one left by a crash during initdb is a half-built cluster.
        let building = root.join(format!(".{id}.initdb"));
        if datadir::exists(&building)? {
            warn!(dir = %building.display(), "removing a half-built cluster left by an interrupted initdb");
            std::fs::remove_dir_all(&building)
                .map_err(|e| BackendError::io(format!("remove {}", building.display()), e))?;
        }
        let recorded = datadir::is_recorded(root, id)?;
        let complete = datadir::exists(&dir.join("PG_VERSION"))?;
        match (recorded, complete) {
            (true, true) => return Ok(false),
            (true, false) => {
                let reason = "was initialised by pgwake but is missing or has no PG_VERSION; \
                              restore or mount it (to start this endpoint over with an empty \
                              database, remove its record in .pgwake/initialised)";
                error!(endpoint = %id, dir = %dir.display(), "refusing to start: the data directory {reason}");
                return Err(BackendError::DataMissing {
                    path: dir.display().to_string(),
                    reason: reason.into(),
                });
            }
            // A cluster from before the records (or one whose record a crash prevented: it
            // was renamed into place only once complete).
            (false, true) => return Ok(true),
            (false, false) => {}
        }
        match std::fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(BackendError::DataDir {
                        path: dir.display().to_string(),
                        reason: "exists, is not empty, and is not a Postgres data directory".into(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BackendError::io(format!("read {}", dir.display()), e)),
        }
        if self.cfg.template {
            let template = self.ensure_template(bins).await?;
            info!(dir = %dir.display(), template = %template.display(), "new endpoint from the template");
            let copied = match template::copy(&template, &building).await {
                Ok(()) if self.cfg.fresh_system_identifier => {
                    self.fresh_system_identifier(&building, bins).await
                }
                other => other,
            };
            if let Err(e) = copied {
                if let Err(e) = remove_if_exists(&building) {
                    warn!(dir = %building.display(), error = %e, "could not remove the failed copy; the next start will");
                }
                return Err(e);
            }
        } else {
            info!(dir = %dir.display(), "initdb for new endpoint");
            self.initdb(&building, bins).await?;
        }
        // An empty directory in the way (an operator's mkdir) is replaced; rename cannot
        // replace a mount point (EBUSY): mount the data root, not one endpoint's directory.
        std::fs::rename(&building, dir).map_err(|e| {
            BackendError::io(
                format!("rename {} to {}", building.display(), dir.display()),
                e,
            )
        })?;
        datadir::sync_dir(root)?;
        datadir::record(root, id)?;
        Ok(false)
    }

    /// Gives the copy in `building` its own system identifier (see
    /// [`LocalConfig::fresh_system_identifier`]).
    async fn fresh_system_identifier(
        &self,
        building: &Path,
        bins: &Bins,
    ) -> Result<(), BackendError> {
        let id = template::set_system_identifier(building)?;
        let resetwal = bins.postgres.with_file_name("pg_resetwal");
        let out = self
            .command(&resetwal)
            .arg("-f")
            .arg("-D")
            .arg(building)
            .output()
            .await
            .map_err(|e| BackendError::io(format!("run {}", resetwal.display()), e))?;
        if !out.status.success() {
            return Err(BackendError::DataDir {
                path: building.display().to_string(),
                reason: format!(
                    "pg_resetwal for a new system identifier failed ({}): {}",
                    out.status,
                    tail(&String::from_utf8_lossy(&out.stderr), 1000)
                ),
            });
        }
        debug!(dir = %building.display(), system_identifier = id, "new system identifier");
        Ok(())
    }

    /// The arguments of every initdb pgwake runs, but `-D`.
    fn initdb_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "-U".into(),
            self.cfg.superuser.clone().into(),
            format!("--auth={}", self.cfg.auth).into(),
            "-E".into(),
            "UTF8".into(),
            "--locale=C".into(),
        ];
        args.extend(self.cfg.initdb_args.iter().map(OsString::from));
        args
    }

    /// Runs initdb into `building`, which must not exist; on failure nothing is left of it.
    async fn initdb(&self, building: &Path, bins: &Bins) -> Result<(), BackendError> {
        std::fs::create_dir(building)
            .map_err(|e| BackendError::io(format!("create {}", building.display()), e))?;
        self.chown(building)?;
        let out = self
            .command(&bins.initdb)
            .arg("-D")
            .arg(building)
            .args(self.initdb_args())
            .output()
            .await;
        match out {
            Ok(out) if out.status.success() => Ok(()),
            failed => {
                if let Err(e) = std::fs::remove_dir_all(building) {
                    warn!(dir = %building.display(), error = %e, "could not remove the failed initdb's directory; the next start will");
                }
                let out = failed
                    .map_err(|e| BackendError::io(format!("run {}", bins.initdb.display()), e))?;
                let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stdout));
                Err(BackendError::InitdbFailed {
                    status: out.status.to_string(),
                    output: tail(&text, 2000),
                })
            }
        }
    }

    async fn pg_version(&self, bins: &Bins) -> Result<&str, BackendError> {
        if let Some(v) = self.pg_version.get() {
            return Ok(v);
        }
        let out = self
            .command(&bins.postgres)
            .arg("-V")
            .output()
            .await
            .map_err(|e| BackendError::io(format!("run {} -V", bins.postgres.display()), e))?;
        if !out.status.success() {
            return Err(BackendError::BinariesNotFound(format!(
                "{} -V failed ({})",
                bins.postgres.display(),
                out.status
            )));
        }
        let v = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(self.pg_version.get_or_init(|| v))
    }

    /// The template cluster for this PostgreSQL and these initdb arguments, made now if there
    /// is none. Only a complete one carries the final name; the leftover of an interrupted
    /// build (or anything else in its place without `PG_VERSION`) is removed and made again.
    async fn ensure_template(&self, bins: &Bins) -> Result<PathBuf, BackendError> {
        let _single = self.template_lock.lock().await;
        let major = template::major_version(self.pg_version(bins).await?);
        let key = template::key(&major, &self.initdb_args())?;
        let templates = self.cfg.data_root.join(template::TEMPLATES);
        let dir = templates.join(&key);
        if datadir::exists(&dir.join("PG_VERSION"))? {
            return Ok(dir);
        }
        std::fs::create_dir_all(&templates)
            .map_err(|e| BackendError::io(format!("create {}", templates.display()), e))?;
        let building = templates.join(format!(".{key}.initdb"));
        for leftover in [&dir, &building] {
            if datadir::exists(leftover)? {
                warn!(dir = %leftover.display(), "removing a half-made template cluster");
                remove_if_exists(leftover)?;
            }
        }
        info!(template = %dir.display(), "initdb for a template cluster");
        self.initdb(&building, bins).await?;
        std::fs::rename(&building, &dir).map_err(|e| {
            BackendError::io(
                format!("rename {} to {}", building.display(), dir.display()),
                e,
            )
        })?;
        datadir::sync_dir(&templates)?;
        Ok(dir)
    }

    /// Records a cluster pgwake did not create (an older pgwake did) once postgres has started
    /// on it. Not fatal: the compute runs, and the next start tries again.
    fn record_found(&self, id: &pgwake_router::EndpointId, dir: &Path) {
        match datadir::record(&self.cfg.data_root, id) {
            Ok(()) => {
                info!(endpoint = %id, dir = %dir.display(), "existing data directory recorded as initialised")
            }
            Err(e) => {
                warn!(endpoint = %id, error = %e, "could not record the data directory as initialised; retried at the next start")
            }
        }
    }

    async fn spawn_postgres(
        &self,
        route: &Route,
        dir: &Path,
        bins: &Bins,
        port: u16,
        log: &Path,
    ) -> Result<(Child, LogPump, Option<ComputeCgroup>), BackendError> {
        let mut cmd = self.command(&bins.postgres);
        cmd.arg("-D")
            .arg(dir)
            .arg("-p")
            .arg(port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            // The compute is reached over TCP only; Debian's default socket dir may not exist
            // or be writable by the run-as user.
            .args(["-c", "unix_socket_directories="]);
        let endpoint_settings = match &route.backend {
            BackendSpec::Local { settings } => Some(settings),
            _ => None,
        };
        let mut merged = self.cfg.settings.clone();
        merged.extend(
            endpoint_settings
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        for (k, v) in &merged {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        // Through pgwake, not straight into the file: see [`log`] for the bound.
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        // The postmaster joins its cgroup before it runs anything, so every child it forks is
        // born in it: a freeze then needs no list of processes.
        let cgroup = self.cgroup(&route.endpoint).and_then(|cg| {
            // A cgroup left frozen (its last compute killed while frozen) would freeze the
            // new postmaster at once.
            let opened = cg
                .create()
                .and_then(|()| cg.set_frozen(false).map_err(|e| e.to_string()))
                .and_then(|()| cg.procs_file().map_err(|e| e.to_string()));
            match opened {
                Ok(fd) => Some((cg, fd)),
                Err(why) => {
                    warn!(cgroup = %cg.dir().display(), %why, "no cgroup for this compute; light sleep uses SIGSTOP for it");
                    None
                }
            }
        });
        let procs_fd = cgroup.as_ref().map(|(_, fd)| fd.as_raw_fd());
        // If pgwake dies without stopping its computes, each gets a fast shutdown instead of
        // living on as an orphan that holds the data directory's lock.
        // SAFETY: only async-signal-safe calls (prctl, write) between fork and exec; the fd
        // stays open in pgwake until `spawn` returns, and closes on exec in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = procs_fd {
                    cgroup::join(fd)?;
                }
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        let cgroup = cgroup.map(|(cg, _fd)| cg);
        let mut child = spawned
            .map_err(|e| BackendError::io(format!("spawn {}", bins.postgres.display()), e))?;
        let outputs: Vec<Box<dyn tokio::io::AsyncRead + Unpin + Send>> = [
            child.stdout.take().map(|o| Box::new(o) as _),
            child.stderr.take().map(|o| Box::new(o) as _),
        ]
        .into_iter()
        .flatten()
        .collect();
        let pump = LogPump::start(outputs, log.to_path_buf(), self.cfg.log_max_size);
        Ok((child, pump, cgroup))
    }
}

enum ReadyError {
    PortTaken,
    Other(BackendError),
}

/// The postmaster's own state from line 8 of `postmaster.pid` ("starting", "ready", ...).
/// `None` while the file is not (fully) written yet.
fn pm_status(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
    text.lines().nth(7).map(|l| l.trim().to_string())
}

/// What postgres says when a previous instance still holds the data directory: it goes away
/// by itself (or is cleared before the next start), so the client may retry.
const BUSY: [&str; 2] = [
    "lock file \"postmaster.pid\" already exists",
    "pre-existing shared memory block",
];
/// What postgres says when it refuses the data directory itself: nothing changes that but an
/// operator, so retrying is pointless. Checked after [`BUSY`], whose hint names the data
/// directory too.
const REFUSED: [&str; 7] = [
    "data directory \"",
    "is not a valid data directory",
    "incompatible with server",
    "could not access the server configuration file",
    "could not change directory to",
    "could not read permissions of directory",
    "Permission denied",
];

/// Classifies a postgres that exited during start-up by what it logged.
fn start_failure(status: ExitStatus, dir: &Path, log_tail: String) -> BackendError {
    if BUSY.iter().any(|m| log_tail.contains(m)) {
        BackendError::DataDirBusy(log_tail)
    } else if REFUSED.iter().any(|m| log_tail.contains(m)) {
        error!(dir = %dir.display(), %status, log = %log_tail, "postgres refuses the data directory; an operator must fix it");
        BackendError::DataDir {
            path: dir.display().to_string(),
            reason: format!("postgres refused it ({status}): {log_tail}"),
        }
    } else {
        BackendError::StartFailed {
            status: status.to_string(),
            log_tail,
        }
    }
}

async fn wait_ready(
    child: &mut Child,
    dir: &Path,
    addr: SocketAddr,
    superuser: &str,
    log: &mut LogPump,
) -> Result<(), ReadyError> {
    let mut probes = 0u32;
    let mut polls = 0u32;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                // Its last words may still be in the pipe: wait for them (bounded, as processes
                // of a killed postmaster could hold the pipe open).
                let log_tail = tail(&log.settle(LOG_SETTLE_TIMEOUT).await, 2000);
                if log_tail.contains("could not bind")
                    || log_tail.contains("Address already in use")
                {
                    return Err(ReadyError::PortTaken);
                }
                return Err(ReadyError::Other(start_failure(status, dir, log_tail)));
            }
            Ok(None) => {}
            Err(e) => return Err(ReadyError::Other(BackendError::io("wait for postgres", e))),
        }
        // Each protocol probe forks a backend on the starting server; the postmaster announces
        // "ready" in its lock file first, so probe only then (or, for a server that never
        // writes the status line, after a while anyway).
        polls += 1;
        let status = pm_status(dir);
        let announced = matches!(status.as_deref(), Some("ready" | "standby"));
        if !announced && polls < 2500 {
            tokio::time::sleep(PID_FILE_INTERVAL).await;
            continue;
        }
        probes += 1;
        match probe_ready(addr, superuser, Duration::from_secs(2)).await {
            ProbeResult::Ready => {
                debug!(probes, "compute ready");
                return Ok(());
            }
            ProbeResult::StartingUp | ProbeResult::Refused => {}
            // Possibly another program on the port we picked; postgres will then fail to bind
            // and exit, which the next try_wait sees.
            ProbeResult::Unexpected(why) => debug!(%why, "unexpected probe answer"),
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

#[async_trait]
impl ComputeBackend for LocalBackend {
    async fn start(&self, route: &Route) -> Result<Box<dyn RunningCompute>, BackendError> {
        let bins = self.bins()?.clone();
        self.check_data_root()?;
        let dir = self.data_dir(&route.endpoint);
        let unrecorded = self.ensure_cluster(&route.endpoint, &dir, &bins).await?;
        // The lock file outlives only a postmaster that did not exit cleanly (killed, or still
        // running): then its processes may be left, and postgres would refuse to start.
        if dir.join("postmaster.pid").exists() {
            procs::clear(&dir, self.cgroup(&route.endpoint).as_ref()).await;
        }
        let log = self.cfg.data_root.join(format!("{}.log", route.endpoint));
        for _ in 0..PORT_ATTEMPTS {
            let port = (self.pick_port)()?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let (mut child, mut log_pump, cgroup) =
                self.spawn_postgres(route, &dir, &bins, port, &log).await?;
            match wait_ready(&mut child, &dir, addr, &self.cfg.superuser, &mut log_pump).await {
                Ok(()) => {
                    if unrecorded {
                        self.record_found(&route.endpoint, &dir);
                    }
                    return Ok(Box::new(LocalCompute::watch(
                        child,
                        dir,
                        addr,
                        self.cfg.stop_timeout,
                        self.cfg.superuser.clone(),
                        cgroup,
                    )?));
                }
                Err(ReadyError::PortTaken) => {
                    warn!(
                        port,
                        "port taken before postgres could bind it; trying another"
                    );
                }
                Err(ReadyError::Other(e)) => return Err(e),
            }
        }
        Err(BackendError::StartFailed {
            status: "could not bind".into(),
            log_tail: format!("no free port after {PORT_ATTEMPTS} attempts"),
        })
    }
}

struct LocalCompute {
    addr: ComputeAddr,
    superuser: String,
    pid: Pid,
    dir: PathBuf,
    exited: watch::Receiver<Option<ExitStatus>>,
    stop_timeout: Duration,
    /// The processes a freeze stopped (postmaster first) while the compute is frozen: a
    /// thaw continues exactly these (a frozen postmaster forks nothing new), without
    /// looking through /proc again on the wake path.
    frozen: std::sync::Mutex<Option<Vec<i32>>>,
    /// Set from the start of a freeze until the compute runs again: what tells the postmaster
    /// task's [`procs::ThawOnDrop`] that it has anything to do.
    maybe_frozen: Arc<AtomicBool>,
    /// The compute's cgroup, frozen as a whole; `None`: SIGSTOP to each process.
    cgroup: Option<ComputeCgroup>,
}

/// How long a thawed compute may take to answer the probe. It answers at once unless
/// something is badly wrong (its machine swapping its memory back in).
const THAW_TIMEOUT: Duration = Duration::from_secs(10);

impl LocalCompute {
    fn watch(
        mut child: Child,
        dir: PathBuf,
        addr: SocketAddr,
        stop_timeout: Duration,
        superuser: String,
        cgroup: Option<ComputeCgroup>,
    ) -> Result<Self, BackendError> {
        let pid = child.id().ok_or_else(|| BackendError::StartFailed {
            status: "exited".into(),
            log_tail: "postgres exited right after becoming ready".into(),
        })?;
        let (tx, rx) = watch::channel(None);
        let watched_dir = dir.clone();
        let watched_cgroup = cgroup.clone();
        // The child is owned by this task so exactly one place reaps it; `kill_on_drop` remains
        // as the last resort if the runtime itself goes away.
        let maybe_frozen = Arc::new(AtomicBool::new(false));
        let thaw_on_drop =
            procs::ThawOnDrop::new(dir.clone(), cgroup.clone(), Arc::clone(&maybe_frozen));
        tokio::spawn(async move {
            let _thaw = thaw_on_drop;
            let status = child.wait().await;
            let status = match status {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "waiting for postgres failed");
                    return;
                }
            };
            debug!(pid, %status, "postgres exited");
            // A postmaster that did not exit cleanly (killed) leaves its children running,
            // serving sessions of a compute that is gone and holding the shared memory the
            // next postmaster needs. They go before anyone hears of the exit.
            if watched_dir.join("postmaster.pid").exists()
                && tokio::time::timeout(
                    ORPHANS_TIMEOUT,
                    procs::clear(&watched_dir, watched_cgroup.as_ref()),
                )
                .await
                .is_err()
            {
                warn!(dir = %watched_dir.display(), "processes of the exited postgres still linger; the next start waits for them");
            }
            // Empty now, and made again by the next start: none accumulate.
            if let Some(cg) = &watched_cgroup {
                cg.remove();
            }
            let _ = tx.send(Some(status));
        });
        Ok(Self {
            addr: ComputeAddr::new(addr.to_string()),
            superuser,
            pid: Pid::from_raw(pid as i32),
            dir,
            exited: rx,
            stop_timeout,
            frozen: std::sync::Mutex::new(None),
            maybe_frozen,
            cgroup,
        })
    }

    fn frozen(&self) -> std::sync::MutexGuard<'_, Option<Vec<i32>>> {
        self.frozen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets the processes of a frozen compute run again; nothing if it is not frozen.
    fn let_run(&self) -> bool {
        match self.frozen().take() {
            Some(pids) => {
                match &self.cgroup {
                    Some(cg) => cg.thaw(),
                    None => procs::thaw(&pids),
                }
                self.maybe_frozen.store(false, Ordering::Release);
                true
            }
            None => false,
        }
    }

    async fn wait_exit(&self, timeout: Duration) -> bool {
        let mut rx = self.exited.clone();
        let exited = tokio::time::timeout(timeout, rx.wait_for(|s| s.is_some()))
            .await
            .is_ok();
        exited
    }
}

#[async_trait]
impl RunningCompute for LocalCompute {
    fn addr(&self) -> &ComputeAddr {
        &self.addr
    }

    async fn stop(&self) -> Result<(), BackendError> {
        // A stopped process acts on no signal but SIGKILL: a frozen compute would never shut
        // down, and its postmaster would wait forever for children that cannot exit.
        self.let_run();
        // SIGINT is Postgres's "fast" shutdown: roll back open transactions, write a
        // checkpoint, exit. Committed data is on disk either way; the checkpoint makes the next
        // start skip recovery.
        for (signal, wait) in [
            (Signal::SIGINT, self.stop_timeout),
            (Signal::SIGQUIT, Duration::from_secs(5)),
            (Signal::SIGKILL, Duration::from_secs(5)),
        ] {
            if self.exited.borrow().is_some() {
                return Ok(());
            }
            if signal != Signal::SIGINT {
                warn!(pid = %self.pid, ?signal, "postgres did not stop in time; escalating");
            }
            let _ = kill(self.pid, signal);
            if self.wait_exit(wait).await {
                return Ok(());
            }
        }
        Err(BackendError::io(
            format!("stopping postgres pid {}", self.pid),
            std::io::Error::from(std::io::ErrorKind::TimedOut),
        ))
    }

    async fn exited(&self) {
        let mut rx = self.exited.clone();
        let _ = rx.wait_for(|s| s.is_some()).await;
    }

    async fn freeze(&self) -> Result<bool, BackendError> {
        if self.frozen().is_some() {
            return Ok(true);
        }
        if self.exited.borrow().is_some() {
            return Ok(false);
        }
        // Before the first process stops: a freeze cut short (its runtime gone) may leave
        // some stopped, and only this flag then tells the postmaster task to look.
        self.maybe_frozen.store(true, Ordering::Release);
        let pids = match &self.cgroup {
            Some(cg) => match cg.freeze(procs::FREEZE_TIMEOUT).await {
                // A gone postmaster is a crashed compute, not a frozen one.
                Some(pids) if pids.contains(&self.pid.as_raw()) => Some(pids),
                Some(_) => {
                    cg.thaw();
                    None
                }
                None => None,
            },
            None => procs::freeze(&self.dir, self.pid.as_raw()).await,
        };
        let Some(pids) = pids else {
            // A failed freeze lets every process it stopped run again.
            self.maybe_frozen.store(false, Ordering::Release);
            return Ok(false);
        };
        debug!(pid = %self.pid, processes = pids.len(), "compute frozen");
        *self.frozen() = Some(pids);
        Ok(true)
    }

    async fn thaw(&self) -> Result<(), BackendError> {
        self.let_run();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.addr.port().unwrap_or(5432)));
        let deadline = tokio::time::Instant::now() + THAW_TIMEOUT;
        loop {
            if self.exited.borrow().is_some() {
                return Err(BackendError::ThawFailed(
                    "postgres exited while frozen".into(),
                ));
            }
            // It was ready when frozen: what is left to check is that the postmaster runs,
            // says so in its lock file (not "stopping" after a crash of a child, say) and
            // accepts and forks. The SSLRequest exchange checks the last without a backend's
            // start-up, which would cost more than the whole thaw.
            let why = match pm_status(&self.dir) {
                Some(s) if s == "ready" || s == "standby" => {
                    match probe_accepting(addr, THAW_TIMEOUT).await {
                        ProbeResult::Ready => return Ok(()),
                        ProbeResult::StartingUp => "starting up".to_string(),
                        ProbeResult::Refused => "connection refused".to_string(),
                        ProbeResult::Unexpected(why) => why,
                    }
                }
                status => format!("postmaster status {status:?}"),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(BackendError::ThawFailed(why));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    fn memory(&self) -> Option<u64> {
        match self.frozen().as_deref() {
            Some(pids) => procs::memory(pids),
            None => {
                let pids: Vec<i32> = procs::cluster_procs(&self.dir)
                    .iter()
                    .map(|p| p.pid)
                    .collect();
                procs::memory(&pids)
            }
        }
    }

    fn stop_on_shutdown(&self) -> bool {
        // Our child process: it must not outlive pgwake holding the data directory's lock.
        true
    }

    async fn client_connections(&self) -> Option<usize> {
        // As the bootstrap superuser over loopback (trust by default). With password auth this
        // returns None and the proxy's guards alone decide, as in the embedded setup.
        let conn = format!(
            "host={} port={} user={} dbname=postgres application_name=pgwake-monitor connect_timeout=5",
            self.addr.host(),
            self.addr.port().unwrap_or(5432),
            self.superuser
        );
        let work = async {
            let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                .await
                .ok()?;
            let task = tokio::spawn(connection);
            let n: i64 = client
                .query_one(
                    "select count(*) from pg_stat_activity \
                     where backend_type = 'client backend' and pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            drop(client);
            let _ = task.await;
            usize::try_from(n).ok()
        };
        tokio::time::timeout(Duration::from_secs(10), work)
            .await
            .ok()
            .flatten()
    }
}

fn free_port() -> Result<u16, BackendError> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| BackendError::io("pick a free port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| BackendError::io("pick a free port", e))
}

fn remove_if_exists(p: &Path) -> Result<(), BackendError> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(BackendError::io(format!("remove {}", p.display()), e))
        }
        _ => Ok(()),
    }
}

fn absolute(p: &Path) -> Result<PathBuf, BackendError> {
    std::path::absolute(p).map_err(|e| BackendError::io(format!("resolve {}", p.display()), e))
}

fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

fn find_bins(bin_dir: Option<&Path>) -> Result<Bins, BackendError> {
    let in_dir = |d: &Path| {
        let b = Bins {
            postgres: d.join("postgres"),
            initdb: d.join("initdb"),
        };
        (b.postgres.is_file() && b.initdb.is_file()).then_some(b)
    };
    if let Some(d) = bin_dir {
        return in_dir(d).ok_or_else(|| {
            BackendError::BinariesNotFound(format!("no postgres and initdb in {}", d.display()))
        });
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        if out.status.success() {
            candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev().map(|(_, p)| p));
    }
    for d in &candidates {
        if let Some(mut b) = in_dir(d) {
            // PATH may hold a symlink (e.g. /usr/local/bin/postgres); postgres finds its share
            // dir relative to its real location, and initdb must be its sibling.
            if let (Ok(p), Ok(i)) = (b.postgres.canonicalize(), b.initdb.canonicalize()) {
                b = Bins {
                    postgres: p,
                    initdb: i,
                };
            }
            return Ok(b);
        }
    }
    Err(BackendError::BinariesNotFound(
        "postgres and initdb not found in PATH, pg_config --bindir or /usr/lib/postgresql/*/bin; \
         install PostgreSQL or set local.bin_dir"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackendErrorKind;
    use std::os::unix::process::ExitStatusExt;

    fn classify(log: &str) -> BackendError {
        start_failure(
            ExitStatus::from_raw(1 << 8),
            Path::new("/d"),
            log.to_string(),
        )
    }

    #[test]
    fn postgres_refusing_its_data_directory_is_permanent_and_a_busy_one_is_not() {
        for log in [
            "FATAL:  data directory \"/d\" has invalid permissions\nDETAIL:  Permissions should be u=rwx (0700) or u=rwx,g=rx (0750).",
            "FATAL:  data directory \"/d\" has wrong ownership\nHINT:  The server must be started by the user that owns the data directory.",
            "postgres: could not access the server configuration file \"/d/postgresql.conf\": No such file or directory",
            "FATAL:  could not open file \"global/pg_filenode.map\": Permission denied",
        ] {
            let e = classify(log);
            assert!(!e.retryable(), "{e}");
            assert_eq!(e.kind(), BackendErrorKind::DataDirectory);
            assert!(!e.reached_startup());
        }
        for log in [
            "FATAL:  lock file \"postmaster.pid\" already exists\nHINT:  Is another postmaster (PID 7) running in data directory \"/d\"?",
            "FATAL:  pre-existing shared memory block (key 1, ID 2) is still in use",
        ] {
            let e = classify(log);
            assert!(e.retryable(), "{e}");
            assert_eq!(e.kind(), BackendErrorKind::DataDirectoryBusy);
            assert!(!e.reached_startup());
        }
        let e = classify("PANIC:  could not locate a valid checkpoint record");
        assert!(e.retryable() && e.reached_startup(), "{e}");
    }
}
