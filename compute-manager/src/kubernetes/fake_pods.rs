//! The API server's pods, for the backend's tests: a store of real Pod JSON objects that
//! answers list and watch requests by URL, as an API server does, with resourceVersions, label
//! and field selectors, bookmarks and 410 Gone for an expired watch. A shared watch makes the
//! order of pod requests among the backend's other requests unpredictable, so these are
//! answered here, and every other request goes on to the test in order ([`route`]).
//!
//! A watch request is answered once there are events after its resourceVersion, with those
//! events and a bookmark, and then ends (as API servers end watches at `timeoutSeconds`); the
//! client then watches again from the bookmark. Until then it is held open, as a real watch
//! is: counting requests counts watch connections.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower_test::mock;

use super::mock_api::{json_response, status_failure, ApiHandle};

/// The pods of namespace `pgwake`, as the collection's path.
pub(crate) const PODS: &str = "/api/v1/namespaces/pgwake/pods";

/// A request the test answers itself, in order.
pub(crate) type Pending = (Request<Body>, mock::SendResponse<Response<Body>>);

#[derive(Default)]
pub(crate) struct PodServer {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The latest resourceVersion of the namespace's pods.
    rv: u64,
    pods: BTreeMap<String, Value>,
    /// Every change: resourceVersion, event type, the object then.
    history: Vec<(u64, &'static str, Value)>,
    /// Watches from a resourceVersion older than this are answered 410 Gone.
    oldest: u64,
    held: Vec<Held>,
    /// Failures to answer the next lists with (code, reason).
    list_failures: VecDeque<(u16, &'static str)>,
    lists: usize,
    watches: usize,
    /// Every request served, for the Role checks.
    requests: Vec<(Method, String)>,
}

struct Held {
    rv: u64,
    selector: Selector,
    bookmarks: bool,
    respond: mock::SendResponse<Response<Body>>,
}

/// What a request's `labelSelector` and `fieldSelector` ask for.
#[derive(Debug, Clone, Default)]
struct Selector {
    /// Label key and, for `key=value`, the value (`key` alone: the label exists).
    labels: Vec<(String, Option<String>)>,
    name: Option<String>,
}

impl Selector {
    fn matches(&self, pod: &Value) -> bool {
        let meta = &pod["metadata"];
        if self.name.as_ref().is_some_and(|n| meta["name"] != *n) {
            return false;
        }
        self.labels
            .iter()
            .all(|(k, v)| match (&meta["labels"][k], v) {
                (Value::String(have), Some(want)) => have == want,
                (Value::String(_), None) => true,
                _ => false,
            })
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).expect("a UTF-8 query")
}

/// The query's parameters, decoded.
fn params(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn selector(params: &BTreeMap<String, String>) -> Selector {
    let mut s = Selector::default();
    if let Some(labels) = params.get("labelSelector") {
        for term in labels.split(',').filter(|t| !t.is_empty()) {
            let (k, v) = match term.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (term, None),
            };
            s.labels.push((k.to_string(), v));
        }
    }
    if let Some(fields) = params.get("fieldSelector") {
        for term in fields.split(',') {
            match term.split_once('=') {
                Some(("metadata.name", name)) => s.name = Some(name.to_string()),
                _ => panic!("field selector {term} not served here"),
            }
        }
    }
    s
}

fn watch_response(lines: &[Value]) -> Response<Body> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    Response::builder()
        .status(StatusCode::OK)
        .body(Body::from(text.into_bytes()))
        .unwrap()
}

impl PodServer {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Whether this serves `req`: a list or watch of the namespace's pods.
    fn serves(req: &Request<Body>) -> bool {
        req.method() == Method::GET && req.uri().path() == PODS
    }

