#!/usr/bin/env bash
# Load test of llm-relay (`make bench`): the same fast mock Anthropic upstream reached directly
# (the limit), through nginx `proxy_pass` (the baseline) and through the relay with its full chain
# (auth, limits, session key, sticky binding, rewrite, metering, cost, usage records on SQLite).
# wrk drives each at 1 and 64 connections with 2 KiB non-stream requests and stream requests
# (20 SSE events); one table gives requests/s, p50, p99, the relay/nginx ratios, CPU seconds per
# 10 000 requests and the relay's peak RSS, and (with strace) the relay's system calls per
# request, a count the noise of a shared machine does not move. Then a memory scenario holds
# 10 000 SSE streams open through the relay against a slow mock and reports the relay's RSS, a
# second one as many idle keep-alive connections (one request each), and a soak of five minutes
# of mixed load watches the relay's RSS for growth per request.
#
# Everything listens on and talks to 127.0.0.1 only. Every run is bounded (BENCH_DURATION
# seconds each, default 10) and all processes started here are stopped on exit.
#
# Environment: BENCH_DURATION (s per run), BENCH_STREAMS (memory scenarios, default 10000; 0 to
# skip), BENCH_SOAK (s of mixed load watching the relay's RSS for per-request growth, default
# 300; 0 to skip), BENCH_PAIRS (back-to-back nginx and relay runs of 3 s at 64 connections whose
# median ratio the throughput targets are judged on, default 5; 0 to judge the table's runs),
# BENCH_HOLD_BYTES (request body of each held stream, default 2048), BENCH_RELAY_LOG
# (relay log filter, default info: one line per request, like nginx's access log), BENCH_KEEP=1
# keeps the work directory (logs, configs, wrk output), BENCH_RELAY_BIN runs another relay
# binary (an older build, to compare).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/llm-relay/target}
RELAY_BIN=${BENCH_RELAY_BIN:-$TARGET_DIR/release/llm-relay}
MOCK_BIN=$TARGET_DIR/release/examples/load_mock
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
DURATION=${BENCH_DURATION:-10}
STREAMS=${BENCH_STREAMS:-10000}
PAIRS=${BENCH_PAIRS:-5}
RELAY_LOG_FILTER=${BENCH_RELAY_LOG:-info}
ADMIN_TOKEN=bench-admin-token-0123456789abcdef
HZ=$(getconf CLK_TCK)

for bin in "$RELAY_BIN" "$MOCK_BIN" "$NGINX_BIN"; do
    [ -x "$bin" ] || { echo "missing $bin (run: make bench)" >&2; exit 1; }
