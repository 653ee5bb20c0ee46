//! Reading the SCRAM verifiers of a running compute's login roles (`pg_authid`), so that the
//! proxy can check the next login before the compute runs again. The manager only fetches the
//! rows; what they mean to a login is the proxy's business.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ComputeAddr;

/// The roles that can log in with a SCRAM password. Other roles (md5, no password) cannot be
/// checked at the proxy and are left out: they cannot log in through a SCRAM endpoint.
const QUERY: &str = "select rolname::text, rolpassword::text from pg_authid \
                     where rolcanlogin and rolpassword like 'SCRAM-SHA-256$%' \
                     and (rolvaliduntil is null or rolvaliduntil > now())";

/// At most this many roles are read; a compute with more is refused rather than loaded
/// without bound.
pub const MAX_ROLES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum RolesError {
    #[error("connect as {user}: {source}")]
    Connect {
        user: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("read pg_authid: {0}")]
    Query(#[source] tokio_postgres::Error),
    #[error("more than {MAX_ROLES} login roles")]
    TooMany,
    #[error("timed out")]
    Timeout,
}

/// One login role and its verifier (the `pg_authid.rolpassword` string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleVerifier {
    pub role: String,
    pub verifier: String,
}

/// Connects to the compute as `user` (the bootstrap superuser; with `password` when the
/// cluster requires one) and reads its login roles' verifiers.
pub async fn read_role_verifiers(
    addr: &ComputeAddr,
    user: &str,
    password: Option<&str>,
    timeout: Duration,
) -> Result<Vec<RoleVerifier>, RolesError> {
    let (host, port) = addr
        .as_str()
        .rsplit_once(':')
        .unwrap_or((addr.as_str(), "5432"));
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(host.trim_start_matches('[').trim_end_matches(']'))
        .port(port.parse().unwrap_or(5432))
        .user(user)
        .dbname("postgres")
        .application_name("pgwake-roles")
        .connect_timeout(timeout);
    if let Some(p) = password {
        cfg.password(p);
    }
    let work = async {
        let (client, connection) =
            cfg.connect(tokio_postgres::NoTls)
                .await
                .map_err(|source| RolesError::Connect {
                    user: user.to_string(),
                    source,
                })?;
        let task = tokio::spawn(connection);
        let rows = client.query(QUERY, &[]).await.map_err(RolesError::Query);
        drop(client);
        let _ = task.await;
        let rows = rows?;
        if rows.len() > MAX_ROLES {
            return Err(RolesError::TooMany);
        }
        Ok(rows
            .iter()
            .map(|r| RoleVerifier {
                role: r.get(0),
                verifier: r.get(1),
            })
            .collect())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| RolesError::Timeout)?
}

/// The bootstrap superuser's password, when initdb was given one with `--pwfile` (its first
/// line, as initdb reads it).
pub fn superuser_password(initdb_args: &[String]) -> Option<String> {
    let mut args = initdb_args.iter();
    let mut path: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        if let Some(p) = a.strip_prefix("--pwfile=") {
            path = Some(p.into());
        } else if a == "--pwfile" {
            path = args.next().map(PathBuf::from);
        }
    }
    let text = std::fs::read_to_string(path?).ok()?;
    Some(text.lines().next().unwrap_or_default().to_string())
}

/// Writes `rows` as a roles file (pgbouncer `auth_file` format) at `path`, mode 0600: a
/// temporary file, fsync, rename, fsync of the directory, so that a crash leaves the old file
/// or the new one, never half of one.
pub fn write_roles_file(path: &Path, rows: &[RoleVerifier]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::from("; written by pgwake from the compute's pg_authid\n");
    for r in rows {
        text.push_str(&format!(
            "\"{}\" \"{}\"\n",
            r.role.replace('"', "\"\""),
            r.verifier.replace('"', "\"\"")
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("roles.tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn roles_file_is_private_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ep.roles");
        let rows = vec![
            RoleVerifier {
                role: "al\"ice".into(),
                verifier: "SCRAM-SHA-256$4096:c2FsdA==$a:b".into(),
            },
            RoleVerifier {
                role: "bob".into(),
                verifier: "SCRAM-SHA-256$4096:c2FsdA==$c:d".into(),
            },
        ];
        write_roles_file(&path, &rows).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"al\"\"ice\" \"SCRAM-SHA-256$4096:c2FsdA==$a:b\"\n"));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        write_roles_file(&path, &rows[1..]).unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains("alice"));
        assert!(!path.with_extension("roles.tmp").exists());
    }

    #[test]
    fn superuser_password_from_initdb_pwfile() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "sekrit\nignored\n").unwrap();
        let p = pw.display().to_string();
        assert_eq!(
            superuser_password(&["--no-sync".into(), format!("--pwfile={p}")]),
            Some("sekrit".into())
        );
        assert_eq!(
            superuser_password(&["--pwfile".into(), p]),
            Some("sekrit".into())
        );
        assert_eq!(superuser_password(&["--no-sync".into()]), None);
    }
}
