//! Keeps the proxy's verifiers of `PgwakeEndpoint`s in step with the Secrets they name
//! (`spec.rolesSecret`): the CRD source tells [`SecretRoles`] each endpoint's auth mode before
//! routing it ([`AuthSink`]), and each named Secret is read with `get` (the only verb the
//! proxy's Role grants, on those names only) at once when an endpoint names a different one,
//! and again every `[auth] roles_secret_interval`.
//!
//! A Secret that is missing, forbidden or malformed leaves its endpoints with no roles: their
//! logins fail like a wrong password (28P01, nothing woken), and a warning names the Secret,
//! never its contents. An API server that cannot be reached (timeouts, 5xx) keeps the roles
//! last read: a control-plane outage does not lock everyone out.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::Api;
use pgwake_proxy::verifiers::{parse_roles_file, RoleMap, RolesFileError, VerifierStore};
use pgwake_router::crd::{AuthSink, EndpointAuthSpec, RolesSecretRef};
use pgwake_router::{AuthMode, EndpointId};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// Longest wait for one Secret.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a Secret gave no roles. Never contains a verifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SecretError {
    #[error("Secret {name:?} not found")]
    NotFound { name: String },
    #[error("Secret {name:?}: access forbidden (the proxy's Role must grant get on it; see deploy/README.md)")]
    Forbidden { name: String },
    #[error("Secret {name:?} has no key {key:?}")]
    NoKey { name: String, key: String },
    #[error("Secret {name:?} key {key:?} is not UTF-8 text")]
    NotText { name: String, key: String },
    #[error("Secret {name:?} key {key:?}: {}", .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Malformed {
        name: String,
        key: String,
        errors: Vec<RolesFileError>,
    },
    /// The API server did not answer, or failed: the roles last read stay.
    #[error("reading Secret {name:?}: {reason}")]
    Unavailable { name: String, reason: String },
}

impl SecretError {
    /// Whether the Secret says nobody may log in (its roles are dropped), as opposed to a
    /// failure to ask (they are kept).
    fn revokes(&self) -> bool {
        !matches!(self, Self::Unavailable { .. })
    }
}

/// The roles at `key` of `secret` (as read by [`read_secret`]).
pub(crate) fn roles_from_secret(
    secret: &RolesSecretRef,
    data: &BTreeMap<String, ByteString>,
) -> Result<RoleMap, SecretError> {
    let (name, key) = (secret.name.clone(), secret.key().to_string());
    let bytes = data.get(&key).ok_or_else(|| SecretError::NoKey {
        name: name.clone(),
        key: key.clone(),
    })?;
    let text = std::str::from_utf8(&bytes.0).map_err(|_| SecretError::NotText {
        name: name.clone(),
        key: key.clone(),
    })?;
    parse_roles_file(text).map_err(|errors| SecretError::Malformed { name, key, errors })
}

/// One `get` of Secret `name`: its data (`stringData` is folded into `data` by the API
/// server, never returned).
async fn read_secret(
    api: &Api<Secret>,
    name: &str,
) -> Result<BTreeMap<String, ByteString>, SecretError> {
    let unavailable = |reason: String| SecretError::Unavailable {
        name: name.to_string(),
        reason,
    };
    match tokio::time::timeout(READ_TIMEOUT, api.get_opt(name)).await {
        Err(_) => Err(unavailable("timed out".into())),
        Ok(Ok(Some(s))) => Ok(s.data.unwrap_or_default()),
        Ok(Ok(None)) => Err(SecretError::NotFound {
            name: name.to_string(),
        }),
        Ok(Err(kube::Error::Api(s))) if s.is_forbidden() || s.code == 401 => {
            Err(SecretError::Forbidden {
                name: name.to_string(),
            })
        }
        Ok(Err(e)) => Err(unavailable(e.to_string())),
    }
}

/// What is known of one `PgwakeEndpoint`'s logins.
#[derive(Debug)]
struct Watched {
    spec: EndpointAuthSpec,
    /// To be read at the next pass, not only at the next interval.
    due: bool,
    /// The last failure, logged once until it changes.
    error: Option<SecretError>,
}

/// The `PgwakeEndpoint` side of the [`VerifierStore`]: modes as the CRD source reports them,
/// roles from their Secrets.
pub(crate) struct SecretRoles {
    api: Api<Secret>,
    store: Arc<VerifierStore>,
    /// `[auth] roles_secrets`: off, the modes are kept but no Secret is read.
    read: bool,
    endpoints: Mutex<HashMap<EndpointId, Watched>>,
    changed: Notify,
    /// One pass at a time: a slow pass must not apply an older read over a newer one.
    pass: tokio::sync::Mutex<()>,
}

