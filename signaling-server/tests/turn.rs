//! The embedded STUN/TURN server (`--turn-listen`), all on loopback: credentials minted as
//! in `welcome` work and bad ones are refused, denied peers get 403 and no datagram, an
//! allowed peer is relayed both ways, quotas and the lifetime ceiling hold, and coturn's
//! own test client (`turnutils_uclient`) allocates and relays with minted credentials.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{Client, WAIT, http, start_server};
use signaling_server::turn::{credential, username};
use signaling_server::turn_server::peers::PeerRange;
use signaling_server::{Config, Server};
use stun::agent::TransactionId;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_XOR_PEER_ADDRESS};
use stun::error_code::ErrorCodeAttribute;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_ERROR_RESPONSE, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, Getter as _, METHOD_ALLOCATE,
    METHOD_CREATE_PERMISSION, Message, MessageType, Setter,
};
use stun::textattrs::{Nonce, Realm, Username};
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;
use turn::client::{Client as TurnClient, ClientConfig};
use turn::proto::lifetime::Lifetime;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::{PROTO_UDP, relayaddr::RelayedAddress};
use webrtc_util::Conn;

const SECRET: &str = "turn-test-secret";

/// A signaling server with the embedded TURN server on an ephemeral loopback port.
async fn turn_server(tweak: impl FnOnce(&mut Config)) -> Server {
    start_server(|c| {
        c.turn_secret = Some(SECRET.into());
        c.turn_server.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        tweak(c);
    })
    .await
}

fn allow_loopback(c: &mut Config) {
    c.turn_server.allow_peers = vec!["127.0.0.0/8".parse::<PeerRange>().unwrap()];
}

/// (username, password) minted exactly as `welcome` does, valid for an hour.
fn minted(id: &str) -> (String, String) {
    let user = username(id, SystemTime::now(), Duration::from_secs(3600));
    let pass = credential(SECRET.as_bytes(), &user);
    (user, pass)
}

/// A `turn` crate client (an implementation independent of the server side's request
/// handling) connected to `server`'s TURN port.
async fn client(server: &Server, user: &str, pass: &str) -> TurnClient {
    let addr = server.turn_addr().unwrap().to_string();
    let conn = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let c = TurnClient::new(ClientConfig {
        stun_serv_addr: addr.clone(),
        turn_serv_addr: addr,
        username: user.into(),
        password: pass.into(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(conn),
        vnet: None,
    })
    .await
    .unwrap();
    c.listen().await.unwrap();
    c
}

async fn allocations_become(server: &Server, n: usize) {
    let turn = server.turn_server().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while turn.allocations() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "allocations stayed {} (wanted {n})",
            turn.allocations()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits up to `within` for one datagram.
async fn recv_within(socket: &UdpSocket, within: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 1500];
    match tokio::time::timeout(within, socket.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
        _ => None,
    }
}

#[tokio::test]
async fn welcome_lists_the_embedded_server_and_its_credentials_allocate() {
    let s = turn_server(|_| {}).await;
    let port = s.turn_addr().unwrap().port();
    let c = Client::connect(&s).await;
    let list = c.welcome["ice_servers"].as_array().unwrap().clone();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["urls"][0], format!("stun:127.0.0.1:{port}"));
    assert!(list[0].get("username").is_none_or(|u| u.is_null()));
    assert_eq!(
        list[1]["urls"][0],
        format!("turn:127.0.0.1:{port}?transport=udp")
    );
    let user = list[1]["username"].as_str().unwrap().to_owned();
    let pass = list[1]["credential"].as_str().unwrap().to_owned();
    assert!(user.contains(':'), "{user}");

    let (status, body) = http(&s, "GET", "/api/ice-servers").await;
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!("turn:127.0.0.1:{port}?transport=udp")),
        "{body}"
    );

    let tc = client(&s, &user, &pass).await;
    // STUN: the server reports our own address back.
    let mapped = tc.send_binding_request().await.unwrap();
    assert_eq!(mapped.ip().to_string(), "127.0.0.1");
    let relay = tc.allocate().await.unwrap();
    let relayed = relay.local_addr().unwrap();
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    assert!(relayed.port() >= 49152, "{relayed}");
    allocations_become(&s, 1).await;
    relay.close().await.unwrap();
    allocations_become(&s, 0).await;
    tc.close().await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn expired_wrong_and_missing_credentials_are_refused() {
    let s = turn_server(|_| {}).await;
    let now = SystemTime::now();
    let expired = username(
        "late",
        now - Duration::from_secs(3600),
        Duration::from_secs(60),
    );
    let expired_pass = credential(SECRET.as_bytes(), &expired);
    let (user, _) = minted("wrong");
    let wrong_pass = credential(b"another secret", &user);
    let not_rest = "alice".to_owned();
    let not_rest_pass = credential(SECRET.as_bytes(), &not_rest);
    for (what, u, p) in [
        ("expired", expired.as_str(), expired_pass.as_str()),
        ("wrong HMAC", user.as_str(), wrong_pass.as_str()),
        ("missing", "", ""),
        (
            "not a REST username",
            not_rest.as_str(),
            not_rest_pass.as_str(),
        ),
    ] {
        let tc = client(&s, u, p).await;
        let result = tc.allocate().await;
        assert!(result.is_err(), "{what} credentials were accepted");
        tc.close().await.unwrap();
    }
    assert_eq!(s.turn_server().unwrap().allocations(), 0);
    s.stop().await;
}

