//! The `hold-N` phases: N sessions opened through the proxy and kept open and idle, to measure
//! what one idle proxied session costs the proxy (its RSS, read from /proc, so the proxy must
//! be another process on this machine: `--proxy` with `--proxy-pid`) and that the proxy holds
//! that many at once (every session answers a query again after all N are open).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::phases::{PhaseResult, Summary};
use crate::target::Target;
use crate::Args;

/// Connects in flight at once while opening sessions: enough to open 10,000 in seconds,
/// few enough that no listen backlog overflows (a dropped SYN costs a 1 s retransmit).
const OPENING: usize = 128;

/// The proxy process's memory and descriptors around one hold phase.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct HoldMemory {
    pub pid: u32,
    pub rss_kib_before: u64,
    /// With all N sessions open and each having run a query after all were open.
    pub rss_kib_held: u64,
    /// Once the sessions are closed and the proxy counts none: what it gives back.
    pub rss_kib_after: u64,
    pub fds_before: u64,
    pub fds_held: u64,
    /// (held - before) / N.
    pub kib_per_session: f64,
}

/// The proxy's VmRSS in KiB and its open descriptors.
fn usage(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (is --proxy-pid right?)"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok((rss, fds))
}

type Session = (tokio_postgres::Client, tokio::task::JoinHandle<()>);

async fn open(conn: &str, timeout: Duration) -> anyhow::Result<(Session, f64)> {
    let t0 = Instant::now();
    let fut = async {
        let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        check(&client).await?;
        anyhow::Ok((client, task))
    };
    let session = tokio::time::timeout(timeout, fut)
        .await
        .context("client timed out")??;
    Ok((session, t0.elapsed().as_secs_f64() * 1000.0))
}

async fn check(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    // Simple protocol: one round trip, nothing prepared that a pooler in front of the
    // compute would have to keep per session.
    let msgs = client.simple_query("select 1").await?;
    let one = msgs
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("1")));
    if !one {
        bail!("select 1 returned something else");
    }
    Ok(())
}

/// Waits until the proxy's descriptor count is back near `fds`: it closes its side a moment
/// after the client does, and the next measurement must not start on top of the last one.
async fn wait_for_fds(pid: u32, fds: u64, deadline: Duration) -> anyhow::Result<(u64, u64)> {
    let end = Instant::now() + deadline;
    loop {
        let (rss, now) = usage(pid)?;
        if now <= fds + 2 {
            return Ok((rss, now));
        }
        if Instant::now() >= end {
            bail!("proxy still has {now} fds {deadline:?} after closing (was {fds})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn hold(args: &Args, target: &Target, n: usize) -> anyhow::Result<PhaseResult> {
    let Some(pid) = args.proxy_pid else {
        bail!("hold phases need --proxy-pid (the proxy's RSS is read from /proc)");
    };
    eprintln!("hold: opening {n} sessions");
    let conn = target.conn_str(target.main());
    let (_, fds_idle) = usage(pid)?;
    // One session first so that the compute is up and the proxy's one-off allocations
    // (runtime, TLS config, first-connection pools) are in the baseline, not in the delta.
    drop(open(&conn, args.timeout).await?);
    let (rss_before, fds_before) = wait_for_fds(pid, fds_idle, args.timeout).await?;

    let t0 = Instant::now();
    let opened: Vec<(Session, f64)> = futures::stream::iter(0..n)
        .map(|_| open(&conn, args.timeout))
        .buffer_unordered(OPENING)
        .try_collect()
        .await
        .with_context(|| format!("opening {n} sessions"))?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let (sessions, samples): (Vec<Session>, Vec<f64>) = opened.into_iter().unzip();

    // All N are open at once now; each one answers again, so none is merely half-open.
    let errors = futures::stream::iter(&sessions)
        .map(|(client, _)| check(client))
        .buffer_unordered(OPENING)
        .filter(|r| std::future::ready(r.is_err()))
        .count()
        .await;
    let (rss_held, fds_held) = usage(pid)?;
    eprintln!(
        "hold: {n} sessions open, proxy RSS {rss_before} -> {rss_held} KiB, fds {fds_before} -> {fds_held}, {errors} errors"
    );

    for (client, task) in sessions {
        drop(client);
        let _ = task.await;
    }
    let (rss_after, _) = wait_for_fds(pid, fds_before, args.timeout).await?;

    Ok(PhaseResult {
        name: format!("hold-{n}"),
        what: format!("{n} sessions open at once and idle; proxy RSS per session"),
        summary: Summary::of(&samples),
        samples_ms: samples,
        errors,
        wall_ms: Some(wall_ms),
        queries_per_sec: None,
        starts: None,
        memory: Some(HoldMemory {
            pid,
            rss_kib_before: rss_before,
            rss_kib_held: rss_held,
            rss_kib_after: rss_after,
            fds_before,
            fds_held,
            kib_per_session: rss_held.saturating_sub(rss_before) as f64 / n as f64,
        }),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_its_own_usage() {
        let (rss, fds) = super::usage(std::process::id()).expect("own /proc entry");
        assert!(rss > 0 && fds > 0, "rss {rss} fds {fds}");
    }
}
