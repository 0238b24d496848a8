//! The wire contract: every JSON message of signaling protocol version 1, as serde types.
//!
//! These types are the single definition of the protocol. The server parses
//! [`ClientMessage`] and writes [`ServerMessage`]; the Duet desktop client does the
//! reverse with the very same types, so the two cannot drift apart. Field names are
//! `snake_case` and unknown fields are ignored, as `../shared/spec/signaling-protocol.md`
//! requires.
//!
//! Parsing is two-step ([`ClientMessage::parse`]) so that every failure maps to the
//! right error code: text that is not a JSON object is `bad_json`, an unknown `type` is
//! `unknown_type`, and a known type with a missing or invalid field is `bad_field`.

pub mod api;

use serde::{Deserialize, Serialize};

/// Protocol version carried in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest room name, display name or registered name, in characters (after trimming).
pub const MAX_NAME_CHARS: usize = 64;

/// One entry of an `RTCIceServer` list, as browsers and webrtc-rs take it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// A trickle ICE candidate (`RTCIceCandidateInit` in snake_case).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceCandidate {
    pub candidate: String,
    #[serde(default)]
    pub sdp_mid: Option<String>,
    #[serde(default)]
    pub sdp_mline_index: Option<u16>,
    /// Optional extension (not in protocol v1's table): the ICE ufrag the candidate belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_fragment: Option<String>,
}

/// A member already in a room, as listed in `joined.peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer_id: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// Why a member left a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// The member sent `leave` (or joined another room).
    Left,
    /// The member's connection ended without a `leave`.
    Disconnected,
}

/// Why a room ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomEndReason {
    HostEnded,
    Expired,
}

/// Why a direct call will not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallRejectReason {
    Rejected,
    NoAnswer,
    Busy,
    Offline,
}

/// The `code` of an `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    BadField,
    TooLarge,
    RateLimited,
    NameTaken,
    NotInCall,
    NotHost,
    UnknownCall,
    NotStarted,
    RoomEnded,
    /// A `resume` was refused (unknown room or peer, wrong token, grace over, not away).
    ResumeFailed,
    /// The server cannot do it now: in cluster mode, Redis is unreachable. Nothing
    /// changed; trying again later may work.
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadField => "bad_field",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::NotInCall => "not_in_call",
            ErrorCode::NotHost => "not_host",
            ErrorCode::UnknownCall => "unknown_call",
            ErrorCode::NotStarted => "not_started",
            ErrorCode::RoomEnded => "room_ended",
            ErrorCode::ResumeFailed => "resume_failed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Client -> server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Join {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host_token: Option<String>,
    },
    Offer {
        sdp: String,
    },
    Answer {
        sdp: String,
    },
    /// `candidate: None` is end-of-candidates (JSON `null`); the field itself is required.
    Candidate {
        #[serde(deserialize_with = "required_nullable")]
        candidate: Option<IceCandidate>,
    },
    Leave,
    EndRoom,
    Register {
        name: String,
    },
    Call {
        to: String,
    },
    Accept {
        call_id: String,
    },
    Reject {
        call_id: String,
    },
    /// Instead of `join` on a new connection: take back the seat `peer_id` held in `room`
    /// before its connection dropped, proving it with the `resume_token` from `joined`.
    Resume {
        room: String,
        peer_id: String,
        resume_token: String,
    },
}

/// Server -> client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        protocol: u32,
        server: String,
        ice_servers: Vec<IceServer>,
    },
    Joined {
        room: String,
        peer_id: String,
        members: usize,
        host: bool,
        peers: Vec<PeerInfo>,
        /// Secret for `resume` after a dropped connection. Optional so that clients can
        /// still parse servers that predate it (or run with resume disabled).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_token: Option<String>,
    },
    PeerJoined {
        peer_id: String,
        #[serde(default)]
        name: Option<String>,
    },
    RoomFull {
        room: String,
        members: usize,
    },
    Offer {
        from: String,
        sdp: String,
    },
    Answer {
        from: String,
        sdp: String,
    },
    Candidate {
        from: String,
        candidate: Option<IceCandidate>,
    },
    PeerLeft {
        peer_id: String,
        reason: LeaveReason,
    },
    /// The partner's connection dropped without `leave`; its seat is kept for the resume
    /// grace. Either it resumes (and nothing more is said) or `peer_left` follows.
    PeerReconnecting {
        peer_id: String,
    },
    HostChanged {
        peer_id: String,
    },
    RoomEnded {
        room: String,
        reason: RoomEndReason,
    },
    Registered {
        name: String,
    },
    Ringing {
        call_id: String,
        to: String,
    },
    IncomingCall {
        call_id: String,
        from: String,
    },
    CallRejected {
        call_id: String,
        reason: CallRejectReason,
    },
    CallCancelled {
        call_id: String,
    },
    Error {
        code: ErrorCode,
        message: String,
        /// Only with `not_started`: when the scheduled room opens (RFC 3339).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        starts_at: Option<String>,
    },
}

