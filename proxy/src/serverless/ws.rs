//! Postgres over WebSocket: the upgrade on any path (the driver uses `/v2`), then binary
//! frames carrying raw wire bytes both ways, adapted into an `AsyncRead + AsyncWrite` stream.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    CONNECTION, HOST, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use pgwake_router::EndpointId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::{plain, Body};
use crate::shared::Proxy;
use crate::stream::ClientStream;

/// Largest message (and frame) a client may send. Postgres messages from the driver are
/// written one `write` at a time, well under this; the bound keeps a client from making us
/// buffer an arbitrary amount.
const MAX_CLIENT_MESSAGE: usize = 16 << 20;

/// A WebSocket client, with what its upgrade request said about the endpoint.
pub struct WsClient {
    pub(crate) io: WsStream<TokioIo<Upgraded>>,
    /// The `Host` header without its port: an endpoint under `[tls] domains`, like an SNI.
    pub(crate) host: Option<String>,
    /// `?endpoint=ID` on the upgrade URL (for hosts outside `[tls] domains`).
    pub(crate) endpoint: Option<EndpointId>,
    /// Over HTTPS (wss://).
    pub(crate) secure: bool,
}

pub(super) fn is_upgrade(req: &Request<Incoming>) -> bool {
    let has = |name, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(UPGRADE, "websocket") && has(CONNECTION, "upgrade")
}

/// Answers the upgrade (101) and starts the session once hyper hands the connection over.
pub(super) fn upgrade(
    proxy: &Arc<Proxy>,
    link: &super::Link,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    if req
        .headers()
        .get(SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return plain(
            StatusCode::BAD_REQUEST,
            "unsupported WebSocket version (13 expected)\n",
        );
    }
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY) else {
        return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    let accept = derive_accept_key(key.as_bytes());
    let endpoint = match query_param(req.uri().query(), "endpoint").map(|v| EndpointId::parse(&v)) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => return plain(StatusCode::BAD_REQUEST, "invalid endpoint id\n"),
    };
    let host = link.sni.clone().or_else(|| {
        req.headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(host_without_port)
    });
    let secure = link.secure;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let proxy = Arc::clone(proxy);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                debug!(client = %peer, error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        let cfg = WebSocketConfig::default()
            .max_message_size(Some(MAX_CLIENT_MESSAGE))
            .max_frame_size(Some(MAX_CLIENT_MESSAGE));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(cfg)).await;
        let client = WsClient {
            io: WsStream::new(ws),
            host,
            endpoint,
            secure,
        };
        proxy.spawn_client(ClientStream::Ws(Box::new(client)), peer);
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header(SEC_WEBSOCKET_ACCEPT, accept)
        .body(Full::new(Bytes::new()))
        .expect("static response parts")
}

/// `host:port`, `[v6]:port` or `host` → the host.
pub(super) fn host_without_port(h: &str) -> String {
    let h = h.trim();
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    h.rsplit_once(':').map_or(h, |(host, _)| host).to_string()
}

/// One query parameter, percent-decoded (`+` is a plus, as in `encodeURIComponent` output);
/// `None` when absent or not valid UTF-8.
pub(super) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v)).flatten()
    })
}

pub(super) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A WebSocket as a byte stream: each write is one binary message, reads return the payloads
/// of binary messages in order. Text messages are a protocol error (the driver sends none);
/// pings are answered by tungstenite; a close frame is the end of the stream.
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    pending: Bytes,
    eof: bool,
}

impl<S> WsStream<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
            eof: false,
        }
    }
}

fn ws_error(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    match e {
        tokio_tungstenite::tungstenite::Error::Io(e) => e,
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => this.eof = true,
                Some(Ok(Message::Binary(b))) => this.pending = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message; Postgres wire bytes come in binary messages",
                    )))
                }
                Some(Ok(_)) => {} // ping, pong, raw frame
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Waits while tungstenite's write buffer is full: the relay's backpressure.
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_error)?;
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(ws_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(ws_error)
    }
}

impl AsyncRead for WsClient {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for WsClient {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_query() {
        assert_eq!(host_without_port("ep1.example.com:443"), "ep1.example.com");
        assert_eq!(host_without_port("[::1]:8080"), "::1");
        assert_eq!(host_without_port("ep1.example.com"), "ep1.example.com");
        assert_eq!(
            query_param(Some("address=x:5432&endpoint=my%2Dep"), "endpoint").as_deref(),
            Some("my-ep")
        );
        assert_eq!(query_param(Some("endpoint=%zz"), "endpoint"), None);
        assert_eq!(query_param(None, "endpoint"), None);
    }

    #[tokio::test]
    async fn bytes_round_trip_through_binary_messages() {
        use futures::{SinkExt, StreamExt};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = tokio::io::duplex(1024);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let mut client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let mut s = WsStream::new(server);
        client.send(Message::binary(b"hel".to_vec())).await.unwrap();
        client.send(Message::Ping(Bytes::new())).await.unwrap();
        client.send(Message::binary(b"lo".to_vec())).await.unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        s.write_all(b"back").await.unwrap();
        s.flush().await.unwrap();
        // The pong comes first: tungstenite answers pings on the next write.
        let mut seen = Vec::new();
        while let Some(m) = client.next().await {
            match m.unwrap() {
                Message::Binary(b) => {
                    seen.extend_from_slice(&b);
                    break;
                }
                _ => continue,
            }
        }
        assert_eq!(seen, b"back");
        client.send(Message::text("x")).await.unwrap();
        assert!(s.read(&mut got).await.is_err());
    }
}
