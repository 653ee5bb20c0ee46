//! Pure functions: the StatefulSet an endpoint should have, and what a Pod's status means. No
//! API calls here, so all of it is tested with plain values.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::{Event as CoreEvent, ObjectReference};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use pgwake_router::crd::PgwakeEndpoint;
use pgwake_router::{BackendSpec, EndpointId, Route};
use serde_json::{json, Value};

use super::KubernetesConfig;
use crate::{BackendError, StartBlocker};

pub const LABEL_ENDPOINT: &str = "pgwake.io/endpoint";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// The value of [`LABEL_MANAGED_BY`] on the StatefulSets this backend creates.
pub const MANAGED_BY: &str = "pgwake";
/// Hash of the pod template the StatefulSet was last scaled up with; a different hash on the
/// next wake from zero replaces the template (changes never restart a running compute).
pub const ANNOTATION_TEMPLATE_HASH: &str = "pgwake.io/template-hash";
pub const CONTAINER: &str = "postgres";

/// StatefulSet names longer than this break the `controller-revision-hash` label that the
/// StatefulSet controller puts on pods (63 characters, of which it appends 11).
const MAX_NAME: usize = 52;

/// `<prefix><id>`, or when that is too long, a prefix of it plus a hash of the id, so distinct
/// ids never share a StatefulSet.
pub fn workload_name(prefix: &str, id: &EndpointId) -> String {
    let full = format!("{prefix}{id}");
    if full.len() <= MAX_NAME {
        return full;
    }
    let hash = format!("{:08x}", fnv1a(id.as_str().as_bytes()) as u32);
    let keep = MAX_NAME - hash.len() - 1;
    let head = full[..keep].trim_end_matches('-');
    format!("{head}-{hash}")
}

/// The single pod of the StatefulSet.
pub fn pod_name(workload: &str) -> String {
    format!("{workload}-0")
}

/// FNV-1a: stable across Rust versions and processes (unlike `DefaultHasher`), which matters
/// because several pgwake replicas compare the hashes they wrote.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The port Postgres listens on in the pod.
pub fn compute_port(cfg: &KubernetesConfig, route: &Route) -> u16 {
    match &route.backend {
        BackendSpec::Kubernetes { port: Some(p), .. } => *p,
        _ => cfg.port,
    }
}

