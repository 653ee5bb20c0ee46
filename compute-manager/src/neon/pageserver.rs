//! A client of the pageserver's management API, for the two calls a branch needs: create a
//! timeline as a branch of another, and delete one. Shapes, status codes and retry rules are
//! those of the pageserver's published OpenAPI spec (`pageserver/src/http/openapi_spec.yml`):
//!
//! - `POST /v1/tenant/{tenant_id}/timeline` with `TimelineCreateRequest` (`new_timeline_id`
//!   required; `ancestor_timeline_id`, `ancestor_start_lsn`, `pg_version` optional) answers 201
//!   and a `TimelineInfo`, also when the timeline already exists with the same parameters:
//!   creation is idempotent by `new_timeline_id`, and "the caller must retry the creation
//!   until success". 409 means it exists with different parameters, 406 "permanently
//!   unsatisfiable" (an LSN before the ancestor's branch point or below its GC cutoff), 429 "a
//!   creation for the same id is in progress, back off and retry", 503 unavailable (a tenant
//!   activating or shutting down). Error bodies are `{"msg": "..."}`.
//! - `DELETE /v1/tenant/{tenant_id}/timeline/{timeline_id}` accepts (202) and deletes in the
//!   background; 404 "is the success path", 409 "deletion already in progress, continue
//!   polling", 412 "tenant missing, or timeline has children"; "500 and 409 should be
//!   retried".
//! - An unknown ancestor is no documented status (the pageserver answers a 500), so a branch
//!   first reads the ancestor (`GET .../timeline/{id}`, 404 when absent): a missing parent is
//!   then the caller's mistake, not an internal error.
//!
//! Authentication is the spec's `JWT` bearer scheme, with a token read from a file on each
//! call.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

use super::ids::{Lsn, TenantId, TimelineId};
use crate::kubernetes::NeonConfig;
use crate::ErrorSource;

/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Largest response body read (a `TimelineInfo` is well under 2 KiB; a tenant's timeline
/// list grows with its timelines).
const MAX_BODY: usize = 4 << 20;
/// Largest token file read (a JWT is a few hundred bytes).
const MAX_TOKEN: u64 = 16 << 10;
/// Longest error text kept from a pageserver answer, for the operator's log.
const MAX_MSG: usize = 512;

/// What kind of failure a [`PageserverError`] is (strings are for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageserverErrorKind {
    /// The tenant or the ancestor timeline does not exist on the pageserver.
    NotFound,
    /// The LSN cannot be branched from (refused before sending, or 406).
    BadLsn,
    /// The timeline exists with other parameters (409 on create).
    Conflict,
    /// The timeline has branches (412 on delete): delete them first.
    HasChildren,
    /// 503, 429, 5xx where retrying is the rule, timeouts, connection errors: still failing
    /// after every try.
    Unavailable,
    /// The pageserver refused the token (401, 403).
    Unauthorized,
    /// Anything else: an answer the spec does not promise, an unreadable token file.
    Internal,
}

impl PageserverErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::BadLsn => "bad_lsn",
            Self::Conflict => "conflict",
            Self::HasChildren => "has_children",
            Self::Unavailable => "unavailable",
            Self::Unauthorized => "unauthorized",
            Self::Internal => "internal",
        }
    }

    /// Whose mistake it is: the caller's choices (parent, LSN), or the installation's.
    pub fn source(self) -> ErrorSource {
        match self {
            Self::NotFound | Self::BadLsn | Self::HasChildren => ErrorSource::Client,
            Self::Conflict | Self::Unavailable | Self::Unauthorized | Self::Internal => {
                ErrorSource::Internal
            }
        }
    }
}

/// A pageserver call failed. `Display` is for operators' logs (it has the pageserver's own
/// text); [`PageserverError::client_message`] is what an API client may be told.
#[derive(Debug, thiserror::Error)]
#[error("pageserver {op}: {detail}")]
pub struct PageserverError {
    kind: PageserverErrorKind,
    op: &'static str,
    detail: String,
}

impl PageserverError {
    fn new(kind: PageserverErrorKind, op: &'static str, detail: impl Into<String>) -> Self {
        Self {
            kind,
            op,
            detail: detail.into(),
        }
    }

