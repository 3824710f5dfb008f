#!/usr/bin/env bash
# Cargo's runner for test binaries when scripts/test.sh runs them: each binary gets a temporary
# directory of its own under $NITROKEY_TEST_SCRATCH, so whatever is left behind names the test
# binary that left it; how long it ran goes to $NITROKEY_TEST_TIMES (when set), for the summary.
set -u
bin="$1"
shift
name="$(basename "$bin")"
dir="${NITROKEY_TEST_SCRATCH:?}/$name"
mkdir -p "$dir"
if [ -z "${NITROKEY_TEST_TIMES:-}" ]; then
  TMPDIR="$dir" exec "$bin" "$@"
fi
start=$SECONDS
# Signals reach the binary as they would under exec: cargo signals the process group.
TMPDIR="$dir" "$bin" "$@"
status=$?
# Cargo names test binaries NAME-HASH: the hash says nothing to a reader.
printf '%d %s\n' "$((SECONDS - start))" "${name%-*}" >>"$NITROKEY_TEST_TIMES"
exit "$status"
