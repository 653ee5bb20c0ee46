//! A pgwake that runs the compute manager (the single-pod shape, deploy/overlays/single/pgwake.toml)
//! starting while a compute it did not start is running, against a fake Kubernetes API server:
//! once the PgwakeEndpoints are loaded it lists pgwake's StatefulSets, adopts the running one
//! through the wake path (no scale, no client), and its shutdown leaves the compute running.
//!
//! Its own test binary: it points KUBECONFIG at the fake server for the whole process.

mod common;

use std::time::Duration;

use pgwake::{Config, Pgwake};
use pgwake_compute_manager::Phase;
use pgwake_router::EndpointId;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

const ENDPOINTS: &str = r#"{"apiVersion":"pgwake.io/v1","kind":"PgwakeEndpointList","metadata":{"resourceVersion":"7"},"items":[{"apiVersion":"pgwake.io/v1","kind":"PgwakeEndpoint","metadata":{"name":"demo","namespace":"pgwake","resourceVersion":"7"},"spec":{"compute":{"image":"postgres:16"}}}]}"#;

const ENDPOINT: &str = r#"{"apiVersion":"pgwake.io/v1","kind":"PgwakeEndpoint","metadata":{"name":"demo","namespace":"pgwake","resourceVersion":"8"},"spec":{"compute":{"image":"postgres:16"}}}"#;

const STATEFULSET: &str = r#"{"apiVersion":"apps/v1","kind":"StatefulSet","metadata":{"name":"pgwake-demo","namespace":"pgwake","uid":"5b0e1c6e","resourceVersion":"40","labels":{"app.kubernetes.io/managed-by":"pgwake","app.kubernetes.io/name":"pgwake-compute","pgwake.io/endpoint":"demo"}},"spec":{"replicas":1,"serviceName":"pgwake-demo","selector":{"matchLabels":{"app.kubernetes.io/managed-by":"pgwake","pgwake.io/endpoint":"demo"}},"template":{"metadata":{"labels":{"app.kubernetes.io/managed-by":"pgwake","pgwake.io/endpoint":"demo"}},"spec":{"containers":[{"name":"postgres","image":"postgres:16"}]}}},"status":{"replicas":1,"availableReplicas":1}}"#;

const POD: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"pgwake-demo-0","namespace":"pgwake","uid":"a3c1f9d2","resourceVersion":"41"},"spec":{"containers":[{"name":"postgres","image":"postgres:16"}]},"status":{"phase":"Running","podIP":"10.244.0.17","conditions":[{"type":"Ready","status":"True"}],"containerStatuses":[{"name":"postgres","image":"postgres:16","imageID":"postgres@sha256:4ec3","ready":true,"restartCount":0,"state":{"running":{}}}]}}"#;

/// Answers each request by what it asks for, and records it as "METHOD path?query". The
/// PgwakeEndpoint list waits for `released`; a StatefulSet list before that is recorded as
/// "EARLY ...".
async fn fake_api(
    listener: TcpListener,
    seen: mpsc::UnboundedSender<String>,
    released: watch::Receiver<bool>,
) {
    common::fake_http_server(listener, move |method, uri| {
        let (seen, mut released) = (seen.clone(), released.clone());
        async move {
            let method = method.as_str();
            let path = uri.split('?').next().unwrap();
            let request = format!("{method} {uri}");
            if uri.contains("watch=true") {
                seen.send(request).unwrap();
                return None;
            }
            let (status, reply) = match (method, path) {
                ("GET", "/apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints") => {
                    seen.send(request).unwrap();
                    released.wait_for(|r| *r).await.unwrap();
                    ("200 OK", ENDPOINTS.to_string())
                }
                ("GET", "/apis/apps/v1/namespaces/pgwake/statefulsets") => {
                    let early = !*released.borrow();
                    seen.send(if early {
                        format!("EARLY {request}")
                    } else {
                        request
                    })
                    .unwrap();
                    (
                        "200 OK",
                        format!(
                            r#"{{"apiVersion":"apps/v1","kind":"StatefulSetList","metadata":{{"resourceVersion":"40"}},"items":[{STATEFULSET}]}}"#
                        ),
                    )
                }
                ("GET", "/apis/apps/v1/namespaces/pgwake/statefulsets/pgwake-demo") => {
                    seen.send(request).unwrap();
                    ("200 OK", STATEFULSET.to_string())
                }
                ("GET", "/api/v1/namespaces/pgwake/pods") => {
                    seen.send(request).unwrap();
                    (
                        "200 OK",
                        format!(
                            r#"{{"apiVersion":"v1","kind":"PodList","metadata":{{"resourceVersion":"41"}},"items":[{POD}]}}"#
                        ),
                    )
                }
                (
                    "PATCH",
                    "/apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints/demo/status",
                ) => {
                    seen.send(request).unwrap();
                    ("200 OK", ENDPOINT.to_string())
                }
                _ => {
                    // Any other call (a scale, a create) is a failure of the test.
                    seen.send(format!("UNEXPECTED {request}")).unwrap();
                    ("403 Forbidden", r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":403,"reason":"Forbidden"}"#.to_string())
                }
            };
            Some((status, reply))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_manager_adopts_the_running_compute_once_the_endpoints_are_loaded() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let (release, released) = watch::channel(false);
    tokio::spawn(fake_api(listener, tx, released));

    let dir = tempfile::tempdir().unwrap();
    // The only test in this binary: nothing else reads the environment meanwhile.
    common::use_fake_kube_api(dir.path(), api);

    let mut config = Config::parse(&common::shipped_config(
        "deploy/overlays/single/pgwake.toml",
    ))
    .unwrap();
    assert!(config.compute.manager_url.is_none());
    assert!(!config.manager.leader_election);
    config.proxy.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = None;
    config.local.data_root = dir.path().join("data");
    let pgwake = Pgwake::start(config).await.unwrap();

    let first = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("no API request")
        .unwrap();
    assert_eq!(
        first,
        "GET /apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints?&limit=500"
    );
    release.send_replace(true);

    let demo = EndpointId::parse("demo").unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        pgwake.manager.wait_for_phase(&demo, Phase::Running),
    )
    .await
    .expect("the running compute was not adopted");
    let st = pgwake.manager.stats(&demo).unwrap();
    assert_eq!(
        (st.starts, st.adoptions, st.attached, st.waiting),
        (0, 1, 0, 0)
    );
    assert_eq!(st.addr.unwrap().as_str(), "10.244.0.17:5432");

    // A clean shutdown leaves the Kubernetes compute running for the next manager.
    pgwake.shutdown().await;
    let mut requests = Vec::new();
    while let Ok(r) = seen.try_recv() {
        requests.push(r);
    }
    assert!(
        requests
            .iter()
            .all(|r| !r.starts_with("UNEXPECTED") && !r.starts_with("EARLY")),
        "{requests:#?}"
    );
    for wanted in [
        "GET /apis/apps/v1/namespaces/pgwake/statefulsets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dpgwake%2Cpgwake.io%2Fendpoint",
        "GET /apis/apps/v1/namespaces/pgwake/statefulsets/pgwake-demo",
        "PATCH /apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints/demo/status?&fieldManager=pgwake",
    ] {
        assert!(requests.iter().any(|r| r == wanted), "no {wanted}: {requests:#?}");
    }
}
