#!/usr/bin/env bash
# Cargo's runner for test binaries when scripts/test.sh runs them: each binary gets a temporary
# directory of its own under $NITROKEY_TEST_SCRATCH, so whatever is left behind names the test
# binary that left it.
set -u
bin="$1"
shift
dir="${NITROKEY_TEST_SCRATCH:?}/$(basename "$bin")"
mkdir -p "$dir"
TMPDIR="$dir" exec "$bin" "$@"