#[tokio::test]
async fn a_flood_of_unauthenticated_requests_is_limited_and_real_clients_still_allocate() {
    let s = turn_server(|_| {}).await;
    let turn = s.turn_addr().unwrap();
    // Each unauthenticated Allocate would make the crate keep one more nonce forever.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(turn).await.unwrap();
    for _ in 0..40 {
        let probe = unauthenticated_allocate();
        socket.send(&probe.raw).await.unwrap();
    }
    let mut answered = 0;
    while recv_within(&socket, Duration::from_millis(500))
        .await
        .is_some()
    {
        answered += 1;
    }
    assert!(
        (10..=11).contains(&answered),
        "{answered} of 40 answered (the source's burst is 10)"
    );
    // A client with credentials from the same address still gets its allocation (its
    // first Allocate waits for a token at most half a second).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (user, pass) = minted("after-flood");
    let tc = client(&s, &user, &pass).await;
    let relay = tc.allocate().await.unwrap();
    allocations_become(&s, 1).await;
    relay.close().await.unwrap();
    tc.close().await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn stun_with_the_top_bits_set_never_reaches_the_library() {
    // The library would read 0xC003 as an Allocate (it masks the top two bits), past
    // every check of the gate: quotas, the lifetime ceiling, denied peers.
    let s = turn_server(|_| {}).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(s.turn_addr().unwrap()).await.unwrap();
    let probe = unauthenticated_allocate();
    let mut masked = probe.raw.clone();
    masked[0] |= 0xC0;
    socket.send(&masked).await.unwrap();
    assert!(
        recv_within(&socket, Duration::from_millis(500))
            .await
            .is_none(),
        "dropped, not answered"
    );
    // The same request as STUN proper is answered (401 with a nonce).
    socket.send(&probe.raw).await.unwrap();
    assert!(recv_within(&socket, WAIT).await.is_some());
    s.stop().await;
}

#[tokio::test]
async fn denied_peers_get_no_permission_and_no_datagram() {
    let s = turn_server(|_| {}).await;
    let victim = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (user, pass) = minted("mallory");
    let tc = client(&s, &user, &pass).await;
    let relay = tc.allocate().await.unwrap();
    for peer in [
        victim.local_addr().unwrap(),
        "10.0.0.1:9".parse().unwrap(),
        "169.254.169.254:80".parse().unwrap(),
        "224.0.0.251:5353".parse().unwrap(),
    ] {
        let err = relay
            .send_to(b"GET / HTTP/1.0\r\n\r\n", peer)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("403"), "{peer}: {err}");
    }
    assert_eq!(recv_within(&victim, Duration::from_millis(300)).await, None);
    relay.close().await.unwrap();
    tc.close().await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn an_allowed_loopback_peer_is_relayed_both_ways() {
    let s = turn_server(allow_loopback).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (user, pass) = minted("bob");
    let tc = client(&s, &user, &pass).await;
    let relay = tc.allocate().await.unwrap();
    let relayed = relay.local_addr().unwrap();
    // The first datagrams go as Send indications, later ones over the bound channel.
    for i in 0..20u8 {
        relay.send_to(&[i; 100], peer_addr).await.unwrap();
        let (data, from) = recv_within(&peer, WAIT).await.expect("relayed to the peer");
        assert_eq!((data, from), (vec![i; 100], relayed));
        peer.send_to(&[i, i], relayed).await.unwrap();
        let mut buf = [0u8; 1500];
        let (n, from) = tokio::time::timeout(WAIT, relay.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((&buf[..n], from), (&[i, i][..], peer_addr));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.close().await.unwrap();
    tc.close().await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn two_clients_of_this_server_reach_each_other_without_an_allow_rule() {
    // Both peers behind symmetric NATs: each one's peer address is the other's relay.
    let s = turn_server(|_| {}).await;
    let (ua, pa) = minted("a");
    let (ub, pb) = minted("b");
    let (ca, cb) = (client(&s, &ua, &pa).await, client(&s, &ub, &pb).await);
    let (ra, rb) = (ca.allocate().await.unwrap(), cb.allocate().await.unwrap());
    let (a_addr, b_addr) = (ra.local_addr().unwrap(), rb.local_addr().unwrap());
    rb.send_to(b"hello a", a_addr).await.unwrap(); // B's permission for A
    ra.send_to(b"hello b", b_addr).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(WAIT, rb.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"hello b"[..], a_addr));
    for (r, c) in [(ra, ca), (rb, cb)] {
        r.close().await.unwrap();
        c.close().await.unwrap();
    }
    s.stop().await;
}

#[tokio::test]
async fn allocations_beyond_the_user_and_total_quotas_are_refused() {
    let s = turn_server(|c| {
        c.turn_server.user_quota = 1;
        c.turn_server.total_quota = 2;
    })
    .await;
    let (u1, p1) = minted("u1");
    let first = client(&s, &u1, &p1).await;
    let first_relay = first.allocate().await.unwrap();
    // Same user, fresh credentials: still the same user.
    let (u1b, p1b) = minted("u1");
    let again = client(&s, &u1b, &p1b).await;
    let err = again.allocate().await.err().unwrap();
    assert!(err.to_string().contains("486"), "{err}");
    let (u2, p2) = minted("u2");
    let second = client(&s, &u2, &p2).await;
    let _second_relay = second.allocate().await.unwrap();
    let (u3, p3) = minted("u3");
    let third = client(&s, &u3, &p3).await;
    let err = third.allocate().await.err().unwrap();
    assert!(err.to_string().contains("508"), "{err}");
    assert_eq!(s.turn_server().unwrap().allocations(), 2);
    // Freeing one gives the slot back.
    first_relay.close().await.unwrap();
    allocations_become(&s, 1).await;
    let fourth = client(&s, &u3, &p3).await;
    assert!(fourth.allocate().await.is_ok());
    s.stop().await;
}

/// A hand-made TURN client for what the `turn` client cannot send: a large LIFETIME and a
/// CreatePermission with several peers.
struct RawTurn {
    socket: UdpSocket,
    user: Username,
    realm: Realm,
    nonce: Nonce,
    key: MessageIntegrity,
}

impl RawTurn {
    async fn connect(server: SocketAddr, user: &str, pass: &str) -> RawTurn {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(server).await.unwrap();
        let probe = unauthenticated_allocate();
        socket.send(&probe.raw).await.unwrap();
        let challenge = recv(&socket).await;
        let realm = Realm::get_from_as(&challenge, ATTR_REALM).unwrap();
        let nonce = Nonce::get_from_as(&challenge, ATTR_NONCE).unwrap();
        let key =
            MessageIntegrity::new_long_term_integrity(user.into(), realm.text.clone(), pass.into());
        RawTurn {
            socket,
            user: Username::new(stun::attributes::ATTR_USERNAME, user.into()),
            realm,
            nonce,
            key,
        }
    }

    /// Sends an authenticated request with `attrs` and returns the response.
    async fn request(&self, method: stun::message::Method, attrs: Vec<Box<dyn Setter>>) -> Message {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(method, CLASS_REQUEST)),
        ];
        setters.extend(attrs);
        setters.push(Box::new(self.user.clone()));
        setters.push(Box::new(self.realm.clone()));
        setters.push(Box::new(self.nonce.clone()));
        setters.push(Box::new(self.key.clone()));
        setters.push(Box::new(FINGERPRINT));
        self.socket.send(&build(&setters).raw).await.unwrap();
        recv(&self.socket).await
    }
}

/// An Allocate without credentials (what a client sends first, to learn realm and nonce).
fn unauthenticated_allocate() -> Message {
    build(&[
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
        Box::new(RequestedTransport {
            protocol: PROTO_UDP,
        }),
    ])
}

fn build(setters: &[Box<dyn Setter>]) -> Message {
    let mut m = Message::new();
    m.build(setters).unwrap();
    m
}

async fn recv(socket: &UdpSocket) -> Message {
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let mut m = Message::new();
    m.raw = buf[..n].to_vec();
    m.decode().unwrap();
    m
}

fn peer(addr: &str) -> Box<dyn Setter> {
    let addr: SocketAddr = addr.parse().unwrap();
    Box::new(PeerAttr(XorMappedAddress {
        ip: addr.ip(),
        port: addr.port(),
    }))
}

struct PeerAttr(XorMappedAddress);

impl Setter for PeerAttr {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        self.0.add_to_as(m, ATTR_XOR_PEER_ADDRESS)
    }
}

