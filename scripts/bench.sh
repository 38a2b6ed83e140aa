#!/usr/bin/env bash
# Load benchmark on loopback: consul-router vs nginx vs HAProxy as reverse proxies to one
# origin (nginx). Each proxy gets one worker pinned to CPU 0; wrk and the origin share CPU 1.
# Rounds are interleaved so drift hits every proxy alike. Prints requests/s, p50/p99 latency
# and CPU time per request for each, and the ratios to nginx: "x nginx" for requests/s and
# "per core" for requests per CPU-second of the proxy. On two cores wrk and the origin often
# saturate CPU 1 before a proxy saturates CPU 0, so requests/s understates the difference
# between proxies and "per core" is the figure to compare.
#
#   scripts/bench.sh                 # all scenarios, 2 rounds of 10 s
#   ROUNDS=3 DURATION=15 scripts/bench.sh
#   SCENARIOS="small" scripts/bench.sh
#   BENCH_RAW=1 scripts/bench.sh     # also print every round's figures
#   ACCESS_LOG=json scripts/bench.sh # consul-router writes its access log (json|text) to a file
#   BASELINE=/path/to/old/consul-router scripts/bench.sh
#                                    # also runs an older build, interleaved, as "baseline"
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-2}"
DURATION="${DURATION:-10}"
SCENARIOS="${SCENARIOS:-small 1k 64k small-1000c}"
PROXY_CPU="${PROXY_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"

need() { command -v "$1" >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && apt-get install -y -qq "$2" >/dev/null; }; command -v "$1" >/dev/null || { echo "bench: needs $1 (apt-get install $2)" >&2; exit 1; }; }
need nginx nginx-light
need haproxy haproxy
need wrk wrk
consul_bin="${CONSUL_BIN:-$(scripts/get-consul.sh)}"
cargo build --release --locked --bin consul-router >&2

. scripts/lib.sh
# small-1000c needs about 2,000 descriptors in the router and 1,000 in wrk.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
ORIGIN=$(free_port); NGINX=$(free_port); HAPROXY=$(free_port); ROUTER=$(free_port); ADMIN=$(free_port); CONSUL=$(free_port)

# Origin: nginx, one worker, fixed bodies.
mkdir -p "$work/www" "$work/logs"
head -c 1024 /dev/zero | tr '\0' 'a' > "$work/www/1k"
head -c 65536 /dev/zero | tr '\0' 'a' > "$work/www/64k"
chmod 755 "$work" "$work/www"; chmod 644 "$work/www/"*  # nginx workers run as nobody
cat > "$work/origin.conf" <<EOF
worker_processes 1; daemon off; pid $work/origin.pid; error_log $work/logs/origin.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$ORIGIN; root $work/www;
    location = / { return 200 "ok\n"; }
    location / { } } }
EOF
cat > "$work/proxy.conf" <<EOF
worker_processes 1; daemon off; pid $work/proxy.pid; error_log $work/logs/proxy.err;
events { worker_connections 8192; }
http { access_log off; keepalive_requests 1000000;
  upstream origin { server 127.0.0.1:$ORIGIN; keepalive 1024; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NGINX;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host \$host; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme; proxy_buffering on; } } }
EOF
cat > "$work/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  option forwardfor
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAPROXY
  default_backend be
backend be
  server origin 127.0.0.1:$ORIGIN
EOF

taskset -c "$LOAD_CPU" nginx -c "$work/origin.conf" -p "$work" 2>/dev/null & pids+=($!)
taskset -c "$PROXY_CPU" nginx -c "$work/proxy.conf" -p "$work" 2>/dev/null & pids+=($!)
taskset -c "$PROXY_CPU" haproxy -f "$work/haproxy.cfg" -db >"$work/logs/haproxy.log" 2>&1 & pids+=($!)
start_consul "$CONSUL" "$LOAD_CPU"
curl -fsS -X PUT "127.0.0.1:$CONSUL/v1/agent/service/register" \
  -d "{\"ID\":\"origin-1\",\"Name\":\"origin\",\"Address\":\"127.0.0.1\",\"Port\":$ORIGIN}" >/dev/null
log_args=()
[ -n "${ACCESS_LOG:-}" ] && log_args=(--access-log "$ACCESS_LOG" --access-log-file "$work/logs/access.log")
RUST_LOG=warn taskset -c "$PROXY_CPU" target/release/consul-router --workers 1 "${log_args[@]}" \
  --listen "127.0.0.1:$ROUTER" --admin-listen "127.0.0.1:$ADMIN" \
  --consul "http://127.0.0.1:$CONSUL" --domain bench.local >/dev/null 2>&1 & pids+=($!)
