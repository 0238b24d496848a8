//! Calls over impaired links, in network namespaces this test builds (`common::netns`:
//! two clients behind two cone NATs, the server on the "public" segment).
//!
//! - Lossy: 3 % of UDP packets dropped at one router, both ways, 40 ms round trip. Lost
//!   packets must be repaired (FlexFEC, and NACK + RTX) and nearly every frame decoded.
//! - Outage: all UDP through both routers dropped for 5 s mid-call. The call must not
//!   end; ICE restarts if needed, and video must come back.
//! - Move: one client's address changes mid-call (a laptop changing networks). Its
//!   signaling reconnects and resumes the seat, ICE restarts on the new address, and
//!   video comes back.
//!
//! - Lost handshake: every DTLS packet through one router dropped until a client gives
//!   the stalled handshake up (5 s after ICE found its path). A fresh peer connection
//!   takes over and the call goes on.
//!
//! Pass/fail with generous margins; the numbers themselves are measured by the network
//! benchmark (docs/PERFORMANCE.md). Needs root, `ip` and `iptables`; without them the test
//! says so and passes, unless `DUET_REQUIRE_NAT_TEST=1` (set by `make test`).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::netns::{Topology, able, call_with, out_dir};
use serde_json::Value;

fn u(r: &Value, key: &str) -> u64 {
    r[key].as_u64().unwrap_or(0)
}

/// Frames decoded during the last `secs` seconds of the call, from the timeline.
fn decoded_in_last(r: &Value, secs: f64) -> u64 {
    let timeline = r["timeline"].as_array().cloned().unwrap_or_default();
    let Some(last) = timeline.last() else {
        return 0;
    };
    let end = last["t_s"].as_f64().unwrap_or(0.0);
    let before = timeline
        .iter()
        .rev()
        .find(|s| s["t_s"].as_f64().unwrap_or(0.0) <= end - secs)
        .map_or(0, |s| u(s, "frames_decoded"));
    u(last, "frames_decoded").saturating_sub(before)
}

/// Whether this machine can run the test (root, ip, iptables); when it cannot, says so,
/// and fails if `DUET_REQUIRE_NAT_TEST` is set.
fn runnable() -> bool {
    if able() {
        return true;
    }
    assert!(
        std::env::var("DUET_REQUIRE_NAT_TEST").is_err(),
        "the network test needs root, ip and iptables"
    );
    eprintln!("skipped: needs root, ip and iptables");
    false
}

/// The call ended by a hang-up, not by the impairment: whoever's --duration ran out first
/// hung up; the other saw them leave (not disconnect).
fn assert_outlived(r: &Value, what: &str) {
    let kind = r["ended"]["kind"].as_str().unwrap_or_default();
    assert!(
        kind == "hung_up" || (kind == "peer_left" && r["ended"]["disconnected"] == false),
        "the call outlived the {what}: {r}"
    );
}

