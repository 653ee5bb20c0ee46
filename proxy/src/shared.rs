//! The state every connection shares: configuration, routing table, manager, limits, cancel
//! keys, TLS. Built once by the binary; the accept loops (`server`) and each connection
//! (`conn`) only read it, so this module imports neither.

use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use pgwake_compute_manager::{Attached, ComputeWaker, WakeError};
use pgwake_router::{EndpointId, Route, RoutingTable};
use tokio::sync::Semaphore;

use crate::admin::Health;
use crate::cancel::Cancels;
use crate::error::ProxyError;
use crate::limits::{EndpointSlot, Limits, LimitsConfig};
use crate::tls::{TlsAcceptor, TlsConfig};
use crate::{ProxyConfig, ProxyMetrics};

/// Everything a connection needs, shared by all of them.
pub struct Proxy {
    pub(crate) cfg: ProxyConfig,
    pub(crate) table: Arc<RoutingTable>,
    pub(crate) manager: Arc<dyn ComputeWaker>,
    pub(crate) metrics: ProxyMetrics,
    pub(crate) limits: Limits,
    pub(crate) cancels: Arc<Cancels>,
    pub(crate) health: Arc<Health>,
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) tls_cfg: TlsConfig,
    pub(crate) compute_tls: Option<tokio_rustls::TlsConnector>,
    pub(crate) auth: Arc<crate::login::Auth>,
    pub(crate) sessions: AtomicU64,
    /// Sessions (connections past their startup), `[proxy] max_connections`.
    pub(crate) limit: Arc<Semaphore>,
    /// Connections before their startup, `[limits] max_pending_startups`.
    pub(crate) pending: Arc<Semaphore>,
    pub(crate) pending_total: u32,
    /// The runtime the proxy was built on, where the manager and its timers live; `None`
    /// outside a runtime (then wakes run wherever the session runs).
    pub(crate) home: Option<tokio::runtime::Handle>,
    /// Compute connections opened ahead of busy endpoints' next clients (`spare`); `None` when
    /// `[proxy] spare_max_age = "0s"` or with `[tls] compute_tls`.
    pub(crate) spares: Option<Arc<crate::spare::Spares>>,
}

/// What a [`Proxy`] is built from; the binary assembles it from the config file.
pub struct ProxyParts {
    pub cfg: ProxyConfig,
    pub table: Arc<RoutingTable>,
    /// The in-process manager, or a client of a remote one (`[compute] manager_url`).
    pub manager: Arc<dyn ComputeWaker>,
    pub metrics: ProxyMetrics,
    pub limits: LimitsConfig,
    pub health: Arc<Health>,
    pub tls_cfg: TlsConfig,
    /// `None` when no certificates are configured: SSLRequest is answered 'N'.
    pub tls: Option<TlsAcceptor>,
    /// `Some` when `[tls] compute_tls` is on.
    pub compute_tls: Option<Arc<rustls::ClientConfig>>,
    /// Logins at the proxy (SCRAM endpoints) and their verifiers.
    pub auth: Arc<crate::login::Auth>,
}

impl Proxy {
    /// `endpoint`'s route for a client at `ip`, and one of the endpoint's connection places
    /// held for as long as the slot lives. Checked before any wake, for every transport: a
    /// refused client must not be able to start (and pay for) a compute.
    pub(crate) fn admit(
        &self,
        endpoint: &EndpointId,
        ip: IpAddr,
    ) -> Result<(Arc<Route>, EndpointSlot), ProxyError> {
        let route = self
            .table
            .lookup(endpoint)
            .ok_or_else(|| ProxyError::UnknownEndpoint(endpoint.clone()))?;
        if !route.allows(ip) {
            return Err(ProxyError::NotAllowed(endpoint.clone()));
        }
        let slot = self
            .limits
            .acquire_endpoint(endpoint, route.max_connections)
            .ok_or_else(|| ProxyError::EndpointFull(endpoint.clone()))?;
        Ok((route, slot))
    }

    pub fn new(p: ProxyParts) -> Arc<Self> {
        let limit = Arc::new(Semaphore::new(p.cfg.max_connections));
        // "No limit" is still a semaphore, one too large to run out, so the drain can wait
        // for it like for the other.
        let limits = Limits::new(p.limits);
        let pending_total = limits
            .max_pending_startups()
            .map_or(u32::MAX >> 4, |n| n.min(u32::MAX as usize >> 4) as u32);
        let cancels = Cancels::new(p.cfg.cancel_peers.clone(), p.metrics.cancels.clone());
        // A spare is plain TCP with nothing sent on it; a compute reached over TLS would need
        // its handshake done ahead as well, which spares do not do.
        let spares = match p.compute_tls {
            None => crate::spare::Spares::new(
                p.cfg.spare_max_age,
                p.cfg.connect_timeout,
                p.metrics.spares.clone(),
            ),
            Some(_) => None,
        };
        Arc::new(Self {
            cfg: p.cfg,
            table: p.table,
            manager: p.manager,
            metrics: p.metrics,
            limits,
            cancels: Arc::new(cancels),
            health: p.health,
            tls: p.tls,
            tls_cfg: p.tls_cfg,
            compute_tls: p.compute_tls.map(tokio_rustls::TlsConnector::from),
            auth: p.auth,
            sessions: AtomicU64::new(0),
            limit,
            pending: Arc::new(Semaphore::new(pending_total as usize)),
            pending_total,
            home: tokio::runtime::Handle::try_current().ok(),
            spares,
        })
    }

    /// Wakes `route`'s compute on the proxy's home runtime, whichever thread the session runs
    /// on: a wake spawns the manager's tasks (single-flight start, idle timer, crash watch,
    /// a remote manager's HTTP connections), which must not belong to a relay thread's runtime
    /// and die with it. Dropping the returned future cancels the wake as before.
    ///
    /// A compute that is up already (or a static address) is attached right here: that needs
    /// no task, and saves each new session two hand-overs between threads.
    pub(crate) async fn wake(&self, route: &Arc<Route>) -> Result<Attached, WakeError> {
        if let Some(attached) = self.manager.wake_now(route) {
            return Ok(attached);
        }
        let Some(home) = &self.home else {
            return self.manager.wake(route).await;
        };
        let manager = Arc::clone(&self.manager);
        let route = Arc::clone(route);
        let mut task = AbortOnDrop(home.spawn(async move { manager.wake(&route).await }));
        match (&mut task.0).await {
            Ok(res) => res,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The home runtime is shutting down.
            Err(_) => Err(WakeError::ShuttingDown),
        }
    }
}

/// A task that is cancelled when whoever waits for it goes away.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
