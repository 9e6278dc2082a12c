# Multi-stage build: the bundled RocksDB needs a C++ compiler and libclang at build time only.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libclang-dev clang && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tally && cp target/release/tally /usr/local/bin/tally

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home /var/lib/tally tally && mkdir -p /var/lib/tally /etc/tally && chown tally /var/lib/tally
COPY --from=build /usr/local/bin/tally /usr/local/bin/tally
USER tally
WORKDIR /var/lib/tally
ENV TALLY_DATA_DIR=/var/lib/tally/data \
    TALLY_PUBLIC_ADDR=0.0.0.0:8080 \
    TALLY_ADMIN_ADDR=0.0.0.0:9090
EXPOSE 8080 9090
VOLUME ["/var/lib/tally"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tally"]
# Mount a config at /etc/tally/tally.toml and run `serve --config /etc/tally/tally.toml`.
CMD ["serve"]
