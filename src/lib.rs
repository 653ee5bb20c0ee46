//! Wires the router, the compute manager and the proxy from one [`Config`]. The binary only
//! parses flags, sets up logging and signals, and calls into here; tests start the same thing
//! in-process on port 0.

pub mod config;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pgwake_compute_manager::kubernetes::KubernetesBackend;
use pgwake_compute_manager::LeaderOnly;
use pgwake_compute_manager::{
    BackendError, Backends, ComputeBackend, ComputeWaker, LeaderElector, LeaderError, LeaderState,
    Leadership, LocalBackend, Manager, ManagerConfig, ManagerMetrics, RemoteManager,
};
use pgwake_proxy::tls::{CertStore, TlsAcceptor};
use pgwake_proxy::{Health, Proxy, ProxyMetrics, ProxyParts};
use pgwake_router::{RoutingTable, TableDiff};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

pub use config::{Config, ConfigErrors};

/// How long a manager that starts (or becomes leader) waits for the watched routing table's
/// first load before adopting the running computes of the endpoints it has so far.
const ADOPT_ROUTES_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("local backend: {0}")]
    Backend(#[from] BackendError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("TLS certificates: {0}")]
    Tls(#[from] pgwake_proxy::tls::LoadErrors),
    #[error("compute manager client: {0}")]
    Manager(String),
    #[error("leader election: {0}")]
    LeaderElection(String),
}

/// A running pgwake: listener bound, connections being served.
pub struct Pgwake {
    pub table: Arc<RoutingTable>,
    pub manager: Arc<Manager>,
    pub local: Arc<LocalBackend>,
    pub registry: prometheus::Registry,
    pub health: Arc<Health>,
    pub certs: Option<Arc<CertStore>>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    cancel_addr: Option<SocketAddr>,
    manager_api_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    serve: JoinHandle<()>,
    /// With `manager_url`: stops the activity reports, and the task that sends them.
    reports: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    leadership: Leadership,
    election: Option<Election>,
}

/// The running elector of a manager replica (`[manager] leader_election`).
struct Election {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), LeaderError>>,
}