/// What the backend wants the StatefulSet to be, with `replicas: 1`. The template hash is
/// already in its annotations.
pub fn desired_statefulset(
    cfg: &KubernetesConfig,
    namespace: &str,
    route: &Route,
) -> Result<StatefulSet, BackendError> {
    let BackendSpec::Kubernetes {
        image,
        port: _,
        command,
        args,
        env,
        env_secret,
        requests,
        limits,
        storage,
        storage_class,
        pod,
    } = &route.backend
    else {
        return Err(BackendError::Config(format!(
            "endpoint {} is not a kubernetes endpoint",
            route.endpoint
        )));
    };
    let id = route.endpoint.as_str();
    let name = workload_name(&cfg.name_prefix, &route.endpoint);
    let port = compute_port(cfg, route);
    let selector = json!({ LABEL_ENDPOINT: id, LABEL_MANAGED_BY: MANAGED_BY });
    let mut labels = selector.clone();
    labels[LABEL_NAME] = json!("pgwake-compute");
    for (k, v) in &cfg.labels {
        labels[k] = json!(v);
    }

    let mut container = json!({
        "name": CONTAINER,
        "image": image,
        "ports": [{ "name": "postgres", "containerPort": port, "protocol": "TCP" }],
        "env": env.iter().map(|(k, v)| json!({ "name": k, "value": v })).collect::<Vec<_>>(),
        // exec, not tcpSocket: Postgres accepts TCP before it accepts queries (57P03), and
        // the postgres image's first-boot initdb runs a server on the socket only.
        // The `restricted` Pod Security level, so computes run in namespaces that enforce it.
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
            "runAsNonRoot": true,
        },
        "readinessProbe": {
            "exec": { "command": cfg.readiness_command.iter()
                .map(|a| a.replace("{port}", &port.to_string())).collect::<Vec<_>>() },
            "periodSeconds": 1,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
    });
    if !command.is_empty() {
        container["command"] = json!(command);
    }
    if !args.is_empty() {
        container["args"] = json!(args);
    }
    if let Some(secret) = env_secret {
        container["envFrom"] = json!([{ "secretRef": { "name": secret } }]);
    }
    if !requests.is_empty() || !limits.is_empty() {
        container["resources"] = json!({ "requests": requests, "limits": limits });
    }
    if storage.is_some() {
        container["volumeMounts"] = json!([{ "name": "data", "mountPath": cfg.data_path }]);
    }

    let mut pod_spec = json!({
        "containers": [container],
        "terminationGracePeriodSeconds": cfg.termination_grace.as_secs(),
        // The compute talks to no Kubernetes API, and service links would put one variable per
        // Service of the namespace into its environment.
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": cfg.run_as_user,
            "runAsGroup": cfg.run_as_user,
            "fsGroup": cfg.fs_group,
            "seccompProfile": { "type": "RuntimeDefault" },
        },
    });
    if let Some(sa) = &cfg.service_account {
        pod_spec["serviceAccountName"] = json!(sa);
    }
    if !cfg.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(cfg.node_selector);
    }
    if !cfg.image_pull_secrets.is_empty() {
        pod_spec["imagePullSecrets"] = cfg
            .image_pull_secrets
            .iter()
            .map(|s| json!({ "name": s }))
            .collect();
    }
    if !pod.tolerations.is_empty() {
        pod_spec["tolerations"] = json!(pod.tolerations);
    }
    if let Some(affinity) = &pod.affinity {
        pod_spec["affinity"] = affinity.clone();
    }
    if let Some(class) = &pod.priority_class_name {
        pod_spec["priorityClassName"] = json!(class);
    }
    let mut template = json!({ "metadata": { "labels": labels }, "spec": pod_spec });
    if !pod.annotations.is_empty() {
        template["metadata"]["annotations"] = json!(pod.annotations);
    }
    let hash = format!(
        "{:016x}",
        fnv1a(
            serde_json::to_string(&template)
                .unwrap_or_default()
                .as_bytes()
        )
    );

    let mut spec = json!({
        "replicas": 1,
        "selector": { "matchLabels": selector },
        "serviceName": name,
        // One pod; Parallel skips the ordered-start bookkeeping.
        "podManagementPolicy": "Parallel",
        // Scaling to zero must keep the claim: it is the data.
        // Deleting it keeps the claim too, unless the operator opted into deleting the volume
        // with the endpoint.
        "persistentVolumeClaimRetentionPolicy": {
            "whenScaled": "Retain",
            "whenDeleted": if cfg.delete_volume_with_endpoint { "Delete" } else { "Retain" },
        },
        "template": template,
    });
    if let Some(size) = storage {
        let mut claim = json!({
            "metadata": { "name": "data", "labels": { LABEL_ENDPOINT: id } },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": { "requests": { "storage": size } },
            },
        });
        if let Some(class) = storage_class {
            claim["spec"]["storageClassName"] = json!(class);
        }
        spec["volumeClaimTemplates"] = json!([claim]);
    }
    let sts = json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": { ANNOTATION_TEMPLATE_HASH: hash },
        },
        "spec": spec,
    });
    // From a string rather than the `Value`: kube parses responses with `from_str`, so this
    // shares that (large) monomorphization of StatefulSet's deserializer.
    serde_json::from_str(&sts.to_string()).map_err(|e| {
        BackendError::Config(format!(
            "endpoint {id}: cannot build its StatefulSet (bad resource quantity?): {e}"
        ))
    })
}

