#![no_main]
//! See `pgwake_proxy::fuzzing::scram` for what is checked; `proxy/tests/fuzz_corpus.rs` replays
//! `fuzz/corpus/scram/` through the same function in plain `cargo test`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pgwake_proxy::fuzzing::scram(data));