impl ServerMessage {
    /// The fixed part of [`ServerMessage::weight`].
    pub const WEIGHT_BASE: usize = 256;

    /// About the bytes this message takes while queued (its JSON is built only when it is
    /// sent): its long strings plus a fixed allowance for the rest. What bounds each
    /// connection's queue in bytes (`--send-queue-bytes`).
    pub fn weight(&self) -> usize {
        Self::WEIGHT_BASE
            + match self {
                ServerMessage::Offer { sdp, .. } | ServerMessage::Answer { sdp, .. } => sdp.len(),
                ServerMessage::Candidate {
                    candidate: Some(c), ..
                } => c.candidate.len(),
                ServerMessage::Error { message, .. } => message.len(),
                _ => 0,
            }
    }

    /// An `error` message without extra fields.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
            starts_at: None,
        }
    }

    /// Serializes to the JSON text of one WebSocket frame.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail (no maps with non-string keys).
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"serialization failed"}"#.to_owned()
        })
    }
}

/// A client message that could not be accepted, with the error code to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ParseError {
    pub code: ErrorCode,
    pub message: String,
}

impl ParseError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ParseError {
            code,
            message: message.into(),
        }
    }
}

/// Only the `type` of a message; everything else is skipped.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

const CLIENT_TYPES: &[&str] = &[
    "join",
    "offer",
    "answer",
    "candidate",
    "leave",
    "end_room",
    "register",
    "call",
    "accept",
    "reject",
    "resume",
];

impl ClientMessage {
    /// Parses one text frame, classifying failures by error code.
    pub fn parse(text: &str) -> Result<ClientMessage, ParseError> {
        // A derived struct would also accept a JSON array; the protocol wants an object.
        if !text.trim_start().starts_with('{') {
            return Err(ParseError::new(
                ErrorCode::BadJson,
                "a message must be a JSON object",
            ));
        }
        let envelope: Envelope<'_> = serde_json::from_str(text).map_err(|e| {
            // Valid JSON whose `type` is not a string is a field error, not a syntax error.
            if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
                ParseError::new(ErrorCode::BadField, "`type` must be a string")
            } else {
                ParseError::new(ErrorCode::BadJson, format!("invalid JSON: {e}"))
            }
        })?;
        let kind = envelope
            .kind
            .ok_or_else(|| ParseError::new(ErrorCode::BadField, "missing field `type`"))?;
        if !CLIENT_TYPES.contains(&kind.as_ref()) {
            return Err(ParseError::new(
                ErrorCode::UnknownType,
                format!("unknown message type `{}`", truncate(&kind, 64)),
            ));
        }
        serde_json::from_str::<ClientMessage>(text).map_err(|e| {
            ParseError::new(
                ErrorCode::BadField,
                format!("{kind}: {}", strip_position(&e.to_string())),
            )
        })
    }

    /// The wire name of this message's type.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessage::Join { .. } => "join",
            ClientMessage::Offer { .. } => "offer",
            ClientMessage::Answer { .. } => "answer",
            ClientMessage::Candidate { .. } => "candidate",
            ClientMessage::Leave => "leave",
            ClientMessage::EndRoom => "end_room",
            ClientMessage::Register { .. } => "register",
            ClientMessage::Call { .. } => "call",
            ClientMessage::Accept { .. } => "accept",
            ClientMessage::Reject { .. } => "reject",
            ClientMessage::Resume { .. } => "resume",
        }
    }

    /// Serializes to the JSON text of one WebSocket frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl std::str::FromStr for ServerMessage {
    type Err = serde_json::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_str(s)
    }
}

/// Deserializes an `Option` that must be present (may be `null`). serde would otherwise
/// treat a missing `Option` field as `None`.
fn required_nullable<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

/// serde_json appends " at line 1 column 42"; that is noise for a one-line message.
fn strip_position(message: &str) -> &str {
    message.split(" at line ").next().unwrap_or(message)
}

