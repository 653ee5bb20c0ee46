//! The manifests in `deploy/`: every document parses (as YAML and as its Kubernetes type), the
//! example endpoints route, the ConfigMaps' `[kubernetes]` tables are valid, each Role grants
//! exactly the API calls its pods' code makes, and the objects refer to each other
//! consistently. Two shapes are checked: the default scale-out one
//! (`deploy/overlays/scale-out`: proxy Deployment + compute manager Deployment) and the
//! single-pod alternative (`deploy/overlays/single`), both on `deploy/base` (namespace, CRD,
//! the computes' NetworkPolicy), read from their kustomizations; and every overlay as
//! `kubectl kustomize` renders it, where kubectl is installed. The root crate's
//! `tests/deploy_config.rs` loads every shipped config with pgwake's own config loader.
//!
//! [`permission`] and [`granted`] are also used by the backend's API scenarios (`tests.rs`),
//! which check that the manager's Roles allow every request the backend makes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use http::{Method, Request, Response};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::client::Body;
use kube::Client;
use pgwake_router::crd::PgwakeEndpoint;
use pgwake_router::{EndpointId, Route, RoutingTable};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tower_test::mock;

use super::{desired_statefulset, KubernetesConfig};

type Docs = Vec<(String, Value)>;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every document of `files`, as JSON values, with the file it came from.
fn load(files: &[PathBuf]) -> Docs {
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        let name = f.strip_prefix(deploy_dir()).unwrap().display().to_string();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !v.is_null() {
                docs.push((name.clone(), v));
            }
        }
    }
    docs
}

/// What `kubectl apply -k dir` applies, read without kubectl: the `resources` (files, and
/// directories as kustomizations of their own) and the `configMapGenerator` ConfigMaps, under
/// their names without the content hash kustomize appends (and rewrites every reference to).
/// Patches are not applied: a kustomization with any is only checked rendered by kubectl
/// ([`rendered`]).
fn kustomization(dir: &Path) -> Docs {
    let file = dir.join("kustomization.yaml");
    let k: Value = serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(
        k.get("patches").is_none(),
        "{}: has patches",
        file.display()
    );
    let mut docs = Vec::new();
    for r in k["resources"].as_array().into_iter().flatten() {
        let path = dir.join(r.as_str().unwrap());
        if path.is_dir() {
            docs.extend(kustomization(&path));
        } else {
            docs.extend(load(&[path]));
        }
    }
    for g in k["configMapGenerator"].as_array().into_iter().flatten() {
        let mut data = serde_json::Map::new();
        for f in g["files"].as_array().unwrap() {
            let f = f.as_str().unwrap();
            let (key, path) = f.split_once('=').unwrap_or((f, f));
            let text = std::fs::read_to_string(dir.join(path)).unwrap();
            data.insert(key.to_string(), json!(text));
        }
        let name = dir
            .strip_prefix(deploy_dir())
            .unwrap()
            .display()
            .to_string();
        docs.push((
            format!("{name}/kustomization.yaml"),
            json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": g["name"],
                    "namespace": g["namespace"],
                    "labels": g["options"]["labels"],
                },
                "data": data,
            }),
        ));
    }
    docs
}

fn examples() -> Docs {
    load(&yaml_in(&deploy_dir().join("examples")))
}

/// The default shape: what `kubectl apply -k deploy/overlays/scale-out` applies, and the
/// examples.
fn scale_out() -> Docs {
    let mut docs = kustomization(&deploy_dir().join("overlays/scale-out"));
    docs.extend(examples());
    docs
}

/// The single-pod alternative: `kubectl apply -k deploy/overlays/single`, and the examples.
fn single() -> Docs {
    let mut docs = kustomization(&deploy_dir().join("overlays/single"));
    docs.extend(examples());
    docs
}

/// Every manifest under `deploy/` (but the TLS overlay's patches), each once.
fn every_document() -> Docs {
    let mut docs = scale_out();
    docs.extend(
        kustomization(&deploy_dir().join("overlays/single"))
            .into_iter()
            .filter(|(file, _)| !file.starts_with("base/")),
    );
    docs
}

fn typed<T: DeserializeOwned>(file: &str, v: &Value) -> T {
    serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{file}: {} {}: {e}", v["kind"], v["metadata"]["name"]))
}

/// [`typed`], and nothing of the document is lost on the way: the typed object serializes back
/// to every field the YAML has (serde would otherwise skip a misspelled or misplaced field,
/// which the API server rejects or, worse, ignores too).
fn strict<T: DeserializeOwned + Serialize>(file: &str, v: &Value) {
    let back = serde_json::to_value(typed::<T>(file, v)).unwrap();
    if let Err(path) = contained(v, &back, String::new()) {
        panic!(
            "{file}: {} {}: {path} is not a field of the type",
            v["kind"], v["metadata"]["name"]
        );
    }
}

/// Whether every field and value of `a` is in `b`; else the path of the first that is not.
fn contained(a: &Value, b: &Value, path: String) -> Result<(), String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => a.iter().try_for_each(|(k, v)| match b.get(k) {
            Some(w) => contained(v, w, format!("{path}.{k}")),
            None => Err(format!("{path}.{k}")),
        }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .try_for_each(|(i, (v, w))| contained(v, w, format!("{path}[{i}]"))),
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => Ok(()),
        (a, b) if a == b => Ok(()),
        _ => Err(path),
    }
}

fn find<'a>(docs: &'a Docs, kind: &str, name: &str) -> &'a Value {
    &docs
        .iter()
        .find(|(_, v)| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/"))
        .1
}

fn all<T: DeserializeOwned>(docs: &Docs, kind: &str) -> Vec<T> {
    docs.iter()
        .filter(|(_, v)| v["kind"] == kind)
        .map(|(f, v)| typed(f, v))
        .collect()
}