    pub fn kind(&self) -> PageserverErrorKind {
        self.kind
    }

    /// A timeline that cannot be deleted for its `children` branches (found by listing).
    pub(super) fn has_children(tenant: TenantId, timeline: TimelineId, children: usize) -> Self {
        Self::new(
            PageserverErrorKind::HasChildren,
            "delete timeline",
            format!("{timeline} of tenant {tenant} has {children} branches"),
        )
    }

    /// Whether trying the same call again later could succeed.
    pub fn retryable(&self) -> bool {
        self.kind == PageserverErrorKind::Unavailable
    }

    /// Fixed words per kind: no URL, token, tenant or pageserver text.
    pub fn client_message(&self) -> &'static str {
        match self.kind {
            PageserverErrorKind::NotFound => "the parent's timeline does not exist in storage",
            PageserverErrorKind::BadLsn => {
                "the LSN cannot be branched from (before the parent's own branch point, removed by garbage collection, or not reached yet)"
            }
            PageserverErrorKind::HasChildren => {
                "the timeline has branches; delete them first"
            }
            PageserverErrorKind::Unavailable => "storage is unavailable; try again later",
            PageserverErrorKind::Conflict
            | PageserverErrorKind::Unauthorized
            | PageserverErrorKind::Internal => "storage error",
        }
    }
}

/// A new timeline branched from `ancestor_timeline_id` of `tenant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchRequest {
    pub tenant: TenantId,
    /// The caller's choice, so that a retried call means the same timeline.
    pub new_timeline_id: TimelineId,
    pub ancestor_timeline_id: TimelineId,
    /// Unset: the ancestor's last record LSN when the pageserver gets the request.
    pub ancestor_start_lsn: Option<Lsn>,
    /// Postgres major version (14 to 17 as of the spec's pageserver, which refuses others).
    /// The pageserver ignores it for a branch (it takes its ancestor's), so leave it unset.
    pub pg_version: Option<u32>,
}

/// The spec's `TimelineCreateRequest`, with only the fields a branch uses.
#[derive(Debug, Serialize)]
struct TimelineCreateRequest {
    new_timeline_id: TimelineId,
    ancestor_timeline_id: TimelineId,
    #[serde(skip_serializing_if = "Option::is_none")]
    ancestor_start_lsn: Option<Lsn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pg_version: Option<u32>,
}

/// The spec's `TimelineInfo`, with the fields pgwake reads (the others are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TimelineInfo {
    pub timeline_id: TimelineId,
    pub tenant_id: String,
    pub last_record_lsn: Lsn,
    pub disk_consistent_lsn: Lsn,
    pub state: String,
    pub min_readable_lsn: Lsn,
    #[serde(default)]
    pub ancestor_timeline_id: Option<TimelineId>,
    #[serde(default)]
    pub ancestor_lsn: Option<Lsn>,
}

/// The spec's error bodies (`Error`, `NotFoundError`, `ConflictError`, ...).
#[derive(Debug, Deserialize)]
struct ErrorBody {
    msg: String,
}

/// One answer, or why there was none.
enum Outcome {
    Answer(StatusCode, bytes::Bytes),
    /// Timed out or could not connect: the request may or may not have been applied.
    Failed(String),
}

/// The pageserver's management API. Cheap to clone.
#[derive(Clone)]
pub struct PageserverClient {
    base: String,
    http: reqwest::Client,
    token_file: Option<PathBuf>,
    request_timeout: Duration,
    retries: u32,
    retry_backoff: Duration,
    delete_wait: Duration,
}

