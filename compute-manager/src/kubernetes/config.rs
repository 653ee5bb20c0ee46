use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The `[kubernetes]` table: how computes are run as StatefulSets, and where the
/// `PgwakeEndpoint` resources are watched.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Namespace of the computes and of the `PgwakeEndpoint` resources; unset uses the
    /// client's default (the pod's own namespace in a cluster, else the kubeconfig context's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// StatefulSets are named `<name_prefix><endpoint id>` (shortened with a hash when that
    /// would be longer than Kubernetes allows).
    #[serde(default = "d_name_prefix")]
    pub name_prefix: String,
    /// Postgres's port in compute pods; an endpoint's `port` overrides it.
    #[serde(default = "d_port")]
    pub port: u16,
    /// Extra labels on every StatefulSet and pod (not part of the selector, so they may change).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where an endpoint's persistent volume is mounted. With the `postgres` image, set
    /// `PGDATA` to a directory below it (the volume's root may hold `lost+found`).
    #[serde(default = "d_data_path")]
    pub data_path: String,
    /// The compute container's readiness probe (exec); `{port}` is replaced by the port. The
    /// pod counts as running once it succeeds, so it must mean "accepts queries".
    #[serde(default = "d_readiness_command")]
    pub readiness_command: Vec<String>,
    /// Service account of compute pods; unset uses the namespace's default. Compute pods get no
    /// API token either way.
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Image pull secrets for compute images in private registries.
    #[serde(default)]
    pub image_pull_secrets: Vec<String>,
    /// The user and group compute containers run as, and the group that owns their volume.
    /// Compute pods meet the `restricted` Pod Security level (non-root, no privilege
    /// escalation, no capabilities, the runtime's seccomp profile), so the image must run as
    /// a non-root user: 999 is `postgres` in the official `postgres` images, whose entrypoint
    /// then runs initdb as that user without the chown it does as root.
    #[serde(default = "d_postgres_uid")]
    pub run_as_user: i64,
    #[serde(default = "d_postgres_uid")]
    pub fs_group: i64,
    /// How long Postgres gets to shut down cleanly (write its checkpoint) before it is killed.
    #[serde(default = "d_termination_grace", with = "humantime_serde")]
    pub termination_grace: Duration,
    /// How long a start may take in all, even after every client waiting for it has given up
    /// (`compute.wake_timeout`): a slow but progressing start (a node being added, a first
    /// image pull, crash recovery) then finishes, so the next client finds the image pulled and
    /// the data directory ready, and it is scaled back to 0 when it is ready or this runs out.
    /// A client that comes meanwhile takes the start over. Unset: a start nobody waits for any
    /// more is scaled back to 0 at once.
    #[serde(default, with = "humantime_serde")]
    pub start_timeout: Option<Duration>,
    /// How long a suspend waits for the pod to be gone.
    #[serde(default = "d_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// A running compute whose pod stays not-ready this long counts as gone (the next client
    /// waits for it to be ready again instead of being sent to it).
    #[serde(default = "d_not_ready_grace", with = "humantime_serde")]
    pub not_ready_grace: Duration,
    /// Failed API calls (5xx, 429, connection errors) that scaling a StatefulSet, or waiting
    /// for its pod (in a row), tolerates before the wake or suspend gives up; the wait between
    /// tries starts at `retry_backoff` and doubles up to 5 s. A wake is bounded by
    /// `compute.wake_timeout` as well.
    #[serde(default = "d_api_retries")]
    pub api_retries: u32,
    #[serde(default = "d_retry_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Delete an endpoint's StatefulSet (and so its pod) with its `PgwakeEndpoint`: the
    /// StatefulSet is created with the endpoint as its owner (an ownerReference), and
    /// Kubernetes' garbage collector deletes it after the endpoint. Off by default: a
    /// mistaken `kubectl delete pgwe` then loses nothing. StatefulSets created before this
    /// was turned on keep no owner.
    #[serde(default)]
    pub delete_with_endpoint: bool,
    /// With `delete_with_endpoint`, delete the data volume too (the StatefulSet's
    /// `persistentVolumeClaimRetentionPolicy.whenDeleted: Delete`, Kubernetes 1.27+): the
    /// endpoint's data is gone with it.
    #[serde(default)]
    pub delete_volume_with_endpoint: bool,
    /// Write state, address and last activity to the `PgwakeEndpoint`'s status.
    #[serde(default = "d_true")]
    pub update_status: bool,
    /// Route the `PgwakeEndpoint` resources of the namespace (in addition to the config
    /// file's endpoints).
    #[serde(default = "d_true")]
    pub watch_endpoints: bool,
    /// Only route `PgwakeEndpoint`s matching this label selector (`tier=dev`), e.g. to run
    /// several pgwake installations in one namespace.
    #[serde(default)]
    pub endpoint_selector: Option<String>,
    /// `[kubernetes.neon]`: endpoints on Neon storage can be branched (a new timeline on the
    /// pageserver, and a `PgwakeEndpoint` serving it). Absent: no Neon branches.
    #[serde(default)]
    pub neon: Option<NeonConfig>,
}

