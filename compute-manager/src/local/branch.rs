//! Branches: a new endpoint whose cluster starts as a copy of another's. The copy is built
//! under a temporary name next to the final one and renamed into place only once complete and
//! durable, then recorded (see [`super::datadir`]), exactly like a cluster from the template;
//! a failed copy is removed before the error is returned.
//!
//! Two ways to copy, by the parent's state (which the manager holds still meanwhile):
//! - suspended: its files, with `cp -a --reflink=auto` (blocks shared where the filesystem
//!   can), which is consistent because no postgres runs on them;
//! - running: PostgreSQL's own `pg_basebackup -X stream` over the compute's address, as the
//!   bootstrap superuser (initdb's pg_hba allows replication connections from loopback with
//!   the same method as other connections). The copy holds every transaction committed before
//!   the backup started, and possibly some committed while it ran; it starts as a new primary
//!   after replaying the streamed WAL.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use pgwake_router::EndpointId;
use tracing::{info, warn};

use super::{datadir, remove_if_exists, tail, template, LocalBackend};
use crate::{BackendError, ComputeAddr};

/// Where a branch's data comes from.
#[derive(Debug, Clone, Copy)]
pub enum CopySource<'a> {
    /// The parent is suspended (and held so): its directory is copied as files.
    Files,
    /// The parent runs at this address: `pg_basebackup` streams a consistent copy.
    Running(&'a ComputeAddr),
}

/// What [`LocalBackend::branch_data`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchCopy {
    /// The branch's data directory is a copy of the parent's.
    Copied,
    /// The parent was never started, so it has no cluster yet: nor has the branch, whose
    /// first wake makes one as for any new endpoint (the same empty database the parent's
    /// would be).
    ParentEmpty,
}

impl LocalBackend {
    /// Checks the data root as before a start (marked as pgwake's, or created when allowed):
    /// nothing is written into a data root that is not there (a volume not mounted).
    pub fn ensure_data_root(&self) -> Result<(), BackendError> {
        self.check_data_root()
    }

    /// Whether `id` has anything in the data root: its data directory, or the record that
    /// it once had one.
    pub fn has_data(&self, id: &EndpointId) -> Result<bool, BackendError> {
        Ok(datadir::exists(&self.data_dir(id))? || datadir::is_recorded(&self.cfg.data_root, id)?)
    }

    /// Makes `to`'s cluster a copy of `from`'s, read as `source` says. `to` must have no data
    /// (see [`Self::has_data`]). On any error nothing of the copy is left.
    pub async fn branch_data(
        &self,
        from: &EndpointId,
        to: &EndpointId,
        source: CopySource<'_>,
    ) -> Result<BranchCopy, BackendError> {
        self.check_data_root()?;
        let root = self.cfg.data_root.clone();
        let (src, dst) = (self.data_dir(from), self.data_dir(to));
        if self.has_data(to)? {
            return Err(BackendError::DataDir {
                path: dst.display().to_string(),
                reason: "already exists".into(),
            });
        }
        if !datadir::exists(&src.join("PG_VERSION"))? {
            if datadir::is_recorded(&root, from)? {
                return Err(BackendError::DataMissing {
                    path: src.display().to_string(),
                    reason: "was initialised by pgwake but is missing; nothing to branch from"
                        .into(),
                });
            }
            return Ok(BranchCopy::ParentEmpty);
        }
        let building = root.join(format!(".{to}.branch"));
        // Left by a crash during an earlier copy to the same id.
        remove_if_exists(&building)?;
        let t0 = std::time::Instant::now();
        let copied = match source {
            CopySource::Files => self.copy_files(&src, &building).await,
            CopySource::Running(addr) => self.base_backup(addr, &building).await,
        };
        if let Err(e) = copied {
            if let Err(e) = remove_if_exists(&building) {
                warn!(dir = %building.display(), error = %e, "could not remove the failed copy; the next branch to this id will");
            }
            return Err(e);
        }
        std::fs::rename(&building, &dst).map_err(|e| {
            BackendError::io(
                format!("rename {} to {}", building.display(), dst.display()),
                e,
            )
        })?;
        datadir::sync_dir(&root)?;
        datadir::record(&root, to)?;
        // The parent's learned login roles are the branch's too (same pg_authid): its first
        // wake can then be checked at the proxy like the parent's.
        let roles = |id: &EndpointId| self.data_dir(id).with_extension("roles");
        if datadir::exists(&roles(from))? {
            if let Err(e) = std::fs::copy(roles(from), roles(to)) {
                warn!(endpoint = %to, error = %e, "could not copy the parent's learned roles; they are learned at the first wake");
            }
        }
        let how = match source {
            CopySource::Files => "file copy",
            CopySource::Running(_) => "pg_basebackup",
        };
        info!(parent = %from, endpoint = %to, how, elapsed_ms = t0.elapsed().as_millis() as u64, "branch data copied");
        Ok(BranchCopy::Copied)
    }

