#!/usr/bin/env bash
# The local end-to-end demo: installs what it needs, builds both programs and runs them against
# an emulated Nitrokey HSM (umockdev), a SoftHSM2 token, a kubelet stand-in and a real OpenBao
# server. No hardware, no cluster. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
echo "==> building (first build takes a few minutes)"
cargo build --locked --quiet -p nitrokey-device-plugin -p nitrokey-unseal-init -p nitrokey-e2e --bins
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
exec "$target_dir/debug/demo"
