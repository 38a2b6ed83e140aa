#!/usr/bin/env bash
# Load benchmark on loopback: consul-router vs nginx vs HAProxy as reverse proxies to one
# origin (nginx). Each proxy gets one worker pinned to CPU 0; the load tool and the origin
# share CPU 1. Rounds are interleaved so drift hits every proxy alike. Prints requests/s,
# latency and CPU time per request for each, and the ratios to nginx: "x nginx" for
# requests/s and "per core" for requests per CPU-second of the proxy. On two cores the load
# tool and the origin often saturate CPU 1 before a proxy saturates CPU 0, so requests/s
# understates the difference between proxies and "per core" is the figure to compare.
#
# Scenarios (the backend side is HTTP/1.1 kept alive but in grpc):
#   small, 1k, 64k   wrk, 64 HTTP/1.1 connections, a 3-byte, 1 KiB or 64 KiB body
#   small-1000c      wrk, 1,000 HTTP/1.1 connections, the 3-byte body
#   h2c              h2load, 64 cleartext HTTP/2 connections (prior knowledge) with 10
#                    streams each, the 3-byte body
#   tls              h2load --h1, 64 kept-alive HTTP/1.1 connections over TLS, the 3-byte body
#   tls-handshake    h2load --h1, a new TLS connection (full handshake) for every request
#   grpc             h2c to h2c: h2load, GRPC_CONNS (8) cleartext HTTP/2 connections with
#                    GRPC_STREAMS (16) streams each, unary gRPC calls (POST, a 105-byte
#                    length-prefixed message, content-type application/grpc, te: trailers) to
#                    examples/grpc_backend (HTTP/2 cleartext only, one thread, on CPU 1 like
#                    the origin), which echoes the message with the trailer grpc-status: 0.
#                    nginx forwards with grpc_pass, HAProxy to a "proto h2" server, and
#                    consul-router learns the instance speaks h2c from its Consul tag
#                    router.proto=h2c. Every proxy is first checked with one call (curl: 200,
#                    the message echoed, grpc-status 0) and every request of every round must
#                    get a 2xx, or that proxy's row says FAILED instead of figures.
# TLS: every proxy serves the same ECDSA P-256 certificate, made here with openssl, with
# session resumption off (nginx: no cache, no tickets; HAProxy: cache size 0, no tickets),
# and the client's cipher order (HAProxy would pick AES-256 where the others take h2load's
# first, AES-128). The summary prints what each handshake negotiated.
# consul-router takes it from a [tls] table; a build without a TLS listener refuses that
# table, and its TLS rows say "skipped: this build has no TLS listener".
#
#   scripts/bench.sh                 # small 1k 64k small-1000c h2c: 2 rounds of 10 s
#   ROUNDS=3 DURATION=15 scripts/bench.sh
#   SCENARIOS=h2c,tls scripts/bench.sh   # any of the above, comma or space separated
#   SCENARIOS=all scripts/bench.sh   # every scenario, TLS and grpc included
#   SCENARIOS=grpc scripts/bench.sh  # h2c to an h2c gRPC backend (not in the default set)
#   BENCH_RAW=1 scripts/bench.sh     # also print every round's figures
#   ACCESS_LOG=json scripts/bench.sh # consul-router writes its access log (json|text) to a file
#   BASELINE=/path/to/old/consul-router scripts/bench.sh
#                                    # also runs an older build, interleaved, as "baseline"
#   HS_BATCH=100 HS_LOOPS=2          # tls-handshake: connections per h2load run, runs at once
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-2}"
DURATION="${DURATION:-10}"
ALL_SCENARIOS="small 1k 64k small-1000c h2c tls tls-handshake grpc"
SCENARIOS="${SCENARIOS:-small 1k 64k small-1000c h2c}"
SCENARIOS="${SCENARIOS//,/ }"
[ "$SCENARIOS" = all ] && SCENARIOS="$ALL_SCENARIOS"
PROXY_CPU="${PROXY_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"
# tls-handshake: h2load makes one TLS session per connection and offers it again only when
# it reconnects the same client. With as many clients as requests (-c N -n N) no client
# reconnects, so every connection is a full handshake whatever the server would resume
# (checked: nginx with its session cache and tickets on logs $ssl_session_reused "." for all).
HS_BATCH="${HS_BATCH:-100}"
HS_LOOPS="${HS_LOOPS:-2}"
GRPC_CONNS="${GRPC_CONNS:-8}"
GRPC_STREAMS="${GRPC_STREAMS:-16}"
HOST=origin.bench.local
# grpc: the gRPC backend is the Consul service "grpc"; the method's path is not looked at.
GRPC_HOST=grpc.bench.local
GRPC_PATH=/bench.Echo/Unary

