#!/usr/bin/env bash
# The 5-minute demo: builds what is missing, starts a Consul dev agent, eight example backends
# (two instances each of `hello`, `hello-ip`, `hello-url` and `hello-load`), each run and
# registered by `consul-router announce`, and consul-router on 127.0.0.1:8080 for
# *.app.example.net. It then makes one hello-load instance busy and shows least-load moving
# requests to the other, and prints curl lines to try; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

CONSUL_PORT="${CONSUL_PORT:-8500}"
LISTEN="${LISTEN:-127.0.0.1:8080}"
ADMIN="${ADMIN:-127.0.0.1:9090}"
# The backends listen on PORTS_FROM and the seven ports after it.
PORTS_FROM="${PORTS_FROM:-18101}"
consul_bin="${CONSUL_BIN:-$(scripts/get-consul.sh)}"
command -v curl >/dev/null || { echo "demo.sh: curl is needed" >&2; exit 1; }
cargo build --release --bin consul-router --example hello_backend
release="${CARGO_TARGET_DIR:-target}/release"
router="$release/consul-router"

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "demo: stopping"
  # Background jobs of a script ignore SIGINT, so stop them with TERM: the router and the
  # announces first (each deregisters its backend, then passes TERM on to it), Consul last.
  for p in "${pids[@]:1}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]:1}"; do wait "$p" 2>/dev/null || true; done
  [ ${#pids[@]} -eq 0 ] || kill -TERM "${pids[0]}" 2>/dev/null || true
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

# Each backend runs under `consul-router announce`, which registers it (service, ID, port,
# strategy tag), keeps its check passing, writes its load into Service Meta and deregisters
# it on the way out. Its log lines go to /tmp/consul-router-demo-announce.log.
port=$PORTS_FROM
announce() { # SERVICE STRATEGY INSTANCE [FLAGS...]
  local svc=$1 strategy=$2 n=$3
  shift 3
  "$router" announce --consul "$consul_url" --name "$svc" --id "$svc-$n" --port "$port" \
    --address 127.0.0.1 --tag "router.strategy=$strategy" "$@" \
    -- "$release/examples/hello_backend" "$svc-$n" "$port" \
    >/dev/null 2>>/tmp/consul-router-demo-announce.log &
  pids+=($!)
  port=$((port + 1))
}
: >/tmp/consul-router-demo-announce.log
for n in 1 2; do
  announce hello random "$n"
  announce hello-ip ip-hash "$n"
  # Consul runs an HTTP check on these two instead of announce's own TTL check.
  announce hello-url url-hash "$n" --check-http / --check-interval 2s
  # --min-gap 2s: the demo shows a load change within seconds (the default, 10 s, writes
  # to Consul less often).
  announce hello-load least-load "$n" --min-gap 2s
done
busy_port=$((PORTS_FROM + 3)) # hello-load-1

"$router" --consul "$consul_url" --listen "$LISTEN" --admin-listen "$ADMIN" \
  --domain app.example.net & pids+=($!)
for _ in $(seq 1 50); do curl -fsS "http://$ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.2; done

# Who answers 10 requests to hello-load, as "hello-load-1 x4, hello-load-2 x6".
tally() {
  for _ in $(seq 1 10); do
    curl -s -H 'Host: hello-load.app.example.net' "http://$LISTEN/" | awk '{print $3}'
  done | sort | uniq -c | awk '{printf "%s%s x%s", (NR > 1 ? ", " : ""), $2, $1} END {print ""}'
}
# The load hello-load-1 reports, from its Meta in Consul.
load_of_1() {
  curl -s "$consul_url/v1/agent/service/hello-load-1" | tr -d ' \n' | grep -o '"load":"[0-9]*"' | tr -dc 0-9
}
for _ in $(seq 1 50); do [ -n "$(load_of_1)" ] && break; sleep 0.2; done

echo
echo "demo: least-load. hello-load-1 reports load $(load_of_1); 10 requests to hello-load:"
echo "  $(tally)"
echo "demo: making hello-load-1 busy for 30 s: curl 127.0.0.1:$busy_port/busy?secs=30"
echo "  $(curl -s "http://127.0.0.1:$busy_port/busy?secs=30")"
for _ in $(seq 1 50); do
  [ "$(load_of_1)" -ge 10 ] 2>/dev/null && break
  sleep 0.2
done
sleep 1 # the router follows Consul within a second
echo "demo: hello-load-1 now reports load $(load_of_1); 10 requests to hello-load:"
echo "  $(tally)"

cat <<EOT

consul-router is up. Try:
  curl -H 'Host: hello.app.example.net' http://$LISTEN/            # random
  curl -H 'Host: hello-ip.app.example.net' -H 'X-Forwarded-For: 203.0.113.7' http://$LISTEN/   # ip-hash
  curl -H 'Host: hello-url.app.example.net' http://$LISTEN/some/page   # url-hash
  curl -H 'Host: hello-load.app.example.net' http://$LISTEN/       # least-load
  curl http://127.0.0.1:$busy_port/busy?secs=30                       # hello-load-1 busy again...
  for i in \$(seq 10); do curl -s -H 'Host: hello-load.app.example.net' http://$LISTEN/; done   # ...and avoided
  curl -s $consul_url/v1/agent/service/hello-load-1                  # its Meta: load, cpu, mem, procs
  curl -H 'Host: nope.app.example.net' http://$LISTEN/             # 404
  curl http://$ADMIN/api/routes                                      # the routing table
  curl http://$ADMIN/metrics                                         # Prometheus

Ctrl-C stops everything.
EOT
wait
