//! Calls: the sans-I/O state machine ([`state`]), the WebRTC peer connection
//! ([`peer`]), the media pipelines and their measurements ([`media`]), the session
//! that drives them all ([`session`]), and being reachable by name for direct calls
//! ([`presence`]).

pub mod media;
pub mod peer;
pub mod presence;
pub mod session;
pub mod state;

pub use presence::{Presence, PresenceEvent};
pub use session::{
    AudioInput, ChatLine, Command, Connection, Live, Report, SessionConfig, SessionHandle, Target,
    VideoInput, start, start_on,
};
pub use state::{Action, Call, CallState, EndReason, Event, PeerState, Role};