router_pid=$!
proxies="nginx haproxy consul-router"
if [ -n "${BASELINE:-}" ]; then
  BASE=$(free_port); BASE_ADMIN=$(free_port)
  RUST_LOG=warn taskset -c "$PROXY_CPU" "$BASELINE" --workers 1 \
    --listen "127.0.0.1:$BASE" --admin-listen "127.0.0.1:$BASE_ADMIN" \
    --consul "http://127.0.0.1:$CONSUL" --domain bench.local >/dev/null 2>&1 & pids+=($!)
  base_pid=$!
  proxies="$proxies baseline"
  for _ in $(seq 1 100); do curl -fsS "127.0.0.1:$BASE_ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
fi
for _ in $(seq 1 100); do curl -fsS "127.0.0.1:$ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
sleep 0.5

pid_of() {
  case "$1" in
    nginx) pgrep -P "$(cat "$work/proxy.pid")" | head -1 ;;
    haproxy) pgrep -f "haproxy -f $work/haproxy.cfg" | tail -1 ;;
    consul-router) echo "$router_pid" ;;
    baseline) echo "$base_pid" ;;
  esac
}
port_of() { case "$1" in nginx) echo "$NGINX";; haproxy) echo "$HAPROXY";; consul-router) echo "$ROUTER";; baseline) echo "$BASE";; esac; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# Sanity: every proxy answers.
for p in $proxies; do
  for path in / /1k /64k; do
    curl -fsS -H 'Host: origin.bench.local' "127.0.0.1:$(port_of $p)$path" >/dev/null || { echo "bench: $p does not answer $path" >&2; cat "$work"/logs/* >&2; exit 1; }
  done
done

to_us() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us/,"",v); print v } else if (v ~ /ms$/) { sub(/ms/,"",v); print v*1000 } else if (v ~ /s$/) { sub(/s/,"",v); print v*1000000 } else print v }'; }

results="$work/results.tsv"
: > "$results"
for scenario in $SCENARIOS; do
  case "$scenario" in
    small) path=/; conns=64 ;;
    1k) path=/1k; conns=64 ;;
    64k) path=/64k; conns=64 ;;
    small-1000c) path=/; conns=1000 ;;
    *) echo "unknown scenario $scenario" >&2; exit 1 ;;
  esac
  for round in $(seq 1 "$ROUNDS"); do
    for p in $proxies; do
      pid=$(pid_of "$p"); before=$(cpu_ticks "$pid")
      out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" -d"${DURATION}s" --latency \
        -H 'Host: origin.bench.local' "http://127.0.0.1:$(port_of "$p")$path" 2>&1)
      after=$(cpu_ticks "$pid")
      rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
      reqs=$(awk '/requests in/ {print $1}' <<<"$out")
      p50=$(to_us "$(awk '$1=="50%" {print $2}' <<<"$out")")
      p99=$(to_us "$(awk '$1=="99%" {print $2}' <<<"$out")")
      errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
      [ -n "$reqs" ] && [ "$reqs" -gt 0 ] || { echo "bench: wrk failed for $p $scenario:" >&2; echo "$out" >&2; exit 1; }
      cpu_us=$(awk -v d=$((after-before)) -v hz="$hz" -v n="$reqs" 'BEGIN { printf "%.2f", d/hz*1e6/n }')
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$round" "$p" "$rps" "$p50" "$p99" "$cpu_us" >> "$results"
      [ -n "$errs" ] && echo "bench: $p $scenario: $errs" >&2
      [ -n "${BENCH_RAW:-}" ] && echo "$p $scenario round $round: rps=$rps p50=$p50 p99=$p99" >&2
      sleep 1
    done
  done
done

echo
echo "consul-router benchmark: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ //'), ${ROUNDS}x${DURATION}s per proxy and scenario"
echo "release binary: $(stat -c %s target/release/consul-router) bytes; router RSS now: $(awk '/VmRSS/ {print $2, $3}' /proc/$router_pid/status)"
[ -n "${ACCESS_LOG:-}" ] && echo "access log ($ACCESS_LOG): $(wc -l < "$work/logs/access.log") lines written"
awk -F'\t' -v proxies="$proxies" '
  { k=$1 SUBSEP $3; rps[k]+=$4; p50[k]+=$5; p99[k]+=$6; cpu[k]+=$7; n[k]++; sc[$1]=1 }
  END {
    printf "%-12s %-14s %10s %9s %9s %12s %9s %9s %9s\n", "scenario", "proxy", "req/s", "p50 us", "p99 us", "cpu us/req", "x nginx", "per core", "p99 x"
    split("small 1k 64k small-1000c", order, " ")
    for (i=1; i<=4; i++) { s=order[i]; if (!(s in sc)) continue
      np=split(proxies, ps, " ")
      base=s SUBSEP "nginx"
      for (j=1; j<=np; j++) { k=s SUBSEP ps[j]
        printf "%-12s %-14s %10.0f %9.0f %9.0f %12.2f %9.2f %9.2f %9.2f\n", s, ps[j], rps[k]/n[k], p50[k]/n[k], p99[k]/n[k], cpu[k]/n[k], (rps[k]/n[k])/(rps[base]/n[base]), (cpu[base]/n[base])/(cpu[k]/n[k]), (p99[k]/n[k])/(p99[base]/n[base]) } } }' "$results"