for s in $SCENARIOS; do
  case " $ALL_SCENARIOS " in *" $s "*) ;; *) echo "bench: unknown scenario $s (known: $ALL_SCENARIOS, or all)" >&2; exit 1 ;; esac
done
wants() { local s; for s in "$@"; do case " $SCENARIOS " in *" $s "*) return 0 ;; esac; done; return 1; }

need() { command -v "$1" >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && apt-get install -y -qq "$2" >/dev/null; }; command -v "$1" >/dev/null || { echo "bench: needs $1 (apt-get install $2)" >&2; exit 1; }; }
need nginx nginx-light
need haproxy haproxy
need wrk wrk
wants h2c tls tls-handshake grpc && need h2load nghttp2-client
wants tls tls-handshake && need openssl openssl
# grpc: nginx's grpc_pass (ngx_http_grpc_module, built into Debian's nginx binary; a build
# without it refuses the directive). Checked with nginx -t; nginx-full is the package to try.
grpc_pass_ok() {
  local d rc=0
  d=$(mktemp -d)
  printf 'pid %s/pid; error_log %s/err; events {}\nhttp { server { listen 127.0.0.1:1 http2; location / { grpc_pass grpc://127.0.0.1:1; } } }\n' "$d" "$d" > "$d/t.conf"
  nginx -t -q -c "$d/t.conf" -p "$d" 2>/dev/null || rc=1
  rm -rf "$d"
  return "$rc"
}
if wants grpc && ! grpc_pass_ok; then
  [ "$(id -u)" = 0 ] && { apt-get install -y -qq nginx-full || { apt-get update -qq && apt-get install -y -qq nginx-full; }; } >/dev/null 2>&1
  grpc_pass_ok || { echo "bench: grpc needs nginx with grpc_pass (ngx_http_grpc_module; apt-get install nginx-full)" >&2; exit 1; }
fi
consul_bin="${CONSUL_BIN:-$(scripts/get-consul.sh)}"
cargo build --release --locked --bin consul-router >&2
# Apart: built together, the router would get the dev-dependencies' features (tokio's
# test-util), which an example's build turns on, and not be the binary the others measure.
wants grpc && cargo build --release --locked --example grpc_backend >&2
router_bin="${CARGO_TARGET_DIR:-target}/release/consul-router"
grpc_bin="${CARGO_TARGET_DIR:-target}/release/examples/grpc_backend"

. scripts/lib.sh
# small-1000c needs about 2,000 descriptors in the router and 1,000 in wrk.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
ORIGIN=$(free_port); NGINX=$(free_port); HAPROXY=$(free_port); ROUTER=$(free_port); ADMIN=$(free_port); CONSUL=$(free_port)
NGINX_H2=$(free_port); HAPROXY_H2=$(free_port); NGINX_TLS=$(free_port); HAPROXY_TLS=$(free_port); ROUTER_TLS=$(free_port)
GRPC_ORIGIN=$(free_port); NGINX_GRPC=$(free_port); HAPROXY_GRPC=$(free_port)

# Origin: nginx, one worker, fixed bodies.
mkdir -p "$work/www" "$work/logs" "$work/tls"
head -c 1024 /dev/zero | tr '\0' 'a' > "$work/www/1k"
head -c 65536 /dev/zero | tr '\0' 'a' > "$work/www/64k"
chmod 755 "$work" "$work/www"; chmod 644 "$work/www/"*  # nginx workers run as nobody
# One certificate for every proxy: ECDSA P-256, for the bench's host names.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=$HOST" -addext "subjectAltName=DNS:$HOST,DNS:*.bench.local" \
  -keyout "$work/tls/key.pem" -out "$work/tls/cert.pem" 2>/dev/null
cat "$work/tls/cert.pem" "$work/tls/key.pem" > "$work/tls/haproxy.pem"  # HAProxy wants both in one file
cat > "$work/origin.conf" <<EOF
worker_processes 1; daemon off; pid $work/origin.pid; error_log $work/logs/origin.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$ORIGIN; root $work/www;
    location = / { return 200 "ok\n"; }
    location / { } } }