#[tokio::test]
async fn lifetime_is_capped_and_one_denied_peer_spoils_a_permission_request() {
    let s = turn_server(|c| c.turn_server.allocation_lifetime = Duration::from_secs(60)).await;
    let (user, pass) = minted("raw");
    let raw = RawTurn::connect(s.turn_addr().unwrap(), &user, &pass).await;
    let res = raw
        .request(
            METHOD_ALLOCATE,
            vec![
                Box::new(RequestedTransport {
                    protocol: PROTO_UDP,
                }),
                Box::new(Lifetime(Duration::from_secs(3000))),
            ],
        )
        .await;
    assert_eq!(res.typ.class, CLASS_SUCCESS_RESPONSE, "{res}");
    let mut lifetime = Lifetime::default();
    lifetime.get_from(&res).unwrap();
    assert_eq!(lifetime.0, Duration::from_secs(60));
    let mut relayed = RelayedAddress::default();
    relayed.get_from(&res).unwrap();
    // The response to our rewritten request is signed with our key and verifies.
    raw.key.check(&mut res.clone()).unwrap();

    // A public peer is fine; adding a private one to the same request is refused (403),
    // signed with our key.
    let ok = raw
        .request(METHOD_CREATE_PERMISSION, vec![peer("203.0.113.7:5000")])
        .await;
    assert_eq!(ok.typ.class, CLASS_SUCCESS_RESPONSE, "{ok}");
    let refused = raw
        .request(
            METHOD_CREATE_PERMISSION,
            vec![peer("203.0.113.7:5000"), peer("192.168.1.1:80")],
        )
        .await;
    assert_eq!(refused.typ.class, CLASS_ERROR_RESPONSE, "{refused}");
    let mut code = ErrorCodeAttribute::default();
    code.get_from(&refused).unwrap();
    assert_eq!(code.code.0, 403);
    raw.key.check(&mut refused.clone()).unwrap();
    s.stop().await;
}

