//! Transport and bad input: error codes, the size limit, flooding, dead connections,
//! TURN credentials, HTTP endpoints, connection caps (in all and per client address,
//! behind a trusted proxy too), allowed origins, and shutdown.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::{Client, Closed, RawClient, frame_header, http, mask, pair, server, start_server};
use hmac::{KeyInit as _, Mac as _};
use serde_json::json;
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn every_bad_input_gets_its_error_code_and_the_connection_stays_open() {
    let s = server().await;
    let mut c = Client::connect(&s).await;
    for (text, code) in [
        ("not json at all", "bad_json"),
        ("[1,2,3]", "bad_json"),
        ("42", "bad_json"),
        ("\"join\"", "bad_json"),
        ("{\"type\":\"join\",", "bad_json"),
        ("{}", "bad_field"),
        ("{\"type\":null}", "bad_field"),
        ("{\"type\":\"teleport\"}", "unknown_type"),
        ("{\"type\":\"offer\"}", "bad_field"),
        ("{\"type\":\"offer\",\"sdp\":7}", "bad_field"),
        ("{\"type\":\"candidate\"}", "bad_field"),
        (
            "{\"type\":\"candidate\",\"candidate\":{\"sdp_mid\":\"0\"}}",
            "bad_field",
        ),
        ("{\"type\":\"register\",\"name\":[\"x\"]}", "bad_field"),
    ] {
        c.send_text(text).await;
        let e = c.expect_error(code).await;
        assert!(e["message"].is_string(), "{text} -> {e}");
    }
    c.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    c.expect_error("bad_json").await;
    // Still connected and working.
    assert_eq!(c.join("still-here").await["members"], 1);
    s.stop().await;
}

#[tokio::test]
async fn invalid_utf8_is_bad_json() {
    let s = server().await;
    let mut raw = RawClient::connect(&s).await;
    raw.send_frame(true, 1, &[0x7b, 0xff, 0xfe, 0x7d]).await;
    let e = raw.recv_json().await;
    assert_eq!(e["code"], "bad_json");
    raw.send_json(json!({"type":"join","room":"utf"})).await;
    assert_eq!(raw.recv_json().await["type"], "joined");
    s.stop().await;
}

#[tokio::test]
async fn one_mebibyte_frame_is_refused_before_it_is_even_sent_whole() {
    let s = server().await;
    let (mut a, mut b, _, _) = pair(&s, "big").await;
    let mut raw = RawClient::connect(&s).await;
    let total = 1 << 20;
    let body = vec![b'x'; total];
    // Send only the header and the first 1000 bytes: the error must already come,
    // which shows the server did not wait to buffer the megabyte.
    raw.tcp
        .write_all(&frame_header(true, 1, total as u64))
        .await
        .unwrap();
    raw.tcp.write_all(&mask(&body[..1000], 0)).await.unwrap();
    let e = raw.recv_json().await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "too_large");
    // The rest streams through and is dropped; the connection stays usable.
    for (i, chunk) in body[1000..].chunks(64 * 1024).enumerate() {
        raw.tcp
            .write_all(&mask(chunk, 1000 + i * 64 * 1024))
            .await
            .unwrap();
    }
    raw.send_json(json!({"type":"join","room":"after-big"}))
        .await;
    assert_eq!(raw.recv_json().await["type"], "joined");

    // Through a normal WebSocket library too, and relaying is unaffected.
    a.send_text(&"y".repeat(total)).await;
    a.expect_error("too_large").await;
    a.send(json!({"type":"offer","sdp":"after"})).await;
    assert_eq!(b.expect("offer").await["sdp"], "after");
    s.stop().await;
}

