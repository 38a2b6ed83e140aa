#!/usr/bin/env bash
# Scale check against a real Consul dev agent: N services (default 2,000), each with two
# instances on a handful of nodes (NODES, default 5), registered through Consul's catalog API
# as a team's hosts would carry them. Two services get traffic; the rest stay idle.
# Prints how long the first table takes, the router's memory, idle CPU and /metrics size,
# its connections to Consul, and how long a health change takes to reach the routing table
# for a service with its own watch (hot) and one without (cold).
#
#   scripts/scale-check.sh              # 2,000 services
#   scripts/scale-check.sh 10000        # 10,000 services
#   IDLE=10 NODES=3 scripts/scale-check.sh 500
#   BIN=/path/to/consul-router scripts/scale-check.sh 10000   # another build
set -euo pipefail
cd "$(dirname "$0")/.."

SERVICES="${1:-${SERVICES:-2000}}"
NODES="${NODES:-5}"
[ "$SERVICES" -gt 70 ] || { echo "scale-check: the number of services must exceed max_watches (64) to have cold services" >&2; exit 1; }
IDLE="${IDLE:-65}"  # over one sweep_interval (60 s)
consul_bin="${CONSUL_BIN:-$(scripts/get-consul.sh)}"
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --bin consul-router >&2
  BIN=target/release/consul-router
fi

. scripts/lib.sh
CONSUL=$(free_port); ROUTER=$(free_port); ADMIN=$(free_port); BACKEND=$(free_port)

start_consul "$CONSUL"
python3 -m http.server "$BACKEND" --bind 127.0.0.1 --directory "$work" >/dev/null 2>&1 & pids+=($!)

echo "registering $SERVICES services x 2 instances on $NODES nodes..." >&2
catalog "$CONSUL" "$NODES" "$SERVICES" -1 passing "$BACKEND"

RUST_LOG=warn "$BIN" --workers 1 --listen "127.0.0.1:$ROUTER" \
  --admin-listen "127.0.0.1:$ADMIN" --consul "http://127.0.0.1:$CONSUL" --domain scale.local >/dev/null 2>&1 & pids+=($!)
router=$!
t0=$(date +%s.%N)
for _ in $(seq 1 1200); do curl -fsS "127.0.0.1:$ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.05; done
live=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')

host() { echo "svc$1.scale.local"; }
status() { curl -s -o /dev/null -w '%{http_code}' -H "Host: $(host "$1")" "127.0.0.1:$ROUTER/"; }
[ "$(status 0)" = 200 ] || { echo "scale-check: svc0 not routed" >&2; exit 1; }
# The cold service gets no request before its measurement (a request would make it hot).
cold_i=$((SERVICES - 1))
routes=$(curl -fsS "127.0.0.1:$ADMIN/api/routes")
grep -q "\"svc$cold_i.scale.local\"" <<<"$routes" || { echo "scale-check: svc$cold_i not in the table" >&2; exit 1; }

# Two services carry traffic; svc0 also becomes hot (the watched set is re-chosen every 5 s).
for _ in $(seq 1 20); do status 0 >/dev/null; status 1 >/dev/null; done
sleep 6

conns() { ss -tnp 2>/dev/null | grep "pid=$router," | grep -c ":$CONSUL " || true; }
ticks() { awk '{print $14+$15}' "/proc/$router/stat"; }
c0=$(ticks); sleep "$IDLE"; c1=$(ticks)
cpu=$(awk -v d=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v s="$IDLE" 'BEGIN{printf "%.2f", d/hz/s*100}')
rss=$(awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$router/status")
hwm=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$router/status")
open=$(conns)
metrics=$(curl -fsS "127.0.0.1:$ADMIN/metrics")
lines=$(wc -l <<<"$metrics")
series=$(grep -vc '^#' <<<"$metrics")

# Health change visibility: set a service's checks to critical and time until it answers 503.
visible_ms() {
  local i=$1 start end
  start=$(date +%s%N)
  catalog "$CONSUL" "$NODES" "$SERVICES" "$i" critical "$BACKEND"
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
echo "scale check: $SERVICES services x 2 instances on $NODES nodes, a Consul dev agent, $(nproc) cores"
echo "  first table live after:            ${live} s"
echo "  router idle CPU over ${IDLE} s:         ${cpu} %"
echo "  router RSS (peak):                 ${rss} MB (${hwm} MB)"
echo "  /metrics, 2 services with traffic: ${lines} lines, ${series} series"
echo "  connections to Consul (idle):      ${open}"
echo "  health change visible, hot svc:    ${hot} ms"
echo "  health change visible, cold svc:   ${cold} ms"
