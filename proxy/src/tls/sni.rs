//! Endpoint ids carried by TLS: the first label of the SNI server name, or (for clients that can
//! send neither SNI nor options) a prefix of the password.

use std::net::IpAddr;

use pgwake_router::{EndpointId, InvalidEndpointId};

/// The SNI server name does not name an endpoint. Messages are safe to show the client (they
/// quote only the name the client sent, which rustls has checked is a DNS name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("server name \"{sni}\" is not under a domain served by this proxy")]
    UnknownDomain { sni: String },
    #[error(
        "server name \"{sni}\" has more than one label before \"{domain}\"; \
         expected <endpoint>.{domain}"
    )]
    NestedLabels { sni: String, domain: String },
    #[error("server name \"{sni}\": invalid endpoint ID: {source}")]
    InvalidEndpoint {
        sni: String,
        #[source]
        source: InvalidEndpointId,
    },
}

impl SniError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownDomain { .. } => "sni_unknown_domain",
            Self::NestedLabels { .. } => "sni_nested_labels",
            Self::InvalidEndpoint { .. } => "sni_invalid_endpoint",
        }
    }
}

/// The endpoint id named by the SNI server name `sni` under one of `domains`.
///
/// - `ep-foo.db.example.com` with domain `db.example.com` → `Some(ep-foo)`; DNS names are
///   compared without regard to case and the id is lowercased.
/// - No SNI, an IP address, or the bare domain itself (`db.example.com`) → `Ok(None)`: the
///   endpoint must then come from `options` (or the password).
/// - Under no domain → [`SniError::UnknownDomain`] (also when `domains` is empty: a proxy that
///   routes by SNI only for its own domains must not accept names it does not serve).
/// - More than one label in front (`a.b.db.example.com`) → [`SniError::NestedLabels`].
/// - A label that is not a valid id (`ep_foo`, 64 characters) → [`SniError::InvalidEndpoint`].
///
/// When several domains match (`example.com` and `db.example.com`), the longest wins.
pub fn endpoint_from_sni(
    sni: Option<&str>,
    domains: &[String],
) -> Result<Option<EndpointId>, SniError> {
    let Some(sni) = sni else {
        return Ok(None);
    };
    let name = sni.strip_suffix('.').unwrap_or(sni);
    if name.is_empty() || name.parse::<IpAddr>().is_ok() {
        return Ok(None);
    }
    let mut best: Option<(&str, &str)> = None; // (domain, label part)
    for domain in domains {
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if domain.is_empty() {
            continue;
        }
        if name.eq_ignore_ascii_case(domain) {
            // The bare domain names no endpoint; a longer matching domain cannot exist
            // because it would have to be longer than the name itself.
            return Ok(None);
        }
        let Some(prefix_len) = name.len().checked_sub(domain.len() + 1) else {
            continue;
        };
        let (prefix, dot_suffix) = name.split_at(prefix_len);
        let matches = dot_suffix
            .strip_prefix('.')
            .is_some_and(|suffix| suffix.eq_ignore_ascii_case(domain));
        let longer = match best {
            Some((d, _)) => domain.len() > d.len(),
            None => true,
        };
        if matches && longer {
            best = Some((domain, prefix));
        }
    }
    let Some((domain, label)) = best else {
        return Err(SniError::UnknownDomain {
            sni: sni.to_owned(),
        });
    };
    if label.contains('.') {
        return Err(SniError::NestedLabels {
            sni: sni.to_owned(),
            domain: domain.to_owned(),
        });
    }
    EndpointId::parse(&label.to_ascii_lowercase())
        .map(Some)
        .map_err(|source| SniError::InvalidEndpoint {
            sni: sni.to_owned(),
            source,
        })
}

/// The prefix of a cleartext password that carries the endpoint id.
const PASSWORD_PREFIX: &str = "endpoint=";

