use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::runtime::watcher::Event;
use serde_json::{json, Value};
use tower_test::mock;

use super::*;

fn endpoint(name: &str, spec: Value) -> PgwakeEndpoint {
    serde_json::from_value(json!({
        "apiVersion": "pgwake.io/v1",
        "kind": "PgwakeEndpoint",
        "metadata": { "name": name, "namespace": "pgwake", "uid": format!("uid-{name}"),
                      "resourceVersion": "1", "generation": 1 },
        "spec": spec,
    }))
    .unwrap()
}

fn simple(name: &str, image: &str) -> PgwakeEndpoint {
    endpoint(name, json!({ "compute": { "image": image } }))
}

fn id(s: &str) -> EndpointId {
    EndpointId::parse(s).unwrap()
}

#[test]
fn converts_a_full_resource_into_a_kubernetes_route() {
    let ep = endpoint(
        "neon-main",
        json!({
            "compute": {
                "image": "neondatabase/compute-node-v16:latest",
                "port": 55433,
                "command": ["/shell/compute.sh"],
                "env": { "PG_VERSION": "16" },
                "envSecret": "neon-compute",
                "resources": { "requests": { "cpu": "500m" }, "limits": { "memory": "1Gi" } },
                "storage": { "size": "2Gi", "storageClass": "fast" }
            },
            "idleTimeout": "5m",
            "allowlist": ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"],
            "maxConnections": 50,
            "neon": {
                "tenantId": "de200bd42b49cc1814412c7e592dd6e9",
                "timelineId": "0d8f5a0e5c2b1e4f8f6a3b2c1d0e9f8a",
                "pageserverConnstring": "postgresql://no_user@pageserver:6400"
            }
        }),
    );
    let c = ep.endpoint_config().unwrap();
    assert_eq!(c.id, id("neon-main"));
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(c.max_connections, Some(50));
    assert_eq!(
        c.allow,
        ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"].map(|n| n.parse::<IpNet>().unwrap())
    );
    let env: BTreeMap<String, String> = [
        ("PG_VERSION", "16"),
        ("TENANT_ID", "de200bd42b49cc1814412c7e592dd6e9"),
        ("TIMELINE_ID", "0d8f5a0e5c2b1e4f8f6a3b2c1d0e9f8a"),
        (
            "PAGESERVER_CONNSTRING",
            "postgresql://no_user@pageserver:6400",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(
        c.backend,
        BackendSpec::Kubernetes {
            image: "neondatabase/compute-node-v16:latest".into(),
            port: Some(55433),
            command: vec!["/shell/compute.sh".into()],
            args: vec![],
            env,
            env_secret: Some("neon-compute".into()),
            requests: BTreeMap::from([("cpu".into(), "500m".into())]),
            limits: BTreeMap::from([("memory".into(), "1Gi".into())]),
            storage: Some("2Gi".into()),
            storage_class: Some("fast".into()),
            pod: PodOverrides::default(),
        }
    );
    let route = Route::from(c);
    assert!(route.allows("10.1.2.3".parse().unwrap()));
    assert!(!route.allows("192.0.2.8".parse().unwrap()));
}

#[test]
fn reports_every_problem_of_a_resource_at_once() {
    let ep = endpoint(
        "Bad_Name",
        json!({
            "compute": { "image": " ", "env": { "TENANT_ID": "x" } },
            "idleTimeout": "soon",
            "allowlist": ["10.0.0.0/33", "localhost"],
            "neon": { "tenantId": "t", "timelineId": "l" }
        }),
    );
    let errors = ep.endpoint_config().unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 6, "{text:#?}");
    assert!(matches!(errors[0], CrdError::BadName { .. }));
    assert_eq!(errors[1], CrdError::NoImage);
    assert!(matches!(errors[2], CrdError::BadIdleTimeout { .. }));
    assert_eq!(errors[3], CrdError::BadNetwork("10.0.0.0/33".into()));
    assert_eq!(errors[4], CrdError::BadNetwork("localhost".into()));
    assert_eq!(errors[5], CrdError::EnvConflict("TENANT_ID"));
}

#[test]
fn sync_applies_adds_changes_and_deletes() {
    let table = RoutingTable::new();
    let mut sync = CrdSync::new();
    sync.apply(&table, Event::Apply(simple("a", "postgres:16")));
    let before = table.lookup(&id("a")).unwrap();
    // The same object again (a resync or a status change) keeps the route's Arc.
    sync.apply(&table, Event::Apply(simple("a", "postgres:16")));
    assert!(Arc::ptr_eq(&before, &table.lookup(&id("a")).unwrap()));
    sync.apply(&table, Event::Apply(simple("a", "postgres:17")));
    assert!(matches!(
        &table.lookup(&id("a")).unwrap().backend,
        BackendSpec::Kubernetes { image, .. } if image == "postgres:17"
    ));
    // An invalid update keeps the last good route, as a bad config file does on reload.
    sync.apply(&table, Event::Apply(simple("a", "")));
    assert!(matches!(
        &table.lookup(&id("a")).unwrap().backend,
        BackendSpec::Kubernetes { image, .. } if image == "postgres:17"
    ));
    sync.apply(&table, Event::Delete(simple("a", "postgres:17")));
    assert!(table.lookup(&id("a")).is_none());
    assert_eq!(sync.owned().count(), 0);
}

#[test]
fn sync_relist_drops_what_was_deleted_while_disconnected() {
    let table = RoutingTable::new();
    let mut sync = CrdSync::new();
    for ev in [
        Event::Init,
        Event::InitApply(simple("a", "postgres:16")),
        Event::InitApply(simple("b", "postgres:16")),
        Event::InitDone,
    ] {
        sync.apply(&table, ev);
    }
    assert_eq!(table.len(), 2);
    // The watch broke; on the re-list only "b" and a new "c" exist.
    sync.apply(&table, Event::Init);
    sync.apply(&table, Event::InitApply(simple("b", "postgres:16")));
    // Until the list is complete nothing is removed.
    assert!(table.lookup(&id("a")).is_some());
    sync.apply(&table, Event::InitApply(simple("c", "postgres:16")));
    sync.apply(&table, Event::InitDone);
    assert!(table.lookup(&id("a")).is_none());
    assert!(table.lookup(&id("b")).is_some());
    assert!(table.lookup(&id("c")).is_some());
}

#[test]
fn sync_never_touches_endpoints_of_the_config_file() {
    let table = RoutingTable::new();
    table
        .replace_all(vec![crate::EndpointConfig {
            id: id("cfg"),
            backend: BackendSpec::Static {
                address: "db:5432".into(),
            },
            idle_timeout: None,
            deep_sleep_after: None,
            allow: vec![],
            max_connections: None,
            auth: None,
            roles_file: None,
        }])
        .unwrap();
    let mut sync = CrdSync::new();
    sync.apply(&table, Event::Apply(simple("cfg", "postgres:16")));
    sync.apply(&table, Event::Delete(simple("cfg", "postgres:16")));
    sync.apply(&table, Event::Init);
    sync.apply(&table, Event::InitDone);
    assert!(matches!(
        table.lookup(&id("cfg")).unwrap().backend,
        BackendSpec::Static { .. }
    ));
}

#[test]
fn auth_defaults_to_scram_with_a_roles_secret() {
    let secret = || {
        Some(RolesSecretRef {
            name: "r".into(),
            key: None,
        })
    };
    let spec = |extra: Value| {
        let mut s = json!({ "compute": { "image": "postgres:16" } });
        s.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        endpoint("e", s).auth_spec()
    };
    assert_eq!(
        spec(json!({})),
        EndpointAuthSpec {
            mode: AuthMode::Passthrough,
            roles_secret: None
        }
    );
    assert_eq!(
        spec(json!({ "rolesSecret": { "name": "r" } })),
        EndpointAuthSpec {
            mode: AuthMode::Scram,
            roles_secret: secret()
        }
    );
    assert_eq!(
        spec(json!({ "auth": "passthrough", "rolesSecret": { "name": "r" } })).mode,
        AuthMode::Passthrough
    );
    let s = spec(json!({ "rolesSecret": { "name": "r", "key": "verifiers" } }));
    assert_eq!(s.roles_secret.unwrap().key(), "verifiers");
    assert_eq!(secret().unwrap().key(), "roles");
    let ep = endpoint(
        "e",
        json!({ "compute": { "image": "x" }, "rolesSecret": { "name": "r" } }),
    );
    assert_eq!(ep.endpoint_config().unwrap().auth, Some(AuthMode::Scram));
    // Round trip, as the API server stores it.
    assert_eq!(
        serde_json::from_value::<PgwakeEndpoint>(serde_json::to_value(&ep).unwrap()).unwrap(),
        ep
    );
    let crd = serde_json::to_value(crd()).unwrap();
    assert!(rules_at(&crd, &["spec"])[0].contains("has(self.rolesSecret)"));
}

/// Records what the sync tells it, and whether the route was in the table by then.
#[derive(Default)]
struct Recorder {
    table: std::sync::Mutex<Option<Arc<RoutingTable>>>,
    seen: std::sync::Mutex<Vec<(EndpointId, Option<AuthMode>, bool)>>,
}

impl AuthSink for Recorder {
    fn endpoint_auth(&self, id: &EndpointId, auth: Option<&EndpointAuthSpec>) {
        let routed = self
            .table
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|t| t.lookup(id).is_some());
        self.seen
            .lock()
            .unwrap()
            .push((id.clone(), auth.map(|a| a.mode), routed));
    }
}