impl Pgwake {
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let registry = prometheus::Registry::new();
        let table = Arc::new(RoutingTable::new());
        let diff = table
            .replace_all(config.endpoints.clone())
            .expect("Config::parse validated the endpoints");
        let local = Arc::new(LocalBackend::new(config.local.clone())?);
        let health = Health::new();
        let mut kube_backend = None;
        let kubernetes = match &config.kubernetes {
            Some(k) => {
                let backend = KubernetesBackend::from_env(k.clone()).await?;
                kube_backend = Some(backend.clone());
                info!(
                    namespace = backend.namespace(),
                    "Kubernetes backend enabled"
                );
                if k.watch_endpoints {
                    let (store, source) = pgwake_router::crd::crd_source(
                        backend.client(),
                        backend.namespace(),
                        k.endpoint_selector.as_deref(),
                        Arc::clone(&table),
                    );
                    tokio::spawn(source);
                    // Not ready (/readyz 503) until the first list of PgwakeEndpoints is in the
                    // table: a replica that starts during a rollout, or while the API server is
                    // unreachable, would otherwise take clients and call their endpoints unknown.
                    health.set_routes_loaded(false);
                    let h = Arc::clone(&health);
                    tokio::spawn(async move {
                        if store.wait_until_ready().await.is_ok() {
                            info!("PgwakeEndpoints loaded");
                            h.set_routes_loaded(true);
                        }
                    });
                }
                Some(Arc::new(backend) as Arc<dyn ComputeBackend>)
            }
            None => None,
        };
        let manager = Manager::new(
            ManagerConfig::from(&config.compute),
            Backends {
                local: Some(Arc::clone(&local) as _),
                kubernetes,
            },
            ManagerMetrics::new(&registry)?,
        );
        let certs = if config.tls.enabled() {
            let store = Arc::new(CertStore::load(config.tls.certificates.clone())?);
            for d in store.uncovered_domains(&config.tls.domains) {
                warn!(domain = %d, "no certificate covers *.{d}; clients verifying the host name will fail");
            }
            Some(store)
        } else {
            None
        };
        let (reports_stop, reports_stopped) = oneshot::channel::<()>();
        let mut reports = None;
        let (leadership, election) = if config.manager.leader_election {
            let backend = kube_backend
                .as_ref()
                .expect("Config::parse requires [kubernetes] for leader election");
            let cfg = config
                .manager
                .leader_config(std::env::var("HOSTNAME").ok())
                .map_err(StartError::LeaderElection)?;
            info!(lease = %cfg.lease_name, identity = %cfg.identity, "leader election enabled; standing by until leader");
            let (elector, leadership) =
                LeaderElector::new(backend.client(), backend.namespace(), cfg);
            health.set_standby(true);
            tokio::spawn(follow_leadership(leadership.clone(), Arc::clone(&health)));
            let (stop, stopped) = oneshot::channel();
            let task = tokio::spawn(elector.run(async {
                let _ = stopped.await;
            }));
            (leadership, Some(Election { stop, task }))
        } else {
            (Leadership::always(), None)
        };
        {
            // Endpoints removed by a reload or by the CRD source release the manager's state
            // for them (once their computes are suspended); ends with `Manager::shutdown`.
            let (m, t) = (Arc::clone(&manager), Arc::clone(&table));
            tokio::spawn(async move { m.follow_table(&t).await });
        }
        if config.compute.manager_url.is_none() {
            // This process's manager is the one that acts: take over the computes the previous
            // manager left running (Kubernetes ones outlive it), once leader. A proxy that
            // wakes through a remote manager leaves that to it.
            let (m, t, l) = (Arc::clone(&manager), Arc::clone(&table), leadership.clone());
            let routes_loaded = health.watch_routes_loaded();
            tokio::spawn(async move {
                m.adopt_when_ready(&t, l, routes_loaded, ADOPT_ROUTES_WAIT)
                    .await
            });
        }
        let waker: Arc<dyn ComputeWaker> = match &config.compute.manager_url {
            Some(url) => {
                let remote = Arc::new(
                    RemoteManager::new(url, config.compute.wake_timeout)
                        .map_err(|e| StartError::Manager(e.to_string()))?,
                );
                info!(%url, replica = remote.replica_id(), "using the shared compute manager");
                if let Some((interval, idle)) = config.slow_activity_reports() {
                    warn!(
                        ?interval,
                        ?idle,
                        "activity_interval is more than half the shortest idle_timeout: a new session on a compute that cannot count its clients (Kubernetes) may be suspended before this proxy's first report"
                    );
                }
                // The manager cannot see this proxy's sessions; these reports are how it
                // learns not to suspend their computes.
                let (r, interval) = (Arc::clone(&remote), config.compute.activity_interval);
                reports = Some(tokio::spawn(async move {
                    r.run_reports(interval, async {
                        let _ = reports_stopped.await;
                    })
                    .await
                }));
                remote
            }
            None if election.is_some() => Arc::new(LeaderOnly {
                manager: Arc::clone(&manager),
                leadership: leadership.clone(),
            }),
            None => Arc::new(Arc::clone(&manager)),
        };
        let proxy = Proxy::new(ProxyParts {
            cfg: config.proxy.clone(),
            table: Arc::clone(&table),
            manager: waker,
            metrics: ProxyMetrics::new(&registry)?,
            limits: config.limits.clone(),
            health: Arc::clone(&health),
            tls_cfg: config.tls.clone(),
            tls: certs.as_ref().map(|s| TlsAcceptor::new(Arc::clone(s))),
            compute_tls: if config.tls.compute_tls {
                Some(
                    pgwake_proxy::tls::client_config(config.tls.compute_ca.as_deref())
                        .map_err(|e| StartError::Tls(pgwake_proxy::tls::LoadErrors(vec![e])))?,
                )
            } else {
                None
            },
        });
        if let Some(store) = &certs {
            tokio::spawn(watch_certificates(Arc::downgrade(store)));
        }
        let (listener, addr) = bind(config.proxy.listen).await?;
        info!(%addr, endpoints = diff.added, data_root = %local.config().data_root.display(), "pgwake listening");
        let (tx, rx) = oneshot::channel();
        let manager_api_addr = match config.manager.listen {
            Some(a) => {
                let (l, bound) = bind(a).await?;
                info!(addr = %bound, "compute manager API listening");
                tokio::spawn(pgwake_compute_manager::serve_api(
                    l,
                    Arc::clone(&manager),
                    Arc::clone(&table),
                    leadership.clone(),
                    std::future::pending(),
                ));
                Some(bound)
            }
            None => None,
        };
        let admin_addr = match config.admin.listen {
            Some(a) => {
                let (l, bound) = bind(a).await?;
                info!(addr = %bound, "admin listening (/metrics, /healthz, /readyz)");
                // Lives until the process exits: health checks must keep answering (readyz
                // false) for the whole drain.
                tokio::spawn(pgwake_proxy::admin::serve(
                    l,
                    registry.clone(),
                    Arc::clone(&health),
                    std::future::pending(),
                ));
                Some(bound)
            }
            None => None,
        };
        // Stops when the main listener's drain ends: the sessions of a draining replica stay
        // cancellable from the other replicas.
        let (cancel_stop, cancel_stopped) = oneshot::channel::<()>();
        let cancel_addr = match config.proxy.cancel_listen {
            Some(a) => {
                let (l, bound) = bind(a).await?;
                info!(addr = %bound, peers = ?config.proxy.cancel_peers, "cancel listener for peer replicas listening");
                tokio::spawn(Arc::clone(&proxy).serve_cancel_peers(l, async {
                    let _ = cancel_stopped.await;
                }));
                Some(bound)
            }
            None => None,
        };
        let serve = tokio::spawn(proxy.serve(listener, async {
            let _ = rx.await;
        }));
        let serve = tokio::spawn(async move {
            if let Err(e) = serve.await {
                error!(error = %e, "proxy task failed");
            }
            let _ = cancel_stop.send(());
        });
        Ok(Self {
            table,
            manager,
            local,
            registry,
            health,
            certs,
            addr,
            admin_addr,
            cancel_addr,
            manager_api_addr,
            stop: Some(tx),
            serve,
            reports: reports.map(|task| (reports_stop, task)),
            leadership,
            election,
        })
    }

    /// Whether this process may wake and suspend computes (always, without leader election).
    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    /// Resolves if this manager loses the Lease it held; never without leader election. The
    /// caller must then stop at once, without [`Pgwake::shutdown`] (whose drain takes time):
    /// its idle timers and wakes must not touch computes the new leader owns and adopts.
    /// Ending the process is the only way to be sure none of that state acts again
    /// (Kubernetes restarts it as a standby).
    pub async fn lost_leadership(&self) {
        self.leadership.lost().await
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The bound peer cancel listener (`[proxy] cancel_listen`).
    pub fn cancel_addr(&self) -> Option<SocketAddr> {
        self.cancel_addr
    }

    pub fn manager_api_addr(&self) -> Option<SocketAddr> {
        self.manager_api_addr
    }

    /// Re-reads the endpoints from `path`. A file with any error changes nothing, and every
    /// error is returned (and logged by the caller); live sessions are never touched.
    pub fn reload(&self, path: &Path) -> Result<TableDiff, ConfigErrors> {
        if let Some(store) = &self.certs {
            match store.reload() {
                Ok(()) => info!("TLS certificates reloaded"),
                Err(e) => error!("TLS certificate reload failed; keeping the current ones: {e}"),
            }
        }
        let config = Config::load(path)?;
        let diff = self
            .table
            .replace_all(config.endpoints)
            .map_err(|errs| ConfigErrors(errs.into_iter().map(|e| e.to_string()).collect()))?;
        info!(
            added = diff.added,
            changed = diff.changed,
            removed = diff.removed,
            "routing table reloaded"
        );
        Ok(diff)
    }

    /// Stops accepting, lets live sessions finish within the drain timeout, then stops every
    /// local compute (with a checkpoint).
    pub async fn shutdown(mut self) {
        self.health.set_ready(false);
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Err(e) = (&mut self.serve).await {
            error!(error = %e, "proxy task failed");
        }
        // After the drain, so that the last report tells the manager these sessions are gone.
        if let Some((stop, task)) = self.reports.take() {
            let _ = stop.send(());
            if let Err(e) = task.await {
                error!(error = %e, "activity report task failed");
            }
        }
        // Stop the computes that die with this process (local ones; Kubernetes computes keep
        // running for the successor to adopt) while still holding the Lease, and release it
        // only then: a successor that took over earlier could act on computes this one is
        // still stopping.
        tokio::select! {
            _ = self.manager.shutdown() => {}
            _ = self.leadership.lost() => {
                error!("lost leadership while suspending computes; leaving them to the new leader");
            }
        }
        if let Some(e) = self.election.take() {
            let _ = e.stop.send(());
            match e.task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "leader election"),
                Err(e) => error!(error = %e, "leader election task failed"),
            }
        }
    }
}

