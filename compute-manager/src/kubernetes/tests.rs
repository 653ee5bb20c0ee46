//! The backend against kube's mock API service: each test plays the API server's side of one
//! scenario with real Kubernetes JSON objects, and checks every request the backend makes
//! (method, path, query, body) in order, but for the lists and watches of pods: those come
//! from one watch shared by all of the backend's computes, whenever it needs them, and a fake
//! store of pods answers them by URL ([`PodServer`]); the test changes the pods in it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::Client;
use pgwake_router::{BackendSpec, EndpointId, Route};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower_test::mock;

use super::deploy_tests::{granted, permission, reflector_permissions, Permission};
use super::*;
use crate::kubernetes::fake_pods::{self, Pending, PodServer};
use crate::kubernetes::mock_api::{json_response, status_failure};
use crate::BackendErrorKind;

const NS: &str = "pgwake";
const STS: &str = "/apis/apps/v1/namespaces/pgwake/statefulsets";
const STS_DEMO: &str = "/apis/apps/v1/namespaces/pgwake/statefulsets/pgwake-demo";
/// The list of pgwake's StatefulSets (any endpoint) that adoption makes.
const STS_MANAGED: &str = "/apis/apps/v1/namespaces/pgwake/statefulsets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dpgwake%2Cpgwake.io%2Fendpoint";
const PATCH_QUERY: &str = "?&fieldManager=pgwake";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/pgwake/events?";
const ENDPOINT_DEMO: &str = "/apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints/demo";
const STATUS_DEMO: &str = "/apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints/demo/status";
/// The pod of StatefulSet pgwake-demo.
const POD: &str = "pgwake-demo-0";
const POD_IP: &str = "10.244.0.17";

/// The core/v1 Events of StatefulSet pgwake-demo with reason FailedCreate.
const EVENTS_FAILED_CREATE: &str = "/api/v1/namespaces/pgwake/events?&fieldSelector=involvedObject.kind%3DStatefulSet%2CinvolvedObject.name%3Dpgwake-demo%2Creason%3DFailedCreate";

/// A core/v1 EventList as the API server returns it, with the statefulset-controller's
/// FailedCreate Events last seen at `ages` (seconds before now) with `messages`.
fn failed_create_events(rv: &str, events: &[(i64, &str)]) -> Value {
    let at = |age: i64| {
        let t =
            k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(age);
        t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    };
    let items: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, (age, message))| {
            json!({
                "metadata": {
                    "name": format!("pgwake-demo.18a2f0c4b1d3e5f{i}"),
                    "namespace": NS,
                    "uid": format!("7c9e2b1a-4f3d-4e8a-9b6c-2d1e0f3a4b5{i}"),
                    "resourceVersion": rv,
                    "creationTimestamp": at(*age + 60),
                },
                "involvedObject": {
                    "kind": "StatefulSet", "namespace": NS, "name": "pgwake-demo",
                    "uid": "5b0e1c6e-2d7f-4a3e-9a51-0d6f2f1c9a10",
                    "apiVersion": "apps/v1", "resourceVersion": "9301",
                },
                "reason": "FailedCreate",
                "message": message,
                "source": { "component": "statefulset-controller" },
                "firstTimestamp": at(*age + 60),
                "lastTimestamp": at(*age),
                "count": 4,
                "type": "Warning",
                "eventTime": null,
                "reportingComponent": "statefulset-controller",
                "reportingInstance": "",
            })
        })
        .collect();
    json!({ "kind": "EventList", "apiVersion": "v1", "metadata": { "resourceVersion": rv }, "items": items })
}

const QUOTA_REFUSAL: &str = "create Pod pgwake-demo-0 in StatefulSet pgwake-demo failed error: pods \"pgwake-demo-0\" is forbidden: exceeded quota: compute, requested: limits.memory=1Gi, used: limits.memory=4Gi, limited: limits.memory=4Gi";

/// A wake from 0 whose StatefulSet creates no pod: the controller's FailedCreate Event ends
/// it (after `stale` Event lists with only an older refusal), the start is undone, and the
/// status and an Event say why.
async fn serve_failed_create(api: &mut ApiServer, hash: &str, stale: usize) -> Value {
    api.get_sts(sts_json(0, "9300", hash)).await;
    api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
        .await
        .ok(sts_json(1, "9301", hash));
    api.status("Starting", None).await;
    // No pod comes.
    let old = "create Pod pgwake-demo-0 in StatefulSet pgwake-demo failed error: pods \"pgwake-demo-0\" is forbidden: violates PodSecurity \"restricted:latest\"";
    for _ in 0..stale {
        // From a wake an hour ago: not this one's.
        api.expect(Method::GET, EVENTS_FAILED_CREATE)
            .await
            .ok(failed_create_events("9303", &[(3600, old)]));
    }
    api.expect(Method::GET, EVENTS_FAILED_CREATE)
        .await
        .ok(failed_create_events(
            "9304",
            &[(3600, old), (0, QUOTA_REFUSAL)],
        ));
    api.get_sts(sts_json(1, "9305", hash)).await;
    let patch = api
        .expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
        .await;
    assert_eq!(patch.body["spec"]["replicas"], 0);
    patch.ok(sts_json(0, "9306", hash));
    let status = api.status("Suspended", None).await;
    let event = api.event("FailedCreate").await;
    let failed = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Failed")
        .unwrap()
        .clone();
    assert_eq!(failed["reason"], "FailedCreate", "{status}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("exceeded quota"),
        "{status}"
    );
    assert!(
        event["note"].as_str().unwrap().contains("exceeded quota"),
        "{event}"
    );
    failed
}

/// The Roles in deploy/ whose pods run the Kubernetes backend: the compute manager and the
/// single pod.
const BACKEND_ROLES: [&str; 2] = ["pgwake-manager", "pgwake"];

/// The API server's side of the conversation.
struct ApiServer {
    /// The requests other than pod lists and watches, in order.
    requests: mpsc::UnboundedReceiver<Pending>,
    /// The namespace's pods, which answer the pod lists and watches.
    pods: Arc<PodServer>,
    /// The permissions the requests so far needed.
    seen: BTreeSet<Permission>,
    /// Ends once every clone of the client is gone.
    router: Option<tokio::task::JoinHandle<()>>,
}

/// One request the backend made, waiting for its answer.
struct Call {
    body: Value,
    respond: mock::SendResponse<Response<Body>>,
}

impl Call {
    fn reply(self, code: u16, body: Value) {
        self.respond.send_response(json_response(code, &body));
    }

    fn ok(self, body: Value) {
        self.reply(200, body)
    }

    fn fail(self, code: u16, reason: &str) {
        self.reply(code, status_failure(code, reason));
    }
}

