//! Duet: a two-person peer-to-peer video call client.
//!
//! # Layout
//! - [`signaling`]: the wire messages (re-exported from `signaling-server`, defined once)
//!   and the embedded-server helper the app uses when no server is configured.
//! - [`call`]: the call as a sans-I/O state machine (`CallState`, events in, actions out).
//! - [`media`]: frames, sources, codecs (openh264, Opus) and sinks; each stage a trait
//!   with real and synthetic implementations.
//! - [`ui`]: the desktop window (egui/eframe): lobby and call view.

pub mod call;
pub mod media;
pub mod signaling;
pub mod ui;
