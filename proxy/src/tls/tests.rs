//! Handshakes with real rustls clients over loopback TCP, certificates generated per test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{AlertDescription, DigitallySignedStruct, ProtocolVersion, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .expect("test step timed out")
}

/// A test CA in a temporary directory that issues leaf certificates into files.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A leaf certificate written to `paths`.
struct Leaf {
    paths: CertKeyPaths,
    der: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "pgwake test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
            ca,
            ca_key,
        };
        std::fs::write(pki.ca_path(), pki.ca.pem()).unwrap();
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca_path(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// Issues a certificate for `names` with a fresh key into `<stem>.pem` / `<stem>.key`
    /// (replacing what was there).
    fn issue(&self, stem: &str, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let paths = CertKeyPaths {
            cert: self.path(&format!("{stem}.pem")),
            key: self.path(&format!("{stem}.key")),
        };
        // Leaf then CA, as a chain file usually is (leaf + intermediates).
        std::fs::write(&paths.cert, cert.pem() + &self.ca.pem()).unwrap();
        std::fs::write(&paths.key, key.serialize_pem()).unwrap();
        touch(&paths.cert);
        touch(&paths.key);
        Leaf {
            paths,
            der: cert.der().clone(),
        }
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        roots
    }
}

/// Gives `path` a modification time later than any before it. Rewritten files keep their
/// inode and often their length (a P-256 key is always 241 bytes), and two writes within one
/// tick of the file system's clock would otherwise look unchanged.
fn touch(path: &Path) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static TICK: AtomicU64 = AtomicU64::new(1_000_000_000);
    let t = std::time::UNIX_EPOCH + Duration::from_secs(TICK.fetch_add(1, Ordering::Relaxed));
    std::fs::File::options()
        .append(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// What the server saw of one handshake: `(sni, alpn)`, or the error.
type Handshake = Result<(Option<String>, Option<Vec<u8>>), TlsError>;

/// Accepts `(sni, alpn)` of every handshake, or the error, on a channel; echoes bytes on every
/// established session until the client closes it.
struct Server {
    addr: SocketAddr,
    results: mpsc::UnboundedReceiver<Handshake>,
}

impl Server {
    async fn start(acceptor: TlsAcceptor, mode: Negotiation) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, results) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match acceptor.accept(tcp, mode).await {
                        Ok(mut session) => {
                            let _ = tx.send(Ok((session.sni.clone(), session.alpn.clone())));
                            let mut buf = [0u8; 1024];
                            loop {
                                match session.stream.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if session.stream.write_all(&buf[..n]).await.is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            }
        });
        Self { addr, results }
    }

    async fn next(&mut self) -> Handshake {
        within(self.results.recv())
            .await
            .expect("server task ended")
    }
}

/// Accepts any certificate (signatures are still checked) so that tests can see which one the
/// server presented even when its names do not match.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Clone)]
struct ClientOpts {
    /// Verify against this CA (verify-full); `None`: accept any certificate.
    roots: Option<rustls::RootCertStore>,
    alpn: Vec<&'static [u8]>,
    sni: bool,
    versions: &'static [&'static SupportedProtocolVersion],
}

impl Default for ClientOpts {
    fn default() -> Self {
        Self {
            roots: None,
            alpn: vec![],
            sni: true,
            versions: PROTOCOL_VERSIONS,
        }
    }
}

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A fresh client config per connection, so that no session is ever resumed (a resumed
/// session would not show the certificate the server would present now).
async fn connect(addr: SocketAddr, name: &str, opts: ClientOpts) -> io::Result<ClientStream> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(opts.versions)
        .unwrap();
    let mut config = match opts.roots {
        Some(roots) => builder.with_root_certificates(roots).with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider())))
            .with_no_client_auth(),
    };
    config.alpn_protocols = opts.alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_sni = opts.sni;
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    within(TlsConnector::from(Arc::new(config)).connect(name, tcp)).await
}

fn presented(stream: &ClientStream) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

async fn echo(stream: &mut ClientStream, msg: &[u8]) {
    within(stream.write_all(msg)).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    within(stream.read_exact(&mut buf)).await.unwrap();
    assert_eq!(buf, msg);
}

