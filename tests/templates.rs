//! New local endpoints from a template cluster: the first wakes of new endpoints run initdb
//! once (for the template) and copy it, the copies are independent clusters, a half-made
//! template is removed and made again, and `local.template = false` runs initdb per endpoint.
//! initdb is counted through a `bin_dir` whose initdb logs each call and runs the real one.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;

const ABC: &str = "[[endpoint]]\nid = \"a\"\nbackend = \"local\"\n\
                   [[endpoint]]\nid = \"b\"\nbackend = \"local\"\n\
                   [[endpoint]]\nid = \"c\"\nbackend = \"local\"\n";

/// A bin_dir with the real postgres and an initdb that appends its arguments to the returned
/// file before running the real one.
fn counting_bin_dir(dir: &Path) -> (PathBuf, PathBuf) {
    let real = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .unwrap();
    let real = String::from_utf8(real.stdout).unwrap().trim().to_string();
    let bin = dir.join("bin");
    let state = dir.join("state");
    std::fs::create_dir(&bin).unwrap();
    std::fs::create_dir(&state).unwrap();
    // initdb runs as the compute user when the tests run as root.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(format!("{real}/postgres"), bin.join("postgres")).unwrap();
    let calls = state.join("calls");
    std::fs::write(
        bin.join("initdb"),
        format!(
            "#!/bin/sh\necho \"$@\" >> '{calls}'\nexec '{real}/initdb' \"$@\"\n",
            calls = calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(bin.join("initdb"), std::fs::Permissions::from_mode(0o755)).unwrap();
    (bin, calls)
}

fn initdb_calls(calls: &Path) -> Vec<String> {
    std::fs::read_to_string(calls)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `env.client`, but a failure shows the SQLSTATE and message instead of just "db error".
async fn client_or_explain(env: &Env, endpoint: &str) -> tokio_postgres::Client {
    match tokio_postgres::connect(&env.conn_str(endpoint), tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            client
        }
        Err(e) => panic!(
            "connect to {endpoint}: {e:?} {:?}\nstats: {:?}",
            e.as_db_error().map(|d| (d.code().code(), d.message())),
            env.stats(endpoint)
        ),
    }
}

async fn has_table(client: &tokio_postgres::Client, name: &str) -> bool {
    client
        .query_one("select to_regclass($1) is not null", &[&name])
        .await
        .unwrap()
        .get(0)
}

async fn system_identifier(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("select system_identifier from pg_control_system()", &[])
        .await
        .unwrap()
        .get(0)
}

/// The complete templates (not the temporary directories of ones being made).
fn templates(data: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(data.join(".pgwake/templates")) {
        Ok(entries) => entries
            .map(|e| e.unwrap())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_endpoints_are_copies_of_one_template_made_once_and_a_half_made_one_is_made_again() {
    let dir = tempdir();
    let (bin, calls) = counting_bin_dir(dir.path());
    let extra = format!("[local]\nbin_dir = \"{}\"", bin.display());
    let env = Env::start_in(dir, &extra, ABC).await;
    let data = env.dir.path().join("data");

    // Two first wakes at once: one template, made once.
    let started = Instant::now();
    let (a, b) = tokio::join!(client_or_explain(&env, "a"), client_or_explain(&env, "b"));
    let with_template = started.elapsed();
    assert_eq!(
        initdb_calls(&calls).len(),
        1,
        "initdb calls: {:?}",
        initdb_calls(&calls)
    );
    let made = templates(&data);
    assert_eq!(made.len(), 1, "{made:?}");
    for id in ["a", "b"] {
        assert!(data.join(".pgwake/initialised").join(id).is_file(), "{id}");
        assert!(!data.join(format!(".{id}.initdb")).exists(), "{id}");
    }

    // Independent clusters that share the template's system identifier (documented).
    a.batch_execute("create table only_in_a (i int); insert into only_in_a values (1)")
        .await
        .unwrap();
    assert!(has_table(&a, "only_in_a").await);
    assert!(!has_table(&b, "only_in_a").await, "b sees a's table");
    b.batch_execute("create table only_in_b (i int)")
        .await
        .unwrap();
    assert!(!has_table(&a, "only_in_b").await, "a sees b's table");
    assert_eq!(system_identifier(&a).await, system_identifier(&b).await);

    // A further new endpoint is a copy alone: no initdb at all.
    let started = Instant::now();
    let c = client_or_explain(&env, "c").await;
    let from_copy = started.elapsed();
    let n: i32 = c.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    assert_eq!(initdb_calls(&calls).len(), 1);
    eprintln!(
        "first wake (debug build, initdb --no-sync): a and b at once, template made = {with_template:?}; \
         c from the existing template = {from_copy:?}"
    );
    drop((a, b, c));

    // pgwake died while making the template (its temporary directory is left), and the
    // template itself lost a file: both are removed and the template is made again.
    let Env { pgwake, dir, .. } = env;
    pgwake.unwrap().shutdown().await;
    let template = made[0].clone();
    let key = template.file_name().unwrap().to_string_lossy().into_owned();
    let leftover = template.with_file_name(format!(".{key}.initdb"));
    std::fs::create_dir(&leftover).unwrap();
    std::fs::write(leftover.join("PG_VERSION"), "15\n").unwrap();
    std::fs::remove_file(template.join("PG_VERSION")).unwrap();
    std::fs::remove_dir_all(data.join("c")).unwrap();
    std::fs::remove_file(data.join(".pgwake/initialised/c")).unwrap();

    let env = Env::start_in(dir, &extra, ABC).await;
    let c = client_or_explain(&env, "c").await;
    assert!(!has_table(&c, "only_in_a").await);
    assert_eq!(initdb_calls(&calls).len(), 2, "the template was made again");
    assert!(template.join("PG_VERSION").is_file());
    assert!(!leftover.exists(), "the half-made template was removed");
    assert_eq!(templates(&data), vec![template]);
    // Endpoints copied earlier are untouched.
    let a = client_or_explain(&env, "a").await;
    assert!(has_table(&a, "only_in_a").await);
    drop((a, c));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_templates_off_every_new_endpoint_runs_initdb() {
    let dir = tempdir();
    let (bin, calls) = counting_bin_dir(dir.path());
    let extra = format!("[local]\nbin_dir = \"{}\"\ntemplate = false", bin.display());
    let env = Env::start_in(dir, &extra, ABC).await;
    let data = env.dir.path().join("data");

    let started = Instant::now();
    let a = client_or_explain(&env, "a").await;
    let with_initdb = started.elapsed();
    eprintln!(
        "first wake (debug build, initdb --no-sync): a with its own initdb = {with_initdb:?}"
    );
    let b = client_or_explain(&env, "b").await;
    assert_eq!(
        initdb_calls(&calls).len(),
        2,
        "initdb calls: {:?}",
        initdb_calls(&calls)
    );
    assert!(templates(&data).is_empty());
    assert!(!data.join(".pgwake/templates").exists());
    a.batch_execute("create table only_in_a (i int)")
        .await
        .unwrap();
    assert!(!has_table(&b, "only_in_a").await);
    drop((a, b));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_fills_the_disk_leaves_nothing_half_made_and_recovers_with_space() {
    let env = Env::start("", "[[endpoint]]\nid = \"a\"\nbackend = \"local\"\n").await;
    let root = env.dir.path().join("data");
    std::fs::create_dir(&root).unwrap();
    // Room for the template (~40 MiB) but not for a copy of it too.
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=60m,mode=0755",
            "pgwake-test-copy",
        ])
        .arg(&root)
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("skipped: cannot mount a size-limited tmpfs here: {other:?}");
            env.stop().await;
            return;
        }
    }
    let mount = Mount(root.clone());

    let err = match tokio_postgres::connect(&env.conn_str("a"), tokio_postgres::NoTls).await {
        Ok(_) => panic!("a new endpoint fit on a full disk"),
        Err(e) => e,
    };
    let code = err.as_db_error().map(|d| d.code().code().to_owned());
    assert_eq!(code.as_deref(), Some("08006"), "{err:?}");
    assert_eq!(templates(&root).len(), 1, "the template was made");
    assert!(
        !root.join(".a.initdb").exists(),
        "the half-made copy is left"
    );
    assert!(!root.join("a").exists());
    assert!(!root.join(".pgwake/initialised/a").exists());

    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(grown.success());
    let a = client_or_explain(&env, "a").await;
    let n: i32 = a.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    drop(a);
    let mut env = env;
    if let Some(p) = env.pgwake.take() {
        p.shutdown().await;
    }
    drop(mount);
    drop(env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fresh_system_identifiers_each_copy_has_its_own_and_keeps_its_data() {
    let env = Env::start("[local]\nfresh_system_identifier = true", ABC).await;
    let (a, b) = (
        client_or_explain(&env, "a").await,
        client_or_explain(&env, "b").await,
    );
    let (ia, ib) = (system_identifier(&a).await, system_identifier(&b).await);
    assert_ne!(ia, ib);
    a.batch_execute("create table t (i int); insert into t values (1)")
        .await
        .unwrap();
    drop((a, b));
    // Stopped (checkpoint) and started again from its own WAL: same identifier, same data.
    env.suspend("a").await;
    let a = client_or_explain(&env, "a").await;
    assert_eq!(system_identifier(&a).await, ia);
    let n: i64 = a
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    drop(a);
    env.stop().await;
}
