# Multi-stage build: a static-ish release binary on a small non-root image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin consul-router

FROM debian:bookworm-slim
RUN useradd --system --no-create-home --shell /usr/sbin/nologin consul-router
COPY --from=build /src/target/release/consul-router /usr/local/bin/consul-router
COPY config/consul-router.toml /etc/consul-router/consul-router.toml
USER consul-router
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/consul-router", "--config", "/etc/consul-router/consul-router.toml"]
CMD ["--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9090"]
