use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use pgwake_router::{EndpointId, Route};

use crate::{BackendError, StartBlocker};

/// Where a running compute accepts Postgres connections, as `host:port` (`[v6]:port` for an
/// IPv6 literal). Only the manager and the routing table produce these: a client never picks the
/// address (no open relay). Split into host and port once, here, so that no caller re-parses it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ComputeAddr {
    text: Arc<str>,
    /// Byte range of the host in `text`, brackets of an IPv6 literal excluded.
    host: (usize, usize),
    port: Option<u16>,
}

impl ComputeAddr {
    pub fn new(host_port: impl Into<Arc<str>>) -> Self {
        let text: Arc<str> = host_port.into();
        let (host, port) = split_host_port(&text);
        Self { text, host, port }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The host name or IP literal, without the brackets of `[v6]:port`.
    pub fn host(&self) -> &str {
        &self.text[self.host.0..self.host.1]
    }

    /// The port, or `None` when the address has none (or not a valid one).
    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

/// Splits `host:port`, `[v6]:port`, `[v6]` or a bare host (a bare IPv6 literal has more than
/// one colon and so no port) into the host's byte range and the port.
fn split_host_port(s: &str) -> ((usize, usize), Option<u16>) {
    if let Some(rest) = s.strip_prefix('[') {
        if let Some(close) = rest.find(']') {
            let port = rest[close + 1..]
                .strip_prefix(':')
                .and_then(|p| p.parse().ok());
            return ((1, 1 + close), port);
        }
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => ((0, host.len()), port.parse().ok()),
        _ => ((0, s.len()), None),
    }
}

impl fmt::Display for ComputeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for ComputeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ComputeAddr({})", self.text)
    }
}

/// A way of running computes (local processes, Kubernetes workloads). Implementations are the
/// external boundary of the manager, so tests substitute scripted ones.
#[async_trait]
pub trait ComputeBackend: Send + Sync + 'static {
    /// Starts the compute for `route` and returns once it answers queries. Dropping the future
    /// must not leave a half-started compute behind.
    async fn start(&self, route: &Route) -> Result<Box<dyn RunningCompute>, BackendError>;

    /// Endpoints whose compute this backend finds running without having started it in this
    /// process: computes that outlive their manager (a restart, a leader handover), which a
    /// new manager adopts (`Manager::adopt_running`) so that their idle timers run again.
    /// `start` must then be idempotent for them: find the compute up and return it. The
    /// default is none, right for computes that die with the process (local `postgres`).
    async fn running_endpoints(&self) -> Result<Vec<EndpointId>, BackendError> {
        Ok(Vec::new())
    }

    /// Why `id`'s start in progress is not done yet, when the platform says so in words a
    /// client may see: a client whose wait ends is told this rather than a bare timeout.
    fn start_blocker(&self, _id: &EndpointId) -> Option<StartBlocker> {
        None
    }
}

#[async_trait]
pub trait RunningCompute: Send + Sync + 'static {
    fn addr(&self) -> &ComputeAddr;

    /// Stops the compute cleanly (a checkpoint is written), and returns once it is gone.
    async fn stop(&self) -> Result<(), BackendError>;

    /// Resolves when the compute has gone away, whoever stopped it: lets the manager notice a
    /// crash without waiting for the next client to fail.
    async fn exited(&self);

    /// Client sessions connected to the compute, as the compute itself counts them, or `None`
    /// when it cannot be asked. Checked before every idle suspend, so that clients the manager
    /// holds no guard for (other proxy replicas, direct connections) keep the compute up.
    async fn client_connections(&self) -> Option<usize> {
        None
    }

    /// Light sleep: stops every process of the compute from running, keeping its memory, so
    /// that [`RunningCompute::thaw`] brings it back in milliseconds. Returns `Ok(false)` (the
    /// default) when this compute cannot be frozen: the manager then stops it instead. On an
    /// error nothing is left frozen. Called with no client session attached.
    async fn freeze(&self) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// Lets a frozen compute run again and returns once it answers queries. On an error the
    /// compute may be unusable: the manager stops it and starts a new one.
    async fn thaw(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// The memory the compute holds, in bytes, if the backend can tell (for the budget of
    /// frozen computes).
    fn memory(&self) -> Option<u64> {
        None
    }

    /// Whether the manager must stop this compute when it shuts down: true for processes
    /// that would otherwise be orphaned; false for computes another manager can take over.
    fn stop_on_shutdown(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::ComputeAddr;

    #[test]
    fn compute_addr_splits_host_and_port_once() {
        let cases = [
            ("127.0.0.1:5432", "127.0.0.1", Some(5432)),
            ("db-0.db.ns.svc:6543", "db-0.db.ns.svc", Some(6543)),
            ("[::1]:5432", "::1", Some(5432)),
            ("[fe80::1%eth0]:1", "fe80::1%eth0", Some(1)),
            ("[::1]", "::1", None),
            ("::1", "::1", None),
            ("localhost", "localhost", None),
            ("host:notaport", "host", None),
        ];
        for (text, host, port) in cases {
            let a = ComputeAddr::new(text);
            assert_eq!((a.host(), a.port()), (host, port), "{text}");
            assert_eq!(a.as_str(), text);
            assert_eq!(a.to_string(), text);
        }
    }
}