    async fn copy_files(&self, src: &Path, building: &Path) -> Result<(), BackendError> {
        template::copy(src, building).await?;
        // A parent that crashed (suspended by its exit) leaves its lock file: the copy is not
        // that postmaster's, and starts with crash recovery like the parent would.
        for stale in ["postmaster.pid", "postmaster.opts"] {
            match std::fs::remove_file(building.join(stale)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(BackendError::io(format!("remove {stale} from the copy"), e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn base_backup(&self, addr: &ComputeAddr, building: &Path) -> Result<(), BackendError> {
        let bins = self.bins()?.clone();
        let program = bins.postgres.with_file_name("pg_basebackup");
        std::fs::create_dir(building)
            .map_err(|e| BackendError::io(format!("create {}", building.display()), e))?;
        std::fs::set_permissions(building, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| BackendError::io(format!("chmod {}", building.display()), e))?;
        self.chown(building)?;
        let mut cmd = self.command(&program);
        cmd.arg("-D")
            .arg(building)
            .args(["-h", addr.host()])
            .args(["-p", &addr.port().unwrap_or(5432).to_string()])
            .args(["-U", &self.cfg.superuser])
            // WAL streamed alongside, so the copy is complete on its own; a fast checkpoint
            // instead of waiting for the next timed one; never prompt for a password.
            .args(["-X", "stream", "-c", "fast", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(pw) = crate::roles::superuser_password(&self.cfg.initdb_args) {
            cmd.env("PGPASSWORD", pw);
        }
        let out = cmd
            .output()
            .await
            .map_err(|e| BackendError::io(format!("run {}", program.display()), e))?;
        if !out.status.success() {
            return Err(BackendError::DataDir {
                path: building.display().to_string(),
                reason: format!(
                    "pg_basebackup failed ({}): {}",
                    out.status,
                    tail(&String::from_utf8_lossy(&out.stderr), 1000)
                ),
            });
        }
        Ok(())
    }

    /// Removes everything `id` has in the data root (its cluster, its record, logs and
    /// learned roles), for an endpoint that is deleted and suspended. The directory is first
    /// renamed away, so a crash midway leaves no half-removed cluster under the endpoint's name.
    pub fn remove_data(&self, id: &EndpointId) -> Result<(), BackendError> {
        let root = &self.cfg.data_root;
        let dir = self.data_dir(id);
        let doomed = root.join(format!(".{id}.deleting"));
        remove_if_exists(&doomed)?;
        if datadir::exists(&dir)? {
            std::fs::rename(&dir, &doomed)
                .map_err(|e| BackendError::io(format!("rename {}", dir.display()), e))?;
            datadir::sync_dir(root)?;
        }
        datadir::unrecord(root, id)?;
        remove_if_exists(&doomed)?;
        for ext in ["log", "log.1", "roles"] {
            let f = root.join(format!("{id}.{ext}"));
            match std::fs::remove_file(&f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(BackendError::io(format!("remove {}", f.display()), e))
                }
                _ => {}
            }
        }
        info!(endpoint = %id, "endpoint data removed");
        Ok(())
    }
}
