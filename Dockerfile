# syntax=docker/dockerfile:1.7
#
# Two images from one build, one program each:
#   docker build --target device-plugin -t ghcr.io/nitrokey-vault/device-plugin:0.1.0 .
#   docker build --target unseal-init   -t ghcr.io/nitrokey-vault/unseal-init:0.1.0 .
# Without Docker, scripts/build-images.sh builds the same two images as OCI archives (mmdebstrap
# and buildah) and takes each runtime stage's LABEL, USER and ENTRYPOINT from this file: keep
# them as key="value" pairs, a numeric uid:gid and the JSON form.
# The device plugin only reads USB descriptors, so its image has no smart-card stack; unseal-init
# talks to the stick through OpenSC and pcscd. Each image's Debian packages are listed in
# deploy/image/<target>.packages and finished by deploy/image/setup.sh, the same files the
# root-filesystem test builds and runs (tests/tests/image_rootfs.rs).
#
# Base images are pinned by tag (Debian 12 "bookworm" for both stages, so the binaries link
# against the glibc they run with), not by digest: no registry is reachable where this file is
# checked. Pin `@sha256:...` digests in your build pipeline if it can resolve them.

FROM rust:1.95.0-slim-bookworm AS build

# Build inputs only: protoc for the kubelet API code generation, libusb/libudev headers for
# rusb (linked against the system libusb so hotplug uses udev). Package versions follow the
# base image's Debian release; exact version pins would break on every security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      pkg-config protobuf-compiler libusb-1.0-0-dev libudev-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Every workspace member must be present for cargo to load the workspace, even the
# test-only crates that are not built here.
COPY Cargo.toml Cargo.lock ./
COPY proto/ proto/
COPY common/ common/
COPY device-plugin/ device-plugin/
COPY unseal-init/ unseal-init/
COPY tests/ tests/
COPY workspace-hack/ workspace-hack/

RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p nitrokey-device-plugin -p nitrokey-unseal-init \
 && install -D -m 0755 target/release/device-plugin /out/device-plugin \
 && install -D -m 0755 target/release/unseal-init /out/unseal-init

FROM debian:bookworm-slim AS device-plugin

ARG REVISION=unknown
LABEL org.opencontainers.image.title="nitrokey-device-plugin" \
      org.opencontainers.image.description="Kubernetes device plugin advertising NitroKey HSM sticks as nitrokey.com/hsm" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/nitrokey-vault/nitrokey-vault" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

COPY deploy/image/device-plugin.packages deploy/image/setup.sh /tmp/image/
# A failing step inside the package-list pipe must fail the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && sed -e 's/#.*//' /tmp/image/device-plugin.packages | xargs apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* \
 && sh /tmp/image/setup.sh device-plugin \
 && rm -rf /tmp/image

COPY --from=build /out/device-plugin /usr/local/bin/device-plugin

# Non-root by default. The DaemonSet runs it as user 0 without any capability: the kubelet's
# socket directory is owned by root.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/device-plugin"]

FROM debian:bookworm-slim AS unseal-init

ARG REVISION=unknown
LABEL org.opencontainers.image.title="nitrokey-unseal-init" \
      org.opencontainers.image.description="Initialises and unseals Vault with keys protected by a NitroKey HSM (OpenSC, pcscd)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/nitrokey-vault/nitrokey-vault" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

COPY deploy/image/unseal-init.packages deploy/image/setup.sh /tmp/image/
# A failing step inside the package-list pipe must fail the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && sed -e 's/#.*//' /tmp/image/unseal-init.packages | xargs apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* \
 && sh /tmp/image/setup.sh unseal-init \
 && rm -rf /tmp/image

COPY --from=build /out/unseal-init /usr/local/bin/unseal-init

# Non-root by default. The Vault manifests run it as user 0 without any capability, because
# the stick's device node that the kubelet hands over is owned by root (deploy/README.md).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/unseal-init"]
