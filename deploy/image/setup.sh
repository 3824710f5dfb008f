#!/bin/sh
# Finishes a runtime image after its packages (the .packages file next to this script) are
# installed: the non-root user, and for unseal-init the OpenSC module at the path Bank-Vaults
# configs use, pcscd's socket directory and the init journal's directory. The Dockerfile runs it,
# and so does scripts/build-images.sh, which builds the same root filesystem with mmdebstrap (the
# images without Docker, and the tests' root filesystems), so the two cannot drift.
# Usage: setup.sh device-plugin|unseal-init
set -eu

case "${1:-}" in
  device-plugin|unseal-init) ;;
  *) echo "usage: $0 device-plugin|unseal-init" >&2; exit 2 ;;
esac

groupadd --system --gid 65532 nitrokey
useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
  --shell /usr/sbin/nologin nitrokey

if [ "$1" = unseal-init ]; then
  # Resolved for whatever architecture the image is built for.
  for module in /usr/lib/*-linux-gnu/opensc-pkcs11.so; do
    ln -s "$module" /usr/lib/opensc-pkcs11.so
  done
  test -e /usr/lib/opensc-pkcs11.so
  # pcscd's socket and pid file; the manifests mount an emptyDir here.
  install -d -m 0755 -o 65532 -g 65532 /run/pcscd
  # The init write-ahead journal (journalDir); the manifests mount a persistent volume here.
  install -d -m 0700 -o 65532 -g 65532 /var/lib/unseal-init
fi
