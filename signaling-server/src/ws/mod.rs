//! The WebSocket: [`framing`] (RFC 6455 frames) and the task that runs one connection.

pub(crate) mod connection;
pub mod framing;
