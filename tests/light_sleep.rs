//! Light sleep with real PostgreSQL: an idle local compute is frozen (every process stopped,
//! memory kept) and thawed by the next client; `deep_sleep_after` and the memory budget stop
//! frozen computes; a pgwake killed while computes are frozen leaves nothing frozen for good.
//! The freeze-thaw cycles and the kill run with both methods: the compute's cgroup v2 cgroup
//! (where this machine lets pgwake make one: root on a writable cgroupfs) and SIGSTOP.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use pgwake_compute_manager::{ManagerConfig, Phase};

const LONG: Duration = Duration::from_secs(60);

/// Idle computes freeze 50 ms after their last session and stay frozen for an hour: only
/// the tests' own actions (or the budget) stop them.
/// The 200-cycle tests measure fds and RSS of this whole test process, so no other test of
/// this file may run beside them (their sessions and stampedes would be counted): they take
/// this exclusively, every other test shares it.
static ISOLATION: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

const LIGHT: &str = "[compute]\nidle_timeout = \"50ms\"\ndeep_sleep_after = \"1h\"\n";

/// The live (not zombie) postgres processes of the cluster in `dir`, with their state letter:
/// every process whose working directory is the data directory and that runs postgres.
fn cluster(dir: &Path) -> Vec<(i32, char)> {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == dir))
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|e| e.to_string_lossy().contains("postgres"))
        })
        .filter_map(|pid| Some((pid, state(pid)?)))
        .filter(|(_, s)| *s != 'Z')
        .collect()
}

fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// How light sleep freezes the computes of a test.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Method {
    Cgroup,
    Signals,
}

impl Method {
    /// The `[local]` setting that picks it.
    fn config(self) -> &'static str {
        match self {
            Method::Cgroup => "[local]\ncgroup = \"auto\"\n",
            Method::Signals => "[local]\ncgroup = \"off\"\n",
        }
    }

    /// Whether this machine lets pgwake freeze through a cgroup: its own cgroup v2 cgroup is
    /// writable. Where it is not, a cgroup test says so and passes: pgwake falls back to
    /// SIGSTOP there, covered by the `Signals` runs.
    fn available(self) -> bool {
        match self {
            Method::Signals => true,
            Method::Cgroup => {
                let ok = own_cgroup_dir().is_some_and(|d| {
                    let c = std::ffi::CString::new(d.as_os_str().as_encoded_bytes()).unwrap();
                    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
                });
                if !ok {
                    eprintln!("skipped: no writable cgroup v2 cgroup here");
                }
                ok
            }
        }
    }
}

/// The cgroup v2 mount point.
fn cgroup_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
    })
}

/// The directory of the cgroup v2 cgroup of `pid` (`self` for the test).
fn cgroup_dir(pid: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(cgroup_mount()?.join(path.trim_start_matches('/')))
}

fn own_cgroup_dir() -> Option<PathBuf> {
    cgroup_dir("self")
}

/// Whether the cgroup `dir` reports all its processes frozen.
fn cgroup_frozen(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|e| e.lines().any(|l| l == "frozen 1"))
}

/// Every process of the cluster in `dir` frozen, by `method`: each stopped by a signal
/// (`T`), or none stopped and all in one frozen cgroup of the endpoint's own.
fn all_frozen(dir: &Path, method: Method) -> bool {
    let procs = cluster(dir);
    if procs.is_empty() {
        return false;
    }
    match method {
        Method::Signals => procs.iter().all(|(_, s)| *s == 'T'),
        Method::Cgroup => {
            let Some(cg) = compute_cgroup(dir) else {
                return false;
            };
            procs
                .iter()
                .all(|(pid, s)| *s != 'T' && cgroup_dir(&pid.to_string()).as_ref() == Some(&cg))
                && cgroup_frozen(&cg)
        }
    }
}

