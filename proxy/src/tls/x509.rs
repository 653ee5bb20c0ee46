//! Just enough X.509 (DER) parsing to list the host names a certificate is valid for, so that
//! [`super::CertStore`] can index certificates by name. rustls checks everything else (the
//! chain, the key match) itself; nothing here decides whether a certificate is trustworthy.
//!
//! Every length comes from a file, so every slice is taken with checked splitting: a truncated
//! or malformed certificate is an error, never a panic.

/// Names a certificate presents to a client that checks the host name (libpq's
/// `sslmode=verify-full`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CertNames {
    /// `dNSName` entries of the subjectAltName extension, lowercased, as written (`*.x.y`
    /// wildcards included).
    pub dns: Vec<String>,
    /// Whether the subjectAltName has an `iPAddress` entry.
    pub has_ip: bool,
    /// The first commonName of the subject, if it is a string.
    pub common_name: Option<String>,
}

impl CertNames {
    /// The host names this certificate answers for, as libpq matches them: the DNS
    /// subjectAltNames, or the subject commonName only when the certificate has no DNS or IP
    /// subjectAltName. Entries that are not host names (or `*.` wildcards of one) are dropped.
    pub fn host_names(&self) -> Vec<String> {
        let candidates: Vec<&str> = if self.dns.is_empty() && !self.has_ip {
            self.common_name.iter().map(String::as_str).collect()
        } else {
            self.dns.iter().map(String::as_str).collect()
        };
        let mut names: Vec<String> = Vec::new();
        for name in candidates {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let host = name.strip_prefix("*.").unwrap_or(&name);
            if is_cert_host_name(host) && !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }
}

/// Why a certificate could not be read. The message is for operators' logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed certificate: {0}")]
pub(crate) struct DerError(&'static str);

const TAG_BOOLEAN: u8 = 0x01;
const TAG_INTEGER: u8 = 0x02;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_OID: u8 = 0x06;
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_IA5_STRING: u8 = 0x16;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
/// `[0] EXPLICIT Version` in TBSCertificate.
const TAG_VERSION: u8 = 0xa0;
/// `[3] EXPLICIT Extensions` in TBSCertificate.
const TAG_EXTENSIONS: u8 = 0xa3;
/// GeneralName `[2] IMPLICIT IA5String`.
const TAG_GN_DNS: u8 = 0x82;
/// GeneralName `[7] IMPLICIT OCTET STRING`.
const TAG_GN_IP: u8 = 0x87;

/// 2.5.29.17 id-ce-subjectAltName
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
/// 2.5.4.3 id-at-commonName
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// A cursor over a sequence of DER TLVs.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next element's tag and contents.
    fn next_tlv(&mut self) -> Result<(u8, &'a [u8]), DerError> {
        const TRUNCATED: DerError = DerError("truncated DER element");
        let (&tag, rest) = self.rest.split_first().ok_or(TRUNCATED)?;
        if tag & 0x1f == 0x1f {
            return Err(DerError("multi-byte DER tag"));
        }
        let (&first, rest) = rest.split_first().ok_or(TRUNCATED)?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            // 0x80 is BER's indefinite length, never valid in DER; four length bytes already
            // describe 4 GiB, far more than any certificate.
            if n == 0 || n > 4 {
                return Err(DerError("unsupported DER length"));
            }
            let (len_bytes, rest) = rest.split_at_checked(n).ok_or(TRUNCATED)?;
            let len = len_bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, rest)
        };
        let (content, rest) = rest.split_at_checked(len).ok_or(TRUNCATED)?;
        self.rest = rest;
        Ok((tag, content))
    }

    fn expect(&mut self, tag: u8, what: &'static str) -> Result<&'a [u8], DerError> {
        match self.next_tlv()? {
            (t, content) if t == tag => Ok(content),
            _ => Err(DerError(what)),
        }
    }
}

