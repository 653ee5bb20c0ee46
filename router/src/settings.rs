//! The `postgres -c name=value` settings of local computes: which ones pgwake owns, which ones
//! only the operator may set, and the shape of a name.
//!
//! pgwake starts every local compute with its own `listen_addresses` (loopback), `port` and
//! `unix_socket_directories`; a later `-c` of the same name wins, so an endpoint's settings
//! could open the compute to every interface (clients then skip the proxy's allowlists and
//! limits) or move it where pgwake does not look. Some other settings run a program or load a
//! library as the compute's OS user at start or at every WAL segment: the config file (the
//! operator) may set them, a caller of the management API (who holds a token to create
//! endpoints, not a shell on the host) may not.

/// Set by pgwake on every local compute, or where it finds the compute's files.
const OWNED: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "external_pid_file",
];

/// Run a program, or load code, as the compute's OS user.
const PRIVILEGED: &[&str] = &[
    "archive_command",
    "archive_library",
    "restore_command",
    "archive_cleanup_command",
    "recovery_end_command",
    "ssl_passphrase_command",
    "shared_preload_libraries",
    "session_preload_libraries",
    "local_preload_libraries",
    "dynamic_library_path",
    "jit_provider",
];

/// Longest setting name PostgreSQL keeps (NAMEDATALEN - 1), and a generous bound on a value.
const MAX_NAME: usize = 63;
const MAX_VALUE: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("setting name {0:?} is not a PostgreSQL setting name (letters, digits, _ and one . for an extension's)")]
    BadName(String),
    #[error("setting {0:?}: the value is longer than 8 KiB or holds a NUL byte")]
    BadValue(String),
    #[error("setting {0:?} is pgwake's own on every local compute and cannot be changed")]
    Owned(String),
    #[error("setting {0:?} runs programs or loads code as the compute's OS user: only the config file may set it")]
    Privileged(String),
}

/// A setting the config file may give: a well-formed name that pgwake does not own.
pub fn check(name: &str, value: &str) -> Result<(), SettingError> {
    let shape = |part: &str| {
        part.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let well_formed = name.len() <= MAX_NAME
        && match name.split_once('.') {
            None => shape(name),
            Some((class, rest)) => shape(class) && shape(rest),
        };
    if !well_formed {
        return Err(SettingError::BadName(name.to_string()));
    }
    if value.len() > MAX_VALUE || value.contains('\0') {
        return Err(SettingError::BadValue(name.to_string()));
    }
    // PostgreSQL folds names to lower case.
    let lower = name.to_ascii_lowercase();
    if OWNED.contains(&lower.as_str()) {
        return Err(SettingError::Owned(name.to_string()));
    }
    Ok(())
}

/// A setting a management API caller may give: [`check`], and none of the privileged ones.
pub fn check_unprivileged(name: &str, value: &str) -> Result<(), SettingError> {
    check(name, value)?;
    if PRIVILEGED.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(SettingError::Privileged(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_values_owned_and_privileged_settings() {
        for ok in ["work_mem", "shared_buffers", "pg_stat_statements.max", "_x"] {
            assert_eq!(check_unprivileged(ok, "4MB"), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "work mem",
            "a=b",
            "x\ny",
            "a.b.c",
            ".a",
            "1x",
            &"x".repeat(64),
        ] {
            assert!(
                matches!(check(bad, "1"), Err(SettingError::BadName(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            check("work_mem", "a\0b"),
            Err(SettingError::BadValue(_))
        ));
        assert!(matches!(
            check("work_mem", &"1".repeat(9000)),
            Err(SettingError::BadValue(_))
        ));
        for owned in [
            "port",
            "LISTEN_ADDRESSES",
            "unix_socket_directories",
            "hba_file",
        ] {
            assert!(
                matches!(check(owned, "x"), Err(SettingError::Owned(_))),
                "{owned}"
            );
        }
        for privileged in [
            "archive_command",
            "Shared_Preload_Libraries",
            "restore_command",
        ] {
            assert_eq!(
                check(privileged, "x"),
                Ok(()),
                "the config file may: {privileged}"
            );
            assert!(
                matches!(
                    check_unprivileged(privileged, "x"),
                    Err(SettingError::Privileged(_))
                ),
                "{privileged}"
            );
        }
    }
}
