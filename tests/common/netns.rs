//! Network namespaces for the project's own test hosts: two clients behind two NAT
//! routers and a "public" segment with the signaling and STUN/TURN server, built with
//! `ip netns`, veth pairs, a bridge and iptables, and removed when dropped:
//!
//! ```text
//!   client a (10.0.1.2) -- router a (NAT) --+                          +-- router b (NAT) -- client b (10.0.2.2)
//!                          198.51.100.11    +-- "public" bridge ------+    198.51.100.12
//!                                                198.51.100.1: signaling + STUN/TURN
//! ```
//!
//! Links are impaired the ways this kernel allows (no netem): random loss with iptables
//! `statistic`, total outages with a DROP rule, rate limits with `tbf`, one-way delay
//! with a userspace NFQUEUE delayer (`delay.rs`).
#![allow(clippy::unwrap_used, dead_code)]

#[path = "delay.rs"]
pub mod delay;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn able() -> bool {
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
pub struct Topology {
    names: Vec<String>,
    tag: String,
    /// Added to every client's `duet call` (e.g. a resolution for a benchmark).
    pub client_args: Vec<String>,
    /// Added to the server's command line (e.g. `--turn-listen-tcp`).
    pub server_args: Vec<String>,
    /// What the clients' `--server` says (default `198.51.100.1:8787`).
    pub server_url: Option<String>,
    /// Whether the server runs its embedded STUN/TURN server (default true).
    pub embedded_turn: bool,
    /// Running uplink delayers by side; stopped before the namespaces are deleted.
    delayers: Mutex<Vec<(String, delay::Delayer)>>,
}

/// The NFQUEUE of uplink delays; queue numbers are per namespace, so every router has
/// its own queue 0.
const UPLINK_QUEUE: u16 = 0;

impl Drop for Topology {
    fn drop(&mut self) {
        // Stop the delay threads first: each lets its held packets go and leaves its
        // namespace, which `ip netns del` then really frees.
        self.delayers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

impl Topology {
    pub fn ns(&self, role: &str) -> String {
        format!("d{role}{}", self.tag)
    }

    /// Builds the picture above; `symmetric` picks the NAT type of both routers.
    pub fn build(tag: &str, symmetric: bool) -> Topology {
        let mut t = Topology {
            names: Vec::new(),
            tag: tag.to_owned(),
            client_args: Vec::new(),
            server_args: Vec::new(),
            server_url: None,
            embedded_turn: true,
            delayers: Mutex::new(Vec::new()),
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

    pub fn spawn(&self, role: &str, args: &[&str], log: &Path) -> Child {
        let log = std::fs::File::create(log).unwrap();
        let extra: &[String] = if role == "pub" {
            &self.server_args
        } else {
            &self.client_args
        };
        Command::new("ip")
            .args(["netns", "exec", &self.ns(role), env!("CARGO_BIN_EXE_duet")])
            .args(args)
            .args(extra)
            // DUET_NET_LOG: a filter for the clients' logs when a run needs looking into.
            .env(
                "RUST_LOG",
                std::env::var("DUET_NET_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }
}

pub fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/nat-test")
        .join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits until `addr` (host:port) accepts TCP connections from inside namespace `ns`.
pub fn wait_for_port(ns: &str, host: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let probe = format!("exec 3<>/dev/tcp/{host}/{port}");
    while Instant::now() < deadline {
        let ok = Command::new("ip")
            .args(["netns", "exec", ns, "bash", "-c", &probe])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {host}:{port} in {ns}");
}

/// Waits until the file at `path` contains `needle` (e.g. a client's log saying it is
/// connected); false after `timeout`.
pub fn wait_for_text(path: &Path, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

impl Topology {
    /// Runs a command inside the router of `side` ("a" or "b").
    fn router(&self, side: &str, args: &[&str]) {
        let router = self.ns(&format!("r{side}"));
        let mut full = vec!["ip", "netns", "exec", &router];
        full.extend_from_slice(args);
        run(&full);
    }

    /// Drops this fraction of the UDP packets crossing the router of `side`, both ways.
    pub fn add_loss(&self, side: &str, fraction: f64) {
        self.drop_udp(side, fraction, &[]);
    }

    /// Drops this fraction of the UDP packets leaving through the router of `side` (its
    /// client's uplink only).
    pub fn add_uplink_loss(&self, side: &str, fraction: f64) {
        self.drop_udp(side, fraction, &["-o", "wan"]);
    }

    /// An iptables rule dropping `fraction` of the forwarded UDP matching `filter`.
    fn drop_udp(&self, side: &str, fraction: f64, filter: &[&str]) {
        let p = format!("{fraction}");
        let mut rule = vec!["iptables", "-I", "FORWARD"];
        rule.extend_from_slice(filter);
        rule.extend([
            "-p",
            "udp",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &p,
            "-j",
            "DROP",
        ]);
        self.router(side, &rule);
    }

    /// Limits the uplink of `side` (its router's outside interface) to `kbit` kbit/s with
    /// a token bucket holding at most 200 ms of queue; again to change the rate.
    pub fn set_uplink_rate(&self, side: &str, kbit: u32) {
        let rate = format!("{kbit}kbit");
        // Burst: at least a few full packets, or the bucket cannot pass a 1.5 kB packet.
        let burst = format!("{}", (kbit as usize * 1000 / 8 / 50).max(6_000));
        let router = self.ns(&format!("r{side}"));
        let exists = Command::new("ip")
            .args([
                "netns", "exec", &router, "tc", "qdisc", "show", "dev", "wan",
            ])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("tbf"));
        let verb = if exists { "change" } else { "add" };
        self.router(
            side,
            &[
                "tc", "qdisc", verb, "dev", "wan", "root", "tbf", "rate", &rate, "burst", &burst,
                "latency", "200ms",
            ],
        );
    }

    /// Gives the client of `side` a new address on its LAN (10.0.x.3 instead of .2), as a
    /// laptop that changes networks: its NAT mapping, and so its public port, change too.
    /// The signaling connection (TCP from the old address) is cut by it as well.
    /// Starts the signaling server with its STUN/TURN relay (unless `embedded_turn` is
    /// off) on the "public" segment (198.51.100.1, ports 8787 and 3478), logging to `dir/server.log`; returns once it
    /// accepts connections.
    pub fn start_server(&self, dir: &Path) -> Child {
        let mut args = vec![
            "server",
            "--listen",
            "198.51.100.1:8787",
            "--db",
            ":memory:",
        ];
        if self.embedded_turn {
            args.extend([
                "--turn-listen",
                "198.51.100.1:3478",
                "--turn-public-ip",
                "198.51.100.1",
            ]);
        }
        let server = self.spawn("pub", &args, &dir.join("server.log"));
        wait_for_port(&self.ns("pub"), "198.51.100.1", 8787);
        server
    }

    /// Delays every packet leaving the router of `side` through its uplink (`wan`) by
    /// `ms`, one way (40 on both sides adds 80 ms to the RTT), without reordering: a thread
    /// of this process holds them in an NFQUEUE (this kernel has no netem; see delay.rs).
    /// Again to change the delay; 0 to end it.
    pub fn add_uplink_delay(&self, side: &str, ms: u32) {
        let router = self.ns(&format!("r{side}"));
        let mut delayers = self.delayers.lock().unwrap();
        // A queue takes one delayer: the old one goes first (its held packets on at once).
        if let Some(i) = delayers.iter().position(|(s, _)| s == side) {
            let (_, old) = delayers.swap_remove(i);
            let stats = old.stop().unwrap();
            assert_eq!(stats.dropped(), 0, "uplink delay of {side}: {stats:?}");
        }
        if ms == 0 {
            return; // the rule stays: with no delayer bound, --queue-bypass passes packets
        }
        let delay = Duration::from_millis(ms.into());
        let delayer = delay::Delayer::start(&router, UPLINK_QUEUE, delay).unwrap();
        // The rule once per router (after the queue is bound), the last of
        // mangle/POSTROUTING: after the loss and outage rules, before NAT and tbf.
        let rule = delay::rule_args("wan", UPLINK_QUEUE);
        let mut check = vec![
            "ip",
            "netns",
            "exec",
            &router,
            "iptables",
            "-t",
            "mangle",
            "-C",
            "POSTROUTING",
        ];
        check.extend(rule.iter().map(String::as_str));
        let present = Command::new(check[0])
            .args(&check[1..])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !present {
            delay::install_rule(&router, "wan", UPLINK_QUEUE).unwrap();
        }
        delayers.push((side.to_owned(), delayer));
    }

    /// What the uplink delayer of `side` did so far (None without one).
    pub fn uplink_delay_stats(&self, side: &str) -> Option<delay::Stats> {
        let delayers = self.delayers.lock().unwrap();
        let (_, d) = delayers.iter().find(|(s, _)| s == side)?;
        Some(d.stats().unwrap())
    }

    pub fn move_client(&self, side: &str) {
        let lan = if side == "a" { "10.0.1" } else { "10.0.2" };
        let client = self.ns(side);
        let old = format!("{lan}.2/24");
        let new = format!("{lan}.3/24");
        let gateway = format!("{lan}.1");
        // Old first: deleting a primary address takes the secondaries of its subnet along.
        run(&["ip", "-n", &client, "addr", "del", &old, "dev", "eth0"]);
        run(&["ip", "-n", &client, "addr", "add", &new, "dev", "eth0"]);
        run(&[
            "ip", "-n", &client, "route", "replace", "default", "via", &gateway,
        ]);
    }

    /// Lets only TCP to `ports` through the router of `side` (outbound; answers come back
    /// through conntrack): all UDP and every other TCP port are dropped, as on a network
    /// that allows only web traffic.
    pub fn allow_only_tcp_ports(&self, side: &str, ports: &[u16]) {
        let list = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        self.router(
            side,
            &["iptables", "-I", "FORWARD", "-i", "lan", "-j", "DROP"],
        );
        self.router(
            side,
            &[
                "iptables",
                "-I",
                "FORWARD",
                "-i",
                "lan",
                "-p",
                "tcp",
                "-m",
                "multiport",
                "--dports",
                &list,
                "-j",
                "ACCEPT",
            ],
        );
    }

    /// Gives the "public" segment a default route to a gateway that does not exist (an
    /// address with a fixed MAC address nobody has): a relay's send to an address nobody
    /// routes (a partner's private host candidate) is then lost on the way, as on the
    /// internet, instead of failing at once with "network unreachable".
    pub fn public_default_route(&self) {
        let public = self.ns("pub");
        for cmd in [
            "ip neigh add 198.51.100.254 lladdr 02:00:00:00:00:fe dev br0 nud permanent",
            "ip route add default via 198.51.100.254 dev br0",
        ] {
            let mut args = vec!["ip", "netns", "exec", &public];
            args.extend(cmd.split(' '));
            run(&args);
        }
    }

    /// Cuts (or restores) all UDP through the router of `side`: media and TURN, not the
    /// signaling WebSocket.
    pub fn set_outage(&self, side: &str, down: bool) {
        self.forward_rule(side, down, &["-p", "udp", "-j", "DROP"]);
    }

    /// Inserts (`on`) or deletes a FORWARD rule at the router of `side`.
    fn forward_rule(&self, side: &str, on: bool, rule: &[&str]) {
        let mut full = vec!["iptables", if on { "-I" } else { "-D" }, "FORWARD"];
        full.extend_from_slice(rule);
        self.router(side, &full);
    }

    /// Drops (or passes again) every DTLS packet through the router of `side`, both ways:
    /// UDP whose first payload byte is 20-63 (RFC 7983's demultiplexing; STUN, TURN
    /// channel data and SRTP pass).
    pub fn set_dtls_drop(&self, side: &str, drop: bool) {
        let first_payload_byte = "0>>22&0x3C@8>>24&0xFF=20:63";
        let rule = [
            "-p",
            "udp",
            "-m",
            "u32",
            "--u32",
            first_payload_byte,
            "-j",
            "DROP",
        ];
        self.forward_rule(side, drop, &rule);
    }

    /// Cuts (or allows again) the signaling WebSocket of `side`: its TCP is answered with
    /// resets both ways at the router (media, UDP, passes).
    pub fn set_signaling_cut(&self, side: &str, cut: bool) {
        let rule = ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"];
        self.forward_rule(side, cut, &rule);
    }
}

/// A call between the two clients through the topology; both reports.
pub fn call_through(topology: &Topology, name: &str) -> (Value, Value) {
    call_with(topology, name, "5s", |_, _| {})
}

/// A call of `duration` between the two clients; `during` runs once both are connected
/// (given the topology and the output directory), e.g. to impair the link mid-call.
pub fn call_with(
    topology: &Topology,
    name: &str,
    duration: &str,
    during: impl FnOnce(&Topology, &Path),
) -> (Value, Value) {
    let dir = out_dir(name);
    let mut server = topology.start_server(&dir);
    let server_url = topology
        .server_url
        .clone()
        .unwrap_or_else(|| "198.51.100.1:8787".to_owned());
    let client = |side: &str| {
        let report = dir.join(format!("{side}.json"));
        let child = topology.spawn(
            side,
            &[
                "call",
                "--headless",
                "--server",
                &server_url,
                "--room",
                "nat",
                "--name",
                side,
                "--expect-pattern",
                "--duration",
                duration,
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
    for side in ["a", "b"] {
        let log = dir.join(format!("{side}.log"));
        if !wait_for_text(&log, "duet: connected", Duration::from_secs(40)) {
            break; // the reports below say why
        }
    }
    during(topology, &dir);
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
