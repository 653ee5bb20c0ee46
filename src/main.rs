//! The pgwake binary: flags, logging, signals. Everything else lives in the libraries.

use std::path::PathBuf;

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
        return match Config::load(path) {
            Ok(c) => {
                if c.tls.enabled() {
                    if let Err(e) = pgwake_proxy::tls::CertStore::load(c.tls.certificates.clone()) {
                        eprintln!("{}: [tls]: {e}", path.display());
                        std::process::exit(1);
                    }
                }
                println!("{}: ok ({} endpoints)", path.display(), c.endpoints.len());
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
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

async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    let pgwake = Pgwake::start(config).await?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Err(e) = pgwake.reload(&path) {
                    error!("config reload failed; keeping the current routing table:\n{e}");
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
