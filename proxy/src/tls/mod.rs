//! TLS termination for client connections, and TLS to computes.
//!
//! Two ways a client starts TLS, both ending in [`TlsAcceptor::accept`]:
//! - **SSLRequest** (every libpq): the client sends the 8-byte SSLRequest, the proxy answers
//!   `S`, then the ClientHello follows. ALPN is optional here (libpq before 17 sends none), but a
//!   client that offers ALPN without `postgresql` is refused by rustls with a
//!   `no_application_protocol` alert.
//! - **Direct** (PostgreSQL 17 `sslnegotiation=direct`): the ClientHello is the first thing on
//!   the socket, detected with [`looks_like_tls`] on peeked bytes. ALPN `postgresql` is then
//!   mandatory (as in PostgreSQL itself, it is what tells a Postgres client from any other TLS
//!   client); without it the handshake is refused before any certificate is sent.
//!
//! The certificate is chosen per handshake by [`CertStore`] from the SNI; [`endpoint_from_sni`]
//! turns the same SNI into an endpoint id. Only TLS 1.2 and 1.3 exist here (rustls has nothing
//! older), with the `ring` provider chosen explicitly rather than a process-wide default.

mod certs;
mod config;
mod sni;
// scram::tls_server_end_point reads the certificate's signature algorithm.
pub(crate) mod x509;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pgwake_compute_manager::ErrorSource;
use rustls::crypto::CryptoProvider;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

pub use certs::{CertInfo, CertStore};
pub use config::{CertKeyPaths, TlsConfig, TlsConfigError};
pub use sni::{endpoint_from_sni, parse_password_endpoint, SniError};

/// The ALPN protocol id of the Postgres protocol (PostgreSQL 17+).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The TLS versions offered, newest first. TLS 1.1 and older are not implemented by rustls at
/// all, so no setting can enable them.
pub static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];

/// Content type of a TLS handshake record: the first byte a direct-TLS client sends. A startup
/// packet starts with the high byte of its length, which is 0 for any length Postgres accepts.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A fatal `no_application_protocol` (120) alert record. Before the ServerHello, alerts are
/// plaintext, so this is what rustls itself would send; the direct path writes it when the
/// ClientHello lacks ALPN `postgresql`, so that the client reports a TLS alert instead of a
/// connection reset.
const ALERT_NO_APPLICATION_PROTOCOL: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 120];

/// Whether the first bytes of a connection (from `TcpStream::peek`, after any PROXY protocol
/// header) start a TLS record rather than a Postgres startup packet. One byte is enough to
/// decide; with two or more, the record's major version (3) must match too.
pub fn looks_like_tls(first_bytes: &[u8]) -> bool {
    match first_bytes {
        [TLS_HANDSHAKE_RECORD] => true,
        [TLS_HANDSHAKE_RECORD, major, ..] => *major == 0x03,
        _ => false,
    }
}

/// How the client asked for TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiation {
    /// After an SSLRequest answered with `S`: ALPN optional.
    SslRequest,
    /// ClientHello as the first bytes (`sslnegotiation=direct`): ALPN `postgresql` required.
    Direct,
}

/// Everything that goes wrong in this module. Load errors name their file; handshake errors keep
/// rustls's error so that logs say what the client did.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no TLS certificates configured")]
    NoCertificatesConfigured,
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: larger than {max} bytes, not a PEM file", path.display())]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{}: invalid PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: no certificate (BEGIN CERTIFICATE) found", path.display())]
    NoCertificate { path: PathBuf },
    #[error(
        "{}: no private key found (expected BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or \
         BEGIN EC PRIVATE KEY)",
        path.display()
    )]
    NoPrivateKey { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: unusable key for certificate {}: {source}", key.display(), cert.display())]
    BadKey {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: no usable CA certificate", path.display())]
    NoUsableCa { path: PathBuf },
    #[error("no CA bundle given and none of the system bundles exists ({paths})")]
    NoSystemCa { paths: String },
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),

    #[error("client closed the connection during the TLS handshake")]
    HandshakeClosed,
    #[error("TLS handshake i/o: {0}")]
    HandshakeIo(#[source] io::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] rustls::Error),
    #[error(
        "direct TLS connection without ALPN protocol \"postgresql\" \
         (sslnegotiation=direct needs a client that sends it, such as libpq 17 or later)"
    )]
    DirectWithoutAlpn,
}

