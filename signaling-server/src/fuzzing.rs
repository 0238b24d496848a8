//! Entry points for the fuzzer (`signaling-server/fuzz`, `cargo fuzz`): each takes
//! arbitrary bytes, must not panic, and asserts what must hold whatever the input. They
//! are also run on a few seeds by the unit tests below, so they stay compiled and true.
//! Not part of the server's API.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use stun::attributes::{ATTR_REALM, ATTR_USERNAME, AttrType};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_INDICATION, CLASS_REQUEST, METHOD_ALLOCATE, METHOD_CHANNEL_BIND,
    METHOD_CREATE_PERMISSION, METHOD_REFRESH, METHOD_SEND, Message, MessageType, Setter as _,
};

use crate::protocol::{ClientMessage, ServerMessage};
use crate::turn::server::auth::RestAuth;
use crate::turn::server::gate::{Gate, Verdict};
use crate::turn::server::peers::PeerPolicy;
use crate::turn::server::relay::Registry;
use crate::ws::framing::{Decoder, Event};

/// The WebSocket decoder, fed the input in chunks (the first byte is the chunk size):
/// events come out or a violation ends it; a text message is never over the limit, and
/// the decoder never makes its caller hold more than a partial frame header.
pub fn websocket_decoder(data: &[u8]) {
    const LIMIT: usize = 1024;
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let mut decoder = Decoder::new(LIMIT);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(usize::from(chunk).max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Event::Text(text))) => assert!(text.len() <= LIMIT),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return, // the connection is closed with 1002
            }
        }
        // The longest frame header is 14 bytes; payload bytes are consumed as they come.
        assert!(buf.len() < 14, "{} bytes left unconsumed", buf.len());
    }
}

/// The protocol's JSON: a message that parses serializes to one that parses the same.
pub fn protocol_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(message) = ClientMessage::parse(text) {
        let json = message.to_json();
        let again = ClientMessage::parse(&json)
            .unwrap_or_else(|e| panic!("{json} does not parse again: {}", e.message));
        assert_eq!(again.to_json(), json);
    }
    // What the client parses.
    if let Ok(message) = text.parse::<ServerMessage>() {
        let json = message.to_json();
        assert!(json.parse::<ServerMessage>().is_ok(), "{json}");
    }
}

/// The HTTP API's create-room body, checked as `POST /api/rooms` does.
pub fn create_room_body(data: &[u8]) {
    let _ = crate::http::api::check_create_body(data);
}

const FUZZ_SECRET: &[u8] = b"fuzzing secret";
const FUZZ_REALM: &str = "duet";

fn gate() -> &'static Gate {
    static GATE: OnceLock<(tokio::runtime::Runtime, Gate)> = OnceLock::new();
    let (_, gate) = GATE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("a tokio runtime");
        let socket = runtime
            .block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))
            .expect("a loopback socket");
        let own = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        let gate = Gate {
            socket,
            unauthenticated: Default::default(),
            auth: RestAuth::new(FUZZ_SECRET.to_vec()),
            realm: FUZZ_REALM.into(),
            policy: Arc::new(PeerPolicy::new(&[], &own)),
            registry: Arc::new(Registry::new(5, 100)),
            pending: Arc::default(),
            max_lifetime: Duration::from_secs(600),
            origins: Arc::default(),
        };
        (runtime, gate)
    });
    gate
}

/// The embedded TURN server's gate. The first byte chooses: even, the rest is a raw
/// datagram; odd, the rest is attributes (type, length, value) of a request that carries
/// valid credentials, so the checks behind authentication are reached too. A rewritten
/// request must still verify with the user's key.
pub fn turn_gate(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let gate = gate();
    let src = SocketAddr::from(([203, 0, 113, 7], 40_000));
    if mode % 2 == 0 {
        let _ = gate.inspect(rest, src);
        return;
    }
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;
    let username = format!("{expiry}:fuzz");
    let Ok(key) = gate.auth.key(&username, FUZZ_REALM, SystemTime::now()) else {
        return;
    };
    let typ = match mode / 2 % 5 {
        0 => MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST),
        1 => MessageType::new(METHOD_REFRESH, CLASS_REQUEST),
        2 => MessageType::new(METHOD_CREATE_PERMISSION, CLASS_REQUEST),
        3 => MessageType::new(METHOD_CHANNEL_BIND, CLASS_REQUEST),
        _ => MessageType::new(METHOD_SEND, CLASS_INDICATION),
    };
    let mut m = Message::new();
    m.typ = typ;
    m.transaction_id = stun::agent::TransactionId([7; 12]);
    m.write_header();
    let mut attrs = rest;
    while let [t0, t1, len, tail @ ..] = attrs {
        let len = usize::from(*len).min(tail.len());
        let (value, next) = tail.split_at(len);
        m.add(AttrType(u16::from_be_bytes([*t0, *t1])), value);
        attrs = next;
    }
    m.add(ATTR_USERNAME, username.as_bytes());
    m.add(ATTR_REALM, FUZZ_REALM.as_bytes());
    if MessageIntegrity(key.clone()).add_to(&mut m).is_err() || FINGERPRINT.add_to(&mut m).is_err()
    {
        return;
    }
    if let Verdict::Replace(raw) = gate.inspect(&m.raw, src) {
        let mut out = Message::new();
        out.raw = raw;
        out.decode().expect("a rewritten request decodes");
        MessageIntegrity(key)
            .check(&mut out)
            .expect("a rewritten request is signed with the user's key");
    }
}

