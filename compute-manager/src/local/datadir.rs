//! What the local backend remembers about the data it keeps, so that a data directory that
//! once existed is never silently replaced by an empty one (a volume not mounted yet, a disk
//! that did not come up, a directory deleted by mistake):
//!
//! - `data_root/.pgwake-data-root` marks a directory as pgwake's data root. pgwake writes it
//!   only when told to create a data root (`local.create_data_root`), or when it finds a data
//!   root laid out by an older pgwake (endpoint directories and logs, no marker).
//! - `data_root/.pgwake/initialised/<id>` records that `<id>`'s cluster was created (or found
//!   complete). A recorded endpoint whose directory is missing is refused.
//!
//! Both are written to a temporary name, fsynced, renamed into place and the directory fsynced,
//! so that a crash leaves either the old state or the new one. Endpoint ids cannot start with a
//! dot, so none of these names can collide with an endpoint's directory or log.

use std::io::Write;
use std::path::{Path, PathBuf};

use pgwake_router::EndpointId;
use tracing::{error, info, warn};

use crate::BackendError;

/// The marker's file name in the data root.
pub const MARKER: &str = ".pgwake-data-root";
/// The first line of the marker; the second is `format N`.
const MARKER_HEAD: &str = "pgwake data root";
/// The marker layout this pgwake writes and understands.
const FORMAT: u32 = 1;
/// Per-endpoint records, under the data root.
const RECORDS: &str = ".pgwake/initialised";

/// What a data root must look like before any endpoint in it is started.
pub fn check_root(root: &Path, create: bool) -> Result<(), BackendError> {
    match std::fs::read_to_string(root.join(MARKER)) {
        Ok(text) => return check_marker(root, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(BackendError::io(
                format!("read {}", root.join(MARKER).display()),
                e,
            ))
        }
    }
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries
            .map(|e| e.map(|e| (e.file_name(), e.path())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BackendError::io(format!("read {}", root.display()), e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !create {
                return Err(refuse_root(
                    root,
                    "does not exist. If this is pgwake's first start with this data root, set \
                     local.create_data_root = true; otherwise mount or restore it",
                ));
            }
            std::fs::create_dir_all(root)
                .map_err(|e| BackendError::io(format!("create {}", root.display()), e))?;
            info!(data_root = %root.display(), "created the data root");
            Vec::new()
        }
        Err(e) => return Err(BackendError::io(format!("read {}", root.display()), e)),
    };
    if entries.is_empty() {
        if !create {
            return Err(refuse_root(
                root,
                "is empty and has no marker (a volume that is not mounted?). If this is \
                 pgwake's first start with this data root, set local.create_data_root = true; \
                 otherwise mount or restore it",
            ));
        }
        write_marker(root)?;
        info!(data_root = %root.display(), "data root initialised");
        return Ok(());
    }
    // Laid out by a pgwake from before the marker: adopt it, recording every endpoint whose
    // cluster is there. Anything else is someone else's directory.
    let mut clusters = Vec::new();
    for (name, path) in &entries {
        let name = name.to_string_lossy();
        let id = if path.is_dir() {
            if name == ".pgwake" {
                continue;
            }
            name.as_ref()
        } else {
            // `<id>.log`, and `<id>.log.1` where the log was rotated.
            match name
                .strip_suffix(".log")
                .or_else(|| name.strip_suffix(".log.1"))
            {
                Some(id) => id,
                None => return Err(foreign(root, &name)),
            }
        };
        let Ok(id) = EndpointId::parse(id) else {
            return Err(foreign(root, &name));
        };
        if path.is_dir() && exists(&path.join("PG_VERSION"))? {
            clusters.push(id);
        }
    }
    for id in &clusters {
        record(root, id)?;
    }
    write_marker(root)?;
    warn!(
        data_root = %root.display(),
        endpoints = clusters.len(),
        "adopted a data root of an older pgwake (no marker): its endpoints are recorded as initialised"
    );
    Ok(())
}

fn check_marker(root: &Path, text: &str) -> Result<(), BackendError> {
    let mut lines = text.lines();
    let format = (lines.next() == Some(MARKER_HEAD))
        .then(|| {
            lines
                .next()?
                .strip_prefix("format ")?
                .trim()
                .parse::<u32>()
                .ok()
        })
        .flatten();
    match format {
        Some(FORMAT) => Ok(()),
        Some(n) => Err(BackendError::Config(format!(
            "data root {} has format {n}, this pgwake understands {FORMAT}: written by a newer pgwake?",
            root.display()
        ))),
        None => Err(BackendError::DataDir {
            path: root.join(MARKER).display().to_string(),
            reason: "is not a pgwake data root marker".into(),
        }),
    }
}

fn refuse_root(root: &Path, why: &str) -> BackendError {
    error!(data_root = %root.display(), "refusing to start local computes: the data root {why}");
    BackendError::DataMissing {
        path: root.display().to_string(),
        reason: why.into(),
    }
}

fn foreign(root: &Path, name: &str) -> BackendError {
    error!(data_root = %root.display(), entry = name, "refusing to start local computes: the data root has no marker and holds files that are not pgwake's");
    BackendError::DataDir {
        path: root.display().to_string(),
        reason: format!(
            "has no {MARKER} marker and holds {name:?}, which is not pgwake's: point \
             local.data_root at an empty or new directory"
        ),
    }
}

fn write_marker(root: &Path) -> Result<(), BackendError> {
    write_durably(
        root,
        MARKER,
        format!("{MARKER_HEAD}\nformat {FORMAT}\n").as_bytes(),
    )
}

fn record_path(root: &Path, id: &EndpointId) -> PathBuf {
    root.join(RECORDS).join(id.as_str())
}

/// Whether `id`'s cluster was created (or found complete) in this data root.
pub fn is_recorded(root: &Path, id: &EndpointId) -> Result<bool, BackendError> {
    exists(&record_path(root, id))
}

/// Records `id`'s cluster as initialised: from now on its directory must exist.
pub fn record(root: &Path, id: &EndpointId) -> Result<(), BackendError> {
    let dir = root.join(RECORDS);
    std::fs::create_dir_all(&dir)
        .map_err(|e| BackendError::io(format!("create {}", dir.display()), e))?;
    write_durably(&dir, id.as_str(), b"initialised\n")
}

/// Forgets `id`'s record, once its directory is gone (a deleted endpoint): the id may be
/// created again, as a new cluster.
pub fn unrecord(root: &Path, id: &EndpointId) -> Result<(), BackendError> {
    let path = record_path(root, id);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(&root.join(RECORDS)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackendError::io(format!("remove {}", path.display()), e)),
    }
}

