//! The elector against kube's mock API service: each test plays the API server's side of one
//! scenario with real Lease objects and checks every request (method, path, body, and when it
//! was made on the paused test clock).

use std::collections::BTreeSet;
use std::time::Duration;

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower_test::mock;

use super::*;
use crate::kubernetes::deploy_tests::{granted, permission, Permission};
use crate::kubernetes::mock_api::{json_response, next_request, status_failure};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/pgwake/leases";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/pgwake/leases/pgwake-manager";
const QUERY: &str = "?&fieldManager=pgwake";
const ME: &str = "pgwake-manager-6d4f9-abcde";
const OTHER: &str = "pgwake-manager-6d4f9-vwxyz";

struct ApiServer {
    handle: mock::Handle<Request<Body>, Response<Body>>,
    start: Instant,
    seen: BTreeSet<Permission>,
}

struct Call {
    body: Value,
    /// When the request arrived, since the elector started.
    at: Duration,
    respond: mock::SendResponse<Response<Body>>,
}

impl Call {
    fn reply(self, code: u16, body: Value) {
        self.respond.send_response(json_response(code, &body));
    }

    fn fail(self, code: u16, reason: &str) {
        self.reply(code, status_failure(code, reason));
    }
}

impl ApiServer {
    async fn expect(&mut self, method: Method, uri: &str) -> Call {
        let (req, respond) =
            next_request(&mut self.handle, &method, uri, Duration::from_secs(60)).await;
        let needed = permission(&method, uri);
        assert!(
            granted("pgwake-manager").contains(&needed),
            "Role pgwake-manager in deploy/ does not allow {method} {uri} ({needed:?})"
        );
        self.seen.insert(needed);
        let at = self.start.elapsed();
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Call { body, at, respond }
    }

    async fn get(&mut self) -> Call {
        let call = self.expect(Method::GET, LEASE).await;
        assert_eq!(call.body, Value::Null);
        call
    }

    async fn expect_quiet(&mut self) {
        if let Ok(Some((req, _))) =
            tokio::time::timeout(Duration::from_secs(60), self.handle.next_request()).await
        {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    }
}

/// A Lease as the API server returns it.
fn lease(rv: &str, holder: Option<&str>, transitions: i32) -> Value {
    let mut spec = json!({
        "leaseDurationSeconds": 15,
        "acquireTime": "2025-03-01T10:00:00.000000Z",
        "renewTime": "2025-03-01T10:00:04.250000Z",
        "leaseTransitions": transitions,
    });
    if let Some(h) = holder {
        spec["holderIdentity"] = json!(h);
    }
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": "pgwake-manager",
            "namespace": "pgwake",
            "uid": "0c5e1a55-9d7e-4d5a-8a53-4e0c8f0a1b2c",
            "resourceVersion": rv,
            "creationTimestamp": "2025-03-01T09:00:00Z",
        },
        "spec": spec,
    })
}

/// What the API server stores from a write: the body with a new resourceVersion.
fn stored(body: &Value, rv: &str) -> Value {
    let mut v = body.clone();
    v["apiVersion"] = json!("coordination.k8s.io/v1");
    v["kind"] = json!("Lease");
    v["metadata"]["namespace"] = json!("pgwake");
    v["metadata"]["resourceVersion"] = json!(rv);
    v
}

fn micro_time(v: &Value) -> k8s_openapi::jiff::Timestamp {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    // MicroTime: RFC 3339 with exactly six fractional digits.
    assert_eq!(s.len(), "2025-03-01T10:00:00.000000Z".len(), "{s}");
    s.parse().unwrap()
}

/// Checks a write that makes us the holder; returns its spec.
fn assert_holder(body: &Value, rv: Option<&str>, transitions: i64) -> Value {
    assert_eq!(body["metadata"]["name"], "pgwake-manager", "{body}");
    assert_eq!(
        body["metadata"]["resourceVersion"],
        rv.map_or(Value::Null, |r| json!(r)),
        "{body}"
    );
    let spec = body["spec"].clone();
    assert_eq!(spec["holderIdentity"], ME, "{body}");
    assert_eq!(spec["leaseDurationSeconds"], 15, "{body}");
    assert_eq!(spec["leaseTransitions"], transitions, "{body}");
    micro_time(&spec["acquireTime"]);
    micro_time(&spec["renewTime"]);
    spec
}

