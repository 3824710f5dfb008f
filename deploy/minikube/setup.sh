#!/usr/bin/env bash
# Passes a NitroKey HSM stick through to a VirtualBox minikube VM, loads the project's images and
# deploys the device plugin and the single-node Vault example. Safe to run again: each step
# checks its state first and only acts when needed; every step is verified before the next one
# starts.
#
# Usage: deploy/minikube/setup.sh            (PIN for the vault-hsm-pin Secret from HSM_PIN,
#                                             or asked for when it does not exist yet)
# Env:   MINIKUBE_PROFILE (default minikube), HSM_VENDOR_ID (0x20a0), HSM_PRODUCT_ID (0x4230),
#        HSM_PIN, SKIP_DEPLOY=1 (USB passthrough only), KUBECTL (default "minikube kubectl --"),
#        SKIP_IMAGES=1 (pull the images instead of loading dist/'s archives, built when missing
#        by scripts/build-images.sh)
#
# No node is patched by hand: the device plugin advertises nitrokey.com/hsm by itself.
set -euo pipefail

# grep that reads all of its input: `cmd | grep -q` stops reading at the first match, and the
# writer's SIGPIPE then fails the whole pipeline under pipefail.
matches() { grep -c "$@" >/dev/null; }

profile="${MINIKUBE_PROFILE:-minikube}"
vendor="${HSM_VENDOR_ID:-0x20a0}"
product="${HSM_PRODUCT_ID:-0x4230}"
filter_name="Nitrokey HSM"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
read -r -a kubectl <<<"${KUBECTL:-minikube -p $profile kubectl --}"

step() { printf '==> %s\n' "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

for tool in VBoxManage minikube; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"
done

# VirtualBox reports its USB ids as 4-digit hex without 0x; lsusb prints vvvv:pppp.
vid="$(printf '%04x' "$((vendor))")"
pid="$(printf '%04x' "$((product))")"

vm_state() {
  VBoxManage showvminfo "$profile" --machinereadable 2>/dev/null | sed -n 's/^VMState="\(.*\)"$/\1/p'
}

stop_vm() {
  if [ "$(vm_state)" = "running" ]; then
    step "stopping minikube so the VM can be modified"
    minikube -p "$profile" stop >/dev/null
    [ "$(vm_state)" != "running" ] || die "the VM '$profile' is still running after minikube stop"
    ok "VM stopped"
  fi
}

step "1. VirtualBox Extension Pack (USB 2.0 EHCI)"
if VBoxManage list extpacks | matches '^Usable: *true'; then
  ok "$(VBoxManage list extpacks | sed -n 's/^Pack no\. *[0-9]*: *//p' | head -n1) is usable"
else
  die "no usable Extension Pack: install the Oracle VM VirtualBox Extension Pack matching $(VBoxManage --version), then re-run"
fi

step "2. minikube VM '$profile' with the virtualbox driver"
if ! VBoxManage showvminfo "$profile" >/dev/null 2>&1; then
  [ "$(minikube config get driver 2>/dev/null || true)" = "virtualbox" ] || minikube config set driver virtualbox
  minikube -p "$profile" start --driver=virtualbox
fi
VBoxManage showvminfo "$profile" >/dev/null 2>&1 || die "VM '$profile' does not exist after minikube start"
ok "VM exists"

step "3. USB 2.0 (EHCI) controller on the VM"
if VBoxManage showvminfo "$profile" --machinereadable | matches '^ehci="on"'; then
  ok "already on"
else
  stop_vm
  VBoxManage modifyvm "$profile" --usb on --usbehci on
  VBoxManage showvminfo "$profile" --machinereadable | matches '^ehci="on"' || die "EHCI is still off"
  ok "enabled"
fi

step "4. USB filter for ${vid}:${pid}"
filters="$(VBoxManage showvminfo "$profile" --machinereadable | grep -ci "^USBFilterVendorId[0-9]*=\"${vid}\"" || true)"
if [ "$filters" -ge 1 ] && VBoxManage showvminfo "$profile" --machinereadable | matches -i "^USBFilterProductId[0-9]*=\"${pid}\""; then
  ok "filter present"
else
  stop_vm
  # Index 0: first in the list; an index of 1 fails on a VM without filters.
  VBoxManage usbfilter add 0 --target "$profile" --name "$filter_name" --vendorid "$vid" --productid "$pid"
  VBoxManage showvminfo "$profile" --machinereadable | matches -i "^USBFilterVendorId[0-9]*=\"${vid}\"" \
    || die "the USB filter was not recorded"
  ok "filter added"
fi

step "5. minikube running"
if [ "$(vm_state)" != "running" ] || ! minikube -p "$profile" status >/dev/null 2>&1; then
  minikube -p "$profile" start --driver=virtualbox
fi
ok "running"

step "6. the stick is visible inside the VM (lsusb ${vid}:${pid})"
found=""
for attempt in $(seq 1 30); do
  if minikube -p "$profile" ssh -- lsusb 2>/dev/null | matches -i "${vid}:${pid}"; then found=1; break; fi
  [ "$attempt" != 1 ] || echo "    plug in the NitroKey HSM now (waiting up to 60 s)"
  sleep 2
done
[ -n "$found" ] || die "no ${vid}:${pid} device in the VM: plug the stick in (after the VM started) and re-run"
ok "$(minikube -p "$profile" ssh -- lsusb | grep -i "${vid}:${pid}" | tr -d '\r')"

