//! SQL over HTTP (`POST /sql`), the protocol of `@neondatabase/serverless`'s `neon()`: one
//! query or a batch in one transaction per request, on a compute connection opened through
//! the same path as a TCP session (login at the proxy, limits, wake, compute login) and closed
//! at the end of the request. The README's "Serverless drivers" section is the spec.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use pgwake_router::EndpointId;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::info;

use super::pool::{Pool, PoolKey};
use super::{percent_decode, query_param, Body, HttpConfig};
use crate::auth::{authenticate, read_message, AuthOutcome, ComputeCreds, ProxyAuth};
use crate::cancel::CancelTarget;
use crate::error::ProxyError;
use crate::shared::Proxy;
use crate::wire::StartupMessage;

const CONN_STRING: &str = "neon-connection-string";
const RAW_TEXT: &str = "neon-raw-text-output";
const ARRAY_MODE: &str = "neon-array-mode";
const ISOLATION: &str = "neon-batch-isolation-level";
const READ_ONLY: &str = "neon-batch-read-only";
const DEFERRABLE: &str = "neon-batch-deferrable";

/// Why a request failed. Postgres errors (from the compute or in the proxy's own terms) are
/// answered 400 with the error JSON the driver turns into a `NeonDbError` with its SQLSTATE.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("request body larger than max_request_bytes")]
    RequestTooLarge,
    #[error("response larger than max_response_bytes")]
    ResponseTooLarge,
    #[error("query not finished within query_timeout")]
    Timeout,
    #[error("{0}")]
    Proxy(#[from] ProxyError),
    /// An ErrorResponse, from the compute or for a login the compute refused.
    #[error("{}", .0.message)]
    Postgres(PgError),
    #[error("compute i/o: {0}")]
    ComputeIo(#[source] std::io::Error),
}

impl SqlError {
    fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::RequestTooLarge => "request_too_large",
            Self::ResponseTooLarge => "response_too_large",
            Self::Timeout => "timeout",
            Self::Proxy(e) => e.kind(),
            Self::Postgres(_) => "postgres",
            Self::ComputeIo(_) => "compute_io",
        }
    }

    fn response(&self) -> Response<Body> {
        let (status, body) = match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, json!({ "message": m })),
            Self::RequestTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "message": self.to_string() }),
            ),
            Self::ResponseTooLarge => (
                StatusCode::INSUFFICIENT_STORAGE,
                json!({ "message": self.to_string() }),
            ),
            Self::Timeout => (
                StatusCode::BAD_REQUEST,
                json!({ "message": "canceling statement due to query_timeout", "code": "57014" }),
            ),
            Self::Proxy(e) => match e.client_response() {
                Some(r) => (
                    StatusCode::BAD_REQUEST,
                    json!({ "message": r.message, "code": r.sqlstate, "hint": r.hint, "severity": "FATAL" }),
                ),
                None => (
                    StatusCode::BAD_GATEWAY,
                    json!({ "message": "could not reach the compute" }),
                ),
            },
            Self::Postgres(e) => (StatusCode::BAD_REQUEST, e.to_json()),
            Self::ComputeIo(_) => (
                StatusCode::BAD_GATEWAY,
                json!({ "message": "connection to the compute failed" }),
            ),
        };
        json_response(status, &body)
    }
}

