//! Shared harness for the end-to-end tests: a real pgwake (in-process, port 0) in front of real
//! PostgreSQL servers started by the local backend, in a temporary directory that is removed
//! afterwards.

#![allow(dead_code)]

pub mod scram;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use pgwake::{Config, Pgwake};
use pgwake_compute_manager::{EndpointStats, Phase};
use pgwake_router::EndpointId;
use tempfile::TempDir;

pub struct Env {
    pub pgwake: Option<Pgwake>,
    pub dir: TempDir,
    pub addr: SocketAddr,
}

/// Config text for tests: port 0, a private data root, small Postgres settings, with `extra`
/// (TOML tables) merged over those defaults, then the `[[endpoint]]` entries.
pub fn config_text(dir: &std::path::Path, extra: &str, endpoints: &str) -> String {
    let base = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
startup_timeout = "2s"
drain_timeout = "5s"
[compute]
wake_timeout = "60s"
[local]
data_root = "{root}"
create_data_root = true
initdb_args = ["--no-sync"]
[local.settings]
shared_buffers = "16MB"
max_connections = "250"
"#,
        root = dir.join("data").display()
    );
    let mut merged: toml::Table = base.parse().unwrap();
    let extra: toml::Table = extra
        .parse()
        .unwrap_or_else(|e| panic!("test config extra: {e}"));
    merge(&mut merged, extra);
    format!("{}\n{endpoints}", toml::to_string(&merged).unwrap())
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

pub fn tempdir() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("pgwake-test-")
        .tempdir()
        .unwrap();
    // The computes run as the `postgres` OS user when tests run as root; it must be able to
    // reach the data root inside this directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

pub const DEMO: &str = "[[endpoint]]\nid = \"demo\"\nbackend = \"local\"\n";

impl Env {
    pub async fn start(extra: &str, endpoints: &str) -> Env {
        Self::start_with(extra, endpoints).await
    }

    pub async fn start_with(extra: &str, endpoints: &str) -> Env {
        Self::start_in(tempdir(), extra, endpoints).await
    }

    /// For tests that put files (certificates) in the directory before starting.
    pub async fn start_in(dir: TempDir, extra: &str, endpoints: &str) -> Env {
        let text = config_text(dir.path(), extra, endpoints);
        let config = Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
        let pgwake = Pgwake::start(config).await.unwrap();
        let addr = pgwake.local_addr();
        Env {
            pgwake: Some(pgwake),
            dir,
            addr,
        }
    }

    pub fn pgwake(&self) -> &Pgwake {
        self.pgwake.as_ref().unwrap()
    }

    pub fn stats(&self, id: &str) -> Option<EndpointStats> {
        self.pgwake().manager.stats(&EndpointId::parse(id).unwrap())
    }

    pub fn data_dir(&self, id: &str) -> PathBuf {
        self.pgwake()
            .local
            .data_dir(&EndpointId::parse(id).unwrap())
    }

    pub fn conn_str(&self, endpoint: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres options=endpoint={endpoint} connect_timeout=60",
            self.addr.port()
        )
    }

    pub async fn client(&self, endpoint: &str) -> tokio_postgres::Client {
        let (client, conn) =
            tokio_postgres::connect(&self.conn_str(endpoint), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect to {endpoint} through pgwake: {e}"));
        tokio::spawn(conn);
        client
    }

    pub fn psql(&self, endpoint: &str, sql: &str) -> Output {
        psql(&self.conn_str(endpoint), sql)
    }

    pub async fn wait_phase(&self, id: &str, phase: Phase, within: Duration) {
        let m = &self.pgwake().manager;
        let id = EndpointId::parse(id).unwrap();
        if tokio::time::timeout(within, m.wait_for_phase(&id, phase))
            .await
            .is_err()
        {
            panic!("{id} not {phase:?} within {within:?}: {:?}", m.stats(&id));
        }
    }

    /// Waits until every proxied session of `id` has ended on the proxy side (the client
    /// closing its socket is seen by the proxy a moment later).
    pub async fn wait_detached(&self, id: &str, within: Duration) {
        wait_until(within, || self.stats(id).map(|s| s.attached) == Some(0))
            .await
            .unwrap_or_else(|_| panic!("{id} still attached: {:?}", self.stats(id)));
    }

    /// Suspends `id` as an operator would, once the compute has no client sessions left
    /// (a session closed by a client ends on the compute a moment later).
    pub async fn suspend(&self, id: &str) {
        let m = &self.pgwake().manager;
        let id = EndpointId::parse(id).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !m.suspend(&id).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} not suspendable: {:?}",
                m.stats(&id)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(p) = self.pgwake.take() {
            p.shutdown().await;
        }
    }
}