impl ApiServer {
    fn new() -> (Client, Self) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let pods = Arc::new(PodServer::default());
        let (tx, requests) = mpsc::unbounded_channel();
        let router = tokio::spawn(fake_pods::route(handle, Arc::clone(&pods), tx));
        (
            Client::new(service, "default"),
            Self {
                requests,
                pods,
                seen: BTreeSet::new(),
                router: Some(router),
            },
        )
    }

    /// Takes the next request (other than pod lists and watches) and checks its method and
    /// URI; a patch must be a merge patch. The wait is in the test's clock (paused tests
    /// auto-advance through it).
    async fn expect(&mut self, method: Method, uri: &str) -> Call {
        let (req, respond) = tokio::time::timeout(Duration::from_secs(30), self.requests.recv())
            .await
            .unwrap_or_else(|_| panic!("no request; expected {method} {uri}"))
            .expect("client gone");
        assert_eq!(
            (req.method(), req.uri().to_string().as_str()),
            (&method, uri),
            "unexpected request"
        );
        let needed = permission(&method, uri);
        allowed(&needed, &method, uri);
        self.seen.insert(needed);
        self.pod_permissions();
        if method == Method::PATCH {
            assert_eq!(
                req.headers()["content-type"],
                "application/merge-patch+json"
            );
        }
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Call { body, respond }
    }

    /// No further request arrives (within 200 ms of the test's clock).
    async fn expect_quiet(&mut self) {
        if let Ok(Some((req, _))) =
            tokio::time::timeout(Duration::from_millis(200), self.requests.recv()).await
        {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
        self.pod_permissions();
    }

    /// The permissions the pod lists and watches so far needed, each allowed by the Roles.
    fn pod_permissions(&self) -> BTreeSet<Permission> {
        let mut seen = BTreeSet::new();
        for (method, uri) in self.pods.requests() {
            let needed = permission(&method, &uri);
            allowed(&needed, &method, &uri);
            seen.insert(needed);
        }
        seen
    }

    async fn get_sts(&mut self, reply: Value) {
        let call = self.expect(Method::GET, STS_DEMO).await;
        assert_eq!(call.body, Value::Null);
        call.ok(reply);
    }

    /// The Warning Event a failure records on the endpoint, with Kubernetes' or pgwake's reason.
    async fn event(&mut self, reason: &str) -> Value {
        let call = self.expect(Method::POST, EVENTS).await;
        let e = call.body.clone();
        assert_eq!(e["apiVersion"], "events.k8s.io/v1", "{e}");
        assert_eq!(e["type"], "Warning", "{e}");
        assert_eq!(e["reason"], reason, "{e}");
        assert_eq!(e["regarding"]["kind"], "PgwakeEndpoint", "{e}");
        assert_eq!(e["regarding"]["name"], "demo", "{e}");
        assert_eq!(
            e["regarding"]["uid"],
            endpoint_json()["metadata"]["uid"],
            "{e}"
        );
        assert!(e["eventTime"].is_string(), "{e}");
        call.reply(201, e.clone());
        e
    }

    /// A status patch: state and address as given, lastActivity a fresh RFC 3339 time, the
    /// conditions Ready and Suspended following the state. Returns the status written.
    async fn status(&mut self, state: &str, address: Option<&str>) -> Value {
        self.status_of(state, address, endpoint_json()).await
    }

    /// [`Self::status`], answered with the resource `ep` (its status replaced).
    async fn status_of(&mut self, state: &str, address: Option<&str>, ep: Value) -> Value {
        let call = self
            .expect(Method::PATCH, &format!("{STATUS_DEMO}{PATCH_QUERY}"))
            .await;
        let status = &call.body["status"];
        assert_eq!(status["state"], state, "{}", call.body);
        assert_eq!(status["address"], json!(address), "{}", call.body);
        let ts = status["lastActivity"].as_str().expect("lastActivity");
        ts.parse::<k8s_openapi::jiff::Timestamp>().unwrap();
        assert_eq!(
            call.body.as_object().unwrap().len(),
            1,
            "only status is patched"
        );
        let condition = |t: &str| {
            status["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == t))
                .unwrap_or_else(|| panic!("no condition {t} in {status}"))["status"]
                .clone()
        };
        let is = |b: bool| json!(if b { "True" } else { "False" });
        assert_eq!(condition("Ready"), is(state == "Running"), "{status}");
        assert_eq!(condition("Suspended"), is(state == "Suspended"), "{status}");
        let status = status.clone();
        let mut ep = ep;
        ep["status"] = status.clone();
        call.ok(ep);
        status
    }
}

/// The Roles in deploy/ that run the backend must allow a request.
fn allowed(needed: &Permission, method: &Method, uri: &str) {
    for role in BACKEND_ROLES {
        assert!(
            granted(role).contains(needed),
            "Role {role} in deploy/ does not allow {method} {uri} ({needed:?})"
        );
    }
}

fn cfg() -> KubernetesConfig {
    KubernetesConfig {
        namespace: Some(NS.into()),
        ..KubernetesConfig::default()
    }
}

fn route() -> Route {
    Route {
        endpoint: EndpointId::parse("demo").unwrap(),
        backend: BackendSpec::Kubernetes {
            image: "postgres:16".into(),
            port: None,
            command: vec![],
            args: vec![],
            env: BTreeMap::from([(
                "PGDATA".to_string(),
                "/var/lib/postgresql/data/pgdata".to_string(),
            )]),
            env_secret: Some("demo-postgres".into()),
            requests: BTreeMap::from([("cpu".to_string(), "250m".to_string())]),
            limits: BTreeMap::new(),
            storage: Some("1Gi".into()),
            storage_class: None,
            pod: Default::default(),
        },
        idle_timeout: None,
        deep_sleep_after: None,
        allow: vec![],
        max_connections: None,
    }
}

fn desired_hash() -> String {
    let d = desired_statefulset(&cfg(), NS, &route()).unwrap();
    workload::template_hash(&d).unwrap().to_string()
}

/// A StatefulSet as the API server returns it.
fn sts_json(replicas: i32, rv: &str, hash: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": "pgwake-demo",
            "namespace": NS,
            "uid": "5b0e1c6e-2d7f-4a3e-9a51-0d6f2f1c9a10",
            "resourceVersion": rv,
            "generation": 3,
            "creationTimestamp": "2026-11-20T10:00:00Z",
            "labels": {
                "app.kubernetes.io/managed-by": "pgwake",
                "app.kubernetes.io/name": "pgwake-compute",
                "pgwake.io/endpoint": "demo"
            },
            "annotations": { "pgwake.io/template-hash": hash }
        },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": {
                "app.kubernetes.io/managed-by": "pgwake",
                "pgwake.io/endpoint": "demo"
            }},
            "serviceName": "pgwake-demo",
            "podManagementPolicy": "Parallel",
            "template": {
                "metadata": { "labels": {
                    "app.kubernetes.io/managed-by": "pgwake",
                    "app.kubernetes.io/name": "pgwake-compute",
                    "pgwake.io/endpoint": "demo"
                }},
                "spec": { "containers": [{ "name": "postgres", "image": "postgres:16" }] }
            },
            "updateStrategy": { "type": "RollingUpdate", "rollingUpdate": { "partition": 0 } },
            "revisionHistoryLimit": 10
        },
        "status": {
            "observedGeneration": 3,
            "replicas": replicas,
            "availableReplicas": replicas,
            "currentRevision": "pgwake-demo-7d9c8b6f5",
            "updateRevision": "pgwake-demo-7d9c8b6f5",
            "collisionCount": 0
        }
    })
}

const POD_UID: &str = "a3c1f9d2-41b8-4c55-8e0f-3b7e2f6d9c01";

/// Pod `pgwake-demo-0` in one of the phases a start goes through.
fn pod_json(rv: &str, stage: &str) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "pgwake-demo-0",
            "generateName": "pgwake-demo-",
            "namespace": NS,
            "uid": POD_UID,
            "resourceVersion": rv,
            "creationTimestamp": "2026-11-25T12:00:00Z",
            "labels": {
                "app.kubernetes.io/managed-by": "pgwake",
                "pgwake.io/endpoint": "demo",
                "apps.kubernetes.io/pod-index": "0",
                "controller-revision-hash": "pgwake-demo-7d9c8b6f5",
                "statefulset.kubernetes.io/pod-name": "pgwake-demo-0"
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "StatefulSet", "name": "pgwake-demo",
                "uid": "5b0e1c6e-2d7f-4a3e-9a51-0d6f2f1c9a10",
                "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "containers": [{ "name": "postgres", "image": "postgres:16",
                             "ports": [{ "name": "postgres", "containerPort": 5432, "protocol": "TCP" }] }],
            "hostname": "pgwake-demo-0",
            "subdomain": "pgwake-demo",
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 60
        },
        "status": { "phase": "Pending", "qosClass": "Burstable" }
    });
    let cond = |t: &str, s: bool| {
        json!({ "type": t, "status": if s { "True" } else { "False" },
                                          "lastTransitionTime": "2026-11-25T12:00:01Z" })
    };
    let container = |ready: bool, state: Value, restarts: i32| {
        json!({
            "name": "postgres", "image": "docker.io/library/postgres:16",
            "imageID": "docker.io/library/postgres@sha256:4ec37d2a07a0067f176fdcc9d4bb633a5724d2cc4f892c7a2046d054bb6939e5",
            "ready": ready, "restartCount": restarts, "started": ready, "state": state
        })
    };
    let status = &mut pod["status"];
    match stage {
        "pending" => {
            status["conditions"] = json!([cond("PodScheduled", false)]);
        }
        // No default StorageClass: the claim never binds, the scheduler says so.
        "unschedulable" => {
            status["conditions"] = json!([{
                "type": "PodScheduled",
                "status": "False",
                "lastProbeTime": null,
                "lastTransitionTime": "2026-11-25T12:00:01Z",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling."
            }]);
        }
        "creating" => {
            status["conditions"] = json!([cond("PodScheduled", true), cond("Ready", false)]);
            status["hostIP"] = json!("172.18.0.2");
            status["containerStatuses"] = json!([container(
                false,
                json!({ "waiting": { "reason": "ContainerCreating" } }),
                0
            )]);
        }
        "starting" => {
            status["phase"] = json!("Running");
            status["conditions"] = json!([
                cond("PodScheduled", true),
                cond("Initialized", true),
                cond("ContainersReady", false),
                cond("Ready", false)
            ]);
            status["hostIP"] = json!("172.18.0.2");
            status["podIP"] = json!(POD_IP);
            status["podIPs"] = json!([{ "ip": POD_IP }]);
            status["containerStatuses"] = json!([container(
                false,
                json!({ "running": { "startedAt": "2026-11-25T12:00:02Z" } }),
                0
            )]);
        }
        "ready" | "restarted" => {
            status["phase"] = json!("Running");
            status["conditions"] = json!([
                cond("PodScheduled", true),
                cond("Initialized", true),
                cond("ContainersReady", true),
                cond("Ready", true)
            ]);
            status["hostIP"] = json!("172.18.0.2");
            status["podIP"] = json!(POD_IP);
            status["podIPs"] = json!([{ "ip": POD_IP }]);
            status["containerStatuses"] = json!([container(
                true,
                json!({ "running": { "startedAt": "2026-11-25T12:00:02Z" } }),
                if stage == "restarted" { 1 } else { 0 }
            )]);
        }
        "imagepull" => {
            status["conditions"] = json!([cond("PodScheduled", true), cond("Ready", false)]);
            status["containerStatuses"] = json!([container(
                false,
                json!({ "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": "Back-off pulling image \"postgres:61\": ErrImagePull: not found"
                }}),
                0
            )]);
        }
        "terminating" => {
            pod["metadata"]["deletionTimestamp"] = json!("2026-11-25T12:10:00Z");
            pod["metadata"]["deletionGracePeriodSeconds"] = json!(60);
            return pod_json_with(pod, "ready");
        }
        other => panic!("unknown stage {other}"),
    }
    pod
}

fn pod_json_with(mut base: Value, stage: &str) -> Value {
    base["status"] = pod_json("0", stage)["status"].clone();
    base
}

/// RFC 7386, as the API server applies a merge patch.
fn apply_merge_patch(target: Value, patch: Value) -> Value {
    match patch {
        Value::Object(patch) => {
            let mut target = match target {
                Value::Object(t) => t,
                _ => serde_json::Map::new(),
            };
            for (k, v) in patch {
                if v.is_null() {
                    target.remove(&k);
                } else {
                    let old = target.remove(&k).unwrap_or(Value::Null);
                    target.insert(k, apply_merge_patch(old, v));
                }
            }
            Value::Object(target)
        }
        other => other,
    }
}

