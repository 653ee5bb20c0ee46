//! One client connection, from the first byte to the end of forwarding.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use pgwake_compute_manager::Lease;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::cancel::{self, CancelGuard, CancelTarget};
use crate::error::ProxyError;
use crate::handshake::{read_startup, take_endpoint, First};
use crate::passthrough::{self, Transferred};
use crate::proxy_protocol;
use crate::Proxy;

pub(crate) async fn handle(
    proxy: &Arc<Proxy>,
    client: &mut TcpStream,
    peer: SocketAddr,
) -> Result<Transferred, ProxyError> {
    let _ = client.set_nodelay(true);
    let started = std::time::Instant::now();
    let cfg = &proxy.cfg;
    let (client_addr, first) = tokio::time::timeout(cfg.startup_timeout, async {
        let real = proxy_protocol::read_header(client, cfg.proxy_protocol)
            .await
            .map_err(ProxyError::ProxyHeader)?;
        let client_addr = real.unwrap_or(peer);
        tracing::Span::current().record("client", tracing::field::display(client_addr));
        if !proxy.limits.admit_ip(client_addr.ip()) {
            return Err(ProxyError::RateLimited);
        }
        Ok((client_addr, read_startup(client).await?))
    })
    .await
    .map_err(|_| ProxyError::StartupTimeout)??;
    let mut startup = match first {
        First::Startup(m) => m,
        First::Cancel { pid, secret } => {
            cancel(proxy, pid, &secret).await;
            return Ok(Transferred::default());
        }
    };
    if startup.get("user").is_none() {
        return Err(ProxyError::NoUser);
    }
    let endpoint = take_endpoint(&mut startup)?;
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
    let (lease, mut compute) = connect_compute(proxy, &route).await?;
    debug!(addr = %lease.addr, cold = lease.cold, "connected to compute");
    let compute_err = |source| ProxyError::ComputeProtocol {
        endpoint: endpoint.clone(),
        source,
    };

    let mut buf = BytesMut::with_capacity(256);
    startup.encode(&mut buf);
    compute.write_all(&buf).await.map_err(compute_err)?;
    let target = CancelTarget {
        endpoint: endpoint.clone(),
        addr: lease.addr.clone(),
        pid: 0,
        secret: Vec::new(),
    };
    let _cancel_key = match authenticate(proxy, client, &mut compute, target).await? {
        AuthOutcome::Ready(key) => key,
        // The compute refused the session (bad password, no such database) and said why;
        // the client has its ErrorResponse.
        AuthOutcome::Refused => return Ok(Transferred::default()),
    };

    let outcome = passthrough::relay(client, &mut compute).await;
    let bytes = outcome.bytes;
    proxy
        .metrics
        .bytes
        .with_label_values(&["client_to_compute"])
        .inc_by(bytes.client_to_compute);
    proxy
        .metrics
        .bytes
        .with_label_values(&["compute_to_client"])
        .inc_by(bytes.compute_to_client);
    // One line per session (the access log); the span adds session, client and endpoint.
    let (c2s, s2c, ms) = (
        bytes.client_to_compute,
        bytes.compute_to_client,
        started.elapsed().as_millis() as u64,
    );
    match outcome.result {
        Ok(()) => info!(mode = ?outcome.mode, c2s, s2c, ms, cold = lease.cold, "session closed"),
        // Mid-session there is no protocol state in which an ErrorResponse from us would make
        // sense to the client, so a broken side just ends the session.
        Err(e) => {
            info!(error = %e, mode = ?outcome.mode, c2s, s2c, ms, "session ended by an error")
        }
    }
    drop(lease);
    Ok(bytes)
}

