//! The local backend's list of the endpoints it created through the API:
//! `<data_root>/.pgwake/endpoints.json`, next to the data it describes (a data root moved or
//! restored brings its endpoints along). Every change is written to a temporary file, fsynced
//! and renamed into place, so a crash leaves the old list or the new one. A file that cannot
//! be read is an error at start, never an empty list: the endpoints in it would vanish from
//! the routing table, and the next write would drop them for good.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use pgwake_router::{AuthMode, BackendSpec, EndpointConfig, EndpointId};
use serde::{Deserialize, Serialize, Serializer};

/// The layout this pgwake writes and understands.
const FORMAT: u32 = 1;
/// Largest state file read: some 100,000 endpoints; anything bigger is not ours.
const MAX_FILE: u64 = 64 * 1024 * 1024;

/// One endpoint created through the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEndpoint {
    #[serde(serialize_with = "id_str")]
    pub id: EndpointId,
    /// The endpoint it was branched from.
    #[serde(default, serialize_with = "opt_id_str")]
    pub parent: Option<EndpointId>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Light sleep's override; absent in files written before light sleep.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub deep_sleep_after: Option<Duration>,
    #[serde(default)]
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub auth: Option<AuthMode>,
    #[serde(default)]
    pub roles_file: Option<PathBuf>,
    #[serde(default)]
    pub allow: Vec<ipnet::IpNet>,
    /// `postgres -c` settings.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

fn id_str<S: Serializer>(id: &EndpointId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(id.as_str())
}

fn opt_id_str<S: Serializer>(id: &Option<EndpointId>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.serialize_some(id.as_str()),
        None => s.serialize_none(),
    }
}

