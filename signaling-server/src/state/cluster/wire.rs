//! What travels on an instance's channel (`duet:to:{id}`): payloads of one or more
//! messages, each a small binary header followed by the JSON text its recipient's client
//! receives, built once by the sending instance. The receiving instance reads the
//! header, and only parses the JSON of a *notice* (a message that changes what it knows
//! about its member: `peer_joined`, `peer_left`, `room_ended`, a call's ringing, ...);
//! everything else (offers, answers, candidates) is queued for the connection as it came.
//!
//! Layout: byte 0 is [`VERSION`]; then one or more records, each: the flags byte
//! ([`TAKEN_OVER`], [`NOTICE`]); `to`, `room` and `from`, each a big-endian `u16` length
//! and that many bytes of UTF-8; the JSON, a big-endian `u32` length and its bytes. A
//! publisher puts what it has queued for one instance into one payload ([`append`]):
//! one `PUBLISH` for many messages, in order.
//!
//! A JSON envelope (the first version's format, which starts with `{`) is still read,
//! so that what older instances send during an upgrade is delivered (they cannot read
//! these payloads, though: `docs/DEPLOY.md`, *Upgrading*).

/// First byte of a payload (never `{`).
const VERSION: u8 = 1;
/// The seat `to` holds in `room` was resumed on another connection: let go of it (the
/// message is not delivered).
pub(super) const TAKEN_OVER: u8 = 1;
/// The receiving instance must read the message (see [`super::Cluster::receive`]).
pub(super) const NOTICE: u8 = 2;

/// One decoded record, borrowing the payload.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Frame<'a> {
    pub to: &'a str,
    pub room: &'a str,
    pub from: &'a str,
    pub flags: u8,
    /// The message's JSON (not checked here).
    pub json: &'a [u8],
}

/// Why a payload could not be read (records before the damage were read).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum FrameError {
    #[error("unknown payload version {0}")]
    Version(u8),
    #[error("payload cut short")]
    Short,
    #[error("record header is not UTF-8")]
    NotUtf8,
}

/// A payload of one record: `json` to `to` in `room` from instance `from`. `None` if a
/// header field is longer than 65,535 bytes (ids and room names are far shorter) or the
/// JSON longer than 4 GiB.
pub(super) fn encode(to: &str, room: &str, from: &str, flags: u8, json: &str) -> Option<Vec<u8>> {
    let mut out =
        Vec::with_capacity(1 + 1 + 6 + to.len() + room.len() + from.len() + 4 + json.len());
    out.push(VERSION);
    out.push(flags);
    for field in [to, room, from] {
        let len = u16::try_from(field.len()).ok()?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    let len = u32::try_from(json.len()).ok()?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(json.as_bytes());
    Some(out)
}

/// Adds the records of `more` (a payload made by [`encode`]) to the end of `payload`.
pub(super) fn append(payload: &mut Vec<u8>, more: &[u8]) {
    payload.extend_from_slice(more.get(1..).unwrap_or_default());
}

/// Whether `payload` is a JSON envelope of the first version.
pub(super) fn is_json_envelope(payload: &[u8]) -> bool {
    payload.first() == Some(&b'{')
}

/// The records of a payload, in order.
pub(super) fn decode(payload: &[u8]) -> Result<Records<'_>, FrameError> {
    let (&version, rest) = payload.split_first().ok_or(FrameError::Short)?;
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    Ok(Records { rest })
}

/// Iterator over a payload's records; stops after the first damaged one.
#[derive(Debug)]
pub(super) struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Frame<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let record = read_record(self.rest);
        match &record {
            Ok((_, rest)) => self.rest = rest,
            Err(_) => self.rest = &[],
        }
        Some(record.map(|(frame, _)| frame))
    }
}

fn read_record(bytes: &[u8]) -> Result<(Frame<'_>, &[u8]), FrameError> {
    let (&flags, mut rest) = bytes.split_first().ok_or(FrameError::Short)?;
    let mut fields = [""; 3];
    for field in &mut fields {
        let (len, after) = rest.split_first_chunk::<2>().ok_or(FrameError::Short)?;
        let len = usize::from(u16::from_be_bytes(*len));
        let (text, after) = after.split_at_checked(len).ok_or(FrameError::Short)?;
        *field = std::str::from_utf8(text).map_err(|_| FrameError::NotUtf8)?;
        rest = after;
    }
    let (len, after) = rest.split_first_chunk::<4>().ok_or(FrameError::Short)?;
    let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| FrameError::Short)?;
    let (json, rest) = after.split_at_checked(len).ok_or(FrameError::Short)?;
    let [to, room, from] = fields;
    Ok((
        Frame {
            to,
            room,
            from,
            flags,
            json,
        },
        rest,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(payload: &[u8]) -> Result<Vec<Frame<'_>>, FrameError> {
        decode(payload)?.collect()
    }

    #[test]
    fn round_trip() {
        let json = r#"{"type":"candidate","from":"p1"}"#;
        let bytes = encode("p2", "room é", "inst", NOTICE, json).unwrap();
        assert!(!is_json_envelope(&bytes));
        assert_eq!(
            all(&bytes).unwrap(),
            [Frame {
                to: "p2",
                room: "room é",
                from: "inst",
                flags: NOTICE,
                json: json.as_bytes(),
            }]
        );
    }

    #[test]
    fn several_records_in_one_payload_keep_their_order() {
        let mut payload = encode("a", "r1", "i", 0, "{\"n\":1}").unwrap();
        append(
            &mut payload,
            &encode("b", "r2", "i", TAKEN_OVER, "").unwrap(),
        );
        append(
            &mut payload,
            &encode("c", "r3", "i", 0, "{\"n\":3}").unwrap(),
        );
        let frames = all(&payload).unwrap();
        let summary: Vec<_> = frames
            .iter()
            .map(|f| (f.to, f.room, f.flags, f.json))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", "r1", 0, &b"{\"n\":1}"[..]),
                ("b", "r2", TAKEN_OVER, &b""[..]),
                ("c", "r3", 0, &b"{\"n\":3}"[..]),
            ]
        );
    }

    #[test]
    fn damaged_payloads_are_refused() {
        let one = encode("p2", "room", "inst", 0, "{}").unwrap();
        // Every cut inside the record fails (a cut after the version byte is no record).
        for cut in 2..one.len() {
            assert!(all(&one[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(all(&one[..1]).unwrap(), []);
        assert_eq!(all(&[]).unwrap_err(), FrameError::Short);
        let mut other = one.clone();
        other[0] = 9;
        assert_eq!(all(&other).unwrap_err(), FrameError::Version(9));
        let mut bad = one.clone();
        bad[5] = 0xff; // inside `to`
        assert_eq!(all(&bad).unwrap_err(), FrameError::NotUtf8);
        // The records before a damaged one are read.
        let mut two = one.clone();
        append(&mut two, &one[..one.len() - 1]);
        let mut records = decode(&two).unwrap();
        assert!(records.next().unwrap().is_ok());
        assert_eq!(records.next().unwrap().unwrap_err(), FrameError::Short);
        assert!(records.next().is_none());
        assert!(encode(&"x".repeat(70_000), "room", "inst", 0, "{}").is_none());
    }

    #[test]
    fn json_envelopes_are_told_apart() {
        assert!(is_json_envelope(br#"{"to":"p"}"#));
        assert!(!is_json_envelope(b""));
    }
}
