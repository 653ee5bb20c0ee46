//! Query cancellation across replicas: a CancelRequest that lands on a replica that did not
//! issue the key is forwarded to `cancel_peers`, whose `cancel_listen` checks it against its own
//! sessions. Two pgwake instances in-process: A holds the session (local compute), B has no
//! compute at all and knows A only as a cancel peer.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

const LONG: Duration = Duration::from_secs(60);
/// Far below the 30 s query: a cancel that works ends it well within this.
const CANCELLED_WITHIN: Duration = Duration::from_secs(15);

/// The 16 bytes a client sends for `token`, captured from tokio-postgres itself.
async fn cancel_bytes(token: &tokio_postgres::CancelToken) -> Vec<u8> {
    let (ours, mut theirs) = tokio::io::duplex(64);
    token
        .cancel_query_raw(ours, tokio_postgres::NoTls)
        .await
        .unwrap();
    let mut buf = Vec::new();
    theirs.read_to_end(&mut buf).await.unwrap();
    assert_eq!(buf.len(), 16, "{buf:?}");
    buf
}

/// Sends raw bytes and waits for the other side to close: for a cancel, that is after the
/// proxy has dealt with it (checked, forwarded to peers, and they to the compute).
async fn send_and_wait_close(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(LONG, s.read_to_end(&mut buf))
        .await
        .expect("closed")
        .expect("closed cleanly");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_another_replica_reaches_the_session() {
    let a = Env::start("[proxy]\ncancel_listen = \"127.0.0.1:0\"\n", DEMO).await;
    let a_cancel = a.pgwake().cancel_addr().expect("cancel_listen bound");
    let b = Env::start(&format!("[proxy]\ncancel_peers = [\"{a_cancel}\"]\n"), "").await;
    assert!(b.pgwake().cancel_addr().is_none());

    let client = a.client("demo").await;
    let watcher = a.client("demo").await;
    let token = client.cancel_token();
    let key = cancel_bytes(&token).await;

    // Garbage on the peer listener is closed, unanswered; the session is unharmed. Exactly 8
    // bytes (the header the listener reads) so that the close is a FIN, not a reset.
    for junk in [
        b"GET / HT".to_vec(),
        // A StartupMessage's length and protocol 3.0 code.
        [16u32.to_be_bytes(), 196608u32.to_be_bytes()].concat(),
        // The right code with a length no cancel has.
        [4096u32.to_be_bytes(), 80877102u32.to_be_bytes()].concat(),
    ] {
        assert!(send_and_wait_close(a_cancel, &junk).await.is_empty());
    }
    client.simple_query("select 1").await.unwrap();

    // Forged keys sent to B (the issued pid with a wrong secret; a wrong pid with the issued
    // secret) cancel nothing: the short query completes.
    let c = client;
    let sleeper = tokio::spawn(async move {
        let r = c.simple_query("select pg_sleep(2)").await.map(|_| ());
        (r, c)
    });
    wait_for_sleeping(&watcher).await;
    let mut wrong_secret = key.clone();
    wrong_secret[15] ^= 1;
    let mut wrong_pid = key.clone();
    wrong_pid[11] ^= 1;
    for forged in [wrong_secret, wrong_pid] {
        assert!(send_and_wait_close(b.addr, &forged).await.is_empty());
    }
    let (r, client) = tokio::time::timeout(LONG, sleeper).await.unwrap().unwrap();
    r.expect("a forged key cancels nothing");

    // The real key, sent to B by the client library over a connection to B: B forwards it to
    // A, A to the compute.
    let sleeper = tokio::spawn(async move {
        let r = client.simple_query("select pg_sleep(30)").await;
        (r, client)
    });
    wait_for_sleeping(&watcher).await;
    let to_b = TcpStream::connect(b.addr).await.unwrap();
    token
        .cancel_query_raw(to_b, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (r, _client) = tokio::time::timeout(CANCELLED_WITHIN, sleeper)
        .await
        .expect("cancelled well before pg_sleep(30) ends")
        .unwrap();
    let err = r.expect_err("pg_sleep(30) cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));

    drop(watcher);
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_listener_never_forwards() {
    // A's key sent to B's own peer listener: B checks only its own sessions (none), and does
    // not pass it on to its peers, so A's query runs to the end.
    let a = Env::start("[proxy]\ncancel_listen = \"127.0.0.1:0\"\n", DEMO).await;
    let a_cancel = a.pgwake().cancel_addr().unwrap();
    let b = Env::start(
        &format!("[proxy]\ncancel_listen = \"127.0.0.1:0\"\ncancel_peers = [\"{a_cancel}\"]\n"),
        "",
    )
    .await;
    let b_cancel = b.pgwake().cancel_addr().unwrap();

    let client = a.client("demo").await;
    let watcher = a.client("demo").await;
    let key = cancel_bytes(&client.cancel_token()).await;
    let sleeper =
        tokio::spawn(async move { client.simple_query("select pg_sleep(2)").await.map(|_| ()) });
    wait_for_sleeping(&watcher).await;
    assert!(send_and_wait_close(b_cancel, &key).await.is_empty());
    tokio::time::timeout(LONG, sleeper)
        .await
        .unwrap()
        .unwrap()
        .expect("not cancelled: the peer listener does not forward");

    drop(watcher);
    b.stop().await;
    a.stop().await;
}
