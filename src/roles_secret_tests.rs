//! [`SecretRoles`] driven the way pgwake drives it: the CRD sync reports endpoints, the
//! Secrets come from kube's mock API as a real API server sends them (base64 `data`, `Status`
//! failures).

use std::future::Future;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::watcher::Event;
use kube::Client;
use pgwake_proxy::scram::Verifier;
use pgwake_proxy::verifiers::Lookup;
use pgwake_router::crd::{CrdSync, PgwakeEndpoint};
use pgwake_router::RoutingTable;
use serde_json::{json, Value};
use tower_test::mock;

use super::*;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

const WAIT: Duration = Duration::from_secs(10);

fn id(s: &str) -> EndpointId {
    EndpointId::parse(s).unwrap()
}

fn verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

fn endpoint(name: &str, extra: Value) -> PgwakeEndpoint {
    let mut spec = json!({ "compute": { "image": "postgres:16" } });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(json!({
        "apiVersion": "pgwake.io/v1",
        "kind": "PgwakeEndpoint",
        "metadata": { "name": name, "namespace": "pgwake", "uid": format!("uid-{name}"),
                      "resourceVersion": "1" },
        "spec": spec,
    }))
    .unwrap()
}

/// A Secret as `kubectl get secret -o json` shows it: every value base64 in `data`.
fn secret(name: &str, data: &[(&str, &str)]) -> Value {
    let b64 = |s: &str| serde_json::to_value(ByteString(s.as_bytes().to_vec())).unwrap();
    let data: serde_json::Map<String, Value> =
        data.iter().map(|(k, v)| (k.to_string(), b64(v))).collect();
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": { "name": name, "namespace": "pgwake", "resourceVersion": "7" },
        "data": data,
    })
}

fn status_failure(code: u16, reason: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{reason} (test)"), "reason": reason, "code": code,
    })
}

fn respond(send: mock::SendResponse<Response<Body>>, code: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(StatusCode::from_u16(code).unwrap())
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

struct Fixture {
    handle: Handle,
    table: RoutingTable,
    store: Arc<VerifierStore>,
    secrets: Arc<SecretRoles>,
    sync: CrdSync,
}

fn fixture() -> Fixture {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "pgwake");
    let store = VerifierStore::new();
    let secrets = SecretRoles::new(Api::namespaced(client, "pgwake"), Arc::clone(&store), true);
    Fixture {
        handle,
        table: RoutingTable::new(),
        store,
        sync: CrdSync::with_auth(Arc::clone(&secrets) as Arc<dyn AuthSink>),
        secrets,
    }
}

impl Fixture {
    fn apply(&mut self, ep: PgwakeEndpoint) {
        self.sync.apply(&self.table, Event::Apply(ep));
    }

    /// Runs `pass` while answering each Secret `get` it makes, in order, with `answers`
    /// (`(name, code, body)`); the pass must make exactly these requests.
    async fn answer<F: Future<Output = ()>>(&mut self, pass: F, answers: Vec<(&str, u16, Value)>) {
        let handle = &mut self.handle;
        let serve = async move {
            for (name, code, body) in answers {
                let (req, send) = tokio::time::timeout(WAIT, handle.next_request())
                    .await
                    .expect("a Secret request")
                    .expect("client alive");
                // `get` of that one Secret: what the proxy's Role grants, by name.
                assert_eq!(req.method(), Method::GET);
                assert_eq!(
                    req.uri().to_string(),
                    format!("/api/v1/namespaces/pgwake/secrets/{name}")
                );
                respond(send, code, &body);
            }
        };
        tokio::time::timeout(WAIT, futures::future::join(pass, serve))
            .await
            .expect("pass done");
    }

    fn lookup(&self, endpoint: &str, role: &str) -> Option<Lookup> {
        self.store.lookup(&id(endpoint), role)
    }
}

fn known(v: &str) -> Option<Lookup> {
    Some(Lookup::Known(v.parse::<Verifier>().unwrap()))
}

