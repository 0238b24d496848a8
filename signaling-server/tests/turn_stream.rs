//! TURN over TCP and TLS (`--turn-listen-tcp`, `--turn-listen-tls`), all on loopback:
//! `welcome` lists the transports UDP first; coturn's own client (`turnutils_uclient -t`,
//! `-t -S`) allocates and relays through both fronts; bad credentials over TCP are refused;
//! the fronts' limits hold (streams per IP, set-up time, garbage; oversized messages are
//! skipped), an allocation ends with its stream, and
//! stream clients are counted by their own address, not the bridge's.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{Client, WAIT, http, start_server};
use rcgen::{CertificateParams, KeyPair};
use signaling_server::Server;
use signaling_server::turn::{credential, username};
use signaling_server::turn_server::framing;
use signaling_server::turn_server::peers::PeerRange;
use stun::agent::TransactionId;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_ERROR_RESPONSE, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, Message,
    MessageType, Setter,
};
use stun::textattrs::{Nonce, Realm, Username};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use turn::proto::PROTO_UDP;
use turn::proto::reqtrans::RequestedTransport;

const SECRET: &str = "turn-stream-secret";

/// A server with the UDP TURN server and both stream fronts on ephemeral loopback ports.
/// The certificate (self-signed for 127.0.0.1) is written to `dir`.
async fn turn_server(dir: &Path, tweak: impl FnOnce(&mut signaling_server::Config)) -> Server {
    let (cert_path, key_path) = write_certificate(dir);
    start_server(|c| {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        c.turn_secret = Some(SECRET.into());
        c.tls_cert = Some(cert_path);
        c.tls_key = Some(key_path);
        c.turn_server.listen = Some(loopback);
        c.turn_server.listen_tcp = Some(loopback);
        c.turn_server.listen_tls = Some(loopback);
        c.turn_server.allow_peers = vec!["127.0.0.0/8".parse::<PeerRange>().unwrap()];
        tweak(c);
    })
    .await
}

/// A self-signed certificate for 127.0.0.1 in `dir`: (cert.pem, key.pem).
fn write_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

fn minted(id: &str) -> (String, String) {
    let user = username(id, SystemTime::now(), Duration::from_secs(3600));
    let pass = credential(SECRET.as_bytes(), &user);
    (user, pass)
}

#[tokio::test]
async fn welcome_lists_udp_then_tcp_then_tls() {
    // Over plain WebSocket: the server without a certificate, so with the TCP front only.
    let s = start_server(|c| {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        c.turn_secret = Some(SECRET.into());
        c.turn_server.listen = Some(loopback);
        c.turn_server.listen_tcp = Some(loopback);
    })
    .await;
    let turn = s.turn_server().unwrap();
    let (udp, tcp) = (turn.local_addr().port(), turn.tcp_addr().unwrap().port());
    let c = Client::connect(&s).await;
    assert_eq!(
        c.welcome["ice_servers"][1]["urls"],
        serde_json::json!([
            format!("turn:127.0.0.1:{udp}?transport=udp"),
            format!("turn:127.0.0.1:{tcp}?transport=tcp"),
        ])
    );
    let (status, body) = http(&s, "GET", "/api/ice-servers").await;
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!("turn:127.0.0.1:{tcp}?transport=tcp")),
        "{body}"
    );
    s.stop().await;

    // With TLS too: the turns: URL names --turn-tls-host (the certificate's name).
    let dir = tempfile::tempdir().unwrap();
    write_certificate(dir.path());
    let mut ice = signaling_server::turn::IceConfig::default();
    let tls_config = signaling_server::tls::ServerTls::from_files(
        Some(&dir.path().join("cert.pem")),
        Some(&dir.path().join("key.pem")),
    )
    .unwrap()
    .map(std::sync::Arc::new);
    let loopback = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let settings = signaling_server::turn_server::TurnServerConfig {
        listen: loopback,
        listen_tcp: loopback,
        listen_tls: loopback,
        tls_host: Some("turn.example.org".into()),
        ..Default::default()
    };
    let own = signaling_server::turn_server::TurnServer::start_for(
        &settings,
        &mut ice,
        Duration::from_secs(60),
        tls_config.as_ref(),
    )
    .await
    .unwrap()
    .unwrap();
    let port = |a: Option<SocketAddr>| a.unwrap().port();
    assert_eq!(
        ice.turn_urls,
        [
            format!("turn:127.0.0.1:{}?transport=udp", own.local_addr().port()),
            format!("turn:127.0.0.1:{}?transport=tcp", port(own.tcp_addr())),
            format!(
                "turns:turn.example.org:{}?transport=tcp",
                port(own.tls_addr())
            ),
        ]
    );
    own.stop().await;
}

