//! Calls: the sans-I/O state machine ([`state`]), the WebRTC peer connection
//! ([`peer`]), the media pipelines and their measurements ([`media`]), and the session
//! that drives them all ([`session`]).

pub mod media;
pub mod peer;
pub mod session;
pub mod state;

pub use session::{AudioInput, Command, Report, SessionConfig, SessionHandle, VideoInput, start};
pub use state::{Action, Call, CallState, EndReason, Event, PeerState, Role};