done
command -v wrk >/dev/null || { echo "missing wrk (benches/load/install.sh)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/llm-relay-bench.XXXXXX)
chmod 755 "$WORK" # nginx workers may run as another user
PIDS=()
SOAK_PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Private copies: a rebuild of the shared target directory must not change the binaries mid-run.
cp "$RELAY_BIN" "$WORK/llm-relay"
cp "$MOCK_BIN" "$WORK/load_mock"
RELAY_BIN=$WORK/llm-relay
MOCK_BIN=$WORK/load_mock

log() { echo "== $*" >&2; }
port() { "$MOCK_BIN" free-port; }

# Waits (bounded) until a URL answers 2xx.
wait_http() {
    local url=$1 what=$2 i
    for i in $(seq 1 300); do
        curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$what did not become ready ($url)" >&2
    exit 1
}

# utime + stime, then stime alone (clock ticks) of the given pids.
cpu_ticks() {
    local total=0 sys=0 p stat rest
    for p in "$@"; do
        stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        rest=${stat##*) }
        # shellcheck disable=SC2086
        set -- $rest
        total=$((total + ${12} + ${13}))
        sys=$((sys + ${13}))
    done
    echo "$total $sys"
}

# A pid and its direct children (nginx master + workers).
with_children() {
    echo "$1"
    tr ' ' '\n' <"/proc/$1/task/$1/children" | sed '/^$/d'
}

# CPU ticks of a process by thread name ("relay proxy", "sqlx-sqlite-wor", ...), one "name ticks"
# line per name.
thread_ticks() {
    local t
    for t in /proc/"$1"/task/*; do
        awk '{ s = $0; name = s; sub(/^[^(]*\(/, "", name); sub(/\) .*$/, "", name); gsub(/ /, "_", name)
               sub(/^.*\) /, "", s); split(s, f, " "); print name, f[12] + f[13] }' "$t/stat" 2>/dev/null
    done | awk '{ n[$1] += $2 } END { for (k in n) print k, n[k] }'
}

status_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# ---------------------------------------------------------------------------------------------
# Upstream, baseline, relay
# ---------------------------------------------------------------------------------------------

MOCK_PORT=$(port)
"$MOCK_BIN" serve --addr "127.0.0.1:$MOCK_PORT" --threads 2 >"$WORK/mock.log" 2>&1 &
PIDS+=($!)

NGINX_PORT=$(port)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<CONF
worker_processes 2;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 16384; }
http {
    access_log $WORK/nginx/access.log;
    client_body_temp_path $WORK/nginx/client_body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    client_max_body_size 32m;
    upstream mock {
        server 127.0.0.1:$MOCK_PORT;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Stream answers chunk by chunk, as the relay does.
            proxy_buffering off;
        }
    }
}
CONF
"$NGINX_BIN" -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" \
    -g 'daemon off;' >"$WORK/nginx/stdout.log" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")

# Starts a relay on fresh ports and data dir; sets RELAY_PID, RELAY_PORT, RELAY_KEY.
start_relay() {
    local name=$1 upstream_port=$2 admin_port data user_id out
    RELAY_PORT=$(port)
    admin_port=$(port)
    data="$WORK/$name-data"
    mkdir -p "$data"
    env -i PATH="$PATH" HOME="$HOME" \
        RELAY_PROXY_ADDR="127.0.0.1:$RELAY_PORT" RELAY_ADMIN_ADDR="127.0.0.1:$admin_port" \
        RELAY_DATA_DIR="$data" RELAY_ADMIN_TOKEN="$ADMIN_TOKEN" \
        RELAY_ADMIN_PASSWORD=bench-admin-password RELAY_LOG="$RELAY_LOG_FILTER" \
        "$RELAY_BIN" serve >"$WORK/$name.log" 2>&1 &
    RELAY_PID=$!
    PIDS+=("$RELAY_PID")
    wait_http "http://127.0.0.1:$admin_port/readyz" "relay admin"
    wait_http "http://127.0.0.1:$RELAY_PORT/healthz" "relay proxy"
    local admin=(curl -fsS --max-time 5 -H "authorization: Bearer $ADMIN_TOKEN"
        -H 'content-type: application/json')
    out=$("${admin[@]}" "http://127.0.0.1:$admin_port/api/admin/users" \
        -d '{"username":"bench","password":"bench-password-1","price_rate":10000}')
    user_id=$(sed -n 's/.*"id":"\([^"]*\)".*/\1/p' <<<"$out")
    out=$("${admin[@]}" "http://127.0.0.1:$admin_port/api/admin/api-keys" \
        -d "{\"user_id\":\"$user_id\",\"name\":\"bench\"}")
    RELAY_KEY=$(sed -n 's/.*"key":"\([^"]*\)".*/\1/p' <<<"$out")
    "${admin[@]}" -o /dev/null "http://127.0.0.1:$admin_port/api/admin/accounts" \
        -d "{\"name\":\"mock\",\"type\":\"claude\",\"base_url\":\"http://127.0.0.1:$upstream_port\",\"credential\":\"sk-ant-mock-credential\"}"
    [ -n "$user_id" ] && [ -n "$RELAY_KEY" ] || { echo "relay setup failed: $out" >&2; exit 1; }
    # The caches refresh in the background: wait until a request goes through end to end.
    local i
    for i in $(seq 1 100); do
        if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$RELAY_PORT/v1/messages" \
            -H "x-api-key: $RELAY_KEY" -H 'content-type: application/json' \
            --data-binary "@$WORK/body.json"; then
            return 0
        fi
        sleep 0.1
    done
    echo "relay never served a request (see $WORK/$name.log)" >&2
    exit 1
}

"$MOCK_BIN" body --bytes 2048 >"$WORK/body.json"
"$MOCK_BIN" body --bytes 2048 --stream >"$WORK/body-stream.json"
start_relay relay "$MOCK_PORT"
for i in $(seq 1 100); do
    curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$NGINX_PORT/v1/messages" \
        --data-binary "@$WORK/body.json" 2>/dev/null && break
    [ "$i" = 100 ] && { echo "nginx does not proxy (see $WORK/nginx)" >&2; exit 1; }
    sleep 0.1
done

cat >"$WORK/post.lua" <<'LUA'
-- POSTs the body file with the relay key; wrk counts non-2xx answers apart.
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["content-type"] = "application/json"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.headers["x-api-key"] = os.getenv("BENCH_KEY")
LUA

# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

# to_ms VALUE: wrk's "123.45us" / "1.23ms" / "1.02s" in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.3f", n }'
}

declare -A RPS P50 P99 CPU KERNEL REQS ERRS

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

url_for() {
    case $1 in
        direct) echo "http://127.0.0.1:$MOCK_PORT/v1/messages" ;;
        nginx) echo "http://127.0.0.1:$NGINX_PORT/v1/messages" ;;
        relay) echo "http://127.0.0.1:$RELAY_PORT/v1/messages" ;;
    esac
}

