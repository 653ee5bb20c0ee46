//! A pageserver management API for tests, on 127.0.0.1:0: it checks every request against
//! the published OpenAPI spec's shapes (method and path, JSON body, required fields, types,
//! id and LSN formats, unknown fields) and records each deviation, keeps timelines with
//! their ancestry in memory, behaves as the pageserver does where the spec is silent (an
//! unknown ancestor is a 500, a branch LSN is aligned to 8), and fails on request.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::ids::{Lsn, TenantId, TimelineId};

/// The calls the fake tells apart, for faults and counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Get,
    List,
    Create,
    Delete,
}

/// What the fake does instead of (or after) the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status with an error body, changing nothing.
    Status(u16),
    /// Do the call, then answer this status (the answer to a call that did its work is lost).
    AfterDone(u16),
    /// Never answer (the client's timeout ends the call).
    Hang,
}

#[derive(Debug, Clone)]
pub struct FakeTimeline {
    pub ancestor: Option<(TimelineId, Lsn)>,
    pub last_record_lsn: Lsn,
    /// Deletion accepted; the next DELETE finds it gone.
    pub deleting: bool,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub path: String,
    pub authorization: Option<String>,
    pub body: Option<Value>,
}

#[derive(Default)]
struct State {
    timelines: BTreeMap<(TenantId, TimelineId), FakeTimeline>,
    tenants: Vec<TenantId>,
    faults: BTreeMap<Op, VecDeque<Fault>>,
    received: Vec<Received>,
    violations: Vec<String>,
    token: Option<String>,
    /// Timelines whose compute keeps writing: each call moves their last record on.
    writing: Vec<(TenantId, TimelineId)>,
}

/// The running fake; stops when dropped.
pub struct FakePageserver {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _stop: oneshot::Sender<()>,
}

impl FakePageserver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, stopped) = oneshot::channel::<()>();
        let s = state.clone();
        tokio::spawn(crate::serve_http(
            listener,
            "fake pageserver",
            move |req| {
                let s = s.clone();
                async move { handle(&s, req).await }
            },
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            state,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls must carry `Authorization: Bearer <token>` (else 401).
    pub fn require_token(&self, token: &str) {
        self.state.lock().unwrap().token = Some(token.into());
    }

    /// A tenant with a root timeline whose last record is at `lsn`.
    pub fn add_tenant(&self, tenant: TenantId, timeline: TimelineId, lsn: Lsn) {
        let mut s = self.state.lock().unwrap();
        s.tenants.push(tenant);
        s.timelines.insert(
            (tenant, timeline),
            FakeTimeline {
                ancestor: None,
                last_record_lsn: lsn,
                deleting: false,
            },
        );
    }

    /// WAL arrived on `timeline`.
    pub fn advance(&self, tenant: TenantId, timeline: TimelineId, lsn: Lsn) {
        let mut s = self.state.lock().unwrap();
        s.timelines
            .get_mut(&(tenant, timeline))
            .unwrap()
            .last_record_lsn = lsn;
    }

    /// `timeline`'s compute keeps writing: every call that follows sees a later last record
    /// LSN than the one before.
    pub fn keep_writing(&self, tenant: TenantId, timeline: TimelineId) {
        self.state.lock().unwrap().writing.push((tenant, timeline));
    }

    pub fn fail_next(&self, op: Op, fault: Fault) {
        let mut s = self.state.lock().unwrap();
        s.faults.entry(op).or_default().push_back(fault);
    }

    pub fn timeline(&self, tenant: TenantId, timeline: TimelineId) -> Option<FakeTimeline> {
        self.state
            .lock()
            .unwrap()
            .timelines
            .get(&(tenant, timeline))
            .cloned()
    }

    pub fn timeline_count(&self) -> usize {
        self.state.lock().unwrap().timelines.len()
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// How many calls of `op` arrived (refused ones included).
    pub fn count(&self, op: Op) -> usize {
        self.received()
            .iter()
            .filter(|r| classify(&r.method, &r.path).map(|(o, ..)| o) == Some(op))
            .count()
    }

    /// Every way a request differed from the spec; tests assert it is empty.
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }
}

fn reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn error(status: u16, msg: &str) -> Response<Full<Bytes>> {
    reply(status, json!({ "msg": msg }))
}

/// The operation and path parameters of a request, if its method and path are in the spec.
fn classify(method: &Method, path: &str) -> Option<(Op, String, Option<String>)> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::GET, ["v1", "tenant", t, "timeline"]) => Some((Op::List, t.to_string(), None)),
        (&Method::POST, ["v1", "tenant", t, "timeline"]) => Some((Op::Create, t.to_string(), None)),
        (&Method::GET, ["v1", "tenant", t, "timeline", tl]) => {
            Some((Op::Get, t.to_string(), Some(tl.to_string())))
        }
        (&Method::DELETE, ["v1", "tenant", t, "timeline", tl]) => {
            Some((Op::Delete, t.to_string(), Some(tl.to_string())))
        }
        _ => None,
    }
}

