//! Template clusters: a new endpoint's cluster is a copy of one made by initdb once per
//! PostgreSQL major version and initdb arguments, instead of its own initdb (~1 s, and far more
//! when many endpoints are new at once). Templates live in `data_root/.pgwake/templates/<key>`;
//! like an endpoint's cluster, a template is built in a temporary directory next to it and
//! renamed into place only once complete, so a directory under its final name is a whole one.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use crate::BackendError;

/// Where templates live, under the data root.
pub const TEMPLATES: &str = ".pgwake/templates";

/// The major version in `postgres -V` output ("postgres (PostgreSQL) 15.5 (Debian 15.5-1)"):
/// clusters of one major version are interchangeable, so a minor upgrade keeps the template.
pub fn major_version(version: &str) -> String {
    let v = version
        .split("(PostgreSQL)")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or(version.trim());
    v.split('.').next().unwrap_or(v).to_string()
}

/// The template's name for a major version and the initdb arguments: a stable hash (FNV-1a),
/// so it survives pgwake upgrades. A `--pwfile=` argument adds the file's contents, which end
/// up in the cluster.
pub fn key(major: &str, args: &[OsString]) -> Result<String, BackendError> {
    let mut h = Fnv::new();
    h.field(major.as_bytes());
    for a in args {
        h.field(a.as_encoded_bytes());
        if let Some(file) = a.to_str().and_then(|a| a.strip_prefix("--pwfile=")) {
            let contents = std::fs::read(file)
                .map_err(|e| BackendError::io(format!("read the pwfile {file}"), e))?;
            h.field(&contents);
        }
    }
    Ok(format!("pg{major}-{:016x}", h.0))
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    /// Length-prefixed, so that `["ab", "c"]` and `["a", "bc"]` differ.
    fn field(&mut self, bytes: &[u8]) {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Copies `template` (or a suspended parent's cluster, for a branch) to `to` (which must not
/// exist) with owners, modes and times, sharing blocks (reflinks) where the filesystem can,
/// then makes the copy durable: the endpoint is recorded right after, and a recorded cluster
/// must survive a crash.
pub async fn copy(template: &Path, to: &Path) -> Result<(), BackendError> {
    let what = || format!("copy {} to {}", template.display(), to.display());
    let out = Command::new("cp")
        .args(["-a", "--reflink=auto", "--"])
        .arg(template)
        .arg(to)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| BackendError::io(what(), e))?;
    if !out.status.success() {
        // As a failed initdb (a full disk, permissions): the operator fixes it; the half-made
        // copy is removed, and the next start copies again.
        let text = String::from_utf8_lossy(&out.stderr);
        return Err(BackendError::DataDir {
            path: to.display().to_string(),
            reason: format!(
                "copying {} failed ({}): {}",
                template.display(),
                out.status,
                super::tail(&text, 1000)
            ),
        });
    }
    // One syncfs instead of an fsync per file (a cluster has about a thousand), as initdb's
    // own `--sync-method=syncfs`.
    let dir = std::fs::File::open(to).map_err(|e| BackendError::io(what(), e))?;
    // SAFETY: a valid open descriptor, borrowed for the call only.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(BackendError::io(
            format!("syncfs {}", to.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Gives the cluster in `dir`, a fresh copy of a (cleanly shut down) template, a database
/// system identifier of its own, as its own initdb would have: written into `global/pg_control`
/// (its CRC recomputed), after which `pg_resetwal -f` (run by the caller) writes new WAL that
/// carries it, since the copied WAL names the template's identifier and postgres refuses WAL
/// of another system. Returns the new identifier.
pub fn set_system_identifier(dir: &Path) -> Result<u64, BackendError> {
    let path = dir.join("global/pg_control");
    let what = || format!("set a new system identifier in {}", path.display());
    let mut control = std::fs::read(&path).map_err(|e| BackendError::io(what(), e))?;
    let id = new_system_identifier();
    rewrite_control(&mut control, id).ok_or_else(|| BackendError::DataDir {
        path: path.display().to_string(),
        reason: "pg_control does not have the layout pgwake knows (no CRC found)".into(),
    })?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| BackendError::io(what(), e))?;
    std::io::Write::write_all(&mut f, &control).map_err(|e| BackendError::io(what(), e))?;
    f.sync_all().map_err(|e| BackendError::io(what(), e))?;
    Ok(id)
}

/// What initdb uses: seconds and microseconds of the current time and bits of the process id,
/// so that clusters made one after another differ; a counter covers copies made within the
/// same microsecond by this process.
fn new_system_identifier() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (now.as_secs() << 32)
        | (u64::from(now.subsec_micros()) << 12)
        | ((u64::from(std::process::id()) ^ seq) & 0xFFF)
}

/// Puts `id` into a `pg_control` image (the identifier is its first field, in host byte
/// order) and recomputes its CRC-32C. The CRC's place depends on the major version's layout;
/// it is the one 4-byte-aligned offset whose bytes are the CRC of everything before it (the
/// rest of the 8 kB file is zeros, so a false match is as unlikely as a CRC collision). `None`
/// if there is none.
fn rewrite_control(control: &mut [u8], id: u64) -> Option<()> {
    let at = (8..control.len().saturating_sub(3)).step_by(4).find(|&k| {
        control[k..k + 4] == crc32c(&control[..k]).to_ne_bytes()
            && control[..k].iter().any(|b| *b != 0)
    })?;
    control[..8].copy_from_slice(&id.to_ne_bytes());
    let crc = crc32c(&control[..at]);
    control[at..at + 4].copy_from_slice(&crc.to_ne_bytes());
    Some(())
}

/// CRC-32C (Castagnoli), reflected, as Postgres's `pg_crc32c`. Bitwise: it runs over one
/// 300-byte struct per new endpoint.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn the_identifier_is_replaced_and_the_crc_found_and_recomputed() {
        // A made-up control file: identifier, some fields, the CRC, then zeros to 8 kB.
        let mut control = vec![0u8; 8192];
        control[..8].copy_from_slice(&42u64.to_ne_bytes());
        control[8..12].copy_from_slice(&1300u32.to_ne_bytes());
        control[100..104].copy_from_slice(&[1, 2, 3, 4]);
        let crc = crc32c(&control[..296]);
        control[296..300].copy_from_slice(&crc.to_ne_bytes());
        rewrite_control(&mut control, 7).unwrap();
        assert_eq!(control[..8], 7u64.to_ne_bytes());
        assert_eq!(control[296..300], crc32c(&control[..296]).to_ne_bytes());
        assert_eq!(control[100..104], [1, 2, 3, 4]);
        assert_eq!(rewrite_control(&mut [0u8; 64], 7), None, "no CRC anywhere");
        assert_ne!(new_system_identifier(), new_system_identifier());
    }

    #[test]
    fn the_key_follows_the_major_version_and_every_argument() {
        assert_eq!(
            major_version("postgres (PostgreSQL) 15.5 (Debian 15.5-1.pgdg120+1)\n"),
            "15"
        );
        assert_eq!(major_version("postgres (PostgreSQL) 17beta1"), "17beta1");
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let k = key("15", &args(&["-U", "postgres"])).unwrap();
        assert!(k.starts_with("pg15-"), "{k}");
        assert_eq!(k, key("15", &args(&["-U", "postgres"])).unwrap(), "stable");
        assert_ne!(k, key("16", &args(&["-U", "postgres"])).unwrap());
        assert_ne!(k, key("15", &args(&["-U", "alice"])).unwrap());
        assert_ne!(
            key("15", &args(&["ab", "c"])).unwrap(),
            key("15", &args(&["a", "bc"])).unwrap()
        );

        let tmp = tempfile::tempdir().unwrap();
        let pw = tmp.path().join("pw");
        std::fs::write(&pw, "one").unwrap();
        let with_pw = args(&[&format!("--pwfile={}", pw.display())]);
        let before = key("15", &with_pw).unwrap();
        std::fs::write(&pw, "two").unwrap();
        assert_ne!(before, key("15", &with_pw).unwrap(), "a new password");
    }

    #[tokio::test]
    async fn a_copy_keeps_contents_and_modes_and_refuses_nothing_to_copy() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("global")).unwrap();
        std::fs::write(src.join("PG_VERSION"), "15\n").unwrap();
        std::fs::write(src.join("global/pg_control"), [7u8; 512]).unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o700)).unwrap();
        let dst = tmp.path().join("dst");
        copy(&src, &dst).await.unwrap();
        assert_eq!(std::fs::read(dst.join("PG_VERSION")).unwrap(), b"15\n");
        assert_eq!(
            std::fs::read(dst.join("global/pg_control")).unwrap(),
            [7u8; 512]
        );
        let mode = std::fs::metadata(&dst).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        let err = copy(&tmp.path().join("missing"), &tmp.path().join("x"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), crate::BackendErrorKind::DataDirectory, "{err}");
    }
}
