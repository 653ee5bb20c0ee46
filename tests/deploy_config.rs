//! Every pgwake config shipped under `deploy/` (the `pgwake.toml` files that the overlays'
//! kustomizations put in ConfigMaps) loads with pgwake's own config loader (`Config::parse`,
//! what `pgwake --config` and `--check-config` run), and each one is wired for its role: the
//! scale-out proxies wake through the manager's Service, the manager serves the API, the single
//! pod does both in-process; and the proxy Deployment is sized and timed for its config (memory
//! limit vs `max_connections`, grace period vs `drain_timeout`). (The manifests themselves are
//! checked in compute-manager/src/kubernetes/deploy_tests.rs.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgwake::Config;
use serde_yaml::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn yaml(path: &Path) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The files each overlay's `configMapGenerator` puts in a ConfigMap, by "ConfigMap name/key"
/// (prefixed with "tls/" for the TLS overlay, whose proxy config replaces the scale-out one).
fn shipped_configs() -> BTreeMap<String, String> {
    let mut configs = BTreeMap::new();
    for (overlay, prefix) in [("scale-out", ""), ("single", ""), ("tls", "tls/")] {
        let dir = deploy_dir().join("overlays").join(overlay);
        let k = yaml(&dir.join("kustomization.yaml"));
        for g in k["configMapGenerator"].as_sequence().unwrap() {
            let name = g["name"].as_str().unwrap();
            for f in g["files"].as_sequence().unwrap() {
                let f = f.as_str().unwrap();
                let (key, file) = f.split_once('=').unwrap_or((f, f));
                let text = std::fs::read_to_string(dir.join(file)).unwrap();
                let prev = configs.insert(format!("{prefix}{name}/{key}"), text);
                assert!(prev.is_none(), "two ConfigMaps {name}");
            }
        }
    }
    configs
}

fn parse(configs: &BTreeMap<String, String>, name: &str) -> Config {
    let text = configs
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in deploy/"));
    Config::parse(text).unwrap_or_else(|e| panic!("{name}:\n{e}"))
}

#[test]
fn every_shipped_config_loads() {
    let configs = shipped_configs();
    assert_eq!(
        configs.keys().collect::<Vec<_>>(),
        [
            "pgwake-config/pgwake.toml",
            "pgwake-manager-config/pgwake.toml",
            "pgwake-proxy-config/pgwake.toml",
            "tls/pgwake-proxy-config/pgwake.toml",
        ]
    );
    for name in configs.keys() {
        let c = parse(&configs, name);
        // Endpoints come from the PgwakeEndpoint resources.
        let k = c.kubernetes.as_ref().expect("[kubernetes]");
        assert!(k.watch_endpoints, "{name}");
        assert_eq!(k.namespace.as_deref(), Some("pgwake"), "{name}");
        assert!(c.endpoints.is_empty(), "{name}");
        assert!(c.admin.listen.is_some(), "{name}: the probes need /readyz");
    }
}

#[test]
fn scale_out_proxies_wake_through_the_manager_service() {
    let configs = shipped_configs();
    let proxy = parse(&configs, "pgwake-proxy-config/pgwake.toml");
    let manager = parse(&configs, "pgwake-manager-config/pgwake.toml");

    assert_eq!(
        proxy.compute.manager_url.as_deref(),
        Some("http://pgwake-manager.pgwake.svc:9188")
    );
    assert_eq!(proxy.manager.listen, None);
    assert!(!proxy.proxy.listen.ip().is_loopback());
    // The proxies forward cancels to each other through the headless Service of their pods;
    // the manager holds no client sessions.
    assert_eq!(
        proxy.proxy.cancel_listen.map(|a| a.to_string()).as_deref(),
        Some("0.0.0.0:5433")
    );
    assert_eq!(
        proxy.proxy.cancel_peers,
        ["pgwake-peers.pgwake.svc.cluster.local:5433"]
    );
    assert_eq!(manager.proxy.cancel_listen, None);
    assert!(manager.proxy.cancel_peers.is_empty());

    assert_eq!(manager.compute.manager_url, None);
    // Its replicas elect a leader; the proxies never do.
    assert!(manager.manager.leader_election);
    assert!(!proxy.manager.leader_election);
    let lease = manager
        .manager
        .leader_config(Some("pgwake-manager-6d4f9-abcde".into()))
        .unwrap();
    assert_eq!(lease.lease_name, "pgwake-manager");
    assert!(lease.validate().is_empty(), "{:?}", lease.validate());
    assert_eq!(
        manager.manager.listen.map(|a| a.to_string()).as_deref(),
        Some("0.0.0.0:9188")
    );
    // Clients never reach the manager's own Postgres listener.
    assert!(manager.proxy.listen.ip().is_loopback());
    // The proxies hold a client for as long as the manager may take to wake its compute.
    assert!(proxy.compute.wake_timeout >= manager.compute.wake_timeout);
}

