//! What a reload of the config file (SIGHUP) does: which changed keys the running process takes
//! over, which need a restart, and whether the new endpoint list removes so much that the file
//! is more likely cut short than edited on purpose.

use std::collections::{BTreeSet, HashSet};
use std::fmt;

use crate::config::{Config, ConfigErrors};

/// One key of the config file, `[section] key`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigKey {
    pub section: String,
    pub key: String,
}

impl fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.section, self.key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
    #[error(
        "the new file defines no endpoint: it would remove all {before} (a truncated or empty \
         file?); to apply it anyway, set force = true under [reload] in the file"
    )]
    RemovesAll { before: usize },
    #[error(
        "the new file removes {removed} of the {before} endpoints, more than [reload] \
         max_removed_share = {max_share}; to apply it anyway, set force = true under [reload] \
         in the file"
    )]
    RemovesTooMany {
        removed: usize,
        before: usize,
        max_share: f64,
    },
}

/// The outcome of comparing the running config with a new file.
#[derive(Debug)]
pub struct ReloadPlan {
    /// What the process runs with afterwards: the new file's endpoints and live keys, the
    /// running values of everything that needs a restart.
    pub running: Config,
    /// Changed keys that take effect now.
    pub applied: Vec<ConfigKey>,
    /// Changed keys that take effect only after a restart.
    pub needs_restart: Vec<ConfigKey>,
    /// Endpoints of the running file that the new one lacks.
    pub removed: usize,
    /// `Some(before)`: more was removed than the guard allows, applied because of
    /// `[reload] force = true`.
    pub forced: Option<usize>,
}

/// Whether a changed `[section] key` can take effect in a running process.
fn applies_live(section: &str, key: &str, running: &Config) -> bool {
    match (section, key) {
        // Sizes a semaphore at start.
        ("limits", "max_pending_startups") => false,
        // Read on every connection.
        ("limits", _) => true,
        // Read by the next reload.
        ("reload", _) => true,
        // The in-process manager reads these per wake / per start.
        (
            "compute",
            "idle_timeout"
            | "max_waiting_per_endpoint"
            | "max_starts_per_minute"
            | "deep_sleep_after"
            | "max_frozen_memory",
        ) => true,
        // Through a shared manager the wait is the HTTP client's, built at start.
        ("compute", "wake_timeout") => running.compute.manager_url.is_none(),
        // Listeners, backends, TLS, the manager service: built once at start.
        _ => false,
    }
}

/// Compares `new` with the `running` config. Refuses (changing nothing) a file that removes
/// every endpoint, or more than `[reload] max_removed_share` of them, unless that file sets
/// `[reload] force = true`.
pub fn plan(running: &Config, new: Config) -> Result<ReloadPlan, ReloadError> {
    let before = running.endpoints.len();
    let keep: HashSet<_> = new.endpoints.iter().map(|e| &e.id).collect();
    let removed = running
        .endpoints
        .iter()
        .filter(|e| !keep.contains(&e.id))
        .count();
    let policy = &new.reload;
    let refusal = if before > 0 && new.endpoints.is_empty() {
        Some(ReloadError::RemovesAll { before })
    } else if removed as f64 > policy.max_removed_share * before as f64 {
        Some(ReloadError::RemovesTooMany {
            removed,
            before,
            max_share: policy.max_removed_share,
        })
    } else {
        None
    };
    let forced = match refusal {
        Some(e) if !policy.force => return Err(e),
        Some(_) => Some(before),
        None => None,
    };

    let (mut applied, mut needs_restart) = (Vec::new(), Vec::new());
    let mut merged = running.file.clone();
    for k in changed_keys(&running.file, &new.file) {
        if !applies_live(&k.section, &k.key, running) {
            needs_restart.push(k);
            continue;
        }
        let section = merged
            .entry(k.section.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if let (Some(t), value) = (section.as_table_mut(), section_key(&new.file, &k)) {
            match value {
                Some(v) => t.insert(k.key.clone(), v.clone()),
                None => t.remove(&k.key),
            };
        }
        applied.push(k);
    }
    match new.file.get("endpoint") {
        Some(e) => merged.insert("endpoint".into(), e.clone()),
        None => merged.remove("endpoint"),
    };
    // The running values of the sections with live keys, from the running file with the
    // new file's live keys in it (so a key that needs a restart keeps its running value).
    let m = Config::from_file(merged)?;
    let running = Config {
        compute: m.compute,
        limits: m.limits,
        reload: m.reload,
        endpoints: m.endpoints,
        endpoint_auth: m.endpoint_auth,
        file: m.file,
        ..running.clone()
    };
    Ok(ReloadPlan {
        running,
        applied,
        needs_restart,
        removed,
        forced,
    })
}

fn section_key<'a>(file: &'a toml::Table, k: &ConfigKey) -> Option<&'a toml::Value> {
    file.get(&k.section)?.as_table()?.get(&k.key)
}

