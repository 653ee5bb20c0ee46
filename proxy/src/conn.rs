//! One client connection, from the first byte to the end of forwarding.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use pgwake_compute_manager::Lease;
use pgwake_router::EndpointId;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::error::ProxyError;
use crate::options::extract_endpoint;
use crate::passthrough::{self, Transferred};
use crate::wire::{read_startup_packet, ReadError, StartupMessage, StartupPacket};
use crate::Proxy;

/// At most this many SSLRequest/GSSENCRequest packets before the StartupMessage; libpq sends
/// at most one of each, and an unbounded loop would let a client hold a slot forever.
const MAX_NEGOTIATIONS: usize = 2;

pub(crate) async fn handle(
    proxy: &Arc<Proxy>,
    client: &mut TcpStream,
    peer: SocketAddr,
) -> Result<Transferred, ProxyError> {
    let _ = client.set_nodelay(true);
    let cfg = &proxy.cfg;
    let Some(mut startup) = tokio::time::timeout(cfg.startup_timeout, read_startup(client))
        .await
        .map_err(|_| ProxyError::StartupTimeout)??
    else {
        return Ok(Transferred::default());
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
    let (lease, mut compute) = connect_compute(proxy, &route).await?;
    debug!(addr = %lease.addr, cold = lease.cold, %peer, "connected to compute");

    let mut buf = BytesMut::with_capacity(256);
    startup.encode(&mut buf);
    compute
        .write_all(&buf)
        .await
        .map_err(|source| ProxyError::ComputeConnect {
            endpoint: endpoint.clone(),
            addr: lease.addr.to_string(),
            source,
        })?;

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
    match outcome.result {
        Ok(()) => debug!(mode = ?outcome.mode, "session ended"),
        // Mid-session there is no protocol state in which an ErrorResponse from us would make
        // sense to the client, so a broken side just ends the session.
        Err(e) => info!(error = %e, mode = ?outcome.mode, "session ended by an error"),
    }
    drop(lease);
    Ok(bytes)
}

async fn read_startup(client: &mut TcpStream) -> Result<Option<StartupMessage>, ProxyError> {
    let mut negotiations = 0;
    loop {
        let packet = read_startup_packet(client).await.map_err(|e| match e {
            ReadError::Eof => ProxyError::ClientGone,
            ReadError::Io(e) => ProxyError::ClientIo(e),
            ReadError::Wire(w) => ProxyError::Wire(w),
        })?;
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                negotiations += 1;
                if negotiations > MAX_NEGOTIATIONS {
                    return Err(ProxyError::NegotiationLoop);
                }
                // 'N': no encryption here; libpq then sends its StartupMessage in the clear
                // (or gives up if it required encryption).
                client.write_all(b"N").await.map_err(ProxyError::ClientIo)?;
            }
            StartupPacket::CancelRequest { .. } => {
                // Postgres never answers a CancelRequest; until cancel keys are mapped, one
                // is dropped without touching any compute.
                debug!("cancel request ignored");
                return Ok(None);
            }
            StartupPacket::Startup(m) => return Ok(Some(m)),
        }
    }
}

/// Takes the endpoint id out of the startup's `options`, leaving every other option for the
/// compute.
fn take_endpoint(startup: &mut StartupMessage) -> Result<EndpointId, ProxyError> {
    let Some(options) = startup.get("options") else {
        return Err(ProxyError::NoEndpoint);
    };
    let extracted = extract_endpoint(options)?;
    match extracted.rest {
        Some(rest) => startup.set("options", rest),
        None => {
            startup.remove("options");
        }
    }
    let id = extracted.endpoint.ok_or(ProxyError::NoEndpoint)?;
    Ok(EndpointId::parse(&id)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> StartupMessage {
        StartupMessage {
            major: 3,
            minor: 0,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn endpoint_is_taken_and_other_options_kept() {
        let mut s = startup(&[("user", "u"), ("options", "-c geqo=off endpoint=ep-1")]);
        assert_eq!(take_endpoint(&mut s).unwrap().as_str(), "ep-1");
        assert_eq!(s.get("options"), Some("-c geqo=off"));

        let mut s = startup(&[("user", "u"), ("options", "--endpoint=ep-1")]);
        take_endpoint(&mut s).unwrap();
        assert_eq!(s.get("options"), None);
    }

    #[test]
    fn endpoint_errors() {
        let mut s = startup(&[("user", "u")]);
        assert!(matches!(take_endpoint(&mut s), Err(ProxyError::NoEndpoint)));
        let mut s = startup(&[("user", "u"), ("options", "-c geqo=off")]);
        assert!(matches!(take_endpoint(&mut s), Err(ProxyError::NoEndpoint)));
        let mut s = startup(&[("user", "u"), ("options", "endpoint=Bad_Id")]);
        assert!(matches!(
            take_endpoint(&mut s),
            Err(ProxyError::InvalidEndpoint(_))
        ));
        let mut s = startup(&[("user", "u"), ("options", "endpoint=a endpoint=b")]);
        assert!(matches!(take_endpoint(&mut s), Err(ProxyError::Options(_))));
    }
}