/// `TimelineCreateRequest` as the spec writes it: field → the check of its value.
fn check_create_body(body: &Value, violations: &mut Vec<String>) {
    let Some(obj) = body.as_object() else {
        violations.push(format!("create: body is not an object: {body}"));
        return;
    };
    let hex = |v: &Value| v.as_str().is_some_and(|s| TimelineId::parse(s).is_ok());
    let lsn = |v: &Value| v.as_str().is_some_and(|s| Lsn::parse(s).is_ok());
    let int = |v: &Value| v.is_u64() || v.is_i64();
    let boolean = |v: &Value| v.is_boolean();
    let object = |v: &Value| v.is_object();
    type Check<'a> = &'a dyn Fn(&Value) -> bool;
    let fields: [(&str, Check); 7] = [
        ("new_timeline_id", &hex),
        ("ancestor_timeline_id", &hex),
        ("ancestor_start_lsn", &lsn),
        ("pg_version", &int),
        ("read_only", &boolean),
        ("existing_initdb_timeline_id", &hex),
        ("import_pgdata", &object),
    ];
    if !obj.contains_key("new_timeline_id") {
        violations.push("create: required new_timeline_id missing".into());
    }
    for (k, v) in obj {
        match fields.iter().find(|(name, _)| name == k) {
            None => violations.push(format!("create: unknown field {k}")),
            Some((_, ok)) if !ok(v) => violations.push(format!("create: {k} has a bad value {v}")),
            Some(_) => {}
        }
    }
}

/// The spec's `TimelineInfo`, every required field present.
fn info(tenant: TenantId, id: TimelineId, t: &FakeTimeline) -> Value {
    let mut v = json!({
        "timeline_id": id.to_string(),
        "tenant_id": tenant.to_string(),
        "last_record_lsn": t.last_record_lsn.to_string(),
        "disk_consistent_lsn": t.last_record_lsn.to_string(),
        "remote_consistent_lsn": "0/0",
        "state": "Active",
        "min_readable_lsn": t.ancestor.map_or(t.last_record_lsn, |(_, l)| l).to_string(),
        // Not in the spec, but sent by real pageservers: clients must ignore extra fields.
        "pg_version": 160000,
    });
    if let Some((a, l)) = t.ancestor {
        v["ancestor_timeline_id"] = json!(a.to_string());
        v["ancestor_lsn"] = json!(l.to_string());
    }
    v
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let json_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let query = req.uri().query().map(String::from);
    let bytes = match Limited::new(req.into_body(), 64 << 10).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(400, "body too large"),
    };
    let body: Option<Value> = if bytes.is_empty() {
        None
    } else {
        serde_json::from_slice(&bytes).ok()
    };

    let fault = {
        let mut s = state.lock().unwrap();
        s.received.push(Received {
            method: method.clone(),
            path: path.clone(),
            authorization: authorization.clone(),
            body: body.clone(),
        });
        let Some((op, tenant, timeline)) = classify(&method, &path) else {
            s.violations
                .push(format!("{method} {path}: not in the spec"));
            return error(404, "no such route");
        };
        let mut bad = Vec::new();
        if query.is_some() {
            bad.push(format!("{method} {path}: unexpected query {query:?}"));
        }
        if TenantId::parse(&tenant).is_err() {
            bad.push(format!("{method} {path}: tenant id is not 32 hex digits"));
        }
        if timeline
            .as_ref()
            .is_some_and(|t| TimelineId::parse(t).is_err())
        {
            bad.push(format!("{method} {path}: timeline id is not 32 hex digits"));
        }
        match (op, &body) {
            (Op::Create, Some(b)) => {
                if !json_type {
                    bad.push("create: content-type is not application/json".into());
                }
                check_create_body(b, &mut bad);
            }
            (Op::Create, None) => bad.push("create: no JSON body".into()),
            (_, Some(_)) => bad.push(format!("{method} {path}: unexpected body")),
            (_, None) if !bytes.is_empty() => bad.push(format!("{method} {path}: body")),
            _ => {}
        }
        if !bad.is_empty() {
            s.violations.extend(bad);
            return error(400, "request does not match the spec");
        }
        if let Some(t) = &s.token {
            if authorization.as_deref() != Some(&format!("Bearer {t}")) {
                return error(401, "missing or bad token");
            }
        }
        s.faults.get_mut(&op).and_then(|q| q.pop_front())
    };
    match fault {
        Some(Fault::Status(code)) => return error(code, "injected failure"),
        Some(Fault::Hang) => std::future::pending::<()>().await,
        Some(Fault::AfterDone(_)) | None => {}
    }
    let resp = apply(state, &method, &path, body.as_ref());
    match fault {
        Some(Fault::AfterDone(code)) => error(code, "injected failure after the work"),
        _ => resp,
    }
}