/// A template update from zero removes what the endpoint no longer has: a JSON merge patch of
/// the new template alone would leave a dropped node selector, resource limit or annotation
/// in the StatefulSet.
#[test]
fn template_updates_replace_the_template() {
    let mut old = desired_statefulset(&cfg(), NS, &route()).unwrap();
    let spec = old.spec.as_mut().unwrap();
    let pod = spec.template.spec.as_mut().unwrap();
    pod.node_selector = Some([("disk".to_string(), "ssd".to_string())].into());
    pod.containers[0].resources =
        Some(serde_json::from_value(json!({ "limits": { "memory": "1Gi", "cpu": "1" } })).unwrap());
    spec.template.metadata.as_mut().unwrap().annotations =
        Some([("old".to_string(), "x".to_string())].into());
    let desired = desired_statefulset(&cfg(), NS, &route()).unwrap();
    let patch = workload::scale_patch("5", 1, Some((&old, &desired)));
    let old_template = json!(old.spec.as_ref().unwrap().template);
    let new_template = json!(desired.spec.as_ref().unwrap().template);
    assert_eq!(
        apply_merge_patch(old_template.clone(), patch["spec"]["template"].clone()),
        new_template
    );
    // Which the patch of the new template alone would not do.
    assert_ne!(
        apply_merge_patch(old_template, new_template.clone()),
        new_template
    );
}

/// Waits (in the test's clock, up to 30 s) until `cond` holds.
async fn until(cond: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("condition not met within 30 s");
}

fn endpoint_json() -> Value {
    json!({
        "apiVersion": "pgwake.io/v1",
        "kind": "PgwakeEndpoint",
        "metadata": { "name": "demo", "namespace": NS, "uid": "0d9f...", "resourceVersion": "77" },
        "spec": { "compute": { "image": "postgres:16" } }
    })
}

fn backend(client: Client) -> KubernetesBackend {
    KubernetesBackend::new(client, cfg()).unwrap()
}

/// The API server's side of waking a StatefulSet that is at 0 with an older template, up to
/// the pod being ready.
async fn serve_wake_from_zero(api: &mut ApiServer) {
    api.get_sts(sts_json(0, "1000", "0000000000000000")).await;

    let patch = api
        .expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
        .await;
    let desired = desired_statefulset(&cfg(), NS, &route()).unwrap();
    let mut body = patch.body.clone();
    let template = body["spec"].as_object_mut().unwrap().remove("template");
    assert_eq!(
        body,
        json!({
            "metadata": {
                "resourceVersion": "1000",
                "annotations": { "pgwake.io/template-hash": desired_hash() },
            },
            "spec": { "replicas": 1 },
        })
    );
    // The patch replaces the template: merged into the old one, it gives the new one.
    let old = sts_json(0, "1000", "0000000000000000")["spec"]["template"].clone();
    assert_eq!(
        apply_merge_patch(old, template.unwrap()),
        json!(desired.spec.unwrap().template)
    );
    patch.ok(sts_json(1, "1001", &desired_hash()));
    api.status("Starting", None).await;

    for stage in ["pending", "creating", "starting", "ready"] {
        api.pods.put(pod_json("0", stage));
    }
    api.status("Running", Some("10.244.0.17:5432")).await;
}

#[tokio::test]
async fn wake_from_zero_patches_then_watches_until_ready() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let server = tokio::spawn(async move {
        serve_wake_from_zero(&mut api).await;
        api.expect_quiet().await;
    });
    let compute = b.start(&route()).await.unwrap();
    assert_eq!(compute.addr().as_str(), "10.244.0.17:5432");
    server.await.unwrap();
}

#[tokio::test]
async fn wake_when_already_running_makes_no_change() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    api.pods.put(pod_json("0", "ready"));
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(1, "2000", &desired_hash())).await;
        // No patch and no "Starting": the list already shows the ready pod.
        api.status("Running", Some("10.244.0.17:5432")).await;
        api.expect_quiet().await;
    });
    let compute = b.start(&route()).await.unwrap();
    assert_eq!(compute.addr().as_str(), "10.244.0.17:5432");
    server.await.unwrap();
}

#[tokio::test]
async fn wake_creates_a_missing_statefulset() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let server = tokio::spawn(async move {
        api.expect(Method::GET, STS_DEMO)
            .await
            .fail(404, "NotFound");
        let create = api
            .expect(Method::POST, &format!("{STS}{PATCH_QUERY}"))
            .await;
        let desired =
            serde_json::to_value(desired_statefulset(&cfg(), NS, &route()).unwrap()).unwrap();
        assert_eq!(create.body, desired);
        assert_eq!(create.body["spec"]["replicas"], 1);
        assert_eq!(
            create.body["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]
                ["storage"],
            "1Gi"
        );
        create.reply(201, sts_json(1, "3000", &desired_hash()));
        api.status("Starting", None).await;
        api.pods.put(pod_json("0", "ready"));
        api.status("Running", Some("10.244.0.17:5432")).await;
        api.expect_quiet().await;
    });
    b.start(&route()).await.unwrap();
    server.await.unwrap();
}

/// `[kubernetes] delete_with_endpoint`: a StatefulSet created for a `PgwakeEndpoint` is owned
/// by it (Kubernetes deletes it after the endpoint), and with `delete_volume_with_endpoint` its
/// claim goes too; by default neither.
#[tokio::test]
async fn opt_in_cleanup_makes_the_endpoint_own_its_statefulset() {
    let (client, mut api) = ApiServer::new();
    let cleanup = KubernetesConfig {
        delete_with_endpoint: true,
        delete_volume_with_endpoint: true,
        ..cfg()
    };
    assert!(cleanup.validate().is_empty());
    let b = KubernetesBackend::new(client, cleanup.clone()).unwrap();
    let server = tokio::spawn(async move {
        api.expect(Method::GET, STS_DEMO)
            .await
            .fail(404, "NotFound");
        api.expect(Method::GET, ENDPOINT_DEMO)
            .await
            .ok(endpoint_json());
        let create = api
            .expect(Method::POST, &format!("{STS}{PATCH_QUERY}"))
            .await;
        assert_eq!(
            create.body["metadata"]["ownerReferences"],
            json!([{
                "apiVersion": "pgwake.io/v1",
                "kind": "PgwakeEndpoint",
                "name": "demo",
                "uid": endpoint_json()["metadata"]["uid"],
                "controller": true,
            }])
        );
        assert_eq!(
            create.body["spec"]["persistentVolumeClaimRetentionPolicy"],
            json!({ "whenScaled": "Retain", "whenDeleted": "Delete" })
        );
        create.reply(201, sts_json(1, "3000", &desired_hash()));
        api.status("Starting", None).await;
        api.pods.put(pod_json("0", "ready"));
        api.status("Running", Some("10.244.0.17:5432")).await;
        api.expect_quiet().await;
    });
    b.start(&route()).await.unwrap();
    server.await.unwrap();

    // By default: no owner, and the claim outlives the StatefulSet.
    let default = desired_statefulset(&cfg(), NS, &route()).unwrap();
    assert!(default.metadata.owner_references.is_none());
    let policy = default
        .spec
        .unwrap()
        .persistent_volume_claim_retention_policy
        .unwrap();
    assert_eq!(policy.when_deleted.as_deref(), Some("Retain"));
    // Deleting the volume without the StatefulSet is not a thing.
    let bad = KubernetesConfig {
        delete_with_endpoint: false,
        ..cleanup
    };
    assert_eq!(bad.validate().len(), 1);
}

