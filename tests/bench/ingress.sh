#!/usr/bin/env bash
# Ingress benchmark (see BENCHMARKS.md). Measures, in one run against the local broker:
#   a) the broker's ceiling: bare_publisher, a lapin publisher with confirms, window W;
#   a') the HTTP floor: bare_relay (hyper + the ingress's publisher, no decoding), driven
#      by loadgen closed loop over W keep-alive connections;
#   b) the ingress at its maximum: loadgen closed loop over W keep-alive connections;
#   a), a') and b) take turns, ROUNDS times, and the medians are compared, so that a
#      slow minute of the broker or the machine does not land on one side only;
#   c) the ingress at half of b)'s rate: loadgen open loop, for its p99, and the bare
#      publisher at that same rate, for the broker's own p99 there;
#   d) the ingress's RSS while 1,000 idle keep-alive connections are open.
# Loadgen, ingress and broker share this machine's cores, so each run also prints the
# cores each of them used, and the run starts by checking nothing else is busy.
# With PIN=1 the broker gets the last core to itself and everything else (ingress, load
# generator, bare publisher) runs on the others, as when RabbitMQ has a host of its own;
# the broker's own CPU affinity is put back when the script ends.
# Everything stays on 127.0.0.1. Each step runs against a fresh queue: the bare publisher
# and every ingress started here get a unique AMQP_PREFIX whose queues are deleted after
# the step, so the broker does not fill up.
#
# usage: bash tests/bench/ingress.sh
# knobs (environment): WINDOW=32 DURATION=10 WARMUP=2 ROUNDS=3 IDLE=1000 IDLE_HOLD=5
#                       QUIET_WAIT=120 SETTLE=5 PIN=0
set -euo pipefail

cd "$(dirname "$0")/../.."
WINDOW=${WINDOW:-32}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
IDLE=${IDLE:-1000}
# Shorter than the ingress's header-read timeout (INGRESS_HEADER_TIMEOUT_MS, 10 s),
# which also closes keep-alive connections left idle that long.
IDLE_HOLD=${IDLE_HOLD:-5}
QUIET_WAIT=${QUIET_WAIT:-120}
SETTLE=${SETTLE:-5}
PIN=${PIN:-0}

# Each idle connection costs a descriptor at both of its ends, and both are here.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < 2 * IDLE + 200)); then
    echo "ingress.sh: ulimit -n is $(ulimit -n), too low for $IDLE connections" >&2
    exit 1
fi

cargo build --release -p b24-ingress -p b24-tests --bins
BIN=${CARGO_TARGET_DIR:-target}/release

PREFIX_BASE="bench-$(date +%s)-$$"
PREFIX=
PREFIXES=()
WORK=$(mktemp -d)
SERVER_PID=
BROKER_PID=$(pgrep -xo beam.smp || true)
BROKER_MASK=
# Prefix of every command the script starts: empty, or a taskset that keeps it off the
# broker's core.
RUN=()
LAYOUT="all processes share all $(nproc) cores"
if ((PIN)); then
    LAST=$(($(nproc) - 1))
    if ((LAST < 1)) || [[ -z $BROKER_PID ]]; then
        echo "ingress.sh: PIN=1 needs 2 cores and a local broker (beam.smp)" >&2
        exit 1
    fi
    RUN=(taskset -c "0-$((LAST - 1))")
    LAYOUT="broker pinned to core $LAST; ingress and clients on cores 0-$((LAST - 1))"
fi

cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    # After the ingress stopped, so it cannot declare them again.
    for p in "${PREFIXES[@]}"; do
        "$BIN/bare_publisher" --cleanup "$p" >/dev/null ||
            echo "ingress.sh: could not delete the queues of $p" >&2
    done
    if [[ -n $BROKER_MASK ]]; then
        taskset -a -p "$BROKER_MASK" "$BROKER_PID" >/dev/null ||
            echo "ingress.sh: could not give the broker back its cores (mask $BROKER_MASK)" >&2
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
if ((PIN)); then
    BROKER_MASK=$(taskset -p "$BROKER_PID" | awk '{ print $NF }')
    taskset -a -p -c "$LAST" "$BROKER_PID" >/dev/null
