//! Calls across real NATs, built from network namespaces this test creates and removes:
//!
//! ```text
//!   client a (10.0.1.2) -- router a (NAT) --+                          +-- router b (NAT) -- client b (10.0.2.2)
//!                          198.51.100.11    +-- "public" bridge ------+    198.51.100.12
//!                                                198.51.100.1: signaling + STUN/TURN
//! ```
//!
//! Behind symmetric NATs (`MASQUERADE --random-fully`: a new port for every destination)
//! no direct path exists, so the call must go through the relay and the report must say
//! `relay`; behind port-preserving ("cone") NATs hole punching works and the relay is not
//! used. Both directions must carry video and audio.
//!
//! Needs root, `ip` and `iptables`; without them the test says so and passes, unless
//! `DUET_REQUIRE_NAT_TEST=1` (set by `make test`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn able() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tools = ["ip", "iptables"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    root && tools
}

/// The namespaces of one topology; removed (with their interfaces) when dropped.
struct Topology {
    names: Vec<String>,
    tag: String,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

impl Topology {
    fn ns(&self, role: &str) -> String {
        format!("d{role}{}", self.tag)
    }

    /// Builds the picture above; `symmetric` picks the NAT type of both routers.
    fn build(tag: &str, symmetric: bool) -> Topology {
        let mut t = Topology {
            names: Vec::new(),
            tag: tag.to_owned(),
        };
        for role in ["pub", "ra", "rb", "a", "b"] {
            let n = t.ns(role);
            let _ = Command::new("ip").args(["netns", "del", &n]).output();
            run(&["ip", "netns", "add", &n]);
            run(&["ip", "-n", &n, "link", "set", "lo", "up"]);
            t.names.push(n);
        }
        let public = t.ns("pub");
        run(&["ip", "-n", &public, "link", "add", "br0", "type", "bridge"]);
        run(&[
            "ip",
            "-n",
            &public,
            "addr",
            "add",
            "198.51.100.1/24",
            "dev",
            "br0",
        ]);
        run(&["ip", "-n", &public, "link", "set", "br0", "up"]);
        for (side, wan_ip, lan) in [
            ("a", "198.51.100.11", "10.0.1"),
            ("b", "198.51.100.12", "10.0.2"),
        ] {
            let router = t.ns(&format!("r{side}"));
            let client = t.ns(side);
            let port = format!("p{side}");
            run(&[
                "ip", "link", "add", "wan", "netns", &router, "type", "veth", "peer", "name",
                &port, "netns", &public,
            ]);
            run(&[
                "ip", "-n", &public, "link", "set", &port, "master", "br0", "up",
            ]);
            run(&[
                "ip",
                "-n",
                &router,
                "addr",
                "add",
                &format!("{wan_ip}/24"),
                "dev",
                "wan",
            ]);
            run(&["ip", "-n", &router, "link", "set", "wan", "up"]);
            run(&[
                "ip", "link", "add", "lan", "netns", &router, "type", "veth", "peer", "name",
                "eth0", "netns", &client,
            ]);
            run(&[
                "ip",
                "-n",
                &router,
                "addr",
                "add",
                &format!("{lan}.1/24"),
                "dev",
                "lan",
            ]);
            run(&["ip", "-n", &router, "link", "set", "lan", "up"]);
            run(&[
                "ip",
                "-n",
                &client,
                "addr",
                "add",
                &format!("{lan}.2/24"),
                "dev",
                "eth0",
            ]);
            run(&["ip", "-n", &client, "link", "set", "eth0", "up"]);
            run(&[
                "ip",
                "-n",
                &client,
                "route",
                "add",
                "default",
                "via",
                &format!("{lan}.1"),
            ]);
            let exec = |args: &[&str]| {
                let mut full = vec!["ip", "netns", "exec", &router];
                full.extend_from_slice(args);
                run(&full);
            };
            exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            let mut masquerade = vec!["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan"];
            masquerade.extend(["-j", "MASQUERADE"]);
            if symmetric {
                masquerade.push("--random-fully");
            }
            exec(&masquerade);
            // A router drops what nobody inside asked for, forwarded or addressed to
            // itself (else conntrack entries made by early probes take the port a
            // mapping needs, and hole punching fails even through cone NATs).
            for chain in ["FORWARD", "INPUT"] {
                let rule = "-i wan -m conntrack --ctstate NEW,INVALID -j DROP";
                let mut args = vec!["iptables", "-A", chain];
                args.extend(rule.split(' '));
                exec(&args);
            }
        }
        t
    }

    fn spawn(&self, role: &str, args: &[&str], log: &Path) -> Child {
        let log = std::fs::File::create(log).unwrap();
        Command::new("ip")
            .args(["netns", "exec", &self.ns(role), env!("CARGO_BIN_EXE_duet")])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }
}

fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/nat-test")
        .join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A call between the two clients through the topology; both reports.
fn call_through(topology: &Topology, name: &str) -> (Value, Value) {
    let dir = out_dir(name);
    let mut server = topology.spawn(
        "pub",
        &[
            "server",
            "--listen",
            "198.51.100.1:8787",
            "--turn-listen",
            "198.51.100.1:3478",
            "--turn-public-ip",
            "198.51.100.1",
            "--db",
            ":memory:",
        ],
        &dir.join("server.log"),
    );
    std::thread::sleep(Duration::from_millis(700));
    let client = |side: &str| {
        let report = dir.join(format!("{side}.json"));
        let child = topology.spawn(
            side,
            &[
                "call",
                "--headless",
                "--server",
                "198.51.100.1:8787",
                "--room",
                "nat",
                "--name",
                side,
                "--expect-pattern",
                "--duration",
                "5s",
                "--wait",
                "40s",
                "--report",
                report.to_str().unwrap(),
            ],
            &dir.join(format!("{side}.log")),
        );
        (child, report)
    };
    let (mut a, report_a) = client("a");
    let (mut b, report_b) = client("b");
    let status_a = a.wait().unwrap();
    let status_b = b.wait().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let read = |p: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| {
            panic!(
                "no report {} ({e}); see the logs in {}",
                p.display(),
                dir.display()
            )
        }))
        .unwrap()
    };
    let (ra, rb) = (read(&report_a), read(&report_b));
    assert!(status_a.success() && status_b.success(), "{ra}\n{rb}");
    (ra, rb)
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
