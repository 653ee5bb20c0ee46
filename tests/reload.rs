//! Config reloads (what SIGHUP runs) against a running pgwake: a file cut short keeps the
//! endpoints, keys that can change live do, and the ones that cannot are named.

mod common;

use std::time::Duration;

use common::*;
use pgwake::ReloadError;
use pgwake_compute_manager::Phase;
use pgwake_router::EndpointId;
use tokio_postgres::error::SqlState;

const LONG: Duration = Duration::from_secs(60);

fn endpoints(ids: &[&str]) -> String {
    ids.iter()
        .map(|id| format!("[[endpoint]]\nid = \"{id}\"\nbackend = \"local\"\n"))
        .collect()
}

fn routed(env: &Env, id: &str) -> bool {
    env.pgwake()
        .table
        .lookup(&EndpointId::parse(id).unwrap())
        .is_some()
}

#[tokio::test]
async fn a_truncated_or_empty_file_keeps_the_endpoints() {
    let env = Env::start("", &endpoints(&["a", "b", "c"])).await;
    let path = env.dir.path().join("pgwake.toml");

    // `cat > file` caught mid-write: an empty file, then one cut after the first endpoint.
    std::fs::write(&path, "").unwrap();
    let e = env.pgwake().reload(&path).unwrap_err();
    assert!(matches!(e, ReloadError::RemovesAll { before: 3 }), "{e}");
    std::fs::write(&path, config_text(env.dir.path(), "", &endpoints(&["a"]))).unwrap();
    let e = env.pgwake().reload(&path).unwrap_err();
    assert!(
        matches!(
            e,
            ReloadError::RemovesTooMany {
                removed: 2,
                before: 3,
                ..
            }
        ),
        "{e}"
    );
    assert!(["a", "b", "c"].iter().all(|id| routed(&env, id)));

    // Meant: the operator says so in the file.
    let forced = config_text(env.dir.path(), "[reload]\nforce = true", &endpoints(&["a"]));
    std::fs::write(&path, forced).unwrap();
    let r = env.pgwake().reload(&path).unwrap();
    assert_eq!(r.table.removed, 2);
    assert!(routed(&env, "a") && !routed(&env, "b") && !routed(&env, "c"));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_keys_take_effect_and_restart_keys_are_named() {
    let env = Env::start("", DEMO).await;
    let path = env.dir.path().join("pgwake.toml");
    let extra = "[compute]\nidle_timeout = \"1s\"\n\
                 [limits]\nconnections_per_ip_per_second = 0.001\nconnections_per_ip_burst = 1\n\
                 [proxy]\nstartup_timeout = \"3s\"";
    std::fs::write(&path, config_text(env.dir.path(), extra, DEMO)).unwrap();
    let r = env.pgwake().reload(&path).unwrap();
    let names = |v: &[pgwake::ConfigKey]| v.iter().map(|k| k.to_string()).collect::<Vec<_>>();
    assert_eq!(names(&r.needs_restart), ["[proxy] startup_timeout"]);
    assert_eq!(
        names(&r.applied),
        [
            "[compute] idle_timeout",
            "[limits] connections_per_ip_burst",
            "[limits] connections_per_ip_per_second"
        ]
    );

    // The new idle timeout: a compute woken now is suspended a second after its client left
    // (it was 300 s).
    let client = env.client("demo").await;
    let v: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
    drop(client);
    env.wait_phase("demo", Phase::Suspended, LONG).await;

    // The new per-IP rate: the burst of one was spent by the connection above.
    let err = tokio_postgres::connect(&env.conn_str("demo"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("a second connection from this IP is over the new rate");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    env.stop().await;
}
