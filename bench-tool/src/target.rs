//! The pgwake under test and the one thing the phases cannot do through the wire protocol:
//! put an endpoint to sleep.
//!
//! In-process (the default), the tool runs pgwake itself through the `pgwake` library with the
//! local backend, and suspends with `Manager::suspend` (a real fast shutdown, as the idle timer
//! does), so a cold-start run costs one stop instead of an idle timeout. Against an external
//! pgwake (`--proxy`), suspension comes from that pgwake's idle timeout and is observed on its
//! admin `/metrics` (`pgwake_endpoint_state{state="suspended"}`).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{bail, Context};
use pgwake::{Config, Pgwake};
use pgwake_compute_manager::Phase;
use pgwake_router::EndpointId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// The endpoint used by every single-endpoint phase.
const MAIN: &str = "bench-main";
/// How long an in-process suspend or an external idle suspension may take.
const SUSPEND_DEADLINE: Duration = Duration::from_secs(300);

pub struct Target {
    pub addr: SocketAddr,
    kind: Kind,
    main: String,
    pool: Vec<String>,
}

enum Kind {
    InProcess {
        // Boxed: one Target per run, and clippy's variant-size rule is right in general.
        pgwake: Box<Pgwake>,
        dir: tempfile::TempDir,
    },
    External {
        admin: Option<SocketAddr>,
    },
}

