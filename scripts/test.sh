#!/usr/bin/env bash
# Runs every test, installing what they need first: a real `consul` binary, built once from
# the Go module proxy and cached (scripts/get-consul.sh), Debian's nginx and prometheus, and
# the static release binary (scripts/build-static.sh, which installs musl-tools). The tests
# start their own Consul dev agents, backends and Prometheus servers on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "test.sh: Rust (cargo) is needed" >&2; exit 1; }
# nginx (tests/nginx_front.rs runs the shipped site config in front of a router).
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -qq nginx-light; } >/dev/null 2>&1 || true
fi
# Prometheus and promtool (tests/prometheus.rs checks the alert rules, /metrics and the
# dashboard's queries with them); not the node exporter it recommends.
if ! command -v promtool >/dev/null && [ ! -x /usr/bin/promtool ] && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } >/dev/null 2>&1 || true
fi
# HAProxy (tests/listener.rs puts it in front with send-proxy and send-proxy-v2).
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ] && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy; } >/dev/null 2>&1 || true
fi
CONSUL_BIN="${CONSUL_BIN:-$(scripts/get-consul.sh)}"
export CONSUL_BIN
echo "test.sh: using $("$CONSUL_BIN" version | head -1) at $CONSUL_BIN"
# The static release binary for tests/static_binary.rs, built once here rather than inside
# `cargo test` (a fat-LTO build: minutes when not fresh). If it fails, that test builds it
# again itself and shows why.
if static_bin="$(scripts/build-static.sh)"; then
  CONSUL_ROUTER_STATIC_BIN="$(realpath "$static_bin")"
  export CONSUL_ROUTER_STATIC_BIN
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --no-fail-fast "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (the last binary cargo runs may hold no test).
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$rc"