impl std::fmt::Debug for PageserverClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageserverClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl PageserverClient {
    /// A client for `cfg.pageserver_api` (validated: an invalid config is an error).
    pub fn new(cfg: &NeonConfig) -> Result<Self, PageserverError> {
        let errors = cfg.validate();
        if !errors.is_empty() {
            return Err(PageserverError::new(
                PageserverErrorKind::Internal,
                "config",
                errors.join("; "),
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.request_timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| {
                PageserverError::new(PageserverErrorKind::Internal, "client", e.to_string())
            })?;
        Ok(Self {
            base: cfg.pageserver_api.trim_end_matches('/').to_string(),
            http,
            token_file: cfg.pageserver_token_file.clone(),
            request_timeout: cfg.request_timeout,
            retries: cfg.retries,
            retry_backoff: cfg.retry_backoff,
            delete_wait: cfg.delete_wait,
        })
    }

    /// `GET /v1/tenant/{tenant}/timeline/{timeline}`; 404: [`PageserverErrorKind::NotFound`].
    pub async fn timeline(
        &self,
        tenant: TenantId,
        timeline: TimelineId,
    ) -> Result<TimelineInfo, PageserverError> {
        let path = format!("/v1/tenant/{tenant}/timeline/{timeline}");
        self.get("get timeline", &path, || {
            format!("timeline {timeline} of tenant {tenant}")
        })
        .await
    }

    /// `GET /v1/tenant/{tenant}/timeline`: every timeline of the tenant.
    pub async fn timelines(&self, tenant: TenantId) -> Result<Vec<TimelineInfo>, PageserverError> {
        let path = format!("/v1/tenant/{tenant}/timeline");
        self.get("list timelines", &path, || format!("tenant {tenant}"))
            .await
    }

    /// A GET of `path`, retried as the spec allows, its 200 body parsed as `T`; a 404 is
    /// `NotFound`, naming `what`.
    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        path: &str,
        what: impl Fn() -> String,
    ) -> Result<T, PageserverError> {
        let mut tries = Tries::new(self);
        loop {
            match self.send(op, Method::GET, path, None).await? {
                Outcome::Answer(StatusCode::OK, body) => return parse(op, &body),
                Outcome::Answer(StatusCode::NOT_FOUND, body) => {
                    return Err(PageserverError::new(
                        PageserverErrorKind::NotFound,
                        op,
                        format!("{}: {}", what(), msg(&body)),
                    ))
                }
                other => tries.after(op, other, retry_get).await?,
            }
        }
    }

    /// Creates `req.new_timeline_id` as a branch and returns its `TimelineInfo`. Retries
    /// what the spec says to retry, with the same id; a retry that finds the timeline created
    /// by an earlier try whose answer was lost counts as success.
    pub async fn create_branch(
        &self,
        req: &BranchRequest,
    ) -> Result<TimelineInfo, PageserverError> {
        const OP: &str = "create timeline";
        if let Some(lsn) = req.ancestor_start_lsn {
            // `Lsn` cannot hold a malformed value; 0/0 is the one well-formed LSN that means
            // "none", and must not reach the pageserver as a branch point.
            if lsn.value() == 0 {
                return Err(PageserverError::new(PageserverErrorKind::BadLsn, OP, "0/0"));
            }
        }
        // The ancestor must exist: the pageserver answers an unknown one with a 500.
        let ancestor = self.timeline(req.tenant, req.ancestor_timeline_id).await?;
        let body = serde_json::to_vec(&TimelineCreateRequest {
            new_timeline_id: req.new_timeline_id,
            ancestor_timeline_id: req.ancestor_timeline_id,
            ancestor_start_lsn: req.ancestor_start_lsn,
            pg_version: req.pg_version,
        })
        .map_err(|e| PageserverError::new(PageserverErrorKind::Internal, OP, e.to_string()))?;
        let path = format!("/v1/tenant/{}/timeline", req.tenant);
        let mut tries = Tries::new(self);
        // Whether an earlier try may have created the timeline (its answer did not say no).
        let mut maybe_created = false;
        loop {
            let outcome = self.send(OP, Method::POST, &path, Some(&body)).await?;
            match outcome {
                Outcome::Answer(StatusCode::CREATED, body) => {
                    let info: TimelineInfo = parse(OP, &body)?;
                    if info.timeline_id != req.new_timeline_id {
                        return Err(PageserverError::new(
                            PageserverErrorKind::Internal,
                            OP,
                            format!(
                                "asked for {}, got {}",
                                req.new_timeline_id, info.timeline_id
                            ),
                        ));
                    }
                    info!(tenant = %req.tenant, timeline = %info.timeline_id,
                        ancestor = %req.ancestor_timeline_id, lsn = ?info.ancestor_lsn, "timeline created");
                    return Ok(info);
                }
                Outcome::Answer(StatusCode::CONFLICT, body) => {
                    // Branching at the head resolves the LSN when the request arrives: a
                    // retry after the ancestor moved on conflicts with the try that created
                    // it. The id is ours alone, so a timeline with our ancestor (and LSN,
                    // when given) is ours.
                    if maybe_created {
                        if let Ok(info) = self.timeline(req.tenant, req.new_timeline_id).await {
                            if info.ancestor_timeline_id == Some(req.ancestor_timeline_id)
                                && req.ancestor_start_lsn.is_none_or(|l| {
                                    info.ancestor_lsn.map(Lsn::value) == Some(align(l))
                                })
                            {
                                info!(tenant = %req.tenant, timeline = %info.timeline_id,
                                    "timeline created by an earlier try");
                                return Ok(info);
                            }
                        }
                    }
                    return Err(PageserverError::new(
                        PageserverErrorKind::Conflict,
                        OP,
                        format!(
                            "{} exists with other parameters: {}",
                            req.new_timeline_id,
                            msg(&body)
                        ),
                    ));
                }
                Outcome::Answer(StatusCode::NOT_ACCEPTABLE, body) => {
                    return Err(PageserverError::new(
                        PageserverErrorKind::BadLsn,
                        OP,
                        format!(
                            "branch of {} at {:?} (its ancestor LSN {:?}, last record {}): {}",
                            req.ancestor_timeline_id,
                            req.ancestor_start_lsn,
                            ancestor.ancestor_lsn,
                            ancestor.last_record_lsn,
                            msg(&body)
                        ),
                    ))
                }
                Outcome::Answer(StatusCode::NOT_FOUND, body) => {
                    return Err(PageserverError::new(
                        PageserverErrorKind::NotFound,
                        OP,
                        format!("tenant {}: {}", req.tenant, msg(&body)),
                    ))
                }
                other => {
                    maybe_created |= match &other {
                        Outcome::Failed(_) => true,
                        // In progress (possibly our own earlier try), or failed after the
                        // work may have been done.
                        Outcome::Answer(s, _) => {
                            *s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error()
                        }
                    };
                    tries.after(OP, other, retry_create).await?
                }
            }
        }
    }

    /// Deletes the timeline and waits (up to `delete_wait`) for the pageserver to finish;
    /// one that does not exist counts as deleted. Refused (412) while it has branches.
    pub async fn delete_timeline(
        &self,
        tenant: TenantId,
        timeline: TimelineId,
    ) -> Result<(), PageserverError> {
        const OP: &str = "delete timeline";
        let path = format!("/v1/tenant/{tenant}/timeline/{timeline}");
        let mut tries = Tries::new(self);
        let deadline = crate::manager::deadline(tokio::time::Instant::now(), self.delete_wait);
        let mut accepted = false;
        loop {
            match self.send(OP, Method::DELETE, &path, None).await? {
                Outcome::Answer(StatusCode::NOT_FOUND, _) => {
                    info!(%tenant, %timeline, "timeline deleted");
                    return Ok(());
                }
                // Accepted, or already being deleted: poll with the same call until 404.
                Outcome::Answer(s @ (StatusCode::ACCEPTED | StatusCode::CONFLICT), _) => {
                    accepted = true;
                    if tokio::time::Instant::now() >= deadline {
                        info!(%tenant, %timeline, status = %s,
                            "timeline deletion accepted; the pageserver finishes it");
                        return Ok(());
                    }
                    tokio::time::sleep(self.retry_backoff.min(MAX_BACKOFF)).await;
                }
                Outcome::Answer(StatusCode::PRECONDITION_FAILED, body) => {
                    return Err(PageserverError::new(
                        PageserverErrorKind::HasChildren,
                        OP,
                        format!("{timeline} of tenant {tenant}: {}", msg(&body)),
                    ))
                }
                other => {
                    let r = tries.after(OP, other, retry_delete).await;
                    if let Err(e) = r {
                        if accepted && e.retryable() {
                            warn!(%tenant, %timeline, error = %e,
                                "timeline deletion accepted, but its end was not seen");
                            return Ok(());
                        }
                        return Err(e);
                    }
                }
            }
        }
    }

    async fn send(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Outcome, PageserverError> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .timeout(self.request_timeout);
        if let Some(token) = self.token().await? {
            req = req.bearer_auth(token);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_vec());
        }
        debug!(%method, path, "pageserver call");
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Ok(Outcome::Failed(describe(&e))),
        };
        let status = resp.status();
        let mut buf = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > MAX_BODY {
                        return Err(PageserverError::new(
                            PageserverErrorKind::Internal,
                            op,
                            format!("answer larger than {MAX_BODY} bytes"),
                        ));
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Ok(Outcome::Failed(describe(&e))),
            }
        }
        Ok(Outcome::Answer(status, buf.into()))
    }

    async fn token(&self) -> Result<Option<String>, PageserverError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let fail = |reason: String| {
            PageserverError::new(
                PageserverErrorKind::Internal,
                "token",
                format!("token file {}: {reason}", path.display()),
            )
        };
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut text = String::new();
        file.take(MAX_TOKEN + 1)
            .read_to_string(&mut text)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if text.len() as u64 > MAX_TOKEN {
            return Err(fail(format!("longer than {MAX_TOKEN} bytes")));
        }
        let token = text.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(fail("empty, or not one printable word".into()));
        }
        Ok(Some(token.to_string()))
    }
}

