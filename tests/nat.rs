//! Calls across real NATs, built from network namespaces this test creates and removes
//! (`common::netns`).
//!
//! Behind symmetric NATs (`MASQUERADE --random-fully`: a new port for every destination)
//! no direct path exists, so the call must go through the relay and the report must say
//! `relay`; behind port-preserving ("cone") NATs hole punching works and the relay is not
//! used. Both directions must carry video and audio.
//!
//! Needs root, `ip` and `iptables`; without them the test says so and passes, unless
//! `DUET_REQUIRE_NAT_TEST=1` (set by `make test`).
#![allow(clippy::unwrap_used)]

mod common;

use common::netns::{Topology, able, call_through};
use serde_json::Value;

fn assert_media_both_ways(ra: &Value, rb: &Value) {
    for r in [ra, rb] {
        assert!(r["frames_decoded"].as_u64().unwrap() >= 60, "{r}");
        assert!(r["audio_frames_decoded"].as_u64().unwrap() >= 100, "{r}");
        assert!(r["frames_with_strip"].as_u64().unwrap() >= 60, "{r}");
    }
}

#[test]
fn symmetric_nats_connect_through_the_relay_and_cone_nats_directly() {
    if !able() {
        assert!(
            std::env::var("DUET_REQUIRE_NAT_TEST").is_err(),
            "the NAT test needs root, ip and iptables"
        );
        eprintln!("skipped: needs root, ip and iptables");
        return;
    }
    let tag = format!("{}", std::process::id() % 10_000);

    let symmetric = Topology::build(&tag, true);
    let (ra, rb) = call_through(&symmetric, "symmetric");
    eprintln!(
        "symmetric: a {} / b {}",
        ra["candidate_type"], rb["candidate_type"]
    );
    assert_eq!(ra["candidate_type"], "relay", "{ra}");
    assert_eq!(rb["candidate_type"], "relay", "{rb}");
    assert_media_both_ways(&ra, &rb);
    drop(symmetric);

    let cone = Topology::build(&tag, false);
    let (ra, rb) = call_through(&cone, "cone");
    eprintln!(
        "cone: a {} / b {}",
        ra["candidate_type"], rb["candidate_type"]
    );
    for r in [&ra, &rb] {
        let kind = r["candidate_type"].as_str().unwrap_or_default();
        assert!(["host", "srflx", "prflx"].contains(&kind), "{r}");
    }
    assert_media_both_ways(&ra, &rb);
}

/// A client whose network drops all UDP still calls its partner: the app bridges TURN over
/// TCP to the server's `--turn-listen-tcp` front, and its report's path says so.
#[test]
fn a_client_without_udp_calls_through_turn_over_tcp() {
    if !able() {
        assert!(
            std::env::var("DUET_REQUIRE_NAT_TEST").is_err(),
            "the NAT test needs root, ip and iptables"
        );
        eprintln!("skipped: needs root, ip and iptables");
        return;
    }
    let tag = format!("{}", std::process::id() % 10_000);
    let mut topology = Topology::build(&tag, false);
    topology.server_args = ["--turn-listen-tcp", "198.51.100.1:3478"]
        .map(String::from)
        .to_vec();
    topology.set_outage("a", true);
    let (ra, rb) = call_through(&topology, "udp-blocked");
    eprintln!(
        "udp blocked: a {} / b {}",
        ra["candidate_type"], rb["candidate_type"]
    );
    assert_eq!(ra["candidate_type"], "relay (tcp)", "{ra}");
    assert_eq!(ra["local_candidate_type"], "relay", "{ra}");
    assert_eq!(rb["candidate_type"], "relay", "{rb}");
    assert_media_both_ways(&ra, &rb);
}