/// `sts` owned by the `PgwakeEndpoint` `endpoint` (`[kubernetes] delete_with_endpoint`), so
/// that the garbage collector deletes it after the endpoint. Not a blocking owner: that would
/// need permission to update the endpoint's finalizers, and nothing waits for it.
pub fn owned_by(sts: &mut StatefulSet, endpoint: &PgwakeEndpoint) {
    let (Some(name), Some(uid)) = (&endpoint.metadata.name, &endpoint.metadata.uid) else {
        return;
    };
    sts.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "pgwake.io/v1".into(),
        kind: "PgwakeEndpoint".into(),
        name: name.clone(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
}

/// The Warning Event (events.k8s.io/v1) about `endpoint` that a failed start or an exited
/// compute records: `reason` is Kubernetes' (ImagePullBackOff, Unschedulable, ...) or
/// pgwake's (ComputeExited, StartTimedOut), `message` is cut to the API's 1 kB.
pub fn failure_event(
    endpoint: &PgwakeEndpoint,
    reason: &str,
    message: &str,
    namespace: &str,
) -> K8sEvent {
    let now = k8s_openapi::jiff::Timestamp::now();
    let name = endpoint.metadata.name.clone().unwrap_or_default();
    let mut note = message.to_string();
    if note.len() > 1024 {
        let mut cut = 1021;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    K8sEvent {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: Some(namespace.to_string()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".into()),
        reason: Some(reason.chars().take(128).collect()),
        action: Some("StartCompute".into()),
        note: Some(note),
        reporting_controller: Some("pgwake.io/compute-manager".into()),
        reporting_instance: Some(std::env::var("HOSTNAME").unwrap_or_else(|_| "pgwake".into())),
        regarding: Some(ObjectReference {
            api_version: Some("pgwake.io/v1".into()),
            kind: Some("PgwakeEndpoint".into()),
            name: Some(name),
            namespace: Some(namespace.to_string()),
            uid: endpoint.metadata.uid.clone(),
            resource_version: endpoint.metadata.resource_version.clone(),
            ..ObjectReference::default()
        }),
        ..K8sEvent::default()
    }
}

/// The label selector of the StatefulSets this backend manages (any endpoint).
pub fn managed_selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_ENDPOINT}")
}

/// The endpoint whose compute `sts` runs, if it is one of this backend's StatefulSets (managed
/// by pgwake, named as `prefix` names that endpoint's) and wants its pod: `spec.replicas` 1 or
/// more, and not being deleted. A StatefulSet of another pgwake installation in the same
/// namespace (another prefix) or one scaled to 0 gives `None`.
pub fn running_endpoint(prefix: &str, sts: &StatefulSet) -> Option<EndpointId> {
    let meta = &sts.metadata;
    let labels = meta.labels.as_ref()?;
    if labels.get(LABEL_MANAGED_BY).map(String::as_str) != Some(MANAGED_BY)
        || meta.deletion_timestamp.is_some()
    {
        return None;
    }
    let id = EndpointId::parse(labels.get(LABEL_ENDPOINT)?).ok()?;
    if meta.name.as_deref() != Some(workload_name(prefix, &id).as_str()) {
        return None;
    }
    // Unset means the API server's default, 1 (as `Shared::scale` reads it).
    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    (replicas >= 1).then_some(id)
}

/// The template hash recorded on a StatefulSet.
pub fn template_hash(sts: &StatefulSet) -> Option<&str> {
    sts.metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_TEMPLATE_HASH)
        .map(String::as_str)
}

/// The merge patch that scales to `replicas`, conditional on `resource_version` (409 if the
/// object changed since it was read). From zero, it also replaces the template of `current`
/// with `desired`'s: a merge patch of the new template alone would merge it into the old one,
/// and a field the endpoint no longer has (a node selector key, a resource limit, an
/// annotation) would stay; the patch sets every such field to null.
pub fn scale_patch(
    resource_version: &str,
    replicas: i32,
    new_template: Option<(&StatefulSet, &StatefulSet)>,
) -> Value {
    let mut patch = json!({
        "metadata": { "resourceVersion": resource_version },
        "spec": { "replicas": replicas },
    });
    if let Some((current, desired)) = new_template {
        let template = |s: &StatefulSet| json!(s.spec.as_ref().map(|s| &s.template));
        patch["spec"]["template"] = merge_patch_between(&template(current), &template(desired));
        patch["metadata"]["annotations"] = json!({
            ANNOTATION_TEMPLATE_HASH: template_hash(desired),
        });
    }
    patch
}

/// The JSON merge patch (RFC 7386) that turns `from` into `to`: members only in `from` become
/// null, objects are compared member by member, anything else is replaced whole. Fields the
/// API server defaulted in `from` are nulled too, and defaulted again.
pub fn merge_patch_between(from: &Value, to: &Value) -> Value {
    match (from, to) {
        (Value::Object(from), Value::Object(to)) => {
            let mut patch = serde_json::Map::new();
            for (k, old) in from {
                match to.get(k) {
                    None => {
                        patch.insert(k.clone(), Value::Null);
                    }
                    Some(new) if new != old => {
                        patch.insert(k.clone(), merge_patch_between(old, new));
                    }
                    Some(_) => {}
                }
            }
            for (k, new) in to {
                if !from.contains_key(k) {
                    patch.insert(k.clone(), new.clone());
                }
            }
            Value::Object(patch)
        }
        (_, to) => to.clone(),
    }
}

