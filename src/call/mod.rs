//! Calls. Layout, from decisions to I/O:
//! - [`state`]: the call as a sans-I/O state machine (`Call`: events in, actions out).
//! - [`config`]: what a session is asked to do (target, sources, settings).
//! - [`session`]: the executor: one task that turns signaling, peer and user input into
//!   events for `Call` and carries out its actions.
//! - [`handle`]: how the program sees a running call (`SessionHandle`: commands in, `Snapshot`s
//!   of state, `Live` information and media figures out, through one `watch`).
//! - [`peer`]: the WebRTC peer connection and its interceptor chain.
//! - [`turn_bridge`]: TURN over TCP/TLS for it (webrtc-rs speaks UDP only): local UDP
//!   bridges to `turn:...?transport=tcp` and `turns:` servers.
//! - [`estimator`]: the congestion controller's algorithm (GCC's delay half, libwebrtc's
//!   loss rule).
//! - [`pacer`]: the send pacer in that chain (audio first, video at 2.5x the estimate,
//!   the estimate capped by what is really sent).
//! - [`repair`]: loss repair in that chain: FEC sent as the measured loss calls for, and
//!   the RTX and FEC streams counted by transport-wide congestion control.
//! - [`runtime`]: the async runtime given to the peer connection (tokio's, with its
//!   driver woken every few ms: relayed traffic otherwise waits for the next timer).
//! - [`pipelines`]: the media pipelines (encode/send, receive/assemble/decode) and what
//!   they measure.
//! - [`report`]: the JSON report of a finished call.
//! - [`presence`]: being reachable by name for direct calls.

pub mod config;
pub mod estimator;
pub mod handle;
pub mod pacer;
pub mod peer;
pub mod pipelines;
pub mod presence;
pub mod repair;
pub mod report;
pub mod runtime;
pub mod session;
pub mod state;
pub mod turn_bridge;

pub use config::{AudioInput, Connection, SessionConfig, Target, VideoInput};
pub use handle::{ChatLine, Command, Live, MediaView, SessionHandle, Snapshot};
pub use presence::{Presence, PresenceEvent};
pub use report::Report;
pub use session::{start, start_on};
pub use state::{Action, Call, CallState, EndReason, Event, PeerState, Role};

/// Sleeps until `at`; forever when there is none (for a `select!` arm that is off then).
/// The call's deadlines are std instants (the state machine and the assembler are
/// sans-I/O and take no tokio types).
pub(crate) async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