#[test]
fn sync_reports_auth_before_routing_and_after_removal() {
    let table = Arc::new(RoutingTable::new());
    table
        .replace_all(vec![crate::EndpointConfig {
            id: id("cfg"),
            backend: BackendSpec::Static {
                address: "db:5432".into(),
            },
            idle_timeout: None,
            deep_sleep_after: None,
            allow: vec![],
            max_connections: None,
            auth: None,
            roles_file: None,
        }])
        .unwrap();
    let rec = Arc::new(Recorder::default());
    *rec.table.lock().unwrap() = Some(Arc::clone(&table));
    let mut sync = CrdSync::with_auth(Arc::clone(&rec) as Arc<dyn AuthSink>);
    let secured = || {
        endpoint(
            "a",
            json!({ "compute": { "image": "postgres:16" }, "rolesSecret": { "name": "r" } }),
        )
    };
    sync.apply(&table, Event::Apply(secured()));
    sync.apply(&table, Event::Apply(simple("cfg", "postgres:16")));
    sync.apply(&table, Event::Delete(secured()));
    sync.apply(&table, Event::Init);
    sync.apply(&table, Event::InitApply(simple("b", "postgres:16")));
    sync.apply(&table, Event::InitDone);
    sync.apply(&table, Event::Init);
    sync.apply(&table, Event::InitDone);
    let seen = rec.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            // Told before the route exists.
            (id("a"), Some(AuthMode::Scram), false),
            // The config file's endpoint is not this source's.
            (id("cfg"), None, true),
            (id("a"), None, false),
            (id("b"), Some(AuthMode::Passthrough), false),
            // Gone in the re-list: told once the route is removed.
            (id("b"), None, false),
        ]
    );
}