/// `[kubernetes.neon]`: the pageserver whose management API creates and deletes timelines.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeonConfig {
    /// The pageserver's management API (its `listen_http_addr`, port 9898 by default), e.g.
    /// `http://pageserver.neon.svc:9898`; plain HTTP, as inside a cluster.
    pub pageserver_api: String,
    /// A file holding the JWT the pageserver requires when it runs with
    /// `http_auth_type = "NeonJWT"` (a mounted Secret: read on every call, so a rotated token
    /// is used without a restart). Unset: no `Authorization` header.
    #[serde(default)]
    pub pageserver_token_file: Option<PathBuf>,
    /// How long one call may take. Creating a branch at an LSN the pageserver has not received
    /// yet waits for it, so this is longer than a usual API call.
    #[serde(default = "d_neon_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Failed calls (503, 429, timeouts, connection errors) tolerated before giving up; the
    /// wait between tries starts at `retry_backoff` and doubles up to 5 s.
    #[serde(default = "d_api_retries")]
    pub retries: u32,
    #[serde(default = "d_retry_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// How long removing a timeline waits for the pageserver to finish the deletion it
    /// accepted (it finishes on its own after that).
    #[serde(default = "d_neon_delete_wait", with = "humantime_serde")]
    pub delete_wait: Duration,
}

impl NeonConfig {
    /// Defaults for everything but the URL.
    pub fn new(pageserver_api: impl Into<String>) -> Self {
        Self {
            pageserver_api: pageserver_api.into(),
            pageserver_token_file: None,
            request_timeout: d_neon_request_timeout(),
            retries: d_api_retries(),
            retry_backoff: d_retry_backoff(),
            delete_wait: d_neon_delete_wait(),
        }
    }

    /// Every problem at once, one line each.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let host = self
            .pageserver_api
            .strip_prefix("http://")
            .map(|rest| rest.split('/').next().unwrap_or(""));
        match host {
            Some(h) if !h.is_empty() && !h.contains(['?', '#', '@', ' ']) => {}
            _ => errors.push(format!(
                "kubernetes.neon.pageserver_api {:?} must be an http:// URL with a host",
                self.pageserver_api
            )),
        }
        if let Some(p) = &self.pageserver_token_file {
            if !p.is_absolute() {
                errors.push(format!(
                    "kubernetes.neon.pageserver_token_file {p:?} must be absolute"
                ));
            }
        }
        if self.request_timeout.is_zero() || self.retry_backoff.is_zero() {
            errors.push(
                "kubernetes.neon.request_timeout and retry_backoff must be more than 0".to_string(),
            );
        }
        errors
    }
}

fn d_name_prefix() -> String {
    "pgwake-".into()
}
fn d_port() -> u16 {
    5432
}
fn d_data_path() -> String {
    "/var/lib/postgresql/data".into()
}
fn d_readiness_command() -> Vec<String> {
    ["pg_isready", "-h", "127.0.0.1", "-p", "{port}", "-q"]
        .map(String::from)
        .to_vec()
}
fn d_postgres_uid() -> i64 {
    999
}
fn d_termination_grace() -> Duration {
    Duration::from_secs(60)
}
fn d_stop_timeout() -> Duration {
    Duration::from_secs(120)
}
fn d_not_ready_grace() -> Duration {
    Duration::from_secs(30)
}
fn d_api_retries() -> u32 {
    5
}
fn d_retry_backoff() -> Duration {
    Duration::from_millis(200)
}
fn d_neon_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn d_neon_delete_wait() -> Duration {
    Duration::from_secs(60)
}
fn d_true() -> bool {
    true
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            name_prefix: d_name_prefix(),
            port: d_port(),
            labels: BTreeMap::new(),
            data_path: d_data_path(),
            readiness_command: d_readiness_command(),
            service_account: None,
            node_selector: BTreeMap::new(),
            image_pull_secrets: Vec::new(),
            run_as_user: d_postgres_uid(),
            fs_group: d_postgres_uid(),
            termination_grace: d_termination_grace(),
            start_timeout: None,
            stop_timeout: d_stop_timeout(),
            not_ready_grace: d_not_ready_grace(),
            api_retries: d_api_retries(),
            retry_backoff: d_retry_backoff(),
            delete_with_endpoint: false,
            delete_volume_with_endpoint: false,
            update_status: true,
            watch_endpoints: true,
            endpoint_selector: None,
            neon: None,
        }
    }
}