impl StoredEndpoint {
    /// As an `[[endpoint]]` of the local backend.
    pub fn config(&self) -> EndpointConfig {
        EndpointConfig {
            id: self.id.clone(),
            backend: BackendSpec::Local {
                settings: self.settings.clone(),
            },
            idle_timeout: self.idle_timeout,
            deep_sleep_after: self.deep_sleep_after,
            allow: self.allow.clone(),
            max_connections: self.max_connections,
            auth: self.auth,
            roles_file: self.roles_file.clone(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct FileBody {
    format: u32,
    endpoints: Vec<StoredEndpoint>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: unreadable ({reason}); it lists the endpoints created through the API. \
         Restore it from a backup or fix it by hand; pgwake does not start without it",
        path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// The file and what it holds (read once at start, then written through).
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    entries: Mutex<Vec<StoredEndpoint>>,
}

impl StateFile {
    /// The state file of a data root.
    pub fn path_in(data_root: &Path) -> PathBuf {
        data_root.join(".pgwake").join("endpoints.json")
    }

    /// Reads `path`; a missing file is an empty list.
    pub fn open(path: PathBuf) -> Result<Self, StateFileError> {
        let entries = Self::read(&path)?;
        Ok(Self {
            path,
            entries: Mutex::new(entries),
        })
    }

    fn read(path: &Path) -> Result<Vec<StoredEndpoint>, StateFileError> {
        let path = path.to_path_buf();
        let io = |source| StateFileError::Io {
            path: path.clone(),
            source,
        };
        let entries = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
            Ok(m) if m.len() > MAX_FILE => {
                return Err(StateFileError::Corrupt {
                    path,
                    reason: format!("larger than {MAX_FILE} bytes"),
                })
            }
            Ok(_) => {
                let text = std::fs::read(&path).map_err(io)?;
                let body: FileBody =
                    serde_json::from_slice(&text).map_err(|e| StateFileError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if body.format != FORMAT {
                    return Err(StateFileError::Corrupt {
                        path,
                        reason: format!(
                            "format {}, this pgwake understands {FORMAT}: written by a newer pgwake?",
                            body.format
                        ),
                    });
                }
                body.endpoints
            }
        };
        Ok(entries)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<StoredEndpoint>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<StoredEndpoint> {
        self.lock().clone()
    }

    pub fn get(&self, id: &EndpointId) -> Option<StoredEndpoint> {
        self.lock().iter().find(|e| &e.id == id).cloned()
    }

    /// Adds (or replaces) `e`, on disk first. The change applies to the file as it is now,
    /// not to what was read at start: a data root mounted after the start (its file unseen
    /// then) keeps every endpoint it lists.
    pub fn insert(&self, e: StoredEndpoint) -> Result<(), StateFileError> {
        let mut entries = self.lock();
        let mut next = Self::read(&self.path)?;
        next.retain(|x| x.id != e.id);
        next.push(e);
        self.write(&next)?;
        *entries = next;
        Ok(())
    }

    /// Removes `id`, on disk first. Returns whether it was there.
    pub fn remove(&self, id: &EndpointId) -> Result<bool, StateFileError> {
        let mut entries = self.lock();
        let current = Self::read(&self.path)?;
        if !current.iter().any(|e| &e.id == id) {
            *entries = current;
            return Ok(false);
        }
        let next: Vec<_> = current.into_iter().filter(|e| &e.id != id).collect();
        self.write(&next)?;
        *entries = next;
        Ok(true)
    }

    fn write(&self, entries: &[StoredEndpoint]) -> Result<(), StateFileError> {
        let io = |source| StateFileError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let body = FileBody {
            format: FORMAT,
            endpoints: entries.to_vec(),
        };
        let mut text = serde_json::to_vec_pretty(&body).map_err(|e| io(e.into()))?;
        text.push(b'\n');
        let name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("endpoints.json");
        crate::local::write_durably(dir, name, &text)
            .map_err(|e| io(std::io::Error::other(e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, parent: Option<&str>) -> StoredEndpoint {
        StoredEndpoint {
            id: EndpointId::parse(id).unwrap(),
            parent: parent.map(|p| EndpointId::parse(p).unwrap()),
            created_at: 1_700_000_000,
            idle_timeout: Some(Duration::from_secs(90)),
            deep_sleep_after: None,
            max_connections: Some(5),
            auth: Some(AuthMode::Passthrough),
            roles_file: None,
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            settings: BTreeMap::from([("work_mem".into(), "8MB".into())]),
        }
    }

    #[test]
    fn entries_survive_a_reopen_and_no_temporary_is_left() {
        let tmp = tempfile::tempdir().unwrap();
        let path = StateFile::path_in(tmp.path());
        let f = StateFile::open(path.clone()).unwrap();
        assert!(f.list().is_empty(), "a missing file is an empty list");
        f.insert(entry("main-dev", Some("main"))).unwrap();
        f.insert(entry("other", None)).unwrap();
        assert!(f.remove(&EndpointId::parse("other").unwrap()).unwrap());
        assert!(!f.remove(&EndpointId::parse("other").unwrap()).unwrap());

        let again = StateFile::open(path.clone()).unwrap();
        assert_eq!(again.list(), vec![entry("main-dev", Some("main"))]);
        let c = again.list()[0].config();
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(90)));
        assert!(
            matches!(c.backend, BackendSpec::Local { ref settings } if settings["work_mem"] == "8MB")
        );
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["endpoints.json".to_string()]);
    }

    #[test]
    fn a_corrupt_or_newer_file_is_an_error_and_left_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        let path = StateFile::path_in(tmp.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        for text in [
            "{\"format\":1,\"endpoints\":[{\"id\":\"a\"",
            "",
            "{\"format\":1,\"endpoints\":[{\"id\":\"Not Valid\",\"created_at\":1}]}",
            "{\"format\":2,\"endpoints\":[]}",
        ] {
            std::fs::write(&path, text).unwrap();
            let err = StateFile::open(path.clone()).unwrap_err();
            assert!(
                matches!(err, StateFileError::Corrupt { .. }),
                "{text}: {err}"
            );
            assert!(err.to_string().contains("endpoints.json"), "{err}");
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                text,
                "not rewritten"
            );
        }
    }

    #[test]
    fn a_change_applies_to_the_file_as_it_is_now() {
        let tmp = tempfile::tempdir().unwrap();
        let path = StateFile::path_in(tmp.path());
        // Opened before the file existed (a data root mounted later) ...
        let late = StateFile::open(path.clone()).unwrap();
        StateFile::open(path.clone())
            .unwrap()
            .insert(entry("first", None))
            .unwrap();
        // ... still keeps what the file lists when it writes.
        late.insert(entry("second", None)).unwrap();
        let ids: Vec<String> = StateFile::open(path.clone())
            .unwrap()
            .list()
            .iter()
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(ids, ["first", "second"]);
        assert_eq!(late.list().len(), 2);
        // A file that turned unreadable is not overwritten.
        std::fs::write(&path, "{").unwrap();
        assert!(late.insert(entry("third", None)).is_err());
        assert!(late.remove(&EndpointId::parse("first").unwrap()).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{");
    }

    #[test]
    fn a_failed_write_changes_nothing_in_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let f = StateFile::open(StateFile::path_in(tmp.path())).unwrap();
        // The state file's directory is a file: every write fails.
        std::fs::write(tmp.path().join(".pgwake"), "").unwrap();
        assert!(f.insert(entry("a", None)).is_err());
        assert!(f.list().is_empty());
    }
}