/// Reads the subjectAltName and subject commonName of a DER certificate.
pub(crate) fn cert_names(der: &[u8]) -> Result<CertNames, DerError> {
    let mut outer = Der::new(der);
    let cert = outer.expect(TAG_SEQUENCE, "not a certificate (no outer SEQUENCE)")?;
    let tbs = Der::new(cert).expect(TAG_SEQUENCE, "no TBSCertificate")?;
    let mut tbs = Der::new(tbs);

    let (mut tag, _) = tbs.next_tlv()?;
    if tag == TAG_VERSION {
        (tag, _) = tbs.next_tlv()?;
    }
    if tag != TAG_INTEGER {
        return Err(DerError("no serial number"));
    }
    tbs.expect(TAG_SEQUENCE, "no signature algorithm")?;
    tbs.expect(TAG_SEQUENCE, "no issuer")?;
    tbs.expect(TAG_SEQUENCE, "no validity")?;
    let subject = tbs.expect(TAG_SEQUENCE, "no subject")?;
    tbs.expect(TAG_SEQUENCE, "no subject public key")?;

    let mut names = CertNames {
        common_name: common_name(subject)?,
        ..CertNames::default()
    };
    // Optional issuerUniqueID [1], subjectUniqueID [2], extensions [3].
    while !tbs.is_empty() {
        let (tag, content) = tbs.next_tlv()?;
        if tag != TAG_EXTENSIONS {
            continue;
        }
        let list = Der::new(content).expect(TAG_SEQUENCE, "bad extensions")?;
        let mut list = Der::new(list);
        while !list.is_empty() {
            let ext = list.expect(TAG_SEQUENCE, "bad extension")?;
            let mut ext = Der::new(ext);
            let oid = ext.expect(TAG_OID, "extension without id")?;
            let (mut tag, mut value) = ext.next_tlv()?;
            if tag == TAG_BOOLEAN {
                (tag, value) = ext.next_tlv()?;
            }
            if tag != TAG_OCTET_STRING {
                return Err(DerError("extension value is not an OCTET STRING"));
            }
            if oid == OID_SUBJECT_ALT_NAME {
                read_subject_alt_name(value, &mut names)?;
            }
        }
    }
    Ok(names)
}

/// The signature algorithm (OID contents) of a DER certificate: what RFC 5929's
/// `tls-server-end-point` channel binding picks its hash from.
pub(crate) fn signature_algorithm(der: &[u8]) -> Result<&[u8], DerError> {
    let mut outer = Der::new(der);
    let cert = outer.expect(TAG_SEQUENCE, "not a certificate (no outer SEQUENCE)")?;
    let mut cert = Der::new(cert);
    cert.expect(TAG_SEQUENCE, "no TBSCertificate")?;
    let alg = cert.expect(TAG_SEQUENCE, "no signature algorithm")?;
    Der::new(alg).expect(TAG_OID, "signature algorithm without id")
}

fn read_subject_alt_name(value: &[u8], names: &mut CertNames) -> Result<(), DerError> {
    let general_names = Der::new(value).expect(TAG_SEQUENCE, "bad subjectAltName")?;
    let mut general_names = Der::new(general_names);
    while !general_names.is_empty() {
        match general_names.next_tlv()? {
            (TAG_GN_DNS, name) => {
                // IA5String is ASCII; anything else cannot match a host name anyway.
                if let Ok(name) = std::str::from_utf8(name) {
                    if name.is_ascii() {
                        names.dns.push(name.to_ascii_lowercase());
                    }
                }
            }
            (TAG_GN_IP, _) => names.has_ip = true,
            _ => {}
        }
    }
    Ok(())
}

/// The first commonName of a Name (`SEQUENCE OF SET OF AttributeTypeAndValue`).
fn common_name(name: &[u8]) -> Result<Option<String>, DerError> {
    let mut rdns = Der::new(name);
    while !rdns.is_empty() {
        let rdn = rdns.expect(TAG_SET, "bad subject name")?;
        let mut attrs = Der::new(rdn);
        while !attrs.is_empty() {
            let attr = attrs.expect(TAG_SEQUENCE, "bad subject attribute")?;
            let mut attr = Der::new(attr);
            let oid = attr.expect(TAG_OID, "subject attribute without type")?;
            let (tag, value) = attr.next_tlv()?;
            if oid != OID_COMMON_NAME {
                continue;
            }
            if matches!(tag, TAG_UTF8_STRING | TAG_PRINTABLE_STRING | TAG_IA5_STRING) {
                if let Ok(cn) = std::str::from_utf8(value) {
                    return Ok(Some(cn.to_owned()));
                }
            }
            return Ok(None);
        }
    }
    Ok(None)
}

