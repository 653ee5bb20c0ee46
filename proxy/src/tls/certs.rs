//! Server certificates: loading the configured PEM pairs, choosing one by SNI, reloading.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::config::CertKeyPaths;
use super::x509;
use super::{provider, LoadErrors, TlsError};

/// PEM files larger than this are refused: a certificate chain is a few KiB, and a path that
/// points at a device or a log file must not make the proxy read it whole.
const MAX_PEM_FILE: u64 = 1 << 20;

/// The configured certificates, indexed by the DNS names in each certificate, and swapped as a
/// whole on reload. Used as the rustls certificate resolver by [`super::server_config`]; new
/// handshakes see a reload at once, established sessions never notice one.
pub struct CertStore {
    pairs: Vec<CertKeyPaths>,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertSet>>,
    /// File stamps taken before the last load attempt, successful or not. Its lock also
    /// serialises reloads, so stamps always describe the files the current attempt read.
    stamps: Mutex<Vec<Option<FileStamp>>>,
}

/// One loaded pair, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Host names the certificate is selected for (lowercase; `*.` wildcards as written).
    pub names: Vec<String>,
}

struct CertSet {
    /// In config order; the first is the default.
    certs: Vec<(Arc<CertifiedKey>, CertInfo)>,
    exact: HashMap<String, usize>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, usize>,
}

impl CertSet {
    fn select(&self, sni: Option<&str>) -> usize {
        let Some(sni) = sni else { return 0 };
        let name = sni.strip_suffix('.').unwrap_or(sni).to_ascii_lowercase();
        if let Some(&i) = self.exact.get(&name) {
            return i;
        }
        // A wildcard stands for exactly one whole, non-empty label.
        if let Some((label, parent)) = name.split_once('.') {
            if !label.is_empty() {
                if let Some(&i) = self.wildcard.get(parent) {
                    return i;
                }
            }
        }
        0
    }
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    /// Catches a file replaced by rename (or a symlink switched, as Kubernetes does with
    /// mounted secrets) whose size and mtime happen to match the old one.
    #[cfg(unix)]
    inode: (u64, u64),
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let meta = fs::metadata(path).ok()?;
        Some(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            inode: {
                use std::os::unix::fs::MetadataExt;
                (meta.dev(), meta.ino())
            },
        })
    }
}

impl CertStore {
    /// Loads every pair. All problems are reported at once, each naming its file.
    pub fn load(pairs: Vec<CertKeyPaths>) -> Result<Self, LoadErrors> {
        let provider = provider();
        let stamps = stamp_all(&pairs);
        let set = load_set(&pairs, &provider)?;
        Ok(Self {
            pairs,
            provider,
            current: RwLock::new(Arc::new(set)),
            stamps: Mutex::new(stamps),
        })
    }

    /// Re-reads every file and swaps the whole set in at once. On any error the previous
    /// certificates stay in use and every error is returned.
    pub fn reload(&self) -> Result<(), LoadErrors> {
        let mut stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        // Stamped before reading: a file that changes while it is read is seen as changed
        // again by the next poll rather than missed.
        *stamps = stamp_all(&self.pairs);
        let set = load_set(&self.pairs, &self.provider)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        Ok(())
    }

    /// Whether any file's size, modification time or identity differs from when it was last
    /// read by [`load`](Self::load) or [`reload`](Self::reload) (successful or not, so a broken
    /// file is retried once it changes again, not on every poll). Cheap: one `stat` per file.
    /// A rewrite that keeps the length within one tick of the file system's clock can go
    /// unnoticed, which renewals (and SIGHUP, which reloads unconditionally) never run into.
    pub fn changed_since_last_load(&self) -> bool {
        let stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        *stamps != stamp_all(&self.pairs)
    }

    /// The certificate chain and key a handshake with this SNI gets: an exact name, else a
    /// `*.` wildcard one label up, else the first configured pair.
    pub fn certificate_for(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let set = self.snapshot();
        Arc::clone(&set.certs[set.select(sni)].0)
    }

    /// The loaded pairs in config order (the first is the default), for logs.
    pub fn certificates(&self) -> Vec<CertInfo> {
        self.snapshot()
            .certs
            .iter()
            .map(|(_, info)| info.clone())
            .collect()
    }

    /// Which of `domains` no certificate covers with a `*.domain` wildcard: clients that verify
    /// the host name (`sslmode=verify-full`) cannot connect to endpoints under those.
    pub fn uncovered_domains(&self, domains: &[String]) -> Vec<String> {
        let set = self.snapshot();
        domains
            .iter()
            .filter(|d| !set.wildcard.contains_key(&d.to_ascii_lowercase()))
            .cloned()
            .collect()
    }

    fn snapshot(&self) -> Arc<CertSet> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certificate_for(client_hello.server_name()))
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("certificates", &self.certificates())
            .finish()
    }
}

fn stamp_all(pairs: &[CertKeyPaths]) -> Vec<Option<FileStamp>> {
    pairs
        .iter()
        .flat_map(|p| [FileStamp::of(&p.cert), FileStamp::of(&p.key)])
        .collect()
}

fn load_set(pairs: &[CertKeyPaths], provider: &CryptoProvider) -> Result<CertSet, LoadErrors> {
    if pairs.is_empty() {
        return Err(LoadErrors(vec![TlsError::NoCertificatesConfigured]));
    }
    let mut errors = Vec::new();
    let mut certs = Vec::new();
    for pair in pairs {
        match load_pair(pair, provider) {
            Ok(loaded) => certs.push(loaded),
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        return Err(LoadErrors(errors));
    }
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    for (i, (_, info)) in certs.iter().enumerate() {
        for name in &info.names {
            // The first pair in config order that names a host wins.
            match name.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_owned()).or_insert(i),
                None => exact.entry(name.clone()).or_insert(i),
            };
        }
    }
    Ok(CertSet {
        certs,
        exact,
        wildcard,
    })
}

fn load_pair(
    pair: &CertKeyPaths,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, CertInfo), Vec<TlsError>> {
    // Both files are read before giving up so that both problems are reported.
    let chain = read_certs(&pair.cert);
    let key = read_key(&pair.key);
    let (chain, key) = match (chain, key) {
        (Ok(chain), Ok(key)) => (chain, key),
        (chain, key) => return Err(chain.err().into_iter().chain(key.err()).collect()),
    };
    let names = x509::cert_names(&chain[0])
        .map_err(|e| {
            vec![TlsError::BadCertificate {
                path: pair.cert.clone(),
                reason: e.to_string(),
            }]
        })?
        .host_names();
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|source| {
        vec![TlsError::BadKey {
            cert: pair.cert.clone(),
            key: pair.key.clone(),
            source,
        }]
    })?;
    Ok((
        Arc::new(certified),
        CertInfo {
            cert: pair.cert.clone(),
            key: pair.key.clone(),
            names,
        },
    ))
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let io_err = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(io_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
            max: MAX_PEM_FILE,
        });
    }
    Ok(bytes)
}

/// Every certificate in a PEM file, in order.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem(path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_pem(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoPrivateKey {
            path: path.to_owned(),
        })
}