#[test]
fn committed_crd_matches_the_rust_type() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/crd.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == crd_yaml(),
        "deploy/base/crd.yaml is stale: run `cargo run -p pgwake-router --bin crdgen > deploy/base/crd.yaml`"
    );
}

#[test]
fn crd_has_the_status_subresource_and_round_trips() {
    let crd = crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("pgwakeendpoints.pgwake.io")
    );
    let v = &crd.spec.versions[0];
    assert!(v.subresources.as_ref().unwrap().status.is_some());
    let mut ep = simple("demo", "postgres:16");
    ep.status = Some(PgwakeEndpointStatus {
        state: EndpointState::Running,
        address: Some("10.0.0.5:5432".into()),
        last_activity: Some("2026-11-25T12:00:00Z".into()),
        conditions: vec![],
        observed_generation: Some(3),
    });
    let json = serde_json::to_value(&ep).unwrap();
    assert_eq!(json["status"]["state"], "Running");
    assert_eq!(json["status"]["lastActivity"], "2026-11-25T12:00:00Z");
    assert_eq!(json["status"]["observedGeneration"], 3);
    assert_eq!(serde_json::from_value::<PgwakeEndpoint>(json).unwrap(), ep);
}

/// The source against kube's mock API: a list with two endpoints, then a watch in which one
/// is deleted and one added.
#[tokio::test]
async fn source_keeps_the_table_in_sync_through_the_reflector() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let table = Arc::new(RoutingTable::new());
    let (store, run) = crd_source(client, "pgwake", Some("tier=dev"), Arc::clone(&table));
    let task = tokio::spawn(run);

    let reply = |send: mock::SendResponse<Response<Body>>, body: String| {
        send.send_response(
            Response::builder()
                .body(Body::from(body.into_bytes()))
                .unwrap(),
        )
    };
    let obj = |ep: PgwakeEndpoint| serde_json::to_value(ep).unwrap();

    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.method(), http::Method::GET);
    assert_eq!(
        req.uri().to_string(),
        "/apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints?&labelSelector=tier%3Ddev&limit=500"
    );
    let list = json!({
        "apiVersion": "pgwake.io/v1", "kind": "PgwakeEndpointList",
        "metadata": { "resourceVersion": "10" },
        "items": [obj(simple("a", "postgres:16")), obj(simple("b", "postgres:16"))],
    });
    reply(send, list.to_string());
    store.wait_until_ready().await.unwrap();
    assert_eq!(table.len(), 2);

    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(
        req.uri().to_string(),
        "/apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints?&watch=true&timeoutSeconds=290&labelSelector=tier%3Ddev&allowWatchBookmarks=true&resourceVersion=10"
    );
    let body = req.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty());
    let events = [
        json!({ "type": "DELETED", "object": obj(simple("a", "postgres:16")) }),
        json!({ "type": "ADDED", "object": obj(simple("c", "postgres:17")) }),
    ];
    reply(
        send,
        events.iter().map(|e| format!("{e}\n")).collect::<String>(),
    );
    // The next watch request means both events were applied.
    let (req, _hold) = handle.next_request().await.unwrap();
    assert!(req.uri().to_string().contains("watch=true"));
    assert!(table.lookup(&id("a")).is_none());
    assert!(table.lookup(&id("b")).is_some());
    assert!(table.lookup(&id("c")).is_some());
    assert_eq!(store.state().len(), 2);
    task.abort();
}

