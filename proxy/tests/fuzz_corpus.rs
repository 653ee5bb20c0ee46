//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`, including every input that once
//! crashed a target) through the same functions the cargo-fuzz targets call, so a fixed crash
//! stays fixed under plain `cargo test`.

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "{}: corpus went missing ({} files)",
        dir.display(),
        files.len()
    );
    for f in files {
        let data = std::fs::read(&f).unwrap();
        // A panic names the file, so the failing input is easy to find and minimize.
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("{} panicked on {}", target, f.display());
        }
    }
}

#[test]
fn startup_corpus() {
    replay("startup", pgwake_proxy::fuzzing::startup_body);
}

#[test]
fn options_corpus() {
    replay("options", pgwake_proxy::fuzzing::options);
}

#[test]
fn proxy_header_corpus() {
    replay("proxy_header", pgwake_proxy::fuzzing::proxy_header);
}

#[test]
fn handshake_corpus() {
    replay("handshake", pgwake_proxy::fuzzing::handshake);
}

#[test]
fn scram_corpus() {
    replay("scram", pgwake_proxy::fuzzing::scram);
}
