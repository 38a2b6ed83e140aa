#!/usr/bin/env bash
# Counts how often `consul-router announce` writes to Consul with the default write policy,
# for three apps side by side on one Consul dev agent, and prints writes per hour:
# - idle: `sleep`;
# - steady: 40 % of a CPU, every second (a busy app with even traffic);
# - bursty: 0 to 80 % of a CPU, a new level every 5 s (a busy app with uneven traffic).
# A write is a registration or a load write (each a full re-register); announce logs one
# line for each. DURATION (seconds, default 600) sets the run's length.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${DURATION:-600}"
consul_bin="${CONSUL_BIN:-$(scripts/get-consul.sh)}"
source scripts/lib.sh
cargo build --release --bin consul-router
router="${CARGO_TARGET_DIR:-target}/release/consul-router"

port=$(free_port)
start_consul "$port"
# `burn D`: keeps one CPU busy for 0.D s.
burn='burn() { [ "$1" -gt 0 ] && timeout "0.$1" sh -c "while :; do :; done"; return 0; }'
declare -A apps=(
  [idle]='exec sleep 100000'
  [steady]="$burn; while :; do burn 4; sleep 0.6; done"
  [bursty]="$burn; while :; do d=\$(( \$(od -An -N1 -tu1 /dev/urandom) % 9 )); i=0; while [ \$i -lt 5 ]; do burn \$d; sleep 0.\$((10 - d)); i=\$((i + 1)); done; done"
)
for app in idle steady bursty; do
  "$router" announce --consul "http://127.0.0.1:$port" --name "$app" --port 3000 \
    -- sh -c "${apps[$app]}" 2>"$work/$app.log" &
  pids+=($!)
done
echo "announce-writes: three apps for $DURATION s (CPUs: $(nproc))"
sleep "$DURATION"
# The registration and the first load come at start; the rate is of the writes after them.
for app in idle steady bursty; do
  n=$(grep -cE ' registered | written ' "$work/$app.log" || true)
  echo "$app: $n writes in $DURATION s: 2 at start, then $(((n - 2) * 3600 / DURATION)) per hour"
done
