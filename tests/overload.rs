//! Overload: bursts of connections, silent sockets, vanished clients (issue 12, items 7-9).

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// The listen backlog of the listener on `port`: for a listening socket, `ss -ltn` shows it as
/// Send-Q. `None` where `ss` is missing.
fn backlog_of(port: u16) -> Option<u32> {
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.split_whitespace().nth(2)?.parse().ok()
}

/// Item 7: a burst of connects must fit in the kernel's accept queue: pgwake listens with
/// min(somaxconn, 4096) as Postgres would, not tokio's 1024; and 2,000 connects at once are
/// all answered (timing is measured by `pgwake-bench --storm`, not asserted here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_backlog_follows_somaxconn_and_a_burst_is_answered() {
    let env = Env::start("", DEMO).await;
    let want = pgwake_proxy::listener::default_backlog();
    match backlog_of(env.addr.port()) {
        Some(got) => assert_eq!(got, want, "listen backlog"),
        None => eprintln!("skipped the backlog check: `ss` is not available"),
    }

    let clients: Vec<_> = (0..2000)
        .map(|_| {
            let addr = env.addr;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await?;
                s.write_all(&SSL_REQUEST).await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                std::io::Result::Ok(b[0])
            })
        })
        .collect();
    for c in clients {
        let answer = tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("answered within a minute")
            .unwrap()
            .expect("connect and answer");
        assert_eq!(answer, b'N', "no TLS configured");
    }
    env.stop().await;
}

/// The timers of the proxy's side of established connections on `port`, as `ss -o` shows them
/// (e.g. `timer:(keepalive,6.9sec,0)`).
fn server_side_timers(port: u16) -> Vec<String> {
    let Ok(out) = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", &format!("sport = :{port}")])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("timer:(")))
        .map(str::to_string)
        .collect()
}

/// Item 9: an accepted client socket has TCP keepalive with the configured idle time, so a
/// client machine that vanished ends its session instead of holding its compute up forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sockets_get_tcp_keepalive() {
    if std::process::Command::new("ss").arg("-V").output().is_err() {
        eprintln!("skipped: `ss` is not available");
        return;
    }
    let env = Env::start("[proxy.tcp_keepalive]\nidle = \"7s\"\n", DEMO).await;
    // Silent: the keepalive is set as soon as the connection is taken, before any startup.
    let _client = TcpStream::connect(env.addr).await.unwrap();
    let port = env.addr.port();
    let found = wait_until(Duration::from_secs(10), || {
        server_side_timers(port)
            .iter()
            .any(|t| t.starts_with("timer:(keepalive,"))
    })
    .await;
    assert!(
        found.is_ok(),
        "no keepalive timer on the proxy's socket: {:?}",
        server_side_timers(port)
    );
    let timer = server_side_timers(port).pop().unwrap();
    // timer:(keepalive,6.9sec,0): at most the configured 7 s left.
    let left: f64 = timer
        .trim_start_matches("timer:(keepalive,")
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(left <= 7.0, "{timer}");
    env.stop().await;
}
