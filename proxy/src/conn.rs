//! One client connection, from the first byte to the end of forwarding:
//! PROXY header → (TLS) → StartupMessage → endpoint → limits → wake → authenticate → relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use pgwake_router::EndpointId;
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedSemaphorePermit;
use tracing::info;

use crate::auth::{authenticate, request_password, AuthOutcome, ComputeCreds, ProxyAuth};
use crate::cancel::CancelTarget;
use crate::error::ProxyError;
use crate::handshake::{read_startup, take_endpoint, Encryption, First};
use crate::limits::IpSlot;
use crate::passthrough::{self, Transferred};
use crate::shared::Proxy;
use crate::stream::{ClientStream, ComputeStream};
use crate::tls::{endpoint_from_sni, looks_like_tls, parse_password_endpoint, Negotiation};
use crate::wire::StartupMessage;
use crate::{compute, proxy_protocol};

/// What the startup phase found out.
struct Hello {
    startup: StartupMessage,
    client_addr: SocketAddr,
    sni: Option<String>,
    /// Of the certificate the client's TLS handshake presented (SCRAM-SHA-256-PLUS).
    channel_binding: Option<Vec<u8>>,
    /// The client address's place under `max_connections_per_ip`, for the whole connection.
    ip_slot: IpSlot,
}

/// `starting` is the connection's place under `max_pending_startups`: given back once the
/// startup is read, when the connection takes a session place instead.
pub(crate) async fn handle(
    proxy: &Arc<Proxy>,
    client: &mut ClientStream,
    peer: SocketAddr,
    starting: OwnedSemaphorePermit,
) -> Result<Transferred, ProxyError> {
    // TCP_NODELAY and keepalive came with the socket from the listener (`bind_clients`).
    let started = Instant::now();
    let hello = tokio::time::timeout(proxy.cfg.startup_timeout, hello(proxy, client, peer))
        .await
        .map_err(|_| ProxyError::StartupTimeout)??;
    let Some(Hello {
        mut startup,
        client_addr,
        sni,
        channel_binding,
        ip_slot: _ip_slot,
    }) = hello
    else {
        return Ok(Transferred::default());
    };
    drop(starting);
    // The startup is read, so a refusal here reaches the client as a clean ErrorResponse.
    let _session = Arc::clone(&proxy.limit)
        .try_acquire_owned()
        .map_err(|_| ProxyError::TooManyConnections)?;
    if startup.get_bytes("user").is_none() {
        return Err(ProxyError::NoUser);
    }

    let (endpoint, mut proxy_auth) =
        find_endpoint(proxy, client, &mut startup, sni.as_deref()).await?;
    if client.is_ws() && proxy_auth.is_none() {
        proxy_auth = Some(ws_password(client, &startup).await?);
    }
    tracing::Span::current().record("endpoint", endpoint.as_str());
    // Before the route is used and before any wake: failed logins never reach the manager.
    let verified = crate::login::login(
        proxy,
        client,
        &endpoint,
        startup.get("user").unwrap_or_default(),
        proxy_auth.as_ref().map(|a| a.password.as_str()),
        client_addr.ip(),
        channel_binding.as_deref(),
    )
    .await?;
    let proxy_auth = ComputeCreds::after_login(verified, proxy_auth);

    let (route, _slot) = proxy.admit(&endpoint, client_addr.ip())?;
    let mut buf = BytesMut::with_capacity(256);
    startup.encode(&mut buf);
    let (lease, mut compute, next_spare) = compute::start_session(proxy, &route, &buf).await?;
    let target = CancelTarget {
        endpoint: endpoint.clone(),
        addr: lease.addr.clone(),
        pid: 0,
        secret: Vec::new(),
    };
    let _cancel_key = match authenticate(
        proxy.cancels.map(),
        client,
        &mut compute,
        target,
        proxy_auth,
    )
    .await?
    {
        AuthOutcome::Ready(key) => key,
        // The compute refused the session (bad password, no such database) and said why;
        // the client has its ErrorResponse.
        AuthOutcome::Refused => return Ok(Transferred::default()),
    };
    // The client's backend is ready: only now may the compute fork the next one.
    drop(next_spare);

    let tls = client.is_tls();
    let outcome = match (client, &mut compute) {
        // Zero-copy only where both sides are plain TCP: splice cannot see through rustls.
        (ClientStream::Plain(tcp), ComputeStream::Plain(c)) => passthrough::relay(tcp, c).await,
        // The client's plaintext goes to the compute from rustls' own buffer.
        (ClientStream::Tls(tls), ComputeStream::Plain(c)) => {
            passthrough::relay_buffered(tls.as_mut(), c).await
        }
        (client, compute) => passthrough::relay_copy(client, compute).await,
    };
    let (bytes, zero_copy) = (outcome.bytes, outcome.spliced);
    let m = &proxy.metrics;
    for (direction, n, z) in [
        (
            "client_to_compute",
            bytes.client_to_compute,
            zero_copy.client_to_compute,
        ),
        (
            "compute_to_client",
            bytes.compute_to_client,
            zero_copy.compute_to_client,
        ),
    ] {
        m.bytes.with_label_values(&[direction]).inc_by(n);
        m.spliced.with_label_values(&[direction]).inc_by(z);
    }
    // One line per session (the access log); the span adds session, client and endpoint.
    let (c2s, s2c) = (bytes.client_to_compute, bytes.compute_to_client);
    let spliced = zero_copy.client_to_compute + zero_copy.compute_to_client;
    let ms = started.elapsed().as_millis() as u64;
    match outcome.result {
        Ok(()) => {
            info!(mode = ?outcome.mode, tls, c2s, s2c, spliced, ms, cold = lease.cold, "session closed")
        }
        // Mid-session there is no protocol state in which an ErrorResponse from us would make
        // sense to the client, so a broken side just ends the session.
        Err(e) => {
            info!(error = %e, mode = ?outcome.mode, tls, c2s, s2c, spliced, ms, "session ended by an error")
        }
    }
    drop(lease);
    Ok(bytes)
}

