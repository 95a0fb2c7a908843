#!/usr/bin/env bash
# Builds Strait with profile-guided optimisation (PGO):
#
#   deploy/build-pgo.sh                                   # for this machine
#   TARGET=x86_64-unknown-linux-musl deploy/build-pgo.sh  # what the Dockerfile runs
#
# 1. builds an instrumented release binary (target/pgo-generate/),
# 2. runs it on a training load it serves itself: HTTP/1.1 keep-alive and new connections,
#    HTTP/2 with prior knowledge, HTTPS (h2 and http/1.1), request bodies, forwarding to HTTP/1.1
#    and h2c upstreams, a route with retries, a rate limit and outlier detection, a TCP relay
#    (the upstream is a direct-response listener of the same process, so nothing but curl and
#    optionally h2load is needed),
# 3. merges the profile with llvm-profdata and builds the release binary with it. When the
#    linker is LLD (Rust's default for x86_64-unknown-linux-gnu), it also orders the functions:
#    first those a plain proxy runs to start and answer its first requests (a short run of its
#    own before the training, HTTP/1.1 and h2c forwarding only), then the rest the training ran,
#    hottest first in each group; the code that never ran comes after.
#
# Prints the path of the binary: target/<TARGET>/release/strait.
#
# Why: LLVM optimises the code the load ran for speed and the code it never ran for size. On
# this project's benchmarks (docs/performance.md) that gave 9 to 14% more keep-alive requests
# per second. The order is for memory: most of an idle proxy's resident memory is the pages of
# its own code touched at startup, and the kernel maps 64 KB or more around each touched page;
# with the start-up code in one place the idle RSS was 1.2 to 2.1 MB smaller (docs/performance.md).
#
# Needs: curl, and llvm-profdata of an LLVM that reads the toolchain's profiles. It is looked
# up in this order: $LLVM_PROFDATA; the toolchain's own (`rustup component add llvm-tools`);
# the newest /usr/lib/llvm-*/bin/llvm-profdata (Debian's llvm-19 reads Rust 1.95's profiles).
# Knobs: TARGET (default: the host), REQUESTS (training requests per kind, default 20000),
# PGO_PORT_BASE (default 18770: the training listeners use it and the next four ports).
set -euo pipefail

die() { printf 'build-pgo: %s\n' "$*" >&2; exit 2; }
say() { printf 'build-pgo: %s\n' "$*" >&2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${TARGET:-$(rustc -vV | awk '/^host:/ {print $2}')}
requests=${REQUESTS:-20000}
[[ $requests =~ ^[1-9][0-9]*$ ]] || die "REQUESTS must be a positive integer, got '$requests'"
base=${PGO_PORT_BASE:-18770}
[[ $base =~ ^[0-9]+$ ]] && [ "$base" -ge 1024 ] && [ "$base" -le 65530 ] ||
  die "PGO_PORT_BASE must be a port number from 1024 to 65530, got '$base'"
command -v curl >/dev/null || die "curl not found"

profdata=${LLVM_PROFDATA:-}
if [ -z "$profdata" ]; then
  sysroot=$(rustc --print sysroot)
  for p in "$sysroot"/lib/rustlib/*/bin/llvm-profdata $(ls -d /usr/lib/llvm-*/bin/llvm-profdata 2>/dev/null | sort -t- -k2 -n -r); do
    [ -x "$p" ] && { profdata=$p; break; }
  done
fi
[ -n "$profdata" ] && [ -x "$profdata" ] ||
  die "llvm-profdata not found: rustup component add llvm-tools (or set LLVM_PROFDATA)"

work=$(mktemp -d "${TMPDIR:-/tmp}/strait-pgo.XXXXXX")
# A fixed directory, so that RUSTFLAGS (which name it) stay the same between runs and the
# instrumented build is incremental.
profiles=$root/target/pgo-generate/profiles
rm -rf "$profiles"
server=""
cleanup() {
  if [ -n "$server" ]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# RUSTFLAGS replaces the target's rustflags of .cargo/config.toml: its glibc-only linker flag
# (packed relative relocations) is added here for glibc targets (musl's loader lacks RELR).
case $target in
  *-linux-gnu) RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-z,pack-relative-relocs" ;;
esac
export RUSTFLAGS="${RUSTFLAGS:-}"

