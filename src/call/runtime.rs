//! `PromptRuntime`: the async runtime handed to webrtc-rs, tokio's with one change: the
//! peer connection's driver never sleeps longer than [`MAX_SLEEP`].
//!
//! Why: webrtc 0.21.1's driver loop (`peer_connection/driver.rs`) writes, then handles
//! events, then reads, then sleeps until its next timer. Data arriving through a TURN
//! relay is handed to the connection in the read step, after that pass's writes, and what
//! the connection writes back to a relay is queued in the TURN client after its queue was
//! drained; both leave at the next wake-up. Once ICE is up the next timer is the ICE
//! agent's (200 ms), so each of the six DTLS crossings of a relayed handshake waited
//! 200-600 ms: 1.9 s to the first relayed frame against 50 ms direct. Waking at least
//! every few milliseconds flushes what is waiting (measured in a two-peer probe through
//! the embedded relay: connected in 113-145 ms instead of 1.6-2.2 s; the data channel
//! opens in ~0.2 s instead of ~3 s).
//!
//! The driver recomputes its deadline on every pass and the data channel's 50 ms
//! back-pressure wait re-checks on wake-up, so a shorter sleep is only an earlier check,
//! never an early action. Cost: up to 200 extra passes a second per connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, Runtime,
};

/// The longest the driver sleeps.
pub const MAX_SLEEP: Duration = Duration::from_millis(5);

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// See the module docs.
#[derive(Debug)]
pub struct PromptRuntime {
    inner: Arc<dyn Runtime>,
}

impl PromptRuntime {
    /// Wraps webrtc-rs's default (tokio) runtime; None if there is none (not inside a
    /// tokio runtime): the peer connection then uses its own default.
    pub fn new() -> Option<PromptRuntime> {
        webrtc::runtime::default_runtime().map(|inner| PromptRuntime { inner })
    }
}

impl Runtime for PromptRuntime {
    fn spawn(&self, future: Boxed<'static, ()>) -> Box<dyn JoinHandle> {
        self.inner.spawn(future)
    }

    fn spawn_reactor(&self, n: usize, future: Boxed<'static, ()>) -> Box<dyn JoinHandle> {
        self.inner.spawn_reactor(n, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        self.inner.wrap_udp_socket(socket)
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        self.inner.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        addr: SocketAddr,
    ) -> Boxed<'a, io::Result<Arc<dyn AsyncTcpStream>>> {
        self.inner.connect_tcp(addr)
    }

    fn resolve_host<'a>(&'a self, host: &'a str) -> Boxed<'a, io::Result<Vec<SocketAddr>>> {
        self.inner.resolve_host(host)
    }

    fn sleep(&self, duration: Duration) -> Boxed<'static, ()> {
        self.inner.sleep(duration.min(MAX_SLEEP))
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        self.inner.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        self.inner.block_on(future)
    }

    fn yield_now(&self) -> Boxed<'static, ()> {
        self.inner.yield_now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sleeps_are_capped_and_short_ones_kept() {
        let runtime = PromptRuntime::new().expect("inside tokio");
        let start = tokio::time::Instant::now();
        runtime.sleep(Duration::from_secs(10)).await;
        assert!(start.elapsed() < Duration::from_secs(1));
        let start = tokio::time::Instant::now();
        runtime.sleep(Duration::from_millis(2)).await;
        assert!(start.elapsed() >= Duration::from_millis(2));
    }
}
