#!/usr/bin/env bash
# Builds a real `consul` binary from the Go module proxy once and caches it.
# `go install github.com/hashicorp/consul@vX` refuses Consul's own replace/exclude lines,
# so we build it from a small wrapper module instead. Prints the binary's path.
set -euo pipefail

version="${CONSUL_VERSION:-v1.22.3}"
cache="${CONSUL_ROUTER_CACHE:-$HOME/.cache/consul-router}"
bin="$cache/consul-$version/consul"

if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
command -v go >/dev/null || { echo "get-consul: Go is needed to build consul (apt-get install golang)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
echo "get-consul: building consul $version from the Go module proxy (several minutes, once)" >&2
go mod init example.invalid/consulbuild >/dev/null 2>&1
go mod edit -exclude=github.com/hashicorp/go-msgpack@v1.1.5 \
            -exclude=github.com/hashicorp/go-msgpack@v1.1.6 -godebug default=go1.25
go get "github.com/hashicorp/consul@$version" >&2
mkdir -p "$(dirname "$bin")"
go build -trimpath -ldflags='-s -w' -o "$bin.tmp" github.com/hashicorp/consul >&2
mv "$bin.tmp" "$bin"
echo "$bin"
