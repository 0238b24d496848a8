//! Server side of RFC 6455 framing: a streaming decoder and a frame encoder.
//!
//! Why not tungstenite? The protocol says an oversized message gets `error/too_large`
//! and the connection *stays open*, and that the message must be refused without
//! buffering it whole. tungstenite's size limits fail the whole connection (its
//! `Capacity` error leaves the stream unusable mid-frame). This decoder instead checks
//! each frame header against the limit and, for an oversized message, drops the payload
//! bytes as they arrive (no buffer larger than the limit ever exists), then carries on
//! with the next message. It also keeps no buffer at all while a connection is idle,
//! which is what makes a connection cost a few KB. The HTTP upgrade itself is done by
//! axum/hyper (see `server.rs`); tests talk to this code with tokio-tungstenite clients.

use bytes::{Buf, BytesMut};

/// The magic GUID of RFC 6455 section 1.3.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(client_key: &str) -> String {
    use base64::Engine as _;
    use sha1::Digest as _;
    let mut sha = sha1::Sha1::new();
    sha.update(client_key.trim().as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Frame opcodes (RFC 6455 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    fn from_u8(b: u8) -> Option<Opcode> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Close codes this server sends (RFC 6455 section 7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Something the peer sent, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete text message (at most the size limit, valid UTF-8).
    Text(String),
    /// A complete binary message; its content is not kept (the protocol has no use for it).
    Binary,
    /// A complete text message that is not valid UTF-8.
    InvalidUtf8,
    /// A data message exceeded the size limit; the rest of it is being skipped.
    TooLarge,
    Ping(Vec<u8>),
    Pong,
    /// The peer started the closing handshake, with its close code if it gave one (a
    /// code an endpoint may send: [`valid_close_code`]).
    Close(Option<u16>),
    /// The peer's close frame had a reason that is not UTF-8 (RFC 6455 §5.5.1: answered
    /// with 1007).
    CloseWithBadReason,
}

/// Whether an endpoint may send `code` in a close frame (RFC 6455 §7.4 and the IANA
/// registry): 1000-1003, 1007-1014, and 3000-4999 for libraries and applications. 1004-1006
/// and 1015 are reserved (never sent), below 1000 and 1016-2999 unassigned.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The peer broke the framing rules; the connection must be failed with close code 1002.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("WebSocket protocol violation: {0}")]
pub struct Violation(pub &'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    Message,
    Control,
    Discard,
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Header,
    Payload {
        opcode: Opcode,
        fin: bool,
        mask: [u8; 4],
        remaining: u64,
        /// Payload bytes of this frame already consumed (the masking key's phase).
        done: u64,
        sink: Sink,
    },
}

/// Incremental decoder of client-to-server frames.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    stage: Stage,
    /// The data message being assembled (empty, with no allocation, between messages).
    message: Vec<u8>,
    /// Opcode of the data message in progress, if any.
    message_opcode: Option<Opcode>,
    /// The current data message is over the limit: drop frames until its final one.
    discarding: bool,
    control: Vec<u8>,
}

impl Decoder {
    /// A decoder that accepts data messages of at most `max_message` bytes.
    pub fn new(max_message: usize) -> Decoder {
        Decoder {
            max_message,
            stage: Stage::Header,
            message: Vec::new(),
            message_opcode: None,
            discarding: false,
            control: Vec::new(),
        }
    }

    /// The largest accepted data message, in bytes.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Consumes bytes from `buf` until one event is complete (`Ok(Some)`) or `buf` runs
    /// out (`Ok(None)`: read more and call again). Payload bytes are always consumed as
    /// they arrive, so `buf` never needs to hold more than one frame header.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, Violation> {
        loop {
            match self.stage {
                Stage::Header => {
                    let Some((header_len, opcode, fin, mask, len)) = parse_header(buf)? else {
                        return Ok(None);
                    };
                    buf.advance(header_len);
                    let (sink, too_large) = self.route(opcode, fin, len)?;
                    self.stage = Stage::Payload {
                        opcode,
                        fin,
                        mask,
                        remaining: len,
                        done: 0,
                        sink,
                    };
                    if too_large {
                        return Ok(Some(Event::TooLarge));
                    }
                }
                Stage::Payload {
                    opcode,
                    fin,
                    mask,
                    remaining,
                    done,
                    sink,
                } => {
                    let n = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    match sink {
                        Sink::Message => unmask_into(&mut self.message, &buf[..n], mask, done),
                        Sink::Control => unmask_into(&mut self.control, &buf[..n], mask, done),
                        Sink::Discard => {}
                    }
                    buf.advance(n);
                    let remaining = remaining - n as u64;
                    if remaining > 0 {
                        self.stage = Stage::Payload {
                            opcode,
                            fin,
                            mask,
                            remaining,
                            done: done + n as u64,
                            sink,
                        };
                        return Ok(None);
                    }
                    self.stage = Stage::Header;
                    if let Some(event) = self.finish_frame(opcode, fin, sink)? {
                        return Ok(Some(event));
                    }
                }
            }
        }
    }

    /// Decides where a frame's payload goes, enforcing fragmentation rules and the limit.
    /// Returns the sink and whether this frame made the message too large.
    fn route(&mut self, opcode: Opcode, fin: bool, len: u64) -> Result<(Sink, bool), Violation> {
        if opcode.is_control() {
            if !fin {
                return Err(Violation("fragmented control frame"));
            }
            if len > 125 {
                return Err(Violation("control frame payload over 125 bytes"));
            }
            self.control.clear();
            return Ok((Sink::Control, false));
        }
        let in_progress = self.message_opcode.is_some() || self.discarding;
        match opcode {
            Opcode::Continuation if !in_progress => {
                Err(Violation("continuation frame without a message"))
            }
            Opcode::Continuation if self.discarding => Ok((Sink::Discard, false)),
            Opcode::Continuation => {
                if (self.message.len() as u64).saturating_add(len) > self.max_message as u64 {
                    self.message = Vec::new();
                    self.message_opcode = None;
                    self.discarding = true;
                    Ok((Sink::Discard, true))
                } else {
                    self.message.reserve(len as usize);
                    Ok((Sink::Message, false))
                }
            }
            _ if in_progress => Err(Violation("new data frame inside a fragmented message")),
            _ => {
                if len > self.max_message as u64 {
                    self.discarding = true;
                    Ok((Sink::Discard, true))
                } else {
                    self.message_opcode = Some(opcode);
                    self.message.reserve(len as usize);
                    Ok((Sink::Message, false))
                }
            }
        }
    }

    fn finish_frame(
        &mut self,
        opcode: Opcode,
        fin: bool,
        sink: Sink,
    ) -> Result<Option<Event>, Violation> {
        match sink {
            Sink::Control => {
                let payload = std::mem::take(&mut self.control);
                Ok(Some(match opcode {
                    Opcode::Ping => Event::Ping(payload),
                    Opcode::Pong => Event::Pong,
                    _ => match payload.len() {
                        0 => Event::Close(None),
                        1 => return Err(Violation("close frame with a 1-byte payload")),
                        _ => {
                            let code = u16::from_be_bytes([payload[0], payload[1]]);
                            if !valid_close_code(code) {
                                return Err(Violation("invalid close code"));
                            }
                            if std::str::from_utf8(&payload[2..]).is_err() {
                                Event::CloseWithBadReason
                            } else {
                                Event::Close(Some(code))
                            }
                        }
                    },
                }))
            }
            Sink::Discard => {
                if fin {
                    self.discarding = false;
                }
                Ok(None)
            }
            Sink::Message if !fin => Ok(None),
            Sink::Message => {
                let data = std::mem::take(&mut self.message);
                Ok(Some(match self.message_opcode.take() {
                    Some(Opcode::Text) => match String::from_utf8(data) {
                        Ok(text) => Event::Text(text),
                        Err(_) => Event::InvalidUtf8,
                    },
                    _ => Event::Binary,
                }))
            }
        }
    }
}

