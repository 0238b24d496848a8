//! Checking TURN REST credentials (coturn's `use-auth-secret`) on the TURN side.
//!
//! `turn` 0.17's stock `LongTermAuthHandler` parses the whole username as a timestamp, so
//! it refuses the `"<expiry>:<id>"` usernames that `welcome` hands out (and that coturn
//! accepts). This handler takes the part before the first `:` as the expiry, refuses it
//! once passed, and derives the long-term key
//! `MD5(username ":" realm ":" base64(HMAC-SHA1(secret, username)))` (RFC 5389 §15.4).
//! The crate then compares the request's MESSAGE-INTEGRITY with that key in constant time
//! (`stun::checks::check_hmac` uses `subtle`); nothing here compares secrets.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::debug;

use crate::turn::credential;

/// Why a username gets no key. The messages never contain the secret or a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("username is not `<unix expiry>[:<id>]`")]
    Malformed,
    #[error("credentials expired")]
    Expired,
}

/// Long-term keys for TURN REST usernames, from the shared secret.
#[derive(Clone)]
pub struct RestAuth {
    secret: Vec<u8>,
}

impl std::fmt::Debug for RestAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RestAuth { secret: <hidden> }")
    }
}

impl RestAuth {
    pub fn new(secret: Vec<u8>) -> RestAuth {
        RestAuth { secret }
    }

    /// The MESSAGE-INTEGRITY key for `username` in `realm`, if the username is well formed
    /// and has not expired at `now`.
    pub fn key(&self, username: &str, realm: &str, now: SystemTime) -> Result<Vec<u8>, AuthError> {
        let expiry: u64 = username
            .split(':')
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or(AuthError::Malformed)?;
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(u64::MAX);
        if expiry < now {
            return Err(AuthError::Expired);
        }
        let password = credential(&self.secret, username);
        Ok(turn::auth::generate_auth_key(username, realm, &password))
    }
}

/// The user part of a REST username (`<expiry>:<id>` gives `<id>`; a bare expiry is its own
/// user). Quotas count allocations per user.
pub fn user_of(username: &str) -> &str {
    username.split_once(':').map_or(username, |(_, id)| id)
}

impl turn::auth::AuthHandler for RestAuth {
    fn auth_handle(
        &self,
        username: &str,
        realm: &str,
        src_addr: SocketAddr,
    ) -> Result<Vec<u8>, turn::Error> {
        self.key(username, realm, SystemTime::now()).map_err(|e| {
            debug!(%src_addr, user = user_of(username), reason = %e, "TURN credentials refused");
            turn::Error::Other(e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::turn::username;

    #[test]
    fn minted_usernames_get_the_coturn_key_until_they_expire() {
        let auth = RestAuth::new(b"s3cret".to_vec());
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let user = username("abc", now, Duration::from_secs(60));
        assert_eq!(user, "1800000060:abc");
        let key = auth.key(&user, "duet", now).unwrap();
        let password = credential(b"s3cret", &user);
        assert_eq!(key, turn::auth::generate_auth_key(&user, "duet", &password));
        assert_eq!(key.len(), 16);
        let later = now + Duration::from_secs(61);
        assert_eq!(auth.key(&user, "duet", later), Err(AuthError::Expired));
        assert_eq!(auth.key("abc", "duet", now), Err(AuthError::Malformed));
        assert_eq!(auth.key("", "duet", now), Err(AuthError::Malformed));
        // A bare timestamp is a valid REST username too (coturn accepts it).
        assert!(auth.key("1800000060", "duet", now).is_ok());
        assert_eq!(user_of("1800000060:abc"), "abc");
        assert_eq!(user_of("1800000060"), "1800000060");
    }
}
