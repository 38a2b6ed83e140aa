# Shared by the benchmark and scale scripts (sourced, not run): a temporary work folder,
# background processes stopped on exit, free loopback ports, a Consul dev agent, and a
# catalog of many services.

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
  wait_leader "$port"
}

# wait_leader HTTP_PORT: returns once the agent there has a leader (30 s at most).
wait_leader() {
  local l
  for _ in $(seq 1 150); do
    l=$(curl -fsS "127.0.0.1:$1/v1/status/leader" 2>/dev/null || true)
    [ -n "$l" ] && [ "$l" != '""' ] && return 0
    sleep 0.2
  done
  echo "consul agent on port $1 has no leader" >&2
  return 1
}

# catalog PORT NODES SERVICES INDEX STATUS BACKEND: registers every instance (INDEX -1) or
# one service's two with checks in STATUS, over keep-alive connections from a few threads.
catalog() {
  python3 - "$@" <<'EOF'
import http.client, json, sys, threading
port, nodes, services = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
only = int(sys.argv[4]) if int(sys.argv[4]) >= 0 else None
status, backend = sys.argv[5], int(sys.argv[6])
def body(i, k):
    node = (i + k) % nodes
    sid = f"svc{i}-{k}"
    return json.dumps({
        "Node": f"host{node}", "Address": f"127.0.0.{node + 1}", "SkipNodeUpdate": True,
        "Service": {"ID": sid, "Service": f"svc{i}", "Address": "127.0.0.1", "Port": backend,
                    "Tags": ["web"], "Meta": {"load": "1"}},
        "Checks": [{"CheckID": f"{sid}-alive", "Name": "alive", "Status": status,
                    "ServiceID": sid}],
    })
jobs = [(only, k) for k in (0, 1)] if only is not None else [(i, k) for i in range(services) for k in (0, 1)]
def run(part):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for i, k in part:
        c.request("PUT", "/v1/catalog/register", body(i, k))
        r = c.getresponse(); r.read()
        if r.status != 200:
            sys.exit(f"register svc{i}-{k}: {r.status}")
threads = [threading.Thread(target=run, args=(jobs[t::8],)) for t in range(8)]
[t.start() for t in threads]; [t.join() for t in threads]
EOF
}
