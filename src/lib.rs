//! Duet: a two-person peer-to-peer video call client.
//!
//! # Layout
//! - [`signaling`]: the wire messages (re-exported from `signaling-server`, defined once)
//!   and the embedded-server helper the app uses when no server is configured.
//!
//! The call engine, media pipeline and desktop UI arrive with their issues.

pub mod signaling;
