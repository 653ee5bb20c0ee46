//! Wires the router, the compute manager and the proxy from one [`Config`]. The binary only
//! parses flags, sets up logging and signals, and calls into here; tests start the same thing
//! in-process on port 0.

pub mod cli;
pub mod config;
mod learn;
pub mod reload;
mod roles_secret;
mod tasks;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgwake_compute_manager::kubernetes::{label_leader_pod, KubernetesBackend};
use pgwake_compute_manager::neon::NeonBrancher;
use pgwake_compute_manager::provision::{
    ConnectInfo, Endpoints, KubernetesProvisioner, LocalProvisioner, Provisioner, Provisioners,
};
use pgwake_compute_manager::LeaderOnly;
use pgwake_compute_manager::{ApiToken, Management};
use pgwake_compute_manager::{
    BackendError, Backends, ComputeBackend, ComputeWaker, LeaderElector, Leadership, LocalBackend,
    Manager, ManagerConfig, ManagerMetrics, RemoteManager, SuspendHook,
};
use pgwake_proxy::tls::{CertStore, TlsAcceptor};
use pgwake_proxy::verifiers::{EndpointAuth, VerifierStore};
use pgwake_proxy::{Auth, Health, Proxy, ProxyMetrics, ProxyParts};
use pgwake_router::{RoutingTable, TableDiff};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

