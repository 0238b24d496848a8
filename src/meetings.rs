//! The meetings API, from the app's side: create a meeting (now or scheduled) on the
//! signaling server over HTTP, as `POST /api/rooms` in the protocol says.
//!
//! The request and answer types are the server's own (`signaling_server::api`), so the
//! two cannot drift apart. One small HTTP/1 request per call, with hyper.

use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
pub use signaling_server::api::{ApiError, CreateRoomRequest, CreatedRoom, ROOMS_PATH};

/// Why a meeting could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeetingError {
    #[error("cannot reach the server at {0}")]
    Unreachable(String),
    #[error("the app talks plain HTTP only; use a ws:// or host:port server address")]
    Tls,
    #[error("the server needs an API key to create meetings")]
    NeedsApiKey,
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("the server's answer was not understood: {0}")]
    BadAnswer(String),
}

/// `host:port` from what a person may type as the server (`ws://h:p/ws`, `h:p`, ...).
fn authority(server: &str) -> Result<String, MeetingError> {
    let s = server.trim();
    if s.starts_with("wss://") || s.starts_with("https://") {
        return Err(MeetingError::Tls);
    }
    let rest = s
        .strip_prefix("ws://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    Ok(rest.split('/').next().unwrap_or(rest).to_owned())
}

/// Creates a meeting; the answer carries its id, join link and host token.
pub async fn create(
    server: &str,
    request: &CreateRoomRequest,
) -> Result<CreatedRoom, MeetingError> {
    let authority = authority(server)?;
    let body = serde_json::to_vec(request).map_err(|e| MeetingError::BadAnswer(e.to_string()))?;
    let unreachable =
        |e: &dyn std::fmt::Display| MeetingError::Unreachable(format!("{authority}: {e}"));
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let req = hyper::Request::post(ROOMS_PATH)
            .header(hyper::header::HOST, &authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
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
        Ok::<_, MeetingError>((status, bytes))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_to_authorities() {
        assert_eq!(authority("127.0.0.1:8787").unwrap(), "127.0.0.1:8787");
        assert_eq!(authority("ws://h:1/ws").unwrap(), "h:1");
        assert_eq!(authority("http://h:1/").unwrap(), "h:1");
        assert_eq!(authority("wss://h"), Err(MeetingError::Tls));
    }
}
