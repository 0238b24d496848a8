#!/bin/bash
# Two headless Duet clients call each other at 720p30 (as callbench's clean variant does) and
# this prints each client process's CPU (% of one core) over a window late in the call, when
# the resolution ladder has long reached 720p: callbench's figure averages the whole call,
# ramp-up included. Build first (cargo build --release -p duet); DUET_BIN picks another
# binary, so two builds can be compared on the same machine, alternating.
#   benches/call_cpu.sh [FROM_SECONDS [TO_SECONDS]]   (defaults 20 and 35)
# NOISY=1 sends callbench's noisy pattern (random noise on every pixel) instead.
BIN=${DUET_BIN:-$(dirname "$0")/../target/release/duet}
. "$(dirname "$0")/proc_cpu.sh"
FROM=${1:-20}
TO=${2:-35}
PORT=18798
VIDEO=(--video test-pattern --expect-pattern)
[ -n "$NOISY" ] && VIDEO=(--video noisy-pattern --expect-pattern --expect-noisy)
DIR=$(mktemp -d /tmp/duet-callcpu.XXXX)
$BIN server --listen 127.0.0.1:$PORT >"$DIR/server.log" 2>&1 &
S=$!
sleep 1.5
client() {
    $BIN call --headless --server ws://127.0.0.1:$PORT --room cpu --width 1280 --height 720 \
        --fps 30 --bitrate-kbps 2500 --duration $((TO + 3))s --wait 30s "${VIDEO[@]}" \
        --report "$DIR/$1.json" >/dev/null 2>"$DIR/$1.log" &
}
client a
A=$!
sleep 0.5
client b
B=$!
sleep "$FROM"
a0=$(cpu_ticks $A) b0=$(cpu_ticks $B) s0=$(date +%s.%N)
sleep $((TO - FROM))
a1=$(cpu_ticks $A) b1=$(cpu_ticks $B) s1=$(date +%s.%N)
wait $A $B
kill $S 2>/dev/null
wait 2>/dev/null
# The sent picture heights over the window, where the report has a timeline.
heights() { python3 -c "import json,sys; t=json.load(open(sys.argv[1])).get('timeline',[]); print(sorted({s['sent_height'] for s in t if $FROM<=s['t_s']<=$TO}) or '-')" "$1" 2>/dev/null; }
echo "$DIR: $BIN from ${FROM}s to ${TO}s: a $(cpu_percent "$a0" "$a1" "$s0" "$s1") % (heights $(heights "$DIR/a.json")), b $(cpu_percent "$b0" "$b1" "$s0" "$s1") % (heights $(heights "$DIR/b.json"))"
