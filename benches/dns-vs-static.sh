#!/usr/bin/env bash
# Keep-alive throughput of a DNS backend against a static backend with the same address, in
# the same run, to show that name resolution is off the request path.
#
#   cargo build --release --locked && bash benches/dns-vs-static.sh
#
# One nginx backend (64-byte body) on 127.0.0.1:18091; two Strait processes, each with one
# worker on CPU 1:
#   static  127.0.0.1:18401  endpoints: [127.0.0.1:18091]
#   dns     127.0.0.1:18402  dns: localhost:18091, ip_family: ipv4 (from /etc/hosts, refreshed
#                            in the background every min_refresh = 1s, so lookups do happen
#                            during the run)
# wrk (1 thread, 50 connections, on CPU 0) alternates between them for REPS rounds of DUR
# seconds and the medians are printed with their ratio. Knobs: REPS (5), DUR (10), CONNS (50).
# Needs nginx and wrk (apt-get install -y nginx-light wrk, or run ../shared/bench/bench.sh once).
set -euo pipefail

REPS=${REPS:-5}
DUR=${DUR:-10}
CONNS=${CONNS:-50}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$root/target/release/strait
work=$(mktemp -d "${TMPDIR:-/tmp}/strait-dns-bench.XXXXXX")
pids=()

die() { printf 'dns-vs-static: %s\n' "$*" >&2; exit 2; }
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

[ -x "$bin" ] || die "build first: cargo build --release --locked"
command -v nginx >/dev/null || die "nginx not found (apt-get install -y nginx-light)"
command -v wrk >/dev/null || die "wrk not found (apt-get install -y wrk)"

mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx;
  proxy_temp_path $work/nginx;
  fastcgi_temp_path $work/nginx;
  uwsgi_temp_path $work/nginx;
  scgi_temp_path $work/nginx;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:18091;
    location / { return 200 "$(printf 'x%.0s' $(seq 64))"; }
  }
}
EOF
taskset -c 0 nginx -c "$work/nginx/nginx.conf" &
pids+=($!)

config() {  # $1 listen port, $2 admin port, $3 backend lines
  cat <<EOF
admin:
  address: 127.0.0.1:$2
access_log:
  enabled: false
listeners:
  - name: bench
    address: 127.0.0.1:$1
    routes:
      - forward:
          backend: app
backends:
  - name: app
$3
dns:
  ip_family: ipv4
  min_refresh: 1s
  max_refresh: 1s
EOF
}
config 18401 19911 '    endpoints: ["127.0.0.1:18091"]' >"$work/static.yaml"
config 18402 19912 '    dns: localhost:18091' >"$work/dns.yaml"
for t in static dns; do
  taskset -c 1 "$bin" --config "$work/$t.yaml" --worker-threads 1 --log-level warn &
  pids+=($!)
done

wait_ok() {  # $1 url
  for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)" = 200 ] && return 0
    sleep 0.1
  done
  die "$1 does not answer 200"
}
wait_ok http://127.0.0.1:18091/
wait_ok http://127.0.0.1:19912/ready
wait_ok http://127.0.0.1:18401/
wait_ok http://127.0.0.1:18402/

declare -A results
for r in $(seq "$REPS"); do
  order=(static dns)
  [ $((r % 2)) -eq 0 ] && order=(dns static)
  for t in "${order[@]}"; do
    port=18401
    [ "$t" = dns ] && port=18402
    rps=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DUR}s" "http://127.0.0.1:$port/" |
      awk '/Requests\/sec/ {print $2}')
    results[$t]+="$rps "
    printf 'round %d %-6s %s req/s\n' "$r" "$t" "$rps"
  done
done

lookups=$(curl -s http://127.0.0.1:19912/metrics |
  awk '/^strait_dns_lookups_total\{.*result="success"/ {print $2}')
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
s=$(printf '%s' "${results[static]}" | median)
d=$(printf '%s' "${results[dns]}" | median)
echo
echo "| backend | req/s median of $REPS x ${DUR}s | all rounds |"
echo "|---|---|---|"
echo "| static | $s | ${results[static]}|"
echo "| dns | $d | ${results[dns]}|"
awk -v s="$s" -v d="$d" 'BEGIN {printf "\ndns / static = %.3f\n", d / s}'
echo "successful lookups of localhost by the dns process during the run: $lookups"