/// The fields of an ErrorResponse, under the names the driver copies onto its error.
#[derive(Debug, Default)]
pub struct PgError {
    message: String,
    fields: Vec<(&'static str, String)>,
}

impl PgError {
    fn parse(body: &[u8]) -> Self {
        let mut e = PgError::default();
        for field in body.split(|&b| b == 0) {
            let Some((&code, value)) = field.split_first() else {
                continue;
            };
            let value = String::from_utf8_lossy(value).into_owned();
            let name = match code {
                b'M' => {
                    e.message = value;
                    continue;
                }
                b'V' => "severity",
                b'C' => "code",
                b'D' => "detail",
                b'H' => "hint",
                b'P' => "position",
                b'p' => "internalPosition",
                b'q' => "internalQuery",
                b'W' => "where",
                b's' => "schema",
                b't' => "table",
                b'c' => "column",
                b'd' => "dataType",
                b'n' => "constraint",
                b'F' => "file",
                b'L' => "line",
                b'R' => "routine",
                _ => continue,
            };
            e.fields.push((name, value));
        }
        e
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("message".into(), self.message.clone().into());
        for (k, v) in &self.fields {
            m.insert((*k).into(), v.clone().into());
        }
        Value::Object(m)
    }
}

#[derive(Debug, Deserialize)]
struct QueryData {
    query: String,
    #[serde(default)]
    params: Vec<Value>,
    #[serde(rename = "arrayMode")]
    array_mode: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Payload {
    Batch { queries: Vec<QueryData> },
    Single(QueryData),
}

/// What the `Neon-Connection-String` URL says.
#[derive(Debug, PartialEq)]
struct ConnInfo {
    user: String,
    password: String,
    database: String,
    endpoint: EndpointId,
}

/// `postgres[ql]://user:password@host[:port]/database[?options=endpoint%3DID]`: the endpoint
/// is `endpoint=` in `options`, else the host's first DNS label.
fn parse_conn_string(s: &str) -> Result<ConnInfo, SqlError> {
    let bad = SqlError::BadRequest;
    let rest = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
        .ok_or(bad("Neon-Connection-String is not a postgres:// URL"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (path, query) = path
        .split_once('?')
        .map_or((path, None), |(p, q)| (p, Some(q)));
    let (userinfo, host) = authority
        .rsplit_once('@')
        .ok_or(bad("Neon-Connection-String has no user"))?;
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let decode =
        |v: &str| percent_decode(v).ok_or(bad("Neon-Connection-String: bad percent-encoding"));
    let user = decode(user)?;
    if user.is_empty() {
        return Err(bad("Neon-Connection-String has no user"));
    }
    let database = match decode(path)? {
        d if d.is_empty() => user.clone(),
        d => d,
    };
    let from_options = query_param(query, "options").and_then(|o| {
        o.split_whitespace()
            .find_map(|opt| opt.strip_prefix("endpoint=").map(str::to_string))
    });
    let host = super::ws::host_without_port(host);
    let id = match from_options {
        Some(id) => id,
        None if host.parse::<IpAddr>().is_ok() => {
            return Err(bad(
                "Neon-Connection-String names no endpoint (host is an address)",
            ))
        }
        None => host.split('.').next().unwrap_or_default().to_string(),
    };
    let endpoint =
        EndpointId::parse(&id).map_err(|_| bad("Neon-Connection-String: invalid endpoint id"))?;
    Ok(ConnInfo {
        user,
        password: decode(password)?,
        database,
        endpoint,
    })
}

/// The batch's `BEGIN`, from the `Neon-Batch-*` headers.
fn begin_statement(headers: &HeaderMap) -> Result<String, SqlError> {
    let get = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let mut s = String::from("BEGIN");
    match get(ISOLATION) {
        None => {}
        Some("Serializable") => s += " ISOLATION LEVEL SERIALIZABLE",
        Some("RepeatableRead") => s += " ISOLATION LEVEL REPEATABLE READ",
        Some("ReadCommitted") => s += " ISOLATION LEVEL READ COMMITTED",
        Some("ReadUncommitted") => s += " ISOLATION LEVEL READ UNCOMMITTED",
        Some(_) => return Err(SqlError::BadRequest("invalid Neon-Batch-Isolation-Level")),
    }
    if get(READ_ONLY) == Some("true") {
        s += " READ ONLY";
    }
    if get(DEFERRABLE) == Some("true") {
        s += " DEFERRABLE";
    }
    Ok(s)
}

fn flag(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

pub(super) fn cors_preflight() -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("access-control-allow-origin", "*")
        .header("access-control-allow-methods", "POST, OPTIONS")
        .header(
            "access-control-allow-headers",
            "Authorization, Content-Type, Neon-Connection-String, Neon-Raw-Text-Output, \
             Neon-Array-Mode, Neon-Batch-Isolation-Level, Neon-Batch-Read-Only, \
             Neon-Batch-Deferrable, Neon-Pool-Opt-In",
        )
        .header("access-control-max-age", "86400")
        .body(Full::new(Bytes::new()))
        .expect("static response parts")
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header("access-control-allow-origin", "*")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts")
}

/// `POST /sql`: one line in the log per request, with its status and time.
pub(super) async fn handle(
    proxy: &Arc<Proxy>,
    cfg: &HttpConfig,
    pool: &Pool,
    link: &super::Link,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let started = std::time::Instant::now();
    let res = if proxy.tls_cfg.require_tls && !link.secure {
        Err(ProxyError::TlsRequired.into())
    } else {
        run(proxy, cfg, pool, req, peer).await
    };
    let elapsed = started.elapsed();
    let ms = elapsed.as_millis() as u64;
    let (resp, kind) = match res {
        Ok(body) => {
            info!(client = %peer, status = 200, ms, "sql request");
            (json_response(StatusCode::OK, &body), "ok")
        }
        Err(e) => {
            let resp = e.response();
            info!(client = %peer, status = resp.status().as_u16(), kind = e.kind(), error = %e, ms, "sql request failed");
            (resp, e.kind())
        }
    };
    let m = &proxy.metrics;
    m.sql_pool_idle.set(pool.size() as i64);
    m.sql_seconds.observe(elapsed.as_secs_f64());
    m.sql_requests
        .with_label_values(&[resp.status().as_str(), kind])
        .inc();
    resp
}

async fn run(
    proxy: &Arc<Proxy>,
    cfg: &HttpConfig,
    pool: &Pool,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Value, SqlError> {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let conn = headers
        .get(CONN_STRING)
        .and_then(|v| v.to_str().ok())
        .ok_or(SqlError::BadRequest(
            "missing Neon-Connection-String header",
        ))?;
    let info = parse_conn_string(conn)?;
    let default_array_mode = flag(headers, ARRAY_MODE);
    // Values are always sent as Postgres's text; without Neon-Raw-Text-Output the driver's
    // type parsers would still apply, so the header changes nothing here.
    let _ = flag(headers, RAW_TEXT);
    let body = Limited::new(body, cfg.max_request_bytes)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                SqlError::RequestTooLarge
            } else {
                SqlError::BadRequest("could not read the request body")
            }
        })?
        .to_bytes();
    let payload: Payload = serde_json::from_slice(&body)
        .map_err(|_| SqlError::BadRequest("request body is not valid JSON"))?;
    let begin = match &payload {
        Payload::Batch { .. } => Some(begin_statement(headers)?),
        Payload::Single(_) => None,
    };

    let ip = peer.ip();
    if !proxy.limits.admit_ip(ip) {
        return Err(ProxyError::RateLimited.into());
    }
    // A session place for the request's duration: the drain waits for it like for a session.
    let _session = Arc::clone(&proxy.limit)
        .try_acquire_owned()
        .map_err(|_| ProxyError::TooManyConnections)?;
    let endpoint = info.endpoint.clone();
    tracing::Span::current().record("endpoint", endpoint.as_str());
    // Before the route is used and before any wake, as for a TCP session.
    let verified = crate::login::check_password(proxy, &endpoint, &info.user, &info.password, ip)
        .await
        .map_err(ProxyError::from)?;
    let creds = ComputeCreds::after_login(
        verified,
        Some(ProxyAuth {
            user: info.user.clone().into_bytes(),
            password: info.password.clone(),
        }),
    );
    let (route, _slot) = proxy.admit(&endpoint, ip)?;
    // The lease is the request's activity: no suspend while it is held.
    let lease = proxy
        .manager
        .wake(&route)
        .await
        .map_err(|source| ProxyError::Wake {
            endpoint: endpoint.clone(),
            source,
        })?;
    let key =
        |addr: &str| PoolKey::new(&endpoint, &info.user, &info.database, &info.password, addr);
    // Armed once the compute gave its cancel key: a client that goes away mid-query (hyper
    // then drops this future) or a query_timeout cancels the query at the compute.
    let mut cancel = CancelOnDrop {
        proxy: Arc::clone(proxy),
        key: None,
    };
    let (mut compute, pool_key, _fresh_lease) = match pool.take(&key(lease.addr.as_str())) {
        Some(idle) => {
            cancel.key = idle.cancel;
            (idle.conn, key(lease.addr.as_str()), None)
        }
        None => {
            let (fresh, mut compute) = crate::compute::connect(proxy, &route).await?;
            cancel.key = tokio::time::timeout(
                cfg.query_timeout,
                login_to_compute(proxy, &mut compute, &info, creds, &fresh.addr),
            )
            .await
            .map_err(|_| SqlError::Timeout)??;
            (compute, key(fresh.addr.as_str()), Some(fresh))
        }
    };
    let mut idle_after = false;
    let work = async {
        let mut session = Session {
            io: &mut compute,
            limit: cfg.max_response_bytes,
            used: 0,
            status: 0,
        };
        let res = match payload {
            Payload::Single(q) => {
                let array_mode = q.array_mode.unwrap_or(default_array_mode);
                session.query(&q, array_mode).await
            }
            Payload::Batch { queries } => {
                let begin = begin.expect("set for a batch");
                session.simple(&begin).await?;
                let mut results = Vec::with_capacity(queries.len());
                for q in &queries {
                    match session
                        .query(q, q.array_mode.unwrap_or(default_array_mode))
                        .await
                    {
                        Ok(r) => results.push(r),
                        Err(e) => {
                            // Best effort: the connection is closed right after anyway, which
                            // rolls back too.
                            let _ = session.simple("ROLLBACK").await;
                            return Err(e);
                        }
                    }
                }
                session.simple("COMMIT").await?;
                Ok(json!({ "results": results }))
            }
        };
        // Reusable only outside any transaction (a query may have left one open), and only
        // once nothing this request set (SET, temporary tables, prepared statements, advisory
        // locks) can reach the next request that takes the connection from the pool.
        idle_after = session.status == b'I' && session.simple("DISCARD ALL").await.is_ok();
        res
    };
    let res = match tokio::time::timeout(cfg.query_timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(SqlError::Timeout),
    };
    let timed_out = matches!(res, Err(SqlError::Timeout));
    if !timed_out
        && idle_after
        && !matches!(
            res,
            Err(SqlError::ComputeIo(_) | SqlError::ResponseTooLarge)
        )
    {
        pool.put(pool_key, compute, cancel.key.take());
    } else {
        if !timed_out {
            cancel.key = None;
        }
        let _ = compute.write_all(&[b'X', 0, 0, 0, 4]).await;
    }
    drop(cancel);
    drop(lease);
    res
}

/// The proxy-side cancel key of a compute connection (as a client would have received it in
/// BackendKeyData) and the guard that keeps it registered.
pub(super) struct CancelKey {
    pid: i32,
    secret: Vec<u8>,
    _guard: crate::cancel::CancelGuard,
}

/// Sends a CancelRequest through the proxy's own cancel path when dropped with a key.
struct CancelOnDrop {
    proxy: Arc<Proxy>,
    key: Option<CancelKey>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let proxy = Arc::clone(&self.proxy);
        // The guard moves into the task: the key must stay registered until it is used.
        tokio::spawn(async move {
            info!("cancelling an unfinished /sql query");
            proxy
                .cancels
                .handle_client_request(key.pid, &key.secret)
                .await;
            drop(key);
        });
    }
}

/// StartupMessage and the compute's authentication, answered by the proxy with the verified
/// credentials; an ErrorResponse (wrong password on a passthrough endpoint, no such database)
/// becomes the request's error.
async fn login_to_compute<K: AsyncRead + AsyncWrite + Unpin>(
    proxy: &Proxy,
    compute: &mut K,
    info: &ConnInfo,
    creds: Option<ComputeCreds>,
    addr: &pgwake_compute_manager::ComputeAddr,
) -> Result<Option<CancelKey>, SqlError> {
    let startup = StartupMessage {
        major: 3,
        minor: 0,
        params: vec![
            (b"user".to_vec(), info.user.clone().into_bytes()),
            (b"database".to_vec(), info.database.clone().into_bytes()),
            (b"client_encoding".to_vec(), b"UTF8".to_vec()),
            (
                b"application_name".to_vec(),
                b"pgwake-sql-over-http".to_vec(),
            ),
        ],
    };
    let mut buf = BytesMut::with_capacity(128);
    startup.encode(&mut buf);
    compute.write_all(&buf).await.map_err(SqlError::ComputeIo)?;
    // What the compute would have told a client (ParameterStatus, AuthenticationOk, an error):
    // collected, and read only for the error.
    let mut said: Vec<u8> = Vec::new();
    let target = CancelTarget {
        endpoint: info.endpoint.clone(),
        addr: addr.clone(),
        pid: 0,
        secret: Vec::new(),
    };
    let mut client = tokio::io::join(tokio::io::empty(), &mut said);
    let outcome = authenticate(proxy.cancels.map(), &mut client, compute, target, creds).await?;
    match outcome {
        AuthOutcome::Ready(guard) => Ok(guard.and_then(|g| {
            let (pid, secret) = backend_key(&said)?;
            Some(CancelKey {
                pid,
                secret,
                _guard: g,
            })
        })),
        AuthOutcome::Refused => Err(SqlError::Postgres(last_error(&said))),
    }
}

/// The messages in `buf` (a run of backend messages), as (tag, body); a cut message ends it.
fn messages(mut rest: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let len = u32::from_be_bytes(rest.get(1..5)?.try_into().ok()?) as usize;
        let body = rest.get(5..5 + len.checked_sub(4)?)?;
        let tag = rest[0];
        rest = &rest[5 + body.len()..];
        Some((tag, body))
    })
}