/// Splits `endpoint=ID;PASSWORD` or `endpoint=ID$PASSWORD` into `(ID, PASSWORD)`.
///
/// The id ends at the first `;` or `$` (ids cannot contain either), so the real password may
/// contain both. `None` when the password does not start with `endpoint=` or has no separator.
/// The id is returned as sent; validate it with [`EndpointId::parse`] to give the client a
/// precise error.
pub fn parse_password_endpoint(password: &str) -> Option<(String, String)> {
    let rest = password.strip_prefix(PASSWORD_PREFIX)?;
    let sep = rest.find([';', '$'])?;
    let (id, password) = (&rest[..sep], &rest[sep + 1..]);
    Some((id.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains(list: &[&str]) -> Vec<String> {
        list.iter().map(|d| d.to_string()).collect()
    }

    #[test]
    fn endpoint_from_sni_table() {
        let d = domains(&["db.example.com", "example.com", "db.localtest"]);
        let ok = |sni: Option<&str>, want: Option<&str>| {
            let got = endpoint_from_sni(sni, &d).unwrap();
            assert_eq!(got.as_ref().map(EndpointId::as_str), want, "{sni:?}");
        };
        ok(None, None);
        ok(Some("ep-foo.db.example.com"), Some("ep-foo"));
        ok(Some("EP-Foo.DB.Example.COM"), Some("ep-foo"));
        ok(Some("ep-foo.db.example.com."), Some("ep-foo"));
        ok(Some("ep-1.db.localtest"), Some("ep-1"));
        // The longest domain wins: "ep.example.com" is under example.com only.
        ok(Some("ep.example.com"), Some("ep"));
        ok(Some("db.example.com"), None);
        ok(Some("DB.EXAMPLE.COM"), None);
        ok(Some("127.0.0.1"), None);
        ok(Some("::1"), None);
        ok(Some(""), None);

        let err = |sni: &str| endpoint_from_sni(Some(sni), &d).unwrap_err();
        assert_eq!(
            err("ep.other.org"),
            SniError::UnknownDomain {
                sni: "ep.other.org".into()
            }
        );
        // A name that merely ends with the domain's characters is not under it.
        assert!(matches!(
            err("ep.xdb.localtest"),
            SniError::UnknownDomain { .. }
        ));
        assert!(matches!(err("localtest"), SniError::UnknownDomain { .. }));
        assert_eq!(
            err("a.b.db.example.com"),
            SniError::NestedLabels {
                sni: "a.b.db.example.com".into(),
                domain: "db.example.com".into()
            }
        );
        // Under example.com (not db.example.com): two labels in front.
        assert!(matches!(
            err("a.b.example.com"),
            SniError::NestedLabels { .. }
        ));
        assert!(matches!(
            err("ep_foo.db.example.com"),
            SniError::InvalidEndpoint {
                source: InvalidEndpointId::BadChar,
                ..
            }
        ));
        assert!(matches!(
            err("-ep.db.example.com"),
            SniError::InvalidEndpoint {
                source: InvalidEndpointId::BadHyphen,
                ..
            }
        ));
        assert!(matches!(
            err(&format!("{}.db.example.com", "x".repeat(64))),
            SniError::InvalidEndpoint {
                source: InvalidEndpointId::TooLong,
                ..
            }
        ));
        assert!(matches!(
            err(".db.example.com"),
            SniError::InvalidEndpoint { .. }
        ));
        // No domains configured: every SNI is unknown.
        assert!(matches!(
            endpoint_from_sni(Some("ep.db.example.com"), &[]),
            Err(SniError::UnknownDomain { .. })
        ));
        assert_eq!(endpoint_from_sni(None, &[]), Ok(None));
        assert_eq!(err("a.b.example.com").kind(), "sni_nested_labels");
    }

    #[test]
    fn sni_error_messages_explain() {
        let e = endpoint_from_sni(Some("a.b.db.localtest"), &domains(&["db.localtest"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("<endpoint>.db.localtest"), "{e}");
    }

    #[test]
    fn parse_password_endpoint_table() {
        let some = |id: &str, pw: &str| Some((id.to_string(), pw.to_string()));
        assert_eq!(
            parse_password_endpoint("endpoint=ep-1;secret"),
            some("ep-1", "secret")
        );
        assert_eq!(
            parse_password_endpoint("endpoint=ep-1$secret"),
            some("ep-1", "secret")
        );
        // The real password keeps every later separator.
        assert_eq!(
            parse_password_endpoint("endpoint=ep-1;a;b$c"),
            some("ep-1", "a;b$c")
        );
        assert_eq!(
            parse_password_endpoint("endpoint=ep-1$a;b"),
            some("ep-1", "a;b")
        );
        assert_eq!(parse_password_endpoint("endpoint=ep-1;"), some("ep-1", ""));
        // Returned as sent; the caller validates the id.
        assert_eq!(parse_password_endpoint("endpoint=;pw"), some("", "pw"));
        assert_eq!(
            parse_password_endpoint("endpoint=Bad Id;pw"),
            some("Bad Id", "pw")
        );
        for none in [
            "",
            "secret",
            "endpoint=ep-1",
            "Endpoint=ep-1;pw",
            " endpoint=ep-1;pw",
            "project=ep-1;pw",
        ] {
            assert_eq!(parse_password_endpoint(none), None, "{none:?}");
        }
    }
}
