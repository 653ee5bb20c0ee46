//! The login at the proxy, before any wake: SCRAM-SHA-256(-PLUS) with the client against the
//! endpoint's stored verifier ([`crate::verifiers`]), throttled per address and endpoint
//! ([`crate::throttle`]). Only a client that proved it knows the password gets a wake; the
//! ClientKey recovered from its proof then logs the proxy in to the compute
//! ([`crate::auth`]).
//!
//! An unknown role, and an unknown endpoint once any endpoint uses scram (or as
//! `[auth] hide_unknown_endpoints` says), runs the mock exchange: same messages, same work,
//! same `28P01` as a wrong password.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use pgwake_router::EndpointId;
use prometheus::{IntCounterVec, Opts, Registry};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

use crate::auth::read_message;
use crate::scram::{
    self, sasl, ChannelBinding, ClientKey, MockSecret, ScramError, ServerExchange, Verifier,
};
use crate::stream::ClientStream;
use crate::throttle::{Throttle, ThrottleConfig, Throttled};
use crate::verifiers::{Lookup, VerifierStore};
use crate::Proxy;

/// Largest message read from a client during the exchange (a SCRAM message and framing).
const MAX_LOGIN_MESSAGE: usize = scram::server::MAX_MESSAGE_LEN + 64;

/// The `[auth]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// An unknown endpoint gets the mock SCRAM exchange and `28P01`, like a wrong password,
    /// instead of `3D000 endpoint "x" does not exist`. Unset: hidden as soon as any endpoint
    /// uses `auth = "scram"` (there is something to protect, and listing ids would help a
    /// scanner), shown while every endpoint is passthrough (whose computes answer anyway).
    #[serde(default)]
    pub hide_unknown_endpoints: Option<bool>,
    #[serde(default)]
    pub throttle: ThrottleConfig,
    /// How often the login roles of running local computes (`auth = "scram"` endpoints) are
    /// re-read from `pg_authid`, so a role created or a password changed in a session is
    /// known before the next suspend.
    #[serde(default = "d_learn_interval", with = "humantime_serde")]
    pub learn_interval: std::time::Duration,
    /// Whether this process reads the Secrets that `PgwakeEndpoint`s name in `rolesSecret`
    /// (`[kubernetes] watch_endpoints`). Off for a compute manager that serves no clients, so
    /// that it needs no access to them; its `scram` endpoints then refuse every login.
    #[serde(default = "d_true")]
    pub roles_secrets: bool,
    /// How often those Secrets are read again (also at once when a `PgwakeEndpoint` names a
    /// different one): a changed password is in force within this time.
    #[serde(default = "d_roles_secret_interval", with = "humantime_serde")]
    pub roles_secret_interval: std::time::Duration,
}

fn d_learn_interval() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

fn d_true() -> bool {
    true
}

fn d_roles_secret_interval() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hide_unknown_endpoints: None,
            throttle: ThrottleConfig::default(),
            learn_interval: d_learn_interval(),
            roles_secrets: true,
            roles_secret_interval: d_roles_secret_interval(),
        }
    }
}

/// Login state shared by every connection.
pub struct Auth {
    cfg: AuthConfig,
    store: Arc<VerifierStore>,
    mock: MockSecret,
    throttle: Throttle,
    failures: IntCounterVec,
    throttled: IntCounterVec,
}

