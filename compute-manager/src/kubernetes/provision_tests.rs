//! Endpoints and Neon branches made on request: the resources built from a parent (the
//! example in deploy/examples), and the calls against kube's mock API service answering with
//! real Kubernetes JSON, each checked against the manager's Roles in deploy/. The branch
//! tests run the fake pageserver next to it.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::Client;
use pgwake_router::crd::PgwakeEndpoint;
use pgwake_router::EndpointId;
use serde::Deserialize;
use serde_json::{json, Value};
use tower_test::mock;

use super::deploy_tests::{granted, permission};
use super::mock_api::{json_response, next_request, status_failure};
use super::provision::*;
use super::{KubernetesConfig, NeonConfig};
use crate::neon::fake_pageserver::{FakePageserver, Fault, Op};
use crate::neon::{Lsn, NeonBranchErrorKind, NeonBrancher, PageserverClient, TenantId, TimelineId};

const NS: &str = "pgwake";
const ENDPOINTS: &str = "/apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints";
const CREATE: &str = "/apis/pgwake.io/v1/namespaces/pgwake/pgwakeendpoints?&fieldManager=pgwake";
/// The Roles that run the compute manager (scale-out, single pod).
const MANAGER_ROLES: [&str; 2] = ["pgwake-manager", "pgwake"];
/// deploy/examples/neon-endpoint.yaml's ids.
const TENANT: &str = "de200bd42b49cc1814412c7e592dd6e9";
const MAIN: &str = "0d8f5a0e5c2b1e4f8f6a3b2c1d0e9f8a";

/// 'static, so that calls joined with the API server's script can borrow it.
fn id(s: &str) -> &'static EndpointId {
    Box::leak(Box::new(EndpointId::parse(s).unwrap()))
}

