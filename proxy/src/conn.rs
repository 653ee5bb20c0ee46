//! One client connection, from the first byte to the end of forwarding:
//! PROXY header → (TLS) → StartupMessage → endpoint → limits → wake → authenticate → relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use pgwake_compute_manager::Attached;
use pgwake_router::EndpointId;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::auth::{authenticate, request_password, AuthOutcome, ProxyAuth};
use crate::cancel::{self, CancelTarget};
use crate::error::ProxyError;
use crate::handshake::{read_startup, take_endpoint, Encryption, First};
use crate::passthrough::{self, Transferred};
use crate::stream::{ClientStream, ComputeStream};
use crate::tls::{endpoint_from_sni, looks_like_tls, parse_password_endpoint, Negotiation};
use crate::wire::StartupMessage;
use crate::{proxy_protocol, Proxy};

const CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Each step of a cancel between replicas: resolve, connect and send, or read the request.
const PEER_CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the startup phase found out.
struct Hello {
    startup: StartupMessage,
    client_addr: SocketAddr,
    sni: Option<String>,
}

pub(crate) async fn handle(
    proxy: &Arc<Proxy>,
    client: &mut ClientStream,
    peer: SocketAddr,
) -> Result<Transferred, ProxyError> {
    if let Some(tcp) = client.tcp() {
        let _ = tcp.set_nodelay(true);
    }
    let started = Instant::now();
    let hello = tokio::time::timeout(proxy.cfg.startup_timeout, hello(proxy, client, peer))
        .await
        .map_err(|_| ProxyError::StartupTimeout)??;
    let Some(Hello {
        mut startup,
        client_addr,
        sni,
    }) = hello
    else {
        return Ok(Transferred::default());
    };
    if startup.get("user").is_none() {
        return Err(ProxyError::NoUser);
    }

    let (endpoint, proxy_auth) = find_endpoint(proxy, client, &mut startup, sni.as_deref()).await?;
    tracing::Span::current().record("endpoint", endpoint.as_str());

    let route = proxy
        .table
        .lookup(&endpoint)
        .ok_or_else(|| ProxyError::UnknownEndpoint(endpoint.clone()))?;
    // Before any wake: a refused client must not be able to start (and pay for) a compute.
    if !route.allows(client_addr.ip()) {
        return Err(ProxyError::NotAllowed(endpoint));
    }
    let _slot = proxy
        .limits
        .acquire_endpoint(&endpoint, route.max_connections)
        .ok_or_else(|| ProxyError::EndpointFull(endpoint.clone()))?;
    let (lease, compute) = connect_compute(proxy, &route).await?;
    debug!(addr = %lease.addr, cold = lease.cold, "connected to compute");
    let mut compute = match &proxy.compute_tls {
        Some(connector) => {
            compute_tls(connector, compute, &lease.addr)
                .await
                .map_err(|source| ProxyError::ComputeProtocol {
                    endpoint: endpoint.clone(),
                    source,
                })?
        }
        None => ComputeStream::Plain(compute),
    };

    let mut buf = BytesMut::with_capacity(256);
    startup.encode(&mut buf);
    compute
        .write_all(&buf)
        .await
        .map_err(|source| ProxyError::ComputeProtocol {
            endpoint: endpoint.clone(),
            source,
        })?;
    let target = CancelTarget {
        endpoint: endpoint.clone(),
        addr: lease.addr.clone(),
        pid: 0,
        secret: Vec::new(),
    };
    let _cancel_key =
        match authenticate(&proxy.cancels, client, &mut compute, target, proxy_auth).await? {
            AuthOutcome::Ready(key) => key,
            // The compute refused the session (bad password, no such database) and said why;
            // the client has its ErrorResponse.
            AuthOutcome::Refused => return Ok(Transferred::default()),
        };

    let tls = client.is_tls();
    let outcome = match (client, &mut compute) {
        // Zero-copy only where both sides are plain TCP: splice cannot see through rustls.
        (ClientStream::Plain(tcp), ComputeStream::Plain(c)) => passthrough::relay(tcp, c).await,
        (client, compute) => passthrough::relay_copy(client, compute).await,
    };
    let bytes = outcome.bytes;
    let m = &proxy.metrics;
    m.bytes
        .with_label_values(&["client_to_compute"])
        .inc_by(bytes.client_to_compute);
    m.bytes
        .with_label_values(&["compute_to_client"])
        .inc_by(bytes.compute_to_client);
    // One line per session (the access log); the span adds session, client and endpoint.
    let (c2s, s2c) = (bytes.client_to_compute, bytes.compute_to_client);
    let ms = started.elapsed().as_millis() as u64;
    match outcome.result {
        Ok(()) => {
            info!(mode = ?outcome.mode, tls, c2s, s2c, ms, cold = lease.cold, "session closed")
        }
        // Mid-session there is no protocol state in which an ErrorResponse from us would make
        // sense to the client, so a broken side just ends the session.
        Err(e) => {
            info!(error = %e, mode = ?outcome.mode, tls, c2s, s2c, ms, "session ended by an error")
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

    let mut sni = None;
    if let Some(acceptor) = &proxy.tls {
        // PostgreSQL 17's direct TLS: a ClientHello instead of an SSLRequest.
        let mut first = [0u8; 2];
        let n = match client {
            ClientStream::Plain(tcp) => tcp.peek(&mut first).await.map_err(ProxyError::ClientIo)?,
            _ => 0,
        };
        if n > 0 && looks_like_tls(&first[..n]) {
            sni = upgrade(proxy, acceptor, client, Negotiation::Direct).await?;
        }
    }

    loop {
        let encryption = match (&proxy.tls, client.is_tls()) {
            (_, true) => Encryption::Established,
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
                sni = upgrade(proxy, acceptor, client, Negotiation::SslRequest).await?;
            }
            First::Cancel { pid, secret } => {
                cancel(proxy, pid, &secret).await;
                return Ok(None);
            }
            First::Startup(startup) => {
                if proxy.tls_cfg.require_tls && !client.is_tls() {
                    return Err(ProxyError::TlsRequired);
                }
                return Ok(Some(Hello {
                    startup,
                    client_addr,
                    sni,
                }));
            }
        }
    }
}

async fn upgrade(
    proxy: &Arc<Proxy>,
    acceptor: &crate::tls::TlsAcceptor,
    client: &mut ClientStream,
    mode: Negotiation,
) -> Result<Option<String>, ProxyError> {
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
    Ok(session.sni)
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
    let from_sni = if domains.is_empty() {
        None
    } else {
        endpoint_from_sni(sni, domains)?
    };
    let from_options = take_endpoint(startup)?;
    match (from_sni, from_options) {
        (Some(a), Some(b)) if a != b => Err(ProxyError::EndpointConflict { sni: a, options: b }),
        (Some(id), _) | (None, Some(id)) => Ok((id, None)),
        (None, None) if proxy.tls_cfg.allow_password_endpoint && client.is_tls() => {
            let password = request_password(client).await?;
            let (id, real) = parse_password_endpoint(&password).ok_or(ProxyError::NoEndpoint)?;
            let id = EndpointId::parse(&id)?;
            let user = startup.get("user").unwrap_or_default().to_string();
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

/// SSLRequest to the compute, then a TLS handshake verified against `[tls] compute_ca`, with
/// the compute's host (name or IP) as the server name.
async fn compute_tls(
    connector: &tokio_rustls::TlsConnector,
    mut tcp: TcpStream,
    addr: &pgwake_compute_manager::ComputeAddr,
) -> std::io::Result<ComputeStream> {
    use tokio::io::AsyncReadExt;
    let mut req = BytesMut::with_capacity(8);
    req.extend_from_slice(&8u32.to_be_bytes());
    req.extend_from_slice(&crate::wire::SSL_REQUEST_CODE.to_be_bytes());
    tcp.write_all(&req).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "compute does not accept TLS",
        ));
    }
    let host = addr
        .as_str()
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr.as_str());
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tls = connector.connect(name, tcp).await?;
    Ok(ComputeStream::Tls(Box::new(tls)))
}