impl Auth {
    pub fn new(
        cfg: AuthConfig,
        store: Arc<VerifierStore>,
        registry: &Registry,
    ) -> prometheus::Result<Arc<Self>> {
        let failures = IntCounterVec::new(
            Opts::new(
                "pgwake_auth_failures_total",
                "Failed logins at the proxy, by reason",
            ),
            &["reason"],
        )?;
        let throttled = IntCounterVec::new(
            Opts::new(
                "pgwake_auth_throttled_total",
                "Logins refused by the failed-login throttle, by scope",
            ),
            &["scope"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(throttled.clone()))?;
        Ok(Arc::new(Self {
            throttle: Throttle::new(cfg.throttle.clone()),
            cfg,
            store,
            mock: MockSecret::random(),
            failures,
            throttled,
        }))
    }

    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    pub fn store(&self) -> &Arc<VerifierStore> {
        &self.store
    }
}

/// Why a login at the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Wrong password, unknown role, unknown endpoint: one message for all.
    #[error("password authentication failed for role {role:?}")]
    Failed { role: String },
    /// A malformed exchange or a channel binding mismatch.
    #[error("{0}")]
    Scram(ScramError),
    /// The client answered AuthenticationSASL with something else.
    #[error("client does not support SCRAM-SHA-256")]
    NotScram { endpoint: EndpointId },
    #[error("refused by the failed-login throttle ({})", .0.label())]
    Throttled(Throttled),
    #[error("login not completed within auth_timeout")]
    Timeout,
    #[error("client i/o during login: {0}")]
    ClientIo(#[source] std::io::Error),
}

impl LoginError {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Failed { .. } => "auth_failed",
            Self::Scram(_) => "auth_protocol",
            Self::NotScram { .. } => "auth_not_scram",
            Self::Throttled(_) => "auth_throttled",
            Self::Timeout => "auth_timeout",
            Self::ClientIo(_) => "client_io",
        }
    }

    /// `(sqlstate, message, hint)`; `None`: close without a word (timeout, client gone).
    pub fn client_response(&self) -> Option<(&'static str, String, Option<String>)> {
        match self {
            Self::Failed { role } => Some((
                "28P01",
                format!("password authentication failed for user \"{role}\""),
                None,
            )),
            Self::Scram(e @ ScramError::Malformed(_)) => {
                Some((e.sqlstate(), "malformed SCRAM message".into(), None))
            }
            Self::Scram(e) => Some((e.sqlstate(), e.to_string(), None)),
            Self::NotScram { endpoint } => Some((
                "28000",
                format!("endpoint \"{endpoint}\" requires SCRAM-SHA-256 authentication"),
                Some(
                    "Use a client that supports SCRAM-SHA-256 (libpq 10 or later), or set \
                     auth = \"passthrough\" for this endpoint in the pgwake config."
                        .into(),
                ),
            )),
            Self::Throttled(_) => Some((
                "53300",
                "too many failed login attempts; retry later".into(),
                None,
            )),
            Self::Timeout | Self::ClientIo(_) => None,
        }
    }
}

/// What the compute login needs after a verified client.
pub(crate) enum Verified {
    /// No check at the proxy (passthrough endpoint, or an endpoint the caller refuses anyway).
    NotChecked,
    /// The client proved it knows the password.
    Scram {
        client_key: ClientKey,
        verifier: Verifier,
    },
}

/// The login for a request that carries its password (SQL over HTTP): the same checks,
/// throttle and failure accounting as [`login`], without a client stream to talk to.
pub(crate) async fn check_password(
    proxy: &Proxy,
    endpoint: &EndpointId,
    role: &str,
    password: &str,
    client_ip: IpAddr,
) -> Result<Verified, LoginError> {
    // With the password given, `login` never reads or writes the stream.
    let mut no_stream = ClientStream::Gone;
    login(
        proxy,
        &mut no_stream,
        endpoint,
        role,
        Some(password),
        client_ip,
        None,
    )
    .await
}

