#!/usr/bin/env bash
# Soak test on loopback (not in the default test run): 10,000 mostly slow keep-alive
# connections and a hundred fast ones through consul-router for DURATION seconds while
# backends are killed and restarted, an instance flaps, Consul restarts, the configuration
# is reloaded and the router restarts through socket activation. Every answer is checked.
#
# Pieces (all release builds, made once; all processes stopped on exit):
# - Consul: one server with a data directory (-server -bootstrap-expect=1), not -dev, so
#   its registrations survive its restart as a production agent's do; with -dev the
#   catalog would come back empty and every service would vanish from the router until
#   re-registered, which tests the script, not the router.
# - Backends: examples/hello_backend, three instances each of the services alpha and beta
#   (hosts alpha.soak.local, beta.soak.local). They carry no check, so a killed instance
#   stays in the table and only the router's retry keeps its requests from failing.
#   beta-3 has a TTL check that the script turns passing/critical every FLAP seconds.
# - Load: examples/soak_load. CONNS slow connections (a request every 5-20 s, its head
#   written in three pieces 300 ms apart), FAST fast ones (FAST_RATE requests/s each,
#   closing after every 50th request, so connections come and go all along) and
#   H2 HTTP/2 connections (h2c, 8 request loops each at FAST_RATE), opened over 10 s. Each answer must be 200 from an instance of the host's service and
#   echo the request's path.
# - Router: under systemd-socket-activate, which holds the listening socket and runs a
#   loop that starts the router again whenever it exits (systemd's restart of a
#   socket-activated service), each start with LISTEN_PID set to the router's own pid.
#   A build without socket activation (no LISTEN_FDS in the binary) runs directly and the
#   restart step says it was skipped.
#
# Events, at fractions of DURATION: kill -9 alpha-1 (0.12, back 6 s later), beta-3 flaps
# (0.17-0.83), Consul stopped and started again on the same ports (0.25, down 3 s), kill -9
# beta-1 (0.38), SIGHUP with a changed proxy.response_timeout (0.46), router restart: SIGTERM,
# the old process drains and exits, the next one takes the same socket (0.58), kill -9
# alpha-2 (0.79).
#
# A failure a retry could have saved (must be 0): a connect the router refused; the
# connection closed or reset after the request began and before any byte of its answer
# (every request is an idempotent GET; on HTTP/2, a stream that failed before its answer,
# unless hyper handed the request back unsent); or a 502 the router gave after a refused
# connection to a backend (it should have tried another instance: counted from the
# router's debug line "no backend answer ... (connect_refused)"). A close between requests
# on a kept-alive connection is not a failure: the client notices it and reconnects.
# Other failures (timeouts, 503, 504, wrong bodies, cuts in the middle of an answer) are
# listed by reason and time, and do not change the exit status.
#
# File descriptors and RSS of the router are sampled every second: start (5 s after every
# connection had its first answer), peak, end (after the load stopped and the connections
# closed); a restarted router gets its own row, its start taken once the slow clients had
# time to come back (SLOW_MAX + 2 s after it was ready). Exit status 1 when a retry could
# have saved a failure or the last router's end exceeds 1.1 x its start (fds or RSS).
#
#   scripts/soak.sh                      # 240 s, 10,000 slow + 100 fast connections
#   DURATION=180 CONNS=2000 scripts/soak.sh
#   SOAK_LOGS=/tmp/soak-logs scripts/soak.sh   # keep every process's log there
#   BIN=/path/to/consul-router scripts/soak.sh  # another build of the router
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-240}"
CONNS="${CONNS:-10000}"
FAST="${FAST:-100}"
FAST_RATE="${FAST_RATE:-10}"
SLOW_MAX="${SLOW_MAX:-20}"
FLAP="${FLAP:-3}"
H2="${H2:-4}"
[ "$DURATION" -ge 120 ] || { echo "soak: DURATION must be at least 120 s" >&2; exit 1; }
command -v curl >/dev/null || { echo "soak: curl is needed" >&2; exit 1; }
consul_bin="${CONSUL_BIN:-$(scripts/get-consul.sh)}"
# One build for the three: the router then has the dev-dependencies' features (tokio's
# test-util), which change nothing it does here.
cargo build --release --locked --bin consul-router --example hello_backend --example soak_load >&2
release="${CARGO_TARGET_DIR:-target}/release"
router_bin="${BIN:-$release/consul-router}"
backend_bin="$release/examples/hello_backend"
load_bin="$release/examples/soak_load"