/// TURN over a stream (`turn::server::framing`), fed the input in chunks (the first byte
/// is the chunk size) as a reader of the TCP/TLS front does: every message it cuts out is
/// within the limit and within what was buffered, the buffer never holds more than one
/// message and one chunk, and a message framed again takes the same bytes on the stream.
pub fn turn_framing(data: &[u8]) {
    use crate::turn::server::framing::{FrameError, encode, next_frame};
    const MAX: usize = 1500;
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step.max(1));
    let mut buf = Vec::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match next_frame(&buf, MAX) {
                Ok(Some(frame)) => {
                    assert!(frame.len <= MAX && frame.len <= frame.consumed);
                    assert!(frame.consumed <= buf.len() && frame.consumed < frame.len + 4);
                    let mut again = Vec::new();
                    encode(&buf[..frame.len], &mut again).expect("a framed message encodes");
                    assert_eq!(again.len(), frame.consumed);
                    assert_eq!(again[..frame.len], buf[..frame.len]);
                    buf.drain(..frame.consumed);
                }
                Ok(None) => break,
                // Skipped by the front; here the test of this input ends.
                Err(FrameError::TooLarge { len, consumed, .. }) => {
                    assert!(len > MAX && consumed >= len && consumed < len + 4);
                    return;
                }
                Err(FrameError::Garbage) => return, // the stream is closed here
            }
        }
        assert!(buf.len() < MAX + 4 + step, "{} bytes buffered", buf.len());
    }
    // Any datagram: framed whole, padded to 4, or refused.
    let mut out = Vec::new();
    if encode(rest, &mut out).is_ok() {
        assert_eq!(out.len() % 4, 0);
        assert!(out.len() >= rest.len().saturating_sub(3));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuzz_entry_points_take_seeds_and_garbage() {
        // A masked text frame "hi", fed a byte at a time, then a ping and a bad opcode.
        websocket_decoder(&[1, 0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
        websocket_decoder(&[3, 0x89, 0x80, 0, 0, 0, 0, 0x83, 0x80, 0, 0, 0, 0]);
        protocol_json(br#"{"type":"join","room":"kitchen"}"#);
        protocol_json(br#"{"type":"offer","sdp":"v=0"}"#);
        protocol_json(b"\xff{");
        create_room_body(br#"{"title":"standup","ttl_s":600}"#);
        create_room_body(br#"{"starts_at":"9999-99-99T00:00:00Z"}"#);
        // A signed Allocate asking for a day (LIFETIME 0x000D = 86400 s): lowered, re-signed.
        turn_gate(&[1, 0x00, 0x0D, 4, 0x00, 0x01, 0x51, 0x80]);
        // A signed CreatePermission for this host (denied), and raw garbage.
        turn_gate(&[
            5, 0x00, 0x12, 8, 0x00, 0x01, 0x21, 0x12, 0x5e, 0x12, 0xa4, 0x43,
        ]);
        turn_gate(&[0, 0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42]);
        // A Binding request (20 bytes), then ChannelData of 5 bytes with its padding, a
        // byte at a time; garbage; an oversized ChannelData header.
        let mut stream = vec![1, 0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        stream.extend([7; 12]);
        stream.extend([0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0]);
        turn_framing(&stream);
        turn_framing(&[3, 0xff, 0xff, 0xff, 0xff]);
        turn_framing(&[2, 0x40, 0x00, 0xff, 0xff, 0, 0]);
    }
}