impl TlsError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoCertificatesConfigured
            | Self::Read { .. }
            | Self::TooLarge { .. }
            | Self::Pem { .. }
            | Self::NoCertificate { .. }
            | Self::NoPrivateKey { .. }
            | Self::BadCertificate { .. }
            | Self::BadKey { .. }
            | Self::NoUsableCa { .. }
            | Self::NoSystemCa { .. }
            | Self::Config(_) => "tls_config",
            Self::HandshakeClosed => "tls_client_gone",
            Self::HandshakeIo(_) => "tls_io",
            Self::DirectWithoutAlpn => "tls_alpn",
            Self::Handshake(e) => match e {
                rustls::Error::NoApplicationProtocol => "tls_alpn",
                rustls::Error::InvalidMessage(_)
                | rustls::Error::InappropriateMessage { .. }
                | rustls::Error::InappropriateHandshakeMessage { .. } => "tls_not_tls",
                rustls::Error::PeerIncompatible(_) => "tls_incompatible",
                // Mostly a client refusing our certificate (unknown_ca, bad_certificate):
                // worth its own label, it means a certificate or a client's root is wrong.
                rustls::Error::AlertReceived(_) => "tls_client_alert",
                _ => "tls_handshake",
            },
        }
    }

    /// Which side caused it: loading and configuration are ours, handshakes the client's.
    pub fn source_side(&self) -> ErrorSource {
        match self {
            Self::HandshakeClosed
            | Self::HandshakeIo(_)
            | Self::Handshake(_)
            | Self::DirectWithoutAlpn => ErrorSource::Client,
            _ => ErrorSource::Internal,
        }
    }

    /// Turns tokio-rustls's `io::Error` back into what happened.
    fn from_handshake(e: io::Error) -> Self {
        if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return Self::Handshake(inner.clone());
        }
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::HandshakeClosed
        } else {
            Self::HandshakeIo(e)
        }
    }
}