. scripts/lib.sh
# The load generator and the router each hold a descriptor per connection.
need_fds=$((CONNS + FAST + 2000))
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge "$need_fds" ] || { echo "soak: needs $need_fds file descriptors, ulimit -Hn allows $(ulimit -Hn)" >&2; exit 1; }

mkdir -p "$work/logs" "$work/consul"
ROUTER=$(free_port); ADMIN=$(free_port); CONSUL=$(free_port)
CONSUL_SERVER=$(free_port); CONSUL_LAN=$(free_port); CONSUL_WAN=$(free_port)
now() { date +%s.%N; }
event() { printf '%s\t%s\n' "$(now)" "$*" >> "$work/events"; echo "soak: $*" >&2; }
mark() { printf '%s\t%s\n' "$1" "$(now)" >> "$work/marks"; }
: > "$work/events"; : > "$work/marks"

consul_pid=
start_consul_server() {
  "$consul_bin" agent -server -bootstrap-expect=1 -data-dir "$work/consul" -node soak \
    -bind 127.0.0.1 -client 127.0.0.1 -http-port "$CONSUL" -server-port "$CONSUL_SERVER" \
    -serf-lan-port "$CONSUL_LAN" -serf-wan-port "$CONSUL_WAN" -dns-port -1 -grpc-port -1 \
    -hcl 'ports { grpc_tls = -1 }' -hcl 'performance { raft_multiplier = 1 }' \
    -log-level warn >> "$work/logs/consul.log" 2>&1 &
  consul_pid=$!
  wait_leader "$CONSUL"
}
stop_consul() {
  [ -n "$consul_pid" ] || return 0
  kill -TERM "$consul_pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$consul_pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$consul_pid" 2>/dev/null || true
  wait "$consul_pid" 2>/dev/null || true
  consul_pid=
}

