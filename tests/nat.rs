//! Calls across real NATs, built from network namespaces this test creates and removes
//! (`common::netns`).
//!
//! Behind symmetric NATs (`MASQUERADE --random-fully`: a new port for every destination)
//! no direct path exists, so the call must go through the relay and the report must say
//! `relay`; behind port-preserving ("cone") NATs hole punching works and the relay is not
//! used. Both directions must carry video and audio.
//!
//! TURN over TCP and TLS: a client whose router drops all UDP calls through the server's
//! `--turn-listen-tcp` front (its path `relay (tcp)`), one that may only reach TCP 443
//! and the signaling port through `--turn-listen-tls` on 443 (`relay (tls)`), and the
//! first one through coturn's TCP and TLS listeners instead.
//!
//! Needs root, `ip` and `iptables`; without them the test says so and passes, unless
//! `DUET_REQUIRE_NAT_TEST=1` (set by `make test`). The coturn test also needs `turnserver`
//! (Debian `coturn`); without it it passes, unless `DUET_REQUIRE_COTURN_TEST=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use common::netns::{Topology, able, call_through, out_dir};
use serde_json::Value;

/// One call at a time: two cores do not encode four video streams in real time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Whether the test can run (else it says so, and fails when it must run).
fn runnable() -> bool {
    if able() {
        return true;
    }
    assert!(
        std::env::var("DUET_REQUIRE_NAT_TEST").is_err(),
        "the NAT test needs root, ip and iptables"
    );
    eprintln!("skipped: needs root, ip and iptables");
    false
}

/// Namespace names of their own per test (`letter`), so tests never share one.
fn tag(letter: char) -> String {
    format!("{letter}{}", std::process::id() % 10_000)
}

fn assert_media_both_ways(ra: &Value, rb: &Value) {
    for r in [ra, rb] {
        assert!(r["frames_decoded"].as_u64().unwrap() >= 60, "{r}");
        assert!(r["audio_frames_decoded"].as_u64().unwrap() >= 100, "{r}");
        assert!(r["frames_with_strip"].as_u64().unwrap() >= 60, "{r}");
    }
}

#[test]
fn symmetric_nats_connect_through_the_relay_and_cone_nats_directly() {
    if !runnable() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let tag = tag('n');

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
    if !runnable() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let mut topology = Topology::build(&tag('t'), false);
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
    // B's path goes through A's relay; its own end may be any of its candidates.
    assert_eq!(rb["remote_candidate_type"], "relay", "{rb}");
    assert_media_both_ways(&ra, &rb);
}

/// A CA and a server certificate for 198.51.100.1 signed by it, written to `dir`:
/// (ca.pem, cert.pem, key.pem).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = CertificateParams::new(vec!["198.51.100.1".to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// A client on a network that lets only web traffic out (TCP 443, and here the signaling
/// port) calls through TURN over TLS on 443 (`--turn-listen-tls`); the path says so.
#[test]
fn a_client_behind_a_web_only_firewall_calls_through_turn_over_tls_on_443() {
    if !runnable() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = out_dir("tls-only");
    let (ca, cert, key) = certificates(&dir);
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let mut topology = Topology::build(&tag('s'), false);
    topology.server_args = vec![
        "--turn-listen-tls".into(),
        "198.51.100.1:443".into(),
        "--tls-cert".into(),
        path(&cert),
        "--tls-key".into(),
        path(&key),
    ];
    topology.server_url = Some("wss://198.51.100.1:8787".into());
    topology.client_args = vec!["--ca-file".into(), path(&ca)];
    topology.allow_only_tcp_ports("a", &[443, 8787]);
    let (ra, rb) = call_through(&topology, "tls-only");
    eprintln!(
        "web only: a {} / b {}",
        ra["candidate_type"], rb["candidate_type"]
    );
    assert_eq!(ra["candidate_type"], "relay (tls)", "{ra}");
    assert_eq!(rb["remote_candidate_type"], "relay", "{rb}");
    assert_media_both_ways(&ra, &rb);
}

/// coturn (`turnserver`, Debian package `coturn`) in the "public" namespace; killed on drop.
struct Coturn(std::process::Child);

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The app's bridge against coturn's own TCP and TLS listeners (same REST secret as the
/// signaling server): a client whose router drops all UDP calls through each; its partner
/// may use coturn too (a path from one coturn relay to the other).
#[test]
fn a_client_without_udp_calls_through_coturn_over_tcp_and_tls() {
    if !runnable() {
        return;
    }
    let coturn_present = std::process::Command::new("sh")
        .args(["-c", "command -v turnserver"])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !coturn_present {
        assert!(
            std::env::var("DUET_REQUIRE_COTURN_TEST").is_err(),
            "turnserver not found: install the Debian package `coturn`"
        );
        eprintln!("skipped: turnserver not found (Debian package `coturn`)");
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = out_dir("coturn");
    let (ca, cert, key) = certificates(&dir);
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let secret = "coturn-nat-secret";
    let mut topology = Topology::build(&tag('c'), false);
    let log = std::fs::File::create(dir.join("coturn.log")).unwrap();
    let _coturn = Coturn(
        std::process::Command::new("ip")
            .args(["netns", "exec", &topology.ns("pub"), "turnserver", "-n"])
            .args([
                "--listening-ip",
                "198.51.100.1",
                "--relay-ip",
                "198.51.100.1",
            ])
            .args(["--listening-port", "3479", "--tls-listening-port", "5349"])
            .args([
                "--min-port",
                "50000",
                "--max-port",
                "50999",
                "--realm",
                "duet",
            ])
            .args(["--use-auth-secret", "--static-auth-secret", secret])
            .args(["--cert", &path(&cert), "--pkey", &path(&key)])
            .args(["--no-dtls", "--no-cli", "--no-stdout-log", "--simple-log"])
            .args(["--log-file", &path(&dir.join("coturn-file.log"))])
            .args(["--pidfile", &path(&dir.join("coturn.pid"))])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    common::netns::wait_for_port(&topology.ns("pub"), "198.51.100.1", 3479);
    common::netns::wait_for_port(&topology.ns("pub"), "198.51.100.1", 5349);
    topology.client_args = vec!["--ca-file".into(), path(&ca)];
    topology.set_outage("a", true);
    // coturn alone (the signaling server without its own TURN server).
    topology.embedded_turn = false;
    // As on the internet: a send to a private address goes somewhere and is lost; coturn
    // ends a TCP client's session when its relay's send fails at once (no route).
    topology.public_default_route();
    for (name, url, path_type) in [
        (
            "coturn-tcp",
            "turn:198.51.100.1:3479?transport=tcp",
            "relay (tcp)",
        ),
        (
            "coturn-tls",
            "turns:198.51.100.1:5349?transport=tcp",
            "relay (tls)",
        ),
    ] {
        // The signaling server hands out coturn's STUN and TURN URLs (B finds its NAT's
        // address through STUN, so A's relay may reach it).
        topology.server_args = [
            "--ice-server",
            "stun:198.51.100.1:3479",
            "--ice-server",
            url,
            "--turn-secret",
            secret,
        ]
        .map(String::from)
        .to_vec();
        let (ra, rb) = call_through(&topology, name);
        eprintln!(
            "{name}: a {} / b {}",
            ra["candidate_type"], rb["candidate_type"]
        );
        assert_eq!(ra["candidate_type"], path_type, "{ra}");
        assert_eq!(rb["remote_candidate_type"], "relay", "{rb}");
        assert_media_both_ways(&ra, &rb);
    }
}