fi

TICK=$(getconf CLK_TCK)
# CPU time a process has used, in clock ticks (0 once it is gone).
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Busy CPU time of the whole machine, in clock ticks, and all of it.
machine() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
cores() { awk -v a="$1" -v b="$2" -v t="$TICK" -v s="$3" 'BEGIN { printf "%.2f", (b - a) / t / s }'; }

# Numbers are only comparable on an otherwise idle machine: wait up to QUIET_WAIT
# seconds for one (builds, other tests), then go on and say how busy it was.
busy_pct() {
    local a b
    read -r -a a <<<"$(machine)"
    sleep 2
    read -r -a b <<<"$(machine)"
    awk -v x="$((b[0] - a[0]))" -v y="$((b[1] - a[1]))" 'BEGIN { printf "%.0f", (y > 0 ? 100 * x / y : 0) }'
}
BUSY=$(busy_pct)
QUIET_BY=$((SECONDS + QUIET_WAIT))
while ((BUSY > 10 && SECONDS < QUIET_BY)); do
    echo "ingress.sh: machine ${BUSY}% busy before the benchmark; waiting for it to settle"
    BUSY=$(busy_pct)
done

# Starts a server (the ingress, or bare_relay: $2) under a prefix of its own, so each
# measured step publishes to a fresh queue, as the bare publisher does: a quorum queue
# that was just purged of 100,000+ messages stalls publishes for most of a second while
# it compacts its log. The kernel picks the port (INGRESS_ADDR port 0, bare_relay's
# default); the server logs the one it got.
start_server() {
    PREFIX="$PREFIX_BASE-$1"
    PREFIXES+=("$PREFIX")
    # Every connection of the load generator comes from 127.0.0.1, as from a proxy:
    # without lifting the per-address cap, d)'s 1,000 would mostly be refused.
    AMQP_PREFIX=$PREFIX INGRESS_ADDR=127.0.0.1:0 RUST_LOG=${RUST_LOG:-info} \
        INGRESS_MAX_CONNECTIONS_PER_CLIENT=0 \
        "${RUN[@]}" "$BIN/$2" >"$WORK/ingress.log" 2>&1 &
    SERVER_PID=$!
    ADDR=
    for _ in $(seq 100); do
        ADDR=$(grep -m1 -oE '127\.0\.0\.1:[0-9]+' "$WORK/ingress.log" || true)
        [[ -n $ADDR ]] && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/ingress.log" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n $ADDR ]] || { echo "ingress.sh: $2 did not report its address" >&2; exit 1; }
    for _ in $(seq 100); do
        curl -fsS "http://$ADDR/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -fsS "http://$ADDR/readyz" >/dev/null || { echo "ingress.sh: $2 not ready" >&2; exit 1; }
    echo "ingress.sh: $2 pid $SERVER_PID on $ADDR, prefix $PREFIX, broker pid ${BROKER_PID:-not local}"
}

# Stops the server, deletes its queues, lets the broker settle.
stop_server() {
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
    "$BIN/bare_publisher" --cleanup "$PREFIX" >/dev/null
    settle
}

echo "ingress.sh: $LAYOUT"
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$SERVER_PID/status"; }
# Figures from a summary line: the rate after "= ", a latency after its label, failures.
rate_of() { sed -nE 's/.* = ([0-9.]+) [a-z]+\/s;.*/\1/p' "$1" | tail -1; }
stat_of() { sed -nE "s/.* $2 ([0-9.]+) ms.*/\1/p" "$1" | tail -1; }
failed_of() { sed -nE 's/.* ([0-9]+) failed in .*/\1/p' "$1" | tail -1; }
# Lets the broker settle after a queue of 100,000+ messages was deleted.
settle() { sleep "$SETTLE"; }