EOF
# One location for the three listeners (keepalive_requests covers HTTP/2 too since 1.19.7).
nginx_loc='location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme; proxy_buffering on; }'
# grpc: h2c in, h2c out (grpc_pass: one stream per upstream connection, kept alive), with
# the same forwarding fields as the others.
nginx_grpc=
wants grpc && nginx_grpc="upstream grpc_origin { server 127.0.0.1:$GRPC_ORIGIN; keepalive 1024; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NGINX_GRPC http2;
    location / { grpc_pass grpc://grpc_origin; grpc_set_header Host \$host;
      grpc_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; grpc_set_header X-Forwarded-Proto \$scheme; } }"
# Debian 12's nginx is 1.22: HTTP/2 is a listen parameter ("http2 on;" came in 1.25.1).
cat > "$work/proxy.conf" <<EOF
worker_processes 1; daemon off; pid $work/proxy.pid; error_log $work/logs/proxy.err;
events { worker_connections 8192; }
http { access_log off; keepalive_requests 1000000;
  upstream origin { server 127.0.0.1:$ORIGIN; keepalive 1024; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NGINX;
    $nginx_loc }
  server { listen 127.0.0.1:$NGINX_H2 http2;
    $nginx_loc }
  server { listen 127.0.0.1:$NGINX_TLS ssl;
    ssl_certificate $work/tls/cert.pem; ssl_certificate_key $work/tls/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache off; ssl_session_tickets off;
    $nginx_loc }
  $nginx_grpc }
EOF
cat > "$work/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 8000
  tune.ssl.cachesize 0
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  option forwardfor
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAPROXY
  bind 127.0.0.1:$HAPROXY_H2 proto h2
  bind 127.0.0.1:$HAPROXY_TLS ssl crt $work/tls/haproxy.pem alpn http/1.1 no-tls-tickets prefer-client-ciphers
  default_backend be
backend be
  server origin 127.0.0.1:$ORIGIN
EOF
# grpc: h2c in, h2c out; HAProxy multiplexes the streams over its backend connections.
wants grpc && cat >> "$work/haproxy.cfg" <<EOF
frontend fe_grpc
  bind 127.0.0.1:$HAPROXY_GRPC proto h2
  default_backend be_grpc
backend be_grpc
  server grpc 127.0.0.1:$GRPC_ORIGIN proto h2
EOF

# consul-router's TLS listener, as a config file next to the flags.
tls_conf() {
  cat > "$2" <<EOF
[tls]
listen = "127.0.0.1:$1"
[[tls.certs]]
cert = "$work/tls/cert.pem"
key = "$work/tls/key.pem"
EOF
}
# with_tls NAME BIN PORT CONF: whether this build takes a [tls] table (asked with
# --check-config; a build without a TLS listener refuses the unknown key with status 2).
with_tls() {
  local out rc=0
  tls_conf "$3" "$4"
  out=$("$2" --config "$4" --check-config 2>&1) || rc=$?
  [ "$rc" = 0 ] && return 0
  if [ "$rc" = 2 ] && grep -q 'unknown field' <<<"$out"; then
    echo "no_tls	$1	skipped: this build has no TLS listener" >> "$work/skipped"
  else
    echo "no_tls	$1	skipped: the TLS configuration is refused (status $rc): $(head -1 <<<"$out")" >> "$work/skipped"
  fi
  echo "bench: $1: $(cut -f3 "$work/skipped" | tail -1)" >&2
  return 1
}
: > "$work/skipped"
router_tls=; base_tls=
router_conf=(); base_conf=()
if wants tls tls-handshake; then
  with_tls consul-router "$router_bin" "$ROUTER_TLS" "$work/router-tls.toml" && { router_tls=1; router_conf=(--config "$work/router-tls.toml"); }
fi

taskset -c "$LOAD_CPU" nginx -c "$work/origin.conf" -p "$work" 2>/dev/null & pids+=($!)
taskset -c "$PROXY_CPU" nginx -c "$work/proxy.conf" -p "$work" 2>/dev/null & pids+=($!)
taskset -c "$PROXY_CPU" haproxy -f "$work/haproxy.cfg" -db >"$work/logs/haproxy.log" 2>&1 & pids+=($!)
start_consul "$CONSUL" "$LOAD_CPU"
curl -fsS -X PUT "127.0.0.1:$CONSUL/v1/agent/service/register" \
  -d "{\"ID\":\"origin-1\",\"Name\":\"origin\",\"Address\":\"127.0.0.1\",\"Port\":$ORIGIN}" >/dev/null
