//! The five measurements. Every latency is what a client sees: from the start of
//! `tokio_postgres::connect` to the first query's result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::hold::HoldMemory;
use crate::target::Target;
use crate::Args;

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub mode: String,
    pub phases: Vec<PhaseResult>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub postgres: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PhaseResult {
    pub name: String,
    pub what: String,
    /// Latencies in milliseconds (empty for throughput, where they are summarized only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples_ms: Vec<f64>,
    pub summary: Summary,
    pub errors: usize,
    /// Whole-phase time for the concurrent phases: first connect to last result.
    pub wall_ms: Option<f64>,
    pub queries_per_sec: Option<f64>,
    /// Compute starts the phase caused, where the tool can see them (in-process).
    pub starts: Option<u64>,
    /// The proxy's memory around a hold phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<HoldMemory>,
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        // Nearest rank: the smallest sample with at least p% of samples at or below it.
        let pct = |p: f64| s[((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        Summary {
            n: s.len(),
            min: s[0],
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            max: s[s.len() - 1],
            mean: s.iter().sum::<f64>() / s.len() as f64,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Connects, runs `select 1`, checks the answer, disconnects; returns the time to the result.
pub async fn connect_and_query(conn: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let fut = async {
        let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
        let task = tokio::spawn(connection);
        let row = client.query_one("select 1", &[]).await?;
        let elapsed = t0.elapsed();
        if row.get::<_, i32>(0) != 1 {
            bail!("select 1 returned something else");
        }
        drop(client);
        let _ = task.await;
        Ok(elapsed)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .context("client timed out")?
}

pub async fn run_all(args: &Args, target: &Target) -> anyhow::Result<Results> {
    let mut phases = Vec::new();
    let suspend_ok = target.can_suspend();
    let main = target.main().to_string();
    if args.runs("cold") && suspend_ok {
        phases.push(cold(args, target, &main).await?);
    }
    if args.runs("warm") {
        phases.push(warm(args, target, &main).await?);
    }
    if args.runs("stampede") && suspend_ok {
        phases.push(stampede(args, target, &main).await?);
    }
    if args.runs("parallel") && suspend_ok {
        for &n in &args.parallel {
            match target.pool(n) {
                Some(ids) => phases.push(parallel(args, target, ids).await?),
                None => eprintln!("parallel {n}: not enough endpoints given, skipped"),
            }
        }
    }
    if args.runs("throughput") {
        phases.push(throughput(args, target, &main).await?);
    }
    if args.runs("tiers") {
        phases.extend(crate::tiers::run(args, target).await?);
    }
    for &n in &args.storm {
        phases.push(storm(args, target, n).await?);
    }
    for &n in &args.hold {
        phases.push(crate::hold::hold(args, target, n).await?);
    }
    if !suspend_ok {
        eprintln!("no --admin: cold, stampede and parallel phases skipped");
    }
    Ok(Results {
        machine: machine(),
        mode: target.mode().into(),
        phases,
    })
}

async fn cold(args: &Args, target: &Target, ep: &str) -> anyhow::Result<PhaseResult> {
    eprintln!("cold: {} runs", args.cold_runs);
    let conn = target.conn_str(ep);
    let before = target.starts(ep);
    let mut samples = Vec::new();
    for _ in 0..args.cold_runs {
        target.suspend(&[ep.to_string()]).await?;
        samples.push(ms(connect_and_query(&conn, args.timeout).await?));
    }
    Ok(PhaseResult {
        name: "cold".into(),
        what: "connect -> first result, endpoint suspended".into(),
        summary: Summary::of(&samples),
        samples_ms: samples,
        errors: 0,
        wall_ms: None,
        queries_per_sec: None,
        starts: delta(before, target.starts(ep)),
        memory: None,
    })
}

async fn warm(args: &Args, target: &Target, ep: &str) -> anyhow::Result<PhaseResult> {
    eprintln!("warm: {} runs", args.warm_runs);
    let conn = target.conn_str(ep);
    // Make sure it runs; this one is not counted.
    connect_and_query(&conn, args.timeout).await?;
    let before = target.starts(ep);
    let mut samples = Vec::new();
    for _ in 0..args.warm_runs {
        samples.push(ms(connect_and_query(&conn, args.timeout).await?));
    }
    Ok(PhaseResult {
        name: "warm".into(),
        what: "connect -> first result, compute running".into(),
        summary: Summary::of(&samples),
        samples_ms: samples,
        errors: 0,
        wall_ms: None,
        queries_per_sec: None,
        starts: delta(before, target.starts(ep)),
        memory: None,
    })
}

/// Runs one client per entry of `conns` at once; returns every latency, the failures and the
/// wall time.
async fn at_once(conns: Vec<String>, timeout: Duration) -> (Vec<f64>, usize, f64) {
    let t0 = Instant::now();
    let results = futures::future::join_all(
        conns
            .into_iter()
            .map(|c| tokio::spawn(async move { connect_and_query(&c, timeout).await })),
    )
    .await;
    let wall = ms(t0.elapsed());
    let mut samples = Vec::new();
    let mut errors = 0;
    for r in results {
        match r {
            Ok(Ok(d)) => samples.push(ms(d)),
            Ok(Err(e)) => {
                errors += 1;
                eprintln!("  client failed: {e:#}");
            }
            Err(e) => {
                errors += 1;
                eprintln!("  client task failed: {e}");
            }
        }
    }
    (samples, errors, wall)
}

/// One storm client: connect, send an SSLRequest, wait for the one-byte answer.
async fn first_byte(addr: std::net::SocketAddr, timeout: Duration) -> anyhow::Result<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t0 = Instant::now();
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        // Length 8, code 80877103.
        s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        let elapsed = t0.elapsed();
        if b[0] != b'N' && b[0] != b'S' {
            bail!("answer {:?} to an SSLRequest", b[0] as char);
        }
        anyhow::Ok(elapsed)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .context("client timed out")?
}

/// `n` connects released at the same instant (every task is spawned and waiting first).
async fn storm(args: &Args, target: &Target, n: usize) -> anyhow::Result<PhaseResult> {
    eprintln!("storm: {n} connects at once");
    let (go, ready) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let mut ready = ready.clone();
            let (addr, timeout) = (target.addr, args.timeout);
            tokio::spawn(async move {
                let _ = ready.wait_for(|go| *go).await;
                first_byte(addr, timeout).await
            })
        })
        .collect();
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    go.send_replace(true);
    let results = futures::future::join_all(tasks).await;
    let wall = ms(t0.elapsed());
    let mut samples = Vec::new();
    let mut errors = 0;
    for r in results {
        match r {
            Ok(Ok(d)) => samples.push(ms(d)),
            Ok(Err(e)) => {
                errors += 1;
                eprintln!("  client failed: {e:#}");
            }
            Err(e) => {
                errors += 1;
                eprintln!("  client task failed: {e}");
            }
        }
    }
    Ok(PhaseResult {
        name: format!("storm-{n}"),
        what: format!("{n} TCP connects at once, to the first byte of an SSLRequest answer"),
        summary: Summary::of(&samples),
        samples_ms: samples,
        errors,
        wall_ms: Some(wall),
        queries_per_sec: None,
        starts: None,
        memory: None,
    })
}

async fn stampede(args: &Args, target: &Target, ep: &str) -> anyhow::Result<PhaseResult> {
    let c = args.stampede;
    eprintln!("stampede: {c} clients x {} runs", args.stampede_runs);
    let mut samples = Vec::new();
    let mut errors = 0;
    let mut walls = Vec::new();
    let mut starts = Some(0);
    for _ in 0..args.stampede_runs {
        target.suspend(&[ep.to_string()]).await?;
        let before = target.starts(ep);
        let (s, e, wall) = at_once(vec![target.conn_str(ep); c], args.timeout).await;
        let d = delta(before, target.starts(ep));
        if let Some(d) = d {
            if d != 1 {
                bail!("stampede of {c} clients caused {d} starts, expected exactly 1");
            }
        }
        starts = starts.zip(d).map(|(a, b)| a + b);
        samples.extend(s);
        errors += e;
        walls.push(wall);
    }
    Ok(PhaseResult {
        name: format!("stampede-{c}"),
        what: format!("{c} clients at once on one suspended endpoint"),
        summary: Summary::of(&samples),
        samples_ms: samples,
        errors,
        wall_ms: Some(Summary::of(&walls).p50),
        queries_per_sec: None,
        starts,
        memory: None,
    })
}

async fn parallel(args: &Args, target: &Target, ids: &[String]) -> anyhow::Result<PhaseResult> {
    let n = ids.len();
    eprintln!("parallel: {n} endpoints waking at once");
    target.suspend(ids).await?;
    let before: Option<u64> = ids.iter().map(|id| target.starts(id)).sum();
    let (samples, errors, wall) = at_once(
        ids.iter().map(|id| target.conn_str(id)).collect(),
        args.timeout,
    )
    .await;
    let after: Option<u64> = ids.iter().map(|id| target.starts(id)).sum();
    Ok(PhaseResult {
        name: format!("parallel-{n}"),
        what: format!("{n} suspended endpoints woken at once, one client each"),
        summary: Summary::of(&samples),
        samples_ms: samples,
        errors,
        wall_ms: Some(wall),
        queries_per_sec: None,
        starts: delta(before, after),
        memory: None,
    })
}

async fn throughput(args: &Args, target: &Target, ep: &str) -> anyhow::Result<PhaseResult> {
    let k = args.clients;
    eprintln!("throughput: {k} clients for {:?}", args.duration);
    let conn = target.conn_str(ep);
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..k {
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let stmt = client.prepare("select 1").await?;
        clients.push((client, stmt));
    }
    let t0 = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(client, stmt)| {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                let mut errors = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let q0 = Instant::now();
                    match client.query_one(&stmt, &[]).await {
                        Ok(_) => lat.push(ms(q0.elapsed())),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await?;
        samples.extend(lat);
        errors += e;
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(PhaseResult {
        name: format!("throughput-{k}"),
        what: format!("{k} connected clients, prepared `select 1` in a loop"),
        summary: Summary::of(&samples),
        queries_per_sec: Some(samples.len() as f64 / secs),
        samples_ms: Vec::new(),
        errors,
        wall_ms: Some(secs * 1000.0),
        starts: None,
        memory: None,
    })
}

fn delta(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(after?.saturating_sub(before.unwrap_or(0)))
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cmd = |prog: &str, args: &[&str]| {
        std::process::Command::new(prog)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let postgres = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).max())
        .map(|p| cmd(&p.join("bin/postgres").to_string_lossy(), &["--version"]))
        .unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        kernel: cmd("uname", &["-sr"]),
        postgres,
    }
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        let sum = Summary::of(&s);
        assert_eq!(
            (sum.min, sum.p50, sum.p90, sum.p99, sum.max),
            (1.0, 50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(sum.mean, 50.5);
        let one = Summary::of(&[7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert_eq!(Summary::of(&[]).n, 0);
    }
}