fn get<T: DeserializeOwned>(docs: &Docs, kind: &str, name: &str) -> T {
    typed(kind, find(docs, kind, name))
}

#[test]
fn every_manifest_parses_as_its_kubernetes_type() {
    let docs = every_document();
    assert!(docs.len() >= 20, "{} documents", docs.len());
    for (file, v) in &docs {
        let kind = v["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: no kind"));
        assert!(v["apiVersion"].is_string(), "{file}: no apiVersion");
        assert!(v["metadata"]["name"].is_string(), "{file}: no name");
        if !matches!(kind, "Namespace" | "CustomResourceDefinition") {
            assert_eq!(v["metadata"]["namespace"], "pgwake", "{file}: {kind}");
        }
        match kind {
            "Namespace" => strict::<Namespace>(file, v),
            "ServiceAccount" => strict::<ServiceAccount>(file, v),
            "Role" => strict::<Role>(file, v),
            "RoleBinding" => strict::<RoleBinding>(file, v),
            "ConfigMap" => strict::<ConfigMap>(file, v),
            "Deployment" => strict::<Deployment>(file, v),
            "Service" => strict::<Service>(file, v),
            "NetworkPolicy" => strict::<NetworkPolicy>(file, v),
            "PodDisruptionBudget" => strict::<PodDisruptionBudget>(file, v),
            "Secret" => strict::<Secret>(file, v),
            "CustomResourceDefinition" => strict::<CustomResourceDefinition>(file, v),
            "PgwakeEndpoint" => strict::<PgwakeEndpoint>(file, v),
            other => panic!("{file}: unexpected kind {other}"),
        }
    }
    let names = |docs: &Docs, kind: &str| -> Vec<String> {
        let mut n: Vec<String> = docs
            .iter()
            .filter(|(_, v)| v["kind"] == kind)
            .map(|(_, v)| v["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    let s = scale_out();
    assert_eq!(names(&s, "Deployment"), ["pgwake-manager", "pgwake-proxy"]);
    assert_eq!(
        names(&s, "Service"),
        ["pgwake", "pgwake-manager", "pgwake-peers"]
    );
    assert_eq!(
        names(&s, "NetworkPolicy"),
        ["pgwake-computes", "pgwake-manager", "pgwake-proxy"]
    );
    assert_eq!(
        names(&s, "ServiceAccount"),
        ["pgwake-manager", "pgwake-proxy"]
    );
    assert_eq!(names(&s, "Role"), ["pgwake-manager", "pgwake-proxy"]);
    assert_eq!(
        names(&s, "ConfigMap"),
        ["pgwake-manager-config", "pgwake-proxy-config"]
    );
    assert_eq!(names(&s, "Namespace"), ["pgwake"]);
    assert_eq!(names(&s, "CustomResourceDefinition").len(), 1);
    let one = single();
    assert_eq!(names(&one, "Deployment"), ["pgwake"]);
    assert_eq!(names(&one, "Service"), ["pgwake"]);
    assert_eq!(names(&one, "Role"), ["pgwake"]);
    assert_eq!(names(&one, "ConfigMap"), ["pgwake-config"]);
    assert_eq!(names(&one, "NetworkPolicy"), ["pgwake-computes"]);
    assert_eq!(names(&one, "CustomResourceDefinition").len(), 1);
}

/// The `pgwake.toml` of ConfigMap `name`.
fn config_toml(docs: &Docs, name: &str) -> toml::Table {
    let cm: ConfigMap = get(docs, "ConfigMap", name);
    let data = cm.data.unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["pgwake.toml"], "{name}");
    toml::from_str(&data["pgwake.toml"]).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn kubernetes_config(docs: &Docs, configmap: &str) -> KubernetesConfig {
    let t = config_toml(docs, configmap);
    let k: KubernetesConfig = t["kubernetes"]
        .clone()
        .try_into()
        .unwrap_or_else(|e| panic!("{configmap}: {e}"));
    assert!(k.validate().is_empty(), "{configmap}: {:?}", k.validate());
    k
}

#[test]
fn every_config_has_a_valid_kubernetes_table_that_watches_the_endpoints() {
    for (docs, cm) in [
        (scale_out(), "pgwake-proxy-config"),
        (scale_out(), "pgwake-manager-config"),
        (single(), "pgwake-config"),
    ] {
        let k = kubernetes_config(&docs, cm);
        assert_eq!(k.namespace.as_deref(), Some("pgwake"), "{cm}");
        // Every pgwake routes from the PgwakeEndpoints: the proxies to accept clients, the
        // manager to look the endpoint of a wake up (`api::server::route_request`).
        assert!(k.watch_endpoints, "{cm}");
    }
    // Endpoints live in PgwakeEndpoints: a config-file endpoint would have to be in both
    // files of the scale-out shape.
    for cm in ["pgwake-proxy-config", "pgwake-manager-config"] {
        assert!(
            !config_toml(&scale_out(), cm).contains_key("endpoint"),
            "{cm}"
        );
    }
}

#[test]
fn example_endpoints_route_and_build_statefulsets() {
    for (docs, cm) in [
        (scale_out(), "pgwake-manager-config"),
        (single(), "pgwake-config"),
    ] {
        let cfg = kubernetes_config(&docs, cm);
        let mut ids = Vec::new();
        for (file, v) in &docs {
            if v["kind"] != "PgwakeEndpoint" {
                continue;
            }
            let ep: PgwakeEndpoint = typed(file, v);
            let c = ep
                .endpoint_config()
                .unwrap_or_else(|e| panic!("{file}: {e:?}"));
            ids.push(c.id.to_string());
            let sts = desired_statefulset(&cfg, "pgwake", &Route::from(c)).unwrap();
            assert!(sts.metadata.name.unwrap().starts_with("pgwake-"));
        }
        ids.sort();
        assert_eq!(ids, ["demo", "neon-main"]);
        // The demo's secret is in the same file, as envSecret says.
        let demo = find(&docs, "PgwakeEndpoint", "demo");
        let secret = demo["spec"]["compute"]["envSecret"].as_str().unwrap();
        find(&docs, "Secret", secret);
    }
}

/// One RBAC permission: API group ("" for the core group), resource (with its subresource,
/// `pods/log`), verb.
pub(super) type Permission = (String, String, String);

/// The permission an API request needs, as the API server's authorizer derives it from the
/// request: GET of one object is `get`, of a collection `list`, or `watch` with `watch=true`;
/// POST `create`, PUT `update`, PATCH `patch`, DELETE `delete` / `deletecollection`.
pub(super) fn permission(method: &Method, uri: &str) -> Permission {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("not a Kubernetes API path: {uri}"),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [res] => (res.to_string(), false),
        [res, _name] => (res.to_string(), true),
        [res, _name, sub] => (format!("{res}/{sub}"), true),
        _ => panic!("not a resource path: {uri}"),
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method.as_str(), named) {
        ("GET", _) if watch => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", false) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => panic!("unexpected request {method} {uri}"),
    };
    (group.to_string(), resource, verb.to_string())
}

/// What Role `name` (searched in every manifest under `deploy/`) allows, one permission each.
pub(super) fn granted(name: &str) -> BTreeSet<Permission> {
    static ROLES: OnceLock<BTreeMap<String, BTreeSet<Permission>>> = OnceLock::new();
    let roles = ROLES.get_or_init(|| {
        let mut roles = BTreeMap::new();
        for role in all::<Role>(&every_document(), "Role") {
            let mut set = BTreeSet::new();
            for rule in role.rules.unwrap_or_default() {
                assert!(rule.non_resource_urls.is_none());
                // Names narrow one thing only: the proxies' `get` of roles Secrets
                // ([`secret_names`]); any other Secret access is refused.
                let by_name = rule.resource_names.as_ref().is_some_and(|n| !n.is_empty());
                if rule.resource_names.is_some() {
                    assert!(by_name, "empty resourceNames allow every name");
                    assert_eq!(
                        rule.resources.as_deref(),
                        Some(&["secrets".to_string()][..])
                    );
                    assert_eq!(rule.verbs, ["get"]);
                }
                for group in rule.api_groups.unwrap_or_default() {
                    for res in rule.resources.clone().unwrap_or_default() {
                        assert!(
                            res != "secrets" || by_name,
                            "Role {:?} reads Secrets without naming them",
                            role.metadata.name
                        );
                        for verb in &rule.verbs {
                            assert!(
                                ![&group, &res, verb].contains(&&"*".to_string()),
                                "wildcard in Role {:?}",
                                role.metadata.name
                            );
                            set.insert((group.clone(), res.clone(), verb.clone()));
                        }
                    }
                }
            }
            let name = role.metadata.name.unwrap();
            assert!(
                roles.insert(name.clone(), set).is_none(),
                "two Roles {name}"
            );
        }
        roles
    });
    roles
        .get(name)
        .unwrap_or_else(|| panic!("no Role {name} in deploy/"))
        .clone()
}

/// The Secrets Role `name` may read, by name.
fn secret_names(name: &str) -> BTreeSet<String> {
    all::<Role>(&every_document(), "Role")
        .into_iter()
        .filter(|r| r.metadata.name.as_deref() == Some(name))
        .flat_map(|r| r.rules.unwrap_or_default())
        .filter(|r| r.resources.as_deref() == Some(&["secrets".to_string()][..]))
        .flat_map(|r| r.resource_names.unwrap_or_default())
        .collect()
}

fn permissions(rules: &[(&str, &str, &str)]) -> BTreeSet<Permission> {
    rules
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .split(',')
                .map(|v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect()
}

/// The Roles, written out with the code that makes each call. `tests.rs` checks that the
/// backend's requests in every API scenario are granted by the manager's Roles (and that a
/// wake and a suspend need all of the backend's rules); `the_proxy_role_is_what_the_reflector_uses`
/// below runs the reflector against a mock API server.
#[test]
fn roles_grant_exactly_what_the_code_uses() {
    let reflector = [
        // pgwake_router::crd::crd_source: a kube-runtime reflector (watcher::Config::default:
        // paged list, then watch from its resourceVersion; no get).
        ("pgwake.io", "pgwakeendpoints", "list,watch"),
    ];
    let backend = [
        // Shared::scale: statefulsets.get_opt, statefulsets.create (absent), statefulsets.patch
        // (replicas, and the template on a wake from 0); no scale subresource.
        // running_endpoints (adoption): statefulsets.list by label; no watch.
        ("apps", "statefulsets", "get,list,create,patch"),
        // pod_watch::PodWatch: one kube-runtime watcher of the compute pods by label (a paged
        // list, then a watch from its resourceVersion; no get).
        ("", "pods", "list,watch"),
        // Shared::set_status: endpoints.patch_status.
        ("pgwake.io", "pgwakeendpoints/status", "patch"),
        // Shared::scale with delete_with_endpoint: endpoints.get_opt, for the owner's uid.
        ("pgwake.io", "pgwakeendpoints", "get"),
        // Shared::failure_event: events.create (no patch: each failure is its own Event).
        ("events.k8s.io", "events", "create"),
        // Shared::failed_create: core events.list by field selector, while a start has no pod.
        ("", "events", "list"),
    ];
    let election = [
        // leader::LeaderElector: get, create when absent, replace (take over, renew, release).
        ("coordination.k8s.io", "leases", "get,create,update"),
        // leader::label_leader_pod: the leader's label on its own pod (a merge patch).
        ("", "pods", "patch"),
    ];
    let provision = [
        // provision::EndpointResources: endpoints and branches created and deleted on request
        // (get_opt of the parent and of the new id, create, delete); provision_tests.rs
        // checks each call against the manager's Roles.
        ("pgwake.io", "pgwakeendpoints", "get,create,delete"),
    ];
    let roles_secrets = [
        // The root crate's src/roles_secret.rs: Api<Secret>::get_opt of each rolesSecret,
        // by name (secret_names); not in the scale-out manager ([auth] roles_secrets = false).
        ("", "secrets", "get"),
    ];
    let proxy: BTreeSet<Permission> = permissions(&reflector)
        .into_iter()
        .chain(permissions(&roles_secrets))
        .collect();
    let single_pod: BTreeSet<Permission> = proxy
        .iter()
        .cloned()
        .chain(permissions(&backend))
        .chain(permissions(&provision))
        .collect();
    let manager: BTreeSet<Permission> = permissions(&reflector)
        .into_iter()
        .chain(permissions(&backend))
        .chain(permissions(&provision))
        .chain(permissions(&election))
        .collect();
    assert_eq!(granted("pgwake-proxy"), proxy);
    // The manager replicas elect a leader (leader_tests.rs checks the elector's requests).
    assert_eq!(granted("pgwake-manager"), manager);
    // The single pod is proxy and manager in one, and the only one: no election.
    assert_eq!(granted("pgwake"), single_pod);

    // Each RoleBinding gives its Role to the one ServiceAccount of the same name, and each
    // ServiceAccount gets exactly one Role.
    for docs in [scale_out(), single()] {
        let sas: Vec<ServiceAccount> = all(&docs, "ServiceAccount");
        let bindings: Vec<RoleBinding> = all(&docs, "RoleBinding");
        assert_eq!(bindings.len(), sas.len());
        for rb in bindings {
            let name = rb.metadata.name.unwrap();
            assert_eq!(rb.role_ref.kind, "Role");
            assert_eq!(rb.role_ref.api_group, "rbac.authorization.k8s.io");
            assert_eq!(rb.role_ref.name, name);
            let subjects = rb.subjects.unwrap();
            assert_eq!(subjects.len(), 1, "{name}");
            assert_eq!(subjects[0].kind, "ServiceAccount");
            assert_eq!(subjects[0].name, name);
            assert_eq!(subjects[0].namespace.as_deref(), Some("pgwake"));
            find(&docs, "ServiceAccount", &name);
            find(&docs, "Role", &name);
        }
    }
}

/// The requests the routing table's reflector makes, against a mock API server that lists
/// the example endpoints and then ends each watch at once.
pub(super) async fn reflector_permissions() -> BTreeSet<Permission> {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let table = Arc::new(RoutingTable::new());
    let (_store, run) = pgwake_router::crd::crd_source(
        Client::new(service, "default"),
        "pgwake",
        None,
        Arc::clone(&table),
    );
    let task = tokio::spawn(run);
    let items: Vec<Value> = scale_out()
        .into_iter()
        .filter(|(_, v)| v["kind"] == "PgwakeEndpoint")
        .map(|(_, v)| v)
        .collect();
    let mut seen = BTreeSet::new();
    // The list, a watch, and the watch that follows the end of the first one.
    for _ in 0..3 {
        let (req, send) = handle.next_request().await.expect("reflector request");
        let uri = req.uri().to_string();
        assert!(uri.starts_with("/apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints"));
        seen.insert(permission(req.method(), &uri));
        let body = if uri.contains("watch=true") {
            String::new()
        } else {
            json!({
                "apiVersion": "pgwake.io/v1", "kind": "PgwakeEndpointList",
                "metadata": { "resourceVersion": "10" }, "items": items,
            })
            .to_string()
        };
        send.send_response(Response::new(Body::from(body.into_bytes())));
    }
    task.abort();
    assert!(table.lookup(&EndpointId::parse("demo").unwrap()).is_some());
    seen
}

/// The proxies may read exactly the roles Secrets the example endpoints name, and the
/// manager, which serves no logins, none (and is configured to read none).
#[test]
fn proxies_read_only_the_named_roles_secrets() {
    let named: BTreeSet<String> = all::<PgwakeEndpoint>(&examples(), "PgwakeEndpoint")
        .into_iter()
        .filter_map(|e| e.spec.roles_secret.map(|r| r.name))
        .collect();
    assert!(!named.is_empty(), "an example names a roles Secret");
    for name in &named {
        find(&examples(), "Secret", name);
    }
    assert_eq!(secret_names("pgwake-proxy"), named);
    assert_eq!(secret_names("pgwake"), named);
    assert!(secret_names("pgwake-manager").is_empty());
    assert_eq!(
        config_toml(&scale_out(), "pgwake-manager-config")["auth"]["roles_secrets"].as_bool(),
        Some(false)
    );
}

#[tokio::test]
async fn the_proxy_role_is_what_the_reflector_uses() {
    let reflector = reflector_permissions().await;
    // And the roles Secrets' reads, as src/roles_secret_tests.rs sees them (not the
    // manager's: it reads none).
    let mut used = reflector.clone();
    used.insert(permission(
        &Method::GET,
        "/api/v1/namespaces/pgwake/secrets/demo-roles",
    ));
    assert_eq!(used, granted("pgwake-proxy"));
    assert!(reflector.is_subset(&granted("pgwake-manager")));
    assert!(used.is_subset(&granted("pgwake")));
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn match_labels(s: &LabelSelector) -> BTreeMap<String, String> {
    assert!(s.match_expressions.is_none());
    s.match_labels.clone().unwrap_or_default()
}

/// A Deployment's pod labels, pod spec and its one container, checked against its selector.
fn pods(d: &Deployment) -> (BTreeMap<String, String>, PodSpec, Container) {
    let spec = d.spec.clone().unwrap();
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    assert!(selects(&match_labels(&spec.selector), &labels));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.containers.len(), 1);
    let c = pod.containers[0].clone();
    (labels, pod, c)
}

fn container_port(c: &Container, name: &str) -> i32 {
    c.ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no container port {name}"))
        .container_port
}

fn port_of(addr: &str) -> i32 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

fn named_port(p: &IntOrString) -> &str {
    match p {
        IntOrString::String(s) => s,
        IntOrString::Int(i) => panic!("port {i}: use the container port's name"),
    }
}

/// Every Deployment runs pgwake with its own ServiceAccount and its own ConfigMap, its
/// `--config` is the mounted key, and the ports it declares are the ones its config listens
/// on. Returns each Deployment's name with its parsed config.
fn check_deployments(docs: &Docs) -> BTreeMap<String, toml::Table> {
    let mut configs = BTreeMap::new();
    for d in all::<Deployment>(docs, "Deployment") {
        let name = d.metadata.name.clone().unwrap();
        let (_, pod, c) = pods(&d);
        let sa = pod.service_account_name.clone().unwrap();
        find(docs, "ServiceAccount", &sa);
        assert_ne!(pod.automount_service_account_token, Some(false), "{name}");
        let vol = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.config_map.is_some())
            .unwrap();
        let cm_name = vol.config_map.unwrap().name;
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == vol.name)
            .unwrap()
            .mount_path
            .clone();
        let args = c.args.clone().unwrap();
        let i = args.iter().position(|a| a == "--config").unwrap();
        let key = args[i + 1]
            .strip_prefix(&format!("{mount}/"))
            .unwrap_or_else(|| panic!("{name}: --config is not in {mount}"));
        let t = config_toml(docs, &cm_name);
        assert_eq!(key, "pgwake.toml");
        for probe in [&c.readiness_probe, &c.liveness_probe] {
            let port = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(named_port(&port.port), "admin", "{name}");
        }
        let admin = t["admin"]["listen"].as_str().unwrap();
        assert!(admin.starts_with("0.0.0.0:"), "{name}");
        assert_eq!(port_of(admin), container_port(&c, "admin"), "{name}");
        let listen = t["proxy"]["listen"].as_str().unwrap();
        let declared: Vec<&str> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|p| p.name.as_deref())
            .collect();
        if declared.contains(&"postgres") {
            assert!(listen.starts_with("0.0.0.0:"), "{name}");
            assert_eq!(port_of(listen), container_port(&c, "postgres"), "{name}");
        } else {
            // Not exposed: the manager's Postgres listener stays on loopback.
            assert!(listen.starts_with("127.0.0.1:"), "{name}");
        }
        if declared.contains(&"cancel") {
            let l = t["proxy"]["cancel_listen"].as_str().unwrap();
            assert!(l.starts_with("0.0.0.0:"), "{name}");
            assert_eq!(port_of(l), container_port(&c, "cancel"), "{name}");
        } else {
            assert!(t["proxy"].get("cancel_listen").is_none(), "{name}");
        }
        if declared.contains(&"manager") {
            let l = t["manager"]["listen"].as_str().unwrap();
            assert_eq!(port_of(l), container_port(&c, "manager"), "{name}");
        } else {
            assert!(!t.contains_key("manager"), "{name}: serves the manager API");
        }
        configs.insert(name, t);
    }
    configs
}

