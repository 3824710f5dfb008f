#!/usr/bin/env bash
# Builds the two container images (device-plugin, unseal-init) as OCI archives without a
# container engine or daemon, from the same inputs as the Dockerfile: Debian bookworm plus
# deploy/image/<target>.packages, finished by deploy/image/setup.sh, plus the program, with the
# Dockerfile stage's labels, user and entrypoint. mmdebstrap builds the root filesystem, buildah
# assembles and writes the image; the test suite builds and runs the images through this script.
#
# Usage: scripts/build-images.sh [options] [device-plugin] [unseal-init]   (default: both)
#   --out DIR        where the archives go (default: dist/); one per image:
#                    DIR/<target>-<version>.oci.tar, named ghcr.io/nitrokey-vault/<target>:<version>
#   --bin-dir DIR    take the programs from DIR instead of running the release build
#                    (cargo build --release --locked) first; the tests pass their debug build
#   --cache DIR      root filesystem tarballs, reused while the package list, setup.sh and this
#                    script's mmdebstrap options are unchanged (default: target/image-rootfs)
#   --fast-compression  gzip level 1: larger archives, written faster (the tests use it)
#   --rootfs-only    build (or reuse) the root filesystem tarballs only and print their paths
#
# Needs root for mmdebstrap and buildah (it runs them through sudo when started as a user), and
# the Debian packages mmdebstrap and buildah (scripts/install-deps.sh installs them). Images are
# built for this machine's architecture; amd64 is the one built and tested.
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"

out="$repo_root/dist"
bin_dir=""
cache="$repo_root/target/image-rootfs"
compress=1
rootfs_only=0
targets=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
    --cache) cache="${2:?--cache needs a directory}"; shift 2 ;;
    --fast-compression) compress=0; shift ;;
    --rootfs-only) rootfs_only=1; shift ;;
    device-plugin|unseal-init) targets+=("$1"); shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see $0 --help)" ;;
  esac
done
[ "${#targets[@]}" -gt 0 ] || targets=(device-plugin unseal-init)
# buildah's oci-archive:PATH:NAME ends PATH at its first colon.
case "$out" in *:*) die "--out '$out' contains a colon, which an oci-archive path cannot" ;; esac

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
for tool in mmdebstrap tar sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing; to fix it, run: scripts/install-deps.sh"
done
[ "$rootfs_only" -eq 1 ] || command -v buildah >/dev/null 2>&1 \
  || die "buildah is missing; to fix it, run: scripts/install-deps.sh"

# Debian release of the Dockerfile's runtime stages; merged /usr set up by mmdebstrap's hook
# rather than the usrmerge package (which pulls in perl), as in Debian's own images; no
# recommended packages, as the Dockerfile's `apt-get install --no-install-recommends`; dpkg
# filters that keep documentation out as Debian's slim images do.
suite=bookworm
mmdebstrap_opts=(
  --quiet --variant=apt --format=tar
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --aptopt='APT::Install-Recommends "false"'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
)
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo_root/Cargo.toml")"
[ -n "$version" ] || die "no [workspace.package] version in Cargo.toml"

# The packages of one image, read as the Dockerfile reads them: comments and blanks dropped.
packages() {
  sed -e 's/#.*//' "$repo_root/deploy/image/$1.packages" | tr -s ' \t\n' '\n' | sed '/^$/d' | paste -sd, -
}

# Prints the path of TARGET's root filesystem tarball, building it with mmdebstrap when missing.
rootfs() {
  local target="$1" key tarball partial
  key="$( { printf '%s\n' "$suite" "${mmdebstrap_opts[@]}" "$(packages "$target")"
            cat "$repo_root/deploy/image/setup.sh"; } | sha256sum | cut -c1-16)"
  tarball="$cache/$target-$key.tar"
  if [ ! -s "$tarball" ]; then
    mkdir -p "$cache"
    partial="$(mktemp "$cache/.$target-XXXXXX.tar")"
    # shellcheck disable=SC2064 # the path is fixed now; an interrupted build leaves no partial file
    trap "${sudo[*]} rm -f '$partial'" EXIT
    step "$target: root filesystem (mmdebstrap $suite + $(packages "$target"))" >&2
    if ! "${sudo[@]}" mmdebstrap "${mmdebstrap_opts[@]}" --include="$(packages "$target")" \
        --customize-hook="copy-in $repo_root/deploy/image/setup.sh /tmp" \
        --customize-hook="chroot \"\$1\" sh /tmp/setup.sh $target" \
        --customize-hook="rm \"\$1/tmp/setup.sh\"" \
        "$suite" "$partial" >&2; then
      "${sudo[@]}" rm -f "$partial"
      die "mmdebstrap failed for $target; check that apt reaches its mirror: apt-get update"
    fi
    # Concurrent builds of the same list each rename a complete tarball into place.
    "${sudo[@]}" mv -f "$partial" "$tarball"
    trap - EXIT
    # Tarballs of older package lists are of no further use.
    find "$cache" -maxdepth 1 -name "$target-*.tar" ! -path "$tarball" -exec "${sudo[@]}" rm -f {} +
  fi
  printf '%s\n' "$tarball"
}