#[test]
fn roles_come_from_the_named_key_and_bad_secrets_say_why_without_secrets() {
    let (a, b) = (verifier("a"), verifier("b"));
    let text = format!("\"alice\" \"{a}\"\n\"bob\" \"{b}\"\n");
    let data = |k: &str, v: &[u8]| BTreeMap::from([(k.to_string(), ByteString(v.to_vec()))]);
    let r = |key: Option<&str>| RolesSecretRef {
        name: "db-roles".into(),
        key: key.map(String::from),
    };
    let roles = roles_from_secret(&r(None), &data("roles", text.as_bytes())).unwrap();
    assert_eq!(roles.len(), 2);
    assert_eq!(roles["alice"].to_string(), a);
    let roles = roles_from_secret(&r(Some("verifiers")), &data("verifiers", text.as_bytes()));
    assert_eq!(roles.unwrap().len(), 2);

    assert_eq!(
        roles_from_secret(&r(None), &data("other", text.as_bytes())),
        Err(SecretError::NoKey {
            name: "db-roles".into(),
            key: "roles".into()
        })
    );
    assert!(matches!(
        roles_from_secret(&r(None), &data("roles", b"\xff\xfe")),
        Err(SecretError::NotText { .. })
    ));
    let bad = format!("\"alice\" \"{a}\"\n\"bob\" {b}\n\"carol\" \"md5abc\"\n");
    let err = roles_from_secret(&r(None), &data("roles", bad.as_bytes())).unwrap_err();
    let SecretError::Malformed { errors, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(errors.len(), 2, "{err}");
    assert!(err.revokes());
    let text = err.to_string();
    assert!(
        text.contains("db-roles") && text.contains("line 2"),
        "{text}"
    );
    assert!(!text.contains("SCRAM-SHA-256$4096"), "{text}");
    assert!(!SecretError::Unavailable {
        name: "x".into(),
        reason: "timed out".into()
    }
    .revokes());
}

/// The whole life of an endpoint's roles: routed with scram before its Secret is read (no
/// login yet), the Secret read (the role logs in), changed (the new verifier), gone (404:
/// nobody), and an API server failure that keeps what was last read.
#[tokio::test]
async fn an_endpoint_follows_its_roles_secret() {
    let mut f = fixture();
    let (v1, v2) = (verifier("one"), verifier("two"));
    f.apply(endpoint(
        "shop",
        json!({ "rolesSecret": { "name": "shop-roles" } }),
    ));
    assert!(f.table.lookup(&id("shop")).is_some());
    // Routed and scram at once: until the Secret is read every login fails like a wrong
    // password (the mock exchange), nothing reaches the compute.
    assert_eq!(f.lookup("shop", "alice"), Some(Lookup::UnknownRole));

    let s = Arc::clone(&f.secrets);
    let body = secret("shop-roles", &[("roles", &format!("\"alice\" \"{v1}\"\n"))]);
    f.answer(s.refresh(false), vec![("shop-roles", 200, body)])
        .await;
    assert_eq!(f.lookup("shop", "alice"), known(&v1));
    assert_eq!(f.lookup("shop", "mallory"), Some(Lookup::UnknownRole));

    // Nothing changed in the resource (a status update): nothing is due, no request.
    f.apply(endpoint(
        "shop",
        json!({ "rolesSecret": { "name": "shop-roles" } }),
    ));
    let s = Arc::clone(&f.secrets);
    f.answer(s.refresh(false), vec![]).await;

    // The password changed in the Secret: the next periodic pass reads it.
    let s = Arc::clone(&f.secrets);
    let body = secret("shop-roles", &[("roles", &format!("\"alice\" \"{v2}\"\n"))]);
    f.answer(s.refresh(true), vec![("shop-roles", 200, body)])
        .await;
    assert_eq!(f.lookup("shop", "alice"), known(&v2));

    // The API server fails: the roles last read stay.
    let s = Arc::clone(&f.secrets);
    let body = status_failure(503, "ServiceUnavailable");
    f.answer(s.refresh(true), vec![("shop-roles", 503, body)])
        .await;
    assert_eq!(f.lookup("shop", "alice"), known(&v2));

    // The Secret is deleted: nobody logs in any more.
    let s = Arc::clone(&f.secrets);
    let body = status_failure(404, "NotFound");
    f.answer(s.refresh(true), vec![("shop-roles", 404, body)])
        .await;
    assert_eq!(f.lookup("shop", "alice"), Some(Lookup::UnknownRole));

    // The PgwakeEndpoint is deleted: the store forgets it.
    f.sync.apply(
        &f.table,
        Event::Delete(endpoint(
            "shop",
            json!({ "rolesSecret": { "name": "shop-roles" } }),
        )),
    );
    assert_eq!(f.lookup("shop", "alice"), None);
    assert!(f.table.lookup(&id("shop")).is_none());
}

/// A missing Secret from the start, a forbidden one and a malformed one: the endpoint routes,
/// and every login is refused. Endpoints sharing a Secret cause one `get`; another key and
/// a passthrough endpoint need none.
#[tokio::test]
async fn unusable_secrets_refuse_every_login() {
    let mut f = fixture();
    let v = verifier("pw");
    f.apply(endpoint(
        "missing",
        json!({ "rolesSecret": { "name": "nope" } }),
    ));
    f.apply(endpoint(
        "denied",
        json!({ "rolesSecret": { "name": "other-app" } }),
    ));
    for ep in ["broken", "broken2"] {
        f.apply(endpoint(ep, json!({ "rolesSecret": { "name": "broken" } })));
    }
    f.apply(endpoint(
        "open",
        json!({ "auth": "passthrough", "rolesSecret": { "name": "nope" } }),
    ));
    f.apply(endpoint("plain", json!({})));
    // The order of the reads follows a map's: answer by name. A second get of a Secret would
    // find no answer, and the pass would time out.
    let s = Arc::clone(&f.secrets);
    let mut answers: BTreeMap<&str, (u16, Value)> = BTreeMap::from([
        ("nope", (404, status_failure(404, "NotFound"))),
        ("other-app", (403, status_failure(403, "Forbidden"))),
        (
            "broken",
            (200, secret("broken", &[("roles", &format!("alice {v}\n"))])),
        ),
    ]);
    let handle = &mut f.handle;
    let serve = async move {
        while !answers.is_empty() {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), Method::GET);
            let uri = req.uri().to_string();
            let name = uri
                .strip_prefix("/api/v1/namespaces/pgwake/secrets/")
                .unwrap();
            let (code, body) = answers.remove(name).expect("one get per Secret");
            respond(send, code, &body);
        }
    };
    tokio::time::timeout(WAIT, futures::future::join(s.refresh(false), serve))
        .await
        .unwrap();
    for ep in ["missing", "denied", "broken", "broken2"] {
        assert!(f.table.lookup(&id(ep)).is_some(), "{ep} is routed");
        assert_eq!(f.lookup(ep, "alice"), Some(Lookup::UnknownRole), "{ep}");
    }
    assert_eq!(f.lookup("open", "alice"), Some(Lookup::Passthrough));
    assert_eq!(f.lookup("plain", "alice"), Some(Lookup::Passthrough));

    // Pointed at another Secret (and key): read at once.
    f.apply(endpoint(
        "missing",
        json!({ "rolesSecret": { "name": "found", "key": "verifiers" } }),
    ));
    let s = Arc::clone(&f.secrets);
    let body = secret("found", &[("verifiers", &format!("\"alice\" \"{v}\"\n"))]);
    f.answer(s.refresh(false), vec![("found", 200, body)]).await;
    assert_eq!(f.lookup("missing", "alice"), known(&v));
}

/// A proxy started with `[auth] roles_secrets = false` reads nothing, and its scram endpoints
/// refuse every login rather than letting it through.
#[tokio::test]
async fn without_reading_secrets_scram_endpoints_refuse_logins() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let store = VerifierStore::new();
    let secrets = SecretRoles::new(
        Api::namespaced(Client::new(service, "pgwake"), "pgwake"),
        Arc::clone(&store),
        false,
    );
    let table = RoutingTable::new();
    let mut sync = CrdSync::with_auth(Arc::clone(&secrets) as Arc<dyn AuthSink>);
    sync.apply(
        &table,
        Event::Apply(endpoint("shop", json!({ "rolesSecret": { "name": "r" } }))),
    );
    secrets.refresh(true).await;
    assert_eq!(
        store.lookup(&id("shop"), "alice"),
        Some(Lookup::UnknownRole)
    );
    drop(secrets);
    drop(sync);
    assert!(handle.next_request().await.is_none(), "no request made");
}