/// Forwards a CancelRequest to the compute that issued the key; a key not handed out here goes
/// to the peers (`cancel_peers`) when there are any, else is dropped without a word (as
/// Postgres does).
async fn cancel(proxy: &Arc<Proxy>, pid: i32, secret: &[u8]) {
    let peers = &proxy.cfg.cancel_peers;
    match proxy.cancels.lookup(pid, secret) {
        Some(target) => cancel_local(proxy, target).await,
        None if !peers.is_empty() => {
            // Not ours: another replica may hold the session; each checks the key itself.
            let delivered = cancel::forward_to_peers(peers, pid, secret, PEER_CANCEL_TIMEOUT).await;
            proxy
                .metrics
                .cancels
                .with_label_values(&["sent_to_peers"])
                .inc();
            debug!(
                delivered,
                "cancel request with a key not issued here sent to peers"
            );
        }
        None => unknown_cancel_key(proxy),
    }
}

/// A CancelRequest from another replica (`cancel_listen`): checked against this replica's
/// sessions only, never forwarded to peers again.
pub(crate) async fn peer_cancel(proxy: &Arc<Proxy>, mut s: TcpStream, peer: SocketAddr) {
    match cancel::read_peer_request(&mut s, PEER_CANCEL_TIMEOUT).await {
        Ok((pid, secret)) => match proxy.cancels.lookup(pid, &secret) {
            Some(target) => cancel_local(proxy, target).await,
            None => unknown_cancel_key(proxy),
        },
        Err(e) => {
            proxy
                .metrics
                .cancels
                .with_label_values(&["peer_refused"])
                .inc();
            debug!(%peer, error = %e, "cancel listener closed a connection that sent no CancelRequest");
        }
    }
}

