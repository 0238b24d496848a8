//! TURN messages over a byte stream (TCP or TLS): where one message ends and the next
//! begins (RFC 5766 §11.5/RFC 6062, RFC 8656 §12.5), without any I/O.
//!
//! Over UDP each datagram is one message. Over a stream they follow each other:
//! - a STUN message (first two bits `00`) is its 20-byte header plus the length in bytes
//!   2..4 of that header (always a multiple of 4, with the magic cookie in bytes 4..8);
//! - a ChannelData message (first two bits `01`) is its 4-byte header plus the length in
//!   bytes 2..4, padded with zeros to a multiple of 4 over a stream (the padding is not
//!   part of the message).
//!
//! Anything else (first bits `10`/`11`, a STUN header without the cookie or with a length
//! that is not a multiple of 4) cannot be resynchronised: the stream is garbage and is
//! closed. A message over the caller's size limit is reported from its header, with its
//! length on the stream, so a reader can skip it without buffering it. Both ends of Duet's bridges use this: the server's TCP/TLS front
//! ([`super::stream`]) and the client's local bridge (`duet::call::turn_bridge`).

/// The STUN header: type, length, magic cookie, transaction id.
pub const STUN_HEADER: usize = 20;
/// The ChannelData header: channel number, length.
pub const CHANNEL_HEADER: usize = 4;
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// Why a stream cannot be read on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// `consumed`: what it takes on the stream, padding included (a reader that skips
    /// it stays in step).
    #[error("a message of {len} bytes is over the limit of {max}")]
    TooLarge {
        len: usize,
        max: usize,
        consumed: usize,
    },
    #[error("neither a STUN nor a ChannelData message")]
    Garbage,
}

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stun,
    ChannelData,
}

/// One whole message at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    /// Bytes of the message itself (what goes into one datagram).
    pub len: usize,
    /// Bytes it takes on the stream, padding included.
    pub consumed: usize,
}

/// The kind and length (without padding) of the message starting `buf`, when enough of
/// its header is there to say (`Ok(None)`: need more bytes).
fn header(buf: &[u8]) -> Result<Option<(Kind, usize)>, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let kind = match first >> 6 {
        0b00 => Kind::Stun,
        0b01 => Kind::ChannelData,
        _ => return Err(FrameError::Garbage),
    };
    if buf.len() < 4 {
        return Ok(None);
    }
    let field = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    match kind {
        Kind::Stun => {
            if field % 4 != 0 {
                return Err(FrameError::Garbage);
            }
            if buf.len() < 8 {
                return Ok(None);
            }
            if buf[4..8] != MAGIC_COOKIE {
                return Err(FrameError::Garbage);
            }
            Ok(Some((kind, STUN_HEADER + field)))
        }
        Kind::ChannelData => Ok(Some((kind, CHANNEL_HEADER + field))),
    }
}

fn padded(len: usize) -> usize {
    len.div_ceil(4) * 4
}

/// The first message of stream data `buf` once all of it (and its padding) is there;
/// `Ok(None)` while more bytes are needed. A message longer than `max` is an error as
/// soon as its header says so (before its bytes arrive).
pub fn next_frame(buf: &[u8], max: usize) -> Result<Option<Frame>, FrameError> {
    let Some((kind, len)) = header(buf)? else {
        return Ok(None);
    };
    let consumed = match kind {
        Kind::Stun => len,
        Kind::ChannelData => padded(len),
    };
    if len > max {
        return Err(FrameError::TooLarge { len, max, consumed });
    }
    Ok((buf.len() >= consumed).then_some(Frame {
        kind,
        len,
        consumed,
    }))
}