#[tokio::test]
async fn stream_fronts_need_their_udp_server_and_a_certificate() {
    let mut c = signaling_server::Config::ephemeral();
    c.turn_server.listen_tcp = Some("127.0.0.1:0".parse().unwrap());
    let err = Server::start(c).await.unwrap_err().to_string();
    assert!(err.contains("--turn-listen"), "{err}");
    let mut c = signaling_server::Config::ephemeral();
    c.turn_server.listen = Some("127.0.0.1:0".parse().unwrap());
    c.turn_server.listen_tls = Some("127.0.0.1:0".parse().unwrap());
    let err = Server::start(c).await.unwrap_err().to_string();
    assert!(err.contains("--tls-cert"), "{err}");
}

/// Runs `turnutils_uclient` with `args` against `port`; `None` when it is not installed.
async fn uclient(port: u16, args: &[&str]) -> Option<(bool, String)> {
    let run = tokio::process::Command::new("turnutils_uclient")
        .args(["-p", &port.to_string(), "-n", "20", "-z", "5", "-c", "-X"])
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
    eprintln!("SKIPPED: turnutils_uclient not found (Debian package `coturn`)");
}

/// coturn's echo peer on a free loopback port, answering; `None` without coturn.
async fn echo_peer() -> Option<(tokio::process::Child, u16)> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new("turnutils_peer")
        .args(["-L", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let probe = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..100 {
        let _ = probe.send_to(b"ping", ("127.0.0.1", port)).await;
        let answer =
            tokio::time::timeout(Duration::from_millis(50), probe.recv_from(&mut buf)).await;
        if matches!(answer, Ok(Ok((4, _)))) {
            return Some((child, port));
        }
    }
    panic!("turnutils_peer did not answer on port {port}");
}

#[tokio::test]
async fn coturn_uclient_relays_over_tcp_and_tls_and_bad_credentials_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = turn_server(dir.path(), |_| {}).await;
    let Some((mut peer, peer_port)) = echo_peer().await else {
        skipped();
        return;
    };
    let turn = s.turn_server().unwrap();
    let peer_port = peer_port.to_string();
    let (user, pass) = minted("uclient");
    let base = [
        "-u",
        &user,
        "-w",
        &pass,
        "-e",
        "127.0.0.1",
        "-r",
        &peer_port,
    ];
    let tcp = turn.tcp_addr().unwrap().port();
    let tls = turn.tls_addr().unwrap().port();
    for (what, port, extra) in [("tcp", tcp, &["-t"][..]), ("tls", tls, &["-t", "-S"][..])] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let Some((ok, out)) = uclient(port, &args).await else {
            skipped();
            return;
        };
        assert!(ok, "turnutils_uclient over {what} failed:\n{out}");
        assert!(
            out.contains("tot_send_msgs=20, tot_recv_msgs=20"),
            "{what}: {out}"
        );
        assert!(out.contains("Total lost packets 0 ("), "{what}: {out}");
    }
    // Wrong password over TCP: refused as over UDP.
    let wrong = credential(b"another secret", &user);
    let args = [
        "-t",
        "-u",
        &user,
        "-w",
        &wrong,
        "-e",
        "127.0.0.1",
        "-r",
        &peer_port,
    ];
    let (ok, out) = uclient(tcp, &args).await.unwrap();
    assert!(!ok, "wrong credentials were accepted over TCP:\n{out}");
    let _ = peer.kill().await;
    s.stop().await;
}