#[tokio::test]
async fn message_at_the_limit_passes_and_fragments_count_together() {
    let s = server().await;
    let (mut a, mut b, _, _) = pair(&s, "edge").await;
    // A 65,536-byte offer message is accepted and relayed.
    let overhead = json!({"type":"offer","sdp":""}).to_string().len();
    let sdp = "s".repeat(65_536 - overhead);
    let text = json!({"type":"offer","sdp":sdp}).to_string();
    assert_eq!(text.len(), 65_536);
    a.send_text(&text).await;
    assert_eq!(
        b.expect("offer").await["sdp"].as_str().unwrap().len(),
        sdp.len()
    );
    a.send_text(&format!("{text} ")).await;
    a.expect_error("too_large").await;

    // Three 30 KB fragments make one 90 KB message: too large, then the next is fine.
    let mut raw = RawClient::connect(&s).await;
    let part = vec![b' '; 30_000];
    raw.send_frame(false, 1, &part).await;
    raw.send_frame(false, 0, &part).await;
    raw.send_frame(true, 0, &part).await;
    assert_eq!(raw.recv_json().await["code"], "too_large");
    raw.send_frame(false, 1, br#"{"type":"join","#).await;
    raw.send_frame(true, 0, br#""room":"frag"}"#).await;
    assert_eq!(raw.recv_json().await["type"], "joined");
    s.stop().await;
}

#[tokio::test]
async fn a_ping_flood_is_limited_like_messages() {
    let s = server().await;
    let mut flood = RawClient::connect(&s).await;
    let mut burst = Vec::new();
    for i in 0..400u32 {
        let payload = i.to_be_bytes();
        burst.extend(frame_header(true, 9, payload.len() as u64));
        burst.extend(mask(&payload, 0));
    }
    let _ = flood.tcp.write_all(&burst).await; // may be cut off by the close
    let (mut pongs, mut rate_limited) = (0, 0);
    let code = loop {
        let f = flood.frame().await;
        match f.opcode {
            10 => pongs += 1,
            1 if f.json()["code"] == "rate_limited" => rate_limited += 1,
            8 => break f.close_code(),
            _ => {}
        }
    };
    assert!((200..=202).contains(&pongs), "{pongs} pongs");
    assert_eq!(rate_limited, 1);
    assert_eq!(code, Some(1008));
    let _still = Client::connect(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn a_flooding_client_is_limited_then_closed_while_others_carry_on() {
    let s = server().await;
    let (mut a, mut b, _, _) = pair(&s, "calm").await;
    let mut flood = RawClient::connect(&s).await;
    // 400 messages in one burst: 200 pass the bucket, the rest are dropped, and the
    // 51st drop in a row closes the connection.
    let mut burst = Vec::new();
    let msg = br#"{"type":"leave"}"#;
    for _ in 0..400 {
        burst.extend(frame_header(true, 1, msg.len() as u64));
        burst.extend(mask(msg, 0));
    }
    let _ = flood.tcp.write_all(&burst).await; // may be cut off by the close
    let flooding = tokio::spawn(async move {
        let (mut not_in_call, mut rate_limited) = (0, 0);
        loop {
            let f = flood.frame().await;
            match f.opcode {
                1 => match f.json()["code"].as_str().unwrap() {
                    "not_in_call" => not_in_call += 1,
                    "rate_limited" => rate_limited += 1,
                    other => panic!("unexpected {other}"),
                },
                8 => return (not_in_call, rate_limited, f.close_code()),
                _ => {}
            }
        }
    });
    // Meanwhile the calm pair relays normally.
    let started = Instant::now();
    for i in 0..50 {
        a.send(json!({"type":"candidate","candidate":{"candidate":format!("c{i}")}}))
            .await;
        assert_eq!(
            b.expect("candidate").await["candidate"]["candidate"],
            format!("c{i}")
        );
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    let (not_in_call, rate_limited, code) = flooding.await.unwrap();
    assert!(
        (200..=202).contains(&not_in_call),
        "{not_in_call} processed"
    );
    assert_eq!(rate_limited, 1, "at most one rate_limited per second");
    assert_eq!(code, Some(1008));
    s.stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_dropped_and_counts_as_disconnected() {
    let s = start_server(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.ping_timeout = Duration::from_millis(400);
        c.resume_grace = Duration::from_millis(300);
    })
    .await;
    let mut a = Client::connect(&s).await; // answers pings (tungstenite does it while reading)
    let mut dead = RawClient::connect(&s).await; // never answers
    a.join("ping").await;
    dead.send_json(json!({"type":"join","room":"ping"})).await;
    let joined = dead.recv_json().await;
    a.expect("peer_joined").await;
    let started = Instant::now();
    // The seat is kept for the resume grace, then the member is gone for good.
    let away = a.expect("peer_reconnecting").await;
    assert_eq!(away["peer_id"], joined["peer_id"]);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    let left = a.expect("peer_left").await;
    assert_eq!(left["peer_id"], joined["peer_id"]);
    assert_eq!(left["reason"], "disconnected");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(600), "{waited:?}");
    // The live client is still connected after several ping intervals.
    a.expect_silence(Duration::from_millis(600)).await;
    a.send(json!({"type":"offer","sdp":"x"})).await;
    a.expect_error("not_in_call").await;
    s.stop().await;
}

#[tokio::test]
async fn protocol_violation_closes_with_1002() {
    let s = server().await;
    let mut a = Client::connect(&s).await;
    let mut raw = RawClient::connect(&s).await;
    a.join("v").await;
    raw.send_json(json!({"type":"join","room":"v"})).await;
    raw.recv_json().await;
    a.expect("peer_joined").await;
    raw.tcp.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap(); // unmasked
    let f = raw.frame().await;
    assert_eq!(f.close_code(), Some(1002));
    // A connection closed for a violation ended without `leave`: its seat is kept.
    a.expect("peer_reconnecting").await;
    s.stop().await;
}

#[tokio::test]
async fn welcome_mints_turn_credentials_that_verify() {
    let secret = "correct horse battery staple";
    let s = start_server(|c| {
        c.ice_servers = vec![
            "stun:127.0.0.1:3478".into(),
            "turn:127.0.0.1:3478?transport=udp".into(),
        ];
        c.turn_secret = Some(secret.into());
        c.turn_credential_lifetime = Duration::from_secs(3600);
    })
    .await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut usernames = Vec::new();
    for _ in 0..2 {
        let c = Client::connect(&s).await;
        let servers = c.welcome["ice_servers"].as_array().unwrap().clone();
        assert_eq!(servers[0], json!({"urls":["stun:127.0.0.1:3478"]}));
        assert_eq!(
            servers[1]["urls"],
            json!(["turn:127.0.0.1:3478?transport=udp"])
        );
        let username = servers[1]["username"].as_str().unwrap().to_owned();
        let credential = servers[1]["credential"].as_str().unwrap();
        let (expiry, id) = username.split_once(':').unwrap();
        let expiry: u64 = expiry.parse().unwrap();
        assert!(
            (now + 3595..=now + 3605).contains(&expiry),
            "{expiry} vs {now}"
        );
        assert!(!id.is_empty());
        // Recompute as coturn does: base64(HMAC-SHA1(secret, username)).
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(username.as_bytes());
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(credential, expected);
        usernames.push(username);
    }
    assert_ne!(usernames[0], usernames[1], "credentials are per connection");
    let (status, body) = http(&s, "GET", "/api/ice-servers").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ice_servers"].as_array().unwrap().len(), 2);
    assert!(v["ice_servers"][1]["credential"].is_string());
    s.stop().await;
}

#[tokio::test]
async fn http_endpoints() {
    let s = server().await;
    assert_eq!(http(&s, "GET", "/healthz").await, (200, "ok".to_owned()));
    let (status, body) = http(&s, "GET", "/api/ice-servers").await;
    assert_eq!(status, 200);
    assert_eq!(body.trim_end(), r#"{"ice_servers":[]}"#);
    assert_eq!(http(&s, "GET", "/ws").await.0, 400, "plain GET on /ws");
    assert_eq!(http(&s, "GET", "/nowhere").await.0, 404);
    s.stop().await;
}

#[tokio::test]
async fn connection_cap_refuses_with_503() {
    let s = start_server(|c| c.max_connections = 2).await;
    let _a = Client::connect(&s).await;
    let b = Client::connect(&s).await;
    let err = tokio_tungstenite::connect_async(s.ws_url())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    b.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _c = Client::connect(&s).await; // a slot was freed
    s.stop().await;
}

/// Opens a WebSocket with extra request headers; Ok(HTTP status of the answer: 101 when
/// it opened), the stream kept alive in `keep`.
async fn open_with(
    s: &signaling_server::Server,
    headers: &[(&str, &str)],
    keep: &mut Vec<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    >,
) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut request = s.ws_url().into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, response)) => {
            keep.push(ws);
            response.status().as_u16()
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn one_address_holds_at_most_its_share_of_websockets() {
    let s = start_server(|c| c.max_connections_per_ip = 2).await;
    let mut keep = Vec::new();
    assert_eq!(open_with(&s, &[], &mut keep).await, 101);
    assert_eq!(open_with(&s, &[], &mut keep).await, 101);
    assert_eq!(
        open_with(&s, &[], &mut keep).await,
        429,
        "a third from 127.0.0.1"
    );
    // X-Forwarded-For from an untrusted peer changes nothing.
    assert_eq!(
        open_with(&s, &[("x-forwarded-for", "198.51.100.1")], &mut keep).await,
        429
    );
    // Others are still served, and a closed one frees its slot.
    keep.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(open_with(&s, &[], &mut keep).await, 101);
    s.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_limit_counts_the_forwarded_client() {
    let s = start_server(|c| {
        c.max_connections_per_ip = 1;
        c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    let mut keep = Vec::new();
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    assert_eq!(open_with(&s, &from("198.51.100.1"), &mut keep).await, 101);
    assert_eq!(open_with(&s, &from("198.51.100.2"), &mut keep).await, 101);
    assert_eq!(open_with(&s, &from("198.51.100.1"), &mut keep).await, 429);
    // A client cannot pose as another by writing the header itself: the proxy appends.
    assert_eq!(
        open_with(&s, &from("198.51.100.9, 198.51.100.1"), &mut keep).await,
        429
    );
    s.stop().await;
}

#[tokio::test]
async fn only_allowed_origins_open_a_websocket() {
    let s = start_server(|c| c.allowed_origins = vec!["https://app.example.org".into()]).await;
    let mut keep = Vec::new();
    assert_eq!(
        open_with(&s, &[("origin", "https://evil.example")], &mut keep).await,
        403
    );
    assert_eq!(
        open_with(&s, &[("origin", "https://app.example.org")], &mut keep).await,
        101
    );
    assert_eq!(
        open_with(&s, &[], &mut keep).await,
        101,
        "the app sends no Origin"
    );
    // The server's own pages (the browser client it serves).
    let own = format!("http://{}", s.local_addr());
    assert_eq!(
        open_with(&s, &[("origin", own.as_str())], &mut keep).await,
        101
    );
    s.stop().await;

    // Without the flag any origin may connect.
    let s = server().await;
    assert_eq!(
        open_with(&s, &[("origin", "https://evil.example")], &mut keep).await,
        101
    );
    s.stop().await;
}

#[tokio::test]
async fn the_closing_handshake_echoes_the_code_and_refuses_bad_ones() {
    let s = server().await;
    let close_with = |code: u16, reason: &[u8]| {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        payload
    };
    for (payload, answer) in [
        (close_with(4000, b"done"), 4000),
        (close_with(1001, b""), 1001),
        (Vec::new(), 1000),
        (close_with(1005, b""), 1002),
        (close_with(999, b""), 1002),
        (close_with(1000, &[0xff, 0xfe]), 1007),
    ] {
        let mut raw = RawClient::connect(&s).await;
        raw.send_frame(true, 8, &payload).await;
        let frame = raw.frame().await;
        assert_eq!(frame.close_code(), Some(answer), "{payload:?}");
    }
    let _still = Client::connect(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn stop_closes_every_connection_with_1001_and_frees_the_port() {
    let s = server().await;
    let addr = s.local_addr();
    let (mut a, mut b, _, _) = pair(&s, "shutdown").await;
    let stopping = tokio::spawn(s.stop());
    assert_eq!(a.closed().await, Closed::Code(1001));
    assert_eq!(b.closed().await, Closed::Code(1001));
    tokio::time::timeout(Duration::from_secs(3), stopping)
        .await
        .expect("stop() finished")
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