impl SecretRoles {
    pub fn new(api: Api<Secret>, store: Arc<VerifierStore>, read: bool) -> Arc<Self> {
        Arc::new(Self {
            api,
            store,
            read,
            endpoints: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            pass: tokio::sync::Mutex::new(()),
        })
    }

    fn endpoints(&self) -> std::sync::MutexGuard<'_, HashMap<EndpointId, Watched>> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the Secrets of the endpoints whose reference changed (`all`: of every endpoint),
    /// each Secret once, and sets their roles.
    pub async fn refresh(&self, all: bool) {
        if !self.read {
            return;
        }
        let _pass = self.pass.lock().await;
        let todo: Vec<(EndpointId, RolesSecretRef)> = self
            .endpoints()
            .iter_mut()
            .filter(|(_, w)| all || w.due)
            .filter_map(|(id, w)| {
                w.due = false;
                let r = w.spec.roles_secret.clone();
                (w.spec.mode == AuthMode::Scram).then_some((id.clone(), r?))
            })
            .collect();
        let mut read: HashMap<String, Result<BTreeMap<String, ByteString>, SecretError>> =
            HashMap::new();
        for (id, secret) in todo {
            if !read.contains_key(&secret.name) {
                let data = read_secret(&self.api, &secret.name).await;
                read.insert(secret.name.clone(), data);
            }
            let outcome = match &read[&secret.name] {
                Ok(data) => roles_from_secret(&secret, data),
                Err(e) => Err(e.clone()),
            };
            self.apply(&id, &secret, outcome);
        }
    }

    fn apply(
        &self,
        id: &EndpointId,
        secret: &RolesSecretRef,
        outcome: Result<RoleMap, SecretError>,
    ) {
        let mut endpoints = self.endpoints();
        // Removed or pointed elsewhere while the Secret was read: that read no longer applies.
        let Some(w) = endpoints
            .get_mut(id)
            .filter(|w| w.spec.roles_secret.as_ref() == Some(secret))
        else {
            return;
        };
        match outcome {
            Ok(roles) => {
                if w.error.take().is_some() {
                    info!(endpoint = %id, secret = %secret.name, "roles Secret readable again");
                }
                if *self.store.secret_roles(id) != roles {
                    info!(endpoint = %id, secret = %secret.name, roles = roles.len(), "login roles read from the Secret");
                    self.store.set_secret_roles(id, roles);
                }
            }
            Err(e) => {
                if e.revokes() {
                    self.store.set_secret_roles(id, RoleMap::new());
                }
                if w.error.as_ref() != Some(&e) {
                    if e.revokes() {
                        warn!(endpoint = %id, error = %e, "no login roles: every login to this endpoint is refused");
                    } else {
                        warn!(endpoint = %id, error = %e, "keeping the login roles last read");
                    }
                    w.error = Some(e);
                } else {
                    debug!(endpoint = %id, error = %e, "roles Secret still unusable");
                }
            }
        }
    }

    /// Reads the changed references at once and every Secret every `interval`, until dropped.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let all = tokio::select! {
                _ = tick.tick() => true,
                _ = self.changed.notified() => false,
            };
            self.refresh(all).await;
        }
    }
}

impl AuthSink for SecretRoles {
    fn endpoint_auth(&self, id: &EndpointId, auth: Option<&EndpointAuthSpec>) {
        let mut endpoints = self.endpoints();
        let Some(spec) = auth else {
            endpoints.remove(id);
            self.store.remove_secret(id);
            return;
        };
        let old = endpoints.get(id).map(|w| &w.spec);
        if old == Some(spec) {
            return;
        }
        let moved = old.map(|o| &o.roles_secret) != Some(&spec.roles_secret);
        self.store.set_secret_mode(id, spec.mode);
        if moved {
            // Another Secret's roles do not apply: none until this one is read.
            self.store.set_secret_roles(id, RoleMap::new());
        }
        if spec.mode == AuthMode::Scram && spec.roles_secret.is_none() {
            warn!(endpoint = %id, "auth is scram but there is no rolesSecret: every login to this endpoint is refused");
        }
        endpoints.insert(
            id.clone(),
            Watched {
                spec: spec.clone(),
                due: true,
                error: None,
            },
        );
        drop(endpoints);
        self.changed.notify_one();
    }
}

#[cfg(test)]
#[path = "roles_secret_tests.rs"]
mod tests;
