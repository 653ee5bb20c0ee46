//! The manifests in `deploy/`: every document parses (as YAML and as its Kubernetes type), the
//! example endpoints route, the ConfigMap's `[kubernetes]` table is valid, the RBAC rules are
//! exactly what the code calls, and the objects refer to each other consistently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use pgwake_router::crd::PgwakeEndpoint;
use pgwake_router::{EndpointConfig, Route};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::{desired_statefulset, KubernetesConfig};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in [deploy_dir(), deploy_dir().join("examples")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// Every document of every manifest, as JSON values, with the file it came from.
fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for f in yaml_files() {
        let text = std::fs::read_to_string(&f).unwrap();
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

fn typed<T: DeserializeOwned>(file: &str, v: &Value) -> T {
    serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{file}: {} {}: {e}", v["kind"], v["metadata"]["name"]))
}

fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    &docs
        .iter()
        .find(|(_, v)| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/"))
        .1
}

#[test]
fn every_manifest_parses_as_its_kubernetes_type() {
    let docs = documents();
    assert!(docs.len() >= 10, "{} documents", docs.len());
    let mut kinds = Vec::new();
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
            "Namespace" => drop(typed::<Namespace>(file, v)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(file, v)),
            "Role" => drop(typed::<Role>(file, v)),
            "RoleBinding" => drop(typed::<RoleBinding>(file, v)),
            "ConfigMap" => drop(typed::<ConfigMap>(file, v)),
            "Deployment" => drop(typed::<Deployment>(file, v)),
            "Service" => drop(typed::<Service>(file, v)),
            "Secret" => drop(typed::<Secret>(file, v)),
            "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(file, v)),
            "PgwakeEndpoint" => drop(typed::<PgwakeEndpoint>(file, v)),
            other => panic!("{file}: unexpected kind {other}"),
        }
        kinds.push(kind);
    }
    for k in [
        "Namespace",
        "CustomResourceDefinition",
        "Role",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(&k), "no {k}");
    }
}

#[test]
fn example_endpoints_route_and_build_statefulsets() {
    let docs = documents();
    let cfg = configmap_kubernetes_config(&docs);
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

fn configmap_toml(docs: &[(String, Value)]) -> toml::Table {
    let cm = find(docs, "ConfigMap", "pgwake-config");
    let text = cm["data"]["pgwake.toml"].as_str().unwrap();
    toml::from_str(text).unwrap()
}

fn configmap_kubernetes_config(docs: &[(String, Value)]) -> KubernetesConfig {
    let t = configmap_toml(docs);
    let k: KubernetesConfig = t["kubernetes"].clone().try_into().unwrap();
    assert!(k.validate().is_empty(), "{:?}", k.validate());
    k
}

#[test]
fn configmap_holds_a_valid_config() {
    let docs = documents();
    let t = configmap_toml(&docs);
    let k = configmap_kubernetes_config(&docs);
    assert_eq!(k.namespace.as_deref(), Some("pgwake"));
    // The commented-out endpoint is what a config-file Kubernetes endpoint looks like: keep it
    // parseable.
    let cm = find(&docs, "ConfigMap", "pgwake-config");
    let text = cm["data"]["pgwake.toml"].as_str().unwrap();
    let example: String = text
        .lines()
        .skip_while(|l| !l.starts_with("# [[endpoint]]"))
        .map(|l| l.trim_start_matches("# "))
        .collect::<Vec<_>>()
        .join("\n");
    #[derive(Deserialize)]
    struct F {
        endpoint: Vec<EndpointConfig>,
    }
    let f: F = toml::from_str(&example).unwrap_or_else(|e| panic!("{example}\n{e}"));
    assert_eq!(f.endpoint[0].id.as_str(), "from-config");
    // The Deployment's ports are the ones the config listens on.
    let listen = t["proxy"]["listen"].as_str().unwrap();
    let admin = t["admin"]["listen"].as_str().unwrap();
    let d = find(&docs, "Deployment", "pgwake");
    let ports = &d["spec"]["template"]["spec"]["containers"][0]["ports"];
    let port = |name: &str| {
        ports
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert!(listen.ends_with(&format!(":{}", port("postgres"))));
    assert!(admin.ends_with(&format!(":{}", port("admin"))));
}

#[test]
fn rbac_grants_exactly_what_the_backend_and_the_source_use() {
    let docs = documents();
    let role: Role = typed("10-rbac.yaml", find(&docs, "Role", "pgwake"));
    let mut granted = BTreeMap::new();
    for rule in role.rules.unwrap() {
        for group in rule.api_groups.unwrap() {
            for res in rule.resources.clone().unwrap() {
                granted.insert(format!("{group}/{res}"), rule.verbs.join(","));
            }
        }
    }
    let expected = BTreeMap::from(
        [
            // get_opt, create, patch (replicas, template)
            ("apps/statefulsets", "get,create,patch"),
            // watch_object: list + watch
            ("/pods", "list,watch"),
            // the reflector in pgwake_router::crd
            ("pgwake.io/pgwakeendpoints", "list,watch"),
            ("pgwake.io/pgwakeendpoints/status", "patch"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    assert_eq!(granted, expected);
}

#[test]
fn objects_refer_to_each_other() {
    let docs = documents();
    let d: Deployment = typed("30-proxy.yaml", find(&docs, "Deployment", "pgwake"));
    let spec = d.spec.unwrap();
    let pod = spec.template.spec.unwrap();
    let sa = pod.service_account_name.unwrap();
    find(&docs, "ServiceAccount", &sa);
    let rb: RoleBinding = typed("10-rbac.yaml", find(&docs, "RoleBinding", "pgwake"));
    assert_eq!(rb.subjects.unwrap()[0].name, sa);
    let cm_name = pod
        .volumes
        .unwrap()
        .into_iter()
        .find_map(|v| v.config_map)
        .unwrap()
        .name;
    find(&docs, "ConfigMap", &cm_name);
    // One replica that is never doubled during a rollout: the embedded manager is the only one.
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("Recreate"));
    let svc: Service = typed("30-proxy.yaml", find(&docs, "Service", "pgwake"));
    let svc = svc.spec.unwrap();
    assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        svc.selector.unwrap(),
        spec.template.metadata.unwrap().labels.unwrap()
    );
}
