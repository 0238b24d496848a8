//! `duet`: the Duet video call app.
//!
//! - `duet`: the desktop window (lobby, calls); `--room NAME --auto-call` calls at once.
//! - `duet call --headless ...`: make a real call without a window and write a JSON report.
//! - `duet server`: run the signaling server (and optionally STUN/TURN) in this process.
//! - `duet devices`: list cameras, microphones and speakers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use duet::call::{self, AudioInput, CallState, SessionConfig, VideoInput};
use duet::media::h264::EncoderSettings;
use duet::media::processing::ProcessingSettings;
use duet::signaling::protocol::IceServer;

/// Duet: two-person peer-to-peer video calls.
#[derive(Debug, Parser)]
#[command(name = "duet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    window: WindowArgs,
}

/// Options of the desktop window (`duet` without a subcommand).
#[derive(Debug, Args)]
struct WindowArgs {
    /// Signaling server (HOST:PORT, ws:// or wss:// URL); default: built in.
    #[arg(long)]
    server: Option<String>,
    /// Room to call into: a name, a meeting id or a join link.
    #[arg(long)]
    room: Option<String>,
    /// Your display name.
    #[arg(long)]
    name: Option<String>,
    /// Video to send: camera, camera:NAME (see `duet devices`), test-pattern or
    /// test-pattern:WIDTHxHEIGHT (default 640x360).
    #[arg(long)]
    video: Option<String>,
    /// Audio to send: mic, mic:NAME (see `duet devices`) or sine.
    #[arg(long)]
    audio: Option<String>,
    /// Join the room at start-up (for scripts and desktop shortcuts).
    #[arg(long)]
    auto_call: bool,
    /// Show the stats overlay (resolution, fps, bitrate, RTT, loss, path) in calls.
    #[arg(long)]
    stats: bool,
    /// Convert video to RGB on the CPU instead of in an OpenGL shader (for a driver
    /// that draws the video wrongly; it costs a few ms per picture).
    #[arg(long)]
    video_on_cpu: bool,
    /// The API key "New meeting" sends, for servers that require one to create meetings
    /// (remembered like the other lobby fields).
    #[arg(long, value_name = "KEY", env = "DUET_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(flatten)]
    network: NetworkArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a call. With --headless: no window; media from synthetic sources or files,
    /// a JSON report at the end.
    Call(Box<CallArgs>),
    /// Run the signaling server in this process (what the app does when none answers).
    ///
    /// Every flag of the standalone `signaling-server` works here too (rooms, limits,
    /// meetings database, API key, embedded STUN/TURN with --turn-listen ...).
    Server(Box<signaling_server::Config>),
    /// List the cameras, microphones and speakers this machine has.
    Devices,
}