fn alert_of(e: &io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

fn store(pairs: &[&Leaf]) -> Arc<CertStore> {
    Arc::new(CertStore::load(pairs.iter().map(|l| l.paths.clone()).collect()).unwrap())
}

#[test]
fn looks_like_tls_table() {
    // A startup packet: its length's high byte is 0.
    assert!(!looks_like_tls(&[
        0x00, 0x00, 0x00, 0x08, 0x04, 0xd2, 0x16, 0x2f
    ]));
    assert!(!looks_like_tls(&[0x00]));
    assert!(!looks_like_tls(&[]));
    assert!(looks_like_tls(&[0x16, 0x03, 0x01]));
    assert!(looks_like_tls(&[0x16, 0x03, 0x03, 0x00, 0x50]));
    assert!(looks_like_tls(&[0x16]), "one peeked byte is enough");
    assert!(!looks_like_tls(&[0x16, 0x00]), "not TLS record version 3.x");
    // HTTP and an alert record are not ClientHellos.
    assert!(!looks_like_tls(b"GET / HTTP/1.1"));
    assert!(!looks_like_tls(&[0x15, 0x03, 0x03]));
}

#[test]
fn only_tls12_and_tls13_are_configured() {
    let versions: Vec<ProtocolVersion> = PROTOCOL_VERSIONS.iter().map(|v| v.version).collect();
    assert_eq!(
        versions,
        [ProtocolVersion::TLSv1_3, ProtocolVersion::TLSv1_2]
    );
    let pki = Pki::new();
    let leaf = pki.issue("a", &["a.test"]);
    let config = server_config(store(&[&leaf]));
    assert_eq!(config.alpn_protocols, [ALPN_POSTGRESQL.to_vec()]);
    let client = client_config(Some(&pki.ca_path())).unwrap();
    assert_eq!(client.alpn_protocols, [ALPN_POSTGRESQL.to_vec()]);
}

#[test]
fn certificate_for_exact_then_wildcard_then_default() {
    let pki = Pki::new();
    let default = pki.issue("default", &["default.test"]);
    // Wildcard listed before the exact name: exact still wins.
    let wild = pki.issue("wild", &["*.db.localtest", "db.localtest"]);
    let exact = pki.issue("exact", &["ep-exact.db.localtest"]);
    let second = pki.issue("second", &["*.db.localtest", "other.test"]);
    let store = store(&[&default, &wild, &exact, &second]);
    let der = |sni: Option<&str>| store.certificate_for(sni).cert[0].clone();
    assert_eq!(der(Some("ep-exact.db.localtest")), exact.der);
    assert_eq!(der(Some("EP-Exact.DB.localtest")), exact.der);
    assert_eq!(
        der(Some("ep-any.db.localtest")),
        wild.der,
        "first pair wins"
    );
    assert_eq!(
        der(Some("db.localtest")),
        wild.der,
        "exact name of the wildcard cert"
    );
    assert_eq!(der(Some("other.test")), second.der);
    assert_eq!(der(Some("a.b.db.localtest")), default.der, "one label only");
    assert_eq!(der(Some(".db.localtest")), default.der);
    assert_eq!(der(Some("unknown.example")), default.der);
    assert_eq!(der(None), default.der);

    let infos = store.certificates();
    assert_eq!(infos.len(), 4);
    assert_eq!(infos[1].names, ["*.db.localtest", "db.localtest"]);
    assert_eq!(infos[1].cert, wild.paths.cert);
    assert_eq!(
        store.uncovered_domains(&[
            "db.localtest".into(),
            "DB.localtest".into(),
            "x.test".into()
        ]),
        ["x.test"]
    );
}

/// The names we index are the ones a webpki client accepts for that certificate.
#[test]
fn indexed_names_agree_with_webpki() {
    let pki = Pki::new();
    let leaf = pki.issue("w", &["*.db.localtest", "exact.test", "127.0.0.1"]);
    let store = store(&[&leaf]);
    let parsed = rustls::server::ParsedCertificate::try_from(&leaf.der).unwrap();
    let ok = |name: &str| {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        rustls::client::verify_server_name(&parsed, &name).is_ok()
    };
    assert_eq!(
        store.certificates()[0].names,
        ["*.db.localtest", "exact.test"]
    );
    for name in ["ep.db.localtest", "exact.test", "127.0.0.1"] {
        assert!(ok(name), "{name}");
    }
    for name in ["db.localtest", "a.b.db.localtest", "other.test"] {
        assert!(!ok(name), "{name}");
    }
}

#[tokio::test]
async fn handshake_presents_the_certificate_chosen_by_sni() {
    let pki = Pki::new();
    let default = pki.issue("default", &["default.test"]);
    let wild = pki.issue("wild", &["*.db.localtest"]);
    let exact = pki.issue("exact", &["ep-exact.db.localtest"]);
    let mut server = Server::start(
        TlsAcceptor::new(store(&[&default, &wild, &exact])),
        Negotiation::SslRequest,
    )
    .await;

    for (name, sni, want) in [
        ("ep-exact.db.localtest", true, &exact),
        ("ep-any.db.localtest", true, &wild),
        ("a.b.db.localtest", true, &default),
        ("unknown.example", true, &default),
        ("ep-exact.db.localtest", false, &default),
    ] {
        let opts = ClientOpts {
            sni,
            ..ClientOpts::default()
        };
        let mut client = connect(server.addr, name, opts).await.unwrap();
        assert_eq!(presented(&client), want.der, "{name} sni={sni}");
        let (got_sni, alpn) = server.next().await.unwrap();
        assert_eq!(got_sni.as_deref(), sni.then_some(name));
        assert_eq!(alpn, None);
        echo(&mut client, b"hello").await;
    }

    // An IP address is never sent as SNI.
    let client = connect(server.addr, "127.0.0.1", ClientOpts::default())
        .await
        .unwrap();
    assert_eq!(presented(&client), default.der);
    assert_eq!(server.next().await.unwrap().0, None);
}

#[tokio::test]
async fn verify_full_client_accepts_exact_and_wildcard_and_refuses_the_default_for_others() {
    let pki = Pki::new();
    let default = pki.issue("default", &["default.test"]);
    let wild = pki.issue("wild", &["*.db.localtest"]);
    let mut server = Server::start(
        TlsAcceptor::new(store(&[&default, &wild])),
        Negotiation::Direct,
    )
    .await;
    let opts = ClientOpts {
        roots: Some(pki.roots()),
        alpn: vec![ALPN_POSTGRESQL],
        ..ClientOpts::default()
    };
    for name in ["ep-1.db.localtest", "default.test"] {
        let mut client = connect(server.addr, name, opts.clone()).await.unwrap();
        echo(&mut client, b"ok").await;
        let (sni, alpn) = server.next().await.unwrap();
        assert_eq!(sni.as_deref(), Some(name));
        assert_eq!(alpn.as_deref(), Some(ALPN_POSTGRESQL));
    }
    // Two labels under the wildcard: the server falls back to the default certificate, which a
    // verifying client rejects (and tells the server so).
    let err = connect(server.addr, "a.b.db.localtest", opts)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    let server_err = server.next().await.unwrap_err();
    assert_eq!(server_err.kind(), "tls_client_alert", "{server_err}");
}

#[tokio::test]
async fn reload_changes_new_handshakes_and_keeps_established_sessions() {
    let pki = Pki::new();
    let old = pki.issue("main", &["*.db.localtest"]);
    let store = store(&[&old]);
    let mut server = Server::start(
        TlsAcceptor::new(Arc::clone(&store)),
        Negotiation::SslRequest,
    )
    .await;

    let mut before = connect(server.addr, "ep.db.localtest", ClientOpts::default())
        .await
        .unwrap();
    server.next().await.unwrap();
    assert_eq!(presented(&before), old.der);
    echo(&mut before, b"before reload").await;

    assert!(!store.changed_since_last_load());
    let new = pki.issue("main", &["*.db.localtest"]);
    assert_ne!(new.der, old.der);
    assert!(store.changed_since_last_load());
    store.reload().unwrap();
    assert!(!store.changed_since_last_load());

    let mut after = connect(server.addr, "ep.db.localtest", ClientOpts::default())
        .await
        .unwrap();
    server.next().await.unwrap();
    assert_eq!(presented(&after), new.der);
    echo(&mut after, b"new session").await;
    // The session from before the reload still works, with its old keys.
    echo(&mut before, b"old session still alive").await;
    assert_eq!(presented(&before), old.der);
}

#[tokio::test]
async fn failed_reload_keeps_old_certificates_and_reports_every_error() {
    let pki = Pki::new();
    let a = pki.issue("a", &["a.test"]);
    let b = pki.issue("b", &["b.test"]);
    let c = pki.issue("c", &["c.test"]);
    let store = store(&[&a, &b, &c]);
    let mut server = Server::start(
        TlsAcceptor::new(Arc::clone(&store)),
        Negotiation::SslRequest,
    )
    .await;

    std::fs::remove_file(&a.paths.cert).unwrap();
    std::fs::write(
        &b.paths.key,
        "-----BEGIN PRIVATE KEY-----\n!garbage!\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    // c's key replaced by another certificate's key: parses, but does not match.
    let other = pki.issue("other", &["other.test"]);
    std::fs::copy(&other.paths.key, &c.paths.key).unwrap();
    touch(&b.paths.key);
    touch(&c.paths.key);
    assert!(store.changed_since_last_load());

    let errors = store.reload().unwrap_err();
    let text = errors.to_string();
    assert_eq!(errors.0.len(), 3, "{text}");
    assert!(matches!(&errors.0[0], TlsError::Read { path, .. } if *path == a.paths.cert));
    assert!(matches!(&errors.0[1], TlsError::Pem { path, .. } if *path == b.paths.key));
    assert!(matches!(
        &errors.0[2],
        TlsError::BadKey { key, source: rustls::Error::InconsistentKeys(_), .. } if *key == c.paths.key
    ));
    for e in &errors.0 {
        assert_eq!(e.kind(), "tls_config");
        assert_eq!(e.source_side(), ErrorSource::Internal);
    }
    for path in [&a.paths.cert, &b.paths.key, &c.paths.key] {
        assert!(text.contains(&path.display().to_string()), "{text}");
    }
    // A failed attempt counts as read: no retry until the files change again.
    assert!(!store.changed_since_last_load());

    // Still the old certificates, for lookups and for handshakes.
    assert_eq!(store.certificate_for(Some("b.test")).cert[0], b.der);
    let client = connect(server.addr, "c.test", ClientOpts::default())
        .await
        .unwrap();
    server.next().await.unwrap();
    assert_eq!(presented(&client), c.der);

    // Fixed files load.
    let a2 = pki.issue("a", &["a.test"]);
    pki.issue("b", &["b.test"]);
    pki.issue("c", &["c.test"]);
    assert!(store.changed_since_last_load());
    store.reload().unwrap();
    assert_eq!(store.certificate_for(None).cert[0], a2.der);
}

#[test]
fn initial_load_reports_every_error() {
    let pki = Pki::new();
    let good = pki.issue("good", &["good.test"]);
    assert!(matches!(
        CertStore::load(vec![]).unwrap_err().0[..],
        [TlsError::NoCertificatesConfigured]
    ));
    let missing = CertKeyPaths {
        cert: pki.path("missing.pem"),
        key: pki.path("missing.key"),
    };
    // Certificate and key swapped.
    let swapped = CertKeyPaths {
        cert: good.paths.key.clone(),
        key: good.paths.cert.clone(),
    };
    let huge = pki.path("huge.pem");
    std::fs::write(&huge, vec![b'x'; (1 << 20) + 1]).unwrap();
    let too_large = CertKeyPaths {
        cert: huge,
        key: good.paths.key.clone(),
    };
    let errors =
        CertStore::load(vec![good.paths.clone(), missing, swapped, too_large]).unwrap_err();
    let kinds: Vec<String> = errors.0.iter().map(|e| format!("{e:?}")).collect();
    assert!(
        matches!(
            errors.0[..],
            [
                TlsError::Read { .. },
                TlsError::Read { .. },
                TlsError::NoCertificate { .. },
                TlsError::NoPrivateKey { .. },
                TlsError::TooLarge { .. },
            ]
        ),
        "{kinds:#?}"
    );
    assert!(errors.to_string().contains("missing.key"), "{errors}");
}

#[test]
fn key_formats_pkcs8_sec1_and_rsa_pkcs1_load() {
    let Ok(out) = std::process::Command::new("openssl")
        .arg("version")
        .output()
    else {
        eprintln!("SKIP key_formats_pkcs8_sec1_and_rsa_pkcs1_load: openssl not installed");
        return;
    };
    assert!(out.status.success());
    let pki = Pki::new();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    // SEC1 ("BEGIN EC PRIVATE KEY") from the PKCS#8 key rcgen wrote.
    let ec = pki.issue("ec", &["ec.test"]);
    let sec1 = pki.path("ec.sec1.key");
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    openssl(&["ec", "-in", &p(&ec.paths.key), "-out", &p(&sec1)]);
    assert!(std::fs::read_to_string(&sec1)
        .unwrap()
        .contains("BEGIN EC PRIVATE KEY"));
    // RSA in PKCS#1 ("BEGIN RSA PRIVATE KEY"), certificate signed by the test CA.
    let rsa_key = pki.path("rsa.key");
    openssl(&["genrsa", "-traditional", "-out", &p(&rsa_key), "2048"]);
    let rsa_pem = std::fs::read_to_string(&rsa_key).unwrap();
    assert!(rsa_pem.contains("BEGIN RSA PRIVATE KEY"));
    let rsa_pkcs8 = pki.path("rsa.pk8");
    openssl(&["pkey", "-in", &p(&rsa_key), "-out", &p(&rsa_pkcs8)]);
    let key = KeyPair::from_pem(&std::fs::read_to_string(&rsa_pkcs8).unwrap()).unwrap();
    let cert = CertificateParams::new(vec!["rsa.test".to_string()])
        .unwrap()
        .signed_by(&key, &pki.ca, &pki.ca_key)
        .unwrap();
    let rsa_cert = pki.path("rsa.pem");
    std::fs::write(&rsa_cert, cert.pem()).unwrap();
    // One file holding both certificate and key also works.
    let combined = pki.path("combined.pem");
    std::fs::write(&combined, cert.pem() + &rsa_pem).unwrap();

    let store = CertStore::load(vec![
        ec.paths.clone(),
        CertKeyPaths {
            cert: ec.paths.cert.clone(),
            key: sec1,
        },
        CertKeyPaths {
            cert: rsa_cert,
            key: rsa_key,
        },
        CertKeyPaths {
            cert: combined.clone(),
            key: combined,
        },
    ])
    .unwrap();
    assert_eq!(store.certificate_for(Some("rsa.test")).cert[0], *cert.der());
}

#[tokio::test]
async fn direct_tls_requires_alpn_postgresql() {
    let pki = Pki::new();
    let leaf = pki.issue("a", &["*.db.localtest"]);
    let mut server = Server::start(TlsAcceptor::new(store(&[&leaf])), Negotiation::Direct).await;
    let opts = |alpn: Vec<&'static [u8]>| ClientOpts {
        alpn,
        ..ClientOpts::default()
    };

    for alpn in [vec![], vec![&b"h2"[..]]] {
        let err = connect(server.addr, "ep.db.localtest", opts(alpn.clone()))
            .await
            .unwrap_err();
        assert_eq!(
            alert_of(&err),
            Some(AlertDescription::NoApplicationProtocol),
            "{alpn:?}: {err}"
        );
        let server_err = server.next().await.unwrap_err();
        assert!(
            matches!(server_err, TlsError::DirectWithoutAlpn),
            "{server_err}"
        );
        assert_eq!(server_err.kind(), "tls_alpn");
        assert_eq!(server_err.source_side(), ErrorSource::Client);
    }

    for alpn in [vec![ALPN_POSTGRESQL], vec![&b"h2"[..], ALPN_POSTGRESQL]] {
        let mut client = connect(server.addr, "ep.db.localtest", opts(alpn))
            .await
            .unwrap();
        assert_eq!(client.get_ref().1.alpn_protocol(), Some(ALPN_POSTGRESQL));
        let (sni, alpn) = server.next().await.unwrap();
        assert_eq!(sni.as_deref(), Some("ep.db.localtest"));
        assert_eq!(alpn.as_deref(), Some(ALPN_POSTGRESQL));
        echo(&mut client, b"direct").await;
    }
}

#[tokio::test]
async fn after_ssl_request_alpn_is_optional_but_must_include_postgresql() {
    let pki = Pki::new();
    let leaf = pki.issue("a", &["*.db.localtest"]);
    let mut server =
        Server::start(TlsAcceptor::new(store(&[&leaf])), Negotiation::SslRequest).await;
    let opts = |alpn: Vec<&'static [u8]>| ClientOpts {
        alpn,
        ..ClientOpts::default()
    };

    let mut client = connect(server.addr, "ep.db.localtest", opts(vec![]))
        .await
        .unwrap();
    assert_eq!(server.next().await.unwrap().1, None);
    echo(&mut client, b"libpq < 17").await;

    let mut client = connect(server.addr, "ep.db.localtest", opts(vec![ALPN_POSTGRESQL]))
        .await
        .unwrap();
    assert_eq!(
        server.next().await.unwrap().1.as_deref(),
        Some(ALPN_POSTGRESQL)
    );
    echo(&mut client, b"libpq 17").await;

    let err = connect(server.addr, "ep.db.localtest", opts(vec![b"h2"]))
        .await
        .unwrap_err();
    assert_eq!(
        alert_of(&err),
        Some(AlertDescription::NoApplicationProtocol)
    );
    let server_err = server.next().await.unwrap_err();
    assert!(
        matches!(
            server_err,
            TlsError::Handshake(rustls::Error::NoApplicationProtocol)
        ),
        "{server_err}"
    );
    assert_eq!(server_err.kind(), "tls_alpn");
}

