#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time each (not part of CI).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, all targets
#
# libFuzzer needs nightly-only rustc flags (-Zsanitizer, -Cpasses=sancov-module). The project's
# machines have only stable Rust and cannot fetch another toolchain, so the script uses stable
# with RUSTC_BOOTSTRAP=1, which makes stable accept nightly flags. Set FUZZ_TOOLCHAIN=nightly
# to use a real nightly instead.
#
# Each target fuzzes a scratch corpus (fuzz/corpus-work/<target>, git-ignored) seeded from the
# small committed corpus fuzz/corpus/<target>, which `cargo test` replays as a regression test.
# Crashes land in fuzz/artifacts/<target>/; the script exits non-zero if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(startup options proxy_header handshake scram)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "+ cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
fi

toolchain=()
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    toolchain=("+$FUZZ_TOOLCHAIN")
else
    export RUSTC_BOOTSTRAP=1
fi

failed=()
for t in "${targets[@]}"; do
    work="fuzz/corpus-work/$t"
    mkdir -p "$work" "fuzz/artifacts/$t"
    cp -n fuzz/corpus/"$t"/* "$work"/ 2>/dev/null || true
    echo "+ cargo fuzz run $t for ${secs}s"
    # -rss_limit_mb: every parser caps its buffers at a few KiB, so a lot of memory is a bug.
    # libFuzzer exits non-zero on a crash, a leak or a timeout; a build failure counts too.
    status=0
    cargo "${toolchain[@]}" fuzz run "$t" "$work" -- \
        -max_total_time="$secs" -max_len=12000 -rss_limit_mb=512 -print_final_stats=1 \
        >"fuzz/artifacts/$t/last-run.log" 2>&1 || status=$?
    grep -aE '^(#[0-9]+\s+DONE|Done|stat::|==[0-9]+==|SUMMARY|thread .* panicked|Test unit written|error)' \
        "fuzz/artifacts/$t/last-run.log" || true
    if [ "$status" -ne 0 ]; then
        echo "$t: exit status $status" >&2
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "crashes in: ${failed[*]} (see fuzz/artifacts/)" >&2
    exit 1
fi
echo "all targets ran ${secs}s without a crash"
