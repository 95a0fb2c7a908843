# Shared by the comparison scripts in benches/: sourced, not run.
#
# Needs $work (a scratch directory) and the array pids (processes to stop on exit) set by the
# caller before sourcing; stops them and removes $work on exit.

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 2; }

need() {  # commands...
  for c in "$@"; do
    command -v "$c" >/dev/null || die "$c not found (apt-get install -y nginx-light wrk curl)"
  done
}

# The start of an nginx config for one foreground worker whose files all stay in $work,
# up to and inside `http {`: the caller adds its servers and closes the block.
nginx_head() {  # name worker_connections
  cat <<NGINX
worker_processes 1;
daemon off;
pid $work/$1.pid;
error_log $work/$1-error.log;
events { worker_connections $2; }
http {
  access_log off;
  client_body_temp_path $work;
  proxy_temp_path $work;
  fastcgi_temp_path $work;
  uwsgi_temp_path $work;
  scgi_temp_path $work;
  keepalive_requests 1000000;
NGINX
}

# One nginx backend answering a 64-byte body on 127.0.0.1:18091, one worker, on CPU 0.
start_backend() {
  {
    nginx_head backend 4096
    cat <<NGINX
  server {
    listen 127.0.0.1:18091;
    location / { return 200 "$(printf 'x%.0s' $(seq 64))"; }
  }
}
NGINX
  } >"$work/backend.conf"
  taskset -c 0 nginx -c "$work/backend.conf" &
  pids+=($!)
  wait_ok http://127.0.0.1:18091/
}

# A Strait config: one listener on 127.0.0.1:PORT whose route `all` forwards everything to
# the backend of start_backend (backend `app`), admin on 127.0.0.1:ADMIN_PORT, no access log.
# ROUTE_LINES and BACKEND_LINES, if given, are added to the route and to the backend.
strait_config() {  # port admin_port [route_lines] [backend_lines]
  cat <<YAML
admin: {address: "127.0.0.1:$2"}
access_log: {enabled: false}
listeners:
  - name: bench
    address: 127.0.0.1:$1
    routes:
      - name: all
        forward: {backend: app}
${3:-}
backends:
  - name: app
    endpoints: ["127.0.0.1:18091"]
${4:-}
YAML
}

wait_ok() {  # url [curl options...]
  local url=$1
  shift
  for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$@" "$url" || true)" = 200 ] && return 0
    sleep 0.1
  done
  die "$url does not answer 200"
}

median() {  # reads numbers separated by spaces or newlines
  tr ' ' '\n' | grep -v '^$' | sort -n |
    awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'
}