#[tokio::test]
async fn conflict_is_read_again_and_retried() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let hash = desired_hash();
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(0, "4000", &hash)).await;
        let patch = api
            .expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await;
        // Template unchanged: only the replicas, conditional on the version read.
        assert_eq!(
            patch.body,
            json!({ "metadata": { "resourceVersion": "4000" }, "spec": { "replicas": 1 } })
        );
        patch.fail(409, "Conflict");
        // Someone changed it in between (here: its status); still at 0, so patch again.
        api.get_sts(sts_json(0, "4002", &hash)).await;
        let patch = api
            .expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await;
        assert_eq!(
            patch.body,
            json!({ "metadata": { "resourceVersion": "4002" }, "spec": { "replicas": 1 } })
        );
        patch.ok(sts_json(1, "4003", &hash));
        api.status("Starting", None).await;
        api.pods.put(pod_json("0", "ready"));
        api.status("Running", Some("10.244.0.17:5432")).await;
        api.expect_quiet().await;
    });
    b.start(&route()).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn racing_managers_converge_on_one_pod() {
    // Another manager creates the StatefulSet between our read and our create: our create
    // gets 409 AlreadyExists, we read again, see replicas 1, and only wait.
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let server = tokio::spawn(async move {
        api.expect(Method::GET, STS_DEMO)
            .await
            .fail(404, "NotFound");
        api.expect(Method::POST, &format!("{STS}{PATCH_QUERY}"))
            .await
            .fail(409, "AlreadyExists");
        api.pods.put(pod_json("0", "creating"));
        api.get_sts(sts_json(1, "5001", &desired_hash())).await;
        api.pods.put(pod_json("0", "ready"));
        api.status("Running", Some("10.244.0.17:5432")).await;
        api.expect_quiet().await;
    });
    b.start(&route()).await.unwrap();
    server.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn api_errors_are_retried_with_backoff_then_the_wake_gives_up() {
    let (client, mut api) = ApiServer::new();
    let b = KubernetesBackend::new(
        client,
        KubernetesConfig {
            api_retries: 3,
            retry_backoff: Duration::from_millis(100),
            ..cfg()
        },
    )
    .unwrap();
    let server = tokio::spawn(async move {
        let mut at = Vec::new();
        let t0 = tokio::time::Instant::now();
        for _ in 0..4 {
            api.expect(Method::GET, STS_DEMO)
                .await
                .fail(500, "InternalError");
            at.push(t0.elapsed());
        }
        // Nothing was changed, so there is nothing to undo.
        api.expect_quiet().await;
        at
    });
    let err = match b.start(&route()).await {
        Err(e) => e,
        Ok(_) => panic!("wake succeeded against a failing API"),
    };
    assert!(err.retryable(), "{err}");
    assert_eq!(err.kind(), BackendErrorKind::Io);
    assert!(err.to_string().contains("gave up after 4 tries"), "{err}");
    let at = server.await.unwrap();
    // Exponential backoff between the tries: 100, 200, 400 ms.
    let gaps: Vec<u128> = at.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    assert_eq!(gaps, [100, 200, 400]);
}

/// A pod that cannot be scheduled (here: its volume never binds) keeps the wake waiting until
/// the manager gives up; the status written after scaling back down names the scheduler's
/// reason and message (condition Failed), not just a timeout.
#[tokio::test(start_paused = true)]
async fn an_abandoned_start_reports_why_its_pod_was_not_ready() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let hash = desired_hash();
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(0, "8000", &hash)).await;
        api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await
            .ok(sts_json(1, "8001", &hash));
        api.status("Starting", None).await;
        api.pods.put(pod_json("0", "unschedulable"));
        api.get_sts(sts_json(1, "8003", &hash)).await;
        api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await
            .ok(sts_json(0, "8004", &hash));
        let status = api.status("Suspended", None).await;
        let failed = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Failed")
            .unwrap()
            .clone();
        api.event("Unschedulable").await;
        api.expect_quiet().await;
        failed
    });
    let r = tokio::time::timeout(Duration::from_secs(10), b.start(&route())).await;
    assert!(r.is_err(), "the wake should have hung");
    let failed = server.await.unwrap();
    assert_eq!(failed["status"], "True", "{failed}");
    assert_eq!(failed["reason"], "Unschedulable", "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("unbound immediate PersistentVolumeClaims"),
        "{failed}"
    );
}

fn with_start_timeout() -> KubernetesConfig {
    KubernetesConfig {
        start_timeout: Some(Duration::from_secs(600)),
        ..cfg()
    }
}

/// With `start_timeout`, a start its clients gave up on goes on: here its pod becomes ready
/// later, and only then is the StatefulSet scaled back to 0 (nobody waits for it), with a
/// status that reports no failure. Without it, the StatefulSet went to 0 at once
/// (`a_wake_abandoned_by_the_manager_scales_back_to_zero`).
#[tokio::test(start_paused = true)]
async fn with_start_timeout_an_abandoned_start_goes_on_until_ready() {
    let (client, mut api) = ApiServer::new();
    let b = KubernetesBackend::new(client, with_start_timeout()).unwrap();
    let hash = desired_hash();
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(0, "7500", &hash)).await;
        api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await
            .ok(sts_json(1, "7501", &hash));
        api.status("Starting", None).await;
        api.pods.put(pod_json("0", "pending"));
        dropped_rx.await.unwrap();
        // The start goes on in the background (no scale-down) until the pod is ready.
        api.expect_quiet().await;
        api.pods.put(pod_json("0", "ready"));
        api.get_sts(sts_json(1, "7504", &hash)).await;
        let patch = api
            .expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await;
        assert_eq!(patch.body["spec"], json!({ "replicas": 0 }));
        patch.ok(sts_json(0, "7505", &hash));
        let status = api.status("Suspended", None).await;
        let failed = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Failed")
            .unwrap()
            .clone();
        assert_eq!(failed["status"], "False", "{status}");
        api.expect_quiet().await;
    });
    let r = tokio::time::timeout(Duration::from_secs(10), b.start(&route())).await;
    assert!(r.is_err(), "the wake should have hung");
    dropped_tx.send(()).unwrap();
    server.await.unwrap();
}

/// A client that comes while an abandoned start goes on takes it over: no scale-down, no
/// second scale-up, and the start it took over stands down when the pod gets ready.
#[tokio::test(start_paused = true)]
async fn a_new_wake_takes_over_a_start_that_went_on() {
    let (client, mut api) = ApiServer::new();
    let b = KubernetesBackend::new(client, with_start_timeout()).unwrap();
    let hash = desired_hash();
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(0, "7600", &hash)).await;
        api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await
            .ok(sts_json(1, "7601", &hash));
        api.status("Starting", None).await;
        api.pods.put(pod_json("0", "pending"));
        // The new wake: the StatefulSet is at 1 already, its pod becomes ready; the start
        // that went on sees it ready too, and leaves it alone.
        api.get_sts(sts_json(1, "7604", &hash)).await;
        api.pods.put(pod_json("0", "ready"));
        api.status("Running", Some("10.244.0.17:5432")).await;
        api.expect_quiet().await;
    });
    let r = tokio::time::timeout(Duration::from_secs(10), b.start(&route())).await;
    assert!(r.is_err(), "the wake should have hung");
    // The start that went on waits for the pod.
    until(|| b.shared.pod_watch.subscribers() == 1).await;
    let compute = b.start(&route()).await.unwrap();
    assert_eq!(compute.addr().to_string(), "10.244.0.17:5432");
    server.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_wake_abandoned_by_the_manager_scales_back_to_zero() {
    // The pod never gets ready; the manager's wake_timeout (here a plain timeout) drops the
    // start, and the backend undoes its scale-up.
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let hash = desired_hash();
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(0, "6000", &hash)).await;
        api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await
            .ok(sts_json(1, "6001", &hash));
        api.status("Starting", None).await;
        // The pod stays pending: the wake hangs until it is dropped.
        api.pods.put(pod_json("0", "pending"));
        api.get_sts(sts_json(1, "6003", &hash)).await;
        let patch = api
            .expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await;
        assert_eq!(
            patch.body,
            json!({ "metadata": { "resourceVersion": "6003" }, "spec": { "replicas": 0 } })
        );
        patch.ok(sts_json(0, "6004", &hash));
        api.status("Suspended", None).await;
        api.event("Unschedulable").await;
        api.expect_quiet().await;
    });
    let r = tokio::time::timeout(Duration::from_secs(10), b.start(&route())).await;
    assert!(r.is_err(), "the wake should have hung");
    server.await.unwrap();
}

#[tokio::test]
async fn failing_container_ends_the_wake_early_with_its_reason() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let hash = desired_hash();
    api.pods.put(pod_json("0", "imagepull"));
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(1, "7000", &hash)).await;
        // The failed start is undone.
        api.get_sts(sts_json(1, "7001", &hash)).await;
        api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await
            .ok(sts_json(0, "7002", &hash));
        // The endpoint's status says why, with Kubernetes' reason (kubectl get pgwe -o wide).
        let status = api.status("Suspended", None).await;
        let failed = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Failed")
            .unwrap();
        assert_eq!(failed["status"], "True", "{status}");
        assert_eq!(failed["reason"], "ImagePullBackOff", "{status}");
        assert!(
            failed["message"].as_str().unwrap().contains("postgres:61"),
            "{status}"
        );
        // And a Warning Event on the endpoint (kubectl describe pgwe demo).
        let event = api.event("ImagePullBackOff").await;
        assert!(event["note"].as_str().unwrap().contains("postgres:61"));
        api.expect_quiet().await;
    });
    let err = match b.start(&route()).await {
        Err(e) => e,
        Ok(_) => panic!("wake succeeded with a failing image"),
    };
    assert_eq!(err.kind(), BackendErrorKind::StartFailed);
    assert!(err.to_string().contains("ImagePullBackOff"), "{err}");
    // The client's 57P03 says what Kubernetes says, without the image's name.
    let client = crate::WakeError::Backend(Arc::new(err));
    assert!(client.retryable());
    assert_eq!(
        client.user_message(),
        "the compute could not start: ImagePullBackOff (image not found)"
    );
    server.await.unwrap();
}

/// A quota (or Pod Security, or a webhook) refusing the pod ends the wake at once with the
/// StatefulSet controller's reason, rather than a bare timeout at wake_timeout.
#[tokio::test(start_paused = true)]
async fn a_pod_the_statefulset_cannot_create_ends_the_wake_with_failed_create() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let hash = desired_hash();
    let server = tokio::spawn(async move {
        serve_failed_create(&mut api, &hash, 1).await;
        api.expect_quiet().await;
    });
    let t0 = tokio::time::Instant::now();
    let err = match b.start(&route()).await {
        Err(e) => e,
        Ok(_) => panic!("woke a compute whose pod cannot be created"),
    };
    // Two looks at the Events, FAILED_CREATE_CHECK apart, not a wait for wake_timeout.
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(err.kind(), BackendErrorKind::StartFailed);
    let client = crate::WakeError::Backend(Arc::new(err));
    assert_eq!(
        client.user_message(),
        "the compute could not start: FailedCreate (quota exceeded)"
    );
    server.await.unwrap();
}

/// The resource `route()` is made from, at `generation`, as the API server returns it.
fn endpoint_of_route(generation: i64) -> Value {
    json!({
        "apiVersion": "pgwake.io/v1",
        "kind": "PgwakeEndpoint",
        "metadata": {
            "name": "demo", "namespace": NS, "uid": "0d9f...", "resourceVersion": "78",
            "generation": generation, "creationTimestamp": "2026-11-25T11:00:00Z",
        },
        "spec": { "compute": {
            "image": "postgres:16",
            "envSecret": "demo-postgres",
            "env": { "PGDATA": "/var/lib/postgresql/data/pgdata" },
            "resources": { "requests": { "cpu": "250m" } },
            "storage": { "size": "1Gi" },
        } }
    })
}

