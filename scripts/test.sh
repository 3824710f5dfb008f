#!/usr/bin/env bash
# The project's test command: installs what it needs, then checks formatting, lints and the API
# docs, and runs every test (unit tests, the device plugin against emulated USB and a kubelet
# stand-in, unseal-init against SoftHSM2, a software TPM and a real OpenBao server, the
# manifests, the image's root filesystems), several test binaries at a time (NITROKEY_TEST_JOBS,
# default 3; see scripts/run-tests.py). Ends with one line, `tests: N passed, N failed`,
# and exits non-zero if anything failed, a lint or a test left files behind included. Before it,
# the time each phase took, the slowest test binaries and the size of target/.
#
# `scripts/test.sh --loaded ROUNDS CARGO-TEST-ARGS...` (e.g. `--loaded 5 -p nitrokey-device-plugin
# --test hotplug`) runs only the tests selected, ROUNDS times, with every core kept busy by one
# spinning process each (normal priority; all stopped at the end): tests judge timing from
# events, and this shows they still pass on a loaded machine.
set -euo pipefail
rounds=0
if [ "${1:-}" = "--loaded" ]; then
  rounds="${2:-}"
  case "$rounds" in '' | *[!0-9]* | 0) echo "error: --loaded needs a number of rounds (1 or more)" >&2; exit 2 ;; esac
  shift 2
fi
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
cd "$repo_root"

# Phase timing: `phase NAME` closes the running phase and opens the next; the summary at the end
# comes from these (wall-clock, whole seconds: what a contributor waits for).
phase_names=()
phase_secs=()
phase_start=$SECONDS
phase() {
  if [ "${#phase_names[@]}" -gt 0 ]; then
    phase_secs+=("$((SECONDS - phase_start))")
  fi
  phase_start=$SECONDS
  [ "$#" -eq 0 ] || phase_names+=("$1")
}

phase install
scripts/install-deps.sh
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  step "rustup: adding rustfmt and clippy"
  rustup component add rustfmt clippy
fi

log="$(mktemp)"
# One line per test binary run, `SECONDS NAME`, written by scripts/test-runner.sh.
times="$(mktemp)"
# What the test build made (Cargo's JSON messages): the test binaries to run.
artifacts="$(mktemp)"
# Every temporary file the tests make lands here; whatever is left at the end was leaked.
scratch="$(mktemp -d)"
load=()
stop_load() {
  [ "${#load[@]}" -eq 0 ] || { kill "${load[@]}" 2>/dev/null || true; wait "${load[@]}" 2>/dev/null || true; }
  load=()
}
trap 'stop_load; rm -rf "$log" "$times" "$artifacts" "$scratch"' EXIT
failed_checks=0
status=0
host="$(rustc -vV | sed -n 's/^host: //p' | tr 'a-z-' 'A-Z_')"
export "CARGO_TARGET_${host}_RUNNER=$repo_root/scripts/test-runner.sh" NITROKEY_TEST_SCRATCH="$scratch" \
  NITROKEY_TEST_TIMES="$times"

if [ "$rounds" -gt 0 ]; then
  phase "test build"
  step "cargo test $*: building"
  cargo test --locked --no-run "$@" || failed_checks=$((failed_checks + 1))
  phase "tests (loaded)"
  for _ in $(seq "$(nproc)"); do
    sh -c 'while :; do :; done' &
    load+=("$!")
  done
  for round in $(seq "$rounds"); do
    step "cargo test $*: round $round of $rounds, ${#load[@]} busy processes beside it"
    TMPDIR="$scratch" cargo test --locked --no-fail-fast "$@" 2>&1 | tee -a "$log" || status=$?
  done
  stop_load
else
  phase fmt
  step "cargo fmt --check"
  cargo fmt --all -- --check || failed_checks=$((failed_checks + 1))
  phase clippy
  step "cargo clippy"
  # Without incremental caches: clippy checks every test target in the dev profile, and their
  # caches (one per target, about 0.5 GB in all) would outweigh what they save on a rerun.
  CARGO_INCREMENTAL=0 cargo clippy --workspace --all-targets --locked -- -D warnings ||
    failed_checks=$((failed_checks + 1))
  phase doc
  step "cargo doc"
  RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet || failed_checks=$((failed_checks + 1))
  phase "test build"
  step "cargo test: building"
  cargo test --workspace --locked --no-run --message-format=json-render-diagnostics "$@" \
    >"$artifacts" || failed_checks=$((failed_checks + 1))
  phase tests
  if [ "$#" -eq 0 ]; then
    # Every test binary, several at a time (scripts/run-tests.py says why that is safe), then
    # the doc tests, which only Cargo runs.
    step "cargo test: the test binaries"
    TMPDIR="$scratch" python3 scripts/run-tests.py "$artifacts" "$log" || status=$?
    step "cargo test --doc"
    TMPDIR="$scratch" cargo test --workspace --locked --doc 2>&1 | tee -a "$log" || status=$?
  else
    step "cargo test $*"
    TMPDIR="$scratch" cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
  fi
fi
if [ "$status" -ne 0 ] && ! grep -q '^test result: FAILED' "$log"; then
  # A test binary that did not build or crashed prints no result line: count it.
  failed_checks=$((failed_checks + 1))
fi
# What the tests left behind, as `test-binary/entry` (each test binary has its own directory,
# see scripts/test-runner.sh); anything at all fails the run.
find "$scratch" -mindepth 1 -maxdepth 1 -type d -empty -delete
leftovers="$({
  find "$scratch" -mindepth 1 -maxdepth 1 ! -type d -printf '  %P\n'
  find "$scratch" -mindepth 2 -maxdepth 2 -printf '  %P\n'
} | head -n 30)"
if [ -n "$leftovers" ]; then
  printf 'error: the tests left these behind in the temporary directory:\n%s\n' "$leftovers" >&2
  failed_checks=$((failed_checks + 1))
fi
phase
# Where the time went, then one closing line for the whole run.
summary=""
for i in "${!phase_names[@]}"; do
  summary+="${summary:+, }${phase_names[$i]} ${phase_secs[$i]} s"
done
echo "phases: $summary (total $SECONDS s)"
if [ -s "$times" ]; then
  echo "slowest test binaries: $(sort -rn "$times" | head -n 6 | awk '{printf "%s%s %d s", sep, $2, $1; sep=", "}')"
fi
echo "target/: $(du -sh target 2>/dev/null | cut -f1)"
# One closing line for the whole run (cargo prints one per test binary).
awk -v extra="$failed_checks" '/^test result:/ { passed += $4; failed += $6 }
  END { printf "tests: %d passed, %d failed\n", passed, failed + extra }' "$log"
[ "$status" -eq 0 ] && [ "$failed_checks" -eq 0 ]