/// The rules (`x-kubernetes-validations`) on the schema at `path` (property names from the
/// root; `[]` steps into array items).
fn rules_at(crd: &Value, path: &[&str]) -> Vec<String> {
    let mut s = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    for p in path {
        s = if *p == "[]" {
            &s["items"]
        } else {
            &s["properties"][*p]
        };
        assert!(!s.is_null(), "no {p} in {path:?}");
    }
    s["x-kubernetes-validations"]
        .as_array()
        .unwrap_or_else(|| panic!("no rules at {path:?}"))
        .iter()
        .map(|r| {
            assert!(r["message"].is_string());
            r["rule"].as_str().unwrap().to_string()
        })
        .collect()
}

/// The API server rejects at `kubectl apply` what pgwake could not route (a bad name,
/// duration, network or quantity) and storage changes that cannot work on an existing
/// StatefulSet (its claim templates are immutable).
#[test]
fn crd_validates_ids_durations_networks_quantities_and_keeps_storage() {
    let crd = serde_json::to_value(crd()).unwrap();
    let root = rules_at(&crd, &[]);
    assert!(root[0].contains("self.metadata.name.matches("), "{root:?}");
    assert!(root[0].contains("size() <= 63"), "{root:?}");
    assert!(rules_at(&crd, &["spec", "idleTimeout"])[0].starts_with("self.matches("));
    assert_eq!(
        rules_at(&crd, &["spec", "allowlist", "[]"]),
        ["isCIDR(self) || isIP(self)"]
    );
    assert_eq!(
        rules_at(&crd, &["spec", "compute", "storage", "size"]),
        ["isQuantity(self)"]
    );
    for key in ["requests", "limits"] {
        assert_eq!(
            rules_at(&crd, &["spec", "compute", "resources", key]),
            ["self.all(k, isQuantity(self[k]))"]
        );
    }
    assert_eq!(
        rules_at(&crd, &["spec", "compute", "storage"]),
        ["self == oldSelf"]
    );
    assert_eq!(
        rules_at(&crd, &["spec", "compute"]),
        ["has(self.storage) == has(oldSelf.storage)"]
    );
    assert_eq!(crd["spec"]["names"]["categories"], json!(["pgwake"]));
}

/// The duration rule accepts what pgwake parses and the id rule what `EndpointId` accepts,
/// checked with the same regular expressions outside CEL (RE2 and the regex crate agree on
/// these).
#[test]
fn crd_rules_agree_with_pgwakes_own_parsers() {
    let crd = serde_json::to_value(crd()).unwrap();
    let pattern = |rule: &str| -> regex::Regex {
        let start = rule.find("matches('").unwrap() + "matches('".len();
        let end = start + rule[start..].find("')").unwrap();
        regex::Regex::new(&rule[start..end]).unwrap()
    };
    let duration = pattern(&rules_at(&crd, &["spec", "idleTimeout"])[0]);
    for ok in ["90s", "5m", "1h 30m", "1h30m", "2 days", "500ms"] {
        assert!(duration.is_match(ok), "{ok}");
        humantime_serde::re::humantime::parse_duration(ok).unwrap();
    }
    for bad in ["", "5", "five minutes", "-5m", "5m;"] {
        assert!(!duration.is_match(bad), "{bad}");
    }
    let name = pattern(&rules_at(&crd, &[])[0]);
    for s in [
        "demo",
        "a",
        "ep-1",
        "x".repeat(63).as_str(),
        "-a",
        "a-",
        "A",
        "a_b",
        "",
    ] {
        assert_eq!(
            name.is_match(s) && s.len() <= 63,
            EndpointId::parse(s).is_ok(),
            "{s:?}"
        );
    }
    // Secret names are DNS subdomains; data keys are [-._a-zA-Z0-9]+.
    let secret = pattern(&rules_at(&crd, &["spec", "rolesSecret", "name"])[0]);
    for (s, ok) in [
        ("demo-roles", true),
        ("a.b-c", true),
        ("a", true),
        ("Demo", false),
        ("-a", false),
        ("a_b", false),
        ("", false),
    ] {
        assert_eq!(secret.is_match(s), ok, "{s:?}");
    }
    let key = pattern(&rules_at(&crd, &["spec", "rolesSecret", "key"])[0]);
    for (s, ok) in [
        ("roles", true),
        ("auth_file.txt", true),
        ("a/b", false),
        ("a b", false),
        ("", false),
    ] {
        assert_eq!(key.is_match(s), ok, "{s:?}");
    }
}