#[tokio::test]
async fn tls12_and_tls13_clients_are_served() {
    let pki = Pki::new();
    let leaf = pki.issue("a", &["a.test"]);
    let mut server =
        Server::start(TlsAcceptor::new(store(&[&leaf])), Negotiation::SslRequest).await;
    static TLS12_ONLY: &[&SupportedProtocolVersion] = &[&TLS12];
    static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&TLS13];
    for (versions, want) in [
        (TLS12_ONLY, ProtocolVersion::TLSv1_2),
        (TLS13_ONLY, ProtocolVersion::TLSv1_3),
        (PROTOCOL_VERSIONS, ProtocolVersion::TLSv1_3),
    ] {
        let opts = ClientOpts {
            roots: Some(pki.roots()),
            versions,
            ..ClientOpts::default()
        };
        let mut client = connect(server.addr, "a.test", opts).await.unwrap();
        assert_eq!(client.get_ref().1.protocol_version(), Some(want));
        server.next().await.unwrap();
        echo(&mut client, b"v").await;
    }
}

/// A TLS 1.0/1.1 ClientHello: no supported_versions extension, two CBC suites; with
/// `signature_algorithms` (which only TLS 1.2 defines, so real TLS 1.1 clients do not send it)
/// when `sigalgs`.
fn legacy_client_hello(minor: u8, sigalgs: bool) -> Vec<u8> {
    let mut body = vec![0x03, minor];
    body.extend([0x11; 32]); // random
    body.push(0); // session id
    body.extend([0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // cipher suites
    body.extend([0x01, 0x00]); // null compression
    if sigalgs {
        // extensions: signature_algorithms = [ecdsa_secp256r1_sha256]
        body.extend([0x00, 0x08, 0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03]);
    }
    let mut handshake = vec![0x01, 0x00, 0x00, body.len() as u8];
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend(handshake);
    record
}

/// Sends raw bytes and returns the first bytes the server answers before closing.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut reply = Vec::new();
    let _ = within(tcp.read_to_end(&mut reply)).await;
    reply
}

#[tokio::test]
async fn tls10_and_tls11_clients_are_refused_with_protocol_version() {
    let pki = Pki::new();
    let leaf = pki.issue("a", &["a.test"]);
    let mut server =
        Server::start(TlsAcceptor::new(store(&[&leaf])), Negotiation::SslRequest).await;
    for minor in [1, 2] {
        // As a TLS 1.1 client really sends it: refused because TLS 1.2 features are missing.
        let hello = legacy_client_hello(minor, false);
        assert!(looks_like_tls(&hello));
        let reply = raw_exchange(server.addr, &hello).await;
        // A fatal alert (level 2) and nothing else.
        assert_eq!(reply.len(), 7, "{reply:?}");
        assert_eq!(reply[..1], [0x15], "{reply:?}");
        assert_eq!(reply[5], 2, "{reply:?}");
        let err = server.next().await.unwrap_err();
        assert_eq!(err.kind(), "tls_incompatible", "{err}");

        // With the TLS 1.2 extension it needs, the version itself is refused.
        let reply = raw_exchange(server.addr, &legacy_client_hello(minor, true)).await;
        // protocol_version (70)
        assert_eq!(reply, [0x15, 0x03, 0x03, 0x00, 0x02, 2, 70]);
        let err = server.next().await.unwrap_err();
        assert_eq!(err.kind(), "tls_incompatible", "{err}");
    }
}

#[tokio::test]
async fn bytes_that_are_not_tls_and_early_close_are_clean_errors() {
    let pki = Pki::new();
    let leaf = pki.issue("a", &["a.test"]);
    let mut server =
        Server::start(TlsAcceptor::new(store(&[&leaf])), Negotiation::SslRequest).await;

    // A plaintext StartupMessage where the ClientHello should be (after 'S').
    let mut startup = bytes::BytesMut::new();
    crate::wire::StartupMessage {
        major: 3,
        minor: 0,
        params: vec![("user".into(), "u".into())],
    }
    .encode(&mut startup);
    assert!(!looks_like_tls(&startup));
    let reply = raw_exchange(server.addr, &startup).await;
    assert_eq!(reply.first(), Some(&0x15), "an alert: {reply:?}");
    let err = server.next().await.unwrap_err();
    assert_eq!(err.kind(), "tls_not_tls", "{err}");
    assert_eq!(err.source_side(), ErrorSource::Client);

    let reply = raw_exchange(server.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(reply.first(), Some(&0x15), "an alert: {reply:?}");
    assert_eq!(server.next().await.unwrap_err().kind(), "tls_not_tls");

    // Half a ClientHello, then EOF.
    let hello = legacy_client_hello(3, true);
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(&hello[..20]).await.unwrap();
    drop(tcp);
    let err = server.next().await.unwrap_err();
    assert!(matches!(err, TlsError::HandshakeClosed), "{err}");
    assert_eq!(err.kind(), "tls_client_gone");
}

#[test]
fn client_config_needs_a_usable_ca_bundle() {
    let pki = Pki::new();
    assert!(client_config(Some(&pki.ca_path())).is_ok());
    let missing = pki.path("none.pem");
    assert!(matches!(
        client_config(Some(&missing)),
        Err(TlsError::Read { path, .. }) if path == missing
    ));
    let leaf = pki.issue("a", &["a.test"]);
    assert!(matches!(
        client_config(Some(&leaf.paths.key)),
        Err(TlsError::NoCertificate { .. })
    ));
}

#[tokio::test]
async fn client_config_verifies_a_tls_compute() {
    let pki = Pki::new();
    let leaf = pki.issue("compute", &["compute.internal", "127.0.0.1"]);
    let mut server =
        Server::start(TlsAcceptor::new(store(&[&leaf])), Negotiation::SslRequest).await;
    let connector = TlsConnector::from(client_config(Some(&pki.ca_path())).unwrap());
    for name in ["compute.internal", "127.0.0.1"] {
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        let mut tls = within(connector.connect(server_name, tcp)).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_POSTGRESQL));
        server.next().await.unwrap();
        echo(&mut tls, b"compute").await;
    }
    // A name the certificate does not have is refused by the client.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let server_name = ServerName::try_from("other.internal").unwrap();
    assert!(within(connector.connect(server_name, tcp)).await.is_err());
}