impl Target {
    /// Starts pgwake with `bench-main` and `parallel` pool endpoints. The pool's data
    /// directories are copies of `bench-main`'s (made after one real initdb and a clean
    /// shutdown), so preparing 100 endpoints costs seconds, not 100 initdb runs; to Postgres
    /// each copy is an ordinary, cleanly shut down cluster.
    pub async fn in_process(parallel: usize, stampede: usize) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("pgwake-bench-").tempdir()?;
        // Computes run as the `postgres` OS user under root; it must reach the data root.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let pool: Vec<String> = (0..parallel).map(|i| format!("bench-p{i:03}")).collect();
        let mut text = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
max_connections = {maxconn}
[compute]
wake_timeout = "120s"
idle_timeout = "1h"
max_waiting_per_endpoint = {maxconn}
[local]
data_root = "{root}"
create_data_root = true
initdb_args = ["--no-sync"]
[local.settings]
shared_buffers = "16MB"
max_connections = "{pgconn}"
"#,
            maxconn = (stampede + parallel).max(100) * 4,
            root = dir.path().join("data").display(),
            pgconn = stampede.max(50) + 20,
        );
        for id in std::iter::once(MAIN).chain(pool.iter().map(String::as_str)) {
            text.push_str(&format!(
                "[[endpoint]]\nid = \"{id}\"\nbackend = \"local\"\n"
            ));
        }
        let config = Config::parse(&text).map_err(|e| anyhow::anyhow!("config: {e}"))?;
        let pgwake = Pgwake::start(config).await?;
        let target = Target {
            addr: pgwake.local_addr(),
            kind: Kind::InProcess {
                pgwake: Box::new(pgwake),
                dir,
            },
            main: MAIN.into(),
            pool,
        };
        eprintln!("preparing: initdb for {MAIN}");
        crate::phases::connect_and_query(&target.conn_str(MAIN), Duration::from_secs(120))
            .await
            .context("first wake of bench-main")?;
        target.suspend(&[MAIN.to_string()]).await?;
        if let Kind::InProcess { pgwake, .. } = &target.kind {
            let src = pgwake.local.data_dir(&EndpointId::parse(MAIN)?);
            eprintln!("preparing: copying its data directory for {parallel} endpoints");
            for id in &target.pool {
                let dst = pgwake.local.data_dir(&EndpointId::parse(id)?);
                let st = std::process::Command::new("cp")
                    .arg("-a")
                    .arg(&src)
                    .arg(&dst)
                    .status()?;
                if !st.success() {
                    bail!("cp -a {} {}: {st}", src.display(), dst.display());
                }
            }
        }
        Ok(target)
    }

    pub fn external(
        addr: SocketAddr,
        admin: Option<SocketAddr>,
        endpoints: Vec<String>,
    ) -> anyhow::Result<Self> {
        let Some((main, _)) = endpoints.split_first() else {
            bail!("--proxy needs at least one --endpoint");
        };
        Ok(Target {
            addr,
            kind: Kind::External { admin },
            main: main.clone(),
            pool: endpoints.clone(),
        })
    }

    pub fn mode(&self) -> &'static str {
        match self.kind {
            Kind::InProcess { .. } => "in-process",
            Kind::External { .. } => "external",
        }
    }

    /// The pgwake the tool runs itself, if it does.
    pub fn local_pgwake(&self) -> Option<&Pgwake> {
        match &self.kind {
            Kind::InProcess { pgwake, .. } => Some(pgwake),
            Kind::External { .. } => None,
        }
    }

    pub fn main(&self) -> &str {
        &self.main
    }

    pub fn pool(&self, n: usize) -> Option<&[String]> {
        self.pool.get(..n)
    }

    /// Whether endpoints can be made cold on demand.
    pub fn can_suspend(&self) -> bool {
        match self.kind {
            Kind::InProcess { .. } => true,
            Kind::External { admin } => admin.is_some(),
        }
    }

    pub fn conn_str(&self, endpoint: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres options=endpoint={endpoint} connect_timeout=120",
            self.addr.ip(),
            self.addr.port()
        )
    }

    /// Compute starts so far for `id`, where the tool can see them (in-process only).
    pub fn starts(&self, id: &str) -> Option<u64> {
        match &self.kind {
            // An endpoint the manager has not seen yet has started nothing.
            Kind::InProcess { pgwake, .. } => Some(
                pgwake
                    .manager
                    .stats(&EndpointId::parse(id).ok()?)
                    .map_or(0, |s| s.starts),
            ),
            Kind::External { .. } => None,
        }
    }

    /// Returns once every endpoint in `ids` is suspended, all at once.
    pub async fn suspend(&self, ids: &[String]) -> anyhow::Result<()> {
        let deadline = Instant::now() + SUSPEND_DEADLINE;
        match &self.kind {
            Kind::InProcess { pgwake, .. } => {
                let m = &pgwake.manager;
                let stops = ids.iter().map(|id| async move {
                    let id = EndpointId::parse(id)?;
                    // The proxy sees a client's close a moment after the client does.
                    loop {
                        match m.stats(&id) {
                            None => return Ok(()),
                            Some(s) if s.attached == 0 && s.waiting == 0 => break,
                            Some(_) if Instant::now() >= deadline => {
                                bail!("{id}: clients still attached")
                            }
                            Some(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                        }
                    }
                    m.suspend(&id).await;
                    let phase = m.stats(&id).map(|s| s.phase);
                    if phase != Some(Phase::Suspended) {
                        bail!("{id}: not suspended after suspend ({phase:?})");
                    }
                    Ok(())
                });
                futures::future::try_join_all(stops).await?;
            }
            Kind::External { admin: None } => bail!("suspending needs --admin"),
            Kind::External { admin: Some(admin) } => loop {
                let metrics = scrape(*admin).await?;
                if ids.iter().all(|id| is_suspended(&metrics, id)) {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("endpoints not suspended within {SUSPEND_DEADLINE:?}: is the external pgwake's idle_timeout short?");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
        }
        Ok(())
    }

    pub async fn stop(self) {
        if let Kind::InProcess { pgwake, dir } = self.kind {
            pgwake.shutdown().await;
            drop(dir);
        }
    }
}

/// GET /metrics over plain HTTP/1.0 (no client library needed for one request).
async fn scrape(admin: SocketAddr) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: pgwake\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
        .await
        .context("scrape timed out")??;
    Ok(body)
}

fn is_suspended(metrics: &str, id: &str) -> bool {
    let ep = format!("endpoint=\"{id}\"");
    metrics.lines().any(|l| {
        l.starts_with("pgwake_endpoint_state{")
            && l.contains(&ep)
            && l.contains("state=\"suspended\"")
            && l.trim_end().ends_with(" 1")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn suspended_state_is_read_from_metrics() {
        let m = "pgwake_endpoint_state{endpoint=\"a\",state=\"running\"} 0\n\
                 pgwake_endpoint_state{endpoint=\"a\",state=\"suspended\"} 1\n\
                 pgwake_endpoint_state{endpoint=\"b\",state=\"suspended\"} 0\n";
        assert!(super::is_suspended(m, "a"));
        assert!(!super::is_suspended(m, "b"));
        assert!(!super::is_suspended(m, "c"));
    }
}
