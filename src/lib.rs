//! Duet: a two-person peer-to-peer video call client.
//!
//! # Layout
//! - [`signaling`]: the wire messages (re-exported from `signaling-server`, defined once)
//!   and the embedded-server helper the app uses when no server is configured.
//! - [`call`]: the call as a sans-I/O state machine (`call::Call`: events and time in,
//!   actions and deadlines out, including media start, chat, camera/microphone, ICE
//!   restart and giving up), the session that executes it with a peer connection
//!   (congestion control, our pacer, local bridges for TURN over TCP/TLS) and media
//!   pipelines, the report, and presence (being reachable by name for direct calls).
//!   `call`'s own doc lists its files.
//! - [`media`]: frames, sources, codecs (H.264 with openh264 and VP8 with libvpx, both
//!   with run-time rate changes, behind `VideoEncoder`/`VideoDecoder`; Opus), the
//!   receive-side frame assembler (H.264 and VP8; loss repair decisions), and sinks; each
//!   stage a trait with real and synthetic implementations.
//! - [`process`]: CPU time and peak memory of this process, for reports and benchmarks.
//! - [`meetings`]: creating meetings (now or scheduled) through the server's HTTP API.
//! - [`tls`]: rustls for `wss://`, `https://` and `turns:` (system roots plus
//!   `--ca-file`), and certificate errors in words.
//! - [`ui`]: the desktop window (egui/eframe): lobby (devices, preview, meetings, direct
//!   calls) and call view (video, controls, chat, stats).

pub mod call;
pub mod media;
pub mod meetings;
pub mod process;
pub mod signaling;
pub mod tls;
pub mod ui;