/// Appends datagram `datagram` to `out` as stream data: the message it holds, ChannelData
/// padded to 4 bytes (a datagram may carry its padding or not). A datagram that is not
/// one whole message is refused.
pub fn encode(datagram: &[u8], out: &mut Vec<u8>) -> Result<Kind, FrameError> {
    let Some((kind, len)) = header(datagram)? else {
        return Err(FrameError::Garbage);
    };
    let fits = match kind {
        Kind::Stun => datagram.len() == len,
        Kind::ChannelData => (len..=padded(len)).contains(&datagram.len()),
    };
    if !fits {
        return Err(FrameError::Garbage);
    }
    out.extend_from_slice(&datagram[..len]);
    out.resize(out.len() + padded(len) - len, 0);
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun(body: usize) -> Vec<u8> {
        let mut m = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42];
        m[2..4].copy_from_slice(&(body as u16).to_be_bytes());
        m.extend((0..12 + body).map(|i| i as u8));
        m
    }

    fn channel(payload: usize, pad: bool) -> Vec<u8> {
        let mut m = vec![0x40, 0x01];
        m.extend_from_slice(&(payload as u16).to_be_bytes());
        m.extend((0..payload).map(|i| (i * 7) as u8));
        if pad {
            m.resize(padded(m.len()), 0);
        }
        m
    }

    /// Feeds `stream` in pieces of `step` bytes and returns the messages read.
    fn split(stream: &[u8], step: usize, max: usize) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for piece in stream.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(f) = next_frame(&buf, max)? {
                out.push(buf[..f.len].to_vec());
                buf.drain(..f.consumed);
            }
        }
        assert!(buf.is_empty(), "{} bytes left over", buf.len());
        Ok(out)
    }

    #[test]
    fn messages_split_at_any_read_boundary() {
        let messages = [stun(0), channel(5, false), stun(24), channel(8, false)];
        let mut stream = Vec::new();
        for m in &messages {
            encode(m, &mut stream).unwrap();
        }
        // 20 + (4+5+3 padding) + 44 + 12.
        assert_eq!(stream.len(), 88);
        for step in [1, 2, 3, 5, 7, 19, 20, 21, 64, 1000] {
            assert_eq!(split(&stream, step, 1500).unwrap(), messages, "step {step}");
        }
    }

    #[test]
    fn channel_data_is_padded_on_the_stream_and_not_in_the_datagram() {
        for payload in 0..9 {
            let mut out = Vec::new();
            assert_eq!(
                encode(&channel(payload, false), &mut out),
                Ok(Kind::ChannelData)
            );
            assert_eq!(out.len() % 4, 0);
            assert_eq!(out.len(), padded(4 + payload));
            // A datagram that already carries its padding gives the same bytes.
            let mut again = Vec::new();
            encode(&channel(payload, true), &mut again).unwrap();
            assert_eq!(again, out);
            let f = next_frame(&out, 1500).unwrap().unwrap();
            assert_eq!((f.len, f.consumed), (4 + payload, out.len()));
            // Without its padding the frame is not complete yet.
            if out.len() > 4 + payload {
                assert_eq!(next_frame(&out[..4 + payload], 1500), Ok(None));
            }
        }
    }

    #[test]
    fn oversized_messages_are_refused_from_their_header() {
        let big = stun(1500);
        assert_eq!(
            next_frame(&big[..8], 1500),
            Err(FrameError::TooLarge {
                len: 1520,
                max: 1500,
                consumed: 1520
            })
        );
        assert_eq!(
            next_frame(&[0x40, 0x00, 0xFF, 0xFF], 1500),
            Err(FrameError::TooLarge {
                len: 65539,
                max: 1500,
                consumed: 65540
            })
        );
        // At the limit: fine.
        let at = channel(1496, false);
        assert_eq!(split(&at, 100, 1500).unwrap(), vec![at]);
    }

    #[test]
    fn garbage_is_recognised_as_early_as_possible() {
        // HTTP reads as ChannelData ('G' is 0x47) of an impossible length; a TLS
        // ClientHello (0x16 0x03 0x01 ...) as STUN without the cookie. Both close.
        assert!(matches!(
            next_frame(b"GET / HTTP/1.1\r\n", 1500),
            Err(FrameError::TooLarge { .. })
        ));
        let hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];
        assert_eq!(next_frame(&hello, 1500), Err(FrameError::Garbage));
        assert_eq!(next_frame(&[0x80], 1500), Err(FrameError::Garbage));
        assert_eq!(next_frame(&[0xC0, 0, 0, 0], 1500), Err(FrameError::Garbage));
        // STUN: a length that is not a multiple of 4; no magic cookie (RFC 3489).
        assert_eq!(next_frame(&[0, 1, 0, 3], 1500), Err(FrameError::Garbage));
        let mut old = stun(4);
        old[4] = 0;
        assert_eq!(next_frame(&old, 1500), Err(FrameError::Garbage));
        // Too short to say yet.
        assert_eq!(next_frame(&[], 1500), Ok(None));
        assert_eq!(next_frame(&[0, 1, 0], 1500), Ok(None));
        assert_eq!(next_frame(&[0, 1, 0, 4, 0x21, 0x12], 1500), Ok(None));
        // Datagrams that are not exactly one message are not sent on.
        let mut out = Vec::new();
        let mut long = stun(4);
        long.push(0);
        assert_eq!(encode(&long, &mut out), Err(FrameError::Garbage));
        assert_eq!(
            encode(&channel(4, false)[..6], &mut out),
            Err(FrameError::Garbage)
        );
        assert_eq!(encode(&[0x40, 1], &mut out), Err(FrameError::Garbage));
        assert_eq!(encode(b"\xffhello", &mut out), Err(FrameError::Garbage));
        assert!(out.is_empty());
    }
}
