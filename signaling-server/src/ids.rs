//! Random identifiers that are unguessable and easy to read aloud.
//!
//! All ids come from the thread-local CSPRNG (`rand::rng()`, ChaCha seeded from the OS)
//! and use a 32-letter alphabet without look-alikes (no 0/o, 1/l), so each character
//! carries 5 bits.

use rand::Rng as _;

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
}