#[test]
fn the_single_pod_manages_computes_in_process() {
    let configs = shipped_configs();
    let name = "pgwake-config/pgwake.toml";
    let c = parse(&configs, name);
    assert_eq!(c.compute.manager_url, None);
    assert_eq!(c.manager.listen, None);
    assert!(!c.manager.leader_election, "the only manager elects nobody");

    // Its commented-out [[endpoint]] is what a config-file Kubernetes endpoint looks like:
    // with it uncommented, the file still loads, with that endpoint.
    let text = &configs[name];
    let example: Vec<&str> = text
        .lines()
        .map(str::trim_start)
        .skip_while(|l| !l.starts_with("# [[endpoint]]"))
        .take_while(|l| l.starts_with("# "))
        .map(|l| l.trim_start_matches("# "))
        .collect();
    assert!(example.len() > 3, "no commented-out [[endpoint]] in {name}");
    let with_example = format!("{text}\n{}\n", example.join("\n"));
    let c = Config::parse(&with_example).unwrap_or_else(|e| panic!("{with_example}\n{e}"));
    assert_eq!(c.endpoints.len(), 1);
    assert_eq!(c.endpoints[0].id.as_str(), "from-config");
}

/// The proxy container of the scale-out shape's Deployment.
fn proxy_deployment() -> Value {
    let path = deploy_dir().join("overlays/scale-out/40-proxy.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["kind"].as_str() == Some("Deployment") {
            return v;
        }
    }
    panic!("no Deployment in {}", path.display());
}

/// A Kubernetes memory quantity in bytes (the binary and decimal suffixes).
fn bytes(quantity: &str) -> u64 {
    let split = quantity
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(quantity.len());
    let (n, unit) = quantity.split_at(split);
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => panic!("unit {other} in {quantity}"),
    };
    n.parse::<u64>().unwrap() * factor
}

/// A proxy at `max_connections` fits in its container: each session's user-space buffers (the
/// copy path's two `COPY_BUF_SIZE` buffers, and as much again for rustls' record buffers on a
/// TLS session) times `max_connections`, plus a baseline for the process itself (runtime,
/// routing table, TLS config), stays under the memory limit. At the defaults (10,000
/// connections, 256 MiB) the buffers alone were 625 MiB: the kernel would OOM-kill the proxy
/// with every session on it.
#[test]
fn proxy_memory_limit_fits_max_connections() {
    const BASELINE: u64 = 64 << 20;
    let per_session = 4 * pgwake_proxy::passthrough::COPY_BUF_SIZE as u64;
    let d = proxy_deployment();
    let container = &d["spec"]["template"]["spec"]["containers"][0];
    let limit = bytes(
        container["resources"]["limits"]["memory"]
            .as_str()
            .expect("the proxy has a memory limit"),
    );
    for name in [
        "pgwake-proxy-config/pgwake.toml",
        "tls/pgwake-proxy-config/pgwake.toml",
    ] {
        let proxy = parse(&shipped_configs(), name);
        let max = proxy.proxy.max_connections as u64;
        let needed = BASELINE + max * per_session;
        assert!(
            needed <= limit,
            "{name}: {max} sessions need {} MiB, the container may use {} MiB",
            needed >> 20,
            limit >> 20
        );
    }
}