/// The flow the proxy runs per connection: peek for a direct ClientHello, else read the
/// SSLRequest and answer 'S'; then the StartupMessage arrives inside TLS. The fake server
/// refuses the login with a message naming what it saw, which psql prints.
async fn fake_postgres(listener: TcpListener, acceptor: TlsAcceptor) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            return;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            let mode = match tcp.peek(&mut first).await {
                Ok(n) if looks_like_tls(&first[..n]) => Negotiation::Direct,
                Ok(_) => {
                    let packet = crate::wire::read_startup_packet(&mut tcp).await;
                    if !matches!(packet, Ok(crate::wire::StartupPacket::SslRequest)) {
                        return;
                    }
                    tcp.write_all(b"S").await.unwrap();
                    Negotiation::SslRequest
                }
                Err(_) => return,
            };
            let Ok(mut session) = acceptor.accept(tcp, mode).await else {
                return;
            };
            let Ok(crate::wire::StartupPacket::Startup(startup)) =
                crate::wire::read_startup_packet(&mut session.stream).await
            else {
                return;
            };
            let message = format!(
                "fake server: mode={mode:?} sni={} alpn={} user={}",
                session.sni.as_deref().unwrap_or("-"),
                session
                    .alpn
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default(),
                startup.get("user").unwrap_or("-"),
            );
            let reply = crate::wire::error_response("FATAL", "28000", &message, None, None);
            let _ = session.stream.write_all(&reply).await;
            let _ = session.stream.shutdown().await;
        });
    }
}