#[derive(Debug, Args)]
struct CallArgs {
    /// Run without a window (required: `duet call` is the headless mode; the window is
    /// `duet --room NAME --auto-call`).
    #[arg(long)]
    headless: bool,
    /// Signaling server (HOST:PORT, ws:// or wss:// URL). Default: 127.0.0.1:8787,
    /// started in-process when nothing answers there.
    #[arg(long)]
    server: Option<String>,
    /// Room to join.
    #[arg(long, required_unless_present = "answer_as")]
    room: Option<String>,
    /// Instead of a room: sign in as NAME, wait (up to --wait) for a direct call to
    /// that name and accept the first one.
    #[arg(long, value_name = "NAME", conflicts_with = "room")]
    answer_as: Option<String>,
    /// Display name shown to the other person.
    #[arg(long)]
    name: Option<String>,
    /// Video to send: camera (the first camera; the test pattern if there is none),
    /// camera:NAME (as `duet devices` lists it), test-pattern, noisy-pattern, or a .y4m file.
    #[arg(long, default_value = "test-pattern")]
    video: String,
    /// Audio to send: mic (the default microphone; a 440 Hz tone if there is none),
    /// mic:NAME, sine, sine:FREQ, or a .wav file.
    #[arg(long, default_value = "sine")]
    audio: String,
    /// Width of the test pattern.
    #[arg(long, default_value_t = 640)]
    width: usize,
    /// Height of the test pattern.
    #[arg(long, default_value_t = 360)]
    height: usize,
    /// Frames per second of the test pattern.
    #[arg(long, default_value_t = 30.0)]
    fps: f64,
    /// Video bitrate in kbit/s.
    #[arg(long, default_value_t = 1500)]
    bitrate_kbps: u32,
    /// How long to stay in the call once connected (e.g. 10s, 2m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long to wait for the other person before giving up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    wait: Duration,
    /// Record the received video to this Y4M file.
    #[arg(long)]
    record_video: Option<PathBuf>,
    /// Play the received audio on the default speaker.
    #[arg(long)]
    speaker: bool,
    /// Echo cancellation, noise suppression and gain on the sent audio (default: on
    /// for a microphone, off for synthetic sources).
    #[arg(long, value_parser = ["on", "off"])]
    audio_processing: Option<String>,
    /// With audio processing on: echo cancellation (default on).
    #[arg(long, value_parser = ["on", "off"], default_value = "on")]
    echo_cancellation: String,
    /// With audio processing on: noise suppression (default on).
    #[arg(long, value_parser = ["on", "off"], default_value = "on")]
    noise_suppression: String,
    /// With audio processing on: automatic gain (default on).
    #[arg(long, value_parser = ["on", "off"], default_value = "on")]
    auto_gain: String,
    /// Record the received audio to this WAV file.
    #[arg(long)]
    record_audio: Option<PathBuf>,
    /// Write the JSON report here (default: standard output).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Send this chat message once connected (repeatable).
    #[arg(long)]
    chat: Vec<String>,
    /// The other side sends the test pattern at our --width x --height: measure quality
    /// (PSNR) against it.
    #[arg(long)]
    expect_pattern: bool,
    /// The expected pattern is the noisy one.
    #[arg(long)]
    expect_noisy: bool,
    /// Testing aid: the first offer or answer names a wrong DTLS fingerprint, so that
    /// connection's handshake fails and a fresh one must take over.
    #[arg(long, hide = true)]
    corrupt_first_fingerprint: bool,
    #[command(flatten)]
    network: NetworkArgs,
}

/// How calls reach the other person (window and headless alike).
#[derive(Debug, Clone, Args)]
struct NetworkArgs {
    /// Extra ICE server URL (stun:/turn:), added to the signaling server's list
    /// (repeatable).
    #[arg(long = "ice-server", value_name = "URL")]
    ice_servers: Vec<String>,
    /// Username for the --ice-server TURN URLs.
    #[arg(long)]
    turn_user: Option<String>,
    /// Password for the --ice-server TURN URLs.
    #[arg(long)]
    turn_pass: Option<String>,
    /// Only use TURN relays (never a direct path): hides your address from the other
    /// side, and tests the relay.
    #[arg(long)]
    relay_only: bool,
    /// Also trust the certificate authorities in this PEM file for wss://, https:// and
    /// turns: servers (a private CA); the system's roots are always trusted.
    #[arg(long, value_name = "PEM", env = "DUET_CA_FILE")]
    ca_file: Option<PathBuf>,
}

impl NetworkArgs {
    /// Makes `--ca-file` the trust of every wss:// and https:// connection of this process.
    fn apply_trust(&self) -> anyhow::Result<()> {
        if let Some(path) = &self.ca_file {
            duet::tls::set_default_trust(duet::tls::Trust::with_ca_file(path)?);
        }
        Ok(())
    }

    fn extra_ice_servers(&self) -> Vec<IceServer> {
        if self.ice_servers.is_empty() {
            return Vec::new();
        }
        vec![IceServer {
            urls: self.ice_servers.clone(),
            username: self.turn_user.clone(),
            credential: self.turn_pass.clone(),
        }]
    }
}