fn unknown_cancel_key(proxy: &Proxy) {
    proxy
        .metrics
        .cancels
        .with_label_values(&["unknown_key"])
        .inc();
    debug!("cancel request with an unknown key dropped");
}

/// Forwards to the compute of a session of this replica whose key matched both halves.
async fn cancel_local(proxy: &Arc<Proxy>, target: CancelTarget) {
    tracing::Span::current().record("endpoint", target.endpoint.as_str());
    match cancel::forward(&target, CANCEL_TIMEOUT).await {
        Ok(()) => {
            proxy
                .metrics
                .cancels
                .with_label_values(&["forwarded"])
                .inc();
            info!("cancel request forwarded");
        }
        Err(e) => {
            proxy.metrics.cancels.with_label_values(&["failed"]).inc();
            warn!(error = %e, "cancel request could not be forwarded");
        }
    }
}

/// Attempts at wake+connect. A compute that crashed a moment ago is still "running" to the
/// manager until its exit is reaped; a refused connect then means "wake again".
const CONNECT_ATTEMPTS: usize = 3;

async fn connect_compute(
    proxy: &Arc<Proxy>,
    route: &Arc<pgwake_router::Route>,
) -> Result<(Attached, TcpStream), ProxyError> {
    let endpoint = &route.endpoint;
    let mut last_err = None;
    for attempt in 0..CONNECT_ATTEMPTS {
        let lease = proxy
            .manager
            .wake(route)
            .await
            .map_err(|source| ProxyError::Wake {
                endpoint: endpoint.clone(),
                source,
            })?;
        let res = tokio::time::timeout(
            proxy.cfg.connect_timeout,
            TcpStream::connect(lease.addr.as_str()),
        )
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        match res {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok((lease, s));
            }
            // Our own limit, not the compute's: another wake would not help.
            Err(e) if crate::server::is_fd_exhaustion(&e) => {
                warn!(addr = %lease.addr, "out of file descriptors for the compute connection (raise the fd limit or lower max_connections)");
                return Err(ProxyError::TooManyConnections);
            }
            Err(e) => {
                info!(attempt, addr = %lease.addr, error = %e, "connect to compute failed");
                let addr = lease.addr.to_string();
                drop(lease);
                last_err = Some(ProxyError::ComputeConnect {
                    endpoint: endpoint.clone(),
                    addr,
                    source: e,
                });
                // Give the manager's exit watcher a moment to mark a dead compute.
                tokio::time::sleep(std::time::Duration::from_millis(20 << attempt)).await;
            }
        }
    }
    Err(last_err.expect("at least one attempt"))
}
