#!/usr/bin/env bash
# Soak run: the real elb-exporter (release build) against the simulated cloud and the fake apiserver for a
# given duration, with Service churn every ~200 ms, random cloud faults (5xx, throttling with and without
# Retry-After, truncated answers, delays past the request timeout) and watch disruptions (dropped watches,
# 410 Gone, short apiserver outages). It fails on a crash, a series of a Service deleted more than 3 s ago,
# an unparsable /metrics body, RSS over 100 MiB, `up` not recovering after the faults stop, or exported
# Services differing from the live ones at the end; it prints a summary either way. See tests/soak.rs.
#
#   scripts/soak.sh            # 10 minutes
#   scripts/soak.sh 1800       # 30 minutes
#   scripts/soak.sh 1800 42    # 30 minutes with SOAK_SEED=42 (replay a failure's printed seed)
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-${SOAK_SECONDS:-600}}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
  echo "usage: $0 [SECONDS] [SEED]   (SECONDS a positive integer, e.g. 1800)" >&2
  exit 2
fi
export SOAK_SECONDS="$secs"
if [ -n "${2:-}" ]; then
  export SOAK_SEED="$2"
fi
echo "soak: ${SOAK_SECONDS} s${SOAK_SEED:+, seed ${SOAK_SEED}} (release build; the first build takes a few minutes)"
exec cargo test --release --test soak -- --nocapture