/// The Deployment whose pods `selector` selects; exactly one must.
fn selected<'a>(
    deployments: &'a [Deployment],
    selector: &BTreeMap<String, String>,
) -> &'a Deployment {
    let mut hits = deployments.iter().filter(|d| selects(selector, &pods(d).0));
    let d = hits
        .next()
        .unwrap_or_else(|| panic!("{selector:?} selects no Deployment"));
    assert!(
        hits.next().is_none(),
        "{selector:?} selects two Deployments"
    );
    d
}

/// Services, PodDisruptionBudgets and NetworkPolicies select the pods of exactly one
/// Deployment (never a compute's), by ports it declares; the computes' own NetworkPolicy is
/// checked by `only_pgwake_reaches_the_computes`.
fn check_selectors(docs: &Docs) {
    let deployments: Vec<Deployment> = all(docs, "Deployment");
    let cfg = KubernetesConfig {
        namespace: Some("pgwake".into()),
        ..KubernetesConfig::default()
    };
    let mut computes = Vec::new();
    for (file, v) in docs.iter().filter(|(_, v)| v["kind"] == "PgwakeEndpoint") {
        let ep: PgwakeEndpoint = typed(file, v);
        let route = Route::from(ep.endpoint_config().unwrap());
        let sts = desired_statefulset(&cfg, "pgwake", &route).unwrap();
        computes.push(sts.spec.unwrap().template.metadata.unwrap().labels.unwrap());
    }
    let mut selectors = Vec::new();
    for svc in all::<Service>(docs, "Service") {
        let spec = svc.spec.unwrap();
        let mut sel = spec.selector.unwrap();
        // Put on one of its pods at run time by the leading manager, not in any template.
        sel.remove(super::LABEL_LEADER);
        let (_, _, c) = pods(selected(&deployments, &sel));
        for p in spec.ports.unwrap() {
            container_port(&c, named_port(p.target_port.as_ref().unwrap()));
        }
        selectors.push(sel);
    }
    for pdb in all::<PodDisruptionBudget>(docs, "PodDisruptionBudget") {
        let sel = match_labels(&pdb.spec.unwrap().selector.unwrap());
        selected(&deployments, &sel);
        selectors.push(sel);
    }
    for np in all::<NetworkPolicy>(docs, "NetworkPolicy") {
        if np.metadata.name.as_deref() == Some("pgwake-computes") {
            continue;
        }
        let spec = np.spec.unwrap();
        let sel = match_labels(&spec.pod_selector.unwrap());
        let (_, _, c) = pods(selected(&deployments, &sel));
        for rule in spec.ingress.unwrap() {
            for p in rule.ports.unwrap() {
                container_port(&c, named_port(p.port.as_ref().unwrap()));
            }
            for peer in rule.from.unwrap_or_default() {
                let from = match_labels(peer.pod_selector.as_ref().unwrap());
                selected(&deployments, &from);
                selectors.push(from);
            }
        }
        selectors.push(sel);
    }
    for sel in &selectors {
        for labels in &computes {
            assert!(!selects(sel, labels), "{sel:?} selects compute pods");
        }
    }
}