#[tokio::test]
async fn misconfigurations_are_reported() {
    let wildcard = Config {
        turn_secret: Some(SECRET.into()),
        ..Config::ephemeral()
    };
    let mut c = wildcard.clone();
    c.turn_server.listen = Some("0.0.0.0:0".parse().unwrap());
    let err = Server::start(c).await.unwrap_err().to_string();
    assert!(err.contains("--turn-public-ip"), "{err}");
    let mut c = wildcard.clone();
    c.turn_server.listen = Some("127.0.0.1:0".parse().unwrap());
    c.turn_server.allocation_lifetime = Duration::from_secs(3600);
    assert!(Server::start(c).await.is_err());
    let mut c = Config::ephemeral();
    c.turn_server.listen = Some("127.0.0.1:0".parse().unwrap());
    c.turn_username = Some("u".into());
    c.turn_password = Some("p".into());
    c.ice_servers = vec!["turn:example.invalid:3478".into()];
    let err = Server::start(c).await.unwrap_err().to_string();
    assert!(err.contains("shared-secret"), "{err}");
    // Without any secret the server makes one up and its credentials work.
    let mut c = Config::ephemeral();
    c.turn_server.listen = Some("127.0.0.1:0".parse().unwrap());
    let s = Server::start(c).await.unwrap();
    let welcome = Client::connect(&s).await.welcome;
    let user = welcome["ice_servers"][1]["username"].as_str().unwrap();
    let pass = welcome["ice_servers"][1]["credential"].as_str().unwrap();
    let tc = client(&s, user, pass).await;
    assert!(tc.allocate().await.is_ok());
    s.stop().await;
}