# Non-2xx answers and socket errors in wrk outputs.
wrk_errors() {
    awk '/Non-2xx/ { n += $NF } /Socket errors/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 } END { print n + 0 }' "$@"
}

# run TARGET SCENARIO CONNS BODY
run() {
    local target=$1 scenario=$2 conns=$3 body=$4 url pids=() before after before_sys after_sys out
    url=$(url_for "$target")
    case $target in
        nginx) mapfile -t pids < <(with_children "$NGINX_PID") ;;
        relay) pids=("$RELAY_PID") ;;
    esac
    out="$WORK/wrk-$target-$scenario-c$conns.txt"
    read -r before before_sys < <(cpu_ticks "${pids[@]}")
    BENCH_BODY="$WORK/$body" BENCH_KEY="$RELAY_KEY" wrk -t1 -c"$conns" -d"${DURATION}s" \
        --timeout 10s --latency -s "$WORK/post.lua" "$url" >"$out" 2>&1 || true
    sleep 1 # the usage writer flushes every second: count its work too
    read -r after after_sys < <(cpu_ticks "${pids[@]}")
    local key="$target/$scenario/$conns"
    RPS[$key]=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    P50[$key]=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
    P99[$key]=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
    REQS[$key]=$(awk '/requests in/ { print $1 }' "$out")
    ERRS[$key]=$(wrk_errors "$out")
    if [ ${#pids[@]} -gt 0 ]; then
        CPU[$key]=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="${REQS[$key]:-0}" \
            'BEGIN { if (n > 0) printf "%.2f", t / hz * 10000 / n; else print "-" }')
        KERNEL[$key]=$(awk -v t=$((after - before)) -v k=$((after_sys - before_sys)) \
            'BEGIN { if (t > 0) printf "%.0f", 100 * k / t; else print "-" }')
    else
        CPU[$key]="-"
        KERNEL[$key]="-"
    fi
    log "$target $scenario c=$conns: ${RPS[$key]:-?} req/s, p50 ${P50[$key]} ms, p99 ${P99[$key]} ms, cpu/10k ${CPU[$key]} s, errors ${ERRS[$key]}"
}

SCENARIOS=("nonstream:body.json" "stream:body-stream.json")
RELAY_THREADS_BEFORE=$(thread_ticks "$RELAY_PID")
for target in direct nginx relay; do
    # Warm-up: pools, caches, the session binding.
    BENCH_BODY="$WORK/body.json" BENCH_KEY="$RELAY_KEY" \
        wrk -t1 -c64 -d2s -s "$WORK/post.lua" "$(url_for "$target")" >/dev/null 2>&1 || true
    for s in "${SCENARIOS[@]}"; do
        for conns in 1 64; do
            run "$target" "${s%%:*}" "$conns" "${s#*:}"
        done
    done
