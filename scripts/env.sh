# Sourced by the other scripts: the tools they run come from here, in this order.
#
# - .venv/bin: the PyPI tools (bao, hadolint, kubectl, Helm's SDK) in a virtual environment the
#   scripts own, so nothing depends on whichever other Python happens to be on PATH;
# - ~/.cargo/bin: rustup's toolchain, which a fresh login shell may not have on PATH yet.
#
# Everything started from these scripts inherits the PATH, `cargo test` included: the tests
# spawn `bao`, `hadolint`, `kubectl` and `python3` (for Helm) and must find the venv's.

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
export PATH="$venv/bin:$HOME/.cargo/bin:$PATH"

# One line per step, so a first run reads as a short list rather than pages of output.
step() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The workspace's minimum Rust (`rust-version` in Cargo.toml).
required_rust() {
  sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$repo_root/Cargo.toml" | head -n1
}

# Fails with a one-line hint unless cargo and rustc >= the workspace's rust-version are on PATH.
check_rust() {
  local need have
  need="$(required_rust)"
  if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
    die "Rust >= $need is needed: install it with rustup (https://rustup.rs), then run this again"
  fi
  have="$(rustc --version | awk '{print $2}')"
  if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" != "$need" ]; then
    die "Rust $have is older than the $need this workspace needs: run \`rustup update stable\`"
  fi
}
