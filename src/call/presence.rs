//! `Presence`: being reachable by name. A signaling connection that holds a registered
//! name and reports incoming calls, so the lobby can ring and offer Accept / Decline.
//!
//! Accepting hands the very same connection to a session ([`Presence::into_connection`]
//! and [`super::start_on`]): the server rang *this* connection, so only it can accept.

use std::time::Duration;

use tokio::sync::mpsc;

use super::config::Connection;
use crate::media::picture::Notify;
use crate::signaling::protocol::{ClientMessage, ErrorCode, IceServer, ServerMessage};
use crate::signaling::{Client, Incoming};

/// What happened on a signed-in connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    /// Someone is calling.
    IncomingCall { call_id: String, from: String },
    /// The caller gave up (or the call timed out) before it was answered.
    CallCancelled { call_id: String },
    /// The connection ended; the name is no longer held.
    Lost { detail: String },
}

/// A signed-in connection.
pub struct Presence {
    name: String,
    client: Client,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    ice_servers: Vec<IceServer>,
}

/// Why signing in did not work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignInError {
    #[error("{0}")]
    Unreachable(String),
    #[error("the name {0:?} is already signed in elsewhere")]
    NameTaken(String),
    #[error("the server refused the name: {0}")]
    Refused(String),
    #[error("the server did not answer the sign-in in time")]
    Timeout,
}

impl Presence {
    /// Connects and claims `name`; `notify` is called whenever something arrives (so a
    /// UI can sleep until then).
    pub async fn sign_in(
        server: &str,
        name: &str,
        notify: Option<Notify>,
    ) -> Result<Presence, SignInError> {
        let (raw_tx, mut raw_rx) = mpsc::unbounded_channel();
        let client = Client::connect(server, raw_tx)
            .await
            .map_err(|e| SignInError::Unreachable(e.to_string()))?;
        client
            .send(ClientMessage::Register {
                name: name.to_owned(),
            })
            .map_err(|e| SignInError::Unreachable(e.to_string()))?;
        let mut ice_servers = Vec::new();
        let wait = async {
            loop {
                match raw_rx.recv().await {
                    Some(Incoming::Message(ServerMessage::Welcome { ice_servers: i, .. })) => {
                        ice_servers = i;
                    }
                    Some(Incoming::Message(ServerMessage::Registered { .. })) => return Ok(()),
                    Some(Incoming::Message(ServerMessage::Error { code, message, .. })) => {
                        return Err(if code == ErrorCode::NameTaken {
                            SignInError::NameTaken(name.to_owned())
                        } else {
                            SignInError::Refused(message)
                        });
                    }
                    Some(Incoming::Message(_)) => {}
                    Some(Incoming::Closed { detail }) => {
                        return Err(SignInError::Unreachable(detail));
                    }
                    None => return Err(SignInError::Unreachable("connection closed".into())),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .map_err(|_| SignInError::Timeout)??;
        // From here on, wake the UI with every message.
        let (tx, incoming) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = raw_rx.recv().await {
                if tx.send(m).is_err() {
                    break;
                }
                if let Some(n) = &notify {
                    n.notify();
                }
            }
        });
        Ok(Presence {
            name: name.to_owned(),
            client,
            incoming,
            ice_servers,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What arrived since the last call; never waits.
    pub fn poll(&mut self) -> Vec<PresenceEvent> {
        let mut events = Vec::new();
        while let Ok(m) = self.incoming.try_recv() {
            events.extend(Self::event(m));
        }
        events
    }

    /// Waits for the next event (for callers without a UI loop, e.g. the headless
    /// command answering a call).
    pub async fn next_event(&mut self) -> PresenceEvent {
        loop {
            let Some(m) = self.incoming.recv().await else {
                return PresenceEvent::Lost {
                    detail: "connection closed".into(),
                };
            };
            if let Some(e) = Self::event(m) {
                return e;
            }
        }
    }

    fn event(m: Incoming) -> Option<PresenceEvent> {
        match m {
            Incoming::Message(ServerMessage::IncomingCall { call_id, from }) => {
                Some(PresenceEvent::IncomingCall { call_id, from })
            }
            Incoming::Message(ServerMessage::CallCancelled { call_id }) => {
                Some(PresenceEvent::CallCancelled { call_id })
            }
            Incoming::Message(_) => None,
            Incoming::Closed { detail } => Some(PresenceEvent::Lost { detail }),
        }
    }

    /// Declines an incoming call (the caller hears "declined").
    pub fn decline(&self, call_id: &str) {
        let _ = self.client.send(ClientMessage::Reject {
            call_id: call_id.to_owned(),
        });
    }

    /// The connection, for a session that accepts a call or dials from it.
    pub fn into_connection(self) -> Connection {
        Connection {
            client: self.client,
            incoming: self.incoming,
            ice_servers: self.ice_servers,
            registered: true,
        }
    }
}