fn condition_of<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

/// observedGeneration is the generation whose spec the compute was started from, and a
/// condition whose status does not change keeps its lastTransitionTime.
#[tokio::test]
async fn status_carries_the_observed_generation_and_keeps_unchanged_transition_times() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let hash = desired_hash();
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(0, "9400", &hash)).await;
        api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await
            .ok(sts_json(1, "9401", &hash));
        // The first write by this manager: no generation known yet.
        let starting = api.status_of("Starting", None, endpoint_of_route(4)).await;
        assert!(starting.get("observedGeneration").is_none(), "{starting}");
        api.pods.put(pod_json("0", "ready"));
        let running = api
            .status_of("Running", Some("10.244.0.17:5432"), endpoint_of_route(4))
            .await;
        assert_eq!(running["observedGeneration"], 4, "{running}");
        // Ready went from False to True: a new time. Suspended and Failed stayed False.
        let at = |s: &Value, t: &str| condition_of(s, t)["lastTransitionTime"].clone();
        assert_ne!(at(&running, "Ready"), at(&starting, "Ready"));
        assert_eq!(at(&running, "Suspended"), at(&starting, "Suspended"));
        assert_eq!(at(&running, "Failed"), at(&starting, "Failed"));
        (api, running)
    });
    let compute = b.start(&route()).await.unwrap();
    let (mut api, running) = server.await.unwrap();
    // The spec changes (generation 5) while the compute runs: the suspend does not claim it.
    let hash = desired_hash();
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(1, "9403", &hash)).await;
        api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await
            .ok(sts_json(0, "9404", &hash));
        let mut changed = endpoint_of_route(5);
        changed["spec"]["compute"]["image"] = json!("postgres:17");
        let suspending = api.status_of("Suspending", None, changed.clone()).await;
        assert_eq!(suspending["observedGeneration"], 4, "{suspending}");
        api.pods.delete(POD);
        let suspended = api.status_of("Suspended", None, changed).await;
        assert_eq!(suspended["observedGeneration"], 4, "{suspended}");
        let at = |s: &Value, t: &str| condition_of(s, t)["lastTransitionTime"].clone();
        assert_eq!(at(&suspending, "Failed"), at(&running, "Failed"));
        assert_ne!(at(&suspended, "Suspended"), at(&running, "Suspended"));
        api.expect_quiet().await;
    });
    compute.stop().await.unwrap();
    server.await.unwrap();
}

/// Kubernetes' messages, as real clusters write them, become a reason word and a class.
#[test]
fn start_blockers_class_kubernetes_messages_without_names() {
    let cases = [
        ("Unschedulable", "0/3 nodes are available: 3 Insufficient memory. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod.", "Unschedulable (insufficient memory)"),
        ("Unschedulable", "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.", "Unschedulable (insufficient cpu)"),
        ("Unschedulable", "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling.", "Unschedulable (volume not bound)"),
        ("Unschedulable", "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.", "Unschedulable (no node matches)"),
        ("FailedCreate", "create Pod pgwake-demo-0 in StatefulSet pgwake-demo failed error: pods \"pgwake-demo-0\" is forbidden: exceeded quota: compute, requested: memory=1Gi, used: memory=4Gi, limited: memory=4Gi", "FailedCreate (quota exceeded)"),
        ("FailedCreate", "create Pod pgwake-demo-0 in StatefulSet pgwake-demo failed error: pods \"pgwake-demo-0\" is forbidden: violates PodSecurity \"restricted:latest\": runAsNonRoot != true", "FailedCreate (Pod Security)"),
        ("FailedCreate", "create Pod pgwake-demo-0 in StatefulSet pgwake-demo failed error: admission webhook \"validate.kyverno.svc-fail\" denied the request", "FailedCreate (admission webhook)"),
        ("ErrImagePull", "failed to pull and unpack image \"registry.example.com/pg:16\": failed to resolve reference: pull access denied, repository does not exist or may require authorization: server message: insufficient_scope: authorization failed", "ErrImagePull (image pull not authorized)"),
        ("ContainerCreating", "", "ContainerCreating"),
    ];
    for (reason, message, shown) in cases {
        let b = workload::start_blocker(reason, message);
        assert_eq!(b.to_string(), shown, "{message}");
    }
}

#[tokio::test]
async fn permanent_errors_fail_at_once_as_misconfiguration() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let server = tokio::spawn(async move {
        api.expect(Method::GET, STS_DEMO)
            .await
            .fail(403, "Forbidden");
        api.expect_quiet().await;
    });
    let err = match b.start(&route()).await {
        Err(e) => e,
        Ok(_) => panic!("wake succeeded without permission"),
    };
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured);
    assert!(!err.retryable());
    server.await.unwrap();
}

/// Wakes an already-running compute (the shortest conversation) for the tests that need one.
async fn running(api: &mut ApiServer, b: &KubernetesBackend) -> Box<dyn RunningCompute> {
    api.pods.put(pod_json("0", "ready"));
    let (compute, ()) = tokio::join!(async { b.start(&route()).await.unwrap() }, async {
        api.get_sts(sts_json(1, "8000", &desired_hash())).await;
        api.status("Running", Some("10.244.0.17:5432")).await;
    });
    compute
}

#[tokio::test]
async fn suspend_scales_to_zero_and_waits_until_the_pod_is_gone() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let compute = running(&mut api, &b).await;
    let hash = desired_hash();
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(1, "8100", &hash)).await;
        let patch = api
            .expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await;
        assert_eq!(
            patch.body,
            json!({ "metadata": { "resourceVersion": "8100" }, "spec": { "replicas": 0 } })
        );
        patch.ok(sts_json(0, "8101", &hash));
        api.status("Suspending", None).await;
        api.pods.put(pod_json("0", "terminating"));
        // Not suspended while the pod is still there.
        api.expect_quiet().await;
        api.pods.delete(POD);
        api.status("Suspended", None).await;
        api.expect_quiet().await;
    });
    compute.stop().await.unwrap();
    server.await.unwrap();
}

/// A wake that creates the StatefulSet, a suspend, and the list of running computes that a
/// new manager adopts make every call of the backend: with the routing table's reflector, that
/// is exactly what the manager's Roles in deploy/ allow.
#[tokio::test]
async fn the_manager_roles_are_exactly_what_a_wake_a_suspend_an_adoption_and_the_reflector_use() {
    let (client, mut api) = ApiServer::new();
    // With the opt-in cleanup, which reads the endpoint to own its StatefulSet.
    let cleanup = KubernetesConfig {
        delete_with_endpoint: true,
        ..cfg()
    };
    let b = KubernetesBackend::new(client, cleanup).unwrap();
    let hash = desired_hash();
    let (compute, api) = tokio::join!(async { b.start(&route()).await.unwrap() }, async move {
        api.expect(Method::GET, STS_DEMO)
            .await
            .fail(404, "NotFound");
        api.expect(Method::GET, ENDPOINT_DEMO)
            .await
            .ok(endpoint_json());
        api.expect(Method::POST, &format!("{STS}{PATCH_QUERY}"))
            .await
            .reply(201, sts_json(1, "9000", &hash));
        api.status("Starting", None).await;
        api.pods.put(pod_json("0", "ready"));
        api.status("Running", Some("10.244.0.17:5432")).await;
        api
    });
    let hash = desired_hash();
    let server = tokio::spawn(async move {
        let mut api = api;
        api.get_sts(sts_json(1, "9100", &hash)).await;
        api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await
            .ok(sts_json(0, "9101", &hash));
        api.status("Suspending", None).await;
        api.pods.delete(POD);
        api.status("Suspended", None).await;
        api.expect_quiet().await;
        api
    });
    compute.stop().await.unwrap();
    let mut api = server.await.unwrap();
    let (ids, ()) = tokio::join!(async { b.running_endpoints().await.unwrap() }, async {
        api.expect(Method::GET, STS_MANAGED)
            .await
            .ok(sts_list(vec![sts_json(0, "9103", &desired_hash())]));
    });
    assert!(ids.is_empty(), "at 0 replicas: {ids:?}");
    // And a start that fails, which records an Event.
    let hash = desired_hash();
    let (err, mut api) = tokio::join!(
        async { b.start(&route()).await.err().expect("a failing start") },
        async {
            api.get_sts(sts_json(0, "9200", &hash)).await;
            api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
                .await
                .ok(sts_json(1, "9201", &hash));
            api.status("Starting", None).await;
            api.pods.put(pod_json("0", "imagepull"));
            api.get_sts(sts_json(1, "9203", &hash)).await;
            api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
                .await
                .ok(sts_json(0, "9204", &hash));
            api.status("Suspended", None).await;
            api.event("ImagePullBackOff").await;
            api
        }
    );
    assert_eq!(err.kind(), crate::BackendErrorKind::StartFailed);
    // And one whose pod the StatefulSet cannot create, which reads its Events.
    api.pods.delete(POD);
    let hash = desired_hash();
    let (err, mut api) = tokio::join!(
        async { b.start(&route()).await.err().expect("a refused pod") },
        async {
            serve_failed_create(&mut api, &hash, 0).await;
            api
        }
    );
    assert_eq!(err.kind(), crate::BackendErrorKind::StartFailed);
    api.expect_quiet().await;
    let mut used = api.pod_permissions();
    used.extend(api.seen);
    used.extend(reflector_permissions().await);
    for role in BACKEND_ROLES {
        // Plus, for the manager replicas, the Lease of their leader election (whose requests
        // leader_tests.rs checks the same way), and for the single pod, the roles Secrets its
        // proxy part reads (deploy_tests.rs checks those).
        let granted: BTreeSet<Permission> = granted(role)
            .into_iter()
            .filter(|(group, res, _)| group != "coordination.k8s.io" && res != "secrets")
            // And the leader label on the manager's own pod (leader_tests.rs too).
            .filter(|p| *p != (String::new(), "pods".to_string(), "patch".to_string()))
            // And the endpoints created and deleted on request (provision_tests.rs).
            .filter(|(group, res, verb)| {
                !(group == "pgwake.io"
                    && res == "pgwakeendpoints"
                    && ["create", "delete"].contains(&verb.as_str()))
            })
            .collect();
        assert_eq!(used, granted, "Role {role}");
    }
}