/// Whether `path` exists; an error other than "not found" (permissions) is not a "no".
pub fn exists(path: &Path) -> Result<bool, BackendError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(BackendError::io(format!("stat {}", path.display()), e)),
    }
}

/// Writes `dir/name` so that after a crash it either holds `contents` or is as before.
pub(crate) fn write_durably(dir: &Path, name: &str, contents: &[u8]) -> Result<(), BackendError> {
    // The callers serialise data-root changes, so one temporary name per target suffices.
    let tmp = dir.join(format!("{name}.tmp"));
    let target = dir.join(name);
    let io = |what: &str, p: &Path, e| BackendError::io(format!("{what} {}", p.display()), e);
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
    f.write_all(contents).map_err(|e| io("write", &tmp, e))?;
    f.sync_all().map_err(|e| io("fsync", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, &target).map_err(|e| io("rename to", &target, e))?;
    sync_dir(dir)
}

/// Makes a rename or creation in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), BackendError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BackendError::io(format!("fsync {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackendErrorKind;

    fn id(s: &str) -> EndpointId {
        EndpointId::parse(s).unwrap()
    }

    #[test]
    fn a_missing_or_empty_root_is_created_only_when_allowed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        let err = check_root(&root, false).unwrap_err();
        assert!(matches!(err, BackendError::DataMissing { .. }), "{err}");
        assert!(!root.exists(), "refused, and not created");
        std::fs::create_dir(&root).unwrap();
        let err = check_root(&root, false).unwrap_err();
        assert!(matches!(err, BackendError::DataMissing { .. }), "{err}");
        assert!(!root.join(MARKER).exists());

        check_root(&root, true).unwrap();
        assert!(root.join(MARKER).is_file());
        // Marked: fine from now on, whatever create says.
        check_root(&root, false).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        check_root(&root, true).unwrap();
        assert!(root.join(MARKER).is_file());
    }

    #[test]
    fn an_older_pgwakes_data_root_is_adopted_with_its_clusters_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir(root.join("demo")).unwrap();
        std::fs::write(root.join("demo/PG_VERSION"), "15\n").unwrap();
        std::fs::write(root.join("demo.log"), "log\n").unwrap();
        std::fs::write(root.join("demo.log.1"), "older log\n").unwrap();
        // An initdb that failed under the old pgwake left an empty directory: not a cluster.
        std::fs::create_dir(root.join("other")).unwrap();
        check_root(root, false).unwrap();
        assert!(root.join(MARKER).is_file());
        assert!(is_recorded(root, &id("demo")).unwrap());
        assert!(!is_recorded(root, &id("other")).unwrap());
    }

    #[test]
    fn a_foreign_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("lost+found")).unwrap();
        let err = check_root(tmp.path(), true).unwrap_err();
        assert!(matches!(err, BackendError::DataDir { .. }), "{err}");
        assert!(!tmp.path().join(MARKER).exists());
        std::fs::remove_dir(tmp.path().join("lost+found")).unwrap();
        std::fs::write(tmp.path().join("notes.txt"), "x").unwrap();
        assert!(check_root(tmp.path(), true).is_err());
    }

    #[test]
    fn a_marker_from_a_newer_format_or_garbage_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(MARKER), "pgwake data root\nformat 2\n").unwrap();
        let err = check_root(tmp.path(), true).unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
        std::fs::write(tmp.path().join(MARKER), "").unwrap();
        assert!(check_root(tmp.path(), true).is_err());
    }

    #[test]
    fn records_are_durable_files_per_endpoint() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(!is_recorded(tmp.path(), &id("a")).unwrap());
        record(tmp.path(), &id("a")).unwrap();
        record(tmp.path(), &id("a")).unwrap();
        assert!(is_recorded(tmp.path(), &id("a")).unwrap());
        assert!(!is_recorded(tmp.path(), &id("b")).unwrap());
        let left: Vec<_> = std::fs::read_dir(tmp.path().join(RECORDS))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("a")],
            "no temporary left"
        );
    }
}