#[test]
fn scale_out_proxies_reach_the_one_manager_through_its_service() {
    let docs = scale_out();
    let configs = check_deployments(&docs);
    check_selectors(&docs);

    // The manager: two replicas electing a leader, the only ones with the manager API and
    // the compute settings.
    let manager: Deployment = get(&docs, "Deployment", "pgwake-manager");
    let spec = manager.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let (manager_labels, pod, c) = pods(&manager);
    assert_eq!(pod.service_account_name.as_deref(), Some("pgwake-manager"));
    let mt = &configs["pgwake-manager"];
    assert_eq!(mt["manager"]["leader_election"].as_bool(), Some(true));
    // Both replicas are Ready (readiness does not follow leadership), so a rollout can wait
    // for each new pod: one at a time, a new one up before an old one goes, and `kubectl
    // rollout status` completes (the Lease keeps leaders from overlapping).
    let strategy = spec.strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.unwrap();
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    let probe = c.readiness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    // The Service reaches the leader by the label it puts on its own pod (label_leader_pod),
    // named by the downward API.
    let svc: Service = get(&docs, "Service", "pgwake-manager");
    let selector = svc.spec.unwrap().selector.unwrap();
    assert_eq!(
        selector.get(super::LABEL_LEADER).map(String::as_str),
        Some("true")
    );
    assert!(!manager_labels.contains_key(super::LABEL_LEADER));
    let pod_name = c
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.name == "POD_NAME")
        .expect("POD_NAME env");
    assert_eq!(
        pod_name.value_from.unwrap().field_ref.unwrap().field_path,
        "metadata.name"
    );
    // The Lease identity is the pod name.
    let hostname = c
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.name == "HOSTNAME")
        .expect("HOSTNAME env");
    assert_eq!(
        hostname.value_from.unwrap().field_ref.unwrap().field_path,
        "metadata.name"
    );
    assert!(mt["compute"].get("manager_url").is_none());
    let api_port = port_of(mt["manager"]["listen"].as_str().unwrap());
    assert!(mt["manager"]["listen"]
        .as_str()
        .unwrap()
        .starts_with("0.0.0.0:"));
    // Long enough for its drain on SIGTERM (the default [proxy] drain_timeout, 30 s). It stops
    // no compute pod then (Manager::shutdown stops only computes that die with the process;
    // the next leader adopts the pods), so the compute stop_timeout does not count.
    assert!(mt["proxy"].get("drain_timeout").is_none());
    assert!(pod.termination_grace_period_seconds.unwrap() > 30);

    // The proxies: several, rolled one at a time, waking through the manager's Service.
    let proxy: Deployment = get(&docs, "Deployment", "pgwake-proxy");
    let spec = proxy.spec.clone().unwrap();
    assert!(spec.replicas.unwrap() >= 2);
    let strategy = spec.strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy.rolling_update.unwrap().max_unavailable,
        Some(IntOrString::Int(0))
    );
    let (proxy_labels, pod, _) = pods(&proxy);
    assert_eq!(pod.service_account_name.as_deref(), Some("pgwake-proxy"));
    let pt = &configs["pgwake-proxy"];
    let url = pt["compute"]["manager_url"].as_str().unwrap();
    let host_port = url.strip_prefix("http://").unwrap().trim_end_matches('/');
    let (host, port) = host_port.rsplit_once(':').unwrap();
    assert_eq!(host, "pgwake-manager.pgwake.svc");
    let svc: Service = get(&docs, "Service", "pgwake-manager");
    let svc = svc.spec.unwrap();
    assert_eq!(svc.type_.as_deref(), Some("ClusterIP"));
    // The manager pods' labels, and the leader's.
    let mut leader_labels = manager_labels.clone();
    leader_labels.insert(super::LABEL_LEADER.into(), "true".into());
    assert_eq!(svc.selector.as_ref().unwrap(), &leader_labels);
    let sp = svc.ports.unwrap().into_iter().next().unwrap();
    assert_eq!(sp.port, port.parse::<i32>().unwrap());
    assert_eq!(
        container_port(&c, named_port(sp.target_port.as_ref().unwrap())),
        api_port
    );
    // A proxy holds a client as long as the manager may take to wake its compute.
    let wake = |t: &toml::Table| {
        humantime_serde::re::humantime::parse_duration(
            t["compute"]["wake_timeout"].as_str().unwrap(),
        )
        .unwrap()
    };
    assert!(wake(pt) >= wake(mt));

    // Only the proxies may call the manager API.
    let np: NetworkPolicy = get(&docs, "NetworkPolicy", "pgwake-manager");
    let np = np.spec.unwrap();
    assert_eq!(
        match_labels(np.pod_selector.as_ref().unwrap()),
        manager_labels
    );
    let rules = np.ingress.unwrap();
    let api_rule = rules
        .iter()
        .find(|r| {
            r.ports
                .as_ref()
                .unwrap()
                .iter()
                .any(|p| named_port(p.port.as_ref().unwrap()) == "manager")
        })
        .unwrap();
    let from = api_rule.from.as_ref().unwrap();
    assert_eq!(from.len(), 1);
    assert_eq!(
        match_labels(from[0].pod_selector.as_ref().unwrap()),
        proxy_labels
    );

    // Cancels across replicas: each proxy forwards a key it did not issue to every proxy pod,
    // through a headless Service (pod IPs, not-ready ones included) on the cancel port, and
    // only proxies may reach that port.
    let cancel_port = port_of(pt["proxy"]["cancel_listen"].as_str().unwrap());
    let peers: Vec<&str> = pt["proxy"]["cancel_peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(peers, ["pgwake-peers.pgwake.svc.cluster.local:5433"]);
    let svc: Service = get(&docs, "Service", "pgwake-peers");
    let svc = svc.spec.unwrap();
    assert_eq!(svc.cluster_ip.as_deref(), Some("None"));
    assert_eq!(svc.publish_not_ready_addresses, Some(true));
    assert_eq!(svc.selector.as_ref().unwrap(), &proxy_labels);
    let (_, _, proxy_c) = pods(&proxy);
    let sp = svc.ports.unwrap().into_iter().next().unwrap();
    assert_eq!(sp.port, port_of(peers[0]));
    assert_eq!(
        container_port(&proxy_c, named_port(sp.target_port.as_ref().unwrap())),
        cancel_port
    );
    let np: NetworkPolicy = get(&docs, "NetworkPolicy", "pgwake-proxy");
    let np = np.spec.unwrap();
    assert_eq!(
        match_labels(np.pod_selector.as_ref().unwrap()),
        proxy_labels
    );
    let mut open_ports = Vec::new();
    for rule in np.ingress.unwrap() {
        let ports: Vec<&str> = rule
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| named_port(p.port.as_ref().unwrap()))
            .collect();
        match rule.from.as_deref() {
            None | Some([]) => open_ports.extend(ports.iter().map(|p| p.to_string())),
            Some(from) => {
                assert_eq!(ports, ["cancel"]);
                assert_eq!(from.len(), 1);
                assert_eq!(
                    match_labels(from[0].pod_selector.as_ref().unwrap()),
                    proxy_labels
                );
            }
        }
    }
    // Clients and probes still reach the proxies; nobody else reaches the cancel port.
    open_ports.sort();
    assert_eq!(open_ports, ["admin", "postgres"]);

    // The clients' door: a load balancer in front of the proxies. Client-IP affinity stays
    // (most cancels then land on their session's replica without a fan-out).
    let lb: Service = get(&docs, "Service", "pgwake");
    let lb = lb.spec.unwrap();
    assert_eq!(lb.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(lb.selector.unwrap(), proxy_labels);
    assert_eq!(lb.session_affinity.as_deref(), Some("ClientIP"));
    let pdb: PodDisruptionBudget = get(&docs, "PodDisruptionBudget", "pgwake-proxy");
    assert_eq!(
        match_labels(&pdb.spec.unwrap().selector.unwrap()),
        proxy_labels
    );
}