fn example(file: &str) -> Value {
    let path = format!("{}/../deploy/examples/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    let found = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .find(|v| v["kind"] == "PgwakeEndpoint");
    found.unwrap()
}

/// The example Neon endpoint as the API server returns it, with a label to carry over.
fn neon_main() -> Value {
    let mut v = example("neon-endpoint.yaml");
    v["metadata"]["uid"] = json!("6f1c8a52-3d2e-4b7a-9e0f-1a2b3c4d5e6f");
    v["metadata"]["resourceVersion"] = json!("4100");
    v["metadata"]["generation"] = json!(1);
    v["metadata"]["creationTimestamp"] = json!("2026-11-30T01:00:00Z");
    v["metadata"]["labels"] = json!({ "tier": "dev" });
    v
}

fn typed(v: &Value) -> PgwakeEndpoint {
    serde_json::from_value(v.clone()).unwrap()
}

/// What the API server answers a create with: the object, with the server's fields.
fn created(body: &Value) -> Value {
    let mut v = body.clone();
    v["metadata"]["uid"] = json!("0b7e4d1c-8a9f-4c3b-a2d1-e0f9a8b7c6d5");
    v["metadata"]["resourceVersion"] = json!("4200");
    v["metadata"]["generation"] = json!(1);
    v["metadata"]["creationTimestamp"] = json!("2026-11-30T02:00:00Z");
    v
}

fn cfg() -> KubernetesConfig {
    KubernetesConfig {
        namespace: Some(NS.into()),
        retry_backoff: Duration::from_millis(1),
        ..KubernetesConfig::default()
    }
}

/// The API server's side.
struct ApiServer {
    handle: mock::Handle<Request<Body>, Response<Body>>,
}

struct Call {
    body: Value,
    respond: mock::SendResponse<Response<Body>>,
}

impl Call {
    fn reply(self, code: u16, body: &Value) {
        self.respond.send_response(json_response(code, body));
    }

    fn fail(self, code: u16, reason: &str) {
        self.reply(code, &status_failure(code, reason));
    }
}

impl ApiServer {
    fn new() -> (Client, Self) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(service, "default"), Self { handle })
    }

    /// The next request, which must be `method uri` and allowed by the manager's Roles.
    async fn expect(&mut self, method: Method, uri: &str) -> Call {
        let (req, respond) =
            next_request(&mut self.handle, &method, uri, Duration::from_secs(30)).await;
        let needed = permission(&method, uri);
        for role in MANAGER_ROLES {
            assert!(
                granted(role).contains(&needed),
                "Role {role} in deploy/ does not allow {method} {uri} ({needed:?})"
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

    async fn get(&mut self, name: &str) -> Call {
        self.expect(Method::GET, &format!("{ENDPOINTS}/{name}"))
            .await
    }

    async fn delete(&mut self, name: &str) -> Call {
        self.expect(Method::DELETE, &format!("{ENDPOINTS}/{name}?"))
            .await
    }

    /// No further request within a short wait (the client is done).
    async fn quiet(&mut self) {
        let next = tokio::time::timeout(Duration::from_millis(100), self.handle.next_request());
        if let Ok(Some((req, _))) = next.await {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    }
}

#[test]
fn a_branch_copies_the_parents_compute_and_points_at_the_new_timeline() {
    let parent = typed(&neon_main());
    let timeline = TimelineId::generate().to_string();
    let b = branch_endpoint(&parent, id("dev"), &timeline, Some("0/16B5A50")).unwrap();
    assert_eq!(b.metadata.name.as_deref(), Some("dev"));
    assert_eq!(b.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(b.spec.compute, parent.spec.compute);
    assert_eq!(b.spec.compute.command, ["/shell/compute.sh"]);
    assert_eq!(b.spec.compute.port, Some(55433));
    assert_eq!(b.spec.idle_timeout, parent.spec.idle_timeout);
    assert_eq!(b.spec.auth, parent.spec.auth);
    let (pn, bn) = (parent.spec.neon.unwrap(), b.spec.neon.clone().unwrap());
    assert_eq!(bn.tenant_id, TENANT);
    assert_eq!(bn.timeline_id, timeline);
    assert_eq!(bn.pageserver_connstring, pn.pageserver_connstring);
    let labels = b.metadata.labels.clone().unwrap();
    assert_eq!(
        labels,
        BTreeMap::from([
            ("tier".to_string(), "dev".to_string()),
            (LABEL_PARENT.to_string(), "neon-main".to_string()),
        ])
    );
    let annotations = b.metadata.annotations.clone().unwrap();
    assert_eq!(annotations[ANNOTATION_PARENT_TIMELINE], MAIN);
    assert_eq!(annotations[ANNOTATION_BRANCH_LSN], "0/16B5A50");
    // It routes as the router will read it, with the new timeline in the compute's env.
    let route = b.endpoint_config().unwrap();
    assert_eq!(&route.id, id("dev"));
    // Nothing of the parent's server-side metadata is copied.
    assert!(b.metadata.uid.is_none() && b.metadata.resource_version.is_none());
}

#[test]
fn only_neon_endpoints_branch_and_only_routable_specs_are_created() {
    let postgres = typed(&example("postgres-endpoint.yaml"));
    let e = branch_endpoint(&postgres, id("dev"), MAIN, None).unwrap_err();
    assert_eq!(e.kind(), ProvisionErrorKind::NotNeon, "{e}");
    assert_eq!(e.kind().source(), crate::ErrorSource::Client);

    let mut spec = postgres.spec.clone();
    spec.compute.image = " ".into();
    spec.allowlist = vec!["not-a-network".into()];
    let e = new_endpoint(id("x"), spec, BTreeMap::new(), NS).unwrap_err();
    assert_eq!(e.kind(), ProvisionErrorKind::Invalid);
    let msg = e.client_message();
    assert!(
        msg.contains("image") && msg.contains("not-a-network"),
        "{msg}"
    );

    let labels = BTreeMap::from([("tier".to_string(), "dev".to_string())]);
    let ep = new_endpoint(id("x"), postgres.spec.clone(), labels.clone(), NS).unwrap();
    assert_eq!(ep.metadata.labels, Some(labels));
    assert_eq!(ep.spec, postgres.spec);
}

#[tokio::test]
async fn create_maps_the_api_servers_refusals() {
    let (client, mut api) = ApiServer::new();
    let r = EndpointResources::new(client, &cfg());
    let ep = new_endpoint(id("demo"), typed(&neon_main()).spec, BTreeMap::new(), NS).unwrap();
    let (results, ()) = tokio::join!(
        async {
            let mut out = Vec::new();
            for _ in 0..4 {
                out.push(r.create(&ep).await.map_err(|e| e.kind()));
            }
            out
        },
        async {
            let call = api.expect(Method::POST, CREATE).await;
            assert_eq!(call.body["metadata"]["name"], "demo");
            assert_eq!(call.body["kind"], "PgwakeEndpoint");
            assert_eq!(call.body["spec"]["neon"]["tenantId"], TENANT);
            let body = created(&call.body);
            call.reply(201, &body);
            api.expect(Method::POST, CREATE)
                .await
                .fail(409, "AlreadyExists");
            api.expect(Method::POST, CREATE)
                .await
                .fail(403, "Forbidden");
            api.expect(Method::POST, CREATE).await.fail(422, "Invalid");
            api.quiet().await;
        }
    );
    assert!(results[0].is_ok(), "{results:?}");
    assert_eq!(
        results[1..],
        [
            Err(ProvisionErrorKind::AlreadyExists),
            Err(ProvisionErrorKind::Forbidden),
            Err(ProvisionErrorKind::Invalid),
        ]
    );
}

#[tokio::test]
async fn a_retried_create_takes_the_resource_its_lost_answer_made() {
    let (client, mut api) = ApiServer::new();
    let r = EndpointResources::new(client, &cfg());
    let ep = new_endpoint(id("demo"), typed(&neon_main()).spec, BTreeMap::new(), NS).unwrap();
    let (result, ()) = tokio::join!(r.create(&ep), async {
        let call = api.expect(Method::POST, CREATE).await;
        let stored = created(&call.body);
        call.fail(504, "Timeout");
        api.expect(Method::POST, CREATE)
            .await
            .fail(409, "AlreadyExists");
        api.get("demo").await.reply(200, &stored);
        api.quiet().await;
    });
    assert_eq!(
        result.unwrap().metadata.uid.as_deref(),
        Some("0b7e4d1c-8a9f-4c3b-a2d1-e0f9a8b7c6d5")
    );

    // Someone else's resource under that name is a duplicate, retried or not.
    let (result, ()) = tokio::join!(r.create(&ep), async {
        api.expect(Method::POST, CREATE)
            .await
            .fail(503, "ServiceUnavailable");
        api.expect(Method::POST, CREATE)
            .await
            .fail(409, "AlreadyExists");
        let mut other = neon_main();
        other["metadata"]["name"] = json!("demo");
        other["spec"]["idleTimeout"] = json!("1h");
        api.get("demo").await.reply(200, &other);
        api.quiet().await;
    });
    assert_eq!(
        result.unwrap_err().kind(),
        ProvisionErrorKind::AlreadyExists
    );
}

#[tokio::test]
async fn unavailable_api_gives_up_after_the_configured_tries() {
    let (client, mut api) = ApiServer::new();
    let r = EndpointResources::new(
        client,
        &KubernetesConfig {
            api_retries: 2,
            ..cfg()
        },
    );
    let (result, ()) = tokio::join!(r.delete(id("demo")), async {
        for _ in 0..3 {
            api.delete("demo").await.fail(503, "ServiceUnavailable");
        }
        api.quiet().await;
    });
    let e = result.unwrap_err();
    assert_eq!(e.kind(), ProvisionErrorKind::Unavailable, "{e}");
    assert!(e.retryable());
    assert!(
        !e.client_message().contains("test"),
        "no API text for clients"
    );

    let (result, ()) = tokio::join!(r.delete(id("demo")), async {
        api.delete("demo").await.fail(404, "NotFound");
    });
    assert_eq!(result.unwrap_err().kind(), ProvisionErrorKind::NotFound);
}

/// A brancher on the mock API and a fake pageserver holding the example's tenant.
async fn brancher() -> (NeonBrancher, ApiServer, FakePageserver) {
    let fake = FakePageserver::start().await;
    let (tenant, main) = (
        TenantId::parse(TENANT).unwrap(),
        TimelineId::parse(MAIN).unwrap(),
    );
    fake.add_tenant(tenant, main, Lsn::parse("0/16B5A50").unwrap());
    let pageserver = PageserverClient::new(&NeonConfig {
        retry_backoff: Duration::from_millis(5),
        ..NeonConfig::new(fake.url())
    })
    .unwrap();
    let (client, api) = ApiServer::new();
    let cfg = KubernetesConfig {
        neon: Some(NeonConfig::new(fake.url())),
        ..cfg()
    };
    (
        NeonBrancher::new(pageserver, client, &cfg).unwrap(),
        api,
        fake,
    )
}

fn tenant() -> TenantId {
    TenantId::parse(TENANT).unwrap()
}

#[tokio::test]
async fn a_branch_is_a_timeline_then_a_resource_that_serves_it() {
    let (b, mut api, fake) = brancher().await;
    let lsn = Lsn::parse("0/1000000").unwrap();
    let (result, sent) = tokio::join!(
        b.create_branch(id("neon-main"), id("dev"), Some(lsn)),
        async {
            api.get("neon-main").await.reply(200, &neon_main());
            api.get("dev").await.fail(404, "NotFound");
            let call = api.expect(Method::POST, CREATE).await;
            let sent = call.body.clone();
            let body = created(&call.body);
            call.reply(201, &body);
            api.quiet().await;
            sent
        }
    );
    let made = result.unwrap();
    assert_eq!(made.tenant, tenant());
    assert_eq!(made.parent_timeline, TimelineId::parse(MAIN).unwrap());
    assert_eq!(made.ancestor_lsn, Some(lsn));
    // The resource serves the timeline the pageserver now has, as a child of main.
    assert_eq!(
        sent["spec"]["neon"]["timelineId"],
        made.timeline.to_string()
    );
    assert_eq!(sent["metadata"]["labels"][LABEL_PARENT], "neon-main");
    let t = fake.timeline(tenant(), made.timeline).unwrap();
    assert_eq!(t.ancestor, Some((made.parent_timeline, lsn)));
    // The new timeline takes its Postgres version from its ancestor.
    let post = fake
        .received()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(
        post.body.unwrap(),
        json!({
            "new_timeline_id": made.timeline.to_string(),
            "ancestor_timeline_id": MAIN,
            "ancestor_start_lsn": "0/1000000",
        })
    );
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[tokio::test]
async fn a_refused_resource_takes_its_timeline_with_it() {
    for (code, reason, kind) in [
        (409, "AlreadyExists", NeonBranchErrorKind::Duplicate),
        (403, "Forbidden", NeonBranchErrorKind::Internal),
    ] {
        let (b, mut api, fake) = brancher().await;
        let (result, ()) = tokio::join!(b.create_branch(id("neon-main"), id("dev"), None), async {
            api.get("neon-main").await.reply(200, &neon_main());
            // Free when checked; taken (or refused) by the time of the create.
            api.get("dev").await.fail(404, "NotFound");
            api.expect(Method::POST, CREATE).await.fail(code, reason);
            api.quiet().await;
        });
        let e = result.unwrap_err();
        assert_eq!(e.kind(), kind, "{e}");
        assert_eq!(fake.count(Op::Create), 1);
        assert_eq!(
            fake.timeline_count(),
            1,
            "the new timeline is deleted again"
        );
        assert!(fake.count(Op::Delete) >= 1);
        assert!(fake.violations().is_empty(), "{:?}", fake.violations());
        assert!(
            !e.client_message().contains("test"),
            "{}",
            e.client_message()
        );
    }
}

#[tokio::test]
async fn a_resource_create_without_an_answer_is_looked_up_before_it_is_undone() {
    // Every try of the create fails (6 = api_retries + 1); the resource is then read.
    for made in [true, false] {
        let (b, mut api, fake) = brancher().await;
        let (result, ()) = tokio::join!(b.create_branch(id("neon-main"), id("dev"), None), async {
            api.get("neon-main").await.reply(200, &neon_main());
            api.get("dev").await.fail(404, "NotFound");
            let mut stored = Value::Null;
            for _ in 0..6 {
                let call = api.expect(Method::POST, CREATE).await;
                stored = created(&call.body);
                call.fail(503, "ServiceUnavailable");
            }
            let get = api.get("dev").await;
            if made {
                get.reply(200, &stored);
            } else {
                get.fail(404, "NotFound");
            }
            api.quiet().await;
        });
        if made {
            let branch = result.unwrap();
            assert!(fake.timeline(tenant(), branch.timeline).is_some());
            assert_eq!(fake.timeline_count(), 2);
        } else {
            assert_eq!(result.unwrap_err().kind(), NeonBranchErrorKind::Unavailable);
            assert_eq!(fake.timeline_count(), 1, "undone");
        }
    }
}

#[tokio::test]
async fn a_create_that_storage_never_confirms_is_undone_too() {
    let (b, mut api, fake) = brancher().await;
    // Done, but every answer lost: the brancher cannot know, so it deletes the id it chose.
    fake.fail_next(Op::Create, Fault::AfterDone(503));
    for _ in 0..5 {
        fake.fail_next(Op::Create, Fault::Status(503));
    }
    let (result, ()) = tokio::join!(b.create_branch(id("neon-main"), id("dev"), None), async {
        api.get("neon-main").await.reply(200, &neon_main());
        api.get("dev").await.fail(404, "NotFound");
        api.quiet().await;
    });
    assert_eq!(result.unwrap_err().kind(), NeonBranchErrorKind::Unavailable);
    assert_eq!(fake.timeline_count(), 1, "nothing half-created");
}

#[tokio::test]
async fn bad_parents_and_taken_ids_touch_no_storage() {
    let (b, mut api, fake) = brancher().await;
    let (result, ()) = tokio::join!(b.create_branch(id("nope"), id("dev"), None), async {
        api.get("nope").await.fail(404, "NotFound");
    });
    let e = result.unwrap_err();
    assert_eq!(e.kind(), NeonBranchErrorKind::UnknownParent, "{e}");
    assert_eq!(e.kind().http_status(), 404);

    let (result, ()) = tokio::join!(b.create_branch(id("neon-main"), id("dev"), None), async {
        api.get("neon-main").await.reply(200, &neon_main());
        api.get("dev").await.reply(200, &neon_main());
    });
    assert_eq!(result.unwrap_err().kind(), NeonBranchErrorKind::Duplicate);

    let (result, ()) = tokio::join!(b.create_branch(id("demo"), id("dev"), None), async {
        let mut pg = example("postgres-endpoint.yaml");
        pg["metadata"]["uid"] = json!("1e2d3c4b-5a69-4788-9a0b-1c2d3e4f5a6b");
        api.get("demo").await.reply(200, &pg);
    });
    assert_eq!(result.unwrap_err().kind(), NeonBranchErrorKind::Invalid);

    let (result, ()) = tokio::join!(b.create_branch(id("neon-main"), id("dev"), None), async {
        let mut bad = neon_main();
        bad["spec"]["neon"]["timelineId"] = json!("main");
        api.get("neon-main").await.reply(200, &bad);
    });
    let e = result.unwrap_err();
    assert_eq!(e.kind(), NeonBranchErrorKind::Invalid, "{e}");
    assert!(
        !e.client_message().contains("main\""),
        "{}",
        e.client_message()
    );
    api.quiet().await;
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn delete_removes_the_resource_then_on_request_its_timeline() {
    let (b, mut api, fake) = brancher().await;
    let child = TimelineId::generate();
    let mut dev = neon_main();
    dev["metadata"]["name"] = json!("dev");
    dev["spec"]["neon"]["timelineId"] = json!(child.to_string());
    // The branch's timeline, made the way a branch makes it.
    let pageserver = PageserverClient::new(&NeonConfig::new(fake.url())).unwrap();
    pageserver
        .create_branch(&crate::neon::BranchRequest {
            tenant: tenant(),
            new_timeline_id: child,
            ancestor_timeline_id: TimelineId::parse(MAIN).unwrap(),
            ancestor_start_lsn: None,
            pg_version: None,
        })
        .await
        .unwrap();

    // main has a branch: refused before anything is deleted.
    let (result, ()) = tokio::join!(b.delete(id("neon-main"), true), async {
        api.get("neon-main").await.reply(200, &neon_main());
        api.quiet().await;
    });
    let e = result.unwrap_err();
    assert_eq!(e.kind(), NeonBranchErrorKind::HasBranches, "{e}");
    assert_eq!(e.kind().http_status(), 409);
    assert_eq!(fake.count(Op::Delete), 0);

    let (result, ()) = tokio::join!(b.delete(id("dev"), true), async {
        api.get("dev").await.reply(200, &dev);
        let call = api.delete("dev").await;
        call.reply(200, &dev);
        api.quiet().await;
    });
    assert_eq!(result.unwrap().timeline, Some((tenant(), child)));
    assert!(fake.timeline(tenant(), child).is_none());

    // Without remove_timeline, storage is not asked at all.
    let before = fake.received().len();
    let (result, ()) = tokio::join!(b.delete(id("neon-main"), false), async {
        api.get("neon-main").await.reply(200, &neon_main());
        api.delete("neon-main").await.reply(200, &neon_main());
        api.quiet().await;
    });
    assert_eq!(result.unwrap().timeline, None);
    assert_eq!(fake.received().len(), before);

    let (result, ()) = tokio::join!(b.delete(id("gone"), false), async {
        api.get("gone").await.fail(404, "NotFound");
    });
    assert_eq!(result.unwrap_err().kind(), NeonBranchErrorKind::NotFound);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[tokio::test]
async fn create_endpoint_creates_the_callers_spec() {
    let (b, mut api, fake) = brancher().await;
    let spec = typed(&example("postgres-endpoint.yaml")).spec;
    let (result, sent) = tokio::join!(
        b.create_endpoint(id("fresh"), spec.clone(), BTreeMap::new()),
        async {
            let call = api.expect(Method::POST, CREATE).await;
            let sent = call.body.clone();
            let body = created(&call.body);
            call.reply(201, &body);
            sent
        }
    );
    assert_eq!(result.unwrap().spec, spec);
    assert_eq!(typed(&sent).spec, spec);
    assert!(fake.received().is_empty());
}

#[test]
fn the_readmes_neon_table_is_valid() {
    let path = format!("{}/../deploy/README.md", env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(path).unwrap();
    let section = readme.split("## Branches on Neon").nth(1).unwrap();
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap();
    let table: toml::Table = toml::from_str(block).unwrap();
    let k: KubernetesConfig = table["kubernetes"].clone().try_into().unwrap();
    let neon = k.neon.clone().unwrap();
    assert_eq!(neon.pageserver_api, "http://pageserver.neon.svc:9898");
    assert!(neon.pageserver_token_file.is_some());
    assert_eq!(k.validate(), Vec::<String>::new());
}

#[test]
fn the_endpoint_selector_is_read_as_kubernetes_reads_it() {
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let all = EndpointSelector::parse(None).unwrap();
    assert!(all.matches(&BTreeMap::new()));
    assert_eq!(EndpointSelector::parse(Some(" ")).unwrap(), all);

    let s = EndpointSelector::parse(Some(
        "tier=dev, team==db,env in (a, b),zone notin (x),!legacy,owner,stage!=prod",
    ))
    .unwrap();
    let good = labels(&[
        ("tier", "dev"),
        ("team", "db"),
        ("env", "b"),
        ("zone", "y"),
        ("owner", "me"),
    ]);
    assert!(s.matches(&good));
    for (k, v) in [
        ("tier", "prod"),
        ("env", "c"),
        ("zone", "x"),
        ("legacy", "1"),
        ("stage", "prod"),
    ] {
        let mut l = good.clone();
        l.insert(k.into(), v.into());
        assert!(!s.matches(&l), "{k}={v}");
    }
    let mut no_owner = good.clone();
    no_owner.remove("owner");
    assert!(!s.matches(&no_owner));

    // Equality terms are added to a new endpoint's labels; others must be met by the caller.
    let s = EndpointSelector::parse(Some("tier=dev,env in (staging)")).unwrap();
    assert_eq!(
        s.complete(labels(&[("app", "x")])).unwrap(),
        labels(&[("app", "x"), ("tier", "dev"), ("env", "staging")])
    );
    let e = s.complete(labels(&[("tier", "prod")])).unwrap_err();
    assert!(e.contains("tier") && !e.contains("env"), "{e}");
    let s = EndpointSelector::parse(Some("owner")).unwrap();
    assert!(s.complete(BTreeMap::new()).unwrap_err().contains("owner"));

    for bad in ["a in b", "x=1,(", "a b", "a in (b"] {
        assert!(EndpointSelector::parse(Some(bad)).is_err(), "{bad}");
    }
}

#[tokio::test]
async fn only_the_installations_endpoints_are_branched_made_and_deleted() {
    let fake = FakePageserver::start().await;
    let (client, mut api) = ApiServer::new();
    let cfg = KubernetesConfig {
        endpoint_selector: Some("tier=dev".into()),
        neon: Some(NeonConfig::new(fake.url())),
        ..cfg()
    };
    let b = NeonBrancher::from_config(client, &cfg).unwrap();
    let mut other = neon_main();
    other["metadata"]["labels"] = json!({ "tier": "prod" });

    let (result, ()) = tokio::join!(b.create_branch(id("neon-main"), id("dev"), None), async {
        api.get("neon-main").await.reply(200, &other);
    });
    assert_eq!(
        result.unwrap_err().kind(),
        NeonBranchErrorKind::UnknownParent
    );

    let (result, ()) = tokio::join!(b.delete(id("neon-main"), true), async {
        api.get("neon-main").await.reply(200, &other);
        api.quiet().await;
    });
    assert_eq!(result.unwrap_err().kind(), NeonBranchErrorKind::NotFound);

    let spec = typed(&example("postgres-endpoint.yaml")).spec;
    let (result, sent) = tokio::join!(
        b.create_endpoint(id("fresh"), spec, BTreeMap::new()),
        async {
            let call = api.expect(Method::POST, CREATE).await;
            let sent = call.body.clone();
            let body = created(&call.body);
            call.reply(201, &body);
            sent
        }
    );
    result.unwrap();
    assert_eq!(sent["metadata"]["labels"], json!({ "tier": "dev" }));
    assert!(fake.received().is_empty());

    let (client, _api) = ApiServer::new();
    let e = NeonBrancher::from_config(
        client,
        &KubernetesConfig {
            neon: None,
            ..cfg.clone()
        },
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), NeonBranchErrorKind::Internal);
}

/// The management API's side: `POST /v1/endpoints` with a Neon parent goes through
/// [`crate::provision::KubernetesProvisioner`] to the brancher, and the result is routed.
#[tokio::test]
async fn the_management_service_branches_neon_endpoints_and_deletes_them() {
    use crate::provision::{
        ConnectInfo, CreateBody, Endpoints, KubernetesProvisioner, ProvisionErrorKind, Provisioners,
    };
    use pgwake_router::{Route, RoutingTable};
    use std::sync::Arc;

    let (b, mut api, fake) = brancher().await;
    let table = Arc::new(RoutingTable::new());
    table.upsert(Route::from(typed(&neon_main()).endpoint_config().unwrap()));
    let manager = crate::Manager::new(
        crate::ManagerConfig::default(),
        crate::Backends::default(),
        crate::ManagerMetrics::new(&prometheus::Registry::new()).unwrap(),
    );
    let endpoints = Endpoints::new(
        Arc::clone(&table),
        Arc::clone(&manager),
        Provisioners {
            local: None,
            kubernetes: Some(Arc::new(KubernetesProvisioner::new(
                b,
                Arc::clone(&manager),
                Duration::from_secs(5),
            ))),
        },
        ConnectInfo {
            host: "db.example.com".into(),
            port: 5432,
            domain: None,
            user: "postgres".into(),
            dbname: "postgres".into(),
        },
        Vec::new(),
    );
    let body = |json: Value| serde_json::from_value::<CreateBody>(json).unwrap();

    // Refused before any call: a malformed LSN, and a new endpoint with no parent.
    let (bad_lsn, no_parent, ()) = tokio::join!(
        endpoints.create(body(
            json!({"parent": "neon-main", "id": "dev", "lsn": "zz"})
        )),
        endpoints.create(body(json!({"id": "dev", "backend": "kubernetes"}))),
        api.quiet()
    );
    assert_eq!(
        bad_lsn.unwrap_err().kind(),
        ProvisionErrorKind::InvalidRequest
    );
    assert_eq!(
        no_parent.unwrap_err().kind(),
        ProvisionErrorKind::InvalidRequest
    );
    assert!(fake.received().is_empty());

    let (made, ()) = tokio::join!(
        endpoints.create(body(
            json!({"parent": "neon-main", "id": "dev", "lsn": "0/1000000"})
        )),
        async {
            api.get("neon-main").await.reply(200, &neon_main());
            api.get("dev").await.fail(404, "NotFound");
            let call = api.expect(Method::POST, CREATE).await;
            let body = created(&call.body);
            call.reply(201, &body);
            api.quiet().await;
        }
    );
    let made = made.unwrap();
    assert_eq!(made.id, "dev");
    assert!(made.connection_uri.contains("endpoint%3Ddev"), "{made:?}");
    let route = table
        .lookup(id("dev"))
        .expect("the branch is routed at once");
    assert!(matches!(
        route.backend,
        pgwake_router::BackendSpec::Kubernetes { .. }
    ));
    assert_eq!(fake.count(Op::Create), 1);

    // Storage down: 503 to the caller, retryable, nothing routed.
    for _ in 0..20 {
        fake.fail_next(Op::Create, Fault::Status(503));
    }
    let (down, ()) = tokio::join!(
        endpoints.create(body(json!({"parent": "neon-main", "id": "dev2"}))),
        async {
            api.get("neon-main").await.reply(200, &neon_main());
            api.get("dev2").await.fail(404, "NotFound");
        }
    );
    let e = down.unwrap_err();
    assert_eq!(e.kind(), ProvisionErrorKind::Unavailable, "{e}");
    assert!(e.kind().retryable());
    assert!(table.lookup(id("dev2")).is_none());

    // Delete: the resource goes and the route with it.
    let dev = created(&{
        let mut v = neon_main();
        v["metadata"]["name"] = json!("dev");
        v
    });
    let (deleted, ()) = tokio::join!(endpoints.delete(id("dev"), false), async {
        api.get("dev").await.reply(200, &dev);
        api.delete("dev").await.reply(200, &dev);
        api.quiet().await;
    });
    deleted.unwrap();
    assert!(table.lookup(id("dev")).is_none());
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}