# Backends: NAME -> port and pid.
declare -A port_of pid_of
start_backend() {
  "$backend_bin" "$1" "${port_of[$1]}" >> "$work/logs/backend-$1.log" 2>&1 &
  pid_of[$1]=$!
  for _ in $(seq 1 50); do curl -fsS -o /dev/null "127.0.0.1:${port_of[$1]}/" 2>/dev/null && return 0; sleep 0.1; done
  echo "soak: backend $1 does not answer" >&2
  return 1
}
register() { # NAME [CHECK JSON]
  local svc=${1%-*} check=${2:+,\"Check\":$2}
  curl -fsS -X PUT "127.0.0.1:$CONSUL/v1/agent/service/register" \
    -d "{\"ID\":\"$1\",\"Name\":\"$svc\",\"Address\":\"127.0.0.1\",\"Port\":${port_of[$1]}$check}" >/dev/null
}
BACKENDS="alpha-1 alpha-2 alpha-3 beta-1 beta-2 beta-3"
for b in $BACKENDS; do port_of[$b]=$(free_port); done

# The router's file; the reload changes response_timeout.
write_config() { # RESPONSE_TIMEOUT
  cat > "$work/router.toml" <<EOF
listen = "127.0.0.1:$ROUTER"
admin_listen = "127.0.0.1:$ADMIN"
domains = ["soak.local"]
[consul]
address = "http://127.0.0.1:$CONSUL"
[proxy]
response_timeout = "$1"
shutdown_grace = "5s"
EOF
}
# "no backend answer" lines say why a request got a 502.
router_env=(RUST_LOG="info,consul_router::proxy::h1=debug,consul_router::proxy::h2=debug")
activation=
grep -q LISTEN_FDS "$router_bin" && command -v systemd-socket-activate >/dev/null && activation=1

router_loop_pid=
start_router() {
  if [ -n "$activation" ]; then
    # The loop runs in place of systemd-socket-activate (which execs it with the socket
    # as fd 3 and LISTEN_PID set to its own pid); each router gets its own pid instead.
    cat > "$work/router-loop.sh" <<'EOF'
while [ ! -e "$SOAK_STOP" ]; do
  bash -c 'echo $$ > "$SOAK_PIDFILE"; export LISTEN_PID=$$; exec "$@"' router "$@"
  echo "soak: router exited with status $?" >&2
done
EOF
    systemd-socket-activate -l "127.0.0.1:$ROUTER" --fdname=http \
      -E SOAK_STOP="$work/stop" -E SOAK_PIDFILE="$work/router.pid" -E "${router_env[0]}" \
      bash "$work/router-loop.sh" "$router_bin" --config "$work/router.toml" >> "$work/logs/router.log" 2>&1 &
    router_loop_pid=$!
    # systemd-socket-activate starts its command at the first connection: this one.
    curl -s -o /dev/null --max-time 30 "127.0.0.1:$ROUTER/" &
  else
    env "${router_env[@]}" "$router_bin" --config "$work/router.toml" >> "$work/logs/router.log" 2>&1 &
    echo $! > "$work/router.pid"
  fi
}
router_pid() { cat "$work/router.pid" 2>/dev/null || true; }
wait_healthy() {
  for _ in $(seq 1 300); do curl -fsS -o /dev/null "127.0.0.1:$ADMIN/healthz" 2>/dev/null && return 0; sleep 0.1; done
  echo "soak: the router is not healthy after 30 s" >&2
  tail -20 "$work/logs/router.log" >&2
  return 1
}

sampler_pid=; flapper_pid=; load_pid=
soak_cleanup() {
  touch "$work/stop" 2>/dev/null || true
  for p in $sampler_pid $flapper_pid $load_pid; do kill "$p" 2>/dev/null || true; done
  local r; r=$(router_pid)
  [ -n "$r" ] && kill -TERM "$r" 2>/dev/null || true
  [ -n "$router_loop_pid" ] && kill -TERM "$router_loop_pid" 2>/dev/null || true
  for b in $BACKENDS; do [ -n "${pid_of[$b]:-}" ] && kill "${pid_of[$b]}" 2>/dev/null || true; done
  stop_consul
  if [ -n "${SOAK_LOGS:-}" ]; then mkdir -p "$SOAK_LOGS" && cp -r "$work/logs" "$work/events" "$work/marks" "$work/samples" "$SOAK_LOGS/" 2>/dev/null || true; fi
  cleanup
}
trap soak_cleanup EXIT

start_consul_server
for b in $BACKENDS; do start_backend "$b"; done
for b in $BACKENDS; do
  case "$b" in
    beta-3) register "$b" "{\"CheckID\":\"beta-3-ttl\",\"TTL\":\"60s\",\"Status\":\"passing\"}" ;;
    *) register "$b" ;;
  esac
done
write_config 10s
start_router
wait_healthy
for h in alpha beta; do
  for _ in $(seq 1 50); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $h.soak.local" "127.0.0.1:$ROUTER/")" = 200 ] && break
    sleep 0.2
  done
done

# Every second: time, pid, fds, RSS (kB) of whichever router runs.
(
  while :; do
    p=$(router_pid)
    if [ -n "$p" ] && [ -d "/proc/$p" ]; then
      f=$(ls -U "/proc/$p/fd" 2>/dev/null | wc -l)
      r=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
      [ -n "$r" ] && printf '%s\t%s\t%s\t%s\n' "$(now)" "$p" "$f" "$r"
    fi
    sleep 1
  done
) > "$work/samples" &
sampler_pid=$!
sleep 2
mark idle

