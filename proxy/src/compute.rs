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
use crate::stream::ComputeStream;
use crate::{fd, wire};

/// Attempts at wake+connect. A compute that crashed a moment ago is still "running" to the
/// manager until its exit is reaped; a refused connect then means "wake again".
const CONNECT_ATTEMPTS: usize = 3;

/// Wakes `route`'s compute and connects to it; the lease keeps the compute up while held.
pub(crate) async fn connect(
    proxy: &Proxy,
    route: &Arc<Route>,
) -> Result<(Attached, ComputeStream), ProxyError> {
    let (lease, tcp) = connect_tcp(proxy, route).await?;
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
) -> Result<(Attached, TcpStream), ProxyError> {
    let endpoint = &route.endpoint;
    let mut last_err = None;
    for attempt in 0..CONNECT_ATTEMPTS {
        let lease = proxy.wake(route).await.map_err(|source| ProxyError::Wake {
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