fn truncate(s: &str, max_chars: usize) -> &str {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Checks a room, display or registered name: 1-64 characters after trimming and no
/// control characters. Returns the trimmed name.
pub fn validate_name<'a>(field: &str, value: &'a str) -> Result<&'a str, ParseError> {
    let trimmed = value.trim();
    let chars = trimmed.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(ParseError::new(
            ErrorCode::BadField,
            format!("`{field}` must be 1-{MAX_NAME_CHARS} characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ParseError::new(
            ErrorCode::BadField,
            format!("`{field}` must not contain control characters"),
        ));
    }
    Ok(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_classifies_errors() {
        let code = |t: &str| ClientMessage::parse(t).unwrap_err().code;
        assert_eq!(code("not json"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(code("\"join\""), ErrorCode::BadJson);
        assert_eq!(code("{\"type\":"), ErrorCode::BadJson);
        assert_eq!(code("{}"), ErrorCode::BadField);
        assert_eq!(code("{\"type\":\"dance\"}"), ErrorCode::UnknownType);
        assert_eq!(code("{\"type\":7}"), ErrorCode::BadField);
        assert_eq!(code("{\"type\":\"join\"}"), ErrorCode::BadField);
        assert_eq!(code("{\"type\":\"join\",\"room\":5}"), ErrorCode::BadField);
        assert_eq!(code("{\"type\":\"candidate\"}"), ErrorCode::BadField);
        let e = ClientMessage::parse("{\"type\":\"offer\"}").unwrap_err();
        assert!(e.message.contains("sdp"), "{}", e.message);
    }

    #[test]
    fn parse_accepts_spec_examples_and_ignores_unknown_fields() {
        let m =
            ClientMessage::parse(r#"{"type":"join","room":"r","name":"Ann","extra":{"x":[1]}}"#)
                .unwrap();
        assert_eq!(
            m,
            ClientMessage::Join {
                room: "r".into(),
                name: Some("Ann".into()),
                host_token: None
            }
        );
        let m = ClientMessage::parse(r#"{"type":"candidate","candidate":null}"#).unwrap();
        assert_eq!(m, ClientMessage::Candidate { candidate: None });
        let m = ClientMessage::parse(
            r#"{"type":"candidate","candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 5 typ host","sdp_mid":null,"sdp_mline_index":0}}"#,
        )
        .unwrap();
        match m {
            ClientMessage::Candidate { candidate: Some(c) } => {
                assert_eq!(c.sdp_mid, None);
                assert_eq!(c.sdp_mline_index, Some(0));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ClientMessage::parse(r#"{"type":"leave"}"#).unwrap(),
            ClientMessage::Leave
        );
    }

    #[test]
    fn server_messages_round_trip() {
        let msgs = [
            ServerMessage::PeerLeft {
                peer_id: "p".into(),
                reason: LeaveReason::Disconnected,
            },
            ServerMessage::error(ErrorCode::NotInCall, "x"),
            ServerMessage::CallRejected {
                call_id: "c".into(),
                reason: CallRejectReason::NoAnswer,
            },
        ];
        for m in msgs {
            let json = m.to_json();
            assert_eq!(json.parse::<ServerMessage>().unwrap(), m);
        }
        assert_eq!(
            ServerMessage::PeerLeft {
                peer_id: "p".into(),
                reason: LeaveReason::Disconnected
            }
            .to_json(),
            r#"{"type":"peer_left","peer_id":"p","reason":"disconnected"}"#
        );
    }

    #[test]
    fn resume_messages_are_additive() {
        let m = ClientMessage::parse(
            r#"{"type":"resume","room":"r","peer_id":"p","resume_token":"t"}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ClientMessage::Resume {
                room: "r".into(),
                peer_id: "p".into(),
                resume_token: "t".into()
            }
        );
        assert_eq!(m.kind(), "resume");
        let e = ClientMessage::parse(r#"{"type":"resume","room":"r","peer_id":"p"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadField);
        // A `joined` from a server without resume still parses, and one without a token
        // is written without the field.
        let old =
            r#"{"type":"joined","room":"r","peer_id":"p","members":1,"host":true,"peers":[]}"#;
        let joined = old.parse::<ServerMessage>().unwrap();
        assert!(matches!(
            joined,
            ServerMessage::Joined {
                resume_token: None,
                ..
            }
        ));
        assert_eq!(joined.to_json(), old);
        assert_eq!(
            ServerMessage::PeerReconnecting {
                peer_id: "p".into()
            }
            .to_json(),
            r#"{"type":"peer_reconnecting","peer_id":"p"}"#
        );
        assert_eq!(ErrorCode::ResumeFailed.as_str(), "resume_failed");
        assert_eq!(
            serde_json::to_string(&ErrorCode::ResumeFailed).unwrap(),
            r#""resume_failed""#
        );
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(validate_name("room", "  a b ").unwrap(), "a b");
        assert!(validate_name("room", "   ").is_err());
        assert!(validate_name("room", &"x".repeat(65)).is_err());
        assert!(validate_name("room", &"é".repeat(64)).is_ok());
        assert!(validate_name("room", "a\u{7}b").is_err());
    }
}
