#!/usr/bin/env bash
# Scale benchmark (issue 6, docs/PERFORMANCE.md): the release exporter binary against the simulated cloud
# and cluster at 100, 1,000 and 10,000 listeners x 13 metrics, side by side with nginx serving the same body
# and with the naive per-scrape render. Prints Markdown tables and writes them to target/bench/scale.md.
#
#   scripts/bench.sh                  # all three sizes (about 6-8 minutes on 2 cores)
#   scripts/bench.sh 100,1000         # chosen sizes (multiples of 5)
#   BENCH_WRK_SECS=5 BENCH_CONCURRENCY=4 scripts/bench.sh 10000
#
# Needs wrk and nginx (Debian: wrk, nginx-light); installs them with apt-get when missing and allowed
# (root, or BENCH_NO_INSTALL unset), otherwise the wrk/nginx columns read n/a.
set -euo pipefail
cd "$(dirname "$0")/.."

sizes="${1:-${BENCH_SIZES:-100,1000,10000}}"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

if ! have wrk || ! have nginx; then
  if [ -z "${BENCH_NO_INSTALL:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing wrk and nginx-light (apt-get)..." >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
  else
    echo "warning: wrk and/or nginx missing (apt-get install -y wrk nginx-light); those columns will read n/a" >&2
  fi
fi
wrk_bin="$(command -v wrk || true)"
nginx_bin="$(command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true)"

# One release build of the binary and of the bench (the bench profile inherits release).
cargo build --release --bin elb-exporter
cargo bench --bench scale --no-run

target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
target_dir="${target_dir:-target}"
mkdir -p "$target_dir/bench"

args=(--sizes "$sizes" --exporter "$target_dir/release/elb-exporter" --out "$target_dir/bench/scale.md")
[ -n "$wrk_bin" ] && args+=(--wrk "$wrk_bin")
[ -n "$nginx_bin" ] && args+=(--nginx "$nginx_bin")

exec cargo bench --bench scale -- "${args[@]}"
