//! Suspend/resume soak: 200 cycles of suspend → wake → verify every committed row → write more,
//! checking that each suspended compute left no process behind and that the proxy's file
//! descriptors and memory do not grow. Ignored by default (about 45 s on two
//! cores); run it with
//!
//! ```sh
//! cargo test --test soak -- --ignored --nocapture
//! ```
//!
//! `PGWAKE_SOAK_CYCLES` changes the number of cycles.

mod common;

use std::time::Duration;

use common::*;
use pgwake_compute_manager::Phase;
use pgwake_router::EndpointId;

const LONG: Duration = Duration::from_secs(60);
/// Rows written per cycle: two in one transaction, one on its own.
const ROWS_PER_CYCLE: i64 = 3;

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `pid` and every process whose parent is `pid`, from /proc.
fn with_children(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split(' ').nth(1))
            .and_then(|s| s.parse::<i32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split(' ').next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: ~45 s; run with --ignored"]
async fn suspend_resume_soak() {
    let cycles: i64 = std::env::var("PGWAKE_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let env = Env::start("", DEMO).await;
    let id = EndpointId::parse("demo").unwrap();
    let client = env.client("demo").await;
    client
        .batch_execute("create table t (i bigint primary key, cycle int not null)")
        .await
        .unwrap();
    drop(client);
    env.wait_detached("demo", LONG).await;

    let started = std::time::Instant::now();
    let mut baseline = None;
    let mut all_procs: Vec<i32> = Vec::new();
    for cycle in 0..cycles {
        let postmaster = postmaster_pid(&env.data_dir("demo")).expect("compute running");
        let procs = with_children(postmaster);
        assert!(
            env.pgwake().manager.suspend(&id).await,
            "cycle {cycle}: suspend"
        );
        assert_eq!(env.stats("demo").unwrap().phase, Phase::Suspended);
        // A clean stop: the postmaster and every child of it are gone.
        wait_until(LONG, || procs.iter().all(|p| !running(*p)))
            .await
            .unwrap_or_else(|_| panic!("cycle {cycle}: processes left behind: {procs:?}"));
        all_procs.extend(procs);

        let client = env.client("demo").await;
        // Every row committed so far, exactly.
        let rows: Vec<(i64, i32)> = client
            .query("select i, cycle from t order by i", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let want: Vec<(i64, i32)> = (0..cycle * ROWS_PER_CYCLE)
            .map(|i| (i, (i / ROWS_PER_CYCLE) as i32))
            .collect();
        assert_eq!(rows, want, "cycle {cycle}: committed rows after wake");

        let base = cycle * ROWS_PER_CYCLE;
        let c = cycle as i32;
        client
            .batch_execute(&format!(
                "begin; insert into t values ({base}, {c}), ({}, {c}); commit",
                base + 1
            ))
            .await
            .unwrap();
        client
            .execute("insert into t values ($1, $2)", &[&(base + 2), &c])
            .await
            .unwrap();
        drop(client);
        env.wait_detached("demo", LONG).await;
        if cycle == 0 {
            // After one full cycle, so lazily created state (thread pools, buffers) counts as
            // the baseline, not as growth.
            baseline = Some((fd_count(), rss_kib()));
        }
    }
    let (fd_before, rss_before) = baseline.unwrap();
    let (fd_after, rss_after) = (fd_count(), rss_kib());
    let s = env.stats("demo").unwrap();
    eprintln!(
        "soak: {cycles} cycles in {:.1}s; starts {} suspends {} crashes {}; \
         fds {fd_before} -> {fd_after}; RSS {rss_before} KiB -> {rss_after} KiB",
        started.elapsed().as_secs_f64(),
        s.starts,
        s.suspends,
        s.crashes
    );
    assert_eq!(s.starts as i64, cycles + 1);
    assert_eq!(s.crashes, 0);
    let last = postmaster_pid(&env.data_dir("demo")).unwrap();
    let last_procs = with_children(last);
    let data_dir = env.data_dir("demo");
    // Stop pgwake (and its computes) but keep the directory until the leak check has run.
    let mut env = env;
    if let Some(p) = env.pgwake.take() {
        p.shutdown().await;
    }
    all_procs.extend(last_procs);
    let mut leaked: Vec<i32> = all_procs.into_iter().filter(|p| running(*p)).collect();
    // And anything else still working in the data directory, whoever its parent is.
    if let Ok(dir) = data_dir.canonicalize() {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let cwd = std::fs::read_link(format!("/proc/{p}/cwd"));
            if cwd.is_ok_and(|c| c == dir) && running(p) && !leaked.contains(&p) {
                leaked.push(p);
            }
        }
    }
    drop(env);
    eprintln!("soak: leaked postgres processes after stop: {leaked:?}");
    assert!(leaked.is_empty(), "leaked processes: {leaked:?}");
    assert!(
        fd_after <= fd_before + 4,
        "fds grew: {fd_before} -> {fd_after}"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew by more than 32 MiB: {rss_before} -> {rss_after} KiB"
    );
}