/// The cgroup of the compute in `dir`: its postmaster's, which must be one pgwake made for
/// this endpoint (named by its id, not pgwake's own).
fn compute_cgroup(dir: &Path) -> Option<PathBuf> {
    let pid = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
    let cg = cgroup_dir(pid.lines().next()?)?;
    (cg.file_name()? == dir.file_name()?
        && cg.components().any(|c| c.as_os_str() == "pgwake-computes"))
    .then_some(cg)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn count(env: &Env, endpoint: &str) -> i64 {
    let c = env.client(endpoint).await;
    c.query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_freezes_and_thaws_lose_no_row_and_leak_nothing_with_cgroups() {
    if Method::Cgroup.available() {
        two_hundred_freezes_and_thaws(Method::Cgroup).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_freezes_and_thaws_lose_no_row_and_leak_nothing_with_sigstop() {
    two_hundred_freezes_and_thaws(Method::Signals).await;
}

async fn two_hundred_freezes_and_thaws(method: Method) {
    let _alone = ISOLATION.write().await;
    // Autovacuum every second on a table that changes every cycle, so that freezes land in
    // the middle of its runs too.
    let settings = "[local.settings]\nautovacuum_naptime = \"1s\"\n\
                    autovacuum_vacuum_insert_threshold = \"5\"\nautovacuum_analyze_threshold = \"5\"\n";
    let env = Env::start(&format!("{LIGHT}{settings}{}", method.config()), DEMO).await;
    let dir = env.data_dir("demo");
    env.client("demo")
        .await
        .batch_execute("create table t (i int primary key)")
        .await
        .unwrap();
    let mut baseline = None;
    let mut processes = None;
    for i in 0..200 {
        env.wait_phase("demo", Phase::Frozen, LONG).await;
        // Frozen for real: every process of the compute is stopped, by the method asked for.
        wait_until(LONG, || all_frozen(&dir, method))
            .await
            .unwrap_or_else(|_| panic!("cycle {i}: not all frozen: {:?}", cluster(&dir)));
        let n = cluster(&dir).len();
        // The same processes each time: nothing forked per cycle is left over.
        assert!(
            processes.is_none_or(|p: usize| n <= p + 2),
            "cycle {i}: {n} processes"
        );
        processes.get_or_insert(n);
        if i == 20 {
            baseline = Some((open_fds(), rss_kib()));
        }
        let c = env.client("demo").await;
        c.execute("insert into t values ($1)", &[&i]).await.unwrap();
    }
    env.wait_phase("demo", Phase::Frozen, LONG).await;
    assert_eq!(count(&env, "demo").await, 200);
    let c = env.client("demo").await;
    let autovacuum: i64 = c
        .query_one(
            "select autovacuum_count + autoanalyze_count from pg_stat_user_tables where relname = 't'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(autovacuum > 0, "autovacuum never ran between the freezes");
    drop(c);
    let s = env.stats("demo").unwrap();
    assert_eq!((s.starts, s.crashes), (1, 0), "{s:?}");
    assert!(s.freezes >= 201 && s.thaws >= 201, "{s:?}");
    let (fds, rss) = baseline.unwrap();
    env.wait_detached("demo", LONG).await;
    assert!(open_fds() <= fds + 4, "fds grew: {fds} -> {}", open_fds());
    assert!(
        rss_kib() <= rss + 16 * 1024,
        "RSS grew: {rss} KiB -> {} KiB",
        rss_kib()
    );
    env.wait_phase("demo", Phase::Frozen, LONG).await;
    let cgroup = compute_cgroup(&dir);
    assert_eq!(cgroup.is_some(), method == Method::Cgroup, "{cgroup:?}");
    // Shutdown lets the frozen compute run and stops it: nothing is left, not its cgroup.
    let mut env = env;
    env.pgwake.take().unwrap().shutdown().await;
    assert_eq!(cluster(&dir), Vec::new());
    if let Some(cg) = cgroup {
        wait_until(LONG, || !cg.exists())
            .await
            .unwrap_or_else(|_| panic!("{} left", cg.display()));
    }
}

/// A checkpoint in progress across many freezes: a bulk write past a small max_wal_size
/// requests one, which is spread over most of checkpoint_timeout (27 of 30 s), while the
/// compute is frozen and thawed under it. It still completes, and no row is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_spans_freezes_completes() {
    let _shared = ISOLATION.read().await;
    let settings = "[local.settings]\nmax_wal_size = \"32MB\"\ncheckpoint_timeout = \"30s\"\n\
                    checkpoint_completion_target = \"0.9\"\n";
    let env = Env::start(&format!("{LIGHT}{settings}"), DEMO).await;
    let c = env.client("demo").await;
    c.batch_execute(
        "create table t (i int primary key);
         create table bulk as select g, repeat('x', 200) as pad from generate_series(1, 200000) g",
    )
    .await
    .unwrap();
    let after_bulk: String = c
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    drop(c);
    for i in 0..20 {
        env.wait_phase("demo", Phase::Frozen, LONG).await;
        let c = env.client("demo").await;
        c.execute("insert into t values ($1)", &[&i]).await.unwrap();
    }
    env.wait_phase("demo", Phase::Frozen, LONG).await;
    let c = env.client("demo").await;
    let requested: i64 = c
        .query_one("select checkpoints_req from pg_stat_bgwriter", &[])
        .await
        .unwrap()
        .get(0);
    assert!(requested > 0, "the bulk write requested no checkpoint");
    // Its record lands after the bulk write's WAL once it completes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let done: bool = c
            .query_one(
                "select checkpoint_lsn > $1::text::pg_lsn from pg_control_checkpoint()",
                &[&after_bulk],
            )
            .await
            .unwrap()
            .get(0);
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the checkpoint begun before the freezes never completed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let n: i64 = c
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 20);
    let s = env.stats("demo").unwrap();
    assert_eq!((s.starts, s.crashes), (1, 0), "{s:?}");
    assert!(s.freezes >= 21, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_on_a_frozen_endpoint_thaws_it_once() {
    let _shared = ISOLATION.read().await;
    let env = Env::start(LIGHT, DEMO).await;
    env.client("demo")
        .await
        .batch_execute("create table t (i int)")
        .await
        .unwrap();
    env.wait_phase("demo", Phase::Frozen, LONG).await;
    let before = env.stats("demo").unwrap();
    let clients = (0..100).map(|i| {
        let env = &env;
        async move {
            let c = env.client("demo").await;
            c.execute("insert into t values ($1)", &[&i]).await.unwrap();
            c
        }
    });
    // All kept open until every one is served: none may see the compute idle again.
    let clients = futures::future::join_all(clients).await;
    let after = env.stats("demo").unwrap();
    assert_eq!(after.thaws - before.thaws, 1, "{after:?}");
    assert_eq!(after.starts, 1, "{after:?}");
    drop(clients);
    assert_eq!(count(&env, "demo").await, 100);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_sleep_stops_a_frozen_compute_and_the_memory_budget_stops_the_least_recently_used() {
    let _shared = ISOLATION.read().await;
    let endpoints = "[[endpoint]]\nid = \"a\"\nbackend = \"local\"\n\
                     [[endpoint]]\nid = \"b\"\nbackend = \"local\"\n\
                     [[endpoint]]\nid = \"c\"\nbackend = \"local\"\n\
                     [[endpoint]]\nid = \"deep\"\nbackend = \"local\"\ndeep_sleep_after = \"200ms\"\n";
    let env = Env::start(LIGHT, endpoints).await;
    // Deep sleep: frozen, then stopped with a checkpoint; the data is there at the next wake.
    let deep_dir = env.data_dir("deep");
    env.client("deep")
        .await
        .batch_execute("create table t (i int); insert into t values (1)")
        .await
        .unwrap();
    env.wait_phase("deep", Phase::Frozen, LONG).await;
    env.wait_phase("deep", Phase::Suspended, LONG).await;
    assert_eq!(cluster(&deep_dir), Vec::new());
    let s = env.stats("deep").unwrap();
    assert_eq!((s.freezes, s.suspends), (1, 1), "{s:?}");
    assert_eq!(count(&env, "deep").await, 1);

    // The budget: a and b frozen, then room for about two computes when c freezes.
    let mut memory = Vec::new();
    for id in ["a", "b"] {
        env.client(id)
            .await
            .batch_execute("select 1")
            .await
            .unwrap();
        env.wait_phase(id, Phase::Frozen, LONG).await;
        memory.push(env.stats(id).unwrap().frozen_memory.expect("measured"));
    }
    let (ma, mb) = (memory[0], memory[1]);
    assert!(ma > 1 << 20 && mb > 1 << 20, "{memory:?}");
    let m = &env.pgwake().manager;
    m.set_config(ManagerConfig {
        max_frozen_memory: ma + mb + (ma + mb) / 4,
        ..m.config()
    });
    env.client("c")
        .await
        .batch_execute("select 1")
        .await
        .unwrap();
    env.wait_phase("c", Phase::Frozen, LONG).await;
    env.wait_phase("a", Phase::Suspended, LONG).await;
    assert_eq!(env.stats("b").unwrap().phase, Phase::Frozen);
    assert_eq!(env.stats("c").unwrap().phase, Phase::Frozen);
    assert_eq!(cluster(&env.data_dir("a")), Vec::new());
    env.stop().await;
}

async fn start_pgwake(cfg: &Path, port: u16) -> Proc {
    let child = spawn_pgwake(cfg);
    wait_until(LONG, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await
    .expect("pgwake listening");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn computes_frozen_in_cgroups_when_pgwake_is_killed_are_thawed_and_stopped_by_the_next_one() {
    if Method::Cgroup.available() {
        frozen_when_pgwake_is_killed(Method::Cgroup).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn computes_stopped_when_pgwake_is_killed_are_thawed_and_stopped_by_the_next_one() {
    frozen_when_pgwake_is_killed(Method::Signals).await;
}

async fn frozen_when_pgwake_is_killed(method: Method) {
    let _shared = ISOLATION.read().await;
    let dir = tempdir();
    let port = free_port();
    let cfg = dir.path().join("pgwake.toml");
    let endpoints = "[[endpoint]]\nid = \"a\"\nbackend = \"local\"\n\
                     [[endpoint]]\nid = \"b\"\nbackend = \"local\"\n";
    let text = config_text(
        dir.path(),
        &format!("{LIGHT}{}", method.config()),
        endpoints,
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&cfg, text).unwrap();
    let conn = |id: &str| {
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres options=endpoint={id}")
    };
    let mut pgwake = start_pgwake(&cfg, port).await;
    let data = dir.path().join("data");
    for id in ["a", "b"] {
        stdout(&psql(
            &conn(id),
            "create table t (i int); insert into t select generate_series(1, 1000)",
        ));
    }
    for id in ["a", "b"] {
        wait_until(LONG, || all_frozen(&data.join(id), method))
            .await
            .unwrap_or_else(|_| panic!("{id} not frozen: {:?}", cluster(&data.join(id))));
    }
    let frozen: Vec<Vec<(i32, char)>> = ["a", "b"].map(|id| cluster(&data.join(id))).into();
    let cgroups: Vec<Option<PathBuf>> = ["a", "b"].map(|id| compute_cgroup(&data.join(id))).into();
    pgwake.0.kill().unwrap();
    pgwake.0.wait().unwrap();
    // Nothing lets them finish by themselves. With SIGSTOP, the kernel continues the
    // postmaster (its process group is orphaned with a stopped member: SIGHUP and SIGCONT),
    // which then acts on its death signal (SIGINT, fast shutdown), but its children, each in
    // a session of its own, stay stopped, so the shutdown never ends. In a frozen cgroup the
    // postmaster stays frozen too, its death signal pending.
    for (id, cg) in ["a", "b"].iter().zip(&cgroups) {
        let procs = cluster(&data.join(id));
        match method {
            Method::Signals => assert!(procs.iter().any(|(_, s)| *s == 'T'), "{id}: {procs:?}"),
            Method::Cgroup => {
                let cg = cg.as_ref().unwrap();
                assert!(!procs.is_empty() && cgroup_frozen(cg), "{id}: {procs:?}");
            }
        }
    }

    let pgwake = start_pgwake(&cfg, port).await;
    // At its start, before any client: each old compute runs again and shuts down.
    for (id, procs) in ["a", "b"].iter().zip(&frozen) {
        wait_until(LONG, || {
            procs
                .iter()
                .all(|(pid, _)| !process_alive(*pid) || state(*pid) == Some('Z'))
        })
        .await
        .unwrap_or_else(|_| panic!("{id}'s old processes linger: {:?}", cluster(&data.join(id))));
    }
    for id in ["a", "b"] {
        assert_eq!(stdout(&psql(&conn(id), "select count(*) from t")), "1000");
    }
    drop(pgwake);
    for id in ["a", "b"] {
        wait_until(LONG, || cluster(&data.join(id)).is_empty())
            .await
            .unwrap_or_else(|_| panic!("{id} left running: {:?}", cluster(&data.join(id))));
    }
    // The cgroups of stopped computes do not accumulate.
    for cg in cgroups.iter().flatten() {
        wait_until(LONG, || !cg.exists())
            .await
            .unwrap_or_else(|_| panic!("{} left", cg.display()));
    }
}

/// A runtime that ends with a compute frozen and no stop (the end of a test, pgwake leaving on
/// an error path) leaves none of its processes behind: the postmaster dies with the task that
/// owns it, and its frozen children are let run, so that they see it gone and exit.
#[test]
fn a_runtime_that_ends_with_a_compute_frozen_leaves_no_process() {
    let _shared = ISOLATION.blocking_read();
    for method in [Method::Signals, Method::Cgroup] {
        if !method.available() {
            continue;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (env, dir, cgroup) = rt.block_on(async {
            let env = Env::start(&format!("{LIGHT}{}", method.config()), DEMO).await;
            env.client("demo")
                .await
                .batch_execute("create table t (i int)")
                .await
                .unwrap();
            env.wait_phase("demo", Phase::Frozen, LONG).await;
            let dir = env.data_dir("demo");
            wait_until(LONG, || all_frozen(&dir, method))
                .await
                .unwrap_or_else(|_| panic!("{method:?}: not frozen: {:?}", cluster(&dir)));
            let cgroup = compute_cgroup(&dir);
            (env, dir, cgroup)
        });
        let frozen = cluster(&dir);
        drop(rt);
        // Dropped in a runtime of its own: what is left of pgwake may need one to go.
        let after = tokio::runtime::Runtime::new().unwrap();
        after.block_on(async {
            wait_until(LONG, || {
                frozen
                    .iter()
                    .all(|(pid, _)| !process_alive(*pid) || state(*pid) == Some('Z'))
            })
            .await
            .unwrap_or_else(|_| panic!("{method:?}: processes left: {:?}", cluster(&dir)));
            drop(env);
        });
        // Its cgroup goes with pgwake, once empty.
        if let Some(cg) = cgroup {
            assert!(!cg.exists(), "{} left", cg.display());
        }
    }
}