/// Every `[section] key` whose text differs between two files, endpoints aside (the routing
/// table reports those). A key written out with its default value counts as changed.
fn changed_keys(old: &toml::Table, new: &toml::Table) -> Vec<ConfigKey> {
    let empty = toml::Table::new();
    let table = |f: &toml::Table, s: &str| {
        f.get(s)
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_else(|| empty.clone())
    };
    let sections: BTreeSet<&String> = old
        .keys()
        .chain(new.keys())
        .filter(|s| *s != "endpoint")
        .collect();
    let mut changed = Vec::new();
    for s in sections {
        let (o, n) = (table(old, s), table(new, s));
        let keys: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
        for k in keys {
            if o.get(k) != n.get(k) {
                changed.push(ConfigKey {
                    section: s.clone(),
                    key: k.clone(),
                });
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn endpoints(ids: &[&str]) -> String {
        ids.iter()
            .map(|id| format!("[[endpoint]]\nid = \"{id}\"\nbackend = \"local\"\n"))
            .collect()
    }

    fn cfg(text: &str) -> Config {
        Config::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn an_empty_or_truncated_file_is_refused_unless_forced() {
        let running = cfg(&endpoints(&["a", "b", "c", "d"]));
        let e = plan(&running, cfg("")).unwrap_err();
        assert!(matches!(e, ReloadError::RemovesAll { before: 4 }), "{e}");
        assert!(e.to_string().contains("all 4"), "{e}");
        // Cut short after the first endpoint: 3 of 4 removed.
        let e = plan(&running, cfg(&endpoints(&["a"]))).unwrap_err();
        assert!(
            matches!(
                e,
                ReloadError::RemovesTooMany {
                    removed: 3,
                    before: 4,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("3 of the 4"), "{e}");
        // Half is allowed by default; more is allowed when the file says so.
        assert_eq!(
            plan(&running, cfg(&endpoints(&["a", "b"])))
                .unwrap()
                .removed,
            2
        );
        let lenient = format!("[reload]\nmax_removed_share = 0.8\n{}", endpoints(&["a"]));
        assert_eq!(plan(&running, cfg(&lenient)).unwrap().removed, 3);
        let p = plan(&running, cfg("[reload]\nforce = true\n")).unwrap();
        assert_eq!((p.removed, p.forced), (4, Some(4)));
        assert!(p.running.endpoints.is_empty());
        // An empty table stays empty: nothing to remove.
        assert!(plan(&cfg(""), cfg("")).is_ok());
    }

    #[test]
    fn live_keys_apply_and_the_rest_is_named_and_kept() {
        let running = cfg(&format!(
            "[proxy]\nlisten = \"127.0.0.1:4000\"\n[compute]\nidle_timeout = \"300s\"\n{}",
            endpoints(&["a"])
        ));
        let new = format!(
            "[proxy]\nlisten = \"127.0.0.1:5000\"\nstartup_timeout = \"3s\"\n\
             [compute]\nidle_timeout = \"20s\"\nactivity_interval = \"1s\"\n\
             [limits]\nmax_connections_per_endpoint = 7\n[admin]\nlisten = \"127.0.0.1:9\"\n{}",
            endpoints(&["a", "b"])
        );
        let p = plan(&running, cfg(&new)).unwrap();
        let names = |v: &[ConfigKey]| v.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(&p.applied),
            [
                "[compute] idle_timeout",
                "[limits] max_connections_per_endpoint"
            ]
        );
        assert_eq!(
            names(&p.needs_restart),
            [
                "[admin] listen",
                "[compute] activity_interval",
                "[proxy] listen",
                "[proxy] startup_timeout"
            ]
        );
        let r = &p.running;
        assert_eq!(r.compute.idle_timeout, Duration::from_secs(20));
        assert_eq!(r.limits.max_connections_per_endpoint, 7);
        assert_eq!(r.endpoints.len(), 2);
        assert_eq!(r.compute.activity_interval, Duration::from_secs(5), "kept");
        assert_eq!(r.proxy.listen.port(), 4000, "kept");
        assert!(r.admin.listen.is_none(), "kept");
        // The same file again: what was applied is no change, what was not is named again.
        let again = plan(r, cfg(&new)).unwrap();
        assert!(again.applied.is_empty(), "{:?}", again.applied);
        assert_eq!(names(&again.needs_restart), names(&p.needs_restart));
    }

    #[test]
    fn wake_timeout_is_live_only_for_the_in_process_manager() {
        let shared = "[compute]\nmanager_url = \"http://m:9188\"\n";
        let p = plan(
            &cfg(shared),
            cfg(&format!("{shared}wake_timeout = \"5s\"\n")),
        )
        .unwrap();
        assert_eq!(p.needs_restart[0].to_string(), "[compute] wake_timeout");
        assert_eq!(p.running.compute.wake_timeout, Duration::from_secs(30));
        let p = plan(&cfg(""), cfg("[compute]\nwake_timeout = \"5s\"\n")).unwrap();
        assert_eq!(p.applied[0].to_string(), "[compute] wake_timeout");
        assert_eq!(p.running.compute.wake_timeout, Duration::from_secs(5));
    }
}