# Runs one benchmark client into $1 and, over its measured part (after the warm-up),
# records the cores used by the client, the server (ingress or relay; none for the bare
# publisher), the broker and the whole machine.
measured() {
    local out=$1 pid c0 i0 b0 m0 c1 i1 b1 m1 t0 t1 secs
    shift
    "$@" >"$out" &
    pid=$!
    # Sample inside the measured part with some slack at both ends: the client is gone
    # (and its CPU time with it) as soon as its window ends.
    sleep "$(awk -v w="$WARMUP" 'BEGIN { print w + 0.3 }')"
    t0=$(date +%s.%N) c0=$(ticks "$pid") i0=$(ticks "$SERVER_PID") b0=$(ticks "${BROKER_PID:-0}")
    read -r -a m0 <<<"$(machine)"
    sleep "$(awk -v d="$DURATION" 'BEGIN { print (d > 2 ? d - 1 : d / 2) }')"
    t1=$(date +%s.%N) c1=$(ticks "$pid") i1=$(ticks "$SERVER_PID") b1=$(ticks "${BROKER_PID:-0}")
    read -r -a m1 <<<"$(machine)"
    wait "$pid"
    cat "$out"
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    # "others" is whatever else ran meanwhile: more than a few hundredths of a core
    # and the figures of this run are disturbed.
    awk -v c="$(cores "$c0" "$c1" "$secs")" -v i="$(cores "$i0" "$i1" "$secs")" \
        -v b="$(cores "$b0" "$b1" "$secs")" -v m="$(cores "${m0[0]}" "${m1[0]}" "$secs")" -v n="$(nproc)" \
        'BEGIN { printf "cpu: client %.2f, server %.2f, broker %.2f, others %.2f; machine %.2f of %d cores\n", c, i, b, m - c - i - b, m, n }' |
        tee -a "$out"
}
cpu_of() { sed -n 's/^cpu: //p' "$1"; }

for round in $(seq "$ROUNDS"); do
    echo "== round $round of $ROUNDS"
    echo "== a) broker ceiling: bare_publisher --window $WINDOW"
    measured "$WORK/bare.$round.txt" "${RUN[@]}" "$BIN/bare_publisher" --window "$WINDOW" \
        --duration "$DURATION" --warmup "$WARMUP"
    settle # it deleted its full queue

    echo "== a') HTTP floor, closed loop: bare_relay, loadgen --connections $WINDOW"
    start_server "r$round" bare_relay
    measured "$WORK/relay.$round.txt" "${RUN[@]}" "$BIN/loadgen" --target "$ADDR" \
        --connections "$WINDOW" --duration "$DURATION" --warmup "$WARMUP"
    stop_server

    echo "== b) ingress, closed loop: loadgen --connections $WINDOW"
    start_server "b$round" ingress
    measured "$WORK/max.$round.txt" "${RUN[@]}" "$BIN/loadgen" --target "$ADDR" \
        --connections "$WINDOW" --duration "$DURATION" --warmup "$WARMUP"
    stop_server
done

# The median of the rounds' rates, and the round that gave it (for its latencies).
median_round() { # step
    for r in $(seq "$ROUNDS"); do echo "$(rate_of "$WORK/$1.$r.txt") $r"; done |
        sort -g | awk '{ rounds[NR] = $2 } END { print rounds[int((NR + 1) / 2)] }'
}
for step in bare relay max; do
    cp "$WORK/$step.$(median_round "$step").txt" "$WORK/$step.txt"
