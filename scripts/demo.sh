#!/usr/bin/env bash
# The local end-to-end demo: installs what it needs, builds both programs and runs them against
# an emulated Nitrokey HSM (umockdev), a SoftHSM2 token, a kubelet stand-in and a real OpenBao
# server. No hardware, no cluster. Ctrl-C stops everything it started and exits 130.
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
cd "$repo_root"

# Ctrl-C while installing or building: say so, with the status a shell gives an interrupt.
trap 'echo; echo "interrupted" >&2; exit 130' INT
scripts/install-deps.sh
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
if [ -x "$target_dir/debug/demo" ]; then
  step "building"
  cargo build --locked --quiet -p nitrokey-device-plugin -p nitrokey-unseal-init -p nitrokey-e2e --bins
else
  # The first build compiles a few hundred crates: let cargo show how far it is.
  step "building (the first build takes a few minutes)"
  cargo build --locked -p nitrokey-device-plugin -p nitrokey-unseal-init -p nitrokey-e2e --bins
fi
exec "$target_dir/debug/demo"