t0=$(now)
"$load_bin" --target "127.0.0.1:$ROUTER" --host alpha.soak.local=alpha --host beta.soak.local=beta \
  --slow "$CONNS" --fast "$FAST" --fast-rate "$FAST_RATE" --slow-max "$SLOW_MAX" --h2 "$H2" \
  --duration "$DURATION" > "$work/load.out" 2> >(tee "$work/logs/load.log" >&2) &
load_pid=$!
at() { # FRACTION: sleeps until that fraction of DURATION after the load began
  local until; until=$(awk -v t="$t0" -v f="$1" -v d="$DURATION" 'BEGIN {printf "%.3f", t + f * d}')
  local left; left=$(awk -v u="$until" -v n="$(now)" 'BEGIN {l = u - n; printf "%.3f", (l > 0 ? l : 0)}')
  sleep "$left"
}
for _ in $(seq 1 600); do grep -q "^warm" "$work/load.out" 2>/dev/null && break; kill -0 "$load_pid" 2>/dev/null || break; sleep 0.1; done
grep -q '^warm' "$work/load.out" || echo "soak: not every connection had an answer within 60 s; taking the start sample now" >&2
sleep 5
mark start
event "warm: every connection had an answer; start sample"

kill_backend() { # NAME: kill -9, then start it again 6 s later
  event "kill -9 $1"
  kill -KILL "${pid_of[$1]}" 2>/dev/null || true
  wait "${pid_of[$1]}" 2>/dev/null || true
  sleep 6
  start_backend "$1"
  event "$1 started again"
}

at 0.12; kill_backend alpha-1
at 0.17
(
  s=fail
  while :; do
    curl -fsS -X PUT -o /dev/null "127.0.0.1:$CONSUL/v1/agent/check/$s/beta-3-ttl" 2>/dev/null || true
    if [ "$s" = fail ]; then s=pass; else s=fail; fi
    sleep "$FLAP"
  done
) &
flapper_pid=$!
event "beta-3 starts to flap (its TTL check critical/passing every $FLAP s)"
at 0.25
event "Consul stopped"
stop_consul
sleep 3
start_consul_server
event "Consul started again (has a leader)"
at 0.38; kill_backend beta-1
at 0.46
write_config 11s
kill -HUP "$(router_pid)"
event "SIGHUP: proxy.response_timeout 10s -> 11s"
at 0.58
if [ -n "$activation" ]; then
  old=$(router_pid)
  event "router restart: SIGTERM to $old (the socket stays open in systemd-socket-activate)"
  kill -TERM "$old"
  for _ in $(seq 1 300); do [ "$(router_pid)" != "$old" ] && break; sleep 0.1; done
  wait_healthy
  mark "ready $(router_pid)"
  event "router restarted: new pid $(router_pid) healthy"
else
  event "router restart through socket activation: SKIPPED (this build reads no LISTEN_FDS, or no systemd-socket-activate)"
fi
at 0.79; kill_backend alpha-2
at 0.83
kill "$flapper_pid" 2>/dev/null || true; flapper_pid=
curl -fsS -X PUT -o /dev/null "127.0.0.1:$CONSUL/v1/agent/check/pass/beta-3-ttl" || true
event "beta-3 stops flapping (passing)"

wait "$load_pid" || { echo "soak: the load generator failed" >&2; exit 1; }
load_pid=
event "load stopped"
# The connections are closed; the router's idle backend connections go after
# proxy.idle_timeout (4 s).
sleep 8
mark end
# mimalloc gives freed pages back with MADV_FREE: the kernel takes them when it needs
# memory, and until then they still count in VmRSS (LazyFree in smaps_rollup).
lazy_end=$(awk '/^LazyFree/ {print $2}' "/proc/$(router_pid)/smaps_rollup" 2>/dev/null || true)
sleep 1.5
kill "$sampler_pid" 2>/dev/null || true; sampler_pid=

