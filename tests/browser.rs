//! The web client in a real browser: Debian's `chromium` (headless, fake camera and
//! microphone) driven by `playwright-core` (tests/browser/duet.mjs), against a real
//! signaling server started here and, for the interop cases, a real native peer
//! (`duet call --headless`). Nothing is mocked: the page is the one the server serves,
//! media goes over real peer connections on loopback.
//!
//! Each test runs one scenario of the script and asserts on the JSON it prints (and on
//! the native client's JSON report). One checks Chromium's own TURN client against the
//! embedded TURN server over UDP, TCP and TLS. Without node or chromium the tests skip with a
//! reason, unless `DUET_REQUIRE_BROWSER_TEST=1` (set by `make test`), where that fails.
//! `npm ci` installs the pinned playwright-core when tests/browser/node_modules is
//! missing. Screenshots go to `target/browser-test/` (CI keeps them as artifacts).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "common/web.rs"]
mod web;
use web::{
    MIN_DECODED, artifacts, assert_decoded, forward_stderr, install_node_packages, native,
    native_best_fps, nothing_missing, num, wait_members, wait_native, works,
};

/// One browser scenario at a time: they share two cores with everything else. (An async
/// mutex: each test holds it across its awaits, on its own runtime.)
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The native client's test pattern rate.
const NATIVE_FPS: f64 = 30.0;