# Instrumenting only the target (hence --target): build scripts and proc macros stay plain.
say "1/3 instrumented build for $target"
(cd "$root" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$profiles" \
  cargo build --release --locked --target "$target" --target-dir "$root/target/pgo-generate") >&2
instrumented=$root/target/pgo-generate/$target/release/strait

front=127.0.0.1:$base
front_tls=127.0.0.1:$((base + 1))
origin=127.0.0.1:$((base + 2))
admin=127.0.0.1:$((base + 3))
relay=127.0.0.1:$((base + 4))
body=$(printf 'x%.0s' $(seq 64))
# The end of both configurations below: the direct-response origin, the last listener, and
# the first backend, which forwards to it.
origin_yaml=$(cat <<EOF
  - name: origin
    address: "$origin"
    routes:
      - name: origin
        match:
          prefix: /
        direct_response:
          status: 200
          body: "$body"
backends:
  - name: origin
    protocol: http1
    endpoints: ["$origin"]
EOF
)

# Another process on one of these ports would answer the readiness checks and take the load.
for port in $(seq "$base" $((base + 4))); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "127.0.0.1:$port is in use; stop what listens there or set PGO_PORT_BASE"
  fi
done

start_instrumented() {  # config [VAR=value...]
  local config=$1
  shift
  "$instrumented" validate "$config" >&2
  env "$@" "$instrumented" --config "$config" --log-level warn >/dev/null &
  server=$!
  for _ in $(seq 100); do
    curl -sf -o /dev/null "http://$admin/ready" && break
    kill -0 "$server" 2>/dev/null || die "the instrumented Strait exited; see its log above"
    sleep 0.1
  done
  curl -sf -o /dev/null "http://$admin/ready" || die "the instrumented Strait is not ready after 10 s"
  kill -0 "$server" 2>/dev/null || die "the instrumented Strait exited; see its log above"
}

# The profile is written when the process exits normally: stop it as an orchestrator would.
stop_instrumented() {
  kill -TERM "$server"
  wait "$server" || die "the instrumented Strait did not exit cleanly after SIGTERM"
  server=""
}

# A plain proxy's start-up and first requests, profiled on their own: the functions this run
# touches are laid out first, in one place (see the header).
startup_profiles=$root/target/pgo-generate/profiles-startup
rm -rf "$startup_profiles"
cat >"$work/startup.yaml" <<EOF
# Written by deploy/build-pgo.sh: a plain proxy's start-up, profiled on its own.
admin:
  address: "$admin"
access_log:
  enabled: false
listeners:
  - name: front
    address: "$front"
    routes:
      - name: all
        match:
          prefix: /
        forward:
          backend: origin
$origin_yaml
EOF
say "2/3 start-up run, then the training load"
start_instrumented "$work/startup.yaml" "LLVM_PROFILE_FILE=$startup_profiles/%p.profraw"
for i in 1 2 3 4 5 6; do
  [ "$(curl -sS -o /dev/null -w '%{http_code}' "http://$front/s/$i")" = 200 ] ||
    die "start-up run: request $i not answered 200"
done
[ "$(curl -sS --http2-prior-knowledge -o /dev/null -w '%{http_code}' "http://$front/s/h2c")" = 200 ] ||
  die "start-up run: the h2c request was not answered 200"
stop_instrumented
ls "$startup_profiles"/*.profraw >/dev/null 2>&1 || die "no profile written to $startup_profiles"
cat >"$work/train.yaml" <<EOF
# Written by deploy/build-pgo.sh: the training load's configuration.
admin:
  address: "$admin"
listeners:
  - name: front
    address: "$front"
    routes:
      - name: to-h2c
        match:
          prefix: /h2c
        forward:
          backend: origin-h2c
      - name: guarded
        match:
          prefix: /guarded
        forward:
          backend: origin-guarded
        retry:
          retries: 2
          statuses: [502, 503, 504]
          per_try_timeout: 2s
        rate_limit:
          requests: 10000000
          per: 1s
          key: client_ip
          response_headers: true
      - name: to-http1
        match:
          prefix: /
        forward:
          backend: origin
  - name: front-tls
    address: "$front_tls"
    protocol: https
    routes_from: front
    tls:
      certificates:
        - cert: "$root/examples/tls/demo-cert.pem"
          key: "$root/examples/tls/demo-key.pem"
  - name: relay
    address: "$relay"
    protocol: tcp
    tcp:
      backend: origin
$origin_yaml
  - name: origin-h2c
    protocol: h2c
    endpoints: ["$origin"]
  - name: origin-guarded
    endpoints: ["$origin"]
    outlier_detection: {consecutive_5xx: 5}
    health_check:
      http: {path: /}
      interval: 1s
EOF

start_instrumented "$work/train.yaml"

head -c 8192 /dev/zero | tr '\0' 'y' >"$work/body"
# Each kind: `requests` requests (fewer for new connections and bodies), every answer checked.
# URL globbing reuses connections; `-Z` (in the arguments) runs 16 transfers at once.
train() {  # name count curl-args... URL-prefix (last)
  local name=$1 count=$2
  shift 2
  local url=${*: -1}
  local args=("${@:1:$#-1}")
  local ok
  ok=$(curl -sS --no-progress-meter "${args[@]}" -o /dev/null -w '%{http_code}\n' "$url[1-$count]" |
    grep -c '^200$' || true)
  [ "$ok" -eq "$count" ] || die "training '$name': $ok of $count requests answered 200"
  say "  $name: $count requests"
}
n=$requests
par=(-Z --parallel-max 16)
ca=(--cacert "$root/examples/tls/demo-ca.pem")
train "http/1.1 keep-alive" "$n" "${par[@]}" "http://$front/a/"
train "http/1.1 to an h2c upstream" "$n" "${par[@]}" "http://$front/h2c/"
# curl 7.88 fails every request after the first on a reused --http2-prior-knowledge connection
# ("Error in the HTTP2 framing layer", against nginx too): h2load when present, else one
# connection per request.
if command -v h2load >/dev/null; then
  h2load -n "$n" -c 8 -m 8 "http://$front/b/" | grep -q "succeeded, 0 failed" ||
    die "training 'h2 prior knowledge': h2load saw failures"
  say "  h2 prior knowledge: $n requests (h2load)"
else
  for i in $(seq 200); do
    [ "$(curl -sS --http2-prior-knowledge -o /dev/null -w '%{http_code}' "http://$front/b/$i")" = 200 ] ||
      die "training 'h2 prior knowledge': request $i not answered 200"
  done
  say "  h2 prior knowledge: 200 requests, one connection each"
fi
train "https h2" "$n" "${par[@]}" "${ca[@]}" "https://$front_tls/c/"
train "https http/1.1" "$n" "${par[@]}" --http1.1 "${ca[@]}" "https://$front_tls/d/"
train "new connections" $((n / 10)) "${par[@]}" -H 'Connection: close' "http://$front/e/"
train "new https connections" $((n / 10)) "${par[@]}" --no-sessionid -H 'Connection: close' \
  "${ca[@]}" "https://$front_tls/f/"
train "request bodies" $((n / 10)) "${par[@]}" --data-binary "@$work/body" "http://$front/g/"
train "retries, rate limit, outlier detection" "$n" "${par[@]}" "http://$front/guarded/"
train "tcp relay" "$n" "${par[@]}" "http://$relay/h/"
train "tcp relay, new connections" $((n / 10)) "${par[@]}" -H 'Connection: close' "http://$relay/i/"
curl -sf -o /dev/null "http://$admin/metrics"
curl -sf -o /dev/null "http://$admin/config"

stop_instrumented
ls "$profiles"/*.profraw >/dev/null 2>&1 || die "no profile written to $profiles"
"$profdata" merge -o "$work/strait.profdata" "$profiles"/*.profraw "$startup_profiles"/*.profraw
"$profdata" merge -o "$work/startup.profdata" "$startup_profiles"/*.profraw

# "count<TAB>symbol" per function of a profile: its largest block count (0: it never ran), and
# its symbol without the "file;" prefix the profile gives functions local to a unit.
counts() {  # profdata
  "$profdata" show --all-functions --counts "$1" | awk '
    /^  [^ ].*:$/ { name = substr($0, 3, length($0) - 3); sub(/^.*;/, "", name); next }
    /^    Block counts: / && name != "" {
      list = $0; sub(/^[^[]*\[/, "", list); sub(/\].*$/, "", list)
      n = split(list, c, /, */); max = 0
      for (i = 1; i <= n; i++) if (c[i] + 0 > max) max = c[i] + 0
      printf "%.0f\t%s\n", max, name; name = ""
    }'
}

