//! Calls: the state machine ([`state`]) and, later in this module, the session that
//! drives it with a signaling connection and a peer connection.

pub mod state;

pub use state::{Action, Call, CallState, EndReason, Event, PeerState, Role};
