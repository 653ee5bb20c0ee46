//! Binding listeners with a listen backlog sized for bursts.
//!
//! `TcpListener::bind` asks for a backlog of 1024 and older kernels cap it at 128: a burst of
//! connections beyond that overflows the kernel's accept queue, and the overflow is dropped
//! silently, so those clients wait for a SYN retransmission (1 s, then 3 s). Postgres asks for
//! a large backlog and lets `somaxconn` cap it; so does pgwake.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

use crate::TcpKeepaliveConfig;

/// The most pgwake asks for, whatever `somaxconn` allows.
pub const MAX_BACKLOG: u32 = 4096;

/// `min(somaxconn, MAX_BACKLOG)`: the kernel would cap a larger request at `somaxconn` anyway,
/// and this is the value a listener then really has. `MAX_BACKLOG` where `somaxconn` cannot
/// be read (another OS, no /proc).
pub fn default_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map_or(MAX_BACKLOG, |n| n.clamp(1, MAX_BACKLOG))
}

/// Binds `addr` (SO_REUSEADDR, as `TcpListener::bind` does) and listens with `backlog`.
/// Must run inside a tokio runtime.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    bind_with(addr, backlog, |_| Ok(()))
}

/// [`bind`] for the Postgres-protocol listener: TCP_NODELAY and the client keepalive are set
/// before listen(2). Linux copies both into every socket the listener accepts, from the first
/// connection on, so no session spends five `setsockopt` calls on them.
pub fn bind_clients(
    addr: SocketAddr,
    backlog: u32,
    keepalive: &TcpKeepaliveConfig,
) -> io::Result<TcpListener> {
    bind_with(addr, backlog, |socket| {
        socket.set_nodelay(true)?;
        keepalive.apply(socket)
    })
}

fn bind_with(
    addr: SocketAddr,
    backlog: u32,
    prepare: impl FnOnce(&TcpSocket) -> io::Result<()>,
) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    prepare(&socket)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// For a listening socket, `ss -ltn` shows the backlog in Send-Q.
    fn backlog_of(port: u16) -> Option<u32> {
        let out = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        text.split_whitespace().nth(2)?.parse().ok()
    }

    #[tokio::test]
    async fn listens_with_the_requested_backlog() {
        let want = default_backlog();
        assert!((1..=MAX_BACKLOG).contains(&want));
        let l = bind("127.0.0.1:0".parse().unwrap(), want).unwrap();
        let port = l.local_addr().unwrap().port();
        match backlog_of(port) {
            Some(got) => assert_eq!(got, want),
            None => eprintln!("skipped: `ss` is not available"),
        }
    }
}
