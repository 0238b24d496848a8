//! `duet`: the Duet video call app.
//!
//! Today it can run the signaling server embedded (`duet server`); the desktop window and
//! the headless call command are being built (see the issues).

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Duet: two-person peer-to-peer video calls.
#[derive(Debug, Parser)]
#[command(name = "duet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the signaling server in this process (what the app does when none answers).
    Server {
        /// Address to listen on.
        #[arg(long, default_value = duet::signaling::DEFAULT_SERVER)]
        listen: SocketAddr,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    signaling_server::init_logging("info");
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Server { listen }) => match duet::signaling::start_embedded(listen).await {
            Ok(server) => {
                eprintln!("duet: signaling server on {}", server.ws_url());
                let _ = tokio::signal::ctrl_c().await;
                server.stop().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("duet: {e}");
                ExitCode::FAILURE
            }
        },
        None => {
            eprintln!(
                "duet: the desktop window is not built yet. Run `duet server` to start the \
                 signaling server, or `duet --help`."
            );
            ExitCode::from(2)
        }
    }
}
