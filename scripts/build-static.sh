#!/usr/bin/env bash
# Builds the release binary fully static (no dynamic loader, no shared libraries), stripped,
# at a fixed path: ${CARGO_TARGET_DIR:-target}/static/consul-router. Prints that path alone
# on standard output (everything else goes to standard error), so `bin=$(scripts/build-static.sh)`.
#
# The musl target is preferred: Rust's <arch>-unknown-linux-musl links musl in, and musl's
# resolver reads /etc/hosts and /etc/resolv.conf itself, so host names resolve in a `FROM
# scratch` image. mimalloc and ring compile C, which needs musl's headers: `musl-gcc` from
# Debian's musl-tools (installed here when missing and running as root).
#
# The fallback, used when the musl target or musl-gcc cannot be had, is glibc linked
# statically (`-C target-feature=+crt-static` on the gnu target). Caveat: a static glibc
# still loads NSS modules (libnss_files, libnss_dns) at run time for getaddrinfo, so in an
# image without them only numeric addresses work (--consul http://10.0.0.5:8500, not a name).
#
# STATIC_LIBC=musl|glibc forces one route (a failed musl route is then an error).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "build-static.sh: $*" >&2; }

# Run from `cargo test`, the variables cargo sets for a crate's own run would reach build
# scripts that watch them (ring's watches CARGO_MANIFEST_DIR) and make a fresh build stale.
for v in $(compgen -e); do
  case "$v" in
    CARGO_MANIFEST_*|CARGO_PKG_*|CARGO_CRATE_NAME|CARGO_BIN_*|CARGO_PRIMARY_PACKAGE|CARGO_TARGET_TMPDIR|OUT_DIR) unset "$v" ;;
  esac
done

host="$(rustc -vV | sed -n 's/^host: //p')"
musl="${host%-gnu}-musl"
want="${STATIC_LIBC:-}"

# Makes the musl route ready: the Rust target and musl-gcc. Returns non-zero if it cannot.
musl_ready() {
  case "$host" in *-linux-gnu) ;; *) say "host $host is not linux-gnu"; return 1 ;; esac
  if ! rustc --print sysroot >/dev/null || [ ! -d "$(rustc --print sysroot)/lib/rustlib/$musl" ]; then
    command -v rustup >/dev/null || { say "no rustup to add $musl"; return 1; }
    rustup target add "$musl" >&2 || return 1
  fi
  if ! command -v musl-gcc >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing musl-tools (musl-gcc, for mimalloc's and ring's C code)"
    { apt-get update -qq && apt-get install -y -qq musl-tools; } >/dev/null 2>&1 || true
  fi
  command -v musl-gcc >/dev/null || { say "musl-gcc not found (apt-get install musl-tools)"; return 1; }
}

if [ "$want" != glibc ] && musl_ready; then
  target="$musl" libc=musl
  # cc-rs compiles the C dependencies with musl-gcc; rustc links with its own musl.
  export "CC_${musl//-/_}=musl-gcc"
elif [ "$want" = musl ]; then
  say "STATIC_LIBC=musl, but the musl route is not available"
  exit 1
else
  target="$host" libc=glibc
  say "falling back to static glibc: host names will not resolve without NSS modules"
  # With --target, RUSTFLAGS reach only the target's crates, not build scripts or proc macros.
  export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static"
fi

say "building the release binary for $target ($libc, static)"
# The release profile as it is (fat LTO), with symbols stripped.
CARGO_PROFILE_RELEASE_STRIP=symbols \
  cargo build --release --locked --target "$target" --bin consul-router >&2

target_dir="${CARGO_TARGET_DIR:-target}"
out="$target_dir/static/consul-router"
mkdir -p "$target_dir/static"
cp "$target_dir/$target/release/consul-router" "$out.tmp"
mv "$out.tmp" "$out"
size="$(stat -c %s "$out")"
say "$out: $size bytes ($((size / 1024 / 1024)) MiB), $libc, static, stripped"
echo "$out"