impl KubernetesConfig {
    /// Every problem at once, one line each.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.port == 0 {
            errors.push("kubernetes.port must not be 0".to_string());
        }
        let p = &self.name_prefix;
        if p.len() > 20
            || !p.starts_with(|c: char| c.is_ascii_lowercase())
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            errors.push(format!(
                "kubernetes.name_prefix {p:?}: up to 20 of [a-z0-9-], starting with a letter"
            ));
        }
        if !self.data_path.starts_with('/') {
            errors.push(format!(
                "kubernetes.data_path {:?} must be absolute",
                self.data_path
            ));
        }
        if self.readiness_command.is_empty() {
            errors.push("kubernetes.readiness_command must not be empty".to_string());
        }
        if self.termination_grace.is_zero() || self.stop_timeout < self.termination_grace {
            errors.push(
                "kubernetes.stop_timeout must be at least termination_grace, which must be more than 0"
                    .to_string(),
            );
        }
        if self.run_as_user <= 0 || self.fs_group <= 0 {
            errors.push(
                "kubernetes.run_as_user and fs_group must be more than 0 (compute pods run as non-root)"
                    .to_string(),
            );
        }
        if self.delete_volume_with_endpoint && !self.delete_with_endpoint {
            errors.push(
                "kubernetes.delete_volume_with_endpoint needs delete_with_endpoint".to_string(),
            );
        }
        if self.retry_backoff.is_zero() {
            errors.push("kubernetes.retry_backoff must be more than 0".to_string());
        }
        if let Some(neon) = &self.neon {
            errors.extend(neon.validate());
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<KubernetesConfig, String> {
        toml::from_str(toml_text).map_err(|e| e.message().to_string())
    }

    #[test]
    fn the_neon_table_is_optional_and_checked() {
        assert_eq!(parse("").unwrap().neon, None);
        let c = parse(
            "[neon]\npageserver_api = \"http://pageserver.neon.svc:9898\"\n\
             pageserver_token_file = \"/var/run/secrets/neon/token\"\nretries = 2\n",
        )
        .unwrap();
        let neon = c.neon.clone().unwrap();
        assert_eq!(neon.pageserver_api, "http://pageserver.neon.svc:9898");
        assert_eq!(neon.retries, 2);
        assert_eq!(neon.request_timeout, Duration::from_secs(30));
        assert!(c.validate().is_empty(), "{:?}", c.validate());

        assert!(parse("[neon]\n").unwrap_err().contains("pageserver_api"));
        assert!(parse("[neon]\npageserver_api = \"http://p\"\nport = 1\n")
            .unwrap_err()
            .contains("unknown field"));

        let bad = KubernetesConfig {
            neon: Some(NeonConfig {
                pageserver_token_file: Some("token".into()),
                request_timeout: Duration::ZERO,
                ..NeonConfig::new("https://pageserver:9898")
            }),
            ..KubernetesConfig::default()
        };
        let errors = bad.validate();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("pageserver_api"), "{errors:?}");
        assert!(errors[1].contains("absolute"), "{errors:?}");
        assert!(errors[2].contains("request_timeout"), "{errors:?}");
        for url in ["http://", "pageserver:9898", "http:///v1", "http://a b"] {
            assert_eq!(NeonConfig::new(url).validate().len(), 1, "{url}");
        }
        assert!(NeonConfig::new("http://10.0.0.5:9898/")
            .validate()
            .is_empty());
    }
}
