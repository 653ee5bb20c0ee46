//! Which roles may log in to which endpoint, and with what SCRAM verifier: the proxy checks
//! passwords with these before it wakes anything.
//!
//! Sources per endpoint, merged at lookup:
//! - `[[endpoint]] roles_file = "..."`: a file in pgbouncer's `auth_file` format, re-read with
//!   the routing table (SIGHUP);
//! - a Kubernetes Secret named by the endpoint's `PgwakeEndpoint` (`spec.rolesSecret`, same
//!   format), kept in a map of its own by [`VerifierStore::set_secret`] so that config reloads
//!   leave it alone;
//! - learned from the compute itself (`pg_authid`, local backend), which wins over the others
//!   for a role they share: it is what the compute will accept.
//!
//! Precedence for a role: learned > Secret > file. An endpoint is routed from one source (the
//! config file wins over a `PgwakeEndpoint` of the same name), so the Secret and the file do
//! not meet in practice; the mode is the file's when the file configures the endpoint, else
//! the `PgwakeEndpoint`'s.
//!
//! `auth = "passthrough"` keeps the old behaviour for an endpoint: no check at the proxy, the
//! compute authenticates (needed for `trust` demos). The default is `scram` for an endpoint
//! with a `roles_file` and `passthrough` otherwise; see [`EndpointAuth::mode`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use pgwake_router::{EndpointConfig, EndpointId};
use serde::Deserialize;

use crate::scram::{Verifier, VerifierError};

/// Largest roles file read; a real one is a few KiB.
pub const MAX_ROLES_FILE: u64 = 16 * 1024 * 1024;
/// Longest role name PostgreSQL allows (NAMEDATALEN - 1).
pub const MAX_ROLE_LEN: usize = 63;

pub use pgwake_router::AuthMode;

/// The auth keys of one `[[endpoint]]` table (the router reads the rest of it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EndpointAuth {
    pub id: EndpointId,
    #[serde(default)]
    pub auth: Option<AuthMode>,
    #[serde(default)]
    pub roles_file: Option<PathBuf>,
}

impl From<&EndpointConfig> for EndpointAuth {
    fn from(e: &EndpointConfig) -> Self {
        Self {
            id: e.id.clone(),
            auth: e.auth,
            roles_file: e.roles_file.clone(),
        }
    }
}

impl EndpointAuth {
    /// `auth` as written, else `scram` when the endpoint has a roles file to check against,
    /// else `passthrough` (so existing configs, the `trust` demo among them, keep working).
    pub fn mode(&self) -> AuthMode {
        self.auth.unwrap_or(if self.roles_file.is_some() {
            AuthMode::Scram
        } else {
            AuthMode::Passthrough
        })
    }
}

/// Role name → verifier.
pub type RoleMap = HashMap<String, Verifier>;

/// A problem in a roles file. Never contains a verifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolesFileError {
    #[error("{path}: {error}")]
    Read { path: PathBuf, error: String },
    #[error("{path}: larger than {MAX_ROLES_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("line {line}: expected \"role\" \"SCRAM-SHA-256$...\"")]
    Syntax { line: usize },
    #[error("line {line}: role name is empty or longer than {MAX_ROLE_LEN} bytes")]
    RoleName { line: usize },
    #[error("line {line}: role {role:?}: {error}")]
    Verifier {
        line: usize,
        role: String,
        error: VerifierError,
    },
    #[error("line {line}: role {role:?} is listed twice")]
    Duplicate { line: usize, role: String },
}

/// Parses pgbouncer's `auth_file` format: `"role" "verifier"` per line (a `"` inside a field is
/// written `""`), blank lines and lines starting with `;` or `#` ignored. Every bad line is
/// reported.
pub fn parse_roles_file(text: &str) -> Result<RoleMap, Vec<RolesFileError>> {
    let mut roles = RoleMap::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with(';') || l.starts_with('#') {
            continue;
        }
        let Some((role, rest)) = quoted(l) else {
            errors.push(RolesFileError::Syntax { line });
            continue;
        };
        let Some((secret, rest)) = quoted(rest.trim_start()) else {
            errors.push(RolesFileError::Syntax { line });
            continue;
        };
        // pgbouncer allows more fields after the password; nothing here uses them.
        if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
            errors.push(RolesFileError::Syntax { line });
            continue;
        }
        if role.is_empty() || role.len() > MAX_ROLE_LEN {
            errors.push(RolesFileError::RoleName { line });
            continue;
        }
        match secret.parse::<Verifier>() {
            Ok(v) => {
                if roles.insert(role.clone(), v).is_some() {
                    errors.push(RolesFileError::Duplicate { line, role });
                }
            }
            Err(error) => errors.push(RolesFileError::Verifier { line, role, error }),
        }
    }
    if errors.is_empty() {
        Ok(roles)
    } else {
        Err(errors)
    }
}

