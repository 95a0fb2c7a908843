#!/usr/bin/env bash
# Keep-alive throughput of two Strait configurations side by side, in the same run:
#
#   bash benches/ab-keepalive.sh NAME_A CONFIG_A NAME_B CONFIG_B
#
# Used by benches/dns-vs-static.sh and benches/resilience-overhead.sh, which write the two
# configurations. CONFIG_A must listen on 127.0.0.1:18401 with admin 127.0.0.1:19911, CONFIG_B
# on 127.0.0.1:18402 with admin 127.0.0.1:19912, and both forward to the nginx backend this
# script starts on 127.0.0.1:18091 (64-byte body, one worker, CPU 0). Each Strait runs with one
# worker on CPU 1; wrk (1 thread, CONNS connections) on CPU 0 alternates between them, the order
# swapped every round, for REPS rounds of DUR seconds. Prints every round, the medians and
# their ratio B / A. Knobs: REPS (5), DUR (10), CONNS (50); BIN_A and BIN_B run two different
# builds (e.g. before and after a change to the request path), both default to the release build.
# WORKERS=N (default 1) runs both with --worker-threads N and without CPU pinning, and wrk with two
# threads, as the harness's unpinned mode (the backend stays on CPU 0).
# Needs the release build, nginx and wrk (apt-get install -y nginx-light wrk).
set -euo pipefail

[ $# -eq 4 ] || { echo "usage: $0 NAME_A CONFIG_A NAME_B CONFIG_B" >&2; exit 2; }
names=("$1" "$3")
configs=("$2" "$4")
ports=(18401 18402)
admins=(19911 19912)
REPS=${REPS:-5}
DUR=${DUR:-10}
CONNS=${CONNS:-50}
WORKERS=${WORKERS:-1}
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || { echo "WORKERS must be a positive integer" >&2; exit 2; }
if [ "$WORKERS" = 1 ]; then
  proxy_cpu=(taskset -c 1) gen_cpu=(taskset -c 0) gen_threads=1
else
  proxy_cpu=() gen_cpu=() gen_threads=2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$root/target/release/strait
bins=("${BIN_A:-$bin}" "${BIN_B:-$bin}")
work=$(mktemp -d "${TMPDIR:-/tmp}/strait-ab.XXXXXX")
pids=()
# shellcheck source=benches/lib.sh
. "$root/benches/lib.sh"


for b in "${bins[@]}"; do [ -x "$b" ] || die "build first: cargo build --release --locked ($b)"; done
need nginx wrk curl
start_backend
for i in 0 1; do
  "${proxy_cpu[@]}" "${bins[i]}" --config "${configs[i]}" --worker-threads "$WORKERS" --log-level warn &
  pids+=($!)
done

for i in 0 1; do
  wait_ok "http://127.0.0.1:${admins[i]}/ready"
  wait_ok "http://127.0.0.1:${ports[i]}/"
done

declare -A results
for r in $(seq "$REPS"); do
  order=(0 1)
  [ $((r % 2)) -eq 0 ] && order=(1 0)
  for i in "${order[@]}"; do
    out=$("${gen_cpu[@]}" wrk -t"$gen_threads" -c"$CONNS" -d"${DUR}s" "http://127.0.0.1:${ports[i]}/")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    results[$i]+="$rps "
    printf 'round %d %-10s %s req/s%s\n' "$r" "${names[i]}" "$rps" "${non2xx:+ (non-2xx: $non2xx)}"
  done
done

a=$(printf '%s' "${results[0]}" | median)
b=$(printf '%s' "${results[1]}" | median)
echo
echo "| config | req/s, median of $REPS x ${DUR}s | all rounds, in order |"
echo "|---|---|---|"
echo "| ${names[0]} | $a | ${results[0]}|"
echo "| ${names[1]} | $b | ${results[1]}|"
awk -v a="$a" -v b="$b" -v na="${names[0]}" -v nb="${names[1]}" \
  'BEGIN {printf "\n%s / %s = %.3f\n", nb, na, b / a}'
for i in 0 1; do
  echo "--- /metrics of ${names[i]} (selected)"
  curl -s "http://127.0.0.1:${admins[i]}/metrics" |
    grep -E '^strait_(dns_lookups_total|health_checks_total|retries_total|rate_limited_total|circuit_breaker_open_total|outlier_ejections_total)' || true
done
