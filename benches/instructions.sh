#!/usr/bin/env bash
# User-space instructions per keep-alive request, for Strait builds:
#
#   bash benches/instructions.sh BIN...
#
# Each build runs under valgrind's callgrind (one worker) in front of the nginx backend of
# benches/lib.sh (127.0.0.1:18091, 64-byte body), listening on 127.0.0.1:18402. After a 2 s
# wrk warm-up, instrumentation is switched on for a wrk run of DUR seconds (CONNS connections,
# one thread) and off again; the instructions it counted are divided by the requests wrk
# completed. Builds are measured one after the other, ROUNDS times in turn.
#
# Why: on this shared 2-core machine keep-alive throughput and CPU time move by 2 to 4% from
# run to run, more than a change to the request path usually saves. The instruction count
# of the same build repeats within 1% (0.1 to 0.8% between two rounds): it shows what a change takes off each request
# (the kernel's part, about two thirds of the CPU time, is not counted). It is a count, not
# a time: confirm a change with benches/ab-keepalive.sh or the load harness.
# The callgrind profile of each run is kept (OUT_DIR, default a temporary directory that is
# removed) for `callgrind_annotate FILE`. Knobs: DUR (5), CONNS (10), ROUNDS (2), OUT_DIR.
# Needs valgrind, nginx, wrk and curl.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DUR=${DUR:-5}
CONNS=${CONNS:-10}
ROUNDS=${ROUNDS:-2}
work=$(mktemp -d "${TMPDIR:-/tmp}/strait-instructions.XXXXXX")
pids=()
# shellcheck source=benches/lib.sh
. "$root/benches/lib.sh"
out_dir=${OUT_DIR:-$work}
mkdir -p "$out_dir"

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("$root/target/release/strait")
for t in "${targets[@]}"; do
  [ -x "$t" ] || die "not an executable: $t (build first: cargo build --release --locked)"
done
need valgrind callgrind_control callgrind_annotate nginx wrk curl

strait_config 18402 19912 >"$work/strait.yaml"

start_backend

measure() {  # target round
  local t=$1 round=$2 pid out reqs ir
  out=$out_dir/$(basename "$t").$round.callgrind
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "$t" --config "$work/strait.yaml" --worker-threads 1 --log-level warn 2>"$work/valgrind.log" &
  pid=$!
  pids+=("$pid")
  # Under valgrind the start takes a second or two; wait_ok polls for up to 10 s.
  wait_ok http://127.0.0.1:18402/
  wrk -t1 -c"$CONNS" -d2s http://127.0.0.1:18402/ >/dev/null
  callgrind_control -i on "$pid" >/dev/null 2>&1
  wrk -t1 -c"$CONNS" -d"${DUR}s" http://127.0.0.1:18402/ >"$work/wrk.out"
  callgrind_control -i off "$pid" >/dev/null 2>&1
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  reqs=$(awk '/requests in/ {print $1}' "$work/wrk.out")
  ir=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  [ -n "$reqs" ] && [ "$reqs" -gt 0 ] && [ -n "$ir" ] || die "no measurement for $t (see $work/valgrind.log)"
  awk -v n="$(basename "$t")" -v r="$reqs" -v i="$ir" \
    'BEGIN { printf "%-24s %8d requests   %7.0f instructions per request\n", n, r, i / r }'
}

echo "# user-space instructions (callgrind), keep-alive, one worker, wrk -c$CONNS, ${DUR}s per run"
for round in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do measure "$t" "$round"; done
done