/// A host name as it may appear in a certificate: dot-separated labels of 1..=63 ASCII
/// letters, digits, '-' or '_', at most 253 characters, with at least one label.
pub(crate) fn is_cert_host_name(name: &str) -> bool {
    is_dns_name(name, true)
}

/// A host name: dot-separated labels of 1..=63 of `[A-Za-z0-9-]` (and '_' when
/// `allow_underscore`), not starting or ending with '-', at most 253 characters in all.
pub(crate) fn is_dns_name(name: &str, allow_underscore: bool) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || b == b'-' || (allow_underscore && b == b'_')
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn self_signed(params: CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_dns_sans_ip_sans_and_common_name() {
        let mut params =
            CertificateParams::new(vec!["DB.Example.com".into(), "*.db.example.com".into()])
                .unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params
            .subject_alt_names
            .push(SanType::Rfc822Name("ops@example.com".try_into().unwrap()));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "pgwake");
        params
            .distinguished_name
            .push(DnType::CommonName, "cn.example.com");
        let names = cert_names(&self_signed(params)).unwrap();
        assert_eq!(names.dns, ["db.example.com", "*.db.example.com"]);
        assert!(names.has_ip);
        assert_eq!(names.common_name.as_deref(), Some("cn.example.com"));
        // With SANs present the CN is not a host name for libpq.
        assert_eq!(names.host_names(), ["db.example.com", "*.db.example.com"]);
    }

    #[test]
    fn common_name_counts_only_without_dns_or_ip_sans() {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "Legacy.Example.com");
        let names = cert_names(&self_signed(params)).unwrap();
        assert!(names.dns.is_empty());
        assert_eq!(names.host_names(), ["legacy.example.com"]);

        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("10.0.0.1".parse().unwrap()));
        params
            .distinguished_name
            .push(DnType::CommonName, "cn.example.com");
        let names = cert_names(&self_signed(params)).unwrap();
        assert!(names.host_names().is_empty());

        // A CN that is not a host name (a CA's, say) names nothing.
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "pgwake test CA");
        assert!(cert_names(&self_signed(params))
            .unwrap()
            .host_names()
            .is_empty());
    }

    #[test]
    fn host_names_drop_junk_and_partial_wildcards() {
        let names = CertNames {
            dns: vec![
                "ok.example.com.".into(),
                "f*.example.com".into(),
                "*".into(),
                "*.*.example.com".into(),
                "with space.example.com".into(),
                "ok.example.com".into(),
                "*.wild.example.com".into(),
            ],
            has_ip: false,
            common_name: None,
        };
        assert_eq!(names.host_names(), ["ok.example.com", "*.wild.example.com"]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let der = self_signed(CertificateParams::new(vec!["a.example.com".into()]).unwrap());
        assert!(cert_names(&der).is_ok());
        for len in 0..der.len() {
            assert!(cert_names(&der[..len]).is_err(), "prefix of {len} bytes");
        }
        // Flipping bytes must never panic (the result may be Ok or Err).
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0xff;
            let _ = cert_names(&bad);
        }
        assert!(cert_names(b"-----BEGIN CERTIFICATE-----").is_err());
        assert!(
            cert_names(&[0x30, 0x80, 0, 0]).is_err(),
            "indefinite length"
        );
        assert!(
            cert_names(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_err(),
            "5 length bytes"
        );
    }

    #[test]
    fn dns_name_syntax() {
        for ok in ["a", "db.example.com", "ep-1.db.localtest", &"x".repeat(63)] {
            assert!(is_dns_name(ok, false), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "-a.b",
            "a-.b",
            "a b",
            "*.a",
            &"x".repeat(64),
            &["abcdefghi"; 26].join("."),
        ] {
            assert!(!is_dns_name(bad, false), "{bad}");
        }
        assert!(!is_dns_name("_acme.example.com", false));
        assert!(is_dns_name("_acme.example.com", true));
    }
}