if wants grpc; then
  # The gRPC backend shares CPU 1 with the load tool, like the origin; the tag tells the
  # router to speak HTTP/2 cleartext to it.
  taskset -c "$LOAD_CPU" "$grpc_bin" "$GRPC_ORIGIN" >"$work/logs/grpc_backend.log" 2>&1 & pids+=($!)
  grpc_pid=$!
  curl -fsS -X PUT "127.0.0.1:$CONSUL/v1/agent/service/register" \
    -d "{\"ID\":\"grpc-1\",\"Name\":\"grpc\",\"Address\":\"127.0.0.1\",\"Port\":$GRPC_ORIGIN,\"Tags\":[\"router.proto=h2c\"]}" >/dev/null
fi
log_args=()
[ -n "${ACCESS_LOG:-}" ] && log_args=(--access-log "$ACCESS_LOG" --access-log-file "$work/logs/access.log")
RUST_LOG=warn taskset -c "$PROXY_CPU" "$router_bin" "${router_conf[@]}" --workers 1 "${log_args[@]}" \
  --listen "127.0.0.1:$ROUTER" --admin-listen "127.0.0.1:$ADMIN" \
  --consul "http://127.0.0.1:$CONSUL" --domain bench.local >"$work/logs/router.log" 2>&1 & pids+=($!)