done
rates_of() { # step: every round's rate
    for r in $(seq "$ROUNDS"); do rate_of "$WORK/$1.$r.txt"; done | paste -sd' ' | sed 's/ /, /g'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f\n", (b > 0 ? a / b : 0) }'; }
round_ratios() { # numerator step, denominator step
    for r in $(seq "$ROUNDS"); do
        ratio "$(rate_of "$WORK/$1.$r.txt")" "$(rate_of "$WORK/$2.$r.txt")"
    done | paste -sd' ' | sed 's/ /, /g'
}

MAX_RATE=$(rate_of "$WORK/max.txt")
HALF_RATE=$(awk -v r="$MAX_RATE" 'BEGIN { printf "%.1f", r / 2 }')
echo "== c) ingress, open loop at half of b)'s median: loadgen --rate $HALF_RATE"
start_server c ingress
RSS_START=$(rss_kib)
measured "$WORK/half.txt" "${RUN[@]}" "$BIN/loadgen" --target "$ADDR" --connections "$WINDOW" \
    --rate "$HALF_RATE" --duration "$DURATION" --warmup "$WARMUP"

echo "== d) the same ingress's RSS with $IDLE idle keep-alive connections: loadgen --idle $IDLE"
RSS_IDLE=$(rss_kib)
"${RUN[@]}" "$BIN/loadgen" --target "$ADDR" --idle "$IDLE" --duration "$IDLE_HOLD" >"$WORK/idle.txt" &
IDLE_PID=$!
for _ in $(seq 300); do
    grep -q 'idle connections open' "$WORK/idle.txt" && break
    kill -0 "$IDLE_PID" 2>/dev/null || break
    sleep 0.1
done
# Sample while the connections are held; the peak is the figure.
RSS_CONNS=0
for _ in 1 2 3; do
    r=$(rss_kib)
    ((r > RSS_CONNS)) && RSS_CONNS=$r
    sleep 1
done
OPEN_NOW=$(ss -Htn state established "( sport = :${ADDR##*:} )" 2>/dev/null | wc -l)
wait "$IDLE_PID"
cat "$WORK/idle.txt"
echo "ingress.sh: established connections to the ingress while sampling: $OPEN_NOW"
stop_server

echo "== c') broker alone at c)'s rate: bare_publisher --rate $HALF_RATE"
measured "$WORK/bare_half.txt" "${RUN[@]}" "$BIN/bare_publisher" --window "$WINDOW" --rate "$HALF_RATE" \
    --duration "$DURATION" --warmup "$WARMUP"

BARE_RATE=$(rate_of "$WORK/bare.txt")
RELAY_RATE=$(rate_of "$WORK/relay.txt")
RATIO=$(ratio "$MAX_RATE" "$BARE_RATE")
HALF_P99=$(stat_of "$WORK/half.txt" p99)
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
verdict() { if (($1)); then echo met; else echo MISSED; fi; }
line() { # label, file, unit word
    echo "$1: $(rate_of "$2") $3/s, p50 $(stat_of "$2" p50) ms, p99 $(stat_of "$2" p99) ms, p99.9 $(stat_of "$2" p99.9) ms, failed $(failed_of "$2"); cpu $(cpu_of "$2")"
}

cat <<EOF

== summary ($(date -u +%Y-%m-%dT%H:%MZ))
layout: $LAYOUT
machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo); ${BUSY}% busy just before the run
in-flight window $WINDOW; each run measured ${DURATION} s after ${WARMUP} s of warm-up
a), a') and b): the median of $ROUNDS rounds, with that round's latencies
$(line "a)  broker ceiling (bare_publisher)" "$WORK/bare.txt" msgs)
$(line "a') HTTP floor (bare_relay)        " "$WORK/relay.txt" events)
$(line "b)  ingress max (closed loop)      " "$WORK/max.txt" events)
rounds: a) $(rates_of bare); a') $(rates_of relay); b) $(rates_of max)
ratios of medians: ingress / bare $RATIO, relay / bare $(ratio "$RELAY_RATE" "$BARE_RATE"), ingress / relay $(ratio "$MAX_RATE" "$RELAY_RATE")
ratios round by round: ingress / bare $(round_ratios max bare); relay / bare $(round_ratios relay bare)
$(line "c)  ingress at half rate ($HALF_RATE/s)" "$WORK/half.txt" events)
$(line "c') bare_publisher at that rate    " "$WORK/bare_half.txt" msgs)
d)  ingress RSS: $(mib "$RSS_START") MiB at start, $(mib "$RSS_IDLE") MiB idle after the load, $(mib "$RSS_CONNS") MiB with $IDLE connections open
targets:
  ingress / bare ratio $RATIO >= 0.80: $(verdict "$(awk -v r="$RATIO" 'BEGIN { print (r >= 0.8) }')")
  p99 at half rate $HALF_P99 ms < 10 ms: $(verdict "$(awk -v p="$HALF_P99" 'BEGIN { print (p != "" && p < 10) }')")
  RSS with $IDLE connections $(mib "$RSS_CONNS") MiB < 30 MiB: $(verdict "$((RSS_CONNS < 30 * 1024))")
EOF
