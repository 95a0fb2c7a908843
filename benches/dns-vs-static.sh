#!/usr/bin/env bash
# Keep-alive throughput of a DNS backend against a static backend with the same address, in
# the same run, to show that name resolution is off the request path:
#
#   cargo build --release --locked && bash benches/dns-vs-static.sh
#
#   static  endpoints: [127.0.0.1:18091]
#   dns     dns: localhost:18091, ip_family: ipv4 (from /etc/hosts), looked up again every
#           second (min_refresh = max_refresh = 1s), so lookups do happen during the run
#
# The run itself is benches/ab-keepalive.sh (knobs REPS, DUR, CONNS are passed through).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/strait-dns-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

config() {  # $1 listen port, $2 admin port, $3 backend lines
  cat <<YAML
admin: {address: "127.0.0.1:$2"}
access_log: {enabled: false}
listeners:
  - name: bench
    address: 127.0.0.1:$1
    routes:
      - forward: {backend: app}
backends:
  - name: app
$3
dns: {ip_family: ipv4, min_refresh: 1s, max_refresh: 1s}
YAML
}
config 18401 19911 '    endpoints: ["127.0.0.1:18091"]' >"$work/static.yaml"
config 18402 19912 '    dns: localhost:18091' >"$work/dns.yaml"
bash "$here/ab-keepalive.sh" static "$work/static.yaml" dns "$work/dns.yaml"
