# syntax=docker/dockerfile:1
#
# elb-exporter container image.
#
#   docker build -t elb-exporter:0.1.0 .
#   docker run --rm elb-exporter:0.1.0 --version
#   docker run --rm -p 8087:8087 -v "$PWD/clouds.yml:/etc/elb-exporter/clouds.yml:ro" elb-exporter:0.1.0
# (docs/DEPLOY.md: push to SWR and deploy with deploy/.)
#
# Two stages:
#   1. builder  - the Rust toolchain on Debian bookworm compiles a release binary with the committed Cargo.lock
#                 (--locked: a stale lock file fails the build instead of silently resolving new versions).
#   2. runtime  - distroless cc-debian12 (glibc, libgcc_s, tzdata; no shell, no package manager),
#                 running as the unprivileged "nonroot" user (uid/gid 65532).
# The binary links only glibc and libgcc_s (TLS is rustls), so no OpenSSL is needed at build or run time.
# Trust roots do not come from the image: the cloud endpoints are verified against the Mozilla roots compiled
# into the binary (reqwest's rustls-tls feature = webpki-roots) plus `cloud.ca_file` when set, and the
# Kubernetes API against the service account's ca.crt (only a kubeconfig without a CA would fall back to the
# system store). The image's /etc/ssl/certs is not read for the cloud, so a private CA goes in `cloud.ca_file`. Building on bookworm keeps the glibc the binary is linked
# against (2.36) the same as the runtime image's.

# Base images, pinned by digest so a rebuild uses exactly the reviewed images (a tag can move). Both are build
# arguments: where Docker Hub / gcr.io cannot be reached (e.g. builds in mainland China), pull the same images
# through a mirror registry and pass its references with their digests (`crane copy` / `skopeo copy --all` keep
# the digest; an image re-pushed with `docker push` gets a new one - use the digest the mirror reports):
#   docker build \
#     --build-arg RUST_IMAGE=swr.cn-east-3.myhuaweicloud.com/<org>/rust:1.95-bookworm@sha256:<digest> \
#     --build-arg RUNTIME_IMAGE=swr.cn-east-3.myhuaweicloud.com/<org>/distroless-cc-debian12:nonroot@sha256:<digest> \
#     -t elb-exporter:0.1.0 .
# To update a pin: `docker buildx imagetools inspect rust:1.95-bookworm` (or `crane digest ...`) prints the
# digest of the multi-platform index; use that one, not a per-platform manifest's.
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

########################################################################################################################
FROM ${RUST_IMAGE} AS builder

WORKDIR /build

# 1) Dependency layer: only the manifests, with placeholder sources. This layer (all crates.io downloads and
#    dependency compilation) is rebuilt only when Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && mkdir -p benches/scale \
 && echo 'fn main() {}' > benches/scale/main.rs \
 && echo 'fn main() {}' > benches/align.rs \
 && echo 'fn main() {}' > benches/handover.rs \
 && cargo build --release --locked \
 && rm -rf src

# 2) The real sources. COPY keeps the build context's modification times, which may be older than the
#    placeholder build above; touch them so cargo's mtime-based fingerprints always rebuild the crate itself
#    (without it cargo can keep the empty placeholder binary). The --version check fails the build if it did.
#    (If a build.rs is ever added to the crate, COPY it here too.)
COPY src ./src
RUN find src -type f -name '*.rs' -exec touch {} + \
 && cargo build --release --locked \
 && install -D -m 0755 target/release/elb-exporter /out/elb-exporter \
 && test -n "$(/out/elb-exporter --version)"

########################################################################################################################
FROM ${RUNTIME_IMAGE}

LABEL org.opencontainers.image.title="elb-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Huawei Cloud ELB listener metrics (Cloud Eye), labelled with the Kubernetes Service"

COPY --from=builder /out/elb-exporter /usr/local/bin/elb-exporter

# "nonroot" in the distroless image; numeric so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532

EXPOSE 8087

ENTRYPOINT ["/usr/local/bin/elb-exporter"]
CMD ["--config", "/etc/elb-exporter/clouds.yml"]