/// PROXY header, rate limit, TLS, and the StartupMessage; `None` for a CancelRequest (handled
/// here, never answered).
async fn hello(
    proxy: &Arc<Proxy>,
    client: &mut ClientStream,
    peer: SocketAddr,
) -> Result<Option<Hello>, ProxyError> {
    let cfg = &proxy.cfg;
    let client_addr = match client {
        ClientStream::Plain(tcp) => proxy_protocol::read_header(tcp, cfg.proxy_protocol)
            .await
            .map_err(ProxyError::ProxyHeader)?
            .unwrap_or(peer),
        _ => peer,
    };
    tracing::Span::current().record("client", tracing::field::display(client_addr));
    if !proxy.limits.admit_ip(client_addr.ip()) {
        return Err(ProxyError::RateLimited);
    }
    let Some(ip_slot) = proxy.limits.acquire_ip(client_addr.ip()) else {
        read_first_message_briefly(client).await;
        return Err(ProxyError::TooManyFromAddress);
    };

    // A WebSocket's `Host` header names the endpoint the way an SNI does.
    let mut sni = match client {
        ClientStream::Ws(ws) => ws.host.clone(),
        _ => None,
    };
    let mut channel_binding = None;
    if let Some(acceptor) = &proxy.tls {
        // PostgreSQL 17's direct TLS: a ClientHello instead of an SSLRequest.
        let mut first = [0u8; 2];
        let n = match client {
            ClientStream::Plain(tcp) => tcp.peek(&mut first).await.map_err(ProxyError::ClientIo)?,
            _ => 0,
        };
        if n > 0 && looks_like_tls(&first[..n]) {
            (sni, channel_binding) = upgrade(proxy, acceptor, client, Negotiation::Direct).await?;
        }
    }

    loop {
        let encryption = match (&proxy.tls, client.is_tls()) {
            (_, true) => Encryption::Established,
            // TLS, if any, is the WebSocket's (wss://); the driver sends no SSLRequest.
            _ if client.is_ws() => Encryption::Unavailable,
            (Some(_), false) => Encryption::Available,
            (None, false) => Encryption::Unavailable,
        };
        match read_startup(client, encryption).await? {
            First::Tls => {
                let acceptor = proxy
                    .tls
                    .as_ref()
                    .expect("TLS offered only when configured");
                client.write_all(b"S").await.map_err(ProxyError::ClientIo)?;
                (sni, channel_binding) =
                    upgrade(proxy, acceptor, client, Negotiation::SslRequest).await?;
            }
            First::Cancel { pid, secret } => {
                proxy.cancels.handle_client_request(pid, &secret).await;
                return Ok(None);
            }
            First::Startup(startup) => {
                if proxy.tls_cfg.require_tls && !client.is_secure() {
                    return Err(ProxyError::TlsRequired);
                }
                return Ok(Some(Hello {
                    startup,
                    client_addr,
                    sni,
                    channel_binding,
                    ip_slot,
                }));
            }
        }
    }
}