#[tokio::test]
async fn suspend_of_an_already_stopped_compute_only_waits() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let compute = running(&mut api, &b).await;
    let server = tokio::spawn(async move {
        api.pods.delete(POD);
        api.get_sts(sts_json(0, "8200", &desired_hash())).await;
        api.status("Suspended", None).await;
        api.expect_quiet().await;
    });
    compute.stop().await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn exited_fires_when_the_pod_is_deleted() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let compute = running(&mut api, &b).await;
    let server = tokio::spawn(async move {
        api.pods.delete(POD);
        serve_scale_down_after_exit(&mut api, "8302", "pod deleted").await;
    });
    tokio::time::timeout(Duration::from_secs(10), compute.exited())
        .await
        .expect("exited did not fire");
    server.await.unwrap();
}

/// The API server's side of an unexpected exit: the StatefulSet, still at 1, is scaled to 0
/// (its controller would otherwise bring the pod back, with no idle timer), and the status
/// says Suspended, Failed with reason ComputeExited and `why`.
async fn serve_scale_down_after_exit(api: &mut ApiServer, rv: &str, why: &str) {
    let hash = desired_hash();
    api.get_sts(sts_json(1, rv, &hash)).await;
    let patch = api
        .expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
        .await;
    assert_eq!(patch.body["spec"], json!({ "replicas": 0 }));
    patch.ok(sts_json(0, "9999", &hash));
    let status = api.status("Suspended", None).await;
    let failed = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Failed")
        .unwrap();
    assert_eq!(failed["status"], "True", "{status}");
    assert_eq!(failed["reason"], "ComputeExited", "{status}");
    assert_eq!(failed["message"], why, "{status}");
    let event = api.event("ComputeExited").await;
    assert_eq!(event["note"], why);
    api.expect_quiet().await;
}

/// Item 1 of the production review: a pod that is evicted and recreated by its StatefulSet's
/// controller (a new uid) is not left running with no idle timer.
#[tokio::test]
async fn a_replaced_pod_is_scaled_to_zero_not_left_running() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let compute = running(&mut api, &b).await;
    let server = tokio::spawn(async move {
        // Evicted, and recreated by the StatefulSet's controller.
        api.pods.delete(POD);
        let mut replaced = pod_json("0", "creating");
        replaced["metadata"]["uid"] = json!("5e1d0c2b-0000-4000-8000-000000000001");
        api.pods.put(replaced);
        serve_scale_down_after_exit(&mut api, "8602", "pod replaced").await;
    });
    tokio::time::timeout(Duration::from_secs(10), compute.exited())
        .await
        .expect("exited did not fire");
    server.await.unwrap();
}

#[tokio::test]
async fn exited_fires_when_the_container_restarts() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let compute = running(&mut api, &b).await;
    let server = tokio::spawn(async move {
        api.pods.put(pod_json("0", "restarted"));
        serve_scale_down_after_exit(&mut api, "8402", "container restarted").await;
    });
    tokio::time::timeout(Duration::from_secs(10), compute.exited())
        .await
        .expect("exited did not fire");
    server.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn exited_fires_after_not_ready_grace_but_not_on_a_blip() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let compute = running(&mut api, &b).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        // Not ready for 10 s, then ready again: not an exit.
        api.pods.put(pod_json("0", "starting"));
        tokio::time::sleep(Duration::from_secs(10)).await;
        api.pods.put(pod_json("0", "ready"));
        // Ready for a second (the watch passes on the latest state of a pod, so a blip
        // shorter than its delivery may go unseen), then not ready for good.
        tokio::time::sleep(Duration::from_secs(1)).await;
        api.pods.put(pod_json("0", "starting"));
        let t0 = tokio::time::Instant::now();
        tx.send(t0).unwrap();
        // (Virtual time: the mock's wait for a request is 30 s too, so start it later.)
        tokio::time::sleep(Duration::from_secs(20)).await;
        serve_scale_down_after_exit(&mut api, "8504", "not ready for 30s").await;
        std::future::pending::<()>().await;
    });
    compute.exited().await;
    let not_ready_at = rx.recv().await.unwrap();
    let waited = not_ready_at.elapsed();
    assert_eq!(
        waited.as_secs(),
        cfg().not_ready_grace.as_secs(),
        "{waited:?}"
    );
    server.abort();
}

#[test]
fn statefulset_names_fit_kubernetes_limits_and_stay_distinct() {
    let id = |s: &str| EndpointId::parse(s).unwrap();
    assert_eq!(workload_name("pgwake-", &id("demo")), "pgwake-demo");
    let long_a = "a".repeat(63);
    let long_b = format!("{}b", "a".repeat(62));
    let (a, b) = (
        workload_name("pgwake-", &id(&long_a)),
        workload_name("pgwake-", &id(&long_b)),
    );
    assert!(a.len() <= 52 && b.len() <= 52, "{a} {b}");
    assert_ne!(a, b);
    assert_eq!(a, workload_name("pgwake-", &id(&long_a)), "stable");
    assert_eq!(pod_name("pgwake-demo"), "pgwake-demo-0");
}

/// An endpoint's pod overrides land in the pod template; an endpoint without them gets none
/// (and keeps its template hash: no StatefulSet changes on upgrade).
#[test]
fn pod_overrides_land_in_the_pod_template() {
    let plain = desired_statefulset(&cfg(), NS, &route()).unwrap();
    let spec = plain.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert!(spec.tolerations.is_none() && spec.affinity.is_none());
    assert!(spec.priority_class_name.is_none());
    let mut r = route();
    if let BackendSpec::Kubernetes { pod, .. } = &mut r.backend {
        pod.tolerations = vec![json!({ "key": "dedicated", "operator": "Exists" })];
        pod.affinity = Some(json!({ "podAntiAffinity": {} }));
        pod.priority_class_name = Some("databases".into());
        pod.annotations = [("a".to_string(), "b".to_string())].into();
    }
    let sts = desired_statefulset(&cfg(), NS, &r).unwrap();
    let template = &sts.spec.as_ref().unwrap().template;
    let spec = template.spec.as_ref().unwrap();
    assert_eq!(
        spec.tolerations.as_ref().unwrap()[0].key.as_deref(),
        Some("dedicated")
    );
    assert!(spec.affinity.as_ref().unwrap().pod_anti_affinity.is_some());
    assert_eq!(spec.priority_class_name.as_deref(), Some("databases"));
    assert_eq!(
        template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["a"],
        "b"
    );
    assert_ne!(
        workload::template_hash(&sts),
        workload::template_hash(&plain)
    );
}

/// What the `restricted` Pod Security Standard checks of a pod (the kubelet and admission
/// enforce it in namespaces labelled `pod-security.kubernetes.io/enforce: restricted`): a
/// compute pod passes, so pgwake runs in such namespaces.
#[test]
fn compute_pods_pass_the_restricted_pod_security_level() {
    let sts = desired_statefulset(&cfg(), NS, &route()).unwrap();
    let pod = sts.spec.unwrap().template.spec.unwrap();
    let psc = pod.security_context.expect("a pod securityContext");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert!(psc.run_as_user.is_some_and(|u| u > 0));
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    assert!(pod.host_network.is_none() && pod.host_pid.is_none() && pod.host_ipc.is_none());
    for c in &pod.containers {
        let sc = c
            .security_context
            .as_ref()
            .expect("a container securityContext");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(sc.privileged, None, "{}", c.name);
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..]),
            "{}",
            c.name
        );
        assert!(sc.capabilities.as_ref().unwrap().add.is_none());
        // A container-level seccomp profile or user would override the pod's.
        assert!(sc.seccomp_profile.is_none() && sc.run_as_user != Some(0));
    }
    for v in pod.volumes.iter().flatten() {
        assert!(v.host_path.is_none());
    }
}

