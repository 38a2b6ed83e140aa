#!/usr/bin/env bash
# The 5-minute demo: builds what is missing, starts a Consul dev agent, two example backends
# registered as `hello` (and hello-ip, hello-url, hello-load), and consul-router on
# 127.0.0.1:8080 for *.app.example.net. Prints curl lines to try; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

CONSUL_PORT="${CONSUL_PORT:-8500}"
LISTEN="${LISTEN:-127.0.0.1:8080}"
ADMIN="${ADMIN:-127.0.0.1:9090}"
consul_bin="${CONSUL_BIN:-$(scripts/get-consul.sh)}"
cargo build --release --bin consul-router --example hello_backend

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "demo: stopping"
  # Background jobs of a script ignore SIGINT, so stop them with TERM.
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

consul_url="http://127.0.0.1:$CONSUL_PORT"
"$consul_bin" agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$CONSUL_PORT" \
  -dns-port -1 -grpc-port -1 -hcl 'ports { grpc_tls = -1 }' -log-level warn >/tmp/consul-router-demo-consul.log 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  leader=$(curl -fsS "$consul_url/v1/status/leader" 2>/dev/null || true)
  [ -n "$leader" ] && [ "$leader" != '""' ] && break
  sleep 0.2
done
echo "demo: Consul dev agent on $consul_url (UI: $consul_url/ui)"

target/release/examples/hello_backend hello-1 10 "$consul_url" & pids+=($!)
target/release/examples/hello_backend hello-2 1 "$consul_url" & pids+=($!)
sleep 1
target/release/consul-router --consul "$consul_url" --listen "$LISTEN" --admin-listen "$ADMIN" \
  --domain app.example.net & pids+=($!)
for _ in $(seq 1 50); do curl -fsS "http://$ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.2; done

cat <<EOT

consul-router is up. Try:
  curl -H 'Host: hello.app.example.net' http://$LISTEN/            # random
  curl -H 'Host: hello-ip.app.example.net' -H 'X-Forwarded-For: 203.0.113.7' http://$LISTEN/   # ip-hash
  curl -H 'Host: hello-url.app.example.net' http://$LISTEN/some/page   # url-hash
  curl -H 'Host: hello-load.app.example.net' http://$LISTEN/       # least-load (hello-2 reports less)
  curl -H 'Host: nope.app.example.net' http://$LISTEN/             # 404
  curl http://$ADMIN/api/routes                                      # the routing table
  curl http://$ADMIN/metrics                                         # Prometheus

Ctrl-C stops everything.
EOT
wait