/// Printer columns show the conditions; the status carries Ready, Suspended and Failed with
/// Kubernetes' reason.
#[test]
fn status_conditions_follow_the_state_and_name_the_failure() {
    let crd = crd();
    let columns: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        columns,
        [
            "State",
            "Ready",
            "Reason",
            "Address",
            "Last-Activity",
            "Age"
        ]
    );
    let now = "2026-11-30T00:00:00Z";
    let running = PgwakeEndpointStatus::new(
        EndpointState::Running,
        Some("10.0.0.5:5432".into()),
        None,
        now,
        None,
    );
    assert_eq!(running.condition("Ready").unwrap().status, "True");
    assert_eq!(running.condition("Suspended").unwrap().status, "False");
    assert_eq!(running.condition("Failed").unwrap().status, "False");
    let later = "2026-11-30T01:00:00Z";
    let failed = PgwakeEndpointStatus::new(
        EndpointState::Suspended,
        None,
        Some(("ImagePullBackOff".into(), "Back-off pulling image".into())),
        later,
        Some(&running),
    );
    let f = failed.condition("Failed").unwrap();
    assert_eq!(f.status, "True");
    assert_eq!(f.reason.as_deref(), Some("ImagePullBackOff"));
    assert_eq!(f.last_transition_time.as_deref(), Some(later));
    // Unchanged conditions keep their transition time.
    assert_eq!(failed.condition("Failed").unwrap().type_, "Failed");
    let again =
        PgwakeEndpointStatus::new(EndpointState::Suspended, None, None, "t3", Some(&failed));
    assert_eq!(
        again
            .condition("Suspended")
            .unwrap()
            .last_transition_time
            .as_deref(),
        Some(later)
    );
    let json = serde_json::to_value(&failed).unwrap();
    assert_eq!(json["conditions"][2]["type"], "Failed");
    assert_eq!(json["conditions"][2]["lastTransitionTime"], later);
}

/// Per-endpoint pod overrides pass through as Kubernetes JSON, under a structural schema that
/// keeps their fields (`x-kubernetes-preserve-unknown-fields`).
#[test]
fn pod_overrides_pass_through() {
    let toleration =
        json!({ "key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule" });
    let affinity = json!({ "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{ "matchExpressions": [
            { "key": "topology.kubernetes.io/zone", "operator": "In", "values": ["eu-west-1a"] }
        ]}]
    }}});
    let ep = endpoint(
        "demo",
        json!({ "compute": {
            "image": "postgres:16",
            "tolerations": [toleration],
            "affinity": affinity,
            "priorityClassName": "databases",
            "podAnnotations": { "backup.velero.io/backup-volumes": "data" }
        }}),
    );
    let c = ep.endpoint_config().unwrap();
    let BackendSpec::Kubernetes { pod, .. } = c.backend else {
        panic!("{:?}", c.backend)
    };
    assert_eq!(pod.tolerations, [toleration]);
    assert_eq!(pod.affinity, Some(affinity));
    assert_eq!(pod.priority_class_name.as_deref(), Some("databases"));
    assert_eq!(pod.annotations["backup.velero.io/backup-volumes"], "data");

    let crd = serde_json::to_value(crd()).unwrap();
    let compute = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["compute"]["properties"];
    for schema in [&compute["affinity"], &compute["tolerations"]["items"]] {
        assert_eq!(schema["type"], "object", "{schema}");
        assert_eq!(
            schema["x-kubernetes-preserve-unknown-fields"], true,
            "{schema}"
        );
    }
    assert_eq!(compute["priorityClassName"]["type"], "string");
}