struct Run {
    api: ApiServer,
    leadership: Leadership,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), LeaderError>>,
}

fn start() -> Run {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (elector, leadership) = LeaderElector::new(
        Client::new(service, "default"),
        "pgwake",
        LeaderConfig::new(ME),
    );
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(elector.run(async {
        let _ = rx.await;
    }));
    Run {
        api: ApiServer {
            handle,
            start: Instant::now(),
            seen: BTreeSet::new(),
        },
        leadership,
        stop: Some(tx),
        task,
    }
}

impl Run {
    /// Waits for the next state and checks when it came.
    async fn next_state(&mut self, want: LeaderState, at: Duration) {
        assert_eq!(self.leadership.changed().await, Some(want));
        assert_eq!(self.api.start.elapsed(), at, "{want:?}");
    }

    /// No Lease yet: the elector creates it (t = 0) and leads.
    async fn create(&mut self) -> Value {
        self.api.get().await.fail(404, "NotFound");
        let call = self
            .api
            .expect(Method::POST, &format!("{LEASES}{QUERY}"))
            .await;
        assert_eq!(call.at, Duration::ZERO);
        let spec = assert_holder(&call.body, None, 0);
        assert_eq!(spec["acquireTime"], spec["renewTime"]);
        let lease = stored(&call.body, "1");
        call.reply(201, lease.clone());
        self.next_state(LeaderState::Leading, Duration::ZERO).await;
        lease
    }
}

#[tokio::test(start_paused = true)]
async fn no_lease_creates_it_then_renews_keeping_the_term() {
    let mut run = start();
    assert_eq!(run.leadership.state(), LeaderState::Standby);
    let created = run.create().await;
    assert!(run.leadership.is_leader());

    // Renewals every retry period, each a replace with the resourceVersion just read; the
    // term (acquireTime, leaseTransitions) stays.
    let mut current = created.clone();
    for (i, rv) in ["2", "3"].into_iter().enumerate() {
        let get = run.api.get().await;
        assert_eq!(get.at, Duration::from_secs(2 * (i as u64 + 1)));
        let prev_rv = current["metadata"]["resourceVersion"].clone();
        get.reply(200, current.clone());
        let put = run
            .api
            .expect(Method::PUT, &format!("{LEASE}{QUERY}"))
            .await;
        let spec = assert_holder(&put.body, prev_rv.as_str(), 0);
        assert_eq!(spec["acquireTime"], created["spec"]["acquireTime"]);
        assert!(micro_time(&spec["renewTime"]) >= micro_time(&created["spec"]["renewTime"]));
        current = stored(&put.body, rv);
        put.reply(200, current.clone());
    }
    assert!(run.leadership.is_leader());
    run.task.abort();
}

