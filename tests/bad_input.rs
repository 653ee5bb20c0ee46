//! Hostile and broken clients: each gets the documented ErrorResponse or a clean close, and a
//! normal client is served right after.

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, PartialEq)]
enum Reply {
    Error { code: String, message: String },
    Closed,
    Other(Vec<u8>),
}

/// Sends `bytes` (then half-closes if `eof`), and reads what comes back until the server closes.
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8], eof: bool) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if eof {
        s.shutdown().await.unwrap();
    }
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
        .await
        .expect("the proxy must answer or close")
        .ok();
    parse_reply(&buf)
}

fn parse_reply(buf: &[u8]) -> Reply {
    if buf.is_empty() {
        return Reply::Closed;
    }
    if buf[0] != b'E' || buf.len() < 5 {
        return Reply::Other(buf.to_vec());
    }
    let mut code = String::new();
    let mut message = String::new();
    let mut rest = &buf[5..];
    while let Some((&f, r)) = rest.split_first() {
        if f == 0 {
            break;
        }
        let end = r.iter().position(|&b| b == 0).unwrap();
        let v = String::from_utf8_lossy(&r[..end]).into_owned();
        match f {
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
        rest = &r[end + 1..];
    }
    Reply::Error { code, message }
}

fn startup(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(0);
    b.put_u32(version);
    for (k, v) in params {
        b.put_slice(k.as_bytes());
        b.put_u8(0);
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b.to_vec()
}

fn code(r: &Reply) -> &str {
    match r {
        Reply::Error { code, .. } => code,
        other => panic!("expected an ErrorResponse, got {other:?}"),
    }
}

const V3: u32 = 3 << 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_documented_errors_and_proxy_keeps_serving() {
    let env = Env::start("", DEMO).await;
    let a = env.addr;

    // Garbage: an HTTP request read as a length is far over the limit.
    assert_eq!(
        code(&exchange(a, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).await),
        "08P01"
    );
    // Lengths that cannot be a packet.
    assert_eq!(code(&exchange(a, &[0, 0, 0, 2], false).await), "08P01");
    assert_eq!(
        code(&exchange(a, &[0, 0, 0, 7, 0, 0, 0], false).await),
        "08P01"
    );
    // Over the 10 KiB limit: refused before the body is read or allocated.
    assert_eq!(
        code(&exchange(a, &[0, 0, 0x28, 0x01, 0, 3, 0, 0], false).await),
        "08P01"
    );
    assert_eq!(
        code(&exchange(a, &[0x7f, 0xff, 0xff, 0xff], false).await),
        "08P01"
    );
    // Truncated: promises 100 bytes, sends 12 and hangs up.
    let r = exchange(a, &[0, 0, 0, 100, 0, 3, 0, 0, b'u', b's', b'e', b'r'], true).await;
    assert!(matches!(r, Reply::Closed) || code(&r) == "08P01", "{r:?}");
    // Unknown protocol versions.
    let r = exchange(a, &startup(4 << 16, &[("user", "postgres")]), false).await;
    assert_eq!(code(&r), "0A000");
    let r = exchange(a, &startup(2 << 16, &[("user", "postgres")]), false).await;
    assert_eq!(code(&r), "0A000");
    // Malformed parameters: key without value terminator.
    let mut bad = startup(V3, &[("user", "postgres")]);
    let n = bad.len();
    bad.truncate(n - 2);
    bad.push(0);
    let len = bad.len() as u32;
    bad[..4].copy_from_slice(&len.to_be_bytes());
    let r = exchange(a, &bad, false).await;
    assert!(matches!(r, Reply::Closed) || code(&r) == "08P01", "{r:?}");
    // No user.
    let r = exchange(
        a,
        &startup(V3, &[("database", "x"), ("options", "endpoint=demo")]),
        false,
    )
    .await;
    assert_eq!(code(&r), "28000");
    // Missing endpoint, with a message that says how to pass one.
    let r = exchange(a, &startup(V3, &[("user", "postgres")]), false).await;
    assert_eq!(code(&r), "08004");
    // Unknown endpoint: named in the message.
    let r = exchange(
        a,
        &startup(V3, &[("user", "postgres"), ("options", "endpoint=nope")]),
        false,
    )
    .await;
    match &r {
        Reply::Error { code, message } => {
            assert_eq!(code, "3D000");
            assert!(message.contains("\"nope\""), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Invalid and conflicting endpoint ids.
    for opt in [
        "endpoint=UPPER",
        "endpoint=a_b",
        "endpoint=-x",
        "endpoint=a endpoint=b",
        "-c",
    ] {
        let r = exchange(
            a,
            &startup(V3, &[("user", "postgres"), ("options", opt)]),
            false,
        )
        .await;
        assert_eq!(code(&r), "08004", "{opt}: {r:?}");
    }
    let long = format!("endpoint={}", "x".repeat(64));
    let r = exchange(
        a,
        &startup(V3, &[("user", "postgres"), ("options", &long)]),
        false,
    )
    .await;
    assert_eq!(code(&r), "08004");
    // SSLRequest gets 'N' (no TLS configured), then the startup proceeds as usual.
    let mut ssl_then_bad = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    ssl_then_bad.extend(startup(V3, &[("user", "postgres")]));
    match exchange(a, &ssl_then_bad, false).await {
        Reply::Other(b) => {
            assert_eq!(b[0], b'N');
            assert_eq!(code(&parse_reply(&b[1..])), "08004");
        }
        other => panic!("{other:?}"),
    }
    // An endless SSLRequest loop is cut off.
    let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f].repeat(5);
    match exchange(a, &ssl, false).await {
        Reply::Other(b) => {
            assert_eq!(&b[..2], b"NN");
            assert_eq!(code(&parse_reply(&b[2..])), "08P01");
        }
        other => panic!("{other:?}"),
    }
    // A CancelRequest with a key nobody issued: closed without a word, as Postgres does.
    let cancel = [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0, 0, 2];
    assert_eq!(exchange(a, &cancel, false).await, Reply::Closed);
    // Nothing above woke the compute.
    assert!(env.stats("demo").is_none());

    // A slow client is closed after the startup timeout (2 s in the test config).
    let mut slow = TcpStream::connect(a).await.unwrap();
    slow.write_all(&[0, 0]).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut buf))
        .await
        .expect("closed by the startup timeout");
    assert!(n.is_err() || buf.is_empty(), "{buf:?}");

    // And a real client is served after all of that.
    assert_eq!(
        stdout(&env.psql("demo", "select 'still serving'")),
        "still serving"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_garbage_does_not_hurt_real_clients() {
    let env = Env::start("", DEMO).await;
    let client = env.client("demo").await;
    let a = env.addr;
    let storm = tokio::spawn(async move {
        for i in 0..300u32 {
            let junk: Vec<u8> = (0..(i % 64 + 1))
                .map(|j| (i.wrapping_mul(31) ^ j) as u8)
                .collect();
            let _ = exchange(a, &junk, true).await;
        }
    });
    for i in 0..50 {
        let v: i32 = client
            .query_one("select $1::int", &[&i])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, i);
    }
    storm.await.unwrap();
    let v: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
    drop(client);
    env.stop().await;
}

/// Reads backend messages until ReadyForQuery or an ErrorResponse; returns the tags seen and
/// the first ErrorResponse, if any.
async fn read_until_ready(s: &mut TcpStream) -> (Vec<u8>, Option<Reply>) {
    let mut tags = Vec::new();
    loop {
        let mut head = [0u8; 5];
        if s.read_exact(&mut head).await.is_err() {
            return (tags, Some(Reply::Closed));
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        assert!((4..1 << 20).contains(&len), "message length {len}");
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await.unwrap();
        tags.push(head[0]);
        match head[0] {
            b'Z' => return (tags, None),
            b'E' => return (tags, Some(parse_reply(&[&head[..], &body].concat()))),
            _ => {}
        }
    }
}

/// Item 12 of issue 12: Postgres accepts startup parameters that are not valid UTF-8 (it checks
/// encodings itself, and cleans `application_name`); pgwake passes them through instead of
/// refusing them with 08P01.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_startup_parameters_reach_postgres() {
    let env = Env::start("", DEMO).await;
    let mut b = BytesMut::new();
    b.put_u32(0);
    b.put_u32(V3);
    for (k, v) in [
        (&b"user"[..], &b"postgres"[..]),
        (b"database", b"postgres"),
        (b"options", b"endpoint=demo"),
        (b"application_name", b"\xff\xfe"),
    ] {
        b.put_slice(k);
        b.put_u8(0);
        b.put_slice(v);
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());

    let mut s = TcpStream::connect(env.addr).await.unwrap();
    s.write_all(&b).await.unwrap();
    let (tags, err) = tokio::time::timeout(Duration::from_secs(60), read_until_ready(&mut s))
        .await
        .expect("an answer within a minute");
    assert_eq!(err, None, "session refused; messages {tags:?}");
    assert_eq!(tags.first(), Some(&b'R'), "authentication from the compute");

    // The session works: a simple query gets its row.
    let mut q = BytesMut::new();
    q.put_u8(b'Q');
    q.put_u32(4 + 9);
    q.put_slice(b"select 1\0");
    s.write_all(&q).await.unwrap();
    let (tags, err) = tokio::time::timeout(Duration::from_secs(30), read_until_ready(&mut s))
        .await
        .expect("query answered");
    assert_eq!(err, None);
    assert!(tags.contains(&b'D'), "a DataRow: {tags:?}");
    s.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
    drop(s);
    env.stop().await;
}