/// Every error of one load or reload of the certificate files.
#[derive(Debug)]
pub struct LoadErrors(pub Vec<TlsError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

/// The crypto provider for every TLS config of the proxy.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: certificates from `store` (chosen by SNI on every handshake, so reloads
/// apply to new handshakes at once), TLS 1.2 and 1.3, ALPN `postgresql` offered, no client
/// certificates, and no session resumption, as in PostgreSQL: a resumed session presents no
/// certificate, and a client that resumes one from before a certificate reload would bind
/// SCRAM-SHA-256-PLUS to the old certificate, failing every login (and tripping the
/// failed-login throttle) for as long as its session lives.
pub fn server_config(store: Arc<CertStore>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .expect("the ring provider has cipher suites for TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// The one certificate chosen for a handshake before it starts (see [`TlsAcceptor::accept`]).
#[derive(Debug)]
struct Pinned(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Pinned {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// A TLS session with a client, after the handshake.
pub struct TlsSession<IO = TcpStream> {
    pub stream: TlsStream<IO>,
    /// The SNI server name (lowercase, as rustls reports it); `None` without SNI or when the
    /// client sent an IP address.
    pub sni: Option<String>,
    /// The negotiated ALPN protocol: `Some(b"postgresql")` or `None` (allowed only after
    /// SSLRequest).
    pub alpn: Option<Vec<u8>>,
    /// `tls-server-end-point` channel binding data of the certificate this handshake
    /// presented, for SCRAM-SHA-256-PLUS; `None` when unknown (a config without a
    /// [`CertStore`]) or when its signature algorithm has no usable hash (then PLUS is not
    /// offered).
    pub channel_binding: Option<Vec<u8>>,
}

impl<IO> fmt::Debug for TlsSession<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let conn = self.stream.get_ref().1;
        f.debug_struct("TlsSession")
            .field("sni", &self.sni)
            .field("alpn", &self.alpn.as_deref().map(String::from_utf8_lossy))
            .field("version", &conn.protocol_version())
            .field(
                "cipher_suite",
                &conn.negotiated_cipher_suite().map(|s| s.suite()),
            )
            .finish()
    }
}

/// Runs server handshakes with one [`ServerConfig`]. Cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: Arc<ServerConfig>,
    /// The certificates behind `config`, when it is [`server_config`]: SCRAM channel binding
    /// needs the one a handshake presented.
    store: Option<Arc<CertStore>>,
}

impl TlsAcceptor {
    /// An acceptor with [`server_config`] over `store`.
    pub fn new(store: Arc<CertStore>) -> Self {
        Self {
            config: server_config(Arc::clone(&store)),
            store: Some(store),
        }
    }

    pub fn with_config(config: Arc<ServerConfig>) -> Self {
        Self {
            config,
            store: None,
        }
    }

    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// The whole server handshake on `io`, whose next bytes must be the ClientHello.
    ///
    /// No timeout here: the caller bounds it (the proxy's startup timeout covers it). On error
    /// the stream is dropped, after the alert rustls chose (or, on the direct path without ALPN,
    /// `no_application_protocol`) has been written.
    pub async fn accept<IO>(&self, io: IO, mode: Negotiation) -> Result<TlsSession<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)
            .await
            .map_err(TlsError::from_handshake)?;
        if mode == Negotiation::Direct && !offers_postgresql(&start.client_hello()) {
            let mut io = start.io;
            // Best effort: the client is refused either way.
            let _ = io.write_all(&ALERT_NO_APPLICATION_PROTOCOL).await;
            let _ = io.shutdown().await;
            return Err(TlsError::DirectWithoutAlpn);
        }
        // The certificate is chosen here, once, and the handshake pinned to it: the channel
        // binding the login checks is then that of the certificate this client saw, even if a
        // reload lands between the handshake and the login.
        let pinned = self
            .store
            .as_ref()
            .map(|store| store.certificate_for(start.client_hello().server_name()));
        let channel_binding = pinned
            .as_ref()
            .and_then(|key| crate::scram::tls_server_end_point(key.cert.first()?).ok());
        let config = match pinned {
            Some(key) => {
                let mut config = ServerConfig::clone(&self.config);
                config.cert_resolver = Arc::new(Pinned(key));
                Arc::new(config)
            }
            None => Arc::clone(&self.config),
        };
        let stream = start
            .into_stream(config)
            .await
            .map_err(TlsError::from_handshake)?;
        let conn = stream.get_ref().1;
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        if mode == Negotiation::Direct && alpn.as_deref() != Some(ALPN_POSTGRESQL) {
            // Unreachable with our config (postgresql is the only protocol we offer and the
            // client offered it); kept so that a config change cannot silently weaken this.
            return Err(TlsError::DirectWithoutAlpn);
        }
        let sni = conn.server_name().map(str::to_ascii_lowercase);
        Ok(TlsSession {
            stream,
            sni,
            alpn,
            channel_binding,
        })
    }
}

fn offers_postgresql(hello: &rustls::server::ClientHello<'_>) -> bool {
    hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == ALPN_POSTGRESQL))
}

/// Where CA bundles live on common Linux distributions (Debian/Ubuntu, Fedora/RHEL, openSUSE,
/// Alpine). `SSL_CERT_FILE` is tried first, as OpenSSL does.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The client side, for TLS to computes: server certificates verified against the CA
/// certificates in `ca_bundle` (PEM), or against the system bundle when `None`; TLS 1.2 and
/// 1.3; ALPN `postgresql` offered (PostgreSQL 17+ checks it, older servers ignore it). The
/// caller chooses the name to verify (`ServerName`) per connection.
pub fn client_config(ca_bundle: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let path = match ca_bundle {
        Some(path) => path.to_owned(),
        None => {
            let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
            env.into_iter()
                .chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from))
                .find(|p| p.is_file())
                .ok_or_else(|| TlsError::NoSystemCa {
                    paths: SYSTEM_CA_BUNDLES.join(", "),
                })?
        }
    };
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs::read_certs(&path)?);
    if added == 0 {
        return Err(TlsError::NoUsableCa { path });
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}
