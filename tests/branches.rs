//! Endpoints and branches on demand (issue 17, local backend), end to end with real PostgreSQL:
//! the management API creates branches of a suspended and of a running parent, each holding
//! the parent's committed rows at branch time; writes diverge; a branch of a branch works;
//! created endpoints route again after a restart; bad requests get clear errors and leave
//! nothing behind; the CLI prints a connection string psql can use.

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{psql, stdout, Env, Mount};
use pgwake_compute_manager::Phase;
use serde_json::{json, Value};

const TOKEN: &str = "branch-test-token";
const LONG: Duration = Duration::from_secs(120);
const MAIN: &str = "[[endpoint]]\nid = \"main\"\nbackend = \"local\"\n";

fn extra() -> String {
    format!(
        "[manager]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [api]\nmanagement_token = \"{TOKEN}\"\n"
    )
}

fn api_url(env: &Env) -> String {
    format!("http://{}", env.pgwake().manager_api_addr().unwrap())
}

/// One request to the management API: status and JSON body.
async fn api(
    env: &Env,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", api_url(env)));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn create(env: &Env, body: Value) -> (u16, Value) {
    api(
        env,
        reqwest::Method::POST,
        "/v1/endpoints",
        Some(TOKEN),
        Some(body),
    )
    .await
}

