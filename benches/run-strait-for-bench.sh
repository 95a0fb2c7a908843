#!/usr/bin/env bash
# Starts Strait as the EXTRA target of ../shared/bench/bench.sh:
#
#   EXTRA_NAME=strait EXTRA_URL=http://127.0.0.1:18400/ EXTRA_H2_URL=http://127.0.0.1:18400/ \
#   EXTRA_CMD='benches/run-strait-for-bench.sh 127.0.0.1:18400' \
#   MODES=pinned REPS=3 DUR=10 bash ../shared/bench/bench.sh
#
# $1              listen address (ip:port) of the proxy listener
# $BENCH_BACKENDS comma-separated host:port list of the backends (set by the harness)
# $BENCH_THREADS  worker threads (set by the harness; one per core when unset)
#
# Writes a config round-robining over the backends (HTTP/1.1 upstream, access log off,
# admin on 127.0.0.1:19901) and execs target/release/strait, so the harness's PID, CPU pinning
# and signals apply to Strait itself. Builds the release binary first if it is missing; the
# harness waits only about 10 s for the listener, so build beforehand:
#   cargo build --release --locked
# (`cargo bench` writes its bench-profile build to the same target/release/strait path.)
# STRAIT_BENCH_BUILD=1 runs the release build every time (a no-op when up to date).
# STRAIT_BIN runs another binary instead, e.g. the PGO build deploy/build-pgo.sh makes
# (target/x86_64-unknown-linux-gnu/release/strait); then nothing is built.
set -euo pipefail

die() { printf 'run-strait-for-bench: %s\n' "$*" >&2; exit 2; }

[ $# -eq 1 ] || die "usage: $0 LISTEN_ADDR (e.g. 127.0.0.1:18400), with BENCH_BACKENDS set"
listen=$1
[[ $listen =~ ^(\[[0-9A-Fa-f:.]+\]|[0-9.]+):[0-9]+$ ]] || die "listen address must be ip:port, got '$listen'"
[ -n "${BENCH_BACKENDS:-}" ] || die "BENCH_BACKENDS is empty (comma-separated host:port list)"
threads=${BENCH_THREADS:-}
[ -z "$threads" ] || [[ $threads =~ ^[1-9][0-9]*$ ]] || die "BENCH_THREADS must be a positive integer, got '$threads'"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$root/target/release/strait

if [ -n "${STRAIT_BIN:-}" ]; then
  bin=$STRAIT_BIN
  [ -x "$bin" ] || die "STRAIT_BIN=$bin is not an executable"
elif [ ! -x "$bin" ] || [ "${STRAIT_BENCH_BUILD:-0}" = 1 ]; then
  printf 'run-strait-for-bench: building %s\n' "$bin" >&2
  (cd "$root" && cargo build --release --locked) >&2 || die "cargo build --release failed"
elif [ -n "$(find "$root/src" "$root/proxy/src" "$root/control/src" "$root/Cargo.toml" "$root/Cargo.lock" \
               -newer "$bin" -print -quit 2>/dev/null)" ]; then
  printf 'run-strait-for-bench: warning: %s is older than the sources; run cargo build --release --locked\n' \
    "$bin" >&2
fi

endpoints=""
IFS=, read -r -a backends <<<"$BENCH_BACKENDS"
for b in "${backends[@]}"; do
  b=${b//[[:space:]]/}
  [ -n "$b" ] || continue
  [[ $b =~ ^[][0-9A-Za-z.:-]+:[0-9]+$ ]] || die "bad backend '$b' in BENCH_BACKENDS (expected host:port)"
  endpoints+="      - \"$b\""$'\n'
done
[ -n "$endpoints" ] || die "no backends in BENCH_BACKENDS='$BENCH_BACKENDS'"

# In a directory of its own: Strait watches the config's directory for changes, and nothing
# else should wake that watcher (on the proxy's CPU) during a run.
config=$(mktemp -d "${TMPDIR:-/tmp}/strait-bench.XXXXXX")/strait.yaml
cat >"$config" <<EOF
# Written by benches/run-strait-for-bench.sh for ../shared/bench/bench.sh.
admin:
  address: "127.0.0.1:19901"
access_log:
  enabled: false
listeners:
  - name: bench
    address: "$listen"
    routes:
      - name: all
        match:
          prefix: /
        forward:
          backend: bench
backends:
  - name: bench
    policy: round_robin
    protocol: http1
    endpoints:
$endpoints
EOF

args=(--config "$config" --log-level warn)
[ -z "$threads" ] || args+=(--worker-threads "$threads")
exec "$bin" "${args[@]}"
