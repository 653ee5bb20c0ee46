//! Answers for kube's mock API service, shared by the backend's and the elector's tests: the
//! same JSON responses and `Status` failures a real API server sends.

use http::{Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};

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