#[test]
fn desired_statefulset_carries_the_endpoint_template() {
    let sts = desired_statefulset(&cfg(), NS, &route()).unwrap();
    let v = serde_json::to_value(&sts).unwrap();
    let c = &v["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "postgres:16");
    assert_eq!(
        c["env"],
        json!([{ "name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata" }])
    );
    assert_eq!(
        c["envFrom"],
        json!([{ "secretRef": { "name": "demo-postgres" } }])
    );
    assert_eq!(c["resources"]["requests"]["cpu"], "250m");
    assert_eq!(
        c["readinessProbe"]["exec"]["command"],
        json!(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"])
    );
    assert_eq!(
        c["volumeMounts"][0]["mountPath"],
        "/var/lib/postgresql/data"
    );
    assert_eq!(
        v["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"],
        "Retain"
    );
    assert_eq!(
        v["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
    assert_eq!(v["metadata"]["namespace"], NS);
    // The hash follows the template, and only the template.
    let mut other = route();
    if let BackendSpec::Kubernetes { image, .. } = &mut other.backend {
        *image = "postgres:17".into();
    }
    let sts2 = desired_statefulset(&cfg(), NS, &other).unwrap();
    assert_ne!(
        workload::template_hash(&sts),
        workload::template_hash(&sts2)
    );
    assert_eq!(
        workload::template_hash(&sts),
        workload::template_hash(&desired_statefulset(&cfg(), NS, &route()).unwrap())
    );
}

#[test]
fn a_bad_quantity_is_a_configuration_error() {
    let mut r = route();
    if let BackendSpec::Kubernetes { storage, .. } = &mut r.backend {
        *storage = Some("lots".into());
    }
    // Quantities are strings to the API types, so this passes here and the API server rejects
    // it (422) at create time, which the backend reports as misconfiguration.
    assert!(desired_statefulset(&cfg(), NS, &r).is_ok());
    let local = Route {
        backend: BackendSpec::Local {
            settings: BTreeMap::new(),
        },
        ..route()
    };
    assert_eq!(
        desired_statefulset(&cfg(), NS, &local).unwrap_err().kind(),
        BackendErrorKind::Misconfigured
    );
}

#[test]
fn config_parses_with_defaults_and_rejects_unknown_keys() {
    let c: KubernetesConfig = toml::from_str("namespace = \"db\"\nport = 55433\n").unwrap();
    assert_eq!(c.namespace.as_deref(), Some("db"));
    assert_eq!(c.port, 55433);
    assert_eq!(c.name_prefix, "pgwake-");
    assert!(c.validate().is_empty());
    assert!(toml::from_str::<KubernetesConfig>("nmespace = \"db\"").is_err());
    let bad = KubernetesConfig {
        port: 0,
        name_prefix: "Bad_".into(),
        ..KubernetesConfig::default()
    };
    assert_eq!(bad.validate().len(), 2, "{:?}", bad.validate());
}

#[tokio::test(start_paused = true)]
async fn through_the_manager_a_hanging_start_ends_in_wake_timeout_and_is_undone() {
    use crate::{Backends, Manager, ManagerConfig, ManagerMetrics, WakeError};
    let (client, mut api) = ApiServer::new();
    let manager = Manager::new(
        ManagerConfig {
            wake_timeout: Duration::from_secs(5),
            ..ManagerConfig::default()
        },
        Backends {
            local: None,
            kubernetes: Some(Arc::new(backend(client))),
        },
        ManagerMetrics::new(&prometheus::Registry::new()).unwrap(),
    );
    let hash = desired_hash();
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(0, "9000", &hash)).await;
        api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await
            .ok(sts_json(1, "9001", &hash));
        api.status("Starting", None).await;
        // Unschedulable (no StorageClass binds its claim): the pod stays pending and the
        // watch sees nothing new.
        api.pods.put(pod_json("0", "unschedulable"));
        // At wake_timeout the manager drops the start; the backend scales back to 0.
        api.get_sts(sts_json(1, "9003", &hash)).await;
        let patch = api
            .expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await;
        assert_eq!(patch.body["spec"]["replicas"], 0);
        patch.ok(sts_json(0, "9004", &hash));
        api.status("Suspended", None).await;
    });
    let err = match manager.wake(&Arc::new(route())).await {
        Err(e) => e,
        Ok(_) => panic!("woke a compute that never got ready"),
    };
    // The client is told why, in Kubernetes' reason word and a class of its message, with
    // no pod, node or claim names.
    assert!(matches!(err, WakeError::Stalled { .. }), "{err:?}");
    assert!(err.retryable());
    assert_eq!(
        err.user_message(),
        "the compute did not become ready within 5s: Unschedulable (volume not bound)"
    );
    server.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_write_that_keeps_failing_runs_out_of_tries_though_reads_work() {
    let (client, mut api) = ApiServer::new();
    let b = KubernetesBackend::new(
        client,
        KubernetesConfig {
            api_retries: 2,
            ..cfg()
        },
    )
    .unwrap();
    let hash = desired_hash();
    let server = tokio::spawn(async move {
        for rv in ["100", "101", "102"] {
            api.get_sts(sts_json(0, rv, &hash)).await;
            api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
                .await
                .fail(503, "ServiceUnavailable");
        }
        api.expect_quiet().await;
    });
    let err = match b.start(&route()).await {
        Err(e) => e,
        Ok(_) => panic!("wake succeeded against a failing API"),
    };
    assert!(
        err.to_string()
            .contains("scale statefulset (gave up after 3 tries)"),
        "{err}"
    );
    server.await.unwrap();
}

fn sts_list(items: Vec<Value>) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSetList",
        "metadata": { "resourceVersion": "9900" },
        "items": items,
    })
}

/// A StatefulSet `name` for `endpoint`, labelled as managed by `managed_by`.
fn sts_of(name: &str, endpoint: &str, managed_by: &str, replicas: i32) -> Value {
    let mut sts = sts_json(replicas, "500", "0000000000000000");
    sts["metadata"]["name"] = json!(name);
    sts["metadata"]["labels"]["pgwake.io/endpoint"] = json!(endpoint);
    sts["metadata"]["labels"]["app.kubernetes.io/managed-by"] = json!(managed_by);
    sts
}

#[tokio::test(start_paused = true)]
async fn running_endpoints_lists_pgwakes_statefulsets_and_keeps_those_that_want_a_pod() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let server = tokio::spawn(async move {
        // A failing API server is retried with the backoff of every other call.
        let list = api.expect(Method::GET, STS_MANAGED).await;
        assert_eq!(list.body, Value::Null);
        list.fail(503, "ServiceUnavailable");
        let mut going = sts_of("pgwake-going", "going", "pgwake", 1);
        going["metadata"]["deletionTimestamp"] = json!("2026-11-25T12:10:00Z");
        api.expect(Method::GET, STS_MANAGED).await.ok(sts_list(vec![
            sts_json(1, "501", &desired_hash()),
            sts_of("pgwake-idle", "idle", "pgwake", 0),
            sts_of("pgwake-analytics", "analytics", "pgwake", 1),
            // Another pgwake installation in the namespace, with another name prefix.
            sts_of("staging-demo2", "demo2", "pgwake", 1),
            // Not pgwake's (the label selector leaves those out; checked all the same).
            sts_of("pgwake-foreign", "foreign", "helm", 1),
            going,
        ]));
        api.expect_quiet().await;
    });
    let ids = b.running_endpoints().await.unwrap();
    let names: Vec<&str> = ids.iter().map(EndpointId::as_str).collect();
    assert_eq!(names, ["analytics", "demo"]);
    server.await.unwrap();
}

#[tokio::test]
async fn running_endpoints_fails_at_once_without_permission() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let server = tokio::spawn(async move {
        api.expect(Method::GET, STS_MANAGED)
            .await
            .fail(403, "Forbidden");
        api.expect_quiet().await;
    });
    let err = b.running_endpoints().await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured);
    server.await.unwrap();
}

/// A manager that starts while a compute runs (its predecessor left it up) adopts it through
/// the wake path: the StatefulSet is at 1 already, so no patch and no "Starting", only the
/// wait for the ready pod.
#[tokio::test(start_paused = true)]
async fn through_the_manager_a_running_statefulset_is_adopted_without_a_change() {
    use crate::{Backends, Manager, ManagerConfig, ManagerMetrics, Phase};
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let manager = Manager::new(
        ManagerConfig::default(),
        Backends {
            local: None,
            kubernetes: Some(Arc::new(b.clone())),
        },
        ManagerMetrics::new(&prometheus::Registry::new()).unwrap(),
    );
    let table = pgwake_router::RoutingTable::new();
    table.upsert(route());
    let hash = desired_hash();
    api.pods.put(pod_json("0", "ready"));
    let server = tokio::spawn(async move {
        api.expect(Method::GET, STS_MANAGED)
            .await
            .ok(sts_list(vec![sts_json(1, "9500", &hash)]));
        api.get_sts(sts_json(1, "9500", &hash)).await;
        api.status("Running", Some("10.244.0.17:5432")).await;
        api
    });
    assert_eq!(manager.adopt_running(&table).await, 1);
    let demo = route().endpoint;
    tokio::time::timeout(
        Duration::from_secs(30),
        manager.wait_for_phase(&demo, Phase::Running),
    )
    .await
    .expect("adopted compute not running");
    let st = manager.stats(&demo).unwrap();
    assert_eq!(
        (st.starts, st.adoptions, st.attached, st.waiting),
        (0, 1, 0, 0)
    );
    assert_eq!(st.addr.unwrap().as_str(), "10.244.0.17:5432");
    let mut api = server.await.unwrap();
    // What follows is the crash watch on the pod, as for any running compute: on the watch
    // that the wake listed, with no list of its own.
    until(|| b.shared.pod_watch.subscribers() == 1).await;
    api.expect_quiet().await;
    assert_eq!(api.pods.lists(), 1);
}

/// `route()` for endpoint `id`.
fn route_of(id: &str) -> Route {
    Route {
        endpoint: EndpointId::parse(id).unwrap(),
        ..route()
    }
}

/// `pod_json` for the pod of endpoint `id` (its own name, labels and uid).
fn pod_of(id: &str, stage: &str) -> Value {
    let mut pod = pod_json("0", stage);
    let meta = &mut pod["metadata"];
    meta["name"] = json!(format!("pgwake-{id}-0"));
    meta["generateName"] = json!(format!("pgwake-{id}-"));
    meta["uid"] = json!(format!("{}-{id}", &POD_UID[..23]));
    meta["labels"]["pgwake.io/endpoint"] = json!(id);
    meta["labels"]["statefulset.kubernetes.io/pod-name"] = json!(format!("pgwake-{id}-0"));
    meta["ownerReferences"][0]["name"] = json!(format!("pgwake-{id}"));
    pod
}