/// Runs the login for `role` at `endpoint`, bounded by `[proxy] auth_timeout`. `password` is
/// the cleartext password of the `endpoint=ID;PASSWORD` fallback, already read from the client;
/// `channel_binding` that of the certificate the client's TLS handshake presented.
pub(crate) async fn login(
    proxy: &Proxy,
    client: &mut ClientStream,
    endpoint: &EndpointId,
    role: &str,
    password: Option<&str>,
    client_ip: IpAddr,
    channel_binding: Option<&[u8]>,
) -> Result<Verified, LoginError> {
    let auth = &proxy.auth;
    let route = proxy.table.lookup(endpoint);
    let lookup = match &route {
        None if !auth
            .cfg
            .hide_unknown_endpoints
            .unwrap_or_else(|| auth.store.has_scram_endpoints()) =>
        {
            return Ok(Verified::NotChecked)
        }
        None => Lookup::UnknownRole,
        // The caller refuses it with its own message; the allowlist is the owner's to reveal.
        Some(r) if !r.allows(client_ip) => return Ok(Verified::NotChecked),
        Some(_) => match auth.store.lookup(endpoint, role) {
            None | Some(Lookup::Passthrough) => return Ok(Verified::NotChecked),
            Some(l) => l,
        },
    };
    if let Err(scope) = auth
        .throttle
        .check(client_ip, endpoint.as_str(), Instant::now())
    {
        auth.throttled.with_label_values(&[scope.label()]).inc();
        info!(
            scope = scope.label(),
            "login refused by the failed-login throttle"
        );
        return Err(LoginError::Throttled(scope));
    }
    let cb = match (client.is_tls(), channel_binding) {
        (true, Some(data)) => ChannelBinding::TlsServerEndPoint(data.to_vec()),
        _ => ChannelBinding::None,
    };
    let (exchange, verifier) = match lookup {
        Lookup::Known(v) => (ServerExchange::new(v.clone(), cb.clone()), Some(v)),
        _ => (
            auth.mock.exchange(endpoint.as_str(), role, cb.clone()),
            None,
        ),
    };
    let run = async {
        match password {
            // Hi() over the verifier's iteration count is milliseconds of CPU: off the runtime.
            Some(p) => {
                let p = p.to_string();
                tokio::task::spawn_blocking(move || scram::verify_password(exchange, p.as_bytes()))
                    .await
                    .unwrap_or(Err(ScramError::AuthFailed))
                    .map_err(LoginError::Scram)
            }
            None => exchange_with_client(client, exchange, &cb, endpoint).await,
        }
    };
    let result = tokio::time::timeout(proxy.cfg.auth_timeout, run)
        .await
        .unwrap_or(Err(LoginError::Timeout));
    let err = match (result, verifier) {
        (Ok(client_key), Some(verifier)) => {
            return Ok(Verified::Scram {
                client_key,
                verifier,
            })
        }
        // Unreachable (the mock exchange cannot succeed); refused all the same.
        (Ok(_), None) => LoginError::Scram(ScramError::AuthFailed),
        (Err(e), _) => e,
    };
    let err = match err {
        LoginError::Scram(ScramError::AuthFailed) => LoginError::Failed {
            role: role.to_string(),
        },
        e => e,
    };
    if !matches!(err, LoginError::ClientIo(_)) {
        auth.failures.with_label_values(&[err.kind()]).inc();
        let bans = auth
            .throttle
            .failed(client_ip, endpoint.as_str(), Instant::now());
        if bans.ip || bans.endpoint {
            warn!(
                ip_banned = bans.ip,
                endpoint_banned = bans.endpoint,
                "failed-login threshold reached; refusing further logins for the ban period"
            );
        }
        info!(role, error = %err, "login failed at the proxy");
    }
    Err(err)
}

