#!/usr/bin/env bash
# Where a keep-alive request's CPU goes, for Strait builds and for nginx as the proxy:
#
#   bash benches/cpu-split.sh [BIN | nginx | nginx-headers]...
#
# Each target runs with one worker on CPU 1 in front of the nginx backend of benches/lib.sh
# (127.0.0.1:18091, 64-byte body, CPU 0), listening on 127.0.0.1:18402. wrk (1 thread, CONNS
# connections, CPU 0) warms it for 3 s, then loads it for DUR seconds; the proxy's user and
# system CPU time over that run (/proc/PID/stat) are divided by the requests wrk completed.
# With SYSCALLS=1 a second run counts the proxy's syscalls per request (perf stat on the
# syscalls:sys_enter_* tracepoints; needs perf and root). Targets are measured one after the
# other, ROUNDS times in turn. Knobs: DUR (8), CONNS (50), ROUNDS (2), SYSCALLS (0).
# `nginx-headers` is nginx made to add what Strait adds to every forwarded request by default:
# a generated X-Request-Id (also returned to the client), X-Forwarded-For, -Proto and -Host, and
# a traceparent (a fixed one: nginx cannot start a trace without a module), so that the two
# proxies write the same bytes. Also printed: the proxy's sleeps (voluntary context switches)
# per second, how idle each CPU was, and per request: each CPU's busy time (all its work:
# the proxy on CPU 1; wrk, the backend and the loopback deliveries they send on CPU 0), the
# context switches of the whole machine and the TCP segments sent. When both CPUs are busy
# nearly all the time, the throughput is what the two allow together, not the proxy's CPU
# time alone.
# BIN defaults to the release build. Needs nginx, wrk and curl.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DUR=${DUR:-8}
CONNS=${CONNS:-50}
ROUNDS=${ROUNDS:-2}
SYSCALLS=${SYSCALLS:-0}
work=$(mktemp -d "${TMPDIR:-/tmp}/strait-cpu-split.XXXXXX")
pids=()
# shellcheck source=benches/lib.sh
. "$root/benches/lib.sh"

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("$root/target/release/strait")
for t in "${targets[@]}"; do
  [ "$t" = nginx ] || [ "$t" = nginx-headers ] || [ -x "$t" ] || die "not an executable: $t (build first: cargo build --release --locked)"
done
need nginx wrk curl
[ "$SYSCALLS" = 0 ] || need perf

strait_config 18402 19912 >"$work/strait.yaml"
{
  # One process: the CPU time read is the worker's.
  echo "master_process off;"
  nginx_head proxy 8192
  cat <<NGINX
  upstream be { server 127.0.0.1:18091; keepalive 256; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:18402 backlog=4096;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
} >"$work/proxy.conf"
sed 's|proxy_set_header Connection "";|&\
      proxy_set_header X-Request-Id $request_id; add_header X-Request-Id $request_id;\
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\
      proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $http_host;\
      proxy_set_header traceparent "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";|' \
  "$work/proxy.conf" >"$work/proxy-headers.conf"

start_backend

cpu_ticks() { awk '{print $14 + 0, $15 + 0}' "/proc/$1/stat"; }
# Times the proxy's threads went to sleep (voluntary context switches, all threads).
sleeps() { cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt_switches/ {n += $2} END {print n + 0}'; }
# Idle ticks of CPU 0 and CPU 1 (idle and iowait columns of /proc/stat).
idle_ticks() { awk '$1 == "cpu0" {a = $5 + $6} $1 == "cpu1" {b = $5 + $6} END {print a + 0, b + 0}' /proc/stat; }
# Context switches on all CPUs, and TCP segments sent (all sockets: on loopback each is also
# received once).
switches() { awk '$1 == "ctxt" {print $2}' /proc/stat; }
segments() { awk '$1 == "Tcp:" && $2 ~ /^[0-9]+$/ {print $12}' /proc/net/snmp; }

measure() {  # target
  local t=$1 conf pid reqs u0 s0 u1 s1 v0 v1 i00 i10 i01 i11 c0 c1 g0 g1
  if [ "$t" = nginx ] || [ "$t" = nginx-headers ]; then
    conf=$work/proxy.conf
    [ "$t" = nginx ] || conf=$work/proxy-headers.conf
    taskset -c 1 nginx -c "$conf" &
  else
    taskset -c 1 "$t" --config "$work/strait.yaml" --worker-threads 1 --log-level warn &
  fi
  pid=$!
  pids+=("$pid")
  wait_ok http://127.0.0.1:18402/
  taskset -c 0 wrk -t1 -c"$CONNS" -d3s http://127.0.0.1:18402/ >/dev/null
  read -r u0 s0 < <(cpu_ticks "$pid")
  v0=$(sleeps "$pid")
  read -r i00 i10 < <(idle_ticks)
  c0=$(switches)
  g0=$(segments)
  taskset -c 0 wrk -t1 -c"$CONNS" -d"${DUR}s" http://127.0.0.1:18402/ >"$work/wrk.out"
  read -r u1 s1 < <(cpu_ticks "$pid")
  v1=$(sleeps "$pid")
  read -r i01 i11 < <(idle_ticks)
  c1=$(switches)
  g1=$(segments)
  reqs=$(awk '/requests in/ {print $1}' "$work/wrk.out")
  awk -v n="$(basename "$t")" -v r="$reqs" -v d="$DUR" -v u=$((u1 - u0)) -v s=$((s1 - s0)) \
      -v v=$((v1 - v0)) -v i0=$((i01 - i00)) -v i1=$((i11 - i10)) -v c=$((c1 - c0)) -v g=$((g1 - g0)) \
      -v hz="$(getconf CLK_TCK)" 'BEGIN {
    printf "%-14s %9.0f req/s   user %5.2f us/req   sys %5.2f us/req   sleeps %6.0f/s   idle cpu0 %4.1f%% cpu1 %4.1f%%\n",
      n, r / d, u * 1e6 / hz / r, s * 1e6 / hz / r, v / d, i0 * 100 / hz / d, i1 * 100 / hz / d
    printf "%-14s busy cpu0 %5.2f us/req   cpu1 %5.2f us/req   context switches %5.3f/req   TCP segments %5.3f/req\n",
      "", (d * hz - i0) * 1e6 / hz / r, (d * hz - i1) * 1e6 / hz / r, c / r, g / r }'
  if [ "$SYSCALLS" != 0 ]; then
    taskset -c 0 wrk -t1 -c"$CONNS" -d"${DUR}s" http://127.0.0.1:18402/ >"$work/wrk.out" &
    local w=$!
    perf stat -e 'syscalls:sys_enter_*' -p "$pid" -o "$work/perf.txt" -- sleep $((DUR - 2)) >/dev/null 2>&1
    wait "$w"
    # The requests of the perf window, taken at wrk's average rate.
    local rate
    rate=$(awk -v d="$DUR" '/requests in/ {print $1 / d}' "$work/wrk.out")
    awk -v r="$rate" -v d=$((DUR - 2)) '$1 ~ /^[0-9,]+$/ {
      n = $1; gsub(",", "", n); if (n / (r * d) >= 0.01) printf "    %-34s %6.3f per request\n", $2, n / (r * d) }' \
      "$work/perf.txt"
  fi
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

echo "# keep-alive, one worker on CPU 1, wrk -c$CONNS on CPU 0, ${DUR}s per run"
for _ in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do measure "$t"; done
done