/// The BackendKeyData in `buf`.
fn backend_key(buf: &[u8]) -> Option<(i32, Vec<u8>)> {
    let (_, body) = messages(buf).find(|(tag, _)| *tag == b'K')?;
    let pid = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    Some((pid, body[4..].to_vec()))
}

/// The ErrorResponse at the end of `buf` (a run of backend messages).
fn last_error(buf: &[u8]) -> PgError {
    messages(buf)
        .filter(|(tag, _)| *tag == b'E')
        .last()
        .map_or_else(
            || PgError {
                message: "the compute refused the login".into(),
                ..Default::default()
            },
            |(_, body)| PgError::parse(body),
        )
}

/// One logged-in compute connection, answering within the response limit.
struct Session<'a, K> {
    io: &'a mut K,
    limit: usize,
    used: usize,
    /// The transaction status of the last ReadyForQuery (`I`, `T`, `E`).
    status: u8,
}

impl<K: AsyncRead + AsyncWrite + Unpin> Session<'_, K> {
    async fn next(&mut self) -> Result<(u8, Vec<u8>), SqlError> {
        let room = self.limit.saturating_sub(self.used);
        let (tag, body) = read_message(self.io, room).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                SqlError::ResponseTooLarge
            } else {
                SqlError::ComputeIo(e)
            }
        })?;
        self.used += body.len();
        if self.used > self.limit {
            return Err(SqlError::ResponseTooLarge);
        }
        Ok((tag, body))
    }

    /// A statement without results (BEGIN, COMMIT, ROLLBACK) in the simple protocol.
    async fn simple(&mut self, sql: &str) -> Result<(), SqlError> {
        let mut m = BytesMut::new();
        put_msg(&mut m, b'Q', |b| put_cstr(b, sql));
        self.io.write_all(&m).await.map_err(SqlError::ComputeIo)?;
        let mut err = None;
        loop {
            match self.next().await? {
                (b'E', body) => err = Some(PgError::parse(&body)),
                (b'Z', body) => {
                    self.status = body.first().copied().unwrap_or(0);
                    return err.map_or(Ok(()), |e| Err(SqlError::Postgres(e)));
                }
                _ => {}
            }
        }
    }

    /// Parse/Bind/Describe/Execute/Sync with every parameter and result in text format.
    async fn query(&mut self, q: &QueryData, array_mode: bool) -> Result<Value, SqlError> {
        let mut m = BytesMut::new();
        put_msg(&mut m, b'P', |b| {
            put_cstr(b, "");
            put_cstr(b, &q.query);
            b.put_i16(0);
        });
        let n_params = i16::try_from(q.params.len())
            .map_err(|_| SqlError::BadRequest("too many parameters"))?;
        put_msg(&mut m, b'B', |b| {
            put_cstr(b, "");
            put_cstr(b, "");
            b.put_i16(0);
            b.put_i16(n_params);
            for p in &q.params {
                match param_text(p) {
                    None => b.put_i32(-1),
                    Some(t) => {
                        b.put_i32(t.len() as i32);
                        b.put_slice(t.as_bytes());
                    }
                }
            }
            b.put_i16(1);
            b.put_i16(0);
        });
        put_msg(&mut m, b'D', |b| {
            b.put_u8(b'P');
            put_cstr(b, "");
        });
        put_msg(&mut m, b'E', |b| {
            put_cstr(b, "");
            b.put_i32(0);
        });
        put_msg(&mut m, b'S', |_| {});
        self.io.write_all(&m).await.map_err(SqlError::ComputeIo)?;

        let mut fields = Vec::new();
        let mut names = Vec::new();
        let mut rows = Vec::new();
        let mut tag = String::new();
        let mut err = None;
        loop {
            let (t, body) = self.next().await?;
            match t {
                b'T' => (fields, names) = row_description(&body)?,
                b'D' => rows.push(data_row(&body, &names, array_mode)?),
                b'C' => {
                    tag = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body))
                        .into_owned()
                }
                b'E' => err = Some(PgError::parse(&body)),
                b'Z' => {
                    self.status = body.first().copied().unwrap_or(0);
                    break;
                }
                _ => {}
            }
        }
        if let Some(e) = err {
            return Err(SqlError::Postgres(e));
        }
        let (command, row_count) = command_tag(&tag);
        Ok(json!({
            "command": command,
            "rowCount": row_count,
            "rows": rows,
            "fields": fields,
            "rowAsArray": array_mode,
        }))
    }
}