if [ "$rootfs_only" -eq 1 ]; then
  for target in "${targets[@]}"; do rootfs "$target"; done
  exit 0
fi

if [ -z "$bin_dir" ]; then
  check_rust
  step "release build (cargo build --release --locked)"
  (cd "$repo_root" && cargo build --release --locked -p nitrokey-device-plugin -p nitrokey-unseal-init)
  bin_dir="$repo_root/target/release"
fi
for target in "${targets[@]}"; do
  [ -x "$bin_dir/$target" ] || die "no $target program in $bin_dir (build it first: cargo build --release)"
done

# One instruction of the Dockerfile stage TARGET (continuation lines joined), e.g. LABEL.
stage_instruction() {
  awk -v target="$2" -v keyword="$1" '
    /^[[:space:]]*#/ { next }
    toupper($1) == "FROM" { in_stage = (tolower($NF) == target) }
    in_stage && (taking || toupper($1) == keyword) {
      taking = sub(/\\[[:space:]]*$/, "")
      line = line " " $0
      if (!taking) { print line; line = "" }
    }' "$repo_root/Dockerfile" | sed -e "s/^ *$1 *//I"
}

revision="$(git -C "$repo_root" rev-parse HEAD 2>/dev/null || echo unknown)"
store="$(mktemp -d "${TMPDIR:-/tmp}/build-images.XXXXXX")"
buildah=("${sudo[@]}" buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs)
cleanup() {
  "${buildah[@]}" rm --all >/dev/null 2>&1 || true
  "${sudo[@]}" rm -rf "$store"
}
trap cleanup EXIT
mkdir -p "$out"

for target in "${targets[@]}"; do
  tarball="$(rootfs "$target")"
  ref="ghcr.io/nitrokey-vault/$target:$version"
  archive="$out/$target-$version.oci.tar"
  step "$target: image $ref -> $archive"
  labels=()
  # key="value" pairs of the stage's LABEL, with the build argument REVISION filled in. The
  # base-image label is left out: this image starts from mmdebstrap's root, not from that image.
  while IFS= read -r pair; do
    key="${pair%%=*}" value="${pair#*=\"}" value="${value%\"}"
    [ "$key" = org.opencontainers.image.base.name ] && continue
    labels+=(--label "$key=${value//"\${REVISION}"/$revision}")
  done < <(stage_instruction LABEL "$target" | grep -o '[a-z.]*="[^"]*"')
  [ "${#labels[@]}" -gt 0 ] || die "no LABEL in the Dockerfile's $target stage"
  user="$(stage_instruction USER "$target" | tr -d ' ')"
  entrypoint="$(stage_instruction ENTRYPOINT "$target" | sed 's/^ *//')"
  if [ -z "$user" ] || [ -z "$entrypoint" ]; then
    die "no USER or ENTRYPOINT in the Dockerfile's $target stage"
  fi

  container="$("${buildah[@]}" from --name "$target" scratch)"
  mnt="$("${buildah[@]}" mount "$container")"
  # Device nodes stay out of the image: the runtime provides /dev.
  "${sudo[@]}" tar -xpf "$tarball" -C "$mnt" --numeric-owner --exclude='./dev/*'
  "${sudo[@]}" install -m 0755 "$bin_dir/$target" "$mnt/usr/local/bin/$target"
  "${buildah[@]}" umount "$container" >/dev/null
  "${buildah[@]}" config "${labels[@]}" --user "$user" --entrypoint "$entrypoint" --cmd '' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --workingdir / --created-by "scripts/build-images.sh" "$container"
  "${buildah[@]}" commit --quiet --format oci --rm "$container" "$ref" >/dev/null
  push=(push --quiet)
  [ "$compress" -eq 1 ] || push+=(--compression-level 1)
  rm -f "$archive"
  "${buildah[@]}" "${push[@]}" "$ref" "oci-archive:$archive:$ref"
  [ "${#sudo[@]}" -eq 0 ] || "${sudo[@]}" chown "$(id -u):$(id -g)" "$archive"
  printf '%s\n' "$archive"
done
