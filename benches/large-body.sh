#!/usr/bin/env bash
# Throughput of one large response through Strait builds, downloaded with curl:
#
#   bash benches/large-body.sh [BIN]...      # default: the release build
#
# nginx (one worker, CPU 0) serves a file of SIZE_MB MiB of random bytes on 127.0.0.1:18095;
# each Strait runs with one worker on CPU 1 forwarding to it (127.0.0.1:18405), and curl on
# CPU 0 downloads the file ROUNDS times through it. Prints MB/s per download (curl's
# speed_download). Knobs: SIZE_MB (256), ROUNDS (3). Needs nginx and curl.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MB=${SIZE_MB:-256}
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d "${TMPDIR:-/tmp}/strait-large-body.XXXXXX")
pids=()
# shellcheck source=benches/lib.sh
. "$root/benches/lib.sh"

bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=("$root/target/release/strait")
for b in "${bins[@]}"; do [ -x "$b" ] || die "not an executable: $b (cargo build --release --locked)"; done
need nginx curl
head -c $((SIZE_MB << 20)) /dev/urandom >"$work/file.bin"
echo ok >"$work/ok"

{
  nginx_head files 64
  cat <<NGINX
  server {
    listen 127.0.0.1:18095;
    root $work;
  }
}
NGINX
} >"$work/files.conf"
taskset -c 0 nginx -c "$work/files.conf" &
pids+=($!)
wait_ok http://127.0.0.1:18095/ok

cat >"$work/strait.yaml" <<YAML
admin: {address: "127.0.0.1:19915"}
access_log: {enabled: false}
listeners:
  - name: bench
    address: 127.0.0.1:18405
    routes:
      - forward: {backend: files}
backends:
  - name: files
    endpoints: ["127.0.0.1:18095"]
YAML

for b in "${bins[@]}"; do
  taskset -c 1 "$b" --config "$work/strait.yaml" --worker-threads 1 --log-level warn &
  pid=$!
  pids+=("$pid")
  wait_ok http://127.0.0.1:18405/ok
  for _ in $(seq "$ROUNDS"); do
    taskset -c 0 curl -sf -o /dev/null -w '%{speed_download} %{size_download}\n' \
        http://127.0.0.1:18405/file.bin |
      awk -v n="$b" -v want=$((SIZE_MB << 20)) '{
        if ($2 != want) { printf "%s: got %d bytes, expected %d\n", n, $2, want; exit 1 }
        printf "%-50s %6.0f MB/s\n", n, $1 / 1e6 }'
  done
  kill "$pid"
  wait "$pid" 2>/dev/null || true
done
