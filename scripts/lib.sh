# Shared by the benchmark and scale scripts (sourced, not run): a temporary work folder,
# background processes stopped on exit, free loopback ports, and a Consul dev agent.

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_consul HTTP_PORT [taskset CPU]: a dev agent on free ports; returns once it has a leader.
start_consul() {
  local port=$1 pin=()
  [ -n "${2:-}" ] && pin=(taskset -c "$2")
  "${pin[@]}" "$consul_bin" agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$port" \
    -server-port "$(free_port)" -serf-lan-port "$(free_port)" -serf-wan-port "$(free_port)" \
    -dns-port -1 -grpc-port -1 -hcl 'ports { grpc_tls = -1 }' -log-level warn >/dev/null 2>&1 &
  pids+=($!)
  local l
  for _ in $(seq 1 100); do
    l=$(curl -fsS "127.0.0.1:$port/v1/status/leader" 2>/dev/null || true)
    [ -n "$l" ] && [ "$l" != '""' ] && return 0
    sleep 0.2
  done
  echo "consul dev agent on port $port has no leader" >&2
  return 1
}