#[test]
fn single_pod_runs_proxy_and_manager_in_one() {
    let docs = single();
    let configs = check_deployments(&docs);
    check_selectors(&docs);
    let d: Deployment = get(&docs, "Deployment", "pgwake");
    let spec = d.spec.clone().unwrap();
    // One replica that is never doubled during a rollout: the embedded manager is the only one.
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("Recreate"));
    let (labels, pod, _) = pods(&d);
    assert_eq!(pod.service_account_name.as_deref(), Some("pgwake"));
    let t = &configs["pgwake"];
    assert!(t["compute"].get("manager_url").is_none());
    let svc: Service = get(&docs, "Service", "pgwake");
    let svc = svc.spec.unwrap();
    assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(svc.selector.unwrap(), labels);
}

/// `kubectl kustomize deploy/<overlay>`, parsed; `None` where kubectl is not installed (the
/// overlays are then only checked through [`kustomization`], without their patches).
fn rendered(overlay: &str) -> Option<Docs> {
    let out = match std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir().join(overlay))
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("kubectl is not installed: {overlay} is not rendered");
            return None;
        }
        r => r.unwrap(),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(std::str::from_utf8(&out.stdout).unwrap()) {
        docs.push((overlay.to_string(), Value::deserialize(doc).unwrap()));
    }
    Some(docs)
}