done
RELAY_HWM_KIB=$(status_kib "$RELAY_PID" VmHWM)
# Where the relay's CPU went over its runs, by thread: proxy workers, the SQLite usage writer, ...
RELAY_CPU_SPLIT=$(join -a 2 -e 0 -o 2.1,1.2,2.2 <(sort <<<"$RELAY_THREADS_BEFORE") \
    <(thread_ticks "$RELAY_PID" | sort) |
    awk '{ d[$1] = $3 - $2; t += $3 - $2 } END { for (k in d) if (t > 0 && d[k] > 0) printf "%s %.0f%%, ", k, 100 * d[k] / t }' |
    sed 's/, $//; s/_/ /g')

# ---------------------------------------------------------------------------------------------
# Paired runs: nginx and the relay back to back, BENCH_PAIRS times (3 s each), 64 connections.
# On a shared machine the table's runs of a target come minutes apart and the ratio of two of
# them moved by a quarter between runs of the same binaries; the median of ratios taken
# seconds apart is steadier, and the targets are judged on it.
# ---------------------------------------------------------------------------------------------

# median_range FORMAT NUMBER...: "median min max", each printed with FORMAT.
median_range() {
    local format=$1
    shift
    printf '%s\n' "$@" | sort -g | awk -v f="$format" '{ v[NR] = $1 }
        END { printf f " " f " " f, v[int((NR + 1) / 2)], v[1], v[NR] }'
}

declare -A PAIRED PAIRED_CPU
if [ "$PAIRS" -gt 0 ]; then
    mapfile -t nginx_pids < <(with_children "$NGINX_PID")
    for s in "${SCENARIOS[@]}"; do
        scenario=${s%%:*}
        ratios=()
        cpus=()
        for i in $(seq 1 "$PAIRS"); do
            declare -A pair_rps=()
            for target in nginx relay; do
                if [ "$target" = relay ]; then pids=("$RELAY_PID"); else pids=("${nginx_pids[@]}"); fi
                read -r before _ < <(cpu_ticks "${pids[@]}")
                out=$(BENCH_BODY="$WORK/${s#*:}" BENCH_KEY="$RELAY_KEY" wrk -t1 -c64 -d3s \
                    --timeout 10s -s "$WORK/post.lua" "$(url_for "$target")" 2>&1) || true
                read -r after _ < <(cpu_ticks "${pids[@]}")
                pair_rps[$target]=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
                if [ "$target" = relay ]; then
                    n=$(awk '/requests in/ { print $1 }' <<<"$out")
                    cpus+=("$(awk -v t=$((after - before)) -v hz="$HZ" -v n="${n:-0}" \
                        'BEGIN { if (n > 0) printf "%.4f", t / hz * 1000 / n; else print 0 }')")
                fi
            done
            ratios+=("$(ratio "${pair_rps[relay]:-0}" "${pair_rps[nginx]:-0}")")
            log "pair $i $scenario: nginx ${pair_rps[nginx]:-?} req/s, relay ${pair_rps[relay]:-?} req/s"
        done
        PAIRED[$scenario]=$(median_range %.2f "${ratios[@]}")
        PAIRED_CPU[$scenario]=$(median_range %.3f "${cpus[@]}")
    done
fi

# ---------------------------------------------------------------------------------------------
# System calls per request: strace counts them while wrk runs (slowed down, but counts are
# counts). Sends and receives on loopback carry most of the kernel's share of the relay's CPU.
# ---------------------------------------------------------------------------------------------

