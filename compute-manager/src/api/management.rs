//! The management routes: `POST /v1/endpoints` creates an endpoint (a branch with `parent`),
//! `DELETE /v1/endpoints/{id}[?remove_data=true]` deletes one created that way. Both need
//! `Authorization: Bearer <token>` with the configured management token (401 otherwise). With
//! no token configured they are off (403 `management_disabled`): creating databases and
//! deleting data is not something an unauthenticated internal API should do by default, and a
//! 403 that says why is clearer than a 404 that looks like an older pgwake.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use pgwake_router::EndpointId;

use super::server::{error, json};
use super::types::{ApiErrorKind, MAX_CREATE_BYTES};
use crate::provision::{CreateBody, Endpoints, ProvisionError, ProvisionErrorKind};

/// The management side of the API: the endpoints service and the token that guards it.
#[derive(Clone)]
pub struct Management {
    pub endpoints: Arc<Endpoints>,
    pub token: ApiToken,
}

/// The bearer token of the management routes. Never printed.
#[derive(Clone)]
pub struct ApiToken(Arc<[u8]>);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    /// `None` for an empty token: an empty secret would let an empty header in.
    pub fn new(token: &str) -> Option<Self> {
        let t = token.trim();
        (!t.is_empty()).then(|| Self(t.as_bytes().into()))
    }

    /// Whether an `Authorization` header value carries this token. The comparison takes the
    /// same time wherever the first difference is (only the length can be told apart).
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let given = given.trim_ascii();
        if given.len() != self.0.len() {
            return false;
        }
        given
            .iter()
            .zip(self.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

fn status_of(kind: ProvisionErrorKind) -> StatusCode {
    match kind {
        ProvisionErrorKind::InvalidRequest => StatusCode::UNPROCESSABLE_ENTITY,
        ProvisionErrorKind::UnknownEndpoint => StatusCode::NOT_FOUND,
        ProvisionErrorKind::Duplicate
        | ProvisionErrorKind::Configured
        | ProvisionErrorKind::Busy
        | ProvisionErrorKind::Conflict => StatusCode::CONFLICT,
        ProvisionErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ProvisionErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
        ProvisionErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ProvisionErrorKind::CopyFailed | ProvisionErrorKind::Internal => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

fn provision_error(e: &ProvisionError) -> Response<Full<Bytes>> {
    let kind = e.kind();
    if matches!(
        kind,
        ProvisionErrorKind::Internal | ProvisionErrorKind::CopyFailed | ProvisionErrorKind::NoSpace
    ) {
        tracing::error!(error = %e, kind = kind.as_str(), "management request failed");
    }
    error(
        status_of(kind),
        ApiErrorKind::Provision(kind),
        kind.retryable(),
        e.user_message(),
    )
}

/// The management side if the request may use it, else the response refusing it.
// The refusal is the response itself, built once per refused request.
#[allow(clippy::result_large_err)]
fn authorise<'a>(
    req: &Request<Incoming>,
    mgmt: Option<&'a Management>,
) -> Result<&'a Management, Response<Full<Bytes>>> {
    let Some(m) = mgmt else {
        return Err(error(
            StatusCode::FORBIDDEN,
            ApiErrorKind::ManagementDisabled,
            false,
            "the management API is off: set [api] management_token_file (or management_token) \
             in pgwake's config"
                .into(),
        ));
    };
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if m.token.accepts(header) {
        return Ok(m);
    }
    let mut resp = error(
        StatusCode::UNAUTHORIZED,
        ApiErrorKind::Unauthorized,
        false,
        "missing or wrong bearer token".into(),
    );
    resp.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Bearer"),
    );
    Err(resp)
}

pub(super) async fn create(
    req: Request<Incoming>,
    mgmt: Option<&Management>,
) -> Response<Full<Bytes>> {
    let m = match authorise(&req, mgmt) {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let bad = |message: String| {
        error(
            StatusCode::BAD_REQUEST,
            ApiErrorKind::BadRequest,
            false,
            message,
        )
    };
    let body = match Limited::new(req.into_body(), MAX_CREATE_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad(format!("unreadable body: {e}")),
    };
    // An empty body is a new endpoint with every default.
    let body: CreateBody = if body.iter().all(u8::is_ascii_whitespace) {
        CreateBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return bad(format!("invalid request body: {e}")),
        }
    };
    match m.endpoints.create(body).await {
        Ok(created) => json(StatusCode::CREATED, &created),
        Err(e) => provision_error(&e),
    }
}

pub(super) async fn delete(
    req: Request<Incoming>,
    mgmt: Option<&Management>,
    id: &str,
) -> Response<Full<Bytes>> {
    let m = match authorise(&req, mgmt) {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let id = match EndpointId::parse(id) {
        Ok(id) => id,
        Err(e) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                ApiErrorKind::BadEndpoint,
                false,
                format!("invalid endpoint id: {e}"),
            )
        }
    };
    let mut remove_data = false;
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("remove_data", "true" | "1" | "") => remove_data = true,
            ("remove_data", "false" | "0") => remove_data = false,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    ApiErrorKind::BadRequest,
                    false,
                    format!("unknown query parameter {pair:?} (remove_data=true|false)"),
                )
            }
        }
    }
    match m.endpoints.delete(&id, remove_data).await {
        Ok(()) => json(
            StatusCode::OK,
            &serde_json::json!({ "deleted": id.to_string(), "data_removed": remove_data }),
        ),
        Err(e) => provision_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        let t = ApiToken::new("s3cret-token\n").unwrap();
        assert!(t.accepts(Some(b"Bearer s3cret-token")));
        for wrong in [
            &b"Bearer s3cret-tokeN"[..],
            b"Bearer s3cret-toke",
            b"Bearer s3cret-token2",
            b"Bearer ",
            b"bearer s3cret-token",
            b"Basic s3cret-token",
            b"s3cret-token",
            b"",
        ] {
            assert!(
                !t.accepts(Some(wrong)),
                "{:?}",
                String::from_utf8_lossy(wrong)
            );
        }
        assert!(!t.accepts(None));
        assert!(ApiToken::new("").is_none() && ApiToken::new(" \n").is_none());
        assert_eq!(format!("{t:?}"), "ApiToken(..)", "never printed");
    }
}