/// A `"..."` field at the start of `s` (with `""` for a quote) and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut rest = s.strip_prefix('"')?;
    let mut out = String::new();
    loop {
        let end = rest.find('"')?;
        out.push_str(&rest[..end]);
        rest = &rest[end + 1..];
        match rest.strip_prefix('"') {
            Some(after) => {
                out.push('"');
                rest = after;
            }
            None => return Some((out, rest)),
        }
    }
}

/// Reads and parses a roles file, refusing oversized ones before reading them.
pub fn read_roles_file(path: &Path) -> Result<RoleMap, Vec<RolesFileError>> {
    let read_err = |e: std::io::Error| {
        vec![RolesFileError::Read {
            path: path.to_owned(),
            error: e.to_string(),
        }]
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.len() > MAX_ROLES_FILE {
        return Err(vec![RolesFileError::TooLarge {
            path: path.to_owned(),
        }]);
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse_roles_file(&text).map_err(|errs| {
        errs.into_iter()
            .map(|e| RolesFileError::Read {
                path: path.to_owned(),
                error: e.to_string(),
            })
            .collect()
    })
}

#[derive(Debug, Default)]
struct Entry {
    mode: Option<AuthMode>,
    file: Arc<RoleMap>,
    learned: Arc<RoleMap>,
}

/// What the proxy knows about a login before running SCRAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// No check at the proxy.
    Passthrough,
    /// Check against this verifier.
    Known(Verifier),
    /// SCRAM endpoint, but no such role: run the mock exchange.
    UnknownRole,
}

/// What a `PgwakeEndpoint` says about its logins.
#[derive(Debug)]
struct SecretEntry {
    mode: AuthMode,
    roles: Arc<RoleMap>,
}

/// Verifiers of every endpoint. Lookups are lock-free (sharded map, `Arc`ed role maps).
#[derive(Debug, Default)]
pub struct VerifierStore {
    entries: DashMap<EndpointId, Entry>,
    /// Endpoints from `PgwakeEndpoint`s: their mode and the roles of their Secret.
    secrets: DashMap<EndpointId, SecretEntry>,
    /// Whether an endpoint of the config file uses `scram` (set by each load).
    scram_in_config: AtomicBool,
    /// Whether a `PgwakeEndpoint` has used `scram` since start. Never cleared: a deployment
    /// that protects endpoints keeps hiding which ids exist after one of them goes.
    scram_in_secrets: AtomicBool,
}

impl VerifierStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Makes the configured endpoints exactly `configs` (their modes and roles files), reading
    /// every roles file first: on any error nothing changes and every error is returned.
    /// Learned verifiers are kept.
    pub fn load_config(&self, configs: &[EndpointAuth]) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let mut files = Vec::with_capacity(configs.len());
        for c in configs {
            match &c.roles_file {
                Some(path) => match read_roles_file(path) {
                    Ok(map) => files.push(Arc::new(map)),
                    Err(errs) => errors.extend(
                        errs.into_iter()
                            .map(|e| format!("endpoint {:?}: roles_file {e}", c.id.as_str())),
                    ),
                },
                None => files.push(Arc::default()),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let keep: std::collections::HashSet<&EndpointId> = configs.iter().map(|c| &c.id).collect();
        for (c, file) in configs.iter().zip(files) {
            let mut e = self.entries.entry(c.id.clone()).or_default();
            e.mode = Some(c.mode());
            e.file = file;
        }
        self.scram_in_config.store(
            configs.iter().any(|c| c.mode() == AuthMode::Scram),
            Ordering::Relaxed,
        );
        self.entries.retain(|id, e| {
            if !keep.contains(id) {
                e.mode = None;
                e.file = Arc::default();
            }
            // Learned verifiers outlive a config reload (the compute still has the roles).
            !e.learned.is_empty() || e.mode.is_some()
        });
        Ok(())
    }

    /// Whether any endpoint checks logins at the proxy: then an unknown endpoint id is
    /// answered like a wrong password unless `[auth] hide_unknown_endpoints` says otherwise
    /// (telling it apart would let a scanner list the protected ids). O(1).
    pub fn has_scram_endpoints(&self) -> bool {
        self.scram_in_config.load(Ordering::Relaxed)
            || self.scram_in_secrets.load(Ordering::Relaxed)
    }

    /// Endpoints configured with `auth = "scram"`: those whose computes' roles are worth
    /// learning.
    pub fn scram_endpoints(&self) -> Vec<EndpointId> {
        self.entries
            .iter()
            .filter(|e| e.mode == Some(AuthMode::Scram))
            .map(|e| e.key().clone())
            .collect()
    }

    /// What was learned from `endpoint`'s compute.
    pub fn learned(&self, endpoint: &EndpointId) -> Arc<RoleMap> {
        self.entries
            .get(endpoint)
            .map(|e| Arc::clone(&e.learned))
            .unwrap_or_default()
    }

    /// Replaces what was learned from `endpoint`'s compute.
    pub fn set_learned(&self, endpoint: &EndpointId, roles: RoleMap) {
        self.entries.entry(endpoint.clone()).or_default().learned = Arc::new(roles);
    }

    /// `endpoint` is a `PgwakeEndpoint` with auth `mode`: until [`Self::set_secret_roles`],
    /// a scram one has no roles (every login refused). The roles already known stay.
    pub fn set_secret_mode(&self, endpoint: &EndpointId, mode: AuthMode) {
        if mode == AuthMode::Scram {
            self.scram_in_secrets.store(true, Ordering::Relaxed);
        }
        self.secrets
            .entry(endpoint.clone())
            .and_modify(|e| e.mode = mode)
            .or_insert_with(|| SecretEntry {
                mode,
                roles: Arc::default(),
            });
    }

    /// The roles of `endpoint`'s Secret (empty: nobody may log in). Ignored for an endpoint
    /// without [`Self::set_secret_mode`], i.e. one removed meanwhile.
    pub fn set_secret_roles(&self, endpoint: &EndpointId, roles: RoleMap) {
        if let Some(mut e) = self.secrets.get_mut(endpoint) {
            e.roles = Arc::new(roles);
        }
    }

    /// The roles of `endpoint`'s Secret as last set.
    pub fn secret_roles(&self, endpoint: &EndpointId) -> Arc<RoleMap> {
        self.secrets
            .get(endpoint)
            .map(|e| Arc::clone(&e.roles))
            .unwrap_or_default()
    }

    /// `endpoint` is no longer a `PgwakeEndpoint`.
    pub fn remove_secret(&self, endpoint: &EndpointId) {
        self.secrets.remove(endpoint);
    }

    /// How to check `role` at `endpoint`; `None` when the store has no mode for the endpoint
    /// (not in the config file, not a `PgwakeEndpoint`: the caller decides).
    pub fn lookup(&self, endpoint: &EndpointId, role: &str) -> Option<Lookup> {
        let e = self.entries.get(endpoint);
        let s = self.secrets.get(endpoint);
        let mode = e
            .as_ref()
            .and_then(|e| e.mode)
            .or_else(|| s.as_ref().map(|s| s.mode))?;
        if mode == AuthMode::Passthrough {
            return Some(Lookup::Passthrough);
        }
        let found = e
            .as_ref()
            .and_then(|e| e.learned.get(role))
            .or_else(|| s.as_ref().and_then(|s| s.roles.get(role)))
            .or_else(|| e.as_ref().and_then(|e| e.file.get(role)));
        Some(match found {
            Some(v) => Lookup::Known(v.clone()),
            None => Lookup::UnknownRole,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(pw: &str) -> String {
        postgres_protocol::password::scram_sha_256(pw.as_bytes())
    }

    fn id(s: &str) -> EndpointId {
        EndpointId::parse(s).unwrap()
    }

    #[test]
    fn parses_pgbouncer_auth_file() {
        let (a, b) = (v("a"), v("b"));
        let text =
            format!("; comment\n# another\n\n\"alice\" \"{a}\"\n  \"bo\"\"b\"   \"{b}\" \"\"\n");
        let roles = parse_roles_file(&text).unwrap();
        assert_eq!(roles.len(), 2);
        assert_eq!(roles["alice"].to_string(), a);
        assert_eq!(roles["bo\"b"].to_string(), b);
    }

    #[test]
    fn every_bad_line_is_reported_without_secrets() {
        let a = v("a");
        let text = format!(
            "alice {a}\n\"alice\" \"md5abc\"\n\"\" \"{a}\"\n\"x\" \"{a}\"\n\"x\" \"{a}\"\n\"open\n\"y\" \"{a}\"junk\n"
        );
        let errs = parse_roles_file(&text).unwrap_err();
        let lines: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 6, "{lines:#?}");
        assert!(matches!(errs[0], RolesFileError::Syntax { line: 1 }));
        assert!(matches!(
            errs[1],
            RolesFileError::Verifier {
                line: 2,
                error: VerifierError::NotScram,
                ..
            }
        ));
        assert!(matches!(errs[2], RolesFileError::RoleName { line: 3 }));
        assert!(matches!(errs[3], RolesFileError::Duplicate { line: 5, .. }));
        assert!(matches!(errs[4], RolesFileError::Syntax { line: 6 }));
        assert!(matches!(errs[5], RolesFileError::Syntax { line: 7 }));
        for l in lines {
            assert!(!l.contains("SCRAM-SHA-256$4096"), "{l}");
        }
    }

    #[test]
    fn default_mode_keeps_configs_without_roles_working() {
        let e = |auth, roles_file: Option<&str>| EndpointAuth {
            id: id("e"),
            auth,
            roles_file: roles_file.map(PathBuf::from),
        };
        assert_eq!(e(None, None).mode(), AuthMode::Passthrough);
        assert_eq!(e(None, Some("r")).mode(), AuthMode::Scram);
        assert_eq!(e(Some(AuthMode::Scram), None).mode(), AuthMode::Scram);
        assert_eq!(
            e(Some(AuthMode::Passthrough), Some("r")).mode(),
            AuthMode::Passthrough
        );
        // Parsed from a whole [[endpoint]] table, whose other keys belong to the router.
        let t: EndpointAuth = toml::from_str(
            "id = \"e\"\nbackend = \"local\"\nauth = \"scram\"\nroles_file = \"/x\"",
        )
        .unwrap();
        assert_eq!(t.mode(), AuthMode::Scram);
        assert!(toml::from_str::<EndpointAuth>("id = \"e\"\nauth = \"md5\"").is_err());
    }

    #[test]
    fn store_reload_is_all_or_nothing_and_learned_roles_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roles");
        std::fs::write(&path, format!("\"alice\" \"{}\"\n", v("file"))).unwrap();
        let store = VerifierStore::new();
        let cfg = |roles_file: Option<PathBuf>, auth| EndpointAuth {
            id: id("e"),
            auth,
            roles_file,
        };
        store.load_config(&[cfg(Some(path.clone()), None)]).unwrap();
        let Some(Lookup::Known(file_v)) = store.lookup(&id("e"), "alice") else {
            panic!()
        };
        assert_eq!(store.lookup(&id("e"), "bob"), Some(Lookup::UnknownRole));
        assert_eq!(store.lookup(&id("other"), "alice"), None);

        // A broken file changes nothing.
        std::fs::write(&path, "garbage\n").unwrap();
        let errs = store
            .load_config(&[cfg(Some(path.clone()), None)])
            .unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            store.lookup(&id("e"), "alice"),
            Some(Lookup::Known(file_v.clone()))
        );
        let missing = store
            .load_config(&[cfg(Some(dir.path().join("nope")), None)])
            .unwrap_err();
        assert_eq!(missing.len(), 1);

        // Learned verifiers win for the same role and add new ones.
        let learned: Verifier = v("learned").parse().unwrap();
        store.set_learned(
            &id("e"),
            RoleMap::from([
                ("alice".into(), learned.clone()),
                ("bob".into(), learned.clone()),
            ]),
        );
        assert_eq!(
            store.lookup(&id("e"), "alice"),
            Some(Lookup::Known(learned.clone()))
        );
        assert_eq!(
            store.lookup(&id("e"), "bob"),
            Some(Lookup::Known(learned.clone()))
        );

        store
            .load_config(&[cfg(None, Some(AuthMode::Passthrough))])
            .unwrap();
        assert_eq!(store.lookup(&id("e"), "alice"), Some(Lookup::Passthrough));
        // Removed from the config: no mode, so no answer (the caller decides).
        store.load_config(&[]).unwrap();
        assert_eq!(store.lookup(&id("e"), "alice"), None);
    }

    #[test]
    fn the_store_knows_whether_any_endpoint_checks_logins() {
        let store = VerifierStore::new();
        let cfg = |name: &str, auth| EndpointAuth {
            id: id(name),
            auth: Some(auth),
            roles_file: None,
        };
        assert!(!store.has_scram_endpoints());
        store
            .load_config(&[cfg("a", AuthMode::Passthrough)])
            .unwrap();
        assert!(!store.has_scram_endpoints(), "passthrough only");
        store
            .load_config(&[cfg("a", AuthMode::Passthrough), cfg("b", AuthMode::Scram)])
            .unwrap();
        assert!(store.has_scram_endpoints());
        store
            .load_config(&[cfg("a", AuthMode::Passthrough)])
            .unwrap();
        assert!(
            !store.has_scram_endpoints(),
            "the scram endpoint left the file"
        );
        store.set_secret_mode(&id("k"), AuthMode::Passthrough);
        assert!(!store.has_scram_endpoints());
        store.set_secret_mode(&id("k"), AuthMode::Scram);
        assert!(store.has_scram_endpoints(), "a PgwakeEndpoint uses scram");
    }

    #[test]
    fn secret_roles_survive_reloads_and_rank_between_learned_and_file() {
        let store = VerifierStore::new();
        let (secret, learned): (Verifier, Verifier) =
            (v("secret").parse().unwrap(), v("learned").parse().unwrap());
        // Roles before a mode belong to an endpoint removed meanwhile: ignored.
        store.set_secret_roles(&id("k"), RoleMap::from([("alice".into(), secret.clone())]));
        assert_eq!(store.lookup(&id("k"), "alice"), None);

        store.set_secret_mode(&id("k"), AuthMode::Scram);
        assert_eq!(store.lookup(&id("k"), "alice"), Some(Lookup::UnknownRole));
        store.set_secret_roles(&id("k"), RoleMap::from([("alice".into(), secret.clone())]));
        assert_eq!(
            store.lookup(&id("k"), "alice"),
            Some(Lookup::Known(secret.clone()))
        );
        // A config reload that does not know the endpoint leaves it alone.
        store.load_config(&[]).unwrap();
        assert_eq!(
            store.lookup(&id("k"), "alice"),
            Some(Lookup::Known(secret.clone()))
        );
        // Learned roles win.
        store.set_learned(&id("k"), RoleMap::from([("alice".into(), learned.clone())]));
        assert_eq!(
            store.lookup(&id("k"), "alice"),
            Some(Lookup::Known(learned))
        );
        store.set_learned(&id("k"), RoleMap::new());

        // The mode changes, the roles stay for when it changes back.
        store.set_secret_mode(&id("k"), AuthMode::Passthrough);
        assert_eq!(store.lookup(&id("k"), "alice"), Some(Lookup::Passthrough));
        store.set_secret_mode(&id("k"), AuthMode::Scram);
        assert_eq!(
            store.lookup(&id("k"), "alice"),
            Some(Lookup::Known(secret.clone()))
        );

        // The config file's mode wins for an endpoint it configures.
        store
            .load_config(&[EndpointAuth {
                id: id("k"),
                auth: Some(AuthMode::Passthrough),
                roles_file: None,
            }])
            .unwrap();
        assert_eq!(store.lookup(&id("k"), "alice"), Some(Lookup::Passthrough));
        store.load_config(&[]).unwrap();

        store.remove_secret(&id("k"));
        assert_eq!(store.lookup(&id("k"), "alice"), None);
        assert!(store.secret_roles(&id("k")).is_empty());
    }
}