declare -A SYSCALLS
if command -v strace >/dev/null 2>&1; then
    for s in "${SCENARIOS[@]}"; do
        scenario=${s%%:*}
        trace="$WORK/strace-$scenario.txt"
        strace -c -f -p "$RELAY_PID" -o "$trace" 2>/dev/null &
        tracer=$!
        sleep 1
        out=$(BENCH_BODY="$WORK/${s#*:}" BENCH_KEY="$RELAY_KEY" wrk -t1 -c64 -d3s \
            -s "$WORK/post.lua" "$(url_for relay)" 2>&1) || true
        sleep 1.5 # the usage writer's batch and the log writer's flush belong to these requests
        kill -INT "$tracer" 2>/dev/null || true
        wait "$tracer" 2>/dev/null || true
        n=$(awk '/requests in/ { print $1 }' <<<"$out")
        SYSCALLS[$scenario]=$(awk -v n="${n:-0}" '
            $1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" { c[$NF] = $4; total += $4 }
            END {
                if (n == 0) { print "-"; exit }
                printf "%.1f in all: sendto %.1f, writev %.1f, recvfrom %.1f, futex %.1f, epoll_wait %.1f, write %.1f",
                    total / n, c["sendto"] / n, c["writev"] / n, c["recvfrom"] / n, c["futex"] / n,
                    c["epoll_wait"] / n, c["write"] / n }' "$trace")
        log "relay $scenario: system calls per request: ${SYSCALLS[$scenario]}"
    done
fi

# ---------------------------------------------------------------------------------------------
# Memory: many SSE streams held open through the relay against a slow mock, then many idle
# keep-alive connections
# ---------------------------------------------------------------------------------------------

HOLD_LINE=""
IDLE_LINE=""
if [ "$STREAMS" -gt 0 ]; then
    # Two sockets per stream in the relay (client and upstream): stay under the fd limit.
    fd_limit=$(ulimit -Hn)
    [ "$fd_limit" = unlimited ] && fd_limit=1048576
    ulimit -n "$fd_limit" 2>/dev/null || true
    max_streams=$(((fd_limit - 200) / 2))
    held=$STREAMS
    [ "$held" -gt "$max_streams" ] && held=$max_streams
    SLOW_PORT=$(port)
    "$MOCK_BIN" serve --addr "127.0.0.1:$SLOW_PORT" --threads 1 --hold-secs 90 --ping-secs 5 \
        >"$WORK/mock-slow.log" 2>&1 &
    PIDS+=($!)
    start_relay relay-streams "$SLOW_PORT"
    log "holding $held streams (asked $STREAMS, fd limit $fd_limit)"
    HOLD_LINE=$(timeout 150 "$MOCK_BIN" hold --addr "127.0.0.1:$RELAY_PORT" --key "$RELAY_KEY" \
        --streams "$held" --pid "$RELAY_PID" --secs 75 --bytes "${BENCH_HOLD_BYTES:-2048}" \
        | tail -1) || true
    log "$HOLD_LINE"
    kill "$RELAY_PID" 2>/dev/null || true

    # Idle keep-alive connections (one request each, then silent): one socket each in the
    # relay, against a fresh relay and the fast mock.
    idle=$STREAMS
    [ "$idle" -gt $((fd_limit - 200)) ] && idle=$((fd_limit - 200))
    start_relay relay-idle "$MOCK_PORT"
    log "holding $idle idle keep-alive connections"
    IDLE_LINE=$(timeout 150 "$MOCK_BIN" hold --idle --addr "127.0.0.1:$RELAY_PORT" \
        --key "$RELAY_KEY" --streams "$idle" --pid "$RELAY_PID" --secs 75 \
        --bytes "${BENCH_HOLD_BYTES:-2048}" | tail -1) || true
    log "$IDLE_LINE"
    kill "$RELAY_PID" 2>/dev/null || true
fi

# ---------------------------------------------------------------------------------------------
# Soak: a fresh relay under non-stream and stream load for BENCH_SOAK seconds, its RSS sampled
# every 5 s. A per-request leak grows RSS in step with the requests; bounded caches (SQLite's
# page cache, the allocator's pages) fill early and then stay. The second half of the run is
# the measure.
# ---------------------------------------------------------------------------------------------

SOAK=${BENCH_SOAK:-300}
SOAK_LINE=""
SOAK_HALF_KIB=""
if [ "$SOAK" -gt 0 ]; then
    start_relay relay-soak "$MOCK_PORT"
    log "soak: ${SOAK}s of non-stream and stream requests, 32 connections each"
    for s in "${SCENARIOS[@]}"; do
        BENCH_BODY="$WORK/${s#*:}" BENCH_KEY="$RELAY_KEY" wrk -t1 -c32 -d"${SOAK}s" --timeout 10s \
            -s "$WORK/post.lua" "$(url_for relay)" >"$WORK/soak-${s%%:*}.txt" 2>&1 &
        SOAK_PIDS+=($!)
        PIDS+=($!)
    done
    : >"$WORK/soak-rss.txt"
    elapsed=0
    while [ "$elapsed" -lt "$SOAK" ]; do
        sleep 5
        elapsed=$((elapsed + 5))
        echo "$elapsed $(status_kib "$RELAY_PID" VmRSS)" >>"$WORK/soak-rss.txt"
    done
    for p in "${SOAK_PIDS[@]}"; do wait "$p" || true; done
    soak_reqs=$(awk '/requests in/ { n += $1 } END { print n + 0 }' "$WORK"/soak-*stream.txt)
    soak_errs=$(wrk_errors "$WORK"/soak-*stream.txt)
    half=$((SOAK / 2))
    warm=$((SOAK / 10))
    read -r rss_warm rss_half rss_end < <(awk -v h="$half" -v w="$warm" '
        $1 >= w && warm == "" { warm = $2 } $1 >= h && half == "" { half = $2 } { last = $2 }
        END { print warm + 0, half + 0, last + 0 }' "$WORK/soak-rss.txt")
    SOAK_HALF_KIB=$((rss_end - rss_half))
    # Requests in the second half: about half of them, the load being steady.
    per_k=$(awk -v d="$SOAK_HALF_KIB" -v n="$soak_reqs" 'BEGIN { if (n > 0) printf "%.0f", d * 1024 / (n / 2) * 1000; else print "-" }')
    SOAK_LINE="soak ${SOAK}s: ${soak_reqs} requests (non-stream and stream), ${soak_errs} errors; relay RSS $((rss_warm / 1024)) MiB at ${warm} s, $((rss_half / 1024)) MiB at ${half} s, $((rss_end / 1024)) MiB at the end: ${SOAK_HALF_KIB} KiB over the second half (${per_k} bytes per 1 000 requests)"
    log "$SOAK_LINE"
    kill "$RELAY_PID" 2>/dev/null || true
fi

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)

echo
echo "llm-relay load test — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores (${cpu_model:-unknown CPU}), ${DURATION}s per run, wrk 1 thread"
echo "mock upstream: Anthropic JSON / SSE (20 events), no delay; body 2 KiB; relay log level $RELAY_LOG_FILTER"
echo
printf '%-10s %-6s %-7s %10s %9s %9s %8s %12s %8s %6s\n' scenario conns target "req/s" "p50 ms" "p99 ms" "rel/ngx" "cpu s/10k" "kernel" errors
for s in "${SCENARIOS[@]}"; do
    scenario=${s%%:*}
    for conns in 1 64; do
        for target in direct nginx relay; do
            key="$target/$scenario/$conns"
            rel=""
            [ "$target" = relay ] && rel=$(ratio "${RPS[$key]:-0}" "${RPS[nginx/$scenario/$conns]:-0}")
            kernel=${KERNEL[$key]:--}
            [ "$kernel" != - ] && kernel="$kernel %"
            printf '%-10s %-6s %-7s %10s %9s %9s %8s %12s %8s %6s\n' "$scenario" "$conns" "$target" \
                "${RPS[$key]:-?}" "${P50[$key]:-?}" "${P99[$key]:-?}" "$rel" "${CPU[$key]:--}" "$kernel" "${ERRS[$key]:-?}"
        done
    done
done
echo
echo "errors: non-2xx answers and socket errors counted by wrk; cpu: utime+stime of the proxy process(es) per 10 000 requests;"
echo "kernel: the share of that CPU spent in the kernel (stime), which on loopback includes waking the peers a proxy writes to"
echo "relay CPU by thread over its runs: ${RELAY_CPU_SPLIT:-?}"
echo "relay peak RSS (VmHWM) over the runs above: $((RELAY_HWM_KIB / 1024)) MiB"
for scenario in nonstream stream; do
    [ -n "${SYSCALLS[$scenario]:-}" ] &&
        echo "relay system calls per $scenario request (strace -c, 64 connections): ${SYSCALLS[$scenario]}"
done

verdict() { awk -v v="$1" -v t="$2" -v op="$3" 'BEGIN { ok = (op == "<" ? v < t : v >= t); print (ok ? "ok" : "MISSED") }'; }
echo
echo "targets:"
for scenario in nonstream stream; do
    r=$(ratio "${RPS[relay/$scenario/64]:-0}" "${RPS[nginx/$scenario/64]:-0}")
    if [ -n "${PAIRED[$scenario]:-}" ]; then
        read -r med lo hi <<<"${PAIRED[$scenario]}"
        echo "  throughput $scenario c=64, relay/nginx >= 0.8: median $med of $PAIRS paired runs ($lo to $hi; the table's runs $r) $(verdict "$med" 0.8 '>=')"
    else
        echo "  throughput $scenario c=64, relay/nginx >= 0.8: $r $(verdict "$r" 0.8 '>=')"
    fi
done
for scenario in nonstream stream; do
    c="${CPU[relay/$scenario/64]:-0}"
    ms=$(awk -v c="$c" 'BEGIN { printf "%.3f", c / 10 }') # s per 10k requests -> ms per request
    if [ -n "${PAIRED_CPU[$scenario]:-}" ]; then
        read -r cpu_med cpu_lo cpu_hi <<<"${PAIRED_CPU[$scenario]}"
        echo "  relay CPU per request in the paired runs, $scenario: median $cpu_med ms ($cpu_lo to $cpu_hi)"
    fi
    nginx_ms=$(awk -v c="${CPU[nginx/$scenario/64]:-0}" 'BEGIN { printf "%.3f", c / 10 }')
    split=$(awk -v r="$ms" -v rk="${KERNEL[relay/$scenario/64]:-0}" -v n="$nginx_ms" \
        -v nk="${KERNEL[nginx/$scenario/64]:-0}" 'BEGIN { printf "in the kernel: relay %.3f ms, nginx %.3f of its %.3f ms", r * rk / 100, n * nk / 100, n }')
    echo "  relay CPU per request, $scenario c=64 <= 0.05 ms: $ms ms $(verdict "$ms" 0.0500001 '<') ($split)"
done
for scenario in nonstream stream; do
    d=$(awk -v a="${P99[relay/$scenario/1]:-0}" -v b="${P99[direct/$scenario/1]:-0}" 'BEGIN { printf "%.3f", a - b }')
    echo "  added p99 latency at c=1 over direct, $scenario < 1 ms: $d ms $(verdict "$d" 1 '<')"
done
# read_hold LINE: sets open, rss, base (KiB) and per (KiB per connection) from a `hold` line.
read_hold() {
    open=$(sed -n 's/.* open=\([0-9]*\).*/\1/p' <<<"$1")
    rss=$(sed -n 's/.* rss_kib=\([0-9]*\).*/\1/p' <<<"$1")
    base=$(sed -n 's/.* rss_before_kib=\([0-9]*\).*/\1/p' <<<"$1")
    per=$(awk -v r="${rss:-0}" -v b="${base:-0}" -v n="${open:-0}" 'BEGIN { if (n > 0) printf "%.1f", (r - b) / n }')
}
if [ -n "$HOLD_LINE" ]; then
    read_hold "$HOLD_LINE"
    if [ "${open:-0}" -gt 0 ]; then
        at10k=$(awk -v r="$rss" -v b="$base" -v n="$open" 'BEGIN { printf "%.0f", (b + (r - b) / n * 10000) / 1024 }')
        echo "  $open SSE streams held open: relay RSS $((rss / 1024)) MiB (idle $((base / 1024)) MiB, ${per} KiB per stream; at 10 000: ${at10k} MiB) < 300 MiB: $(verdict "$at10k" 300 '<')"
    else
        echo "  SSE streams: none could be held open ($HOLD_LINE)"
    fi
fi
if [ -n "$IDLE_LINE" ]; then
    read_hold "$IDLE_LINE"
    if [ "${open:-0}" -gt 0 ]; then
        echo "  $open idle keep-alive connections: relay RSS $((rss / 1024)) MiB (idle $((base / 1024)) MiB, ${per} KiB per connection)"
    else
        echo "  idle keep-alive connections: none could be held open ($IDLE_LINE)"
    fi
fi
if [ -n "$SOAK_LINE" ]; then
    # 4 MiB over the second half is about 1.4 bytes per request at 20 000 requests/s: a leak
    # of a single small allocation per request would pass it.
    echo "  $SOAK_LINE; no per-request growth (second half < 4096 KiB): $(verdict "$SOAK_HALF_KIB" 4096 '<')"
fi