/// The pageserver rounds a branch LSN up to 8 bytes (a WAL record's alignment) before it
/// records it as the new timeline's ancestor LSN.
fn align(lsn: Lsn) -> u64 {
    lsn.value().checked_add(7).map_or(lsn.value(), |v| v & !7)
}

/// Which answers are worth another try, per call, as the spec says.
fn retry_get(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}

fn retry_create(s: StatusCode) -> bool {
    retry_get(s)
}

fn retry_delete(s: StatusCode) -> bool {
    retry_get(s) || s == StatusCode::INTERNAL_SERVER_ERROR
}

/// The tries of one call: how many failed, and the wait before the next.
struct Tries {
    left: u32,
    made: u32,
    backoff: Duration,
}

impl Tries {
    fn new(c: &PageserverClient) -> Self {
        Self {
            left: c.retries,
            made: 0,
            backoff: c.retry_backoff,
        }
    }

    /// After an answer the caller does not take as final: waits and returns to try again, or
    /// the error that ends the call.
    async fn after(
        &mut self,
        op: &'static str,
        outcome: Outcome,
        retry: fn(StatusCode) -> bool,
    ) -> Result<(), PageserverError> {
        self.made += 1;
        let (retryable, detail) = match outcome {
            Outcome::Failed(e) => (true, e),
            Outcome::Answer(s, body) => {
                let detail = format!("{s}: {}", msg(&body));
                if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN {
                    return Err(PageserverError::new(
                        PageserverErrorKind::Unauthorized,
                        op,
                        detail,
                    ));
                }
                (retry(s), detail)
            }
        };
        if !retryable {
            return Err(PageserverError::new(
                PageserverErrorKind::Internal,
                op,
                detail,
            ));
        }
        if self.left == 0 {
            return Err(PageserverError::new(
                PageserverErrorKind::Unavailable,
                op,
                format!("{} tries, last: {detail}", self.made),
            ));
        }
        self.left -= 1;
        debug!(op, error = %detail, wait = ?self.backoff, "pageserver call failed; retrying");
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Ok(())
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    op: &'static str,
    body: &[u8],
) -> Result<T, PageserverError> {
    serde_json::from_slice(body).map_err(|e| {
        PageserverError::new(
            PageserverErrorKind::Internal,
            op,
            format!("answer does not match the spec: {e}"),
        )
    })
}

/// The `msg` of an error body, else the start of the body, for logs.
fn msg(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => b.msg,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    text.chars().take(MAX_MSG).collect()
}

/// A transport error without the URL (which the operator knows) repeated in every line.
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut s = what.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
