//! Every pgwake config shipped in a ConfigMap under `deploy/` loads with pgwake's own config
//! loader (`Config::parse`, what `pgwake --config` and `--check-config` run), and each one is
//! wired for its role: the scale-out proxies wake through the manager's Service, the manager
//! serves the API, the single pod does both in-process. (The manifests themselves are checked
//! in compute-manager/src/kubernetes/deploy_tests.rs.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pgwake::Config;
use serde_yaml::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The TOML files embedded in the ConfigMaps of every manifest under `deploy/`, by
/// "ConfigMap name/key".
fn shipped_configs() -> BTreeMap<String, String> {
    let mut configs = BTreeMap::new();
    for dir in [
        deploy_dir(),
        deploy_dir().join("single"),
        deploy_dir().join("examples"),
    ] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|x| x != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v: Value = serde::Deserialize::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                if v["kind"].as_str() != Some("ConfigMap") {
                    continue;
                }
                let name = v["metadata"]["name"].as_str().unwrap();
                for (key, value) in v["data"].as_mapping().unwrap() {
                    let key = key.as_str().unwrap();
                    if key.ends_with(".toml") {
                        let prev = configs
                            .insert(format!("{name}/{key}"), value.as_str().unwrap().to_string());
                        assert!(prev.is_none(), "two ConfigMaps {name}");
                    }
                }
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
