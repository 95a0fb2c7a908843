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
# Prints every round, the medians and Strait / nginx. Knobs: REPS (5), DUR (8), CONNS (50),
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

names=(nginx strait)
ports=(18443 18444)
for p in "${ports[@]}"; do
  wait_ok "https://localhost:$p/" --cacert "$root/examples/tls/demo-ca.pem"
done

declare -A results
for test in ka new; do
  extra=()
  [ "$test" = new ] && extra=(-H "Connection: close")
  for r in $(seq "$REPS"); do
    order=(0 1)
    [ $((r % 2)) -eq 0 ] && order=(1 0)
    for i in "${order[@]}"; do
      out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DUR}s" "${extra[@]}" "https://127.0.0.1:${ports[i]}/")
      rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
      errs=$(awk '/Socket errors|Non-2xx/ {print}' <<<"$out" | tr -s ' ' | tr '\n' ' ')
      results[$test,$i]+="$rps "
      printf '%-3s round %d %-6s %s req/s %s\n' "$test" "$r" "${names[i]}" "$rps" "$errs"
    done
  done
done

echo
echo "| test | nginx, median req/s | strait, median req/s | strait / nginx | nginx rounds | strait rounds |"
echo "|---|---|---|---|---|---|"
for test in ka new; do
  n=$(printf '%s' "${results[$test,0]}" | median)
  s=$(printf '%s' "${results[$test,1]}" | median)
  ratio=$(awk -v s="$s" -v n="$n" 'BEGIN {printf "%.2f", s / n}')
  echo "| $test | $n | $s | $ratio | ${results[$test,0]}| ${results[$test,1]}|"
done
