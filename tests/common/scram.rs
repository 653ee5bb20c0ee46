//! Shared by the tests of logins checked at the proxy (tests/auth.rs, tests/auth_drivers.rs):
//! a compute that requires SCRAM itself, the same verifier in the endpoint's roles file, a
//! certificate for the proxy, and the optional client drivers.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::Env;

pub const PASSWORD: &str = "sekrit";

/// Writes the role's verifier twice: as initdb's `--pwfile` (Postgres stores a verifier given
/// as the password unchanged) and as the endpoint's roles file. Returns the config keys.
pub fn roles(dir: &Path) -> (String, String) {
    let verifier = postgres_protocol::password::scram_sha_256(PASSWORD.as_bytes());
    let pwfile = dir.join("pw");
    std::fs::write(&pwfile, format!("{verifier}\n")).unwrap();
    std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let roles_file = dir.join("demo.roles");
    std::fs::write(
        &roles_file,
        format!("; pgbouncer auth_file format\n\"postgres\" \"{verifier}\"\n"),
    )
    .unwrap();
    let local = format!(
        "[local]\nauth = \"scram-sha-256\"\ninitdb_args = [\"--no-sync\", \"--pwfile={}\"]\n",
        pwfile.display()
    );
    let endpoint = format!(
        "[[endpoint]]\nid = \"demo\"\nbackend = \"local\"\nroles_file = \"{}\"\n",
        roles_file.display()
    );
    (local, endpoint)
}

/// A self-signed certificate for `names` (DNS names or IP addresses) in `dir`: (cert, key)
/// PEM paths. The certificate is its own CA for the clients' `sslrootcert`.
pub fn self_signed(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    use rcgen::{CertificateParams, KeyPair};
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// The `[tls]` table serving `cert`/`key` for `*.db.localtest` (and without SNI).
pub fn tls_table(cert: &Path, key: &Path) -> String {
    format!(
        "[tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\ndomains = [\"db.localtest\"]\n",
        cert.display(),
        key.display()
    )
}

pub fn starts(env: &Env) -> u64 {
    env.stats("demo").map_or(0, |s| s.starts)
}

/// Whether an optional client driver can run. A missing one is skipped with a message, unless
/// `PGWAKE_REQUIRE_DRIVERS` is set (.ci/run sets it, after scripts/setup-deps.sh installed
/// every driver), so CI can never skip one silently.
pub fn driver_available(name: &str, available: bool, install: &str) -> bool {
    if !available {
        assert!(
            std::env::var_os("PGWAKE_REQUIRE_DRIVERS").is_none(),
            "{name} is required ({install}) but not available"
        );
        eprintln!("SKIPPED: {name} is not available ({install})");
    }
    available
}
