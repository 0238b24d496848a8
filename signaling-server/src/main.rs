//! `signaling-server`: run Duet's signaling server until Ctrl-C or SIGTERM.

use std::process::ExitCode;

use clap::Parser as _;
use signaling_server::{Config, Server, init_logging};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    init_logging(&config.log);
    let server = match Server::start(config).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("signaling-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "signaling-server listening on {} (WebSocket {})",
        server.http_url(),
        server.ws_url()
    );
    wait_for_signal().await;
    server.stop().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