/// AuthenticationSASL → SASLInitialResponse → SASLContinue → SASLResponse → SASLFinal. The
/// final message goes out at once; AuthenticationOk follows from the compute after the wake.
async fn exchange_with_client<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    exchange: ServerExchange,
    cb: &ChannelBinding,
    endpoint: &EndpointId,
) -> Result<ClientKey, LoginError> {
    let io = LoginError::ClientIo;
    let mut out = BytesMut::with_capacity(128);
    sasl::authentication_sasl(cb.mechanisms(), &mut out);
    client.write_all(&out).await.map_err(io)?;
    let (tag, body) = read_message(client, MAX_LOGIN_MESSAGE).await.map_err(io)?;
    if tag != b'p' {
        return Err(LoginError::NotScram {
            endpoint: endpoint.clone(),
        });
    }
    let (mechanism, data) = sasl::parse_initial_response(&body).map_err(LoginError::Scram)?;
    let first = exchange
        .client_first(mechanism, data)
        .map_err(LoginError::Scram)?;
    out.clear();
    sasl::authentication_sasl_data(sasl::AUTH_SASL_CONTINUE, first.message(), &mut out);
    client.write_all(&out).await.map_err(io)?;
    let (tag, body) = read_message(client, MAX_LOGIN_MESSAGE).await.map_err(io)?;
    if tag != b'p' {
        return Err(LoginError::Scram(ScramError::Malformed(
            "expected SASLResponse",
        )));
    }
    let ok = first.client_final(&body).map_err(LoginError::Scram)?;
    out.clear();
    sasl::authentication_sasl_data(sasl::AUTH_SASL_FINAL, ok.server_final.as_bytes(), &mut out);
    client.write_all(&out).await.map_err(io)?;
    Ok(ok.client_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{self as pg, ScramSha256};
    use tokio::io::AsyncReadExt;

    fn id() -> EndpointId {
        EndpointId::parse("ep").unwrap()
    }

    /// Plays a libpq-like client on the other end of a duplex pipe.
    async fn client_side(
        mut s: tokio::io::DuplexStream,
        password: &'static str,
    ) -> Result<(), String> {
        let (tag, body) = read_message(&mut s, 1024)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!((tag, &body[..4]), (b'R', &10i32.to_be_bytes()[..]));
        let mut c = ScramSha256::new(password.as_bytes(), pg::ChannelBinding::unsupported());
        let mut out = BytesMut::new();
        sasl::initial_response(scram::Mechanism::ScramSha256, c.message(), &mut out);
        s.write_all(&out).await.unwrap();
        let (_, body) = read_message(&mut s, 1024)
            .await
            .map_err(|e| e.to_string())?;
        c.update(&body[4..]).unwrap();
        out.clear();
        sasl::response(c.message(), &mut out);
        s.write_all(&out).await.unwrap();
        let mut tag = [0u8; 1];
        match s.read_exact(&mut tag).await {
            Ok(_) => {
                let (_, body) = read_message_after_tag(&mut s, tag[0]).await;
                c.finish(&body[4..]).map_err(|e| e.to_string())
            }
            Err(_) => Err("closed".into()),
        }
    }

    async fn read_message_after_tag(s: &mut tokio::io::DuplexStream, tag: u8) -> (u8, Vec<u8>) {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
        s.read_exact(&mut body).await.unwrap();
        (tag, body)
    }

    #[tokio::test]
    async fn exchange_over_the_wire_with_a_real_client() {
        let v: Verifier = postgres_protocol::password::scram_sha_256(b"pw")
            .parse()
            .unwrap();
        for (password, ok) in [("pw", true), ("bad", false)] {
            let (a, b) = tokio::io::duplex(4096);
            let client = tokio::spawn(client_side(b, password));
            let mut a = a;
            let res = exchange_with_client(
                &mut a,
                ServerExchange::new(v.clone(), ChannelBinding::None),
                &ChannelBinding::None,
                &id(),
            )
            .await;
            drop(a);
            assert_eq!(res.is_ok(), ok, "{password}: {res:?}");
            assert_eq!(client.await.unwrap().is_ok(), ok);
            if !ok {
                assert!(matches!(
                    res,
                    Err(LoginError::Scram(ScramError::AuthFailed))
                ));
            }
        }
    }

    #[tokio::test]
    async fn a_client_that_does_not_speak_sasl_is_told_what_to_change() {
        let v: Verifier = postgres_protocol::password::scram_sha_256(b"pw")
            .parse()
            .unwrap();
        let (mut a, mut b) = tokio::io::duplex(4096);
        let client = tokio::spawn(async move {
            let _ = read_message(&mut b, 1024).await.unwrap();
            // A cleartext PasswordMessage, as a client without SCRAM would (wrongly) send.
            b.write_all(b"p\0\0\0\x07pw\0").await.unwrap();
        });
        let res = exchange_with_client(
            &mut a,
            ServerExchange::new(v, ChannelBinding::None),
            &ChannelBinding::None,
            &id(),
        )
        .await;
        client.await.unwrap();
        // "pw\0" is not a SASLInitialResponse: the mechanism name is followed by no length.
        assert!(
            matches!(res, Err(LoginError::Scram(ScramError::Malformed(_)))),
            "{res:?}"
        );
        let err = LoginError::Failed {
            role: "alice".into(),
        };
        assert_eq!(
            err.client_response().unwrap().1,
            "password authentication failed for user \"alice\""
        );
        let (code, _, hint) = LoginError::NotScram { endpoint: id() }
            .client_response()
            .unwrap();
        assert_eq!(code, "28000");
        assert!(hint.unwrap().contains("auth = \"passthrough\""));
    }
}
