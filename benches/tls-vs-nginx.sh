#!/usr/bin/env bash
# TLS termination, Strait against nginx (Debian's package) with the same certificate, in the
# same run:
#
#   cargo build --release --locked && bash benches/tls-vs-nginx.sh
#
# Both proxies terminate TLS with examples/tls/demo-cert.pem (ECDSA P-256) and forward to one
# nginx backend (64-byte body) on 127.0.0.1:18091 over keep-alive HTTP/1.1; each runs one worker
# on CPU 1; wrk (1 thread, CONNS connections) runs on CPU 0 with the backend, alternating between
# the proxies (order swapped every round), REPS rounds of DUR seconds per test:
#   ka   keep-alive requests over TLS (one handshake per connection, then requests)
#   new  a new TLS connection per request (Connection: close): handshakes per second
# Prints every round, the medians and Strait / nginx, and each proxy's CPU time per request
# (user + system, from /proc; nginx runs as one process for that). In `new` the generator's
# CPU, shared with the backend, is the limit for both proxies (it is busy all the time), so
# req/s there says more about the generator than the proxy: the CPU per request (= per
# handshake) is the proxy's cost. CPU 0's time per request (wrk, the backend and the kernel's work
# there; softirq apart) shows what each proxy costs the generator. Knobs: REPS (5), DUR (8), CONNS (50),
# STRAIT_BIN (default target/release/strait; deploy/build-pgo.sh prints the PGO build's path).
set -euo pipefail

REPS=${REPS:-5}
DUR=${DUR:-8}
CONNS=${CONNS:-50}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${STRAIT_BIN:-$root/target/release/strait}
cert=$root/examples/tls/demo-cert.pem
key=$root/examples/tls/demo-key.pem
work=$(mktemp -d "${TMPDIR:-/tmp}/strait-tls-bench.XXXXXX")
pids=()
# shellcheck source=benches/lib.sh
. "$root/benches/lib.sh"

[ -x "$bin" ] || die "build first: cargo build --release --locked"
need nginx wrk curl
start_backend

# nginx as the TLS-terminating proxy, configured the way its documentation recommends for a
# reverse proxy: keep-alive to the upstream, TLS 1.2 and 1.3, session cache and tickets on.
{
  # One process: the CPU time read is the worker's.
  echo "master_process off;"
  nginx_head nginx-tls 8192
  cat <<NGINX
  upstream be { server 127.0.0.1:18091; keepalive 64; }
  server {
    listen 127.0.0.1:18443 ssl;
    ssl_certificate $cert;
    ssl_certificate_key $key;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    location / {
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGINX
} >"$work/nginx-tls.conf"
taskset -c 1 nginx -c "$work/nginx-tls.conf" &
pids+=($!)
proxy_pids=($!)

cat >"$work/strait.yaml" <<YAML
admin: {address: "127.0.0.1:19913"}
access_log: {enabled: false}
listeners:
  - name: bench
    address: 127.0.0.1:18444
    protocol: https
    tls:
      certificates: [{cert: "$cert", key: "$key"}]
    routes:
      - forward: {backend: app}
backends:
  - name: app
    endpoints: ["127.0.0.1:18091"]
YAML
taskset -c 1 "$bin" --config "$work/strait.yaml" --worker-threads 1 --log-level warn &
pids+=($!)
proxy_pids+=($!)

names=(nginx strait)
ports=(18443 18444)
for p in "${ports[@]}"; do
  wait_ok "https://localhost:$p/" --cacert "$root/examples/tls/demo-ca.pem"
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# CPU 0's busy and softirq ticks (the generator's and the backend's CPU, with the kernel's work
# done there, such as waking a proxy that waits for the packets wrk sends).
cpu0_ticks() { awk '$1 == "cpu0" {print $2 + $3 + $4 + $7 + $8, $8}' /proc/stat; }
per_req() {  # ticks -> microseconds per request of the run ($reqs)
  awk -v t="$1" -v n="$reqs" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}'
}
declare -A results cpu gen
for test in ka new; do
  extra=()
  [ "$test" = new ] && extra=(-H "Connection: close")
  for r in $(seq "$REPS"); do
    order=(0 1)
    [ $((r % 2)) -eq 0 ] && order=(1 0)
    for i in "${order[@]}"; do
      t0=$(cpu_ticks "${proxy_pids[i]}")
      read -r g0 q0 < <(cpu0_ticks)
      out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DUR}s" "${extra[@]}" "https://127.0.0.1:${ports[i]}/")
      read -r g1 q1 < <(cpu0_ticks)
      t1=$(cpu_ticks "${proxy_pids[i]}")
      rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
      reqs=$(awk '/requests in/ {print $1}' <<<"$out")
      us=$(per_req $((t1 - t0)))
      g=$(per_req $((g1 - g0)))
      q=$(per_req $((q1 - q0)))
      errs=$(awk '/Socket errors|Non-2xx/ {print}' <<<"$out" | tr -s ' ' | tr '\n' ' ')
      results[$test,$i]+="$rps "
      cpu[$test,$i]+="$us "
      gen[$test,$i]+="$g "
      printf '%-3s round %d %-6s %s req/s, proxy CPU %s us/req, CPU 0 %s us/req (softirq %s) %s\n' \
        "$test" "$r" "${names[i]}" "$rps" "$us" "$g" "$q" "$errs"
    done
  done
done

echo
echo "| test | nginx, median req/s | strait, median req/s | strait / nginx | CPU us/req nginx | CPU us/req strait | CPU 0 us/req nginx | CPU 0 us/req strait | nginx rounds | strait rounds |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for test in ka new; do
  n=$(printf '%s' "${results[$test,0]}" | median)
  s=$(printf '%s' "${results[$test,1]}" | median)
  ratio=$(awk -v s="$s" -v n="$n" 'BEGIN {printf "%.2f", s / n}')
  cn=$(printf '%s' "${cpu[$test,0]}" | median)
  cs=$(printf '%s' "${cpu[$test,1]}" | median)
  gn=$(printf '%s' "${gen[$test,0]}" | median)
  gs=$(printf '%s' "${gen[$test,1]}" | median)
  echo "| $test | $n | $s | $ratio | $cn | $cs | $gn | $gs | ${results[$test,0]}| ${results[$test,1]}|"
done