/// Readiness follows leadership: the manager Service then routes the proxies to the leader
/// only. Ends when the elector does.
async fn follow_leadership(mut leadership: Leadership, health: Arc<Health>) {
    loop {
        let state = leadership.state();
        health.set_standby(state != LeaderState::Leading);
        if state == LeaderState::Lost || leadership.changed().await.is_none() {
            return;
        }
    }
}

/// Binds a listener and reports the address it got (port 0 in tests and configs).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// Reloads certificates when their files change (renewals by cert-manager or certbot land
/// without a SIGHUP). Ends when the store is dropped.
async fn watch_certificates(store: std::sync::Weak<CertStore>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else { return };
        if store.changed_since_last_load() {
            let s = Arc::clone(&store);
            match tokio::task::spawn_blocking(move || s.reload()).await {
                Ok(Ok(())) => info!("TLS certificate files changed; reloaded"),
                Ok(Err(e)) => error!("TLS certificate files changed but reload failed; keeping the current ones: {e}"),
                Err(e) => error!(error = %e, "certificate reload task failed"),
            }
        }
    }
}

/// Lifts the soft open-files limit to the hard one: each proxied session needs two sockets and,
/// with splice, two pipes (four fds), so the usual 1024 would cap pgwake at ~170 sessions.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_follows_leadership_and_stays_off_once_lost() {
        let health = Health::new();
        health.set_standby(true);
        let (state, leadership) = Leadership::manual(LeaderState::Standby);
        let task = tokio::spawn(follow_leadership(leadership, Arc::clone(&health)));
        state.send_replace(LeaderState::Leading);
        // Let the follower run (cooperative scheduling on this one thread, no clock involved).
        for _ in 0..100 {
            if health.is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(health.is_ready(), "the leader is ready");
        state.send_replace(LeaderState::Lost);
        task.await.unwrap();
        assert!(!health.is_ready(), "a deposed leader is not");
    }
}