fn param_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// `SELECT 3` → ("SELECT", 3); `INSERT 0 2` → ("INSERT", 2); `BEGIN` → ("BEGIN", null).
fn command_tag(tag: &str) -> (String, Value) {
    let mut words = tag.split_whitespace();
    let command = words.next().unwrap_or_default().to_string();
    let count = tag
        .rsplit(' ')
        .next()
        .and_then(|w| w.parse::<u64>().ok())
        .map_or(Value::Null, Value::from);
    (command, count)
}

fn protocol(msg: &'static str) -> SqlError {
    SqlError::ComputeIo(std::io::Error::new(std::io::ErrorKind::InvalidData, msg))
}

/// RowDescription → the `fields` JSON and the column names.
fn row_description(body: &[u8]) -> Result<(Vec<Value>, Vec<String>), SqlError> {
    let mut r = Reader(body);
    let n = r.i16()?;
    let (mut fields, mut names) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let name = r.cstr()?;
        let (table, column, oid, size, modifier, format) =
            (r.i32()?, r.i16()?, r.i32()?, r.i16()?, r.i32()?, r.i16()?);
        fields.push(json!({
            "name": name,
            "tableID": table,
            "columnID": column,
            "dataTypeID": oid as u32,
            "dataTypeSize": size,
            "dataTypeModifier": modifier,
            "format": if format == 0 { "text" } else { "binary" },
        }));
        names.push(name);
    }
    Ok((fields, names))
}