pub fn psql(conn: &str, sql: &str) -> Output {
    std::process::Command::new("psql")
        .arg(conn)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "60")
        .output()
        .expect("psql must be installed (apt-get install postgresql-client)")
}

/// Polls `cond` until it holds or `within` passes. For conditions with no event to wait on
/// (another process's state); the interval is short so this never stands in for a sleep.
pub async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> Result<(), ()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The postmaster of a data directory, from its lock file, if the file is there.
pub fn postmaster_pid(dir: &std::path::Path) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

pub fn process_alive(pid: i32) -> bool {
    // kill(pid, 0) checks existence; a zombie would still count, but the manager reaps its
    // children, so gone means gone.
    unsafe { libc::kill(pid, 0) == 0 }
}

pub fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// One HTTP/1.1 request (no body) to the admin or manager API: status and body.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path).await
}

/// A pgwake.toml shipped in `deploy/` (an overlay's file that its kustomization puts in a
/// ConfigMap), by its path from the repository root.
pub fn shipped_config(path: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Points kube clients of this process at a fake API server on `api` (plain HTTP, no
/// credentials) through a kubeconfig in `dir`. Call it from a test binary's only test: the
/// environment is process-wide.
pub fn use_fake_kube_api(dir: &std::path::Path, api: SocketAddr) {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{api}\"}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n"
        ),
    )
    .unwrap();
    std::env::set_var("KUBECONFIG", &kubeconfig);
    std::env::remove_var("KUBERNETES_SERVICE_HOST");
}

/// A minimal HTTP/1.1 server standing in for the Kubernetes API: every request on every
/// (kept-alive) connection goes to `answer(method, uri)`, which returns the status line and
/// JSON body, or `None` to hold the request open forever (a watch with no event).
pub async fn fake_http_server<F, Fut>(listener: tokio::net::TcpListener, answer: F)
where
    F: Fn(String, String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Option<(&'static str, String)>> + Send,
{
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let answer = answer.clone();
        tokio::spawn(async move {
            let mut conn = BufReader::new(stream);
            loop {
                let mut request_line = String::new();
                if conn.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                    return;
                }
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    conn.read_line(&mut header).await.unwrap();
                    if header == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = header.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            length = v.trim().parse().unwrap();
                        }
                    }
                }
                let mut body = vec![0; length];
                conn.read_exact(&mut body).await.unwrap();
                let mut parts = request_line.split_whitespace();
                let (method, uri) = (parts.next().unwrap(), parts.next().unwrap());
                let Some((status, reply)) = answer(method.to_string(), uri.to_string()).await
                else {
                    return std::future::pending::<()>().await;
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                    reply.len()
                );
                conn.get_mut().write_all(response.as_bytes()).await.unwrap();
            }
        });
    }
}

/// Waits (bounded) until a `select pg_sleep(...)` is running on the compute `watcher` is
/// connected to, so that a cancel sent next has a query to cancel.
pub async fn wait_for_sleeping(watcher: &tokio_postgres::Client) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = watcher
            .query_one(
                "select count(*) from pg_stat_activity where query like 'select pg_sleep%' and state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "query never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A port free at the moment of asking, for a child process's config (in-process listeners
/// take port 0 instead).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process (a pgwake binary, haproxy) that is asked to stop (SIGTERM) and waited for
/// on drop, so that a test failing midway leaves nothing behind.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            // SAFETY: kill on the pid of our own unreaped child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

/// The pgwake binary with `config`, its log to stderr, as a [`Proc`].
pub fn spawn_pgwake(config: &std::path::Path) -> Proc {
    spawn_pgwake_with(config, std::process::Stdio::null())
}

/// The pgwake binary with `config` and `stdout` (where it logs), as a [`Proc`].
pub fn spawn_pgwake_with(config: &std::path::Path, stdout: impl Into<std::process::Stdio>) -> Proc {
    Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_pgwake"))
            .arg("--config")
            .arg(config)
            .stdout(stdout)
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

/// Unmounts (lazily) on drop, so a failing test leaves no mount behind.
pub struct Mount(pub PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The value of the sample `name_and_labels` (`name{label="v"}` as exposed) in a /metrics
/// text; 0 when it is absent, as a counter that never moved.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
