//! Duet's signaling server: rooms of two, offer/answer/candidate relay, direct calls by
//! name with ringing, host-only room termination, room expiry, seats that survive a
//! dropped connection (`resume`), scheduled rooms through an HTTP API (stored in
//! SQLite, or in Redis in cluster mode), time-limited TURN credentials, and several
//! instances acting as one service through Redis (`--redis`). The wire contract is
//! `shared/spec/signaling-protocol.md`; what this code actually does is written up in
//! `docs/PROTOCOL.md`.
//!
//! # Layout
//! One folder per layer. Dependencies point one way: `server` builds each layer's narrow
//! context and nothing imports it; `ws` and `http` use `state`, `state` uses `core`,
//! `core` uses `protocol`, never the other way round.
//! - [`protocol`]: the wire types. The WebSocket messages as serde types (shared with the
//!   Duet client) and [`protocol::api`], the HTTP API's request and response bodies.
//! - [`core`]: the rules, without I/O, clocks passed in. [`core::rooms`] is the room,
//!   meeting and direct-call state machine, split by job (rooms; meetings; direct
//!   calls; seats kept for `resume`); [`core::clock`] the two clocks and RFC 3339; [`core::rate_limit`] the token
//!   bucket and the per-address connection counts.
//! - [`state`]: where the state lives and how messages reach connections.
//!   [`state::hub`]: the in-process backend, the state machine behind one mutex plus each
//!   connection's outgoing queue. [`state::cluster`]: the Redis backend (`--redis`):
//!   rooms, meetings, names, calls and kept seats in Redis, changed by Lua scripts, with
//!   delivery to other instances through pub/sub (its `wire` module: batched binary
//!   records carrying each message's JSON as built once by the sender).
//!   [`state::store`]: SQLite persistence of the in-process backend's meetings. Both
//!   backends answer the HTTP API through one trait, [`state::Meetings`].
//! - [`ws`]: the WebSocket: [`ws::framing`] (RFC 6455 frames, skipping oversized
//!   messages) and the connection task (limits, pings, reading, writing), which sees only
//!   its `WsContext`.
//! - `http` (private): the routes, the HTTP API handlers, their JSON errors and
//!   auth, the OpenAPI document, and the browser client (`/`, `/r/{room_id}`, `/app/...`)
//!   served with a strict CSP; the handlers see only their `ApiContext`.
//! - [`turn`]: TURN REST credentials and the `ice_servers` list, and [`turn::server`],
//!   the optional embedded STUN/TURN server (UDP, with TCP and TLS fronts bridged to it)
//!   with peer-address filtering, quotas and a relay port range; its `framing` module
//!   (STUN/ChannelData over a stream) is shared with the client's TURN bridge.
//! - [`server`]: start and stop. It builds every layer's context from the [`config`]
//!   (command-line flags, also the embedding API's settings), accepts connections (plain
//!   or [`tls`], reloadable), and runs the sweeper. Nothing imports it back.
//! - [`ids`]: random, read-aloud-friendly identifiers; secret hashing and comparison.
//! - `fuzzing` (hidden): the entry points of the fuzz targets in `fuzz/`.
//!
//! `api`, `clock`, `store` and `turn_server` at the crate root are the old paths of
//! [`protocol::api`], [`core::clock`], [`state::store`] and [`turn::server`], kept for the
//! Duet client.
//!
//! # Embedding
//! ```no_run
//! # async fn demo() -> Result<(), signaling_server::StartError> {
//! let server = signaling_server::Server::start(signaling_server::Config::ephemeral()).await?;
//! println!("clients connect to {}", server.ws_url());
//! server.stop().await;
//! # Ok(()) }
//! ```

#[doc(hidden)]
pub mod fuzzing;
mod http;

pub mod config;
pub mod core;
pub mod ids;
pub mod protocol;
pub mod server;
pub mod state;
pub mod tls;
pub mod turn;
pub mod ws;

pub use self::core::clock;
pub use config::Config;
pub use protocol::api;
pub use server::{Server, StartError};
pub use state::store;
pub use turn::server as turn_server;

/// Sets up `tracing` output to stderr with `filter` (RUST_LOG wins when set). For binaries.
pub fn init_logging(filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
