# tally's container image: a build stage with the Rust toolchain and libclang (RocksDB's bindgen),
# and a slim runtime stage with the stripped binary only, run as uid/gid 10001.
#
#   docker build -t tally .
#   docker run -v tally-data:/var/lib/tally -p 8080:8080 tally
#
# Base images are pinned to full version tags: rust 1.95.0 is the toolchain CI builds with (the
# repo's rust-toolchain.toml says "stable"; it is not copied in, so rustup uses the image's
# toolchain and downloads nothing), and the dated Debian bookworm slim of 2026-10-05 (same glibc as
# the build stage). They are not pinned by digest: no registry was reachable from where this was
# written, so a digest could not be verified. To pin one, take the index digest from
#   docker buildx imagetools inspect rust:1.95.0-bookworm
#   docker buildx imagetools inspect debian:bookworm-20261005-slim
# and write FROM <image>:<tag>@sha256:<digest>.
#
# Ports: 8080 is the public listener; 9090 is the admin listener (admin API, /metrics, /healthz,
# /readyz). Only 8080 is EXPOSEd, so `docker run -P` never publishes the admin port. See
# docs/runbook.md ("Container image") and deploy/kubernetes/tally.yaml.

FROM rust:1.95.0-bookworm AS build
# libclang for bindgen; Debian's own version for bookworm (pinning a point version breaks the build
# at the next point release, the dated base image already fixes the release).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# 1. Dependencies only: the manifest and stub targets (Cargo.toml names a bin, a test and two
#    benches whose files must exist). This layer, RocksDB's ~20 minutes of C++ included, is reused
#    until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
RUN mkdir -p src benches tests/api \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && for f in benches/hot_paths.rs benches/load/main.rs tests/api/main.rs; do echo 'fn main() {}' > "$f"; done \
 && cargo build --release --locked --bin tally \
 && rm -rf src

# 2. tally itself. The touch makes cargo rebuild the crate even when a file's mtime in the build
#    context is older than the stub's artifacts. Debug info is stripped here, in the image only
#    (Cargo.toml's release profile keeps line tables for local backtraces); the symbol table stays
#    so a panic's backtrace still names its functions.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin tally \
 && strip --strip-debug -o /tally target/release/tally \
 && /tally --version

FROM debian:bookworm-20261005-slim
RUN groupadd --system --gid 10001 tally \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tally --no-create-home \
      --shell /usr/sbin/nologin tally \
 && mkdir -p /var/lib/tally /etc/tally \
 && chown 10001:10001 /var/lib/tally \
 && chmod 0700 /var/lib/tally
COPY --from=build /tally /usr/local/bin/tally
USER 10001:10001
WORKDIR /var/lib/tally
# The admin listener binds all interfaces inside the container so that probes and Prometheus reach
# it on the pod or container IP; keep it off any public network (not EXPOSEd, no public Service).
ENV TALLY_DATA_DIR=/var/lib/tally/data \
    TALLY_PUBLIC_ADDR=0.0.0.0:8080 \
    TALLY_ADMIN_ADDR=0.0.0.0:9090
EXPOSE 8080
VOLUME ["/var/lib/tally"]
STOPSIGNAL SIGTERM
# For `docker run` and compose: liveness from /healthz on the admin port, with bash's /dev/tcp (the
# slim image has no curl). Kubernetes ignores HEALTHCHECK and uses the manifest's probes. Change
# the port here if the config moves the admin listener.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r _ code _ <&3 && [ \"$code\" = 200 ]"]
ENTRYPOINT ["/usr/local/bin/tally"]
# Mount a config at /etc/tally/tally.toml and run `serve --config /etc/tally/tally.toml`; without
# one, tally runs on its built-in defaults and the TALLY_* variables.
CMD ["serve"]
