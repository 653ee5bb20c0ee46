//! The pgwake binary: flags, logging, signals. Everything else lives in the libraries.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgwake::cli::ApiTarget;
use pgwake::{Config, Pgwake};
use pgwake_compute_manager::provision::CreateBody;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    version,
    about = "Postgres connection-routing proxy with wake-on-connect"
)]
struct Args {
    /// The TOML config file (see config/ for documented examples).
    #[arg(long, short, default_value = "config/local.toml", global = true)]
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
    /// Without a command: run the proxy.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Create, list and delete endpoints through the management API.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// Branches: endpoints whose data starts as a copy of another's.
    #[command(subcommand)]
    Branch(BranchCommand),
}

/// How to reach the management API; unset values come from --config.
#[derive(clap::Args)]
struct ApiArgs {
    /// The management API (`[manager] listen`), e.g. http://127.0.0.1:9188; else the
    /// PGWAKE_API environment variable.
    #[arg(long)]
    api: Option<String>,
    /// The bearer token (`[api] management_token`); else the PGWAKE_API_TOKEN environment
    /// variable (better: it stays out of `ps`).
    #[arg(long)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum EndpointCommand {
    /// Create an endpoint and print its connection string.
    Create {
        /// The new endpoint's id; unset: ep-<adjective>-<noun>-<number>.
        #[arg(long)]
        id: Option<String>,
        /// Make it a branch of this endpoint.
        #[arg(long)]
        parent: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List every endpoint with its phase and connection string.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete an endpoint created through the API.
    Delete {
        id: String,
        /// Remove its data directory too (otherwise kept, and the id stays taken).
        #[arg(long)]
        remove_data: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum BranchCommand {
    /// Branch PARENT: a new endpoint with a copy of its data; prints the connection string.
    Create {
        #[arg(long)]
        parent: String,
        #[arg(long)]
        id: Option<String>,
        /// Neon endpoints only: start the branch at this LSN (X/Y) of the parent's timeline.
        #[arg(long)]
        lsn: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// Runs a client command against the management API; the config file (if it exists) fills in
/// what the flags leave out.
fn client(command: Command, config: &Path) -> anyhow::Result<()> {
    let config = config.exists().then_some(config);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start tokio")?;
    let target = |a: ApiArgs| {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        ApiTarget::resolve(
            a.api.or_else(|| env("PGWAKE_API")),
            a.token.or_else(|| env("PGWAKE_API_TOKEN")),
            config,
        )
    };
    rt.block_on(async {
        let create = |id, parent, lsn, api| async move {
            let body = CreateBody {
                id,
                parent,
                lsn,
                ..Default::default()
            };
            let created = pgwake::cli::create(&target(api)?, &body).await?;
            println!("{}", created.connection_uri);
            anyhow::Ok(())
        };
        match command {
            Command::Branch(BranchCommand::Create {
                parent,
                id,
                lsn,
                api,
            }) => create(id, Some(parent), lsn, api).await?,
            Command::Endpoint(EndpointCommand::Create { id, parent, api }) => {
                create(id, parent, None, api).await?
            }
            Command::Endpoint(EndpointCommand::List { api }) => {
                print!("{}", pgwake::cli::list(&target(api)?).await?);
            }
            Command::Endpoint(EndpointCommand::Delete {
                id,
                remove_data,
                api,
            }) => {
                pgwake::cli::delete(&target(api)?, &id, remove_data).await?;
                eprintln!("deleted {id}");
            }
        }
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(command) = args.command.take() {
        return client(command, &args.config);
    }
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