type Header = (usize, Opcode, bool, [u8; 4], u64);

/// Parses a frame header if `buf` holds all of it.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, Violation> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(Violation("reserved bits set without an extension"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = Opcode::from_u8(b0 & 0x0F).ok_or(Violation("unknown opcode"))?;
    if b1 & 0x80 == 0 {
        return Err(Violation("client frames must be masked"));
    }
    let (len, len_bytes) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 2)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(Violation("payload length has its top bit set"));
            }
            (len, 8)
        }
        n => (u64::from(n), 0),
    };
    let header_len = 2 + len_bytes + 4;
    if buf.len() < header_len {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[2 + len_bytes..header_len]);
    Ok(Some((header_len, opcode, fin, mask, len)))
}

fn unmask_into(out: &mut Vec<u8>, data: &[u8], mask: [u8; 4], offset: u64) {
    let phase = (offset % 4) as usize;
    out.extend(
        data.iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[(i + phase) % 4]),
    );
}

/// Appends one unmasked, unfragmented server frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, opcode: Opcode, payload: &[u8]) {
    out.push(0x80 | opcode as u8);
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and a short reason.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    // Control frames carry at most 125 bytes.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(out, Opcode::Close, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(decoder: &mut Decoder, bytes: &[u8], chunk: usize) -> Vec<Event> {
        let mut events = Vec::new();
        let mut buf = BytesMut::new();
        for piece in bytes.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(e) = decoder.decode(&mut buf).unwrap() {
                events.push(e);
            }
        }
        events
    }

    #[test]
    fn rfc_accept_key_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn decodes_text_in_any_chunking() {
        let mut bytes = client_frame(true, 1, b"hello");
        bytes.extend(client_frame(true, 1, &[b'x'; 300]));
        bytes.extend(client_frame(true, 9, b"pp"));
        for chunk in [1, 2, 3, 7, 1000] {
            let mut d = Decoder::new(1024);
            let events = decode_all(&mut d, &bytes, chunk);
            assert_eq!(
                events,
                vec![
                    Event::Text("hello".into()),
                    Event::Text("x".repeat(300)),
                    Event::Ping(b"pp".to_vec())
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn reassembles_fragments_with_interleaved_control() {
        let mut bytes = client_frame(false, 1, b"hel");
        bytes.extend(client_frame(true, 10, b""));
        bytes.extend(client_frame(true, 0, b"lo"));
        let mut d = Decoder::new(1024);
        assert_eq!(
            decode_all(&mut d, &bytes, 4),
            vec![Event::Pong, Event::Text("hello".into())]
        );
    }

    #[test]
    fn oversized_message_is_skipped_and_next_one_decodes() {
        let big = vec![b'a'; 70_000];
        let mut bytes = client_frame(true, 1, &big);
        bytes.extend(client_frame(true, 1, b"after"));
        let mut d = Decoder::new(65_536);
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        for piece in bytes.chunks(4096) {
            buf.extend_from_slice(piece);
            while let Some(e) = d.decode(&mut buf).unwrap() {
                events.push(e);
            }
            // Payload never piles up: the buffer holds at most what one read brought.
            assert!(buf.len() <= 4096);
            assert!(d.message.capacity() < 65_536);
        }
        assert_eq!(events, vec![Event::TooLarge, Event::Text("after".into())]);
    }

    #[test]
    fn message_growing_past_limit_over_fragments_is_skipped() {
        let mut bytes = client_frame(false, 1, &[b'a'; 40]);
        bytes.extend(client_frame(false, 0, &[b'a'; 40]));
        bytes.extend(client_frame(true, 0, &[b'a'; 40]));
        bytes.extend(client_frame(true, 1, b"ok"));
        let mut d = Decoder::new(64);
        assert_eq!(
            decode_all(&mut d, &bytes, 5),
            vec![Event::TooLarge, Event::Text("ok".into())]
        );
    }

    #[test]
    fn exactly_the_limit_is_accepted() {
        let mut d = Decoder::new(200);
        let events = decode_all(&mut d, &client_frame(true, 1, &[b'z'; 200]), 64);
        assert_eq!(events, vec![Event::Text("z".repeat(200))]);
    }

    #[test]
    fn binary_invalid_utf8_and_close() {
        let mut bytes = client_frame(true, 2, &[1, 2, 3]);
        bytes.extend(client_frame(true, 1, &[0xff, 0xfe]));
        bytes.extend(client_frame(true, 8, &1000u16.to_be_bytes()));
        let mut d = Decoder::new(100);
        assert_eq!(
            decode_all(&mut d, &bytes, 3),
            vec![Event::Binary, Event::InvalidUtf8, Event::Close(Some(1000))]
        );
    }

    #[test]
    fn close_codes_and_reasons() {
        for code in [1000u16, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            assert!(valid_close_code(code), "{code}");
        }
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!valid_close_code(code), "{code}");
        }
        let mut payload = 4000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"done");
        let mut bytes = client_frame(true, 8, &payload);
        let mut bad = 1000u16.to_be_bytes().to_vec();
        bad.extend_from_slice(&[0xff, 0xfe]);
        bytes.extend(client_frame(true, 8, &bad));
        let mut d = Decoder::new(100);
        assert_eq!(
            decode_all(&mut d, &bytes, 5),
            vec![Event::Close(Some(4000)), Event::CloseWithBadReason]
        );
    }

    #[test]
    fn violations() {
        let cases: Vec<Vec<u8>> = vec![
            vec![0x81, 0x02, b'h', b'i'],                  // unmasked
            client_frame(true, 3, b""),                    // reserved opcode
            client_frame(false, 9, b""),                   // fragmented ping
            client_frame(true, 9, &[0; 126]),              // long ping
            client_frame(true, 0, b"x"),                   // stray continuation
            client_frame(true, 8, &999u16.to_be_bytes()),  // close code below 1000
            client_frame(true, 8, &1005u16.to_be_bytes()), // reserved close code
            client_frame(true, 8, &2000u16.to_be_bytes()), // unassigned close code
            [client_frame(false, 1, b"a"), client_frame(true, 1, b"b")].concat(),
            {
                let mut f = client_frame(true, 1, b"a");
                f[0] |= 0x40; // RSV1
                f
            },
        ];
        for (i, bytes) in cases.iter().enumerate() {
            let mut d = Decoder::new(100);
            let mut buf = BytesMut::from(&bytes[..]);
            let mut result = Ok(None);
            for _ in 0..4 {
                result = d.decode(&mut buf);
                if result.is_err() {
                    break;
                }
            }
            assert!(result.is_err(), "case {i} should be a violation");
        }
    }

    #[test]
    fn encodes_lengths() {
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let mut out = Vec::new();
            encode_frame(&mut out, Opcode::Text, &vec![b'a'; len]);
            let header = out.len() - len;
            assert_eq!(
                header,
                match len {
                    0..=125 => 2,
                    126..=65_535 => 4,
                    _ => 10,
                }
            );
            assert_eq!(out[0], 0x81);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: random bytes and random mutations of valid frames.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut bytes = client_frame(next() & 1 == 0, (next() % 11) as u8, &[b'q'; 40]);
            for _ in 0..(next() % 4) {
                let i = (next() as usize) % bytes.len();
                bytes[i] = next() as u8;
            }
            let extra = (next() % 16) as usize;
            bytes.extend((0..extra).map(|_| next() as u8));
            let mut d = Decoder::new(64);
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..8 {
                match d.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