fn main() -> ExitCode {
    signaling_server::init_logging("warn");
    let cli = Cli::parse();
    let network = match &cli.command {
        Some(Command::Call(args)) => &args.network,
        _ => &cli.window.network,
    };
    if let Err(e) = network.apply_trust() {
        eprintln!("duet: --ca-file: {e:#}");
        return ExitCode::FAILURE;
    }
    if cli.command.is_none() {
        return run_window(cli.window);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("duet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Server(config)) => serve(*config).await,
            Some(Command::Call(args)) => run_call(*args).await,
            Some(Command::Devices) => {
                let devices = duet::media::Devices::list();
                let show = |kind: &str, names: &[String]| {
                    println!("{kind}:");
                    if names.is_empty() {
                        println!("  (none)");
                    }
                    for n in names {
                        println!("  {n}");
                    }
                };
                show("cameras", &devices.cameras);
                show("microphones", &devices.microphones);
                show("speakers", &devices.speakers);
                Ok(ExitCode::SUCCESS)
            }
            None => Ok(ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("duet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The desktop window. The tokio runtime runs the calls; the UI thread only draws.
fn run_window(args: WindowArgs) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("duet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = runtime.handle().clone();
    let options = eframe::NativeOptions {
        viewport: eframe::egui::ViewportBuilder::default()
            .with_title("Duet")
            .with_inner_size([1024.0, 680.0])
            .with_min_inner_size([640.0, 420.0])
            .with_icon(eframe::icon_data::from_png_bytes(duet::ui::ICON_PNG).unwrap_or_default()),
        ..Default::default()
    };
    let result = eframe::run_native(
        "Duet",
        options,
        Box::new(move |cc| {
            let mut pattern_size = None;
            let mut lobby: duet::ui::Lobby = cc
                .storage
                .and_then(|s| eframe::get_value(s, duet::ui::STORAGE_KEY))
                .unwrap_or_default();
            if let Some(v) = args.server {
                lobby.server = v;
            }
            if let Some(v) = args.room {
                lobby.room = v;
            }
            if let Some(v) = args.name {
                lobby.name = v;
            }
            if let Some(v) = args.api_key {
                lobby.api_key = v;
            }
            match args.video.as_deref() {
                Some("test-pattern") => lobby.video = duet::ui::VideoChoice::TestPattern,
                Some(other) if other.starts_with("test-pattern:") => {
                    let size = other
                        .trim_start_matches("test-pattern:")
                        .split_once('x')
                        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
                        .filter(|&(w, h): &(usize, usize)| {
                            (16..=3840).contains(&w)
                                && (16..=2160).contains(&h)
                                && w % 2 == 0
                                && h % 2 == 0
                        });
                    match size {
                        Some(size) => {
                            lobby.video = duet::ui::VideoChoice::TestPattern;
                            pattern_size = Some(size);
                        }
                        None => eprintln!(
                            "duet: --video {other}: use test-pattern:WIDTHxHEIGHT, even sizes up to 3840x2160"
                        ),
                    }
                }
                Some("camera") => lobby.video = duet::ui::VideoChoice::Camera(None),
                Some(other) => match other.strip_prefix("camera:") {
                    Some(n) => lobby.video = duet::ui::VideoChoice::Camera(Some(n.into())),
                    None => {
                        eprintln!("duet: --video {other}: use camera, camera:NAME or test-pattern")
                    }
                },
                None => {}
            }
            match args.audio.as_deref() {
                Some("sine") => lobby.audio = duet::ui::AudioChoice::Tone,
                Some("mic") => lobby.audio = duet::ui::AudioChoice::Microphone(None),
                Some(other) => match other.strip_prefix("mic:") {
                    Some(n) => lobby.audio = duet::ui::AudioChoice::Microphone(Some(n.into())),
                    None => eprintln!("duet: --audio {other}: use mic, mic:NAME or sine"),
                },
                None => {}
            }
            let mut app = duet::ui::App::new(handle, lobby);
            app.show_stats = args.stats;
            app.pattern_size = pattern_size;
            if cc.gl.is_some() && !args.video_on_cpu {
                app.draw_video_with_opengl();
            }
            app.extra_ice_servers = args.network.extra_ice_servers();
            app.relay_only = args.network.relay_only;
            if args.auto_call {
                app.call_on_start();
            }
            Ok(Box::new(duet::ui::DesktopApp { app }))
        }),
    );
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "duet: cannot open the window: {e}\n\
                 (no display? make a call without one: duet call --headless --room NAME)"
            );
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: signaling_server::Config) -> anyhow::Result<ExitCode> {
    let server = signaling_server::Server::start(config).await?;
    eprintln!("duet: signaling server on {}", server.ws_url());
    if let Some(turn) = server.turn_addr() {
        eprintln!("duet: STUN/TURN server on udp {turn}");
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    server.stop().await;
    Ok(ExitCode::SUCCESS)
}

fn video_input(args: &CallArgs) -> VideoInput {
    let pattern = |noisy| VideoInput::TestPattern {
        width: args.width,
        height: args.height,
        fps: args.fps,
        noisy,
    };
    match args.video.as_str() {
        "test-pattern" => pattern(false),
        "noisy-pattern" => pattern(true),
        "camera" => VideoInput::Camera(None),
        other => match other.strip_prefix("camera:") {
            Some(name) => VideoInput::Camera(Some(name.to_owned())),
            None => VideoInput::File(PathBuf::from(other)),
        },
    }
}

fn audio_input(args: &CallArgs) -> anyhow::Result<AudioInput> {
    Ok(match args.audio.as_str() {
        "sine" => AudioInput::Sine(440.0),
        "mic" => AudioInput::Microphone(None),
        other => match (other.strip_prefix("sine:"), other.strip_prefix("mic:")) {
            (Some(f), _) => AudioInput::Sine(
                f.parse()
                    .with_context(|| format!("--audio {other}: not a frequency"))?,
            ),
            (_, Some(name)) => AudioInput::Microphone(Some(name.to_owned())),
            _ => AudioInput::File(PathBuf::from(other)),
        },
    })
}

async fn run_call(args: CallArgs) -> anyhow::Result<ExitCode> {
    if !args.headless {
        anyhow::bail!(
            "`duet call` makes calls without a window: add --headless \
             (for the window: duet --room {} --auto-call)",
            args.room.as_deref().unwrap_or("NAME")
        );
    }
    let video = video_input(&args);
    let audio = audio_input(&args)?;
    let (server, embedded) = duet::signaling::resolve_server(args.server.as_deref()).await?;
    if embedded.is_some() {
        eprintln!("duet: no signaling server answered; started one on 127.0.0.1:8787");
    }
    let extra_ice_servers = args.network.extra_ice_servers();
    let (target, connection) = match (&args.room, &args.answer_as) {
        (Some(room), _) => (call::Target::room(room), None),
        (None, Some(name)) => {
            let (call_id, connection) = answer_incoming(&server, name, args.wait).await?;
            (call::Target::Accept { call_id }, Some(connection))
        }
        (None, None) => anyhow::bail!("--room or --answer-as is needed"),
    };
    let config = SessionConfig {
        server,
        target,
        name: args.name.clone().or_else(|| args.answer_as.clone()),
        video,
        audio,
        encoder: EncoderSettings {
            bitrate_bps: args.bitrate_kbps.saturating_mul(1000),
            fps: args.fps as f32,
            keyframe_interval: (args.fps * 30.0) as u32,
        },
        extra_ice_servers,
        relay_only: args.network.relay_only,
        loopback: true,
        record_video: args.record_video.clone(),
        record_audio: args.record_audio.clone(),
        play_audio: args.speaker,
        speaker: None,
        audio_processing: args.audio_processing.as_deref().map(|v| v == "on"),
        processing: ProcessingSettings {
            echo_cancellation: args.echo_cancellation == "on",
            noise_suppression: args.noise_suppression == "on",
            auto_gain: args.auto_gain == "on",
        },
        show_video: false,
        notify: None,
        // The remote is expected to render it at our size.
        reference_pattern: (args.expect_pattern || args.expect_noisy).then_some(
            call::pipelines::ExpectedPattern {
                noisy: args.expect_noisy,
                width: args.width,
                height: args.height,
            },
        ),
        chat: args.chat.clone(),
        hold_description: None,
        corrupt_first_fingerprint: args.corrupt_first_fingerprint,
    };
    let session = call::start_on(config, connection);
    let mut snapshots = session.watch();
    let mut cpu_start = None;
    let mut said = session.state().describe();
    eprintln!("duet: {said}");

    // Wait for the call (printing state changes), then stay for --duration.
    let connected = tokio::time::timeout(args.wait, async {
        loop {
            let current = snapshots.borrow_and_update().state.clone();
            if matches!(current, CallState::InCall { .. }) || current.is_ended() {
                return;
            }
            if snapshots.changed().await.is_err() {
                return;
            }
            let now = snapshots.borrow().state.describe();
            if now != said {
                eprintln!("duet: {now}");
                said = now;
            }
        }
    })
    .await;
    if connected.is_err() {
        eprintln!("duet: nobody joined within {:?}; hanging up", args.wait);
        session.hang_up();
    } else if !session.state().is_ended() {
        eprintln!("duet: connected; staying {:?}", args.duration);
        cpu_start = Some((std::time::Instant::now(), duet::process::cpu_seconds()));
        let _ = tokio::time::timeout(args.duration, async {
            while snapshots.changed().await.is_ok() {
                if snapshots.borrow().state.is_ended() {
                    return;
                }
            }
        })
        .await;
        session.hang_up();
    }
    let was_in_call = session.stats().lock().connected_after.is_some();
    let cpu_end = duet::process::cpu_seconds();
    let mut report = session.finished().await;
    for w in &report.warnings {
        eprintln!("duet: warning: {w}");
    }
    if let (Some((t0, Some(c0))), Some(c1)) = (cpu_start, cpu_end) {
        let wall = t0.elapsed().as_secs_f64();
        report.process_cpu_percent = Some(((c1 - c0) / wall * 1000.0).round() / 10.0);
    }
    report.process_peak_rss_mib = duet::process::peak_rss_mib();
    eprintln!("duet: ended: {}", report.end_reason);
    let json = serde_json::to_string_pretty(&report)?;
    match &args.report {
        Some(path) => std::fs::write(path, json + "\n")
            .with_context(|| format!("writing the report to {}", path.display()))?,
        None => println!("{json}"),
    }
    if let Some(server) = embedded {
        server.stop().await;
    }
    Ok(if was_in_call {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Signs in as `name` and waits for a direct call to it: the call's id and the signed-in
/// connection it rang on (only that connection can accept it).
async fn answer_incoming(
    server: &str,
    name: &str,
    wait: Duration,
) -> anyhow::Result<(String, call::Connection)> {
    let mut presence = call::Presence::sign_in(server, name, None).await?;
    eprintln!("duet: signed in as {name}; waiting up to {wait:?} for a call");
    let call_id = tokio::time::timeout(wait, async {
        loop {
            match presence.next_event().await {
                call::PresenceEvent::IncomingCall { call_id, from } => {
                    eprintln!("duet: {from} is calling; accepting");
                    return Ok(call_id);
                }
                call::PresenceEvent::CallCancelled { .. } => {}
                call::PresenceEvent::Lost { detail } => {
                    anyhow::bail!("the signaling connection closed: {detail}")
                }
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("nobody called {name} within {wait:?}"))??;
    Ok((call_id, presence.into_connection()))
}
