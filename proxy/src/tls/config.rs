use std::path::PathBuf;

use serde::Deserialize;

use super::x509::is_dns_name;

/// The `[tls]` table of the config file.
///
/// ```toml
/// [tls]
/// certificates = [
///     { cert = "/etc/pgwake/wildcard.pem", key = "/etc/pgwake/wildcard.key" },
///     { cert = "/etc/pgwake/other.pem", key = "/etc/pgwake/other.key" },
/// ]
/// domains = ["db.example.com"]
/// require_tls = false
/// allow_password_endpoint = false
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate/key pairs; the certificate is chosen by the client's SNI among the DNS names
    /// of each certificate (exact names first, then `*.` wildcards), and the first pair is the
    /// default for clients without SNI or with a name no certificate has. Empty: no TLS, the
    /// proxy answers 'N' to SSLRequest.
    #[serde(default)]
    pub certificates: Vec<CertKeyPaths>,
    /// Domain suffixes whose first label in front is an endpoint id:
    /// `ep-foo.db.example.com` → `ep-foo` with `db.example.com` here.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Refuse clients that do not use TLS.
    #[serde(default)]
    pub require_tls: bool,
    /// For clients that can send neither SNI nor options: accept the endpoint id in the password
    /// (`endpoint=ID;PASSWORD` or `endpoint=ID$PASSWORD`), over TLS only.
    #[serde(default)]
    pub allow_password_endpoint: bool,
    /// Speak TLS to computes too (SSLRequest, then a verified handshake). Off by default:
    /// computes usually sit on the same private network as the proxy.
    #[serde(default)]
    pub compute_tls: bool,
    /// CA bundle (PEM) that compute certificates must chain to; unset uses the system bundle.
    #[serde(default)]
    pub compute_ca: Option<PathBuf>,
}

/// One certificate chain and its private key, both PEM. They may be the same file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertKeyPaths {
    /// The leaf certificate first, then intermediates.
    pub cert: PathBuf,
    /// PKCS#8 (`BEGIN PRIVATE KEY`), PKCS#1 (`BEGIN RSA PRIVATE KEY`) or SEC1
    /// (`BEGIN EC PRIVATE KEY`).
    pub key: PathBuf,
}

/// A setting in `[tls]` that cannot work. Messages name the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsConfigError {
    #[error("[tls]: {setting} needs at least one certificate in tls.certificates")]
    NeedsCertificates { setting: &'static str },
    #[error("[tls]: certificates[{index}].{field} is empty")]
    EmptyPath { index: usize, field: &'static str },
    #[error("[tls]: domains: {domain:?} {reason}")]
    BadDomain {
        domain: String,
        reason: &'static str,
    },
    #[error("[tls]: domains: {domain:?} is listed twice")]
    DuplicateDomain { domain: String },
}

impl TlsConfig {
    /// Whether TLS is offered at all.
    pub fn enabled(&self) -> bool {
        !self.certificates.is_empty()
    }

    /// Every problem found without touching the file system (loading the files is
    /// [`super::CertStore::load`]'s job, which also reports every error).
    pub fn validate(&self) -> Vec<TlsConfigError> {
        let mut errors = Vec::new();
        if !self.enabled() {
            for (on, setting) in [
                (self.require_tls, "require_tls"),
                (!self.domains.is_empty(), "domains"),
                (self.allow_password_endpoint, "allow_password_endpoint"),
            ] {
                if on {
                    errors.push(TlsConfigError::NeedsCertificates { setting });
                }
            }
        }
        for (index, pair) in self.certificates.iter().enumerate() {
            for (field, path) in [("cert", &pair.cert), ("key", &pair.key)] {
                if path.as_os_str().is_empty() {
                    errors.push(TlsConfigError::EmptyPath { index, field });
                }
            }
        }
        let mut seen: Vec<String> = Vec::new();
        for domain in &self.domains {
            let bad = |reason| TlsConfigError::BadDomain {
                domain: domain.clone(),
                reason,
            };
            if domain.starts_with("*.") {
                errors.push(bad("must be the bare suffix, without \"*.\""));
            } else if domain.ends_with('.') {
                errors.push(bad("must not end with '.'"));
            } else if !is_dns_name(domain, false) {
                errors.push(bad(
                    "is not a DNS name (labels of 1-63 letters, digits or '-', joined by '.')",
                ));
            } else {
                let lower = domain.to_ascii_lowercase();
                if seen.contains(&lower) {
                    errors.push(TlsConfigError::DuplicateDomain {
                        domain: domain.clone(),
                    });
                } else {
                    seen.push(lower);
                }
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TlsConfig, String> {
        toml::from_str(text).map_err(|e| e.message().to_owned())
    }

    #[test]
    fn defaults_are_off() {
        let c = parse("").unwrap();
        assert_eq!(c, TlsConfig::default());
        assert!(!c.enabled());
        assert!(!c.require_tls);
        assert!(!c.allow_password_endpoint);
        assert!(c.validate().is_empty());
    }

    #[test]
    fn full_table() {
        let c = parse(
            r#"
            certificates = [
                { cert = "a.pem", key = "a.key" },
                { cert = "b.pem", key = "b.pem" },
            ]
            domains = ["db.example.com", "db.localtest"]
            require_tls = true
            allow_password_endpoint = true
            "#,
        )
        .unwrap();
        assert!(c.enabled());
        assert_eq!(c.certificates.len(), 2);
        assert_eq!(c.certificates[1].key, PathBuf::from("b.pem"));
        assert_eq!(c.domains, ["db.example.com", "db.localtest"]);
        assert!(c.require_tls && c.allow_password_endpoint);
        assert!(c.validate().is_empty(), "{:?}", c.validate());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = parse("require_ssl = true").unwrap_err();
        assert!(e.contains("require_ssl"), "{e}");
        let e = parse(r#"certificates = [{ cert = "a", key = "b", chain = "c" }]"#).unwrap_err();
        assert!(e.contains("chain"), "{e}");
        let e = parse(r#"certificates = [{ cert = "a" }]"#).unwrap_err();
        assert!(e.contains("key"), "{e}");
    }

    #[test]
    fn validate_reports_every_problem() {
        let c = TlsConfig {
            certificates: vec![],
            domains: vec![
                "*.db.example.com".into(),
                "db.example.com.".into(),
                "db_example.com".into(),
                "ok.example.com".into(),
                "OK.example.com".into(),
            ],
            require_tls: true,
            allow_password_endpoint: true,
            ..TlsConfig::default()
        };
        let errors = c.validate();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 7, "{text:#?}");
        for setting in ["require_tls", "domains", "allow_password_endpoint"] {
            assert!(errors.contains(&TlsConfigError::NeedsCertificates { setting }));
        }
        assert!(text
            .iter()
            .any(|t| t.contains("*.db.example.com") && t.contains("bare suffix")));
        assert!(text.iter().any(|t| t.contains("db.example.com.")));
        assert!(text.iter().any(|t| t.contains("db_example.com")));
        assert!(errors.contains(&TlsConfigError::DuplicateDomain {
            domain: "OK.example.com".into()
        }));

        let c = TlsConfig {
            certificates: vec![CertKeyPaths {
                cert: "".into(),
                key: "k".into(),
            }],
            ..TlsConfig::default()
        };
        assert_eq!(
            c.validate(),
            [TlsConfigError::EmptyPath {
                index: 0,
                field: "cert"
            }]
        );
    }
}
