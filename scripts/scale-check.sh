#!/usr/bin/env bash
# Scale check against a real Consul dev agent: N services (default 2,000), one instance each.
# Reports the router's idle CPU, memory, connections to Consul, and how long a health change
# takes to reach the routing table, for a service with its own watch (hot) and one without
# (cold).
#
#   scripts/scale-check.sh            # 2,000 services
#   SERVICES=500 IDLE=10 scripts/scale-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SERVICES="${SERVICES:-2000}"
[ "$SERVICES" -gt 70 ] || { echo "scale-check: SERVICES must exceed max_watches (64) to have cold services" >&2; exit 1; }
IDLE="${IDLE:-65}"  # over one sweep_interval (60 s)
consul_bin="${CONSUL_BIN:-$(scripts/get-consul.sh)}"
cargo build --release --locked --bin consul-router >&2

. scripts/lib.sh
CONSUL=$(free_port); ROUTER=$(free_port); ADMIN=$(free_port); BACKEND=$(free_port)

start_consul "$CONSUL"
python3 -m http.server "$BACKEND" --bind 127.0.0.1 --directory "$work" >/dev/null 2>&1 & pids+=($!)

echo "registering $SERVICES services..." >&2
seq 0 $((SERVICES - 1)) | xargs -P 8 -I{} curl -fsS -X PUT "127.0.0.1:$CONSUL/v1/agent/service/register" \
  -d "{\"ID\":\"svc{}-a\",\"Name\":\"svc{}\",\"Address\":\"127.0.0.1\",\"Port\":$BACKEND,\"Meta\":{\"load\":\"1\"},\"Check\":{\"CheckID\":\"svc{}-ttl\",\"TTL\":\"30m\",\"Status\":\"passing\"}}"

RUST_LOG=warn target/release/consul-router --workers 1 --listen "127.0.0.1:$ROUTER" \
  --admin-listen "127.0.0.1:$ADMIN" --consul "http://127.0.0.1:$CONSUL" --domain scale.local >/dev/null 2>&1 & pids+=($!)
router=$!
t0=$(date +%s.%N)
for _ in $(seq 1 600); do curl -fsS "127.0.0.1:$ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
live=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')

host() { echo "svc$1.scale.local"; }
status() { curl -s -o /dev/null -w '%{http_code}' -H "Host: $(host "$1")" "127.0.0.1:$ROUTER/"; }
[ "$(status 0)" = 200 ] || { echo "scale-check: svc0 not routed" >&2; exit 1; }
# The cold service gets no request before its measurement (a request would make it hot).
cold_i=$((SERVICES - 1))
routes=$(curl -fsS "127.0.0.1:$ADMIN/api/routes")
grep -q "\"svc$cold_i.scale.local\"" <<<"$routes" || { echo "scale-check: svc$cold_i not in the table" >&2; exit 1; }

# Make svc0 hot: traffic, then wait for the watched set to be re-chosen (every 5 s).
for _ in $(seq 1 20); do status 0 >/dev/null; done
sleep 6

conns() { ss -tnp 2>/dev/null | grep "pid=$router," | grep -c ":$CONSUL " || true; }
ticks() { awk '{print $14+$15}' "/proc/$router/stat"; }
c0=$(ticks); sleep "$IDLE"; c1=$(ticks)
cpu=$(awk -v d=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v s="$IDLE" 'BEGIN{printf "%.2f", d/hz/s*100}')
rss=$(awk '/VmRSS/ {print $2/1024}' "/proc/$router/status")
open=$(conns)

# Health change visibility: flip a check to critical and time until the router answers 503.
visible_ms() {
  local i=$1 start end
  start=$(date +%s%N)
  curl -fsS -X PUT "127.0.0.1:$CONSUL/v1/agent/check/update/svc$i-ttl" -d '{"Status":"critical"}' >/dev/null
  while [ "$(status "$i")" != 503 ]; do
    [ $(( ($(date +%s%N) - start) / 1000000 )) -gt 10000 ] && { echo ">10000"; return; }
    sleep 0.01
  done
  end=$(date +%s%N)
  echo $(( (end - start) / 1000000 ))
}
hot=$(visible_ms 0)
cold=$(visible_ms "$cold_i")

echo
echo "scale check: $SERVICES services in a Consul dev agent, $(nproc) cores"
echo "  first table live after:            ${live} s"
echo "  router idle CPU over ${IDLE} s:         ${cpu} %"
echo "  router RSS:                        ${rss} MB"
echo "  connections to Consul (idle):      ${open}"
echo "  health change visible, hot svc:    ${hot} ms"
echo "  health change visible, cold svc:   ${cold} ms"