if [ "${SKIP_DEPLOY:-0}" = 1 ]; then
  step "SKIP_DEPLOY=1: USB passthrough done, nothing deployed"
  exit 0
fi

step "7. images (device-plugin, unseal-init) in the cluster"
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo_root/Cargo.toml")"
if [ "${SKIP_IMAGES:-0}" = 1 ]; then
  ok "SKIP_IMAGES=1: the cluster pulls the images the manifests name"
else
  archives=("$repo_root/dist/device-plugin-$version.oci.tar" "$repo_root/dist/unseal-init-$version.oci.tar")
  if [ ! -f "${archives[0]}" ] || [ ! -f "${archives[1]}" ]; then
    { [ "$(uname -s)" = Linux ] && command -v mmdebstrap >/dev/null 2>&1 && command -v buildah >/dev/null 2>&1; } \
      || die "no image archives in dist/: build them on Debian with scripts/build-images.sh and copy dist/ here, or set SKIP_IMAGES=1 to pull them from a registry"
    "$repo_root/scripts/build-images.sh"
  fi
  images_dir="$(mktemp -d)"
  trap 'rm -rf "$images_dir"' EXIT
  for archive in "${archives[@]}"; do
    target="$(basename "$archive" "-$version.oci.tar")"
    ref="ghcr.io/nitrokey-vault/$target:$version"
    load="$archive"
    # minikube's Docker runtime loads a docker-archive with any Docker version; skopeo converts.
    if command -v skopeo >/dev/null 2>&1; then
      load="$images_dir/$target.docker.tar"
      skopeo copy --quiet "oci-archive:$archive" "docker-archive:$load:$ref"
    fi
    minikube -p "$profile" image load "$load"
    minikube -p "$profile" image ls | matches -F "$ref" || die "$ref is not in the cluster after minikube image load"
    ok "$ref loaded"
  done
  rm -rf "$images_dir"
  trap - EXIT
fi

step "8. device plugin"
"${kubectl[@]}" apply -k "$repo_root/deploy/base/device-plugin" >/dev/null
"${kubectl[@]}" -n nitrokey-system rollout status daemonset/nitrokey-device-plugin --timeout=180s
node="$("${kubectl[@]}" get nodes -o jsonpath='{.items[0].metadata.name}')"
capacity=""
for _ in $(seq 1 30); do
  capacity="$("${kubectl[@]}" get node "$node" -o jsonpath='{.status.allocatable.nitrokey\.com/hsm}')"
  [ -n "$capacity" ] && [ "$capacity" != 0 ] && break
  sleep 2
done
{ [ -n "$capacity" ] && [ "$capacity" != 0 ]; } || die "node $node advertises no nitrokey.com/hsm; see: kubectl -n nitrokey-system logs ds/nitrokey-device-plugin"
ok "node $node: nitrokey.com/hsm allocatable = $capacity"

step "9. Vault example (namespace vault)"
"${kubectl[@]}" apply -f - >/dev/null <<NS
apiVersion: v1
kind: Namespace
metadata:
  name: vault
NS
# Secrets are written to files only in a private directory that is removed on exit, and
# handed to kubectl as files: never on a command line (process list, shell history).
secrets_dir="$(umask 077 && mktemp -d)"
trap 'rm -rf "$secrets_dir"' EXIT
if "${kubectl[@]}" -n vault get secret vault-hsm-pin >/dev/null 2>&1; then
  ok "Secret vault-hsm-pin exists"
else
  pin="${HSM_PIN:-}"
  if [ -z "$pin" ]; then
    read -r -s -p "    user PIN of the stick: " pin; echo
  fi
  [ -n "$pin" ] || die "no PIN given (set HSM_PIN)"
  printf '%s' "$pin" >"$secrets_dir/pin"
  unset pin
  "${kubectl[@]}" -n vault create secret generic vault-hsm-pin --from-file=pin="$secrets_dir/pin" >/dev/null
  ok "Secret vault-hsm-pin created"
fi
if "${kubectl[@]}" -n vault get secret vault-tls >/dev/null 2>&1; then
  ok "Secret vault-tls exists"
else
  # A private CA for this cluster only: Vault's certificate names 127.0.0.1 (unseal-init in
  # the pod) and the Services. For production use your CA or deploy/components/cert-manager.
  (
    cd "$secrets_dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj "/CN=vault-ca" -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=vault" \
      -keyout tls.key -out tls.csr 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' \
      "IP:127.0.0.1,DNS:vault,DNS:vault.vault.svc,DNS:*.vault-internal,DNS:*.vault-internal.vault.svc" >ext.cnf
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
      -extfile ext.cnf -out tls.crt 2>/dev/null
  ) || die "could not make a certificate for Vault with openssl"
  "${kubectl[@]}" -n vault create secret generic vault-tls --from-file="$secrets_dir/tls.crt" \
    --from-file="$secrets_dir/tls.key" --from-file="$secrets_dir/ca.crt" >/dev/null
  ok "Secret vault-tls created (a private CA for this cluster)"
fi
"${kubectl[@]}" apply -k "$repo_root/deploy/overlays/vault-single" >/dev/null
"${kubectl[@]}" -n vault rollout status statefulset/vault --timeout=300s
ok "Vault is unsealed and ready"
echo
echo "Logs:   ${kubectl[*]} -n vault logs vault-0 -c unseal-init"
echo "Status: ${kubectl[*]} -n vault exec vault-0 -c vault -- vault status"
