//! Connecting to a compute: wake it through the manager, connect with bounded retries, and
//! (with `[tls] compute_tls`) negotiate TLS, so the connection path gets a ready stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgwake_compute_manager::{Attached, ComputeAddr};
use pgwake_router::Route;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::error::ProxyError;
use crate::shared::Proxy;
use crate::spare::{NextSpare, Outcome};
use crate::stream::ComputeStream;
use crate::{fd, wire};

/// Attempts at wake+connect. A compute that crashed a moment ago is still "running" to the
/// manager until its exit is reaped; a refused connect then means "wake again".
const CONNECT_ATTEMPTS: usize = 3;

/// Wakes `route`'s compute, connects to it and sends the client's `startup`: over a spare
/// connection when one is ready (see `spare`), else over a new one. The lease keeps the compute
/// up while held.
///
/// The returned [`NextSpare`], when there is one, opens the endpoint's next spare once dropped;
/// the caller drops it when the client's login is done.
pub(crate) async fn start_session(
    proxy: &Proxy,
    route: &Arc<Route>,
    startup: &[u8],
) -> Result<(Attached, ComputeStream, Option<NextSpare>), ProxyError> {
    let mut lease = None;
    let mut next = None;
    if let Some(spares) = &proxy.spares {
        let attached = wake(proxy, route).await?;
        let (spare, next_spare) = spares.take(&route.endpoint, &attached.addr);
        next = next_spare;
        if let Some(sock) = spare {
            match start_on_spare(sock, startup, proxy.cfg.connect_timeout).await {
                Ok(tcp) => {
                    spares.count(Outcome::Used);
                    debug!(addr = %attached.addr, "session started on a spare compute connection");
                    return Ok((attached, ComputeStream::Plain(tcp), next));
                }
                // Nothing reached the client yet, so a fresh connection can take over.
                Err(e) => {
                    debug!(addr = %attached.addr, error = %e, "spare compute connection failed; connecting anew");
                    spares.count(Outcome::Dead);
                }
            }
        }
        lease = Some(attached);
    }
    let (lease, mut compute) = connect_with(proxy, route, lease).await?;
    compute
        .write_all(startup)
        .await
        .map_err(|source| ProxyError::ComputeProtocol {
            endpoint: route.endpoint.clone(),
            source,
        })?;
    Ok((lease, compute, next))
}

/// Sends `startup` over a spare and waits for the compute's first byte of answer, which shows
/// the backend behind it was alive to read the startup.
async fn start_on_spare(
    sock: std::net::TcpStream,
    startup: &[u8],
    within: Duration,
) -> std::io::Result<TcpStream> {
    let mut tcp = TcpStream::from_std(sock)?;
    tcp.write_all(startup).await?;
    let mut first = [0u8; 1];
    match tokio::time::timeout(within, tcp.peek(&mut first)).await {
        Ok(Ok(0)) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        Ok(Ok(_)) => Ok(tcp),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn wake(proxy: &Proxy, route: &Arc<Route>) -> Result<Attached, ProxyError> {
    proxy.wake(route).await.map_err(|source| ProxyError::Wake {
        endpoint: route.endpoint.clone(),
        source,
    })
}

/// Wakes `route`'s compute and connects to it; the lease keeps the compute up while held.
pub(crate) async fn connect(
    proxy: &Proxy,
    route: &Arc<Route>,
) -> Result<(Attached, ComputeStream), ProxyError> {
    connect_with(proxy, route, None).await
}

/// [`connect`], with the lease of a wake already done for the first attempt.
async fn connect_with(
    proxy: &Proxy,
    route: &Arc<Route>,
    woken: Option<Attached>,
) -> Result<(Attached, ComputeStream), ProxyError> {
    let (lease, tcp) = connect_tcp(proxy, route, woken).await?;
    debug!(addr = %lease.addr, cold = lease.cold, "connected to compute");
    let stream = match &proxy.compute_tls {
        Some(connector) => negotiate_tls(connector, tcp, &lease.addr)
            .await
            .map_err(|source| ProxyError::ComputeProtocol {
                endpoint: route.endpoint.clone(),
                source,
            })?,
        None => ComputeStream::Plain(tcp),
    };
    Ok((lease, stream))
}

async fn connect_tcp(
    proxy: &Proxy,
    route: &Arc<Route>,
    mut woken: Option<Attached>,
) -> Result<(Attached, TcpStream), ProxyError> {
    let endpoint = &route.endpoint;
    let mut last_err = None;
    for attempt in 0..CONNECT_ATTEMPTS {
        let lease = match woken.take() {
            Some(lease) => lease,
            None => wake(proxy, route).await?,
        };
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
            Err(e) if fd::is_exhaustion(&e) => {
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
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
            }
        }
    }
    Err(last_err.expect("at least one attempt"))
}

/// SSLRequest to the compute, then a TLS handshake verified against `[tls] compute_ca`, with
/// the compute's host (name or IP) as the server name.
async fn negotiate_tls(
    connector: &tokio_rustls::TlsConnector,
    mut tcp: TcpStream,
    addr: &ComputeAddr,
) -> std::io::Result<ComputeStream> {
    let mut req = BytesMut::with_capacity(8);
    req.extend_from_slice(&8u32.to_be_bytes());
    req.extend_from_slice(&wire::SSL_REQUEST_CODE.to_be_bytes());
    tcp.write_all(&req).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "compute does not accept TLS",
        ));
    }
    let name = rustls::pki_types::ServerName::try_from(addr.host().to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tls = connector.connect(name, tcp).await?;
    Ok(ComputeStream::Tls(Box::new(tls)))
}
