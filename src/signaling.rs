//! Talking to a signaling server.
//!
//! The protocol types are the server crate's own ([`protocol`]), so client and server
//! cannot disagree about the wire format.

pub use signaling_server::protocol;

use std::net::SocketAddr;

/// The address the app uses when no server is configured.
pub const DEFAULT_SERVER: &str = "127.0.0.1:8787";

/// Starts the signaling server in-process on `addr`, as the app does when nothing
/// answers at the default address.
pub async fn start_embedded(
    addr: SocketAddr,
) -> Result<signaling_server::Server, signaling_server::StartError> {
    let config = signaling_server::Config {
        listen: addr,
        ..signaling_server::Config::default()
    };
    signaling_server::Server::start(config).await
}
