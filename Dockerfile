# consul-router on an empty image: the static binary from scripts/build-static.sh (musl,
# stripped, about 7 MB) and the sample configuration, run as an unprivileged numeric user.
# The build stage's musl-tools and target are installed here for layer caching; the script
# would add them itself.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY . .
RUN scripts/build-static.sh

FROM scratch
COPY --from=build /src/target/static/consul-router /consul-router
COPY config/consul-router.toml /etc/consul-router/consul-router.toml
# scratch has no /etc/passwd: a numeric uid and gid (65532, "nonroot" in distroless).
USER 65532:65532
EXPOSE 8080 9090
# No curl in the image: the binary probes its own /healthz (200 once the first routing table
# is live), answering within Docker's timeout.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["/consul-router", "health", "--admin", "http://127.0.0.1:9090", "--timeout", "2s"]
# The listeners are fixed here, so a mounted configuration or other arguments cannot move the
# admin port away from the health check. Arguments to `docker run` replace CMD:
#   docker run IMAGE --consul http://consul:8500 --domain app.example.net
ENTRYPOINT ["/consul-router", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9090"]
CMD ["--config", "/etc/consul-router/consul-router.toml"]