    fn serve(&self, req: Request<Body>, respond: mock::SendResponse<Response<Body>>) {
        let params = params(req.uri());
        let selector = selector(&params);
        let mut inner = self.lock();
        inner
            .requests
            .push((req.method().clone(), req.uri().to_string()));
        if params.get("watch").map(String::as_str) == Some("true") {
            inner.watches += 1;
            let rv = params
                .get("resourceVersion")
                .and_then(|rv| rv.parse().ok())
                .expect("a watch from a resourceVersion");
            let held = Held {
                rv,
                selector,
                bookmarks: params.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
                respond,
            };
            if let Some(held) = inner.answer(held) {
                inner.held.push(held);
            }
            return;
        }
        inner.lists += 1;
        if let Some((code, reason)) = inner.list_failures.pop_front() {
            respond.send_response(json_response(code, &status_failure(code, reason)));
            return;
        }
        let items: Vec<Value> = inner
            .pods
            .values()
            .filter(|p| selector.matches(p))
            .cloned()
            .collect();
        respond.send_response(json_response(
            200,
            &json!({
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": { "resourceVersion": inner.rv.to_string() },
                "items": items,
            }),
        ));
    }

    /// Creates or replaces pod `pod` (by its name), with a new resourceVersion.
    pub(crate) fn put(&self, mut pod: Value) {
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = pod["metadata"]["name"].as_str().unwrap().to_string();
        let kind = if inner.pods.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        inner.pods.insert(name, pod.clone());
        inner.history.push((rv, kind, pod));
        inner.flush();
    }

    /// Deletes pod `name` (its last state goes out in the DELETED event).
    pub(crate) fn delete(&self, name: &str) {
        let mut inner = self.lock();
        let mut pod = inner.pods.remove(name).expect("no such pod");
        inner.rv += 1;
        pod["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let rv = inner.rv;
        inner.history.push((rv, "DELETED", pod));
        inner.flush();
    }

    /// The API server forgets the history so far (its watch cache was compacted, or it
    /// restarted): open watches end with 410 Gone, and so does any from an older
    /// resourceVersion; a client must list again.
    pub(crate) fn expire(&self) {
        let mut inner = self.lock();
        inner.oldest = inner.rv + 1;
        let gone = json!({ "type": "ERROR", "object": status_failure(410, "Expired") });
        for held in std::mem::take(&mut inner.held) {
            held.respond
                .send_response(watch_response(std::slice::from_ref(&gone)));
        }
    }

    /// The next `n` lists fail with `code`.
    pub(crate) fn fail_lists(&self, code: u16, reason: &'static str, n: usize) {
        self.lock()
            .list_failures
            .extend(std::iter::repeat_n((code, reason), n));
    }

    /// Lists of pods served so far.
    pub(crate) fn lists(&self) -> usize {
        self.lock().lists
    }

    /// Watch requests of pods so far: each one a watch connection while it is open.
    pub(crate) fn watches(&self) -> usize {
        self.lock().watches
    }

    /// The pod requests so far, for the Role checks.
    pub(crate) fn requests(&self) -> Vec<(Method, String)> {
        self.lock().requests.clone()
    }
}

impl Inner {
    /// Answers `held` if there is something to tell it, else gives it back.
    fn answer(&mut self, held: Held) -> Option<Held> {
        if held.rv < self.oldest {
            let gone = json!({ "type": "ERROR", "object": status_failure(410, "Expired") });
            held.respond.send_response(watch_response(&[gone]));
            return None;
        }
        let mut lines: Vec<Value> = self
            .history
            .iter()
            .filter(|(rv, _, pod)| *rv > held.rv && held.selector.matches(pod))
            .map(|(_, kind, pod)| json!({ "type": kind, "object": pod }))
            .collect();
        if lines.is_empty() {
            return Some(held);
        }
        if held.bookmarks {
            lines.push(json!({
                "type": "BOOKMARK",
                "object": {
                    "kind": "Pod",
                    "apiVersion": "v1",
                    "metadata": { "resourceVersion": self.rv.to_string() },
                },
            }));
        }
        held.respond.send_response(watch_response(&lines));
        None
    }

    fn flush(&mut self) {
        for held in std::mem::take(&mut self.held) {
            if let Some(held) = self.answer(held) {
                self.held.push(held);
            }
        }
    }
}

/// Serves the client's requests from `handle`: pod lists and watches from `pods`, everything
/// else goes to `others`, in order. Ends when the client or the test is gone.
pub(crate) async fn route(
    mut handle: ApiHandle,
    pods: Arc<PodServer>,
    others: mpsc::UnboundedSender<Pending>,
) {
    while let Some((req, respond)) = handle.next_request().await {
        if PodServer::serves(&req) {
            pods.serve(req, respond);
        } else if others.send((req, respond)).is_err() {
            return;
        }
    }
}
