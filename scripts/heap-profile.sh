#!/usr/bin/env bash
# Where the router's memory goes: N services (default 10,000) x 2 instances on NODES nodes
# (default 5) in a Consul dev agent, the router under Debian's heaptrack until its table
# has been live for SETTLE seconds (default 20), then heaptrack's summary: the peak, what
# was still allocated at that point, and the sites that hold the most.
# The router is built with the system allocator (`--features system-alloc`; heaptrack sees
# malloc, not mimalloc) in the `profiling` profile (release, with line tables).
#
#   scripts/heap-profile.sh 10000
set -euo pipefail
cd "$(dirname "$0")/.."

SERVICES="${1:-10000}"
NODES="${NODES:-5}"
SETTLE="${SETTLE:-20}"
consul_bin="${CONSUL_BIN:-$(scripts/get-consul.sh)}"
if ! command -v heaptrack >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -qq heaptrack; } >/dev/null 2>&1 || true
fi
command -v heaptrack >/dev/null || { echo "heap-profile: heaptrack is needed (apt-get install heaptrack)" >&2; exit 1; }
cargo build --profile profiling --features system-alloc --locked --bin consul-router >&2
bin=target/profiling/consul-router

. scripts/lib.sh
CONSUL=$(free_port); ROUTER=$(free_port); ADMIN=$(free_port)
start_consul "$CONSUL"
echo "registering $SERVICES services x 2 instances on $NODES nodes..." >&2
catalog "$CONSUL" "$NODES" "$SERVICES" -1 passing 9

heaptrack -o "$work/heap" "$bin" --workers 1 --listen "127.0.0.1:$ROUTER" \
  --admin-listen "127.0.0.1:$ADMIN" --consul "http://127.0.0.1:$CONSUL" --domain scale.local >/dev/null 2>&1 &
ht=$!
for _ in $(seq 1 1200); do curl -fsS "127.0.0.1:$ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.05; done
sleep "$SETTLE"

# SIGKILL: the heap as it stands (a graceful stop would free the table first).
pkill -KILL -f "target/profiling/consul-router" || true
wait "$ht" 2>/dev/null || true
mkdir -p target/heap-profile
data=target/heap-profile/heaptrack.$SERVICES.zst
mv "$work"/heap*.zst "$data"
echo
echo "heap profile: $SERVICES services x 2 instances on $NODES nodes (the system allocator)"
echo "  data: $data (heaptrack_print -f $data, or heaptrack_gui)"
# The summary, then for the largest holders at the peak and at the end, the first frame of
# this crate that allocated (its own line, not the standard library's).
heaptrack_print -f "$data" --print-leaks 1 --print-peaks 1 --print-allocators 0 \
  --print-temporary 0 --print-histogram "" --print-flamegraph "" -n 12 2>/dev/null |
  awk '
    /^(PEAK MEMORY CONSUMERS|MEMORY LEAKS)/ { print; next }
    /(consumed|leaked) over [0-9]+ calls from:$/ { entry = $0; want = 1; next }
    /peak memory consumed over|leaked over/ { print "  " $0; next }
    want && /at src\// && !/src\/runtime|src\/task|src\/loom/ { print "    " entry "  <-  " prev " " $2; want = 0 }
    { prev = $1 }
    /^(total runtime|calls to allocation|temporary memory|peak heap memory|peak RSS|total memory leaked)/ { print }
  '
