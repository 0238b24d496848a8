//! Random identifiers that are unguessable and easy to read aloud.
//!
//! All ids come from the thread-local CSPRNG (`rand::rng()`, ChaCha seeded from the OS)
//! and use a 32-letter alphabet without look-alikes (no 0/o, 1/l), so each character
//! carries 5 bits.

use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// Lower-case letters and digits without `0`, `o`, `1` and `l`.
pub const ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";

/// `chars` random characters of [`ALPHABET`] (5 bits each).
pub fn random_chars(chars: usize) -> String {
    let mut rng = rand::rng();
    (0..chars)
        .map(|_| ALPHABET[(rng.next_u32() & 31) as usize] as char)
        .collect()
}

/// A connection's `peer_id`: 65 random bits.
pub fn peer_id() -> String {
    random_chars(13)
}

/// Characters in a room id (65 random bits), grouped 3-4-3-3 for reading aloud.
pub const ROOM_ID_CHARS: usize = 13;

/// A scheduled room's id, e.g. `kxp-47qm-zt9-4fh`: 65 random bits in groups of 3, 4, 3
/// and 3 characters.
pub fn room_id() -> String {
    group(&random_chars(ROOM_ID_CHARS))
}

/// A room's host token: 32 characters, 160 random bits.
pub fn host_token() -> String {
    random_chars(32)
}

/// A seat's resume token (in `joined`): 32 characters, 160 random bits.
pub fn resume_token() -> String {
    random_chars(32)
}

/// SHA-256 of a secret (host token or API key): what is stored and compared, so the
/// database never holds a usable token.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `presented` hashes to `hash`, compared in constant time.
pub fn secret_matches(hash: &[u8; 32], presented: &str) -> bool {
    bool::from(hash.ct_eq(&secret_hash(presented)))
}

/// Puts dashes into 13 id characters: `kxp47qmzt94fh` -> `kxp-47qm-zt9-4fh`.
fn group(chars: &str) -> String {
    let mut out = String::with_capacity(chars.len() + 3);
    for (i, c) in chars.chars().enumerate() {
        if matches!(i, 3 | 7 | 10) {
            out.push('-');
        }
        out.push(c);
    }
    out
}

/// The room a person typed or pasted: a join URL (`https://host/r/kxp-47qm-zt9-4fh`), a
/// room id in any case with or without dashes or spaces (`KXP 47QM ZT9 4FH`), or any
/// other room name. Returns the canonical id when the input is shaped like one, else
/// the trimmed text (an ad-hoc room name); `None` for an empty input.
pub fn parse_room_ref(input: &str) -> Option<String> {
    let mut text = input.trim();
    if let Some((_, after)) = text.split_once("/r/") {
        text = after
            .split(['?', '#', '/'])
            .next()
            .unwrap_or_default()
            .trim();
    }
    if text.is_empty() {
        return None;
    }
    let compact: String = text
        .chars()
        .filter(|c| !matches!(c, '-' | ' ' | '_' | '.'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if compact.len() == ROOM_ID_CHARS && compact.bytes().all(|b| ALPHABET.contains(&b)) {
        return Some(group(&compact));
    }
    Some(text.to_owned())
}

/// Whether `s` is shaped like a room id made by [`room_id`].
pub fn is_room_id(s: &str) -> bool {
    s.len() == ROOM_ID_CHARS + 3 && parse_room_ref(s).as_deref() == Some(s)
}

/// A direct call's `call_id` (also its room name): 130 random bits, unguessable.
pub fn call_id() -> String {
    format!("call-{}", random_chars(26))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_use_the_alphabet_and_do_not_repeat() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = peer_id();
            assert_eq!(id.len(), 13);
            assert!(id.bytes().all(|b| ALPHABET.contains(&b)));
            assert!(seen.insert(id));
        }
        assert_eq!(
            ALPHABET
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            32
        );
        assert!(call_id().starts_with("call-"));
    }

    #[test]
    fn room_ids_read_aloud_and_parse_back() {
        let id = room_id();
        assert_eq!(id.len(), 16);
        assert_eq!(
            id.split('-').map(str::len).collect::<Vec<_>>(),
            vec![3, 4, 3, 3]
        );
        assert!(is_room_id(&id));
        assert_eq!(host_token().len(), 32);
        assert_eq!(resume_token().len(), 32);
        assert_ne!(resume_token(), resume_token());
        let want = Some("kxp-47qm-zt9-4fh".to_owned());
        assert_eq!(parse_room_ref("kxp-47qm-zt9-4fh"), want);
        assert_eq!(parse_room_ref("  KXP 47QM ZT9 4FH "), want);
        assert_eq!(parse_room_ref("kxp47qmzt94fh"), want);
        assert_eq!(
            parse_room_ref("https://duet.example/r/kxp-47qm-zt9-4fh?x=1"),
            want
        );
        assert_eq!(
            parse_room_ref("http://127.0.0.1:8787/r/kxp-47qm-zt9-4fh"),
            want
        );
        assert_eq!(parse_room_ref(" standup "), Some("standup".to_owned()));
        assert_eq!(
            parse_room_ref("kxp-47qm-zt9-4f0"),
            Some("kxp-47qm-zt9-4f0".to_owned())
        );
        assert_eq!(parse_room_ref("   "), None);
        assert!(!is_room_id("standup"));
        assert!(!is_room_id("kxp47qmzt94fh"));
        let hash = secret_hash("token");
        assert!(secret_matches(&hash, "token"));
        assert!(!secret_matches(&hash, "tokem"));
    }
}