const OVERLAYS: [&str; 4] = [
    "overlays/scale-out",
    "overlays/single",
    "overlays/tls",
    "monitoring",
];

/// Each overlay renders, every object in it is a valid Kubernetes object, and the config of
/// each Deployment is a generated ConfigMap whose name carries a hash of its content: an edit
/// to a `pgwake.toml` renames it, which changes the pod template, so `kubectl apply -k` rolls
/// exactly the Deployments that read it.
#[test]
fn every_overlay_renders_and_config_changes_roll_the_pods() {
    for overlay in OVERLAYS {
        let Some(docs) = rendered(overlay) else {
            return;
        };
        let mut configmaps = BTreeSet::new();
        for (file, v) in &docs {
            match v["kind"].as_str().unwrap() {
                "Namespace" => strict::<Namespace>(file, v),
                "ServiceAccount" => strict::<ServiceAccount>(file, v),
                "Role" => strict::<Role>(file, v),
                "RoleBinding" => strict::<RoleBinding>(file, v),
                "ConfigMap" => {
                    strict::<ConfigMap>(file, v);
                    configmaps.insert(v["metadata"]["name"].as_str().unwrap().to_string());
                }
                "Deployment" => strict::<Deployment>(file, v),
                "Service" => strict::<Service>(file, v),
                "NetworkPolicy" => strict::<NetworkPolicy>(file, v),
                "PodDisruptionBudget" => strict::<PodDisruptionBudget>(file, v),
                "CustomResourceDefinition" => strict::<CustomResourceDefinition>(file, v),
                "Certificate" => assert_eq!(v["apiVersion"], "cert-manager.io/v1"),
                "PodMonitor" | "PrometheusRule" => {
                    assert_eq!(v["apiVersion"], "monitoring.coreos.com/v1")
                }
                other => panic!("{overlay}: unexpected kind {other}"),
            }
        }
        let deployments: Vec<Deployment> = all(&docs, "Deployment");
        assert!(
            overlay == "monitoring" || !deployments.is_empty(),
            "{overlay}"
        );
        for d in deployments {
            let (_, spec, _) = pods(&d);
            let config = spec
                .volumes
                .iter()
                .flatten()
                .find_map(|v| v.config_map.as_ref())
                .unwrap_or_else(|| panic!("{overlay}: {:?} has no config", d.metadata.name))
                .name
                .clone();
            assert!(
                configmaps.contains(&config),
                "{overlay}: no ConfigMap {config}"
            );
            let (base, hash) = config.rsplit_once('-').unwrap();
            assert!(
                base.ends_with("-config") && hash.len() == 10,
                "{overlay}: ConfigMap {config} has no content hash"
            );
        }
    }
}