# The report.
refused502=$(grep 'no backend answer' "$work/logs/router.log" | grep -c 'connect_refused' || true)
all502=$(grep -c 'no backend answer' "$work/logs/router.log" || true)
result=$(grep '^RESULT' "$work/load.out")
val() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<" $result"; }
savable=$(( $(val savable) + refused502 ))
echo
echo "soak: ${DURATION} s, $CONNS slow + $FAST fast HTTP/1.1 connections + $H2 HTTP/2, alpha and beta x 3 instances, $(nproc) cores"
echo "events (seconds since the load began):"
awk -F'\t' -v t0="$t0" '{printf "  %6.1f  %s\n", $1 - t0, $2}' "$work/events"
grep -v '^warm\|^RESULT' "$work/load.out"
echo "  router answers without a backend answer (502/504, router log): $all502, of which after a refused connection: $refused502"
echo "failures a retry could have saved: $savable (must be 0)"
echo "router (fds, RSS MB; start 5 s after warm-up, end after the load and its connections ended):"
awk -F'\t' -v m="$work/marks" -v smax="$SLOW_MAX" '
  BEGIN { while ((getline l < m) > 0) { split(l, a, "\t"); split(a[1], k, " ")
            if (k[1] == "ready") ready[k[2]] = a[2]; else mark[k[1]] = a[2] } }
  { t = $1; p = $2; if (!(p in first)) { first[p] = t; order[++n] = p }
    last[p] = t; lf[p] = $3; lr[p] = $4
    if ($3 > pf[p]) pf[p] = $3; if ($4 > pr[p]) pr[p] = $4
    s = (p in ready) ? ready[p] + smax + 2 : mark["start"]
    if (!(p in sf) && t >= s) { sf[p] = $3; sr[p] = $4 }
    if (t < mark["idle"]) { idf[p] = $3; idr[p] = $4 }
    if (t >= mark["end"] && !(p in ef)) { ef[p] = $3; er[p] = $4 } }
  END {
    printf "  %-8s %-9s %21s %27s\n", "pid", "", "fds start/peak/end", "RSS MB start/peak/end"
    for (i = 1; i <= n; i++) { p = order[i]
      fin = (i == n); e_f = (fin && (p in ef)) ? ef[p] : lf[p]; e_r = (fin && (p in ef)) ? er[p] : lr[p]
      printf "  %-8s %-9s %6s /%6s /%6s %8.1f /%7.1f /%7.1f%s\n", p, (i == 1 ? "first" : "restarted"),
        sf[p], pf[p], e_f, sr[p] / 1024, pr[p] / 1024, e_r / 1024, fin ? "" : "  (end: its last sample before it exited)"
      if (p in idf) printf "  %-8s %-9s %6s fds, %.1f MB RSS idle before any client\n", "", "", idf[p], idr[p] / 1024
      if (fin) printf "CHECK %s %s %s %s\n", sf[p], e_f, sr[p], e_r > "/dev/stderr" } }' "$work/samples" 2> "$work/check"
read -r _ sf ef sr er < "$work/check" || true
[ -n "${lazy_end:-}" ] && [ -n "${er:-}" ] && awk -v l="$lazy_end" -v r="$er" \
  'BEGIN {printf "  of the last router'"'"'s end RSS, %.1f MB are freed pages the kernel may take back (LazyFree): %.1f MB in use\n", l / 1024, (r - l) / 1024}'
fail=
[ "$savable" -eq 0 ] || fail="$fail $savable failures a retry could have saved;"
if [ -z "${sf:-}" ] || [ -z "${ef:-}" ]; then
  fail="$fail no start or end sample;"
else
  awk -v s="$sf" -v e="$ef" 'BEGIN {exit !(e > 1.1 * s)}' && fail="$fail fds at the end ($ef) over 1.1 x the start ($sf);"
  awk -v s="$sr" -v e="$er" 'BEGIN {exit !(e > 1.1 * s)}' && fail="$fail RSS at the end ($er kB) over 1.1 x the start ($sr kB);"
fi
if [ -n "$fail" ]; then
  echo "soak: FAILED:$fail"
  exit 1
fi
echo "soak: passed"
