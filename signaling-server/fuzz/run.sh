#!/usr/bin/env bash
# Runs each fuzz target for MINUTES (default 10) and prints executions and findings.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Not run in CI.
#   signaling-server/fuzz/run.sh [MINUTES] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
minutes=${1:-10}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(websocket_decoder protocol_json create_room_body turn_gate turn_framing)
mkdir -p logs
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    # Seeds: a few valid inputs per target.
    case $t in
        protocol_json)
            printf '{"type":"join","room":"kitchen"}' > corpus/$t/join
            printf '{"type":"candidate","candidate":{"candidate":"candidate:1 1 udp 1 10.0.0.1 9 typ host","sdpMid":"0","sdpMLineIndex":0}}' > corpus/$t/candidate ;;
        create_room_body)
            printf '{"title":"standup","starts_at":"2030-01-01T09:00:00Z","ttl_s":3600}' > corpus/$t/room ;;
    esac
    echo "== $t: $minutes min"
    status=0
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time=$((minutes * 60)) \
        -print_final_stats=1 -max_len=4096 > "logs/$t.log" 2>&1 || status=$?
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "logs/$t.log" || true
    if [ "$status" -ne 0 ]; then
        echo "$t FAILED (exit $status); see fuzz/logs/$t.log and fuzz/artifacts/$t/"
    else
        echo "$t: no findings"
    fi
done