/// DataRow → an array of text values (or an object by column name).
fn data_row(body: &[u8], names: &[String], array_mode: bool) -> Result<Value, SqlError> {
    let mut r = Reader(body);
    let n = r.i16()?;
    let mut values = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = r.i32()?;
        values.push(if len < 0 {
            Value::Null
        } else {
            Value::String(String::from_utf8_lossy(r.take(len as usize)?).into_owned())
        });
    }
    if array_mode {
        return Ok(Value::Array(values));
    }
    Ok(Value::Object(
        names.iter().cloned().zip(values).collect::<Map<_, _>>(),
    ))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SqlError> {
        if self.0.len() < n {
            return Err(protocol("short message from the compute"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn i16(&mut self) -> Result<i16, SqlError> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn i32(&mut self) -> Result<i32, SqlError> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn cstr(&mut self) -> Result<String, SqlError> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| protocol("unterminated string from the compute"))?;
        let s = String::from_utf8_lossy(&self.0[..end]).into_owned();
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
}

fn put_msg(dst: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    dst.put_u8(tag);
    let start = dst.len();
    dst.put_u32(0);
    body(dst);
    let len = (dst.len() - start) as u32;
    dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// A query text or parameter cannot carry a NUL; one in it would end the string early.
fn put_cstr(dst: &mut BytesMut, s: &str) {
    dst.extend(s.bytes().filter(|&b| b != 0));
    dst.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings() {
        let c = parse_conn_string(
            "postgresql://al%40ice:p%3Aw@ep-1.db.example.com:5432/app?sslmode=require",
        )
        .unwrap();
        assert_eq!(c.user, "al@ice");
        assert_eq!(c.password, "p:w");
        assert_eq!(c.database, "app");
        assert_eq!(c.endpoint.as_str(), "ep-1");
        let c = parse_conn_string("postgres://bob:x@127.0.0.1/?options=endpoint%3Ddemo").unwrap();
        assert_eq!((c.database.as_str(), c.endpoint.as_str()), ("bob", "demo"));
        for bad in [
            "mysql://a@b/c",
            "postgres://host/db",
            "postgres://a:b@127.0.0.1/db",
            "postgres://:b@h/db",
        ] {
            assert!(parse_conn_string(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tags_and_errors() {
        assert_eq!(command_tag("SELECT 3"), ("SELECT".into(), Value::from(3)));
        assert_eq!(command_tag("INSERT 0 2"), ("INSERT".into(), Value::from(2)));
        assert_eq!(command_tag("BEGIN"), ("BEGIN".into(), Value::Null));
        let e = PgError::parse(b"SERROR\0VERROR\0C22012\0Mdivision by zero\0\0");
        assert_eq!(
            e.to_json(),
            json!({"message": "division by zero", "severity": "ERROR", "code": "22012"})
        );
    }

    #[test]
    fn rows_from_wire() {
        let mut t = BytesMut::new();
        t.put_i16(1);
        put_cstr(&mut t, "n");
        t.put_i32(0);
        t.put_i16(0);
        t.put_i32(23);
        t.put_i16(4);
        t.put_i32(-1);
        t.put_i16(0);
        let (fields, names) = row_description(&t).unwrap();
        assert_eq!(fields[0]["dataTypeID"], 23);
        let mut d = BytesMut::new();
        d.put_i16(1);
        d.put_i32(2);
        d.put_slice(b"42");
        assert_eq!(data_row(&d, &names, true).unwrap(), json!(["42"]));
        assert_eq!(data_row(&d, &names, false).unwrap(), json!({"n": "42"}));
        // A length past the end is an error, not a panic.
        let mut d = BytesMut::new();
        d.put_i16(1);
        d.put_i32(100);
        assert!(data_row(&d, &names, true).is_err());
    }
}