pub use config::{Config, ConfigErrors};
pub use reload::{ConfigKey, ReloadError};
use roles_secret::SecretRoles;
use tasks::{Stage, Tasks};

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
    #[error("roles files:\n{}", .0.join("\n"))]
    Roles(Vec<String>),
    #[error("endpoints created through the API: {0}")]
    CreatedEndpoints(#[from] pgwake_compute_manager::provision::StateFileError),
    #[error("[api]: {0}")]
    Api(String),
    #[error("[kubernetes.neon]: {0}")]
    Neon(#[from] pgwake_compute_manager::neon::NeonBranchError),
}

/// A running pgwake: listener bound, connections being served.
pub struct Pgwake {
    pub table: Arc<RoutingTable>,
    pub manager: Arc<Manager>,
    pub local: Arc<LocalBackend>,
    /// Endpoints created through the management API (and the service that creates them).
    pub endpoints: Arc<Endpoints>,
    pub registry: prometheus::Registry,
    pub health: Arc<Health>,
    pub certs: Option<Arc<CertStore>>,
    /// Logins at the proxy; its verifier store is reloaded with the routing table.
    pub auth: Arc<Auth>,
    /// Reads the login roles of running local computes (`[auth] learn_interval`).
    learner: Arc<learn::Learner>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    cancel_addr: Option<SocketAddr>,
    manager_api_addr: Option<SocketAddr>,
    leadership: Leadership,
    proxy: Arc<Proxy>,
    /// What this process runs with: the start config with the reloads applied to it.
    running: Mutex<Config>,
    tasks: Tasks,
}

/// What a [`Pgwake::reload`] changed.
#[derive(Debug)]
pub struct Reloaded {
    pub table: TableDiff,
    /// Changed keys now in effect.
    pub applied: Vec<ConfigKey>,
    /// Changed keys that take effect only after a restart (each logged as a warning).
    pub needs_restart: Vec<ConfigKey>,
}

impl Pgwake {
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let w = Wiring {
            config: &config,
            registry: prometheus::Registry::new(),
            table: Arc::new(RoutingTable::new()),
            health: Health::new(),
            tasks: Tasks::new(),
        };
        let diff = w
            .table
            .replace_all(config.endpoints.clone())
            .expect("Config::parse validated the endpoints");
        let local = Arc::new(LocalBackend::new(config.local.clone())?);
        // Bound first: the connection strings of created endpoints name its port.
        let (listener, addr) = bind_clients(&config.proxy).await?;
        let verifiers = VerifierStore::new();
        let kubernetes = w.kubernetes(&verifiers).await?;
        let manager = w.manager(&local, kubernetes.as_ref())?;
        let endpoints = w.endpoints(&manager, &local, kubernetes.as_ref(), addr)?;
        let (auth, learner) = w.auth(&manager, &local, verifiers, &endpoints)?;
        let leadership = w.leader_election(kubernetes.as_ref())?;
        w.adoption(&manager, &leadership);
        let waker = w.waker(&manager, &leadership)?;
        let certs = w.certificates()?;
        let proxy = w.proxy(waker, certs.as_ref(), &auth)?;
        info!(%addr, endpoints = diff.added, data_root = %local.config().data_root.display(), "pgwake listening");
        let manager_api_addr = w.manager_api(&manager, &leadership, &endpoints).await?;
        let admin_addr = w.admin().await?;
        let cancel_addr = w.cancel_peers(&proxy).await?;
        let p = Arc::clone(&proxy);
        w.tasks.spawn(Stage::Serve, "proxy", |shutdown| {
            p.serve(listener, shutdown)
        });
        let http_addr = w.http(&proxy).await?;
        let Wiring {
            registry,
            table,
            health,
            tasks,
            ..
        } = w;
        Ok(Self {
            table,
            manager,
            local,
            endpoints,
            registry,
            health,
            certs,
            auth,
            learner,
            addr,
            admin_addr,
            http_addr,
            cancel_addr,
            manager_api_addr,
            leadership,
            proxy,
            running: Mutex::new(config),
            tasks,
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

    /// `[http] listen` as bound (serverless drivers).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
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

    /// Re-reads `path`: the endpoint list and every key that can change in a running process
    /// ([`reload::plan`]). A file with any error, or one that removes too many endpoints, changes
    /// nothing and is returned as the error (logged by the caller); changed keys that need a
    /// restart are logged one by one; live sessions are never touched.
    pub fn reload(&self, path: &Path) -> Result<Reloaded, ReloadError> {
        if let Some(store) = &self.certs {
            match store.reload() {
                Ok(()) => info!("TLS certificates reloaded"),
                Err(e) => error!("TLS certificate reload failed; keeping the current ones: {e}"),
            }
        }
        let new = Config::load(path)?;
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let plan = reload::plan(&running, new)?;
        // Roles files first: a bad one keeps both the old verifiers and the old table.
        self.auth
            .store()
            .load_config(&with_created(
                plan.running.endpoint_auth.clone(),
                &self.endpoints,
            ))
            .map_err(ConfigErrors)?;
        self.learner.load_saved();
        let table = self
            .table
            .replace_all(plan.running.endpoints.clone())
            .map_err(|errs| ConfigErrors(errs.into_iter().map(|e| e.to_string()).collect()))?;
        // Endpoints created through the API are not the file's: the reload leaves them (and
        // its removal guard does not count them); one the file defined meanwhile and no
        // longer does comes back.
        self.endpoints
            .set_configured(plan.running.endpoints.clone());
        self.endpoints.restore();
        self.manager
            .set_config(ManagerConfig::from(&plan.running.compute));
        self.proxy.set_limits(plan.running.limits.clone());
        if let Some(before) = plan.forced {
            warn!(
                removed = plan.removed,
                before,
                "[reload] force = true: applied a reload that removes more endpoints than max_removed_share allows; remove force again so that a truncated file cannot empty the table"
            );
        }
        for key in &plan.applied {
            info!(%key, "config change applied");
        }
        for key in &plan.needs_restart {
            warn!(%key, "config change needs a restart to take effect; running with the old value until then");
        }
        info!(
            added = table.added,
            changed = table.changed,
            removed = table.removed,
            applied = plan.applied.len(),
            needs_restart = plan.needs_restart.len(),
            "config reloaded"
        );
        *running = plan.running;
        Ok(Reloaded {
            table,
            applied: plan.applied,
            needs_restart: plan.needs_restart,
        })
    }

    /// Stops accepting, lets live sessions finish within the drain timeout, then stops every
    /// local compute (with a checkpoint), then the remaining tasks in their [`Stage`] order.
    pub async fn shutdown(self) {
        self.health.set_ready(false);
        self.tasks.stop(Stage::Serve).await;
        self.tasks.stop(Stage::AfterDrain).await;
        self.tasks.stop(Stage::Sources).await;
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
        self.tasks.stop(Stage::Election).await;
        self.tasks.stop(Stage::Last).await;
    }
}

/// What the builders of [`Pgwake::start`] share: each one wires one component and hands its
/// background tasks to `tasks`.
struct Wiring<'a> {
    config: &'a Config,
    registry: prometheus::Registry,
    table: Arc<RoutingTable>,
    health: Arc<Health>,
    tasks: Tasks,
}

impl Wiring<'_> {
    /// The Kubernetes backend (`[kubernetes]`) and, unless `watch_endpoints = false`, the
    /// `PgwakeEndpoint` routing source and the roles Secrets it names, read into `verifiers`.
    async fn kubernetes(
        &self,
        verifiers: &Arc<VerifierStore>,
    ) -> Result<Option<KubernetesBackend>, StartError> {
        let Some(k) = &self.config.kubernetes else {
            return Ok(None);
        };
        let backend = KubernetesBackend::from_env(k.clone()).await?;
        info!(
            namespace = backend.namespace(),
            "Kubernetes backend enabled"
        );
        if k.watch_endpoints {
            let auth = &self.config.auth;
            let secrets = SecretRoles::new(
                kube::Api::namespaced(backend.client(), backend.namespace()),
                Arc::clone(verifiers),
                auth.roles_secrets,
            );
            let (store, source) = pgwake_router::crd::crd_source_with_auth(
                backend.client(),
                backend.namespace(),
                k.endpoint_selector.as_deref(),
                Arc::clone(&self.table),
                Some(Arc::clone(&secrets) as Arc<dyn pgwake_router::crd::AuthSink>),
            );
            let (s, interval) = (Arc::clone(&secrets), auth.roles_secret_interval);
            self.tasks
                .spawn(Stage::Sources, "roles Secrets", |shutdown| async move {
                    tokio::select! {
                        _ = s.run(interval) => {}
                        _ = shutdown => {}
                    }
                });
            self.tasks
                .spawn(Stage::Sources, "endpoint source", |shutdown| async move {
                    tokio::select! {
                        _ = source => {}
                        _ = shutdown => {}
                    }
                });
            // Not ready (/readyz 503) until the first list of PgwakeEndpoints is in the
            // table: a replica that starts during a rollout, or while the API server is
            // unreachable, would otherwise take clients and call their endpoints unknown.
            self.health.set_routes_loaded(false);
            let h = Arc::clone(&self.health);
            self.tasks
                .spawn(Stage::Sources, "endpoints loaded", |shutdown| async move {
                    tokio::select! {
                        ready = store.wait_until_ready() => if ready.is_ok() {
                            // And their roles: a replica that took clients before would
                            // refuse their logins.
                            secrets.refresh(false).await;
                            info!("PgwakeEndpoints loaded");
                            h.set_routes_loaded(true);
                        },
                        _ = shutdown => {}
                    }
                });
        }
        Ok(Some(backend))
    }

    fn manager(
        &self,
        local: &Arc<LocalBackend>,
        kubernetes: Option<&KubernetesBackend>,
    ) -> Result<Arc<Manager>, StartError> {
        let manager = Manager::new(
            ManagerConfig::from(&self.config.compute),
            Backends {
                local: Some(Arc::clone(local) as _),
                kubernetes: kubernetes.map(|b| Arc::new(b.clone()) as Arc<dyn ComputeBackend>),
            },
            ManagerMetrics::new(&self.registry)?,
        );
        // Endpoints removed by a reload or by the CRD source release the manager's state for
        // them, once their computes are suspended.
        let (m, t) = (Arc::clone(&manager), Arc::clone(&self.table));
        self.tasks.spawn(
            Stage::Sources,
            "manager follows the table",
            |shutdown| async move {
                tokio::select! {
                    _ = m.follow_table(&t) => {}
                    _ = shutdown => {}
                }
            },
        );
        Ok(manager)
    }

    /// The endpoints created through the management API: routed from here on (they persist
    /// in the local data root), created and deleted through [`Endpoints`].
    fn endpoints(
        &self,
        manager: &Arc<Manager>,
        local: &Arc<LocalBackend>,
        kubernetes: Option<&KubernetesBackend>,
        proxy_addr: SocketAddr,
    ) -> Result<Arc<Endpoints>, StartError> {
        let c = self.config;
        let provisioner = LocalProvisioner::open(
            Arc::clone(local),
            Arc::clone(manager),
            c.compute.wake_timeout,
        )?;
        // Branches on Kubernetes are Neon branches: only with [kubernetes.neon].
        let neon = match (kubernetes, &c.kubernetes) {
            (Some(backend), Some(k)) if k.neon.is_some() => {
                let brancher = NeonBrancher::from_config(backend.client(), k)?;
                Some(Arc::new(KubernetesProvisioner::new(
                    brancher,
                    Arc::clone(manager),
                    c.compute.wake_timeout,
                )) as Arc<dyn Provisioner>)
            }
            _ => None,
        };
        let host = c.api.public_host.clone().unwrap_or_else(|| {
            if proxy_addr.ip().is_unspecified() {
                "127.0.0.1".into()
            } else {
                proxy_addr.ip().to_string()
            }
        });
        let connect = ConnectInfo {
            host,
            port: c.api.public_port.unwrap_or(proxy_addr.port()),
            domain: c
                .tls
                .enabled()
                .then(|| c.tls.domains.first().cloned())
                .flatten(),
            user: c
                .api
                .connect_user
                .clone()
                .unwrap_or_else(|| c.local.superuser.clone()),
            dbname: c
                .api
                .connect_dbname
                .clone()
                .unwrap_or_else(|| "postgres".into()),
        };
        let endpoints = Endpoints::new(
            Arc::clone(&self.table),
            Arc::clone(manager),
            Provisioners {
                local: Some(Arc::new(provisioner)),
                kubernetes: neon,
            },
            connect,
            c.endpoints.clone(),
        );
        let routed = endpoints.restore();
        if routed > 0 {
            info!(
                endpoints = routed,
                "endpoints created through the API routed"
            );
        }
        Ok(endpoints)
    }

    /// `[manager] leader_election`: the elector, and the leader label on this process's pod
    /// that follows it. Without it this process always leads.
    fn leader_election(
        &self,
        kubernetes: Option<&KubernetesBackend>,
    ) -> Result<Leadership, StartError> {
        if !self.config.manager.leader_election {
            return Ok(Leadership::always());
        }
        let backend = kubernetes.expect("Config::parse requires [kubernetes] for leader election");
        let cfg = self
            .config
            .manager
            .leader_config(std::env::var("HOSTNAME").ok())
            .map_err(StartError::LeaderElection)?;
        info!(lease = %cfg.lease_name, identity = %cfg.identity, "leader election enabled; standing by until leader");
        let retry = cfg.retry_period;
        let (elector, leadership) = LeaderElector::new(backend.client(), backend.namespace(), cfg);
        // Every replica stays Ready (a rollout must be able to finish); the leader labels its
        // own pod, and Service pgwake-manager selects that label.
        match std::env::var("POD_NAME").or_else(|_| std::env::var("HOSTNAME")) {
            Ok(pod) => {
                let (client, ns, l) = (
                    backend.client(),
                    backend.namespace().to_string(),
                    leadership.clone(),
                );
                self.tasks
                    .spawn(Stage::Election, "leader label", |shutdown| async move {
                        label_leader_pod(client, &ns, &pod, l, retry, shutdown).await
                    });
            }
            Err(_) => warn!("neither POD_NAME nor HOSTNAME is set: the leader's pod is not labelled, so a Service cannot select it"),
        }
        self.tasks
            .spawn(Stage::Election, "leader election", |shutdown| async move {
                if let Err(e) = elector.run(shutdown).await {
                    error!(error = %e, "leader election");
                }
            });
        Ok(leadership)
    }

    /// This process's manager is the one that acts: take over the computes the previous
    /// manager left running (Kubernetes ones outlive it), once leader. A proxy that wakes
    /// through a remote manager leaves that to it.
    fn adoption(&self, manager: &Arc<Manager>, leadership: &Leadership) {
        if self.config.compute.manager_url.is_some() {
            return;
        }
        let (m, t, l) = (
            Arc::clone(manager),
            Arc::clone(&self.table),
            leadership.clone(),
        );
        let routes_loaded = self.health.watch_routes_loaded();
        self.tasks
            .spawn(Stage::Sources, "adoption", |shutdown| async move {
                tokio::select! {
                    _ = m.adopt_when_ready(&t, l, routes_loaded, ADOPT_ROUTES_WAIT) => {}
                    _ = shutdown => {}
                }
            });
    }

    /// What the proxy wakes through: the shared manager (`[compute] manager_url`, with the
    /// activity reports that keep its computes up), or this process's own manager.
    fn waker(
        &self,
        manager: &Arc<Manager>,
        leadership: &Leadership,
    ) -> Result<Arc<dyn ComputeWaker>, StartError> {
        let c = &self.config.compute;
        let Some(url) = &c.manager_url else {
            return Ok(if self.config.manager.leader_election {
                Arc::new(LeaderOnly {
                    manager: Arc::clone(manager),
                    leadership: leadership.clone(),
                })
            } else {
                Arc::new(Arc::clone(manager))
            });
        };
        let remote = Arc::new(
            RemoteManager::new(url, c.wake_timeout)
                .map_err(|e| StartError::Manager(e.to_string()))?,
        );
        info!(%url, replica = remote.replica_id(), "using the shared compute manager");
        if let Some((interval, idle)) = self.config.slow_activity_reports() {
            warn!(
                ?interval,
                ?idle,
                "activity_interval is more than half the shortest idle_timeout: a new session on a compute that cannot count its clients (Kubernetes) may be suspended before this proxy's first report"
            );
        }
        // The manager cannot see this proxy's sessions; these reports are how it learns not
        // to suspend their computes.
        let (r, interval) = (Arc::clone(&remote), c.activity_interval);
        self.tasks.spawn(
            Stage::AfterDrain,
            "activity reports",
            |shutdown| async move { r.run_reports(interval, shutdown).await },
        );
        Ok(remote)
    }

    /// The certificate store (`[tls]`) and its watcher.
    fn certificates(&self) -> Result<Option<Arc<CertStore>>, StartError> {
        let tls = &self.config.tls;
        if !tls.enabled() {
            return Ok(None);
        }
        let store = Arc::new(CertStore::load(tls.certificates.clone())?);
        for d in store.uncovered_domains(&tls.domains) {
            warn!(domain = %d, "no certificate covers *.{d}; clients verifying the host name will fail");
        }
        let weak = Arc::downgrade(&store);
        self.tasks.spawn(
            Stage::Sources,
            "certificate watcher",
            |shutdown| async move {
                tokio::select! {
                    _ = watch_certificates(weak) => {}
                    _ = shutdown => {}
                }
            },
        );
        Ok(Some(store))
    }

    fn proxy(
        &self,
        waker: Arc<dyn ComputeWaker>,
        certs: Option<&Arc<CertStore>>,
        auth: &Arc<Auth>,
    ) -> Result<Arc<Proxy>, StartError> {
        let config = self.config;
        let compute_tls = if config.tls.compute_tls {
            Some(
                pgwake_proxy::tls::client_config(config.tls.compute_ca.as_deref())
                    .map_err(|e| StartError::Tls(pgwake_proxy::tls::LoadErrors(vec![e])))?,
            )
        } else {
            None
        };
        Ok(Proxy::new(ProxyParts {
            cfg: config.proxy.clone(),
            table: Arc::clone(&self.table),
            manager: waker,
            metrics: ProxyMetrics::new(&self.registry)?,
            limits: config.limits.clone(),
            health: Arc::clone(&self.health),
            tls_cfg: config.tls.clone(),
            tls: certs.map(|s| TlsAcceptor::new(Arc::clone(s))),
            compute_tls,
            auth: Arc::clone(auth),
        }))
    }

    /// Logins at the proxy: the verifier store (roles files, and what earlier runs learned)
    /// and the task that keeps learning the roles of running local computes.
    fn auth(
        &self,
        manager: &Arc<Manager>,
        local: &Arc<LocalBackend>,
        verifiers: Arc<VerifierStore>,
        endpoints: &Arc<Endpoints>,
    ) -> Result<(Arc<Auth>, Arc<learn::Learner>), StartError> {
        verifiers
            .load_config(&with_created(self.config.endpoint_auth.clone(), endpoints))
            .map_err(StartError::Roles)?;
        let auth = Auth::new(self.config.auth.clone(), verifiers, &self.registry)?;
        let learner = Arc::new(learn::Learner {
            table: Arc::clone(&self.table),
            manager: Arc::downgrade(manager),
            local: Arc::clone(local),
            store: Arc::clone(auth.store()),
            interval: self.config.auth.learn_interval,
        });
        learner.load_saved();
        // A created or deleted endpoint changes the verifier store's endpoints: the file's
        // (as last loaded) and the created ones. Weak: the endpoints own this hook.
        let (store, l, weak) = (
            Arc::clone(auth.store()),
            Arc::clone(&learner),
            Arc::downgrade(endpoints),
        );
        endpoints.set_on_change(Box::new(move || {
            let Some(e) = weak.upgrade() else { return };
            let file: Vec<EndpointAuth> = e.configured().iter().map(EndpointAuth::from).collect();
            if let Err(errs) = store.load_config(&with_created(file, &e)) {
                error!(
                    "reloading the endpoints' login settings failed:\n{}",
                    errs.join("\n")
                );
            }
            l.load_saved();
        }));
        // A last look at the roles before each suspend: a role created in the session that
        // just ended is known at the next wake.
        if manager
            .set_suspend_hook(Arc::clone(&learner) as Arc<dyn SuspendHook>)
            .is_err()
        {
            warn!("the compute manager already has a suspend hook; roles are learned on the timer only");
        }
        let l = Arc::clone(&learner);
        self.tasks
            .spawn(Stage::Sources, "role learner", |shutdown| async move {
                tokio::select! {
                    _ = l.run() => {}
                    _ = shutdown => {}
                }
            });
        Ok((auth, learner))
    }

    /// `[manager] listen`: the compute manager's HTTP API for other pgwake proxies, with the
    /// management routes when `[api]` has a token.
    async fn manager_api(
        &self,
        manager: &Arc<Manager>,
        leadership: &Leadership,
        endpoints: &Arc<Endpoints>,
    ) -> Result<Option<SocketAddr>, StartError> {
        let Some(a) = self.config.manager.listen else {
            return Ok(None);
        };
        let token = self.config.api.token().map_err(StartError::Api)?;
        let management = token
            .as_deref()
            .and_then(ApiToken::new)
            .map(|token| Management {
                endpoints: Arc::clone(endpoints),
                token,
            });
        let (l, bound) = bind(a).await?;
        info!(addr = %bound, management = management.is_some(), "compute manager API listening");
        let (m, t, lead) = (
            Arc::clone(manager),
            Arc::clone(&self.table),
            leadership.clone(),
        );
        self.tasks.spawn(Stage::Last, "manager API", |shutdown| {
            pgwake_compute_manager::serve_api_with(l, m, t, lead, management, shutdown)
        });
        Ok(Some(bound))
    }

    /// `[admin] listen`. Stopped last: health checks must keep answering (readyz false) for
    /// the whole drain.
    async fn admin(&self) -> Result<Option<SocketAddr>, StartError> {
        let Some(a) = self.config.admin.listen else {
            return Ok(None);
        };
        let (l, bound) = bind(a).await?;
        info!(addr = %bound, "admin listening (/metrics, /healthz, /readyz)");
        let (r, h) = (self.registry.clone(), Arc::clone(&self.health));
        self.tasks.spawn(Stage::Last, "admin", |shutdown| {
            pgwake_proxy::admin::serve(l, r, h, shutdown)
        });
        Ok(Some(bound))
    }

    /// `[http] listen`: stops with the client listener; its WebSocket sessions then drain
    /// with the TCP ones.
    async fn http(&self, proxy: &Arc<Proxy>) -> Result<Option<SocketAddr>, StartError> {
        let Some(a) = self.config.http.listen else {
            return Ok(None);
        };
        let (l, bound) = bind(a).await?;
        info!(addr = %bound, "serverless listener (WebSocket, /sql) listening");
        let (p, cfg) = (Arc::clone(proxy), self.config.http.clone());
        self.tasks.spawn(Stage::Serve, "http", |shutdown| {
            p.serve_http(l, cfg, shutdown)
        });
        Ok(Some(bound))
    }

    /// `[proxy] cancel_listen`. Stops after the drain: the sessions of a draining replica
    /// stay cancellable from the other replicas.
    async fn cancel_peers(&self, proxy: &Arc<Proxy>) -> Result<Option<SocketAddr>, StartError> {
        let Some(a) = self.config.proxy.cancel_listen else {
            return Ok(None);
        };
        let (l, bound) = bind(a).await?;
        info!(addr = %bound, peers = ?self.config.proxy.cancel_peers, "cancel listener for peer replicas listening");
        let p = Arc::clone(proxy);
        self.tasks
            .spawn(Stage::AfterDrain, "peer cancel listener", |shutdown| {
                p.serve_cancel_peers(l, shutdown)
            });
        Ok(Some(bound))
    }
}

/// The auth keys of the config file's endpoints and of those created through the API (the
/// file's win an id both define).
fn with_created(mut file: Vec<EndpointAuth>, endpoints: &Endpoints) -> Vec<EndpointAuth> {
    let created: Vec<EndpointAuth> = endpoints
        .created()
        .iter()
        .filter(|c| !file.iter().any(|f| f.id == c.id))
        .map(EndpointAuth::from)
        .collect();
    file.extend(created);
    file
}

/// Binds a listener and reports the address it got (port 0 in tests and configs).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    bound(
        addr,
        pgwake_proxy::listener::bind(addr, pgwake_proxy::listener::default_backlog()),
    )
}

/// [`bind`] for the client listener, whose accepted sockets inherit TCP_NODELAY and keepalive.
async fn bind_clients(
    cfg: &pgwake_proxy::ProxyConfig,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let addr = cfg.listen;
    bound(
        addr,
        pgwake_proxy::listener::bind_clients(
            addr,
            pgwake_proxy::listener::default_backlog(),
            &cfg.tcp_keepalive,
        ),
    )
}

/// The listener bound for `addr` and the address it got.
fn bound(
    addr: SocketAddr,
    listener: std::io::Result<TcpListener>,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind { addr, source };
    let listener = listener.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
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

/// Lifts the soft open-files limit to the hard one (see [`pgwake_proxy::fd::raise_limit`]).
pub use pgwake_proxy::fd::raise_limit as raise_fd_limit;
