# syntax=docker/dockerfile:1.7
#
# One image, two programs: /usr/local/bin/device-plugin (DaemonSet) and
# /usr/local/bin/unseal-init (native sidecar in the Vault pod). The image has no default
# program: every manifest names the one it runs in `command`.
#
# Build:  docker build -t ghcr.io/nitrokey-vault/nitrokey-vault:0.1.0 .
# Both stages use Debian 12 (bookworm) so the binaries link against the glibc they run with.

FROM rust:1.95.0-slim-bookworm AS build

# Build inputs only: protoc for the kubelet API code generation, libusb/libudev headers for
# rusb (linked against the system libusb so hotplug uses udev). Package versions follow the
# pinned base image's Debian release; exact version pins would break on every security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      pkg-config protobuf-compiler libusb-1.0-0-dev libudev-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Every workspace member must be present for cargo to load the workspace, even the
# test-only crate that is not built here.
COPY Cargo.toml Cargo.lock ./
COPY proto/ proto/
COPY device-plugin/ device-plugin/
COPY unseal-init/ unseal-init/
COPY tests/ tests/

RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p nitrokey-device-plugin -p nitrokey-unseal-init \
 && install -D -m 0755 target/release/device-plugin /out/device-plugin \
 && install -D -m 0755 target/release/unseal-init /out/unseal-init

FROM debian:bookworm-slim

ARG REVISION=unknown
LABEL org.opencontainers.image.title="nitrokey-vault" \
      org.opencontainers.image.description="NitroKey HSM device plugin and Vault unseal/init sidecar for Kubernetes" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/nitrokey-vault/nitrokey-vault" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

# Runtime: libusb/libudev for the device plugin; OpenSC's PKCS#11 module, pcscd and the CCID
# driver for talking to the stick; CA certificates for a TLS Vault and the Kubernetes API.
# The module is also linked at /usr/lib/opensc-pkcs11.so, the path Bank-Vaults configs use,
# resolved for whatever architecture the image is built for.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates libusb-1.0-0 libudev1 opensc pcscd libccid \
 && rm -rf /var/lib/apt/lists/* \
 && for module in /usr/lib/*-linux-gnu/opensc-pkcs11.so; do ln -s "$module" /usr/lib/opensc-pkcs11.so; done \
 && test -e /usr/lib/opensc-pkcs11.so \
 && groupadd --system --gid 65532 nitrokey \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin nitrokey \
 && install -d -m 0755 -o 65532 -g 65532 /run/pcscd

COPY --from=build /out/device-plugin /usr/local/bin/device-plugin
COPY --from=build /out/unseal-init /usr/local/bin/unseal-init

# Non-root by default. The device plugin (socket in the kubelet's root-owned directory) and
# unseal-init (USB device node handed over by the kubelet, owned by root) override this in
# their manifests, with every capability dropped.
USER 65532:65532
CMD ["/usr/local/bin/unseal-init", "--help"]