router_pid=$!
proxies="nginx haproxy consul-router"
if [ -n "${BASELINE:-}" ]; then
  BASE=$(free_port); BASE_ADMIN=$(free_port); BASE_TLS=$(free_port)
  if wants tls tls-handshake; then
    with_tls baseline "$BASELINE" "$BASE_TLS" "$work/base-tls.toml" && { base_tls=1; base_conf=(--config "$work/base-tls.toml"); }
  fi
  RUST_LOG=warn taskset -c "$PROXY_CPU" "$BASELINE" "${base_conf[@]}" --workers 1 \
    --listen "127.0.0.1:$BASE" --admin-listen "127.0.0.1:$BASE_ADMIN" \
    --consul "http://127.0.0.1:$CONSUL" --domain bench.local >"$work/logs/baseline.log" 2>&1 & pids+=($!)
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
# port_of PROXY [SCENARIO]: the listener a scenario uses (the router takes h2c on its plain one).
port_of() {
  case "$1:${2:-}" in
    nginx:h2c) echo "$NGINX_H2" ;; nginx:grpc) echo "$NGINX_GRPC" ;; nginx:tls*) echo "$NGINX_TLS" ;; nginx:*) echo "$NGINX" ;;
    haproxy:h2c) echo "$HAPROXY_H2" ;; haproxy:grpc) echo "$HAPROXY_GRPC" ;; haproxy:tls*) echo "$HAPROXY_TLS" ;; haproxy:*) echo "$HAPROXY" ;;
    consul-router:tls*) echo "$ROUTER_TLS" ;; consul-router:*) echo "$ROUTER" ;;
    baseline:tls*) echo "$BASE_TLS" ;; baseline:*) echo "$BASE" ;;
  esac
}
# The proxies a scenario runs: builds without a TLS listener sit the TLS ones out, and a
# proxy that failed a scenario (grpc: a wrong answer) sits out its remaining rounds.
proxies_for() {
  local p out=
  for p in $proxies; do
    case "$1:$p" in
      tls*:consul-router) [ -n "$router_tls" ] || continue ;;
      tls*:baseline) [ -n "$base_tls" ] || continue ;;
    esac
    failed "$1" "$p" && continue
    out="$out $p"
  done
  echo $out
}
# fail SCENARIO PROXY WHY: the proxy's row for the scenario says FAILED and why, not figures.
: > "$work/failed"
fail() {
  local why
  why=$(printf %s "$3" | tr '\t\n' '  ')
  failed "$1" "$2" || printf '%s\t%s\tFAILED: %s\n' "$1" "$2" "$why" >> "$work/failed"
  echo "bench: $2 $1 FAILED: $why" >&2
}
failed() { awk -F'\t' -v s="$1" -v p="$2" '$1 == s && $2 == p {f = 1} END {exit !f}' "$work/failed"; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# grpc_check PORT: one unary call as the grpc scenario makes them (curl, HTTP/2 prior
# knowledge). Prints what is wrong; nothing if the answer is HTTP/2 200 with content-type
# application/grpc, the message echoed and the trailer grpc-status: 0.
grpc_check() {
  local d="$work/grpc-check" out
  rm -rf "$d"; mkdir -p "$d"
  out=$(curl -sS --http2-prior-knowledge --max-time 5 --resolve "$GRPC_HOST:$1:127.0.0.1" \
    -H 'content-type: application/grpc' -H 'te: trailers' --data-binary "@$work/grpc.msg" \
    -D "$d/head" -o "$d/body" -w 'HTTP/%{http_version} %{http_code}' "http://$GRPC_HOST:$1$GRPC_PATH" 2>&1) \
    || { echo "no answer: ${out:-curl failed}"; return; }
  tr -d '\r' < "$d/head" > "$d/fields"
  [ "$out" = "HTTP/2 200" ] || { echo "$out, $(tr '\n' ' ' < "$d/body" | head -c 200)"; return; }
  grep -qix 'content-type: application/grpc' "$d/fields" || { echo "$out without content-type: application/grpc"; return; }
  grep -qix 'grpc-status: 0' "$d/fields" || { echo "$out without grpc-status: 0 ($(grep -i '^grpc-' "$d/fields" | tr '\n' ' '))"; return; }
  cmp -s "$d/body" "$work/grpc.msg" || { echo "$out, grpc-status 0, but not the message echoed ($(stat -c %s "$d/body") bytes)"; return; }
}
hz=$(getconf CLK_TCK)

# Sanity: every proxy answers, over each protocol a chosen scenario uses.
for p in $proxies; do
  for path in / /1k /64k; do
    curl -fsS -H "Host: $HOST" "127.0.0.1:$(port_of $p)$path" >/dev/null || { echo "bench: $p does not answer $path" >&2; cat "$work"/logs/* >&2; exit 1; }
  done
done
if wants grpc; then
  # One unary call: a 5-byte gRPC prefix (not compressed, length 100), then a 100-byte
  # protobuf-like message (field 1, 98 bytes).
  { printf '\0\0\0\0\144\n\142'; head -c 98 /dev/zero | tr '\0' 'g'; } > "$work/grpc.msg"
  for _ in $(seq 1 50); do [ -z "$(grpc_check "$GRPC_ORIGIN")" ] && break; sleep 0.1; done
  why=$(grpc_check "$GRPC_ORIGIN")
  [ -z "$why" ] || { echo "bench: the gRPC backend itself: $why" >&2; cat "$work"/logs/* >&2; exit 1; }
  # A proxy that gets the call wrong is reported FAILED and sits the scenario out; the
  # router answers a call over HTTP/1.1 only if this build speaks h2c to tagged instances.
  # Up to 2 s each, for a router whose table lags.
  for p in $proxies; do
    for _ in $(seq 1 10); do why=$(grpc_check "$(port_of "$p" grpc)"); [ -z "$why" ] && break; sleep 0.2; done
    [ -z "$why" ] || { fail grpc "$p" "one call through it: $why"
      case "$p" in consul-router|baseline) tail -3 "$work/logs/${p/consul-}.log" | sed "s/^/bench: $p log: /" >&2 ;; esac; }
  done
fi
if wants h2c; then
  for p in $(proxies_for h2c); do
    port=$(port_of $p h2c)
    v=$(curl -fsS --http2-prior-knowledge --resolve "$HOST:$port:127.0.0.1" -o /dev/null -w '%{http_version}' "http://$HOST:$port/") && [ "$v" = 2 ] \
      || { echo "bench: $p does not answer h2c (got HTTP/$v)" >&2; cat "$work"/logs/* >&2; exit 1; }
  done
fi
# resumes PORT: whether the listener resumes a TLS session (a second openssl s_client
# offering the first one's session or ticket). It should not: the kept-alive figures don't
# depend on it, and h2load offers no session in tls-handshake, but it is printed.
resumes() {
  local req="GET / HTTP/1.1\r\nHost: $HOST\r\nConnection: close\r\n\r\n" sess="$work/tls/session.$1"
  printf "$req" | timeout 5 openssl s_client -quiet -connect "127.0.0.1:$1" -servername "$HOST" -sess_out "$sess" >/dev/null 2>&1 || true
  [ -s "$sess" ] || return 1
  printf "$req" | timeout 5 openssl s_client -connect "127.0.0.1:$1" -servername "$HOST" -sess_in "$sess" 2>/dev/null | grep -q '^Reused,'
}
resumption=
if wants tls tls-handshake; then
  for p in $(proxies_for tls); do
    port=$(port_of $p tls)
    curl -fsS --http1.1 --cacert "$work/tls/cert.pem" --resolve "$HOST:$port:127.0.0.1" -o /dev/null "https://$HOST:$port/" \
      || { echo "bench: $p does not answer https on $port" >&2; cat "$work"/logs/* >&2; exit 1; }
    if resumes "$port"; then resumption="$resumption $p: resumes sessions;"; else resumption="$resumption $p: no;"; fi
  done
fi

to_us() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us/,"",v); print v } else if (v ~ /ms$/) { sub(/ms/,"",v); print v*1000 } else if (v ~ /s$/) { sub(/s/,"",v); print v*1000000 } else print v }'; }

# h2load takes the host from the URL (its -H Host adds a second Host field, which nginx
# answers with 400 and a close, and then h2load -D never ends), and --connect-to the address;
# the host is then origin.bench.local:PORT, also TLS's server name. A timeout ends an h2load
# that hangs all the same.
# Each load function runs one round against one port and sets rps, reqs (requests done),
# p50 and p99 in µs ("-" where the tool has no percentile), errs, and tls (what was negotiated).
load_wrk() { # PORT PATH CONNS
  local out
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$3" -d"${DURATION}s" --latency \
    -H "Host: $HOST" "http://127.0.0.1:$1$2" 2>&1)
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(to_us "$(awk '$1=="50%" {print $2}' <<<"$out")")
  p99=$(to_us "$(awk '$1=="99%" {print $2}' <<<"$out")")
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  tls=
  [ -n "$reqs" ] && [ "$reqs" -gt 0 ] || { echo "$out" >&2; return 1; }
}
# h2load's counts: "requests: T total, S started, D done, OK succeeded, F failed, E errored, X timeout"
# and "status codes: A 2xx, B 3xx, C 4xx, D 5xx". h2load has no percentiles: p50 holds its mean.
h2load_errs() { awk '/^requests:/ { if ($10+$12+$14) printf "%d failed, %d errored, %d timeout; ", $10, $12, $14 }
  /^status codes:/ { if ($5+$7+$9) printf "non-2xx: %d 3xx, %d 4xx, %d 5xx; ", $5, $7, $9 }' <<<"$1"; }
h2load_tls() { awk -F': ' '/^TLS Protocol:|^Cipher:|^Server Temp Key:/ {printf "%s%s", (n++ ? ", " : ""), $2}' <<<"$1"; }
# H2_HOST and H2_PATH change the URL's host (origin.bench.local) and path (/); ok2xx is the
# count of 2xx answers.
load_h2load() { # PORT TLS(0|1) ARGS...
  local port=$1 secure=$2 out
  shift 2
  local scheme=http
  [ "$secure" = 1 ] && scheme=https
  out=$(timeout -k 5 $((DURATION + 30)) taskset -c "$LOAD_CPU" h2load -t1 -D "$DURATION" "$@" --connect-to "127.0.0.1:$port" "$scheme://${H2_HOST:-$HOST}:$port${H2_PATH:-/}" 2>&1)
  rps=$(awk '/^finished in/ {print $4}' <<<"$out")
  reqs=$(awk '/^requests:/ {print $6}' <<<"$out")
  ok2xx=$(awk '/^status codes:/ {print $3}' <<<"$out")
  p50=$(to_us "$(awk '/^time for request:/ {print $6}' <<<"$out")"); p99=-
  errs=$(h2load_errs "$out")
  tls=$(h2load_tls "$out")
  [ -n "$reqs" ] && [ "$reqs" -gt 0 ] || { echo "$out" >&2; return 1; }
}
# Full TLS handshakes for DURATION s: HS_LOOPS loops, each running h2load on HS_BATCH new
# connections of one request each (Connection: close: the proxy closes, as for HTTP/1.0),
# one after the other. p50 holds the mean time to the response's first byte, handshake included.
load_handshakes() { # PORT
  local port=$1 dir="$work/hs" l lp=() t0 t1 out f
  rm -rf "$dir"; mkdir -p "$dir"
  t0=$(date +%s%N)
  local end=$((t0 + DURATION * 1000000000))
  for l in $(seq 1 "$HS_LOOPS"); do
    ( i=0; while [ "$(date +%s%N)" -lt "$end" ]; do i=$((i + 1))
        timeout -k 5 60 taskset -c "$LOAD_CPU" h2load --h1 -t1 -c"$HS_BATCH" -n"$HS_BATCH" -H 'Connection: close' \
          --connect-to "127.0.0.1:$port" "https://$HOST:$port/" > "$dir/$l.$i" 2>&1 || true
      done ) &
    lp+=($!)
  done
  wait "${lp[@]}"
  t1=$(date +%s%N)
  out=$(cat "$dir"/*)
  reqs=$(awk '/^requests:/ {n += $6} END {print n+0}' <<<"$out")
  rps=$(awk -v n="$reqs" -v ns=$((t1 - t0)) 'BEGIN { printf "%.2f", n / (ns / 1e9) }')
  p50=$(for f in "$dir"/*; do to_us "$(awk '/^time to 1st byte:/ {print $7}' "$f")"; done | awk '{s += $1; n++} END {if (n) printf "%.0f", s / n}')
  p99=-
  errs=$(h2load_errs "$(awk '/^requests:/ {f += $10; e += $12; t += $14} /^status codes:/ {b += $5; c += $7; d += $9}
    END {printf "requests: 0 total, 0 started, 0 done, 0 succeeded, %d failed, %d errored, %d timeout\nstatus codes: 0 2xx, %d 3xx, %d 4xx, %d 5xx\n", f, e, t, b, c, d}' <<<"$out")")
  tls=$(h2load_tls "$(cat "$(ls "$dir"/* | head -1)")")
  [ "$reqs" -gt 0 ] || { echo "$out" | tail -20 >&2; return 1; }
}

results="$work/results.tsv"
: > "$results"
tlsinfo="$work/tls.tsv"
: > "$tlsinfo"
for scenario in $SCENARIOS; do
  for round in $(seq 1 "$ROUNDS"); do
    for p in $(proxies_for "$scenario"); do
      port=$(port_of "$p" "$scenario")
      pid=$(pid_of "$p"); before=$(cpu_ticks "$pid")
      [ "$scenario" = grpc ] && back_before=$(cpu_ticks "$grpc_pid")
      case "$scenario" in
        small) load_wrk "$port" / 64 ;;
        1k) load_wrk "$port" /1k 64 ;;
        64k) load_wrk "$port" /64k 64 ;;
        small-1000c) load_wrk "$port" / 1000 ;;
        h2c) load_h2load "$port" 0 -c64 -m10 ;;
        tls) load_h2load "$port" 1 --h1 -c64 -m1 ;;
        tls-handshake) load_handshakes "$port" ;;
        grpc) H2_HOST=$GRPC_HOST H2_PATH=$GRPC_PATH load_h2load "$port" 0 -c"$GRPC_CONNS" -m"$GRPC_STREAMS" \
                -d "$work/grpc.msg" -H 'content-type: application/grpc' -H 'te: trailers' ;;
      esac || {
        [ "$scenario" = grpc ] && { fail grpc "$p" "round $round: h2load got no answer"; continue; }
        echo "bench: the load failed for $p $scenario" >&2; exit 1; }
      # grpc: every request answered 2xx (h2load can't see trailers: grpc_check saw them),
      # or the row is a failure, not a figure. (At the end of -D, h2load may count the 2xx
      # of a request it no longer counts as done: 2xx can exceed done by a few.)
      if [ "$scenario" = grpc ] && { [ -n "$errs" ] || [ "${ok2xx:-0}" -lt "$reqs" ]; }; then
        fail grpc "$p" "round $round: ${ok2xx:-0} of $reqs requests got a 2xx; $errs"
        continue
      fi
      after=$(cpu_ticks "$pid")
      cpu_us=$(awk -v d=$((after-before)) -v hz="$hz" -v n="$reqs" 'BEGIN { printf "%.2f", d/hz*1e6/n }')
      # grpc: the backend's CPU per call too, which depends on how the proxy speaks to it.
      raw_more=
      if [ "$scenario" = grpc ]; then
        back_us=$(awk -v d=$(($(cpu_ticks "$grpc_pid") - back_before)) -v hz="$hz" -v n="$reqs" 'BEGIN { printf "%.2f", d/hz*1e6/n }')
        printf '%s\t%s\n' "$p" "$back_us" >> "$work/backend.tsv"
        raw_more=" backend_cpu_us=$back_us"
      fi
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$round" "$p" "$rps" "$p50" "$p99" "$cpu_us" >> "$results"
      [ -n "$tls" ] && printf '%s\t%s\t%s\n' "$scenario" "$p" "$tls" >> "$tlsinfo"
      [ -n "$errs" ] && echo "bench: $p $scenario: $errs" >&2
      [ -n "${BENCH_RAW:-}" ] && echo "$p $scenario round $round: rps=$rps p50=$p50 p99=$p99 cpu_us=$cpu_us$raw_more" >&2
      sleep 1
    done
  done
  case "$scenario" in tls*) awk -F'\t' -v s="$scenario" '$1 == "no_tls" {printf "%s\t0\t%s\tskip\t%s\n", s, $2, $3}' "$work/skipped" >> "$results" ;; esac
  awk -F'\t' -v s="$scenario" '$1 == s {printf "%s\t0\t%s\tskip\t%s\n", s, $2, $3}' "$work/failed" >> "$results"
done

echo
echo "consul-router benchmark: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ //'), ${ROUNDS}x${DURATION}s per proxy and scenario"
echo "release binary: $(stat -c %s "$router_bin") bytes; router RSS now: $(awk '/VmRSS/ {print $2, $3}' /proc/$router_pid/status)"
[ -n "${ACCESS_LOG:-}" ] && echo "access log ($ACCESS_LOG): $(wc -l < "$work/logs/access.log") lines written"
awk -F'\t' -v proxies="$proxies" -v order="$ALL_SCENARIOS" '
  $4 == "skip" { skip[$1 SUBSEP $3] = $5; sc[$1] = 1; next }
  { k=$1 SUBSEP $3; rps[k]+=$4; p50[k]+=$5; p99[k]+=$6; nop99[k] = nop99[k] || $6 == "-"; cpu[k]+=$7; n[k]++; sc[$1]=1 }
  END {
    printf "%-14s %-14s %10s %9s %9s %12s %9s %9s %9s\n", "scenario", "proxy", "req/s", "p50 us", "p99 us", "cpu us/req", "x nginx", "per core", "p99 x"
    ns = split(order, os, " ")
    for (i=1; i<=ns; i++) { s=os[i]; if (!(s in sc)) continue
      np=split(proxies, ps, " ")
      base=s SUBSEP "nginx"
      for (j=1; j<=np; j++) { k=s SUBSEP ps[j]
        if (k in skip) { printf "%-14s %-14s %s\n", s, ps[j], skip[k]; continue }
        if (!(k in n)) continue
        # No ratios when nginx has no figures for the scenario (grpc: nginx FAILED).
        hb = (base in n) && !(base in skip)
        xr = hb ? sprintf("%.2f", (rps[k]/n[k])/(rps[base]/n[base])) : "-"
        pc = hb ? sprintf("%.2f", (cpu[base]/n[base])/(cpu[k]/n[k])) : "-"
        px = (hb && !nop99[k]) ? sprintf("%.2f", (p99[k]/n[k])/(p99[base]/n[base])) : "-"
        p9 = nop99[k] ? "-" : sprintf("%.0f", p99[k]/n[k])
        printf "%-14s %-14s %10.0f %9.0f %9s %12.2f %9s %9s %9s\n", s, ps[j], rps[k]/n[k], p50[k]/n[k], p9, cpu[k]/n[k], xr, pc, px } } }' "$results"
if grep -q -E '^(h2c|tls|grpc)' "$results"; then
  echo "h2c, tls, tls-handshake, grpc: h2load gives no percentiles; p50 is its mean (tls-handshake: mean time to first byte, handshake included); cpu us/req is per handshake for tls-handshake"
fi
[ -s "$work/backend.tsv" ] && awk -F'\t' -v proxies="$(proxies_for grpc)" '{ s[$1] += $2; n[$1]++ }
  END { np = split(proxies, ps, " "); for (j = 1; j <= np; j++) if (ps[j] in n) out = out sprintf("%s%s %.2f", (out ? ", " : ""), ps[j], s[ps[j]] / n[ps[j]])
    print "grpc: backend CPU us per call behind each proxy (on CPU 1, with the load): " out }' "$work/backend.tsv"
[ -s "$tlsinfo" ] && sort -u "$tlsinfo" | awk -F'\t' '{printf "TLS negotiated, %s %s: %s\n", $1, $2, $3}'
[ -n "$resumption" ] && echo "TLS session resumption (openssl s_client -sess_in):${resumption%;}"
true
