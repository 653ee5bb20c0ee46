//! `pgwake-bench`: autoscaling benchmarks for pgwake (cold start, warm connect, stampede,
//! parallel wakes, steady throughput). `main` parses flags and wires the pieces; see
//! benches/README-tools.md for what each phase measures and how to run it.

mod hold;
mod phases;
mod report;
mod target;
mod tiers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "pgwake-bench", about = "Wake-on-connect load tool for pgwake")]
pub struct Args {
    /// pgwake to measure. Without it, the tool starts its own pgwake in-process (local backend,
    /// throwaway data dirs) and suspends endpoints through the manager: the default and the
    /// fast way.
    #[arg(long)]
    proxy: Option<SocketAddr>,
    /// Admin address of the `--proxy` pgwake: suspension is then seen on /metrics, and brought
    /// about by that pgwake's idle timeout (configure a short one, e.g. 1s).
    #[arg(long, requires = "proxy")]
    admin: Option<SocketAddr>,
    /// Endpoint ids of the `--proxy` pgwake (repeat the flag). The first one is used for cold,
    /// warm, stampede and throughput; the first N for the parallel phases.
    #[arg(long = "endpoint", requires = "proxy")]
    endpoints: Vec<String>,
    /// Cold starts to measure.
    #[arg(long, default_value_t = 30)]
    cold_runs: usize,
    /// Warm connect+query round trips to measure.
    #[arg(long, default_value_t = 300)]
    warm_runs: usize,
    /// Clients that connect at once to one suspended endpoint.
    #[arg(long, default_value_t = 100)]
    stampede: usize,
    /// Stampedes to measure.
    #[arg(long, default_value_t = 3)]
    stampede_runs: usize,
    /// Endpoints woken at once, one client each (comma-separated list of counts).
    #[arg(long, value_delimiter = ',', default_value = "25,100")]
    parallel: Vec<usize>,
    /// Concurrent clients for the throughput phase.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Length of the throughput phase.
    #[arg(long, value_parser = humantime_parse, default_value = "10s")]
    duration: Duration,
    /// Sessions to open at once and keep idle, measuring the proxy's RSS per session
    /// (comma-separated counts, e.g. 5000,10000; off by default). Needs `--proxy-pid`.
    #[arg(long, value_delimiter = ',')]
    hold: Vec<usize>,
    /// Process id of the `--proxy` pgwake, for the hold phases' RSS and fd readings.
    #[arg(long, requires = "proxy")]
    proxy_pid: Option<u32>,
    /// Connect storm: this many raw TCP connects at once, each timed from its connect to the
    /// proxy's first byte (the answer to an SSLRequest): the listener and accept path alone,
    /// no compute involved (comma-separated counts, e.g. 2000; off by default).
    #[arg(long, value_delimiter = ',')]
    storm: Vec<usize>,
    /// Wakes per tier (from frozen at the manager and through a client, from stopped at the
    /// manager) in the `tiers` phases (in-process only).
    #[arg(long, default_value_t = 30)]
    tier_runs: usize,
    /// Pool endpoints frozen at once to measure a frozen compute's memory (`tiers`).
    #[arg(long, default_value_t = 5)]
    frozen_computes: usize,
    /// New endpoints whose first wake is timed, by template clone and by initdb (`tiers`).
    #[arg(long, default_value_t = 3)]
    new_endpoints: usize,
    /// Phases to skip (comma-separated: cold, warm, stampede, parallel, throughput, tiers).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Where results.json and latency.svg are written.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Redraw the table and latency.svg from an earlier results.json (into --out); runs nothing.
    #[arg(long)]
    replot: Option<PathBuf>,
    /// Longest any single client may take to connect and get its first result.
    #[arg(long, value_parser = humantime_parse, default_value = "120s")]
    timeout: Duration,
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?} (ms, s or m)")),
    }
}

impl Args {
    fn runs(&self, phase: &str) -> bool {
        !self.skip.iter().any(|s| s == phase)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGWAKE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(path) = &args.replot {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        return write_results(&args, &serde_json::from_str(&text)?);
    }
    let max_parallel = args.parallel.iter().copied().max().unwrap_or(0);
    let target = match args.proxy {
        Some(addr) => target::Target::external(addr, args.admin, args.endpoints.clone())?,
        None => target::Target::in_process(max_parallel, args.stampede)
            .await
            .context("starting pgwake in-process")?,
    };
    let results = phases::run_all(&args, &target).await;
    target.stop().await;
    write_results(&args, &results?)
}

fn write_results(args: &Args, results: &phases::Results) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let json = args.out.join("results.json");
    let svg = args.out.join("latency.svg");
    std::fs::write(&json, serde_json::to_string_pretty(results)?)?;
    std::fs::write(&svg, report::svg(results))?;
    print!("{}", report::table(results));
    println!("\nwrote {} and {}", json.display(), svg.display());
    Ok(())
}
