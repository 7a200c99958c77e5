# syntax=docker/dockerfile:1
# The two images: tollgate (the sidecar proxy) and payment-backend.
#
#   docker build --target tollgate        -t tollgate:0.1.0 .
#   docker build --target payment-backend -t payment-backend:0.1.0 .
#
# By default the `build` stage compiles both binaries on the official Rust
# image. With `--build-arg BINARIES=prebuilt` the runtime stages take them
# from the context's `dist/` folder instead (`--build-arg DIST=other` names
# another folder): for hosts that cannot pull the Rust image, or to ship the
# binaries a CI job already built (scripts/images.sh --prebuilt does this).
# The binaries must be built for x86_64 Linux against glibc ≤ 2.36 (Debian 12).
ARG RUST_VERSION=1.95.0
ARG BINARIES=build

# --- build: both binaries, release profile ----------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tollgate -p payment-backend \
    && mkdir /out \
    && cp target/release/tollgate target/release/payment-backend /out/

# --- prebuilt: binaries from the build context ------------------------------
FROM scratch AS prebuilt
ARG DIST=dist
COPY ${DIST}/tollgate ${DIST}/payment-backend /out/

FROM ${BINARIES} AS binaries

# --- certs: the CA roots (for rediss:// and TLS upstreams), nothing else ---
FROM debian:bookworm-slim AS certs
# Unpinned on purpose: the newest CA roots of the release are the right ones.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates

# --- runtime: what both images share ---------------------------------------
FROM debian:bookworm-slim AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
# The CA bundle alone (not openssl, which ca-certificates pulls in), and one
# fixed non-root user. Nothing at run time needs a shell: every command below
# is exec form.
COPY --from=certs /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin app
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Tollgate" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
USER 10001:10001

# --- tollgate ---------------------------------------------------------------
FROM runtime AS tollgate
LABEL org.opencontainers.image.title="tollgate" \
      org.opencontainers.image.description="A gRPC-aware HTTP/2 sidecar proxy that enforces global rate limits."
COPY --from=binaries /out/tollgate /usr/local/bin/tollgate
# The in-process limiter in front of 127.0.0.1:50051 (the backend in the same
# pod). Mount a directory over /etc/tollgate to replace it: tollgate reloads
# it when it changes. The admin port stays on loopback unless
# TOLLGATE_ADMIN_LISTEN (or the file) says otherwise; set
# TOLLGATE_LISTEN="" to take the listener address from the file.
COPY config/dev.yaml /etc/tollgate/tollgate.yaml
ENV TOLLGATE_CONFIG=/etc/tollgate/tollgate.yaml \
    TOLLGATE_LISTEN=0.0.0.0:10000
EXPOSE 10000 9901
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/tollgate", "health"]
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["run"]

# --- payment-backend --------------------------------------------------------
FROM runtime AS payment-backend
LABEL org.opencontainers.image.title="payment-backend" \
      org.opencontainers.image.description="A gRPC payment service: payments, captures, refunds, a double-entry ledger and a transactional outbox."
COPY --from=binaries /out/payment-backend /usr/local/bin/payment-backend
# The embedded default keeps payments in SQLite under /var/lib/payment-backend
# (a volume: the root filesystem may be read-only). Production sets
# PAYMENT_BACKEND_DATABASE_URL to PostgreSQL.
USER 0:0
RUN mkdir -p /var/lib/payment-backend && chown 10001:10001 /var/lib/payment-backend
USER 10001:10001
WORKDIR /var/lib/payment-backend
VOLUME ["/var/lib/payment-backend"]
ENV PAYMENT_BACKEND_DATABASE_URL=sqlite:///var/lib/payment-backend/payments.db \
    PAYMENT_BACKEND_LISTEN=0.0.0.0:50051 \
    PAYMENT_BACKEND_METRICS_LISTEN=0.0.0.0:9090
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/payment-backend", "health"]
ENTRYPOINT ["/usr/local/bin/payment-backend"]
CMD ["serve"]
