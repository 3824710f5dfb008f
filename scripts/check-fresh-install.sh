#!/usr/bin/env bash
# Proves that the README's install step works on a fresh, minimal Debian: builds a minimal root
# file system with mmdebstrap (cached as a zstd-compressed tarball), brings its libudev1 and
# libsystemd0 back to the security suite's version when that lags the point release (as most
# fresh cloud images do between point releases), and runs scripts/install-deps.sh inside it
# under chroot, with this machine's Rust toolchain bind-mounted read-only. Exits non-zero, with
# install-deps.sh's own message, if the install fails there.
#
#   scripts/check-fresh-install.sh [bookworm|trixie]
#
# Needs root (chroot, mounts) and the network to the Debian mirror and PyPI. The root tarball is
# kept in target/fresh-debian/ (NITROKEY_FRESH_ROOT_CACHE overrides it); each run unpacks a copy
# into a temporary directory and removes it, mounts included, however the run ends.
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"

suite="${1:-bookworm}"
case "$suite" in
  bookworm | trixie) ;;
  *) die "unknown suite '$suite': bookworm or trixie" ;;
esac
[ "$(id -u)" -eq 0 ] || die "this check needs root (chroot and bind mounts): run it with sudo"
command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap is missing: run scripts/install-deps.sh first"

cache_dir="${NITROKEY_FRESH_ROOT_CACHE:-$repo_root/target/fresh-debian}"
tarball="$cache_dir/$suite-lagging.tar.zst"
part="$cache_dir/$suite-lagging.part.tar.zst" # mmdebstrap compresses by the name's ending
mirror="http://deb.debian.org/debian"
security="http://deb.debian.org/debian-security"

# The root: what a minimal cloud image has (apt, ca-certificates, python3), with the update and
# security suites a real image lists and the package lists it has once it has been updated. The hook picks the security suite's libudev1 and, when it
# is older than the point release's, installs it (and the libsystemd0 built with it) in its
# place: the state in which pinning a -dev package to the installed runtime broke apt.
if [ ! -s "$tarball" ]; then
  mkdir -p "$cache_dir"
  step "fresh-install: building a minimal $suite root (once; cached in $cache_dir)"
  # shellcheck disable=SC2016 # $1 is the root, expanded by mmdebstrap's hook shell
  mmdebstrap --quiet --format=tar --variant=apt --skip=cleanup/apt/lists --include=ca-certificates,python3 \
    --customize-hook='chroot "$1" sh -c '"'"'
      old="$(apt-cache madison libudev1 | awk "/-security/ { print \$3; exit }")"
      new="$(dpkg-query -W -f="\${Version}" libudev1)"
      if [ -n "$old" ] && dpkg --compare-versions "$old" lt "$new"; then
        apt-get install -y -q --allow-downgrades "libudev1=$old" "libsystemd0=$old" >/dev/null
        echo "lagging: libudev1 $old (point release: $new)" >/etc/fresh-install-state
      else
        echo "current: libudev1 $new (the security suite has nothing older)" >/etc/fresh-install-state
      fi'"'" \
    "$suite" "$part" \
    "deb $mirror $suite main" "deb $mirror $suite-updates main" \
    "deb $security $suite-security main"
  mv "$part" "$tarball"
  rm -f "$cache_dir/$suite-lagging.tar" # the uncompressed cache of earlier versions
fi

work="$(mktemp -d)"
root="$work/root"
mounts=()
cleanup() {
  local i
  # Unmount in reverse order; lazily, so a process the install left running cannot keep a
  # mount (and with it the directory) behind.
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    umount -l "${mounts[$i]}" 2>/dev/null || true
  done
  # A bind mount still in place would make rm reach into the host's /dev or toolchain.
  if awk -v w="$work/" 'index($5, w) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
    printf 'error: mounts under %s are still in place; not removing it\n' "$work" >&2
    return
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$root"
tar --zstd -xf "$tarball" -C "$root"
step "fresh-install: $suite root, $(cat "$root/etc/fresh-install-state")"

bind() {
  local src="$1" dst="$root$2" opts="${3:-}"
  mkdir -p "$dst"
  mount --bind "$src" "$dst"
  mounts+=("$dst")
  if [ "$opts" = ro ]; then
    mount -o remount,bind,ro "$dst"
  fi
}
mkdir -p "$root/proc"
mount -t proc proc "$root/proc"
mounts+=("$root/proc")
bind /dev /dev
# The Rust toolchain, read-only at the same paths: the install step checks for it and never
# installs one.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
rustup_home="${RUSTUP_HOME:-$HOME/.rustup}"
bind "$cargo_home" "$cargo_home" ro
[ -d "$rustup_home" ] && bind "$rustup_home" "$rustup_home" ro

# What the host knows of the network: name resolution, and the CA bundle and pip settings that
# reach PyPI from here.
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
if [ -f /etc/pip.conf ]; then cp -L /etc/pip.conf "$root/etc/pip.conf"; fi
host_ca=/etc/ssl/certs/ca-certificates.crt
if [ -f "$host_ca" ]; then
  mkdir -p "$root/usr/local/share/host-ca"
  cp -L "$host_ca" "$root/usr/local/share/host-ca/ca-certificates.crt"
fi

# Only what install-deps.sh reads: the scripts and the workspace's rust-version.
mkdir -p "$root/src/scripts"
cp "$repo_root/Cargo.toml" "$root/src/"
cp "$repo_root/scripts/env.sh" "$repo_root/scripts/install-deps.sh" "$root/src/scripts/"

step "fresh-install: running scripts/install-deps.sh in the $suite root"
env_vars=(HOME="$HOME" PATH="$cargo_home/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  CARGO_HOME="$cargo_home" RUSTUP_HOME="$rustup_home" LANG=C.UTF-8)
if [ -f "$host_ca" ]; then
  env_vars+=(PIP_CERT=/usr/local/share/host-ca/ca-certificates.crt
    SSL_CERT_FILE=/usr/local/share/host-ca/ca-certificates.crt)
fi
# PyPI settings of this machine (an index or a local wheel directory) carry over; a wheel
# directory is bind-mounted read-only so pip finds it at the same path.
while IFS='=' read -r name value; do
  case "$name" in
    PIP_INDEX_URL | PIP_EXTRA_INDEX_URL | PIP_TRUSTED_HOST | PIP_DEFAULT_TIMEOUT) env_vars+=("$name=$value") ;;
    PIP_FIND_LINKS)
      if [ -d "$value" ]; then bind "$value" "$value" ro; fi
      env_vars+=("$name=$value")
      ;;
  esac
done < <(env)
chroot "$root" /usr/bin/env -i "${env_vars[@]}" /bin/bash /src/scripts/install-deps.sh
step "fresh-install: $suite installs"
