#!/usr/bin/env bash
# Keep-alive throughput of a route with every resilience feature on against the same route
# with none of them, in the same run:
#
#   cargo build --release --locked && bash benches/resilience-overhead.sh
#
#   plain  forward to one endpoint (127.0.0.1:18091); circuit breaker at its defaults, as on
#          every backend (it cannot be turned off)
#   all    the same, plus outlier detection, an HTTP health check every second, a retry policy
#          (statuses [502, 503, 504], per-try timeout) and a rate limit per client IP set high
#          enough never to refuse (so every request takes a token), response headers on
#
# The run itself is benches/ab-keepalive.sh (knobs REPS, DUR, CONNS are passed through).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/strait-resilience-bench.XXXXXX")
pids=()
# shellcheck source=benches/lib.sh
. "$here/lib.sh"

strait_config 18401 19911 >"$work/plain.yaml"
strait_config 18402 19912 '        retry:
          retries: 2
          statuses: [502, 503, 504]
          per_try_timeout: 2s
        rate_limit:
          requests: 10000000
          per: 1s
          key: client_ip
          response_headers: true' '    outlier_detection: {consecutive_5xx: 5}
    health_check:
      http: {path: /}
      interval: 1s' >"$work/all.yaml"
bash "$here/ab-keepalive.sh" plain "$work/plain.yaml" all "$work/all.yaml"
