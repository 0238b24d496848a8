//! Time-limited TURN credentials (the "TURN REST API" scheme of coturn's `use-auth-secret`).
//!
//! `username = "<unix expiry>:<id>"`, `credential = base64(HMAC-SHA1(secret, username))`.
//! A TURN server that knows the same secret checks them without talking to us, so coturn
//! (or the embedded relay in [`server`]) can be swapped in freely.

pub mod server;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{KeyInit as _, Mac as _};

use crate::protocol::IceServer;

type HmacSha1 = hmac::Hmac<sha1::Sha1>;

/// `base64(HMAC-SHA1(secret, username))`.
pub fn credential(secret: &[u8], username: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha1::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A username valid until `now + lifetime`, for the user `id`.
pub fn username(id: &str, now: SystemTime, lifetime: Duration) -> String {
    let expiry = (now + lifetime)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{expiry}:{id}")
}

/// How the server builds the `ice_servers` list it hands out.
#[derive(Debug, Clone, Default)]
pub struct IceConfig {
    /// `stun:` URLs, handed out as they are.
    pub stun_urls: Vec<String>,
    /// `turn:`/`turns:` URLs, handed out with credentials.
    pub turn_urls: Vec<String>,
    pub credentials: TurnCredentials,
}

/// Where TURN credentials come from.
#[derive(Debug, Clone, Default)]
pub enum TurnCredentials {
    /// No TURN URLs configured.
    #[default]
    None,
    /// One fixed username/password for everybody.
    Static { username: String, password: String },
    /// Minted per connection from a shared secret.
    Secret { secret: Vec<u8>, lifetime: Duration },
}

impl IceConfig {
    /// The list for one connection; `id` names the user in minted TURN usernames.
    pub fn ice_servers(&self, id: &str, now: SystemTime) -> Vec<IceServer> {
        let mut list = Vec::new();
        if !self.stun_urls.is_empty() {
            list.push(IceServer {
                urls: self.stun_urls.clone(),
                username: None,
                credential: None,
            });
        }
        if !self.turn_urls.is_empty() {
            let (username, credential) = match &self.credentials {
                TurnCredentials::None => (None, None),
                TurnCredentials::Static { username, password } => {
                    (Some(username.clone()), Some(password.clone()))
                }
                TurnCredentials::Secret { secret, lifetime } => {
                    let user = username(id, now, *lifetime);
                    let cred = credential(secret, &user);
                    (Some(user), Some(cred))
                }
            };
            list.push(IceServer {
                urls: self.turn_urls.clone(),
                username,
                credential,
            });
        }
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc2202_hmac_sha1_vector() {
        // RFC 2202 test case 2: key "Jefe", data "what do ya want for nothing?".
        let b64 = credential(b"Jefe", "what do ya want for nothing?");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79");
    }

    #[test]
    fn minted_servers_have_expiring_usernames() {
        let cfg = IceConfig {
            stun_urls: vec!["stun:127.0.0.1:3478".into()],
            turn_urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
            credentials: TurnCredentials::Secret {
                secret: b"s3cret".to_vec(),
                lifetime: Duration::from_secs(3600),
            },
        };
        let now = UNIX_EPOCH + Duration::from_secs(1_767_222_000);
        let list = cfg.ice_servers("abc", now);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].username, None);
        assert_eq!(list[1].username.as_deref(), Some("1767225600:abc"));
        assert_eq!(
            list[1].credential.as_deref(),
            Some(credential(b"s3cret", "1767225600:abc").as_str())
        );
    }
}