/// What a Pod's status says about the compute in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Ready and addressable.
    Ready(PodIdentity),
    /// Not ready yet (or any more), being replaced, or not scheduled yet.
    NotReady,
    /// It will not become ready without someone fixing something (bad image, missing secret,
    /// crash loop): `reason` and Kubernetes' message.
    Failing { reason: String, message: String },
}

/// Identifies one incarnation of the compute: a new pod, address or container restart means
/// the connections to the old one are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub uid: String,
    pub addr: SocketAddr,
    pub restarts: i32,
}

/// Why a pod that is not ready yet is waiting, in Kubernetes' words (reason, message): not
/// scheduled (no node fits, a volume that does not bind for want of a StorageClass), or its
/// container waiting (pulling the image, ...). `None` when nothing says.
pub fn pending_reason(pod: &Pod) -> Option<(String, String)> {
    let status = pod.status.as_ref()?;
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        return Some((
            c.reason.clone().unwrap_or_else(|| "Unschedulable".into()),
            c.message.clone().unwrap_or_default(),
        ));
    }
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == CONTAINER)?
        .state
        .as_ref()?
        .waiting
        .as_ref()?;
    Some((
        waiting.reason.clone()?,
        waiting.message.clone().unwrap_or_default(),
    ))
}

/// The pending reason while a StatefulSet at 1 has no pod: its controller could not create
/// it, and says why only in an Event.
pub fn no_pod_reason(statefulset: &str) -> (String, String) {
    (
        "PodNotCreated".into(),
        format!(
            "statefulset {statefulset} has not created its pod (a quota, Pod Security admission \
             or a webhook refusing it?): see the FailedCreate event in \
             `kubectl describe statefulset {statefulset}`"
        ),
    )
}

/// Container "waiting" reasons that mean the start has failed.
const FAILING_REASONS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
];

pub fn pod_state(pod: &Pod, port: u16) -> PodState {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::NotReady;
    }
    let Some(status) = &pod.status else {
        return PodState::NotReady;
    };
    let container = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == CONTAINER);
    if let Some(waiting) = container
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.as_ref())
    {
        let reason = waiting.reason.clone().unwrap_or_default();
        if FAILING_REASONS.contains(&reason.as_str()) {
            return PodState::Failing {
                reason,
                message: waiting.message.clone().unwrap_or_default(),
            };
        }
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let ip = status
        .pod_ip
        .as_deref()
        .and_then(|ip| ip.parse::<IpAddr>().ok());
    match (ready, ip, &pod.metadata.uid) {
        (true, Some(ip), Some(uid)) => PodState::Ready(PodIdentity {
            uid: uid.clone(),
            addr: SocketAddr::new(ip, port),
            restarts: container.map_or(0, |c| c.restart_count),
        }),
        _ => PodState::NotReady,
    }
}

/// What a client may be told of why a pod does not run: Kubernetes' reason word and a class of
/// its message (the message itself names nodes, pods, quotas and images: for the operator).
pub fn start_blocker(reason: &str, message: &str) -> StartBlocker {
    let m = message.to_ascii_lowercase();
    let image = matches!(reason, "ErrImagePull" | "ImagePullBackOff");
    let detail = if image {
        if m.contains("not found") || m.contains("manifest unknown") {
            Some("image not found")
        } else if m.contains("unauthorized") || m.contains("denied") || m.contains("authoriz") {
            Some("image pull not authorized")
        } else {
            None
        }
    } else if m.contains("insufficient memory") {
        Some("insufficient memory")
    } else if m.contains("insufficient cpu") {
        Some("insufficient cpu")
    } else if m.contains("insufficient") {
        Some("insufficient resources")
    } else if m.contains("unbound") && m.contains("persistentvolumeclaim") {
        Some("volume not bound")
    } else if m.contains("node affinity")
        || m.contains("node selector")
        || m.contains("untolerated taint")
    {
        Some("no node matches")
    } else if m.contains("exceeded quota") {
        Some("quota exceeded")
    } else if m.contains("podsecurity") {
        Some("Pod Security")
    } else if m.contains("admission webhook") {
        Some("admission webhook")
    } else {
        None
    };
    StartBlocker::new(reason, detail)
}

/// When a (core/v1) Event last happened: its series' last time, else its last timestamp, else
/// its event time (recorders fill in one or the other).
pub fn last_seen(event: &CoreEvent) -> Option<k8s_openapi::jiff::Timestamp> {
    event
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref())
        .map(|t| t.0)
        .or_else(|| event.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
}