link_order=""
if grep -qa 'Linker: LLD' "$instrumented"; then
  counts "$work/startup.profdata" | awk -F'\t' '$1 > 0 {print $2}' >"$work/startup.names"
  # Start-up functions first, then the rest of what the training ran; hottest first in each.
  counts "$work/strait.profdata" |
    awk -F'\t' 'NR == FNR {first[$1] = 1; next} $1 > 0 {print ($2 in first ? 0 : 1) "\t" $0}' \
      "$work/startup.names" - |
    sort -t$'\t' -k1,1n -k2,2nr | cut -f3 >"$work/order.txt"
  [ -s "$work/startup.names" ] || die "the start-up profile is empty; cannot order the code"
  say "  function order: $(wc -l <"$work/startup.names") start-up functions first, $(wc -l <"$work/order.txt") in all"
  # Functions the optimiser inlined everywhere are absent from the binary: no warning for them.
  link_order="-C link-arg=-Wl,--symbol-ordering-file=$work/order.txt -C link-arg=-Wl,--no-warn-symbol-ordering"
else
  say "  the linker is not LLD: the functions keep the linker's order"
fi

# The profile's path is new on every run ($work): cargo sees RUSTFLAGS change and rebuilds, where
# a fixed path would leave a binary built with the previous profile in place.
say "3/3 optimised build"
(cd "$root" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$work/strait.profdata $link_order" \
  cargo build --release --locked --target "$target") >&2
echo "$root/target/$target/release/strait"
