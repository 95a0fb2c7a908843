#!/usr/bin/env bash
# Idle resident memory of Strait as ../shared/bench/bench.sh samples it, and where it goes:
#
#   bash benches/idle-rss.sh [BINARY...]      # default: target/release/strait
#
# For each binary, RUNS times (default 3): starts it with one worker on CPU 1, forwarding to the
# nginx backend of benches/lib.sh, sends one HTTP/1.1 and one h2c request through it (as the
# harness's readiness checks do), then prints VmRSS and the resident kB of each mapping of the
# binary (its code is the `r-xp` line), of the shared libraries, and anonymous memory.
# Needs nginx and curl.
set -euo pipefail

RUNS=${RUNS:-3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/strait-idle-rss.XXXXXX")
pids=()
# shellcheck source=benches/lib.sh
. "$root/benches/lib.sh"

bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=("$root/target/release/strait")
for b in "${bins[@]}"; do [ -x "$b" ] || die "not an executable: $b (cargo build --release --locked)"; done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$RUNS'"
need nginx curl
start_backend

cat >"$work/strait.yaml" <<EOF
admin:
  address: "127.0.0.1:19921"
access_log:
  enabled: false
listeners:
  - name: bench
    address: "127.0.0.1:18421"
    routes:
      - name: all
        match:
          prefix: /
        forward:
          backend: bench
backends:
  - name: bench
    protocol: http1
    endpoints: ["127.0.0.1:18091"]
EOF

for b in "${bins[@]}"; do
  echo "== $b"
  for r in $(seq "$RUNS"); do
    taskset -c 1 "$b" --config "$work/strait.yaml" --worker-threads 1 --log-level warn &
    pid=$!
    pids+=("$pid")  # stopped by lib.sh's cleanup if a readiness check gives up
    wait_ok http://127.0.0.1:18421/
    wait_ok http://127.0.0.1:18421/ --http2-prior-knowledge
    printf 'run %d: VmRSS %s kB\n' "$r" "$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")"
    if [ "$r" -eq "$RUNS" ]; then
      awk -v bin="$(readlink -f "$b")" '
        /^[0-9a-f]+-[0-9a-f]+ / { name = ($6 == "" ? "[anonymous]" : $6); perm = $2 }
        /^Rss:/ { if (name == bin) mine[perm] += $2; else other[name] += $2 }
        END {
          for (p in mine) printf "  binary %s %6d kB\n", p, mine[p]
          for (n in other) if (other[n] > 0) printf "  %-50s %6d kB\n", n, other[n]
        }' "/proc/$pid/smaps" | sort -k1,1 -k2
    fi
    kill "$pid"
    wait "$pid" 2>/dev/null || true
  done
done