/// The TLS overlay: a cert-manager Certificate for the wildcard of the SNI domain, its Secret
/// mounted where the proxies' `[tls]` reads it, TLS required, and external-dns publishing the
/// wildcard at the load balancer; the rest of the proxy config is the scale-out one.
#[test]
fn the_tls_overlay_routes_by_sni_with_a_cert_manager_certificate() {
    let Some(docs) = rendered("overlays/tls") else {
        return;
    };
    let cert = find(&docs, "Certificate", "pgwake-tls");
    assert_eq!(cert["spec"]["dnsNames"], json!(["*.db.example.com"]));
    let secret = cert["spec"]["secretName"].as_str().unwrap();
    assert!(cert["spec"]["issuerRef"]["name"].is_string());

    let proxy: Deployment = get(&docs, "Deployment", "pgwake-proxy");
    let (_, spec, container) = pods(&proxy);
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret))
        .expect("the certificate's Secret is mounted");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume.name)
        .unwrap();
    // A subPath mount would never see a renewal.
    assert_eq!(mount.sub_path, None);

    let configmap = docs
        .iter()
        .find(|(_, v)| {
            v["kind"] == "ConfigMap"
                && v["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("pgwake-proxy-config-")
        })
        .unwrap();
    let toml: toml::Table =
        toml::from_str(configmap.1["data"]["pgwake.toml"].as_str().unwrap()).unwrap();
    let tls = toml["tls"].as_table().unwrap();
    assert_eq!(tls["require_tls"].as_bool(), Some(true));
    assert_eq!(
        tls["domains"].as_array().unwrap()[0].as_str(),
        Some("db.example.com")
    );
    let pair = tls["certificates"].as_array().unwrap()[0]
        .as_table()
        .unwrap();
    assert_eq!(
        pair["cert"].as_str(),
        Some(format!("{}/tls.crt", mount.mount_path).as_str())
    );
    assert_eq!(
        pair["key"].as_str(),
        Some(format!("{}/tls.key", mount.mount_path).as_str())
    );

    let service: Service = get(&docs, "Service", "pgwake");
    let annotations = service.metadata.annotations.unwrap();
    assert_eq!(
        annotations["external-dns.alpha.kubernetes.io/hostname"],
        "*.db.example.com"
    );

    // The TLS proxy.toml is the scale-out one plus [tls], nothing else.
    let mut without_tls = toml.clone();
    without_tls.remove("tls");
    assert_eq!(
        without_tls,
        config_toml(&scale_out(), "pgwake-proxy-config")
    );
}