/// Forwards a CancelRequest to the compute that issued the key, or drops it without a word
/// (as Postgres does) when the key is not one we handed out.
async fn cancel(proxy: &Arc<Proxy>, pid: i32, secret: &[u8]) {
    let Some(target) = proxy.cancels.lookup(pid, secret) else {
        proxy
            .metrics
            .cancels
            .with_label_values(&["unknown_key"])
            .inc();
        debug!("cancel request with an unknown key dropped");
        return;
    };
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

const CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest message relayed one by one during authentication (SASL, GSS tokens, parameter
/// status, errors); real ones are a few hundred bytes.
const MAX_AUTH_MESSAGE: usize = 64 * 1024;

/// Relays the authentication exchange message by message, until the compute says
/// ReadyForQuery: the only part of a session the proxy must understand, because the compute's
/// BackendKeyData is swapped for a proxy-issued key here.
async fn authenticate(
    proxy: &Arc<Proxy>,
    client: &mut TcpStream,
    compute: &mut TcpStream,
    mut target: CancelTarget,
) -> Result<AuthOutcome, ProxyError> {
    let endpoint = target.endpoint.clone();
    let compute_err = |source| ProxyError::ComputeProtocol {
        endpoint: endpoint.clone(),
        source,
    };
    let mut out = BytesMut::with_capacity(1024);
    let mut guard = None;
    loop {
        let (tag, body) = read_message(compute, MAX_AUTH_MESSAGE)
            .await
            .map_err(compute_err)?;
        if tag == b'K' {
            if body.len() < 8 || body.len() > 4 + crate::wire::MAX_CANCEL_SECRET_LEN {
                return Err(compute_err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "bad BackendKeyData",
                )));
            }
            target.pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            target.secret = body[4..].to_vec();
            let (pid, secret, g) = proxy.cancels.register(target.clone());
            guard = Some(g);
            out.put_u8(b'K');
            out.put_u32((8 + secret.len()) as u32);
            out.put_i32(pid);
            out.put_slice(&secret);
            continue;
        }
        out.put_u8(tag);
        out.put_u32((body.len() + 4) as u32);
        out.put_slice(&body);
        match tag {
            b'R' if body.len() >= 4 && auth_needs_reply(&body) => {
                client.write_all(&out).await.map_err(ProxyError::ClientIo)?;
                out.clear();
                let (ctag, cbody) = read_message(client, MAX_AUTH_MESSAGE)
                    .await
                    .map_err(ProxyError::ClientIo)?;
                let mut m = BytesMut::with_capacity(cbody.len() + 5);
                m.put_u8(ctag);
                m.put_u32((cbody.len() + 4) as u32);
                m.put_slice(&cbody);
                compute.write_all(&m).await.map_err(compute_err)?;
            }
            b'Z' => {
                client.write_all(&out).await.map_err(ProxyError::ClientIo)?;
                return Ok(AuthOutcome::Ready(guard));
            }
            b'E' => {
                let _ = client.write_all(&out).await;
                return Ok(AuthOutcome::Refused);
            }
            _ => {}
        }
    }
}

enum AuthOutcome {
    /// ReadyForQuery: the session is established. The guard (if the compute sent a key)
    /// keeps the cancel key valid for as long as it lives.
    Ready(Option<CancelGuard>),
    Refused,
}

/// Authentication requests the client must answer: everything but Ok (0) and SASLFinal (12).
fn auth_needs_reply(body: &[u8]) -> bool {
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    matches!(code, 2 | 3 | 5 | 7 | 8 | 9 | 10 | 11)
}

/// One protocol message (type byte, length, body), refusing lengths over `max` before
/// allocating.
async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let body_len = len.checked_sub(4).filter(|&n| n <= max).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message length {len}"),
        )
    })?;
    let mut body = vec![0u8; body_len];
    r.read_exact(&mut body).await?;
    Ok((head[0], body))
}

/// Attempts at wake+connect. A compute that crashed a moment ago is still "running" to the
/// manager until its exit is reaped; a refused connect then means "wake again".
const CONNECT_ATTEMPTS: usize = 3;

async fn connect_compute(
    proxy: &Arc<Proxy>,
    route: &Arc<pgwake_router::Route>,
) -> Result<(Lease, TcpStream), ProxyError> {
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