/// Reads (and drops) what the client sent first, waiting at most half a second, so that an
/// error sent before its startup is read does not meet unread data: closing then would send a
/// reset, which can destroy the error before the client reads it.
pub(crate) async fn read_first_message_briefly(client: &mut ClientStream) {
    let mut first = [0u8; 1024];
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        tokio::io::AsyncReadExt::read(client, &mut first),
    )
    .await;
}

async fn upgrade(
    proxy: &Arc<Proxy>,
    acceptor: &crate::tls::TlsAcceptor,
    client: &mut ClientStream,
    mode: Negotiation,
) -> Result<(Option<String>, Option<Vec<u8>>), ProxyError> {
    let tcp = client.take_plain().ok_or(ProxyError::NegotiationInTls)?;
    let session = acceptor.accept(tcp, mode).await.map_err(|e| {
        proxy
            .metrics
            .tls_handshakes
            .with_label_values(&[e.kind()])
            .inc();
        ProxyError::Tls(e)
    })?;
    proxy
        .metrics
        .tls_handshakes
        .with_label_values(&["ok"])
        .inc();
    *client = ClientStream::Tls(Box::new(session.stream));
    Ok((session.sni, session.channel_binding))
}

/// The endpoint id, from SNI, `options`, or (when enabled, over TLS only) the password; the
/// first two must agree when both are given.
async fn find_endpoint(
    proxy: &Arc<Proxy>,
    client: &mut ClientStream,
    startup: &mut StartupMessage,
    sni: Option<&str>,
) -> Result<(EndpointId, Option<ProxyAuth>), ProxyError> {
    let domains = &proxy.tls_cfg.domains;
    let from_sni = match client {
        ClientStream::Ws(ws) if ws.endpoint.is_some() => ws.endpoint.clone(),
        _ if domains.is_empty() => None,
        _ => endpoint_from_sni(sni, domains)?,
    };
    let from_options = take_endpoint(startup)?;
    match (from_sni, from_options) {
        (Some(a), Some(b)) if a != b => Err(ProxyError::EndpointConflict { sni: a, options: b }),
        (Some(id), _) | (None, Some(id)) => Ok((id, None)),
        (None, None) if proxy.tls_cfg.allow_password_endpoint && client.is_tls() => {
            let password = request_password(client).await?;
            let (id, real) = parse_password_endpoint(&password).ok_or(ProxyError::NoEndpoint)?;
            let id = EndpointId::parse(&id)?;
            let user = startup.get_bytes("user").unwrap_or_default().to_vec();
            Ok((
                id,
                Some(ProxyAuth {
                    user,
                    password: real,
                }),
            ))
        }
        (None, None) => Err(ProxyError::NoEndpoint),
    }
}

/// The serverless driver pipelines its cleartext password right after the startup, without
/// waiting to be asked, so a WebSocket client is always asked for one (and the question is
/// already answered): the proxy then verifies it (SCRAM endpoints) or answers the compute's
/// authentication with it (passthrough endpoints), exactly as for `endpoint=ID;PASSWORD`.
async fn ws_password(
    client: &mut ClientStream,
    startup: &StartupMessage,
) -> Result<ProxyAuth, ProxyError> {
    let password = request_password(client).await?;
    Ok(ProxyAuth {
        user: startup.get_bytes("user").unwrap_or_default().to_vec(),
        password,
    })
}