/// Compute pods take Postgres connections from pgwake's pods only, on the compute's named
/// port, in both shapes.
#[test]
fn only_pgwake_reaches_the_computes() {
    for (docs, cm) in [
        (scale_out(), "pgwake-manager-config"),
        (single(), "pgwake-config"),
    ] {
        let k = kubernetes_config(&docs, cm);
        let demo: PgwakeEndpoint = get(&docs, "PgwakeEndpoint", "demo");
        let route = Route::from(demo.endpoint_config().unwrap());
        let sts = desired_statefulset(&k, "pgwake", &route).unwrap();
        let template = sts.spec.unwrap().template;
        let compute_labels = template.metadata.unwrap().labels.unwrap();
        let policy: NetworkPolicy = get(&docs, "NetworkPolicy", "pgwake-computes");
        let spec = policy.spec.unwrap();
        assert!(selects(
            &match_labels(spec.pod_selector.as_ref().unwrap()),
            &compute_labels
        ));
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );
        let ingress = spec.ingress.unwrap();
        assert_eq!(ingress.len(), 1);
        let from = ingress[0].from.as_ref().unwrap();
        assert_eq!(from.len(), 1);
        let from = match_labels(from[0].pod_selector.as_ref().unwrap());
        // Every pgwake Deployment of the shape, and nothing else of ours (not the computes).
        for d in all::<Deployment>(&docs, "Deployment") {
            assert!(selects(&from, &pods(&d).0), "{:?}", d.metadata.name);
        }
        assert!(!selects(&from, &compute_labels));
        let container = &template.spec.unwrap().containers[0];
        let port = ingress[0].ports.as_ref().unwrap()[0].port.as_ref().unwrap();
        assert_eq!(
            container_port(container, named_port(port)),
            i32::from(k.port)
        );
    }
}