/// Runs coturn's `turnutils_uclient` with `args` against `server`'s TURN port; `None` when
/// the tool is not installed (Debian package `coturn`).
async fn uclient(server: &Server, args: &[&str]) -> Option<(bool, String)> {
    let port = server.turn_addr().unwrap().port().to_string();
    let run = tokio::process::Command::new("turnutils_uclient")
        .args(["-p", &port, "-n", "20", "-z", "5", "-c", "-X"])
        .args(args)
        .arg("127.0.0.1")
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run turnutils_uclient: {e}"),
    };
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    Some((output.status.success(), text))
}

fn skipped() {
    assert!(
        std::env::var("DUET_REQUIRE_COTURN_TEST").is_err(),
        "turnutils_uclient/turnutils_peer not found: install the Debian package `coturn`"
    );
    eprintln!(
        "SKIPPED: turnutils_uclient not found; install the Debian package `coturn` \
         (apt-get install coturn) to run the independent TURN client test"
    );
}

/// Waits until coturn's echo peer on `port` answers (it starts asynchronously; packets
/// sent before it listens would be counted as lost).
async fn wait_for_echo(port: u16) {
    let probe = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..100 {
        let _ = probe.send_to(b"ping", ("127.0.0.1", port)).await;
        let answer =
            tokio::time::timeout(Duration::from_millis(50), probe.recv_from(&mut buf)).await;
        if matches!(answer, Ok(Ok((4, _)))) {
            return;
        }
    }
    panic!("turnutils_peer did not answer on port {port}");
}

/// A free UDP port on loopback (for a helper process that cannot take port 0).
fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

#[tokio::test]
async fn coturn_uclient_allocates_and_relays_with_minted_credentials() {
    let s = turn_server(allow_loopback).await;
    // coturn's echo peer.
    let peer_port = free_udp_port();
    let peer = tokio::process::Command::new("turnutils_peer")
        .args(["-L", "127.0.0.1", "-p", &peer_port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut peer) = peer else {
        skipped();
        return;
    };
    wait_for_echo(peer_port).await;
    let (user, pass) = minted("uclient");
    let peer_port = peer_port.to_string();
    let args = [
        "-u",
        &user,
        "-w",
        &pass,
        "-e",
        "127.0.0.1",
        "-r",
        &peer_port,
    ];
    let Some((ok, out)) = uclient(&s, &args).await else {
        skipped();
        return;
    };
    assert!(ok, "turnutils_uclient failed:\n{out}");
    assert!(out.contains("tot_send_msgs=20, tot_recv_msgs=20"), "{out}");
    assert!(out.contains("Total lost packets 0 ("), "{out}");

    // coturn minting its own REST credentials from the secret (-W) also works, here in
    // client-to-client mode (-y: the peers are the clients' relays; no allow rule needed).
    let (ok, out) = uclient(&s, &["-W", SECRET, "-u", "coturn", "-y"])
        .await
        .unwrap();
    assert!(ok, "turnutils_uclient -W -y failed:\n{out}");
    assert!(out.contains("Total lost packets 0 ("), "{out}");

    // Expired credentials: coturn's client gives up with an error.
    let old = username(
        "old",
        SystemTime::now() - Duration::from_secs(7200),
        Duration::ZERO,
    );
    let old_pass = credential(SECRET.as_bytes(), &old);
    let args = [
        "-u",
        &old,
        "-w",
        &old_pass,
        "-e",
        "127.0.0.1",
        "-r",
        &peer_port,
    ];
    let (ok, out) = uclient(&s, &args).await.unwrap();
    assert!(!ok, "expired credentials were accepted:\n{out}");
    let _ = peer.kill().await;
    s.stop().await;
}