/// The pageserver's behaviour for one request that passed the checks.
fn apply(
    state: &Arc<Mutex<State>>,
    method: &Method,
    path: &str,
    body: Option<&Value>,
) -> Response<Full<Bytes>> {
    let mut s = state.lock().unwrap();
    for key in s.writing.clone() {
        if let Some(t) = s.timelines.get_mut(&key) {
            t.last_record_lsn = Lsn::new(t.last_record_lsn.value() + 0x100).unwrap();
        }
    }
    let (op, tenant, timeline) = classify(method, path).unwrap();
    let tenant = TenantId::parse(&tenant).unwrap();
    let timeline = timeline.map(|t| TimelineId::parse(&t).unwrap());
    if !s.tenants.contains(&tenant) {
        return match op {
            // The handler turns a missing tenant into 412 on delete.
            Op::Delete => error(412, "Requested tenant is missing"),
            _ => error(404, &format!("NotFound: tenant {tenant}")),
        };
    }
    match op {
        Op::Get => match timeline.and_then(|t| s.timelines.get(&(tenant, t)).map(|x| (t, x))) {
            Some((t, x)) if !x.deleting => reply(200, info(tenant, t, x)),
            _ => error(404, "NotFound: Timeline not found"),
        },
        Op::List => reply(
            200,
            Value::Array(
                s.timelines
                    .iter()
                    .filter(|((te, _), x)| *te == tenant && !x.deleting)
                    .map(|((_, t), x)| info(tenant, *t, x))
                    .collect(),
            ),
        ),
        Op::Create => {
            let b = body.unwrap();
            let id = TimelineId::parse(b["new_timeline_id"].as_str().unwrap()).unwrap();
            let Some(ancestor) = b["ancestor_timeline_id"]
                .as_str()
                .map(|a| TimelineId::parse(a).unwrap())
            else {
                return error(500, "bootstrap is not faked");
            };
            let Some(parent) = s.timelines.get(&(tenant, ancestor)).cloned() else {
                return error(
                    500,
                    "Cannot branch off the timeline that's not present in pageserver",
                );
            };
            let lsn = match b["ancestor_start_lsn"].as_str() {
                None => parent.last_record_lsn,
                Some(l) => {
                    let l = Lsn::parse(l).unwrap();
                    let aligned = Lsn::new((l.value() + 7) & !7).unwrap();
                    if parent.ancestor.is_some_and(|(_, a)| a > aligned) {
                        return error(406, "invalid start lsn: less than timeline ancestor lsn");
                    }
                    // The real one waits for the WAL, then times out with a 406.
                    if aligned > parent.last_record_lsn {
                        return error(406, "timed out waiting for the WAL");
                    }
                    aligned
                }
            };
            if let Some(existing) = s.timelines.get(&(tenant, id)) {
                return if existing.ancestor == Some((ancestor, lsn)) {
                    reply(201, info(tenant, id, existing))
                } else {
                    error(409, "timeline already exists with different parameters")
                };
            }
            let t = FakeTimeline {
                ancestor: Some((ancestor, lsn)),
                last_record_lsn: lsn,
                deleting: false,
            };
            let resp = reply(201, info(tenant, id, &t));
            s.timelines.insert((tenant, id), t);
            resp
        }
        Op::Delete => {
            let t = timeline.unwrap();
            let has_children = s
                .timelines
                .iter()
                .any(|((te, _), x)| *te == tenant && x.ancestor.is_some_and(|(a, _)| a == t));
            match s.timelines.get_mut(&(tenant, t)) {
                None => error(404, "NotFound: Timeline not found"),
                Some(x) if x.deleting => {
                    s.timelines.remove(&(tenant, t));
                    error(404, "NotFound: Timeline not found")
                }
                Some(_) if has_children => error(412, "timeline has child timelines"),
                Some(x) => {
                    x.deleting = true;
                    reply(202, Value::Null)
                }
            }
        }
    }
}
