//! The meetings API, from the app's side: create a meeting (now or scheduled) on the
//! signaling server over HTTP, as `POST /api/rooms` in the protocol says.
//!
//! The request and answer types are the server's own (`signaling_server::api`), so the
//! two cannot drift apart. One small HTTP/1 request per call, with hyper; over TLS
//! (rustls, [`crate::tls`]) when the server is given as `https://` or `wss://`.

use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::tls::Trust;
pub use signaling_server::api::{ApiError, CreateRoomRequest, CreatedRoom, ROOMS_PATH};

/// Why a meeting could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeetingError {
    #[error("cannot reach the server at {0}")]
    Unreachable(String),
    /// An `https://` connection failed in TLS; the text says why in words.
    #[error("cannot connect securely to {0}")]
    Tls(String),
    #[error(
        "the server needs an API key to create meetings (the lobby's API key field, or --api-key)"
    )]
    NeedsApiKey,
    #[error("the API key is not usable in an HTTP header (only visible ASCII)")]
    BadApiKey,
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("the server's answer was not understood: {0}")]
    BadAnswer(String),
}

/// Where to send the request, from what a person may type as the server (`ws://h:p/ws`,
/// `h:p`, `https://h`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    /// `https://` or `wss://` was given.
    secure: bool,
    /// As typed (for the Host header): `h:p` or `h`.
    authority: String,
    /// The host name or address (no brackets), for TLS and messages.
    host: String,
    port: u16,
}

fn endpoint(server: &str) -> Result<Endpoint, MeetingError> {
    let s = server.trim();
    let (secure, rest) = if let Some(r) = s
        .strip_prefix("wss://")
        .or_else(|| s.strip_prefix("https://"))
    {
        (true, r)
    } else {
        let r = s
            .strip_prefix("ws://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s);
        (false, r)
    };
    let authority = rest.split('/').next().unwrap_or(rest).to_owned();
    let bad = || MeetingError::Unreachable(format!("{server}: not a server address"));
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            (host, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority.as_str(), None),
        },
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| bad())?,
        None if secure => 443,
        None => 80,
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Endpoint {
        secure,
        host: host.to_owned(),
        authority,
        port,
    })
}

/// Creates a meeting; the answer carries its id, join link and host token. `https://`
/// servers are checked against the process's default trust
/// ([`crate::tls::set_default_trust`]).
/// `api_key` is sent as `Authorization: Bearer` (servers with a key require it).
pub async fn create(
    server: &str,
    request: &CreateRoomRequest,
    api_key: Option<&str>,
) -> Result<CreatedRoom, MeetingError> {
    create_with(server, &crate::tls::default_trust(), request, api_key).await
}

/// [`create`] trusting the certificate authorities of `trust`.
pub async fn create_with(
    server: &str,
    trust: &Trust,
    request: &CreateRoomRequest,
    api_key: Option<&str>,
) -> Result<CreatedRoom, MeetingError> {
    let authorization = match api_key {
        Some(key) => Some(
            hyper::header::HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| MeetingError::BadApiKey)?,
        ),
        None => None,
    };
    let endpoint = endpoint(server)?;
    let authority = endpoint.authority.clone();
    let body = serde_json::to_vec(request).map_err(|e| MeetingError::BadAnswer(e.to_string()))?;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| MeetingError::Unreachable(format!("{authority}: {e}")))?;
        if !endpoint.secure {
            return post(TokioIo::new(tcp), &authority, authorization, body).await;
        }
        let config = trust
            .client_config()
            .map_err(|e| MeetingError::Tls(format!("{authority}: {e}")))?;
        let name = ServerName::try_from(endpoint.host.clone()).map_err(|_| {
            MeetingError::Tls(format!("{authority}: not a valid host name for TLS"))
        })?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| match crate::tls::explain(&e, &endpoint.host) {
                Some(reason) => MeetingError::Tls(format!("{authority}: {reason}")),
                None => MeetingError::Unreachable(format!("{authority}: {e}")),
            })?;
        post(TokioIo::new(tls), &authority, authorization, body).await
    };
    let (status, bytes) = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| MeetingError::Unreachable(format!("{authority}: timed out")))??;
    if status == hyper::StatusCode::CREATED {
        return serde_json::from_slice(&bytes).map_err(|e| MeetingError::BadAnswer(e.to_string()));
    }
    if status == hyper::StatusCode::UNAUTHORIZED {
        return Err(MeetingError::NeedsApiKey);
    }
    let message = serde_json::from_slice::<ApiError>(&bytes)
        .map(|e| e.message)
        .unwrap_or_else(|_| format!("HTTP {status}"));
    Err(MeetingError::Refused(message))
}

/// `POST /api/rooms` on an open connection (plain or TLS).
async fn post<S>(
    io: TokioIo<S>,
    authority: &str,
    authorization: Option<hyper::header::HeaderValue>,
    body: Vec<u8>,
) -> Result<(hyper::StatusCode, Bytes), MeetingError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let unreachable =
        |e: &dyn std::fmt::Display| MeetingError::Unreachable(format!("{authority}: {e}"));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| unreachable(&e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut req = hyper::Request::post(ROOMS_PATH)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(value) = authorization {
        req = req.header(hyper::header::AUTHORIZATION, value);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| MeetingError::BadAnswer(e.to_string()))?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(&e))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(&e))?
        .to_bytes();
    Ok((status, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_to_endpoints() {
        let e = |s: &str| {
            let e = endpoint(s).unwrap();
            (e.secure, e.authority, e.host, e.port)
        };
        let plain = |a: &str, h: &str, p| (false, a.to_owned(), h.to_owned(), p);
        let tls = |a: &str, h: &str, p| (true, a.to_owned(), h.to_owned(), p);
        assert_eq!(
            e("127.0.0.1:8787"),
            plain("127.0.0.1:8787", "127.0.0.1", 8787)
        );
        assert_eq!(e("ws://h:1/ws"), plain("h:1", "h", 1));
        assert_eq!(e("http://h:1/"), plain("h:1", "h", 1));
        assert_eq!(e("wss://h"), tls("h", "h", 443));
        assert_eq!(e("https://h:8443/"), tls("h:8443", "h", 8443));
        assert_eq!(e("https://[::1]:9"), tls("[::1]:9", "::1", 9));
        assert!(endpoint("h:notaport").is_err());
    }
}
