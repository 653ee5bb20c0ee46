//! The wake tiers of local computes (in-process only): a wake from frozen (light sleep) and
//! from stopped, timed at the manager (`Manager::wake`, no client: what the tier itself costs)
//! and through a client; the memory a frozen compute holds; and the first wake of a new
//! endpoint by template clone and by initdb.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgwake::{Config, Pgwake};
use pgwake_router::EndpointId;

use crate::phases::{connect_and_query, PhaseResult, Summary};
use crate::target::Target;
use crate::Args;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn result(name: &str, what: &str, samples: Vec<f64>, starts: Option<u64>) -> PhaseResult {
    PhaseResult {
        name: name.into(),
        what: what.into(),
        summary: Summary::of(&samples),
        samples_ms: samples,
        errors: 0,
        wall_ms: None,
        queries_per_sec: None,
        starts,
        memory: None,
    }
}

/// Waits until the proxy has seen every client of `id` go.
async fn detached(pgwake: &Pgwake, id: &EndpointId) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while pgwake.manager.stats(id).is_some_and(|s| s.attached > 0) {
        if Instant::now() >= deadline {
            bail!("{id}: clients still attached");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Freezes (or, with `freeze` false, stops) `id`, retrying while the compute still counts
/// the session of the client that just left (its backend exits a moment after the client).
async fn put_to_sleep(pgwake: &Pgwake, id: &EndpointId, freeze: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        detached(pgwake, id).await?;
        let m = &pgwake.manager;
        let done = if freeze {
            m.freeze(id).await
        } else {
            m.suspend(id).await
        };
        if done {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{id}: could not put it to sleep: {:?}", m.stats(id));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn run(args: &Args, target: &Target) -> anyhow::Result<Vec<PhaseResult>> {
    let Some(pgwake) = target.local_pgwake() else {
        eprintln!("tiers: in-process only, skipped");
        return Ok(Vec::new());
    };
    let m = &pgwake.manager;
    let id = EndpointId::parse(target.main())?;
    let route = pgwake
        .table
        .lookup(&id)
        .context("main endpoint not routed")?;
    let runs = args.tier_runs;
    let conn = target.conn_str(target.main());
    let mut out = Vec::new();
    connect_and_query(&conn, args.timeout).await?;
    let starts_before = target.starts(target.main());

    for (tier, client) in [("frozen", false), ("frozen", true), ("stopped", false)] {
        eprintln!(
            "tiers: {runs} wakes from {tier}{}",
            if client { " through a client" } else { "" }
        );
        let mut samples = Vec::new();
        for _ in 0..runs {
            put_to_sleep(pgwake, &id, tier == "frozen").await?;
            let t0 = Instant::now();
            if client {
                connect_and_query(&conn, args.timeout).await?;
            } else {
                drop(m.wake(&route).await?);
            }
            samples.push(ms(t0.elapsed()));
        }
        let (name, what) = match (tier, client) {
            ("frozen", false) => (
                "wake-frozen",
                "Manager::wake of a frozen compute: thaw + protocol probe",
            ),
            ("frozen", true) => ("client-frozen", "connect -> first result, compute frozen"),
            _ => (
                "wake-stopped",
                "Manager::wake of a stopped compute: postgres start + probe",
            ),
        };
        out.push(result(name, what, samples, None));
    }
    let starts = target
        .starts(target.main())
        .zip(starts_before)
        .map(|(a, b)| a - b);
    eprintln!("tiers: starts during the tier runs: {starts:?} (expected {runs}, the stopped ones)");

    // Memory of frozen computes: the pool's, woken, then frozen together.
    let pool: Vec<EndpointId> = target
        .pool(args.frozen_computes)
        .unwrap_or_default()
        .iter()
        .map(|p| EndpointId::parse(p))
        .collect::<Result<_, _>>()?;
    if !pool.is_empty() {
        eprintln!("tiers: memory of {} frozen computes", pool.len());
        let mut pss = Vec::new();
        let mut rss = Vec::new();
        for p in &pool {
            connect_and_query(&target.conn_str(p.as_str()), args.timeout).await?;
        }
        for p in &pool {
            put_to_sleep(pgwake, p, true).await?;
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            pss.push(mib(m.stats(p).and_then(|s| s.frozen_memory).unwrap_or(0)));
            rss.push(mib(rss_of(&pgwake.local.data_dir(p))));
        }
        out.push(result(
            "frozen-pss-MiB",
            "Pss summed over a frozen compute's processes, MiB (the budget's measure; values are MiB, not ms)",
            pss,
            None,
        ));
        out.push(result(
            "frozen-rss-MiB",
            "RSS summed over a frozen compute's processes, MiB (counts shared_buffers once per process; values are MiB, not ms)",
            rss,
            None,
        ));
        for p in &pool {
            put_to_sleep(pgwake, p, false).await?;
        }
    }

    if args.new_endpoints > 0 {
        out.push(first_wakes(args, pgwake, true).await?);
        out.push(first_wakes(args, pgwake, false).await?);
    }
    Ok(out)
}

/// RSS summed over the postgres processes whose working directory is `dir`.
fn rss_of(dir: &Path) -> u64 {
    let Ok(dir) = dir.canonicalize() else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == dir))
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let kib: u64 = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(kib * 1024)
        })
        .sum()
}

/// First wakes of `--new-endpoints` new endpoints one after another, in a pgwake of their own
/// with `template` on (clone; its template made first, not timed) or off (initdb each).
async fn first_wakes(args: &Args, main: &Pgwake, template: bool) -> anyhow::Result<PhaseResult> {
    let how = if template { "clone" } else { "initdb" };
    eprintln!("tiers: {} new endpoints by {how}", args.new_endpoints);
    let dir = tempfile::Builder::new()
        .prefix("pgwake-bench-new-")
        .tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let settings = &main.local.config().settings;
    let mut text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[compute]\nwake_timeout = \"120s\"\nidle_timeout = \"1h\"\n\
         [local]\ndata_root = \"{}\"\ncreate_data_root = true\ninitdb_args = [\"--no-sync\"]\ntemplate = {template}\n[local.settings]\n",
        dir.path().join("data").display()
    );
    for (k, v) in settings {
        text.push_str(&format!("{k} = \"{v}\"\n"));
    }
    let ids: Vec<String> = (0..=args.new_endpoints)
        .map(|i| format!("new{i}"))
        .collect();
    for id in &ids {
        text.push_str(&format!(
            "[[endpoint]]\nid = \"{id}\"\nbackend = \"local\"\n"
        ));
    }
    let config = Config::parse(&text).map_err(|e| anyhow::anyhow!("config: {e}"))?;
    let pgwake = Pgwake::start(config).await?;
    let conn = |id: &str| {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres options=endpoint={id} connect_timeout=120",
            pgwake.local_addr().port()
        )
    };
    // The first one makes the template (with templates on): not what a new endpoint costs
    // once there is one.
    connect_and_query(&conn(&ids[0]), args.timeout).await?;
    let mut samples = Vec::new();
    for id in &ids[1..] {
        let t0 = Instant::now();
        connect_and_query(&conn(id), args.timeout).await?;
        samples.push(ms(t0.elapsed()));
    }
    pgwake.shutdown().await;
    Ok(result(
        &format!("new-endpoint-{how}"),
        &format!("connect -> first result, first wake of a new endpoint by {how}"),
        samples,
        None,
    ))
}