fn libpq_major() -> Option<u32> {
    let out = std::process::Command::new("psql")
        .arg("--version")
        .output()
        .ok()?;
    // "psql (PostgreSQL) 15.18 (Debian ...)"
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

async fn psql(conninfo: String) -> std::process::Output {
    within(
        tokio::process::Command::new("psql")
            .arg(conninfo)
            .args(["-c", "select 1"])
            .env_remove("PGSSLMODE")
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn psql_verify_full_with_sni() {
    let Some(major) = libpq_major() else {
        eprintln!("SKIP psql_verify_full_with_sni: psql not installed");
        return;
    };
    let pki = Pki::new();
    let default = pki.issue("default", &["default.test"]);
    let wild = pki.issue("wild", &["*.db.localtest"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(fake_postgres(
        listener,
        TlsAcceptor::new(store(&[&default, &wild])),
    ));
    let ca = pki.ca_path();
    let conninfo = |host: &str, extra: &str| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={port} user=alice dbname=postgres \
             sslmode=verify-full sslrootcert={} sslcert={} gssencmode=disable {extra}",
            ca.display(),
            pki.path("no-client-cert.pem").display(),
        )
    };

    let out = psql(conninfo("ep-psql.db.localtest", "")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fake server: mode=SslRequest sni=ep-psql.db.localtest"),
        "{stderr}"
    );
    assert!(stderr.contains("user=alice"), "{stderr}");

    // libpq checks the name: the default certificate does not cover this host.
    let out = psql(conninfo("a.b.db.localtest", "")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("fake server"), "{stderr}");
    assert!(stderr.contains("does not match host name"), "{stderr}");

    if major >= 17 {
        let out = psql(conninfo("ep-direct.db.localtest", "sslnegotiation=direct")).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("fake server: mode=Direct sni=ep-direct.db.localtest alpn=postgresql"),
            "{stderr}"
        );
    } else {
        eprintln!("SKIP sslnegotiation=direct: libpq {major} predates PostgreSQL 17");
    }
}

/// One handshake of a client using `client` (its session cache included) with `acceptor`.
async fn handshake_with(
    acceptor: &TlsAcceptor,
    listener: &TcpListener,
    client: &Arc<ClientConfig>,
) -> (ClientStream, TlsSession) {
    let addr = listener.local_addr().unwrap();
    let connect = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("ep.db.localtest").unwrap();
        TlsConnector::from(Arc::clone(client))
            .connect(name, tcp)
            .await
            .unwrap()
    };
    let accept = async {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp, Negotiation::SslRequest).await.unwrap()
    };
    let (mut client, mut session) = within(async { tokio::join!(connect, accept) }).await;
    // A byte from the server, so the client has also read whatever session ticket came first.
    within(session.stream.write_all(b"x")).await.unwrap();
    let mut b = [0u8; 1];
    within(client.read_exact(&mut b)).await.unwrap();
    (client, session)
}

#[tokio::test]
async fn channel_binding_is_of_the_certificate_the_client_saw_across_a_reload() {
    let pki = Pki::new();
    let old = pki.issue("main", &["*.db.localtest"]);
    let store = store(&[&old]);
    let acceptor = TlsAcceptor::new(Arc::clone(&store));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // One config for every connection: a rustls client caches sessions and would resume.
    let client = Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider())))
            .with_no_client_auth(),
    );
    let binding_of = |c: &ClientStream| crate::scram::tls_server_end_point(&presented(c)).unwrap();

    let (first, session) = handshake_with(&acceptor, &listener, &client).await;
    assert_eq!(presented(&first), old.der);
    // A reload between this handshake and the login: the binding is still the one the client
    // computes from what it saw.
    let new = pki.issue("main", &["*.db.localtest"]);
    store.reload().unwrap();
    assert_eq!(session.channel_binding, Some(binding_of(&first)));

    // The same client again: a full handshake with the new certificate, not a resumed session
    // that would still show it the old one while the proxy binds to the new.
    let (second, session) = handshake_with(&acceptor, &listener, &client).await;
    assert_eq!(presented(&second), new.der);
    assert_eq!(session.channel_binding, Some(binding_of(&second)));
}
