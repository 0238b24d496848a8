#!/bin/bash
# Two Duet windows under Xvfb call each other at 720p30 (build first: cargo build --release -p duet);
# prints each window process's CPU (% of one core) over 15 s. Extra arguments go to both windows,
# e.g. --video-on-cpu. Needs Xvfb (make deps).
BIN=${DUET_BIN:-$(dirname "$0")/../target/release/duet}
. "$(dirname "$0")/proc_cpu.sh"
PORT=18797
Xvfb :81 -screen 0 1280x800x24 -nolisten tcp >/dev/null 2>&1 & X1=$!
Xvfb :82 -screen 0 1280x800x24 -nolisten tcp >/dev/null 2>&1 & X2=$!
$BIN server --listen 127.0.0.1:$PORT >/tmp/wincpu-server.log 2>&1 & S=$!
sleep 1.5
rm -rf /tmp/wc-a /tmp/wc-b; mkdir -p /tmp/wc-a /tmp/wc-b
DISPLAY=:81 HOME=/tmp/wc-a $BIN --server 127.0.0.1:$PORT --room cpu --name a --video test-pattern:1280x720 --audio sine --auto-call "$@" >/tmp/wincpu-a.log 2>&1 & A=$!
DISPLAY=:82 HOME=/tmp/wc-b $BIN --server 127.0.0.1:$PORT --room cpu --name b --video test-pattern:1280x720 --audio sine --auto-call "$@" >/tmp/wincpu-b.log 2>&1 & B=$!
sleep 8
a0=$(cpu_ticks $A); b0=$(cpu_ticks $B); s0=$(date +%s.%N)
sleep 15
a1=$(cpu_ticks $A); b1=$(cpu_ticks $B); s1=$(date +%s.%N)
echo "args: $* a: $(cpu_percent "$a0" "$a1" "$s0" "$s1") % b: $(cpu_percent "$b0" "$b1" "$s0" "$s1") %"
DISPLAY=:81 xwd -root -silent > /tmp/wincpu-a.xwd 2>/dev/null
kill $A $B $S $X1 $X2 2>/dev/null; wait 2>/dev/null