/// Answers, in any order, what waking running computes and scaling exited ones to 0 ask of
/// the API server: each StatefulSet is read at 1 (then at 0 once patched), and no endpoint
/// has a `PgwakeEndpoint` to write a status to (config-file endpoints).
async fn serve_running(mut api: ApiServer) {
    let sts = "/apis/apps/v1/namespaces/pgwake/statefulsets/";
    let mut scaled_down = BTreeSet::new();
    while let Some((req, respond)) = api.requests.recv().await {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        allowed(&permission(&method, &path), &method, &path);
        if let Some(name) = path.strip_prefix(sts) {
            let id = name.strip_prefix("pgwake-").unwrap();
            if method == Method::PATCH {
                scaled_down.insert(name.to_string());
            }
            let replicas = if scaled_down.contains(name) { 0 } else { 1 };
            let mut sts = sts_of(name, id, "pgwake", replicas);
            sts["metadata"]["annotations"]["pgwake.io/template-hash"] = json!(desired_hash());
            respond.send_response(json_response(200, &sts));
        } else if method == Method::PATCH && path.ends_with("/status") {
            respond.send_response(json_response(404, &status_failure(404, "NotFound")));
        } else {
            panic!("unexpected request {method} {}", req.uri());
        }
    }
}

/// Issue 13: the computes of one backend share one pod watch. With the watch per pod that
/// this replaced, 50 running computes held 50 watch connections (and had made 100 lists).
#[tokio::test(start_paused = true)]
async fn fifty_running_computes_share_one_pod_watch() {
    const N: usize = 50;
    let (client, api) = ApiServer::new();
    let b = backend(client);
    let ids: Vec<String> = (0..N).map(|i| format!("db{i}")).collect();
    for id in &ids {
        api.pods.put(pod_of(id, "ready"));
    }
    let pods = Arc::clone(&api.pods);
    let server = tokio::spawn(serve_running(api));
    let computes = futures::future::join_all(ids.iter().map(|id| {
        let b = &b;
        async move { b.start(&route_of(id)).await.unwrap() }
    }))
    .await;
    // Each one's exit watch, as the manager keeps for every running compute.
    let mut exits: futures::stream::FuturesUnordered<_> = computes
        .iter()
        .enumerate()
        .map(|(i, c)| async move {
            c.exited().await;
            i
        })
        .collect();
    let settled = tokio::time::timeout(Duration::from_secs(1), exits.next()).await;
    assert!(settled.is_err(), "a compute exited: {settled:?}");
    println!(
        "{N} running computes: {} pod lists, {} pod watch requests",
        pods.lists(),
        pods.watches()
    );
    assert_eq!((pods.lists(), pods.watches()), (1, 1));

    // An eviction is seen through the shared watch, by that compute's exit watch only.
    pods.delete("pgwake-db7-0");
    let exited = tokio::time::timeout(Duration::from_secs(10), exits.next())
        .await
        .expect("the evicted compute's exit was not seen");
    assert_eq!(exited, Some(7));
    let more = tokio::time::timeout(Duration::from_secs(1), exits.next()).await;
    assert!(more.is_err(), "another compute exited: {more:?}");
    assert_eq!((pods.lists(), pods.watches()), (1, 2));
    drop(exits);
    drop(computes);
    server.abort();
}

/// A waiter wakes on changes of its own pod only: with many computes, an event costs one
/// look-up, not a scan of every waiter.
#[tokio::test(start_paused = true)]
async fn a_pods_changes_wake_only_the_waiters_of_that_pod() {
    let (client, api) = ApiServer::new();
    let b = backend(client);
    let watch = &b.shared.pod_watch;
    let mut a = watch.subscribe("pgwake-a-0");
    let mut other = watch.subscribe("pgwake-b-0");
    assert!(matches!(a.seen(), pod_watch::Seen::Unknown));
    // The first list: neither pod is there.
    a.changed().await;
    assert!(matches!(a.seen(), pod_watch::Seen::Absent));
    assert!(matches!(other.seen(), pod_watch::Seen::Absent));
    for stage in ["pending", "creating", "starting", "ready"] {
        api.pods.put(pod_of("a", stage));
    }
    loop {
        if let pod_watch::Seen::Present(p) = a.seen() {
            if matches!(pod_state(&p, 5432), PodState::Ready(_)) {
                break;
            }
        }
        a.changed().await;
    }
    // Every event of pod a is applied by now; the waiter of pod b was not woken by them.
    assert!(other.changed().now_or_never().is_none());
    api.pods.put(pod_of("b", "pending"));
    other.changed().await;
    assert!(matches!(other.seen(), pod_watch::Seen::Present(_)));
    assert!(a.changed().now_or_never().is_none());
}

/// The watch falls behind (410 Gone: the API server compacted its history) and its next
/// list fails: it lists again after its backoff, and a start waiting on it still completes.
#[tokio::test(start_paused = true)]
async fn an_expired_or_failing_watch_lists_again_and_its_waiters_complete() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let pods = Arc::clone(&api.pods);
    let server = tokio::spawn(async move {
        api.pods.put(pod_json("0", "pending"));
        api.get_sts(sts_json(1, "9600", &desired_hash())).await;
        until(|| api.pods.watches() == 1).await;
        api.pods.fail_lists(500, "InternalError", 1);
        api.pods.expire();
        api.pods.put(pod_json("0", "ready"));
        api.status("Running", Some("10.244.0.17:5432")).await;
        api.expect_quiet().await;
    });
    let compute = b.start(&route()).await.unwrap();
    assert_eq!(compute.addr().as_str(), "10.244.0.17:5432");
    server.await.unwrap();
    // The first list, the one that failed, and the one after it.
    assert_eq!(pods.lists(), 3);
}

/// A watch the API server refuses (RBAC) fails a start at once as misconfiguration, as any
/// other refused call does; the start is undone.
#[tokio::test(start_paused = true)]
async fn a_refused_pod_watch_fails_the_start_as_misconfiguration() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let hash = desired_hash();
    api.pods.fail_lists(403, "Forbidden", 100);
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(1, "9700", &hash)).await;
        api.get_sts(sts_json(1, "9701", &hash)).await;
        api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await
            .ok(sts_json(0, "9702", &hash));
        api.status("Suspended", None).await;
        api.event("StartFailed").await;
    });
    let err = match b.start(&route()).await {
        Err(e) => e,
        Ok(_) => panic!("woke a compute whose pods cannot be watched"),
    };
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
    server.await.unwrap();
}

/// A pod watch that keeps failing (the API server unreachable) ends a start after
/// `api_retries` failures in a row, as any other call would; the start is undone.
#[tokio::test(start_paused = true)]
async fn a_pod_watch_that_keeps_failing_ends_the_start_after_api_retries() {
    let (client, mut api) = ApiServer::new();
    let b = KubernetesBackend::new(
        client,
        KubernetesConfig {
            api_retries: 2,
            ..cfg()
        },
    )
    .unwrap();
    let hash = desired_hash();
    api.pods.fail_lists(503, "ServiceUnavailable", 100);
    let pods = Arc::clone(&api.pods);
    let server = tokio::spawn(async move {
        api.get_sts(sts_json(1, "9750", &hash)).await;
        api.get_sts(sts_json(1, "9751", &hash)).await;
        api.expect(Method::PATCH, &format!("{STS_DEMO}{PATCH_QUERY}"))
            .await
            .ok(sts_json(0, "9752", &hash));
        api.status("Suspended", None).await;
        api.event("StartFailed").await;
    });
    let err = match tokio::time::timeout(Duration::from_secs(60), b.start(&route())).await {
        Ok(Err(e)) => e,
        Ok(Ok(_)) => panic!("woke a compute whose pods cannot be watched"),
        Err(_) => panic!("the start waits on a failing watch for ever"),
    };
    assert_eq!(err.kind(), BackendErrorKind::Io, "{err}");
    assert!(err.to_string().contains("gave up after 3 tries"), "{err}");
    server.await.unwrap();
    assert_eq!(pods.lists(), 3);
}

/// The watch runs while someone waits on a pod, and a while after: it stops once nobody has
/// for `LINGER`, and the next wait starts it again.
#[tokio::test(start_paused = true)]
async fn the_pod_watch_stops_when_nobody_waits_and_starts_again_on_need() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let compute = running(&mut api, &b).await;
    let watch = &b.shared.pod_watch;
    assert!(watch.running());
    // The wake is over and nobody watches for the compute's exit.
    assert_eq!(watch.subscribers(), 0);
    tokio::time::sleep(pod_watch::LINGER * 2).await;
    assert!(!watch.running(), "the pod watch outlived its use");
    assert_eq!(api.pods.lists(), 1);
    let exited = compute.exited();
    futures::pin_mut!(exited);
    assert!(futures::poll!(exited.as_mut()).is_pending());
    assert!(watch.running());
    api.pods.delete(POD);
    let server = tokio::spawn(async move {
        serve_scale_down_after_exit(&mut api, "9800", "pod deleted").await;
        api
    });
    exited.await;
    let api = server.await.unwrap();
    assert_eq!(api.pods.lists(), 2);
}

/// The pod watch ends with the backend: dropped with its computes, it leaves no task behind
/// that holds the client (the mock API sees the client go).
#[tokio::test(start_paused = true)]
async fn the_pod_watch_ends_with_the_backend() {
    let (client, mut api) = ApiServer::new();
    let b = backend(client);
    let compute = running(&mut api, &b).await;
    assert!(b.shared.pod_watch.running());
    let router = api.router.take().unwrap();
    drop(compute);
    drop(b);
    // Well within LINGER, after which an idle watch would end on its own anyway.
    tokio::time::timeout(Duration::from_secs(1), router)
        .await
        .expect("the client outlived the backend")
        .unwrap();
}