#[test]
fn calls_survive_loss_and_an_outage() {
    if !runnable() {
        return;
    }
    let pid = std::process::id() % 10_000;

    // Lossy.
    let lossy = Topology::build(&format!("{pid}l"), false);
    // A 40 ms round trip from the start: long enough that FEC is worth sending.
    lossy.add_uplink_delay("a", 20);
    lossy.add_uplink_delay("b", 20);
    let (ra, rb) = call_with(&lossy, "lossy", "10s", |t, _| t.add_loss("a", 0.03));
    drop(lossy);
    for (me, other) in [(&ra, &rb), (&rb, &ra)] {
        eprintln!(
            "lossy: decoded {} of {} sent, repaired {} (RTX in {}), FEC rebuilt {}, given up {}, PLIs {}, freezes {}",
            u(me, "frames_decoded"),
            u(other, "frames_sent"),
            u(me, "frames_repaired"),
            u(me, "retransmissions_received"),
            u(me, "fec_recovered"),
            u(me, "frames_broken"),
            u(me, "keyframe_requests_sent"),
            u(me, "freeze_count"),
        );
        assert!(
            u(me, "frames_decoded") * 100 >= u(other, "frames_sent") * 85,
            "most frames survive 3 % loss: {me}"
        );
    }
    assert!(
        u(&ra, "frames_repaired") + u(&rb, "frames_repaired") > 0,
        "losses were repaired by retransmission: {ra}\n{rb}"
    );
    assert!(
        u(&ra, "retransmissions_received") + u(&rb, "retransmissions_received") > 0,
        "the repairs came as RTX (RFC 4588, negotiated): {ra}\n{rb}"
    );
    assert!(
        u(&ra, "fec_recovered") + u(&rb, "fec_recovered") > 0,
        "FlexFEC rebuilt lost packets: {ra}\n{rb}"
    );

    // Outage.
    let flaky = Topology::build(&format!("{pid}f"), false);
    let (ra, rb) = call_with(&flaky, "outage", "16s", |t, _| {
        std::thread::sleep(Duration::from_secs(3));
        t.set_outage("a", true);
        t.set_outage("b", true);
        std::thread::sleep(Duration::from_secs(5));
        t.set_outage("a", false);
        t.set_outage("b", false);
    });
    drop(flaky);
    for r in [&ra, &rb] {
        eprintln!(
            "outage: ended {}, decoded {}, in the last 4 s {}, freezes {} ({} ms)",
            r["ended"],
            u(r, "frames_decoded"),
            decoded_in_last(r, 4.0),
            u(r, "freeze_count"),
            r["freeze_total_ms"],
        );
        assert_outlived(r, "outage");
        assert!(
            decoded_in_last(r, 4.0) >= 60,
            "video came back after the outage: {r}"
        );
    }
}

#[test]
fn a_client_that_changes_address_gets_its_video_back() {
    if !runnable() {
        return;
    }
    let pid = std::process::id() % 10_000;
    let moving = Topology::build(&format!("{pid}m"), false);
    let (ra, rb) = call_with(&moving, "move", "14s", |t, _| {
        std::thread::sleep(Duration::from_secs(4));
        t.move_client("a");
    });
    drop(moving);
    for r in [&ra, &rb] {
        eprintln!(
            "move: ended {}, decoded {}, in the last 5 s {}, freezes {} ({} ms)",
            r["ended"],
            u(r, "frames_decoded"),
            decoded_in_last(r, 5.0),
            u(r, "freeze_count"),
            r["freeze_total_ms"],
        );
        assert_outlived(r, "move");
        assert!(
            decoded_in_last(r, 5.0) >= 90,
            "video came back after the move: {r}"
        );
    }
}

#[test]
fn a_handshake_whose_flights_are_lost_gets_a_fresh_connection() {
    if !runnable() {
        return;
    }
    let pid = std::process::id() % 10_000;
    let topology = Topology::build(&format!("{pid}d"), false);
    let dir = out_dir("dtls-lost");
    let logs = [dir.join("a.log"), dir.join("b.log")];
    for log in &logs {
        let _ = std::fs::remove_file(log);
    }
    topology.set_dtls_drop("a", true);
    let (ra, rb) = std::thread::scope(|scope| {
        // The flights pass again once a client has given the first handshake up: the
        // fresh connection's handshake must then finish (the first one's is closed).
        scope.spawn(|| {
            let deadline = std::time::Instant::now() + Duration::from_secs(40);
            while std::time::Instant::now() < deadline
                && !logs.iter().any(|log| {
                    std::fs::read_to_string(log)
                        .is_ok_and(|text| text.contains("starting a fresh media connection"))
                })
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            topology.set_dtls_drop("a", false);
        });
        call_with(&topology, "dtls-lost", "6s", |_, _| {})
    });
    drop(topology);
    for r in [&ra, &rb] {
        eprintln!(
            "dtls lost: ended {}, fresh connections {}, connected after {} ms, decoded {}, audio {}",
            r["ended"],
            r["fresh_connections"],
            r["time_to_connected_ms"],
            u(r, "frames_decoded"),
            u(r, "audio_frames_decoded"),
        );
        assert_outlived(r, "lost handshake");
        let fresh = u(r, "fresh_connections");
        assert!(
            (1..=2).contains(&fresh),
            "a fresh connection took over: {r}"
        );
        assert!(u(r, "frames_decoded") >= 60, "{r}");
        assert!(u(r, "audio_frames_decoded") >= 100, "{r}");
    }
}