async fn ids(env: &Env, endpoint: &str, sql: &str) -> Vec<i64> {
    let c = env.client(endpoint).await;
    c.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_hold_the_parents_rows_at_branch_time_diverge_and_survive_a_restart() {
    let env = Env::start(&extra(), MAIN).await;
    let main = env.client("main").await;
    main.batch_execute(
        "create table t (i bigint primary key, note text); \
         insert into t select g, 'base' from generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    drop(main);
    env.wait_detached("main", LONG).await;
    env.suspend("main").await;

    // Suspended parent: a file copy, and the parent is not woken for it.
    let (code, body) = create(&env, json!({"parent": "main", "id": "dev"})).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["id"], "dev");
    assert_eq!(body["parent"], "main");
    let uri = body["connection_uri"].as_str().unwrap();
    assert!(uri.ends_with("?options=endpoint%3Ddev"), "{uri}");
    assert_eq!(env.stats("main").unwrap().phase, Phase::Suspended);
    assert_eq!(
        env.stats("main").unwrap().starts,
        1,
        "not woken by the copy"
    );
    let dev_rows = ids(&env, "dev", "select i from t order by i").await;
    assert_eq!(dev_rows, (1..=100).collect::<Vec<_>>());

    // Running parent under a write load: pg_basebackup, no stop.
    let main = env.client("main").await;
    let committed = Arc::new(AtomicI64::new(1000));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (committed, stop) = (Arc::clone(&committed), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut i = 1001i64;
            while !stop.load(Ordering::Relaxed) {
                main.execute("insert into t values ($1, 'live')", &[&i])
                    .await
                    .unwrap();
                committed.store(i, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    common::wait_until(LONG, || committed.load(Ordering::SeqCst) >= 1050)
        .await
        .expect("the writer commits");
    let before = committed.load(Ordering::SeqCst);
    let (code, body) = create(&env, json!({"parent": "main", "id": "live"})).await;
    let after = committed.load(Ordering::SeqCst);
    assert_eq!(code, 201, "{body}");
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let live = ids(&env, "live", "select i from t where i > 1000 order by i").await;
    // Every row committed before the request is there, and what is there is a prefix of
    // the writer's sequence (no gaps: each commit is whole or absent).
    let last = *live.last().unwrap();
    assert!(
        last >= before,
        "rows committed before the branch: {before}, branch has up to {last}"
    );
    assert!(
        last <= after + 1,
        "nothing from after the request returned: {last} > {after}"
    );
    assert_eq!(live, (1001..=last).collect::<Vec<_>>());
    assert_eq!(
        ids(&env, "live", "select count(*) from t where i <= 100").await,
        vec![100]
    );

    // Writes diverge, both ways.
    env.client("dev")
        .await
        .execute("insert into t values (5000, 'dev only')", &[])
        .await
        .unwrap();
    env.client("main")
        .await
        .execute("insert into t values (6000, 'main only')", &[])
        .await
        .unwrap();
    assert_eq!(
        ids(&env, "main", "select count(*) from t where i = 5000").await,
        vec![0]
    );
    assert_eq!(
        ids(&env, "dev", "select count(*) from t where i = 6000").await,
        vec![0]
    );
    assert_eq!(
        ids(&env, "live", "select count(*) from t where i >= 5000").await,
        vec![0]
    );

    // A branch of a branch (dev runs now: pg_basebackup again).
    let (code, body) = create(&env, json!({"parent": "dev", "id": "dev-2"})).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(
        ids(&env, "dev-2", "select i from t where i > 100 order by i").await,
        vec![5000]
    );

    // In /metrics like configured endpoints.
    let (_, metrics) = common::http_get(env.pgwake().admin_addr().unwrap(), "/metrics").await;
    assert!(metrics.contains("endpoint=\"dev-2\""), "{metrics}");

    // Listed with their origin and parent.
    let (code, list) = api(&env, reqwest::Method::GET, "/v1/endpoints", None, None).await;
    assert_eq!(code, 200);
    let origin = |id: &str| {
        let e = list
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["endpoint"] == id)
            .unwrap_or_else(|| panic!("{id} listed: {list}"));
        (
            e["origin"].as_str().unwrap().to_string(),
            e["parent"].clone(),
        )
    };
    assert_eq!(origin("main"), ("config".into(), Value::Null));
    assert_eq!(origin("dev-2"), ("api".into(), json!("dev")));

    // Restart: the created endpoints route again, with their data.
    let Env { pgwake, dir, .. } = env;
    pgwake.unwrap().shutdown().await;
    let env = Env::start_in(dir, &extra(), MAIN).await;
    assert_eq!(ids(&env, "dev", "select count(*) from t").await, vec![101]);
    assert_eq!(
        ids(&env, "dev-2", "select count(*) from t").await,
        vec![101]
    );
    assert!(ids(&env, "live", "select count(*) from t").await[0] > 150);
    // A reload of the file does not remove them.
    let file = env.dir.path().join("pgwake.toml");
    std::fs::write(&file, common::config_text(env.dir.path(), &extra(), MAIN)).unwrap();
    let reloaded = env.pgwake().reload(&file).unwrap();
    assert_eq!(reloaded.table.removed, 0);
    assert_eq!(
        ids(&env, "dev-2", "select count(*) from t").await,
        vec![101]
    );

    // The CLI: branch, then psql with the printed string.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgwake"))
        .args([
            "branch", "create", "--parent", "dev-2", "--id", "from-cli", "--api",
        ])
        .arg(api_url(&env))
        .env("PGWAKE_API_TOKEN", TOKEN)
        .output()
        .unwrap();
    let uri = stdout(&out);
    assert!(uri.starts_with("postgres://postgres@127.0.0.1:"), "{uri}");
    assert_eq!(
        stdout(&psql(&uri, "select count(*) from t where i = 5000")),
        "1"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgwake"))
        .args(["endpoint", "list", "--api"])
        .arg(api_url(&env))
        .output()
        .unwrap();
    let list = stdout(&out);
    assert!(
        list.lines()
            .any(|l| l.starts_with("from-cli\t") && l.contains("\tapi\tdev-2\t")),
        "{list}"
    );
    // And delete it with its data.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgwake"))
        .args(["endpoint", "delete", "from-cli", "--remove-data", "--api"])
        .arg(api_url(&env))
        .args(["--token", TOKEN])
        .output()
        .unwrap();
    stdout(&out);
    assert!(!env.data_dir("from-cli").exists());
    let (code, _) = api(
        &env,
        reqwest::Method::GET,
        "/v1/endpoints/from-cli",
        None,
        None,
    )
    .await;
    assert_eq!(code, 404);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_leave_nothing_behind() {
    use reqwest::Method;
    let env = Env::start(&extra(), MAIN).await;
    let body = || Some(json!({"parent": "main", "id": "x"}));
    let (code, err) = api(&env, Method::POST, "/v1/endpoints", None, body()).await;
    assert_eq!((code, err["kind"].as_str()), (401, Some("unauthorized")));
    let (code, _) = api(&env, Method::POST, "/v1/endpoints", Some("wrong"), body()).await;
    assert_eq!(code, 401);
    let (code, _) = api(
        &env,
        Method::DELETE,
        "/v1/endpoints/main",
        Some("wrong"),
        None,
    )
    .await;
    assert_eq!(code, 401);

    let (code, err) = create(&env, json!({"parent": "nope"})).await;
    assert_eq!(
        (code, err["kind"].as_str()),
        (404, Some("unknown_endpoint")),
        "{err}"
    );
    let (code, err) = create(&env, json!({"id": "main"})).await;
    assert_eq!(
        (code, err["kind"].as_str()),
        (409, Some("duplicate_endpoint")),
        "{err}"
    );
    let (code, err) = create(&env, json!({"id": "Not_Valid"})).await;
    assert_eq!(
        (code, err["kind"].as_str()),
        (422, Some("invalid_request")),
        "{err}"
    );
    // A token to create endpoints is not a shell on the host, nor a way around the proxy.
    for (settings, named) in [
        (
            json!({"archive_command": "sh -c 'id > /tmp/owned'"}),
            "archive_command",
        ),
        (
            json!({"shared_preload_libraries": "evil"}),
            "shared_preload_libraries",
        ),
        (json!({"listen_addresses": "*"}), "listen_addresses"),
        (json!({"work mem": "1MB"}), "work mem"),
    ] {
        let (code, err) = create(&env, json!({"id": "s", "settings": settings})).await;
        assert_eq!(
            (code, err["kind"].as_str()),
            (422, Some("invalid_request")),
            "{err}"
        );
        assert!(err["message"].as_str().unwrap().contains(named), "{err}");
    }
    let (code, err) = create(&env, json!({"parnet": "main"})).await;
    assert_eq!(
        (code, err["kind"].as_str()),
        (400, Some("bad_request")),
        "{err}"
    );
    let (code, err) = api(
        &env,
        Method::DELETE,
        "/v1/endpoints/main",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (code, err["kind"].as_str()),
        (409, Some("configured_endpoint")),
        "{err}"
    );
    assert!(
        err["message"].as_str().unwrap().contains("config file"),
        "{err}"
    );
    let (code, _) = api(
        &env,
        Method::DELETE,
        "/v1/endpoints/nope",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(code, 404);

    // A generated id, of Neon's shape; the parent was never started, so neither copies.
    let (code, created) = create(&env, json!({})).await;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ep-") && id.split('-').count() == 4, "{id}");
    assert_eq!(stdout(&env.psql(&id, "select 1")), "1");
    // Deleting it refuses while a session uses it, then removes it and its data.
    let held = env.client(&id).await;
    let path = format!("/v1/endpoints/{id}?remove_data=true");
    let (code, err) = api(&env, Method::DELETE, &path, Some(TOKEN), None).await;
    assert_eq!(
        (code, err["kind"].as_str()),
        (409, Some("endpoint_busy")),
        "{err}"
    );
    assert_eq!(
        held.query_one("select 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
    drop(held);
    env.wait_detached(&id, LONG).await;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let (code, body) = api(&env, Method::DELETE, &path, Some(TOKEN), None).await;
        if code == 200 {
            break;
        }
        // The session's backend on the compute ends a moment after the client closes.
        assert_eq!(code, 409, "{body}");
        assert!(tokio::time::Instant::now() < deadline, "still busy: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!env.data_dir(&id).exists());
    let (code, _) = api(
        &env,
        Method::GET,
        &format!("/v1/endpoints/{id}"),
        None,
        None,
    )
    .await;
    assert_eq!(code, 404);
    let state =
        std::fs::read_to_string(env.dir.path().join("data/.pgwake/endpoints.json")).unwrap();
    assert!(!state.contains(&id), "{state}");
    env.stop().await;

    // No token configured: the management routes are off.
    let env = Env::start("[manager]\nlisten = \"127.0.0.1:0\"\n", MAIN).await;
    let (code, err) = api(&env, Method::POST, "/v1/endpoints", Some(TOKEN), body()).await;
    assert_eq!(
        (code, err["kind"].as_str()),
        (403, Some("management_disabled")),
        "{err}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_runs_out_of_disk_is_refused_and_removed() {
    let dir = common::tempdir();
    let root = dir.path().join("data");
    std::fs::create_dir(&root).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=256m,mode=0755",
            "pgwake-test-branch",
        ])
        .arg(&root)
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("skipped: cannot mount a size-limited tmpfs here: {other:?}");
            return;
        }
    }
    let mount = Mount(root.clone());
    let mut env = Env::start_in(dir, &extra(), MAIN).await;
    assert_eq!(stdout(&env.psql("main", "select 1")), "1");
    env.wait_detached("main", LONG).await;
    env.suspend("main").await;
    // Room for a few MiB more: not for a copy of the cluster.
    let used = std::process::Command::new("du")
        .args(["-sk"])
        .arg(&root)
        .output()
        .unwrap();
    let used_kib: u64 = stdout(&used)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let shrunk = std::process::Command::new("mount")
        .args(["-o", &format!("remount,size={}k", used_kib + 4096)])
        .arg(&root)
        .status()
        .unwrap();
    assert!(shrunk.success());

    let (code, err) = create(&env, json!({"parent": "main", "id": "full"})).await;
    assert_eq!(
        (code, err["kind"].as_str()),
        (507, Some("insufficient_storage")),
        "{err}"
    );
    assert!(
        !err["message"]
            .as_str()
            .unwrap()
            .contains(root.to_str().unwrap()),
        "no paths: {err}"
    );
    let left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("full"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!root.join(".pgwake/initialised/full").exists());
    let (code, _) = api(&env, reqwest::Method::GET, "/v1/endpoints/full", None, None).await;
    assert_eq!(code, 404);

    // With space again, the same request succeeds.
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(grown.success());
    let (code, body) = create(&env, json!({"parent": "main", "id": "full"})).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(stdout(&env.psql("full", "select 1")), "1");
    if let Some(p) = env.pgwake.take() {
        p.shutdown().await;
    }
    drop(mount);
    drop(env);
}