/// A rollout neither refuses new clients nor cuts sessions short: the proxy keeps accepting
/// through a preStop sleep (while the endpoints controller, kube-proxy and the load balancer
/// take it out of rotation), then drains for `drain_timeout`, all within the grace period.
#[test]
fn proxy_rollouts_wait_for_endpoints_and_drain() {
    let d = proxy_deployment();
    let pod = &d["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let command: Vec<&str> = container["lifecycle"]["preStop"]["exec"]["command"]
        .as_sequence()
        .expect("a preStop hook")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let [sleep, secs] = command[..] else {
        panic!("preStop {command:?}");
    };
    assert_eq!(sleep, "sleep");
    let pre_stop = Duration::from_secs(secs.parse().unwrap());
    // Long enough for the Service's endpoints to be updated everywhere (a few seconds).
    assert!(pre_stop >= Duration::from_secs(5), "{pre_stop:?}");

    let proxy = parse(&shipped_configs(), "pgwake-proxy-config/pgwake.toml");
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    assert!(
        grace > pre_stop + proxy.proxy.drain_timeout,
        "grace {grace:?} <= preStop {pre_stop:?} + drain_timeout {:?}",
        proxy.proxy.drain_timeout
    );
}

/// The TLS overlay's proxies route by SNI: a certificate, the domain whose first label is the
/// endpoint, TLS required; everything else as in the scale-out proxies.
#[test]
fn tls_proxies_route_by_sni_and_require_tls() {
    let configs = shipped_configs();
    let tls = parse(&configs, "tls/pgwake-proxy-config/pgwake.toml");
    let plain = parse(&configs, "pgwake-proxy-config/pgwake.toml");
    assert!(tls.tls.enabled());
    assert!(tls.tls.require_tls);
    assert_eq!(tls.tls.domains, ["db.example.com"]);
    assert!(!plain.tls.enabled());
    let table = |name: &str| -> toml::Table { toml::from_str(&configs[name]).unwrap() };
    let mut without_tls = table("tls/pgwake-proxy-config/pgwake.toml");
    without_tls.remove("tls");
    assert_eq!(without_tls, table("pgwake-proxy-config/pgwake.toml"));
}

/// Every metric family pgwake serves on /metrics (both roles' metrics, as the binary registers
/// them), with its label names. From the collectors' descriptors, not from a scrape: a labelled
/// family with no series yet is not in a scrape.
fn served_metrics() -> BTreeMap<String, Vec<String>> {
    use prometheus::core::Collector;
    let registry = prometheus::Registry::new();
    let p = pgwake_proxy::ProxyMetrics::new(&registry).unwrap();
    let m = pgwake_compute_manager::ManagerMetrics::new(&registry).unwrap();
    let collectors: Vec<&dyn Collector> = vec![
        &p.accepted,
        &p.active,
        &p.closed,
        &p.errors,
        &p.bytes,
        &p.cancels,
        &p.tls_handshakes,
        &m.wakes,
        &m.wake_seconds,
        &m.starts,
        &m.adoptions,
        &m.suspends,
        &m.crashes,
        &m.held_clients,
        &m.computes,
        &m.endpoint_state,
    ];
    let mut names = BTreeMap::new();
    for c in collectors {
        for d in c.desc() {
            names.insert(d.fq_name.clone(), d.variable_labels.clone());
        }
    }
    // Every family registered on the registry is in the list above.
    let registered: usize = registry.gather().len();
    assert!(names.len() >= registered);
    names
}

/// `(metric, label names in its selector)` for every `pgwake_...` metric a PromQL text uses.
fn metrics_used(text: &str) -> Vec<(String, Vec<String>)> {
    let mut used = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("pgwake_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_string();
        let mut labels = Vec::new();
        if let Some(selector) = tail[end..].strip_prefix('{') {
            let selector = &selector[..selector.find('}').unwrap()];
            for matcher in selector.split(',') {
                let key = matcher.split(['=', '!', '~']).next().unwrap().trim();
                labels.push(key.to_string());
            }
        }
        used.push((name, labels));
        rest = &tail[end..];
    }
    used
}

/// The alerting rules and the Grafana dashboard in deploy/monitoring use only metrics and
/// labels that pgwake serves (a renamed metric would otherwise leave an alert that never
/// fires and an empty panel).
#[test]
fn monitoring_uses_only_metrics_pgwake_serves() {
    let served = served_metrics();
    let dir = deploy_dir().join("monitoring");
    let rules = yaml(&dir.join("prometheusrule.yaml"));
    let mut exprs = Vec::new();
    for group in rules["spec"]["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_string());
        }
    }
    // JSON is YAML.
    let dashboard = yaml(&dir.join("grafana-dashboard.json"));
    for panel in dashboard["panels"].as_sequence().unwrap() {
        for target in panel["targets"].as_sequence().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    exprs.push(
        dashboard["templating"]["list"][1]["query"]["query"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    let mut checked = 0;
    for expr in &exprs {
        for (name, labels) in metrics_used(expr) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| served.contains_key(*f)))
                .unwrap_or(&name);
            let Some(known) = served.get(family) else {
                panic!("{name} is not a pgwake metric (in {expr})");
            };
            for l in labels {
                // Target labels Prometheus adds to every series.
                let target = ["namespace", "pod", "job", "instance", "le"].contains(&l.as_str());
                assert!(
                    target || known.contains(&l),
                    "{name} has no label {l} (in {expr})"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "{checked} metric uses");
}

/// The example endpoint's roles Secret parses as pgwake reads it, and its verifier is the one
/// the compute gets (the postgres image's POSTGRES_PASSWORD, stored as is by initdb) and the
/// one of the password the README tells clients to use: the logins checked at pgwake are the
/// compute's.
#[test]
fn the_example_roles_secret_checks_the_example_password() {
    use pgwake_proxy::scram::{verify_password, ChannelBinding, ServerExchange};
    use pgwake_proxy::verifiers::parse_roles_file;

    let text =
        std::fs::read_to_string(deploy_dir().join("examples/postgres-endpoint.yaml")).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let string_data = |name: &str, key: &str| -> String {
        let d = docs
            .iter()
            .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Secret {name}"));
        d["stringData"][key].as_str().unwrap().to_string()
    };
    let endpoint = docs.iter().find(|d| d["kind"] == "PgwakeEndpoint").unwrap();
    assert_eq!(endpoint["spec"]["rolesSecret"]["name"], "demo-roles");
    let roles = parse_roles_file(&string_data("demo-roles", "roles")).unwrap();
    let postgres = roles["postgres"].clone();
    assert_eq!(
        postgres.to_string(),
        string_data("demo-postgres", "POSTGRES_PASSWORD")
    );
    let check = |pw: &str| {
        verify_password(
            ServerExchange::new(postgres.clone(), ChannelBinding::None),
            pw.as_bytes(),
        )
    };
    assert!(check("change-me").is_ok());
    assert!(check("change-me!").is_err());
}
