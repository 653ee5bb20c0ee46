//! The pgwake binary: flags, logging, signals. Everything else lives in the libraries.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use pgwake::{Config, Pgwake};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    version,
    about = "Postgres connection-routing proxy with wake-on-connect"
)]
struct Args {
    /// The TOML config file (see config/ for documented examples).
    #[arg(long, short, default_value = "config/local.toml")]
    config: PathBuf,
    /// Validate the config file, print every error, and exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// With --check-config: the file the running pgwake was started or last reloaded with.
    /// Reports what a SIGHUP would apply, what needs a restart, and fails if the reload would
    /// be refused (too many endpoints removed).
    #[arg(long, value_name = "FILE", requires = "check_config")]
    against: Option<PathBuf>,
    /// Override [proxy] listen.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGWAKE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    if args.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }

    if let Some(path) = &args.check_config {
        if let Err(e) = check_config(path, args.against.as_deref()) {
            eprintln!("{e}");
            std::process::exit(1);
        }
        return Ok(());
    }

    let mut config =
        Config::load(&args.config).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    if let Some(listen) = args.listen {
        config.proxy.listen = listen;
    }
    match pgwake::raise_fd_limit() {
        Ok(n) => {
            info!(open_files = n, "file descriptor limit");
            // Every proxied session holds two sockets (client and compute); past the limit
            // accepts and compute connects fail with EMFILE long before max_connections.
            let needed = 2 * config.proxy.max_connections as u64 + 64;
            if n < needed {
                warn!(
                    open_files = n,
                    max_connections = config.proxy.max_connections,
                    sessions_that_fit = n.saturating_sub(64) / 2,
                    "the file descriptor limit is below 2 x max_connections; raise the hard limit (LimitNOFILE, ulimit -Hn)"
                );
            }
        }
        Err(e) => warn!(error = %e, "could not raise the file descriptor limit"),
    }
    tokio::runtime::Runtime::new()
        .context("start tokio")?
        .block_on(run(config, args.config))
}

/// `--check-config FILE [--against RUNNING]`: every error of FILE; with RUNNING, what a reload
/// from it would do. Warnings go to stderr, the verdict to stdout.
fn check_config(path: &Path, against: Option<&Path>) -> anyhow::Result<()> {
    let c = Config::load(path)?;
    if c.tls.enabled() {
        pgwake_proxy::tls::CertStore::load(c.tls.certificates.clone())
            .map_err(|e| anyhow::anyhow!("{}: [tls]: {e}", path.display()))?;
    }
    let endpoints = c.endpoints.len();
    let watches_crds = c.kubernetes.as_ref().is_some_and(|k| k.watch_endpoints);
    match against {
        Some(old) => {
            let running = Config::load(old)?;
            let plan = pgwake::reload::plan(&running, c).map_err(|e| {
                anyhow::anyhow!(
                    "{}: a reload from {} would be refused: {e}",
                    path.display(),
                    old.display()
                )
            })?;
            for key in &plan.applied {
                println!("applied by a reload: {key}");
            }
            for key in &plan.needs_restart {
                eprintln!("warning: {key} changed: takes effect only after a restart");
            }
            if let Some(before) = plan.forced {
                eprintln!(
                    "warning: removes {} of {before} endpoints, allowed only by [reload] force = true",
                    plan.removed
                );
            }
        }
        None if endpoints == 0 && !watches_crds && !c.reload.force => eprintln!(
            "warning: {}: no [[endpoint]]; a running pgwake refuses to reload it (it would remove \
             every endpoint) unless [reload] force = true. Compare with the running file: \
             --check-config NEW --against OLD",
            path.display()
        ),
        None => {}
    }
    println!("{}: ok ({endpoints} endpoints)", path.display());
    Ok(())
}

async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    let pgwake = Pgwake::start(config).await?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Err(e) = pgwake.reload(&path) {
                    error!("config reload refused; keeping the current configuration:\n{e}");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = pgwake.lost_leadership() => {
                // No shutdown: during its drain this process's idle timers and wakes would go
                // on acting on computes that the new leader now runs (and has adopted).
                // Exiting drops all of them at once; Kubernetes restarts it as a standby.
                error!("lost the compute manager lease; exiting so that this replica restarts as a standby");
                anyhow::bail!("lost leadership of the compute manager lease");
            }
        }
    }
    info!("shutting down");
    pgwake.shutdown().await;
    info!("bye");
    Ok(())
}
