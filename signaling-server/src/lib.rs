//! Duet's signaling server: rooms of two, offer/answer/candidate relay, direct calls by
//! name with ringing, host-only room termination, room expiry, seats that survive a
//! dropped connection (`resume`), scheduled rooms through an HTTP API (stored in
//! SQLite), and time-limited TURN credentials. The wire contract is `shared/spec/signaling-protocol.md`; what this
//! code actually does is written up in `docs/PROTOCOL.md`.
//!
//! # Layout
//! - [`protocol`]: the JSON messages as serde types, shared with the Duet client.
//! - [`api`]: the HTTP API's request and response bodies, shared with clients too.
//! - [`config`]: command-line flags and defaults (also the embedding API's settings).
//! - [`server`]: start/stop, HTTP routes and the WebSocket upgrade.
//! - `http_api` (private): the HTTP API handlers, JSON errors, auth, OpenAPI document.
//! - `web` (private): the browser client (`/`, `/r/{room_id}`, `/app/...`): HTML, CSS and
//!   JavaScript modules from `web/`, compiled in, served with a strict CSP.
//! - [`connection`] (private): one task per WebSocket; limits, pings, reading, writing.
//! - [`websocket`]: RFC 6455 frame decoding/encoding that can skip oversized messages.
//! - [`hub`]: the room state behind one mutex, and delivery to connection queues.
//! - [`cluster`]: cluster mode (`--redis`): rooms, names, ringing calls and kept seats in Redis
//!   (changed by Lua scripts), delivery to members on other instances through Redis
//!   pub/sub; a routing layer in front of the hub, which stays the single-process default.
//! - [`rooms`]: the room, meeting and direct-call state machine, without any I/O,
//!   including the seats of dropped members kept for `resume` and their queues.
//! - [`clock`]: monotonic and wall-clock time passed into it; RFC 3339 helpers.
//! - [`store`]: SQLite persistence of meetings on a thread of its own.
//! - [`rate_limit`]: the token bucket (per WebSocket connection, per HTTP client address).
//! - [`tls`]: optional HTTPS/WSS on the same port (`--tls-cert`, `--tls-key`), reloadable.
//! - [`turn`]: TURN REST credentials and the `ice_servers` list.
//! - [`turn_server`]: the optional embedded STUN/TURN server (UDP, with optional TCP and
//!   TLS fronts bridged to it) that checks those credentials, with peer-address
//!   filtering, quotas and a relay port range; its `framing` module (STUN/ChannelData over
//!   a stream) is shared with the client's TURN bridge.
//! - [`ids`]: random, read-aloud-friendly identifiers; secret hashing and comparison.
//! - `fuzzing` (hidden): the entry points of the fuzz targets in `fuzz/`.
//!
//! # Embedding
//! ```no_run
//! # async fn demo() -> Result<(), signaling_server::StartError> {
//! let server = signaling_server::Server::start(signaling_server::Config::ephemeral()).await?;
//! println!("clients connect to {}", server.ws_url());
//! server.stop().await;
//! # Ok(()) }
//! ```

mod connection;
#[doc(hidden)]
pub mod fuzzing;
mod http_api;
mod web;

pub mod api;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod hub;
pub mod ids;
pub mod protocol;
pub mod rate_limit;
pub mod rooms;
pub mod server;
pub mod store;
pub mod tls;
pub mod turn;
pub mod turn_server;
pub mod websocket;

pub use config::Config;
pub use server::{Server, StartError};

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