#[tokio::test(start_paused = true)]
async fn create_conflict_means_someone_else_won() {
    let mut run = start();
    run.api.get().await.fail(404, "NotFound");
    let post = run
        .api
        .expect(Method::POST, &format!("{LEASES}{QUERY}"))
        .await;
    post.fail(409, "AlreadyExists");
    // Read again next round: the winner's Lease, fresh, so stand by.
    let get = run.api.get().await;
    assert_eq!(get.at, Duration::from_secs(2));
    get.reply(200, lease("40", Some(OTHER), 0));
    let get = run.api.get().await;
    assert_eq!(get.at, Duration::from_secs(4));
    assert_eq!(run.leadership.state(), LeaderState::Standby);
    run.task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_lease_renewed_by_another_keeps_us_on_standby() {
    let mut run = start();
    // The holder renews every 2 s, for longer than a lease duration: each read sees a new
    // version, so the local expiry clock restarts each time and no write is ever made.
    for i in 0..12u64 {
        let get = run.api.get().await;
        assert_eq!(get.at, Duration::from_secs(2 * i));
        get.reply(200, lease(&(100 + i).to_string(), Some(OTHER), 3));
        assert_eq!(run.leadership.state(), LeaderState::Standby);
    }
    // The renewTime in the record is hours old by our wall clock and does not matter: only
    // changes seen locally count. Still just reads.
    run.api.get().await.reply(200, lease("112", Some(OTHER), 3));
    run.api.get().await;
    assert_eq!(run.leadership.state(), LeaderState::Standby);
    run.task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_lease_that_stops_changing_is_taken_over_after_its_duration() {
    let mut run = start();
    // The same version at every read from t = 0 to 14 s: still within 15 s of when we first
    // saw it.
    for i in 0..8u64 {
        let get = run.api.get().await;
        assert_eq!(get.at, Duration::from_secs(2 * i));
        get.reply(200, lease("7", Some(OTHER), 3));
    }
    assert_eq!(run.leadership.state(), LeaderState::Standby);
    // At 16 s it has been unchanged for more than leaseDurationSeconds: take it over with a
    // replace that carries the version read, starting a new term.
    let get = run.api.get().await;
    assert_eq!(get.at, Duration::from_secs(16));
    get.reply(200, lease("7", Some(OTHER), 3));
    let put = run
        .api
        .expect(Method::PUT, &format!("{LEASE}{QUERY}"))
        .await;
    assert_eq!(put.at, Duration::from_secs(16));
    let spec = assert_holder(&put.body, Some("7"), 4);
    assert_eq!(spec["acquireTime"], spec["renewTime"]);
    assert_ne!(
        spec["acquireTime"],
        lease("7", None, 0)["spec"]["acquireTime"]
    );
    assert_eq!(
        put.body["metadata"]["uid"],
        lease("7", None, 0)["metadata"]["uid"]
    );
    let v = stored(&put.body, "8");
    put.reply(200, v);
    run.next_state(LeaderState::Leading, Duration::from_secs(16))
        .await;
    run.task.abort();
}

#[tokio::test(start_paused = true)]
async fn takeover_race_lost_with_409_reads_again() {
    let mut run = start();
    run.api.get().await.reply(200, lease("7", Some(OTHER), 3));
    for _ in 0..8 {
        run.api.get().await.reply(200, lease("7", Some(OTHER), 3));
    }
    run.api
        .expect(Method::PUT, &format!("{LEASE}{QUERY}"))
        .await
        .fail(409, "Conflict");
    // Another standby won: its record is new to us, so we wait a full duration again.
    let get = run.api.get().await;
    assert_eq!(get.at, Duration::from_secs(18));
    get.reply(200, lease("9", Some("pgwake-manager-third"), 4));
    let get = run.api.get().await;
    assert_eq!(get.at, Duration::from_secs(20));
    assert_eq!(run.leadership.state(), LeaderState::Standby);
    run.task.abort();
}

#[tokio::test(start_paused = true)]
async fn renew_conflict_reads_again_and_renews_the_new_version() {
    let mut run = start();
    let created = run.create().await;
    let get = run.api.get().await;
    assert_eq!(get.at, Duration::from_secs(2));
    get.reply(200, created.clone());
    let put = run
        .api
        .expect(Method::PUT, &format!("{LEASE}{QUERY}"))
        .await;
    assert_holder(&put.body, Some("1"), 0);
    put.fail(409, "Conflict");
    // Someone wrote the Lease without taking it (a label, say): read it and renew that
    // version at the next round, still within the renew deadline.
    let get = run.api.get().await;
    assert_eq!(get.at, Duration::from_secs(4));
    let mut touched = created.clone();
    touched["metadata"]["resourceVersion"] = json!("5");
    touched["metadata"]["labels"] = json!({ "team": "db" });
    get.reply(200, touched);
    let put = run
        .api
        .expect(Method::PUT, &format!("{LEASE}{QUERY}"))
        .await;
    assert_holder(&put.body, Some("5"), 0);
    assert_eq!(put.body["metadata"]["labels"]["team"], "db");
    let v = stored(&put.body, "6");
    put.reply(200, v);
    assert!(run.leadership.is_leader());
    // And the next renewal is on the usual schedule.
    let get = run.api.get().await;
    assert_eq!(get.at, Duration::from_secs(6));
    assert!(run.leadership.is_leader());
    run.task.abort();
}

#[tokio::test(start_paused = true)]
async fn renewals_failing_past_the_deadline_lose_leadership() {
    let mut run = start();
    run.create().await;
    // The API server errors at every renewal: tries at 2, 4, 6 and 8 s, then the deadline
    // (10 s after the last successful write started) ends the leadership, before anyone else
    // may take over (15 s after they last saw a change).
    for t in [2, 4, 6, 8] {
        let get = run.api.get().await;
        assert_eq!(get.at, Duration::from_secs(t));
        get.fail(500, "InternalError");
    }
    run.next_state(LeaderState::Lost, Duration::from_secs(10))
        .await;
    tokio::time::timeout(Duration::from_secs(1), run.leadership.lost())
        .await
        .expect("lost() resolves");
    match run.task.await.unwrap() {
        Err(LeaderError::RenewDeadline { lease, deadline }) => {
            assert_eq!(lease, "pgwake-manager");
            assert_eq!(deadline, Duration::from_secs(10));
        }
        other => panic!("{other:?}"),
    }
    // Nothing more: not even a release (the Lease is no longer ours to touch).
    run.api.expect_quiet().await;
    drop(run.stop.take());
}

#[tokio::test(start_paused = true)]
async fn a_hanging_renewal_is_cut_off_at_the_deadline() {
    let mut run = start();
    run.create().await;
    let get = run.api.get().await;
    assert_eq!(get.at, Duration::from_secs(2));
    // Never answered.
    let _hang = get;
    run.next_state(LeaderState::Lost, Duration::from_secs(10))
        .await;
    assert!(run.task.await.unwrap().is_err());
}

#[tokio::test(start_paused = true)]
async fn a_lease_taken_by_another_ends_leadership_at_once() {
    let mut run = start();
    run.create().await;
    let get = run.api.get().await;
    get.reply(200, lease("30", Some(OTHER), 1));
    run.next_state(LeaderState::Lost, Duration::from_secs(2))
        .await;
    match run.task.await.unwrap() {
        Err(LeaderError::TakenOver { holder, .. }) => assert_eq!(holder, OTHER),
        other => panic!("{other:?}"),
    }
    run.api.expect_quiet().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_releases_the_lease_for_a_fast_successor() {
    let mut run = start();
    let created = run.create().await;
    run.stop.take().unwrap().send(()).unwrap();
    let put = run
        .api
        .expect(Method::PUT, &format!("{LEASE}{QUERY}"))
        .await;
    assert_eq!(put.at, Duration::ZERO);
    assert_eq!(put.body["metadata"]["resourceVersion"], "1");
    let spec = &put.body["spec"];
    assert!(spec.get("holderIdentity").is_none(), "{spec}");
    assert_eq!(spec["leaseDurationSeconds"], 1);
    assert_eq!(
        spec["leaseTransitions"],
        created["spec"]["leaseTransitions"]
    );
    micro_time(&spec["renewTime"]);
    let v = stored(&put.body, "2");
    put.reply(200, v);
    run.task.await.unwrap().unwrap();
    assert_eq!(run.leadership.state(), LeaderState::Standby);
    // Every request the elector makes, over these scenarios, is what the Role grants for
    // leases: get, create, update.
    let lease_rules: BTreeSet<Permission> = granted("pgwake-manager")
        .into_iter()
        .filter(|(g, _, _)| g == "coordination.k8s.io")
        .collect();
    assert_eq!(run.api.seen, lease_rules);
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_at_once() {
    let mut run = start();
    let mut released = lease("50", None, 2);
    released["spec"]["leaseDurationSeconds"] = json!(1);
    run.api.get().await.reply(200, released);
    let put = run
        .api
        .expect(Method::PUT, &format!("{LEASE}{QUERY}"))
        .await;
    assert_eq!(put.at, Duration::ZERO);
    assert_holder(&put.body, Some("50"), 3);
    let v = stored(&put.body, "51");
    put.reply(200, v);
    run.next_state(LeaderState::Leading, Duration::ZERO).await;
    run.task.abort();
}

#[tokio::test(start_paused = true)]
async fn shutdown_on_standby_writes_nothing() {
    let mut run = start();
    run.api.get().await.reply(200, lease("7", Some(OTHER), 3));
    run.stop.take().unwrap().send(()).unwrap();
    run.task.await.unwrap().unwrap();
    run.api.expect_quiet().await;
}

#[test]
fn durations_must_stop_a_deposed_leader_before_a_successor_starts() {
    assert!(LeaderConfig::new(ME).validate().is_empty());
    let bad = LeaderConfig {
        renew_deadline: Duration::from_secs(15),
        retry_period: Duration::from_secs(20),
        ..LeaderConfig::new("")
    };
    let errs = bad.validate().join("\n");
    for needle in ["identity", "renew_deadline", "retry_period"] {
        assert!(errs.contains(needle), "{needle}: {errs}");
    }
}

const MY_POD: &str =
    "/api/v1/namespaces/pgwake/pods/pgwake-manager-6d4f9-abcde?&fieldManager=pgwake";

/// The manager's pod as the API server answers a patch of its labels.
fn manager_pod(leader: Option<&str>) -> Value {
    let mut labels = json!({
        "app.kubernetes.io/name": "pgwake",
        "app.kubernetes.io/component": "manager",
        "pod-template-hash": "6d4f9",
    });
    if let Some(v) = leader {
        labels[LABEL_LEADER] = json!(v);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": ME,
            "generateName": "pgwake-manager-6d4f9-",
            "namespace": "pgwake",
            "uid": "0f6a3c2e-8b1d-4c5e-9f7a-1b2c3d4e5f60",
            "resourceVersion": "4242",
            "labels": labels,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "pgwake-manager-6d4f9",
                "uid": "2a9b8c7d-6e5f-4a3b-8c1d-0e9f8a7b6c5d", "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "spec": { "containers": [{ "name": "pgwake", "image": "pgwake:dev" }] },
        "status": { "phase": "Running", "podIP": "10.244.0.9" }
    })
}

struct LabelRun {
    api: ApiServer,
    state: watch::Sender<LeaderState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

fn start_labelling() -> LabelRun {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (state, leadership) = Leadership::manual(LeaderState::Standby);
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(label_leader_pod(
        Client::new(service, "default"),
        "pgwake",
        ME,
        leadership,
        DEFAULT_RETRY_PERIOD,
        async {
            let _ = rx.await;
        },
    ));
    LabelRun {
        api: ApiServer {
            handle,
            start: Instant::now(),
            seen: BTreeSet::new(),
        },
        state,
        stop: Some(tx),
        task,
    }
}

impl LabelRun {
    /// The next request is a merge patch setting the leader label to `value` (null: removed).
    async fn label(&mut self, value: Value) -> Call {
        let call = self.api.expect(Method::PATCH, MY_POD).await;
        assert_eq!(
            call.body,
            json!({ "metadata": { "labels": { LABEL_LEADER: value } } })
        );
        call
    }
}

#[tokio::test(start_paused = true)]
async fn the_leader_labels_its_pod_and_a_lost_leadership_removes_the_label() {
    let mut run = start_labelling();
    // On standby at start: a label left from before a container restart goes.
    run.label(Value::Null).await.reply(200, manager_pod(None));
    run.api.expect_quiet().await;
    run.state.send_replace(LeaderState::Leading);
    let first = run.label(json!("true")).await;
    let at = first.at;
    first.fail(503, "ServiceUnavailable");
    // Tried again after the retry period.
    let again = run.label(json!("true")).await;
    assert_eq!(again.at - at, DEFAULT_RETRY_PERIOD);
    again.reply(200, manager_pod(Some("true")));
    run.api.expect_quiet().await;
    run.state.send_replace(LeaderState::Lost);
    run.label(Value::Null).await.reply(200, manager_pod(None));
    // The elector ends after a loss: nothing left to remove.
    drop(run.state);
    run.task.await.unwrap();
    run.api.expect_quiet().await;
    let pods: BTreeSet<Permission> = [("".to_string(), "pods".to_string(), "patch".to_string())]
        .into_iter()
        .collect();
    assert_eq!(run.api.seen, pods);
}

#[tokio::test(start_paused = true)]
async fn shutdown_removes_the_leader_label() {
    let mut run = start_labelling();
    run.state.send_replace(LeaderState::Leading);
    run.label(json!("true"))
        .await
        .reply(200, manager_pod(Some("true")));
    run.stop.take().unwrap().send(()).unwrap();
    run.label(Value::Null).await.reply(200, manager_pod(None));
    run.task.await.unwrap();
    run.api.expect_quiet().await;
}
