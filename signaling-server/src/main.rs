//! `signaling-server`: run Duet's signaling server until Ctrl-C or SIGTERM, then stop
//! within `--shutdown-grace` plus a moment, whatever clients are doing.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use signaling_server::{Config, Server, init_logging};

fn main() -> ExitCode {
    let config = Config::parse();
    init_logging(&config.log);
    let runtime = if config.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if config.threads > 1 {
            builder.worker_threads(config.threads);
        }
        builder.enable_all().build()
    };
    match runtime {
        Ok(runtime) => {
            let code = runtime.block_on(serve(config));
            // `Server::stop` has ended every task it knows; do not let anything else
            // left on the runtime hold up the exit.
            runtime.shutdown_timeout(Duration::from_secs(1));
            code
        }
        Err(e) => {
            eprintln!("signaling-server: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> ExitCode {
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