/// An Allocate without credentials, framed for a stream.
fn unauthenticated_allocate() -> Vec<u8> {
    let mut m = Message::new();
    m.build(&[
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
        Box::new(RequestedTransport {
            protocol: PROTO_UDP,
        }),
    ])
    .unwrap();
    m.raw
}

/// Reads one framed STUN message from `tcp` (`None` if it closes first or after
/// `within`). Exactly its bytes: the next one stays in the socket.
async fn read_message(tcp: &mut TcpStream, within: Duration) -> Option<Message> {
    let read = async {
        let mut raw = vec![0u8; framing::STUN_HEADER];
        tcp.read_exact(&mut raw).await.ok()?;
        let len = framing::STUN_HEADER + usize::from(u16::from_be_bytes([raw[2], raw[3]]));
        raw.resize(len, 0);
        tcp.read_exact(&mut raw[framing::STUN_HEADER..])
            .await
            .ok()?;
        let frame = framing::next_frame(&raw, 65_536).unwrap().unwrap();
        assert_eq!(frame.consumed, raw.len());
        Some(raw)
    };
    let raw = tokio::time::timeout(within, read).await.ok()??;
    let mut m = Message::new();
    m.raw = raw;
    m.decode().unwrap();
    Some(m)
}

/// Whether the server closes `tcp` within `within` (reads until the end, discarding).
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut chunk = [0u8; 512];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(ip.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

async fn streams_become(s: &Server, n: usize) {
    let turn = s.turn_server().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while turn.open_streams() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "open streams stayed {} (wanted {n})",
            turn.open_streams()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn stream_clients_are_counted_by_their_own_address() {
    // The gate answers 10 unauthenticated requests per source at once. Fifteen stream
    // clients from fifteen addresses must all be answered although, to the UDP server,
    // they all come from the loopback bridge.
    let dir = tempfile::tempdir().unwrap();
    let s = turn_server(dir.path(), |_| {}).await;
    let tcp = s.turn_server().unwrap().tcp_addr().unwrap();
    let mut streams = Vec::new();
    for i in 2..17 {
        let mut stream = connect_from(&format!("127.0.0.{i}"), tcp).await;
        stream.write_all(&unauthenticated_allocate()).await.unwrap();
        streams.push(stream);
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        let answer = read_message(stream, WAIT)
            .await
            .unwrap_or_else(|| panic!("client {i} got no answer"));
        assert_eq!(answer.typ.class, CLASS_ERROR_RESPONSE, "{answer}"); // 401 + nonce
    }
    // One address is still limited like a UDP client: its 11th request is not answered.
    let mut one = connect_from("127.0.0.20", tcp).await;
    let mut answered = 0;
    for _ in 0..12 {
        one.write_all(&unauthenticated_allocate()).await.unwrap();
    }
    while read_message(&mut one, Duration::from_millis(500))
        .await
        .is_some()
    {
        answered += 1;
    }
    assert_eq!(answered, 10);
    s.stop().await;
}

#[tokio::test]
async fn half_open_slow_and_garbage_streams_are_closed_oversized_messages_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let s = turn_server(dir.path(), |c| {
        c.turn_server.max_streams_per_ip = 3;
        c.turn_server.stream_setup_timeout = Duration::from_millis(500);
    })
    .await;
    let turn = s.turn_server().unwrap();
    let (tcp, tls) = (turn.tcp_addr().unwrap(), turn.tls_addr().unwrap());

    // Three silent streams from one address (one of them TLS, no handshake) are held
    // until the set-up time runs out; a fourth is refused at once.
    let mut silent = vec![
        connect_from("127.0.0.5", tcp).await,
        connect_from("127.0.0.5", tcp).await,
        connect_from("127.0.0.5", tls).await,
    ];
    streams_become(&s, 3).await;
    let mut fourth = connect_from("127.0.0.5", tcp).await;
    assert!(closed_within(&mut fourth, Duration::from_millis(300)).await);
    // Another address is not affected.
    let mut other = connect_from("127.0.0.6", tcp).await;
    other.write_all(&unauthenticated_allocate()).await.unwrap();
    assert!(read_message(&mut other, WAIT).await.is_some());
    for stream in &mut silent {
        assert!(closed_within(stream, Duration::from_secs(2)).await);
    }
    drop(other);
    streams_become(&s, 0).await;

    // Half a message, then nothing: closed by the set-up deadline.
    let mut slow = connect_from("127.0.0.5", tcp).await;
    slow.write_all(&unauthenticated_allocate()[..10])
        .await
        .unwrap();
    assert!(closed_within(&mut slow, Duration::from_secs(2)).await);
    // Not TURN at all, and a message over the limit: closed at once.
    let mut http = connect_from("127.0.0.5", tcp).await;
    http.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(closed_within(&mut http, Duration::from_millis(300)).await);
    streams_become(&s, 0).await;
    // A message over the limit (ChannelData of 4 KiB): as the first message, closed at
    // once; after a request, skipped without being buffered, and the stream stays in
    // step: the request after it is answered.
    let mut oversized = vec![0x40, 0x00, 0x10, 0x00];
    oversized.resize(4 + 4096, 7);
    let mut big = connect_from("127.0.0.5", tcp).await;
    big.write_all(&oversized).await.unwrap();
    assert!(closed_within(&mut big, Duration::from_millis(300)).await);
    let mut big = connect_from("127.0.0.5", tcp).await;
    big.write_all(&unauthenticated_allocate()).await.unwrap();
    assert!(read_message(&mut big, WAIT).await.is_some());
    big.write_all(&oversized).await.unwrap();
    big.write_all(&unauthenticated_allocate()).await.unwrap();
    let answer = read_message(&mut big, WAIT)
        .await
        .expect("answered after the skip");
    assert_eq!(answer.typ.class, CLASS_ERROR_RESPONSE, "{answer}");
    drop(big);
    streams_become(&s, 0).await;
    s.stop().await;
}

async fn allocations_become(s: &Server, n: usize) {
    let turn = s.turn_server().unwrap();
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

/// An allocation over a stream of its own (a hand-made client: 401, then the signed
/// Allocate).
async fn allocate_over_tcp(to: SocketAddr, user: &str, pass: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(to).await.unwrap();
    tcp.write_all(&unauthenticated_allocate()).await.unwrap();
    let challenge = read_message(&mut tcp, WAIT).await.unwrap();
    let realm = Realm::get_from_as(&challenge, ATTR_REALM).unwrap();
    let nonce = Nonce::get_from_as(&challenge, ATTR_NONCE).unwrap();
    let key =
        MessageIntegrity::new_long_term_integrity(user.into(), realm.text.clone(), pass.into());
    let setters: Vec<Box<dyn Setter>> = vec![
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
        Box::new(RequestedTransport {
            protocol: PROTO_UDP,
        }),
        Box::new(Username::new(ATTR_USERNAME, user.into())),
        Box::new(realm),
        Box::new(nonce),
        Box::new(key),
        Box::new(FINGERPRINT),
    ];
    let mut m = Message::new();
    m.build(&setters).unwrap();
    tcp.write_all(&m.raw).await.unwrap();
    let answer = read_message(&mut tcp, WAIT).await.unwrap();
    assert_eq!(answer.typ.class, CLASS_SUCCESS_RESPONSE, "{answer}");
    tcp
}

#[tokio::test]
async fn an_allocation_ends_with_its_stream() {
    let dir = tempfile::tempdir().unwrap();
    let s = turn_server(dir.path(), |_| {}).await;
    let tcp = s.turn_server().unwrap().tcp_addr().unwrap();
    let (user, pass) = minted("closer");
    let first = allocate_over_tcp(tcp, &user, &pass).await;
    let second = allocate_over_tcp(tcp, &user, &pass).await;
    allocations_become(&s, 2).await;
    // RFC 6062: the allocation lives as long as its connection, not its lifetime (10 min).
    drop(first);
    allocations_become(&s, 1).await;
    drop(second);
    allocations_become(&s, 0).await;
    streams_become(&s, 0).await;
    s.stop().await;
}
