//! Answers for kube's mock API service, shared by the backend's and the elector's tests: the
//! same JSON responses and `Status` failures a real API server sends.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock;

pub(crate) fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

/// A `metav1.Status` failure, as the API server returns with 4xx/5xx codes.
pub(crate) fn status_failure(code: u16, reason: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("{reason} (test)"),
        "reason": reason,
        "code": code,
    })
}

pub(crate) type ApiHandle = mock::Handle<Request<Body>, Response<Body>>;

/// The client's next request, which must be `method uri`, with the means to answer it. The
/// wait is in the test's clock (paused tests auto-advance through it).
pub(crate) async fn next_request(
    handle: &mut ApiHandle,
    method: &Method,
    uri: &str,
    wait: Duration,
) -> (Request<Body>, mock::SendResponse<Response<Body>>) {
    let (req, respond) = tokio::time::timeout(wait, handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request; expected {method} {uri}"))
        .expect("client gone");
    assert_eq!(
        (req.method(), req.uri().to_string().as_str()),
        (method, uri),
        "unexpected request"
    );
    (req, respond)
}
