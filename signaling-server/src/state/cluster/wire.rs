//! What travels on an instance's channel (`duet:to:{id}`): one frame per message, a
//! small binary header followed by the JSON text its recipient's client receives, built
//! once by the sending instance. The receiving instance reads the header, and only
//! parses the JSON of a *notice* (a message that changes what it knows about its member:
//! `peer_joined`, `peer_left`, `room_ended`, a call's ringing, ...); everything else
//! (offers, answers, candidates) is queued for the connection as it came.
//!
//! Layout: byte 0 is [`VERSION`], byte 1 the flags ([`TAKEN_OVER`], [`NOTICE`]); then
//! `to`, `room` and `from`, each a big-endian `u16` length and that many bytes of UTF-8;
//! the rest is the message's JSON.
//!
//! A JSON envelope (the first version's format, which starts with `{`) is still read,
//! so that instances of both versions can share a cluster during an upgrade.

/// First byte of a frame (never `{`).
const VERSION: u8 = 1;
/// The seat `to` holds in `room` was resumed on another connection: let go of it (the
/// message is not delivered).
pub(super) const TAKEN_OVER: u8 = 1;
/// The receiving instance must read the message (see [`super::Cluster::receive`]).
pub(super) const NOTICE: u8 = 2;

/// One decoded frame, borrowing the payload.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Frame<'a> {
    pub to: &'a str,
    pub room: &'a str,
    pub from: &'a str,
    pub flags: u8,
    /// The message's JSON (not checked here).
    pub json: &'a [u8],
}

/// Why a frame could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum FrameError {
    #[error("unknown frame version {0}")]
    Version(u8),
    #[error("frame cut short")]
    Short,
    #[error("frame header is not UTF-8")]
    NotUtf8,
}

/// The frame for `json` to `to` in `room` from instance `from`; `None` if a header field
/// is longer than 65,535 bytes (ids and room names are far shorter).
pub(super) fn encode(to: &str, room: &str, from: &str, flags: u8, json: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(2 + 6 + to.len() + room.len() + from.len() + json.len());
    out.push(VERSION);
    out.push(flags);
    for field in [to, room, from] {
        let len = u16::try_from(field.len()).ok()?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out.extend_from_slice(json.as_bytes());
    Some(out)
}

/// Whether `payload` is a JSON envelope of the first version.
pub(super) fn is_json_envelope(payload: &[u8]) -> bool {
    payload.first() == Some(&b'{')
}

/// Reads a frame made by [`encode`].
pub(super) fn decode(payload: &[u8]) -> Result<Frame<'_>, FrameError> {
    let (&version, rest) = payload.split_first().ok_or(FrameError::Short)?;
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let (&flags, mut rest) = rest.split_first().ok_or(FrameError::Short)?;
    let mut fields = [""; 3];
    for field in &mut fields {
        let (len, after) = rest.split_first_chunk::<2>().ok_or(FrameError::Short)?;
        let len = usize::from(u16::from_be_bytes(*len));
        let (bytes, after) = after.split_at_checked(len).ok_or(FrameError::Short)?;
        *field = std::str::from_utf8(bytes).map_err(|_| FrameError::NotUtf8)?;
        rest = after;
    }
    let [to, room, from] = fields;
    Ok(Frame {
        to,
        room,
        from,
        flags,
        json: rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let json = r#"{"type":"candidate","from":"p1"}"#;
        let bytes = encode("p2", "room é", "inst", NOTICE, json).unwrap();
        assert!(!is_json_envelope(&bytes));
        let frame = decode(&bytes).unwrap();
        assert_eq!(
            frame,
            Frame {
                to: "p2",
                room: "room é",
                from: "inst",
                flags: NOTICE,
                json: json.as_bytes(),
            }
        );
    }

    #[test]
    fn damaged_frames_are_refused() {
        let bytes = encode("p2", "room", "inst", 0, "{}").unwrap();
        for cut in 0..bytes.len() - 2 {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut other = bytes.clone();
        other[0] = 9;
        assert_eq!(decode(&other), Err(FrameError::Version(9)));
        let mut bad = bytes;
        bad[4] = 0xff; // inside `to`
        assert_eq!(decode(&bad), Err(FrameError::NotUtf8));
        assert!(encode(&"x".repeat(70_000), "room", "inst", 0, "{}").is_none());
    }

    #[test]
    fn json_envelopes_are_told_apart() {
        assert!(is_json_envelope(br#"{"to":"p"}"#));
        assert!(!is_json_envelope(b""));
    }
}