/// Whether the browser tests can run here; panics instead of skipping when required.
fn ready() -> bool {
    let chromium = std::env::var("DUET_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let missing: Vec<&str> = [
        (!works("node", "--version")).then_some("node"),
        (!works("npm", "--version")).then_some("npm"),
        (!Path::new(&chromium).exists()).then_some("chromium (apt-get install chromium)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !nothing_missing("the browser tests", &missing) {
        return false;
    }
    install_node_packages(&["playwright-core"]);
    true
}

/// Runs one scenario of duet.mjs and returns its JSON (asserting it succeeded).
fn scenario(name: &str, args: Value) -> Value {
    web::scenario("duet.mjs", name, args)
}

/// The native side decoded what the browser sent: over its best stretch of at least 8 s
/// (its timeline samples the running count about once a second; the frames before its
/// first keyframe are dropped by design), at least 90 % of the browser's frame rate.
/// And it decoded audio.
fn assert_native_decoded(web: &Value, report: &Value) {
    let window = &web["window"];
    let browser_fps = num(&window["frames_sent"]) / num(&window["seconds"]);
    let best_fps = native_best_fps(report);
    println!("native decoded {best_fps:.1} fps over 8 s; the browser sent {browser_fps:.1} fps");
    assert!(
        best_fps >= MIN_DECODED * browser_fps,
        "native decoded {best_fps:.1} fps over 8 s; the browser sent {browser_fps:.1} fps"
    );
    assert!(num(&report["audio_frames_decoded"]) > 100.0);
}

/// What both sides of a browser <-> native call must show.
fn assert_native_call(web: &Value, report: &Value, web_hung_up: bool) {
    let window = &web["window"];
    let seconds = num(&window["seconds"]);
    // Browser side: the native pattern at 30 fps, decoded over the window.
    let decoded = num(&window["frames_decoded"]);
    assert!(
        decoded >= MIN_DECODED * NATIVE_FPS * seconds,
        "the browser decoded {decoded} frames in {seconds} s"
    );
    let codec = web["codec_in"].as_str().unwrap();
    assert!(codec.starts_with("video/H264"), "{codec}");
    let out_codec = web["codec_out"].as_str().unwrap();
    assert!(out_codec.contains("profile-level-id=42e01f"), "{out_codec}");
    // The browser heard the native 500 Hz tone.
    assert!(
        (num(&window["audio_hz"]) - 500.0).abs() <= 15.0,
        "{}",
        window["audio_hz"]
    );
    // ... continuously: little of what played was concealment of lost packets.
    let samples = num(&window["audio_samples"]);
    assert!(
        samples > 0.0 && num(&window["audio_concealed"]) <= 0.1 * samples,
        "{window}"
    );
    assert_native_decoded(web, report);
    // Chat both ways.
    assert_eq!(report["chat_received"][0], "hello from the browser");
    // Hang-up seen by the other side.
    let ended = web["ended"].as_str().unwrap();
    if web_hung_up {
        assert!(ended.contains("You hung up"), "{ended}");
        assert_eq!(report["end_reason"], "peer left");
    } else {
        assert!(ended.contains("Native hung up"), "{ended}");
        assert_eq!(report["end_reason"], "you hung up");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_offers_to_the_native_client() {
    let _serial = SERIAL.lock().await;
    if !ready() {
        return;
    }
    let server = signaling_server::Server::start(signaling_server::Config::ephemeral())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("native.json");
    let room = "web-offers";
    let args = json!({
        "base": server.http_url(), "room": room, "chat_out": "hello from the browser",
        "chat_in": "hello from native", "hang_up": "native",
        "screenshot": artifacts().join("call-with-native.png"),
    });
    // The browser joins first, so it offers; the native client answers and hangs up
    // after its --duration.
    let web = tokio::task::spawn_blocking(move || scenario("native", args));
    wait_members(&server, room, 1).await;
    let mut child = native(
        &server,
        &report,
        &[
            "--room",
            room,
            "--name",
            "Native",
            "--duration",
            "25s",
            "--chat",
            "hello from native",
        ],
    );
    let _lines = forward_stderr(&mut child, "native");
    let web = web.await.unwrap();
    let report = tokio::task::spawn_blocking(move || wait_native(child, &report))
        .await
        .unwrap();
    assert_native_call(&web, &report, false);
    server.stop().await;
}

/// The native client joins `room` first, so it offers (with `extra` arguments); the
/// browser answers, chats and hangs up. Returns the page's JSON and the native report.
async fn native_offers_to_the_browser(room: &str, extra: &[&str]) -> (Value, Value) {
    let server = signaling_server::Server::start(signaling_server::Config::ephemeral())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("native.json");
    let mut args = vec![
        "--room",
        room,
        "--name",
        "Native",
        "--duration",
        "120s",
        "--chat",
        "hello from native",
    ];
    args.extend_from_slice(extra);
    let mut child = native(&server, &report, &args);
    let _lines = forward_stderr(&mut child, "native");
    wait_members(&server, room, 1).await;
    let args = json!({
        "base": server.http_url(), "room": room, "chat_out": "hello from the browser",
        "chat_in": "hello from native", "hang_up": "browser", "window_ms": 10_000,
    });
    let web = tokio::task::spawn_blocking(move || scenario("native", args))
        .await
        .unwrap();
    let report = tokio::task::spawn_blocking(move || wait_native(child, &report))
        .await
        .unwrap();
    server.stop().await;
    (web, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_client_offers_to_the_browser() {
    let _serial = SERIAL.lock().await;
    if !ready() {
        return;
    }
    let (web, report) = native_offers_to_the_browser("native-offers", &[]).await;
    assert_native_call(&web, &report, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dtls_handshake_with_the_browser_is_retried_on_a_fresh_connection() {
    let _serial = SERIAL.lock().await;
    if !ready() {
        return;
    }
    // The native client offers a wrong certificate fingerprint (as if changed in transit):
    // Chromium's handshake fails, its page starts a fresh connection and offers it, and
    // the native client answers that on a fresh connection of its own.
    let (web, report) =
        native_offers_to_the_browser("native-fresh", &["--corrupt-first-fingerprint"]).await;
    println!(
        "fresh connections {}, connected after {} ms",
        report["fresh_connections"], report["time_to_connected_ms"]
    );
    let fresh = report["fresh_connections"].as_u64().unwrap_or(0);
    assert!((1..=2).contains(&fresh), "fresh connections: {fresh}");
    assert_native_call(&web, &report, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_rings_the_native_client_by_name() {
    let _serial = SERIAL.lock().await;
    if !ready() {
        return;
    }
    let server = signaling_server::Server::start(signaling_server::Config::ephemeral())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("native.json");
    let mut child = native(
        &server,
        &report,
        &[
            "--answer-as",
            "nat",
            "--duration",
            "120s",
            "--chat",
            "hello from native",
        ],
    );
    let lines = forward_stderr(&mut child, "native");
    // Ring only once the name is held.
    tokio::task::spawn_blocking(move || {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let line = lines
                .recv_timeout(end.saturating_duration_since(Instant::now()))
                .expect("the native client never signed in");
            if line.contains("signed in as nat") {
                break;
            }
        }
    })
    .await
    .unwrap();
    let args = json!({
        "base": server.http_url(), "caller": "webby", "callee": "nat",
        "chat_out": "hello from the browser", "chat_in": "hello from native", "window_ms": 10_000,
    });
    let web = tokio::task::spawn_blocking(move || scenario("native-direct", args))
        .await
        .unwrap();
    let report = tokio::task::spawn_blocking(move || wait_native(child, &report))
        .await
        .unwrap();
    let window = &web["window"];
    let decoded = num(&window["frames_decoded"]);
    assert!(decoded >= MIN_DECODED * NATIVE_FPS * num(&window["seconds"]));
    assert_native_decoded(&web, &report);
    assert_eq!(report["chat_received"][0], "hello from the browser");
    assert_eq!(report["end_reason"], "peer left");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_call_and_a_third_finds_the_room_full() {
    let _serial = SERIAL.lock().await;
    if !ready() {
        return;
    }
    let server = signaling_server::Server::start(signaling_server::Config::ephemeral())
        .await
        .unwrap();
    let args = json!({
        "base": server.http_url(), "room": "two-browsers",
        "screenshot": artifacts().join("call.png"),
        "screenshot_phone": artifacts().join("call-phone.png"),
    });
    let r = tokio::task::spawn_blocking(move || scenario("pair", args))
        .await
        .unwrap();
    assert!(r["waiting"].as_str().unwrap().contains("Waiting"));
    assert_decoded(&r["bob"], &r["ann"], "bob");
    assert_decoded(&r["ann"], &r["bob"], "ann");
    assert!(
        r["codec_ann_in"]
            .as_str()
            .unwrap()
            .starts_with("video/H264")
    );
    assert!(
        r["room_full"]
            .as_str()
            .unwrap()
            .contains("already has two people"),
        "{}",
        r["room_full"]
    );
    // Bob's WebSocket dropped mid-call; he resumed his seat (Ann was told), and his
    // hang-up went over the new connection: Ann reads "hung up", not "dropped".
    assert!(
        r["ann_notice"]
            .as_str()
            .unwrap()
            .contains("Bob lost the connection")
    );
    assert_eq!(r["bob_after_resume"], "Connected to Ann");
    assert!(r["ended_ann"].as_str().unwrap().contains("Bob hung up"));
    assert!(r["ended_bob"].as_str().unwrap().contains("You hung up"));
    assert!(artifacts().join("call.png").exists());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_ends_a_meeting_and_an_early_guest_reads_the_start_time() {
    let _serial = SERIAL.lock().await;
    if !ready() {
        return;
    }
    let server = signaling_server::Server::start(signaling_server::Config::ephemeral())
        .await
        .unwrap();
    let args = json!({ "base": server.http_url() });
    let r = tokio::task::spawn_blocking(move || scenario("meeting", args))
        .await
        .unwrap();
    assert_eq!(r["title"], "Browser test meeting");
    let flags = &r["host_flags"];
    assert_eq!(flags["host"], true);
    assert_eq!(flags["guest"], false);
    assert_eq!(flags["end_button_host"], true);
    assert_eq!(flags["end_button_guest"], false);
    assert!(
        r["ended_host"]
            .as_str()
            .unwrap()
            .contains("You ended the meeting")
    );
    assert!(
        r["ended_guest"]
            .as_str()
            .unwrap()
            .contains("The host ended the meeting")
    );
    assert_eq!(r["state_after"], "ended");
    let early = r["not_started"].as_str().unwrap();
    assert!(early.contains("has not started yet"), "{early}");
    // The start time reads in the browser's local time.
    assert!(
        early.contains(r["local_start"].as_str().unwrap()),
        "{early}"
    );
    assert!(r["lobby_info"].as_str().unwrap().contains("opens at"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_call_between_two_browsers_rings_declines_and_accepts() {
    let _serial = SERIAL.lock().await;
    if !ready() {
        return;
    }
    let server = signaling_server::Server::start(signaling_server::Config::ephemeral())
        .await
        .unwrap();
    let args = json!({ "base": server.http_url(), "caller": "ann", "callee": "bob" });
    let r = tokio::task::spawn_blocking(move || scenario("direct-pair", args))
        .await
        .unwrap();
    assert_eq!(r["ringing"], true);
    assert_eq!(r["incoming_text"], "ann is calling you.");
    assert!(r["caller_line"].as_str().unwrap().contains("Ringing bob"));
    assert!(
        r["declined"]
            .as_str()
            .unwrap()
            .contains("bob declined the call")
    );
    assert_eq!(r["ring_stopped"], true);
    assert_decoded(&r["callee"], &r["caller"], "callee");
    assert_decoded(&r["caller"], &r["callee"], "caller");
    assert!(r["ended_callee"].as_str().unwrap().contains("ann hung up"));
    server.stop().await;
}

/// The page the server serves is the one the tests drive: its headers, checked here
/// without a browser so this runs everywhere.
#[tokio::test]
async fn the_join_link_serves_the_web_client_with_a_strict_policy() {
    let server = signaling_server::Server::start(signaling_server::Config::ephemeral())
        .await
        .unwrap();
    let get = |path: &str, accept: &str| {
        let url = format!("{}{path}", server.http_url());
        let accept = accept.to_owned();
        async move {
            tokio::task::spawn_blocking(move || http_get(&url, &accept))
                .await
                .unwrap()
        }
    };
    let (head, body) = get("/r/kxp-47qm-zt9-4fh", "text/html").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let h = head.to_ascii_lowercase();
    assert!(h.contains("content-type: text/html; charset=utf-8"));
    assert!(h.contains("content-security-policy: default-src 'self'; script-src 'self';"));
    assert!(h.contains("cache-control: no-cache"));
    assert!(body.contains("/app/main.js"));
    let (head, _) = get("/app/main.js", "*/*").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/javascript")
    );
    let (head, _) = get("/app/ring.wav", "*/*").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: audio/wav")
    );
    // Scripts asking for a join link still get a line of text.
    let (head, body) = get("/r/some-room", "*/*").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(body.contains("no such room"));
    server.stop().await;
}

/// A plain HTTP/1.1 GET (the tests need no HTTP client crate for this).
fn http_get(url: &str, accept: &str) -> (String, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut tcp = std::net::TcpStream::connect(host).unwrap();
    write!(
        tcp,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).unwrap();
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

/// Chromium's own TURN client, which speaks `turn:...?transport=tcp` and `turns:`
/// natively, through the embedded server's UDP listener and its TCP and TLS fronts: two
/// relay-only peer connections in one page exchange a message, and the selected pair's
/// relay protocol is the transport asked for. (The TLS certificate is self-signed, so
/// Chromium is told to accept it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_relays_through_the_embedded_turn_server_over_udp_tcp_and_tls() {
    if !ready() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let secret = "browser-turn-secret";
    let mut config = signaling_server::Config::ephemeral();
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.turn_secret = Some(secret.into());
    config.tls_cert = Some(cert_path);
    config.tls_key = Some(key_path);
    config.turn_server.listen = Some(loopback);
    config.turn_server.listen_tcp = Some(loopback);
    config.turn_server.listen_tls = Some(loopback);
    // The two peer connections' relays are each other's peers (always allowed); their
    // host candidates on loopback are not needed.
    let server = signaling_server::Server::start(config).await.unwrap();
    let turn = server.turn_server().unwrap();
    let user = signaling_server::turn::username(
        "chromium",
        std::time::SystemTime::now(),
        Duration::from_secs(3600),
    );
    let credential = signaling_server::turn::credential(secret.as_bytes(), &user);
    for (url, protocol) in [
        (
            format!("turn:127.0.0.1:{}?transport=udp", turn.local_addr().port()),
            "udp",
        ),
        (
            format!(
                "turn:127.0.0.1:{}?transport=tcp",
                turn.tcp_addr().unwrap().port()
            ),
            "tcp",
        ),
        (
            format!(
                "turns:127.0.0.1:{}?transport=tcp",
                turn.tls_addr().unwrap().port()
            ),
            "tls",
        ),
    ] {
        let args = json!({
            "turn": {"url": url, "username": user, "credential": credential},
            "chromium_flags": ["--ignore-certificate-errors"],
        });
        let result = tokio::task::spawn_blocking(move || scenario("turn-relay", args))
            .await
            .unwrap();
        assert_eq!(result["message"], "through the relay", "{result}");
        assert_eq!(result["candidate_type"], "relay", "{result}");
        assert_eq!(result["relay_protocol"], protocol, "{result}");
    }
    // Every allocation ends with its peer connection (over TCP/TLS: with its stream).
    let deadline = Instant::now() + Duration::from_secs(10);
    while turn.allocations() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} allocations left",
            turn.allocations()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}
