//! The desktop UI driven through its real egui code (egui_kittest), against a real
//! in-process signaling server: the lobby validates, Call opens the call view, the call
//! connects to a second (headless) participant, Hang up returns to the lobby; direct
//! calls ring a signed-in window that declines and accepts; errors show as text.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use duet::call::{self, CallState, SessionConfig, Target};
use duet::ui::{App, AudioChoice, Lobby, VideoChoice};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable as _;

/// A runtime and a real signaling server on a free loopback port.
fn runtime_and_server() -> (tokio::runtime::Runtime, signaling_server::Server) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime
        .block_on(signaling_server::Server::start(
            signaling_server::Config::ephemeral(),
        ))
        .unwrap();
    (runtime, server)
}

/// The real app UI in a test harness, two frames in.
fn window(runtime: &tokio::runtime::Runtime, lobby: Lobby) -> Harness<'static, App> {
    let mut harness = Harness::new_ui_state(
        |ui, app: &mut App| app.ui(ui),
        App::new(runtime.handle().clone(), lobby),
    );
    harness.run_steps(2);
    harness
}

/// Steps the UI (it keeps repainting while a spinner or video runs, so `run()` would
/// never settle) until `done`, for at most `secs`.
fn step_until(
    harness: &mut Harness<'_, App>,
    secs: u64,
    mut done: impl FnMut(&mut Harness<'_, App>) -> bool,
) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        harness.run_steps(1);
        if done(harness) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Clicks the widget labelled `label`. kittest clicks at where the widget was in the
/// last frame; a panel whose content just changed (a new status line) settles its size
/// one frame later, so let it settle first, as a person's eye and hand would.
fn click(harness: &mut Harness<'_, App>, label: &str) {
    harness.run_steps(2);
    harness.get_by_label(label).click();
    harness.run_steps(2);
}

fn shows(harness: &Harness<'_, App>, text: &str) -> bool {
    harness.query_all_by_label_contains(text).next().is_some()
}

#[test]
fn lobby_call_and_hang_up() {
    let (runtime, server) = runtime_and_server();
    let lobby = Lobby {
        server: server.ws_url(),
        video: VideoChoice::TestPattern,
        audio: AudioChoice::Tone,
        ..Lobby::default()
    };
    let mut harness = window(&runtime, lobby);

    // Beside the self-preview, the microphone's meter hears the tone.
    let heard = step_until(&mut harness, 5, |h| shows(h, "hearing you"));
    assert!(heard, "the lobby's microphone meter never moved");
    // Each clean-up stage can be switched off for the call.
    assert!(harness.state().lobby.processing.noise_suppression);
    click(&mut harness, "Noise suppression");
    assert!(!harness.state().lobby.processing.noise_suppression);
    assert!(harness.state().lobby.processing.echo_cancellation);

    // No room yet: Call explains instead of calling.
    harness.get_by_label("Call").click();
    harness.run_steps(2);
    assert!(!harness.state().in_call());
    harness.get_by_label_contains("Enter a room name");

    // With a room: the call view, then a real connection to a second participant.
    harness.state_mut().lobby.room = "ui-room".into();
    harness.get_by_label("Call").click();
    harness.run_steps(2);
    assert!(harness.state().in_call());
    harness.get_by_label("Hang up");
    let other = runtime.block_on(async {
        let other = call::start(SessionConfig::synthetic(&server.ws_url(), "ui-room"));
        assert!(
            other
                .wait_for(Duration::from_secs(10), |s| matches!(
                    s,
                    CallState::InCall { .. }
                ))
                .await
        );
        other
    });
    let mut connected = false;
    for _ in 0..200 {
        harness.run_steps(1);
        if harness
            .query_all_by_label_contains("connected")
            .next()
            .is_some()
        {
            connected = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(connected, "the state line never said connected");
    // Both send a tone: the meters say who is speaking.
    let speaking = step_until(&mut harness, 5, |h| {
        shows(h, "you are speaking") && shows(h, "is speaking")
    });
    assert!(speaking, "the speaking indicators never showed");
    // Muted, our tone still moves the meter, and the window says so.
    click(&mut harness, "Mute microphone");
    let warned = step_until(&mut harness, 2, |h| shows(h, "speaking while muted"));
    assert!(warned, "speaking while muted was not shown");
    // The device pickers open in the call (a tone, not a device, is in use here).
    click(&mut harness, "Devices");
    let pickers = step_until(&mut harness, 2, |h| {
        // The meter's "Microphone" and the picker's.
        h.query_all_by_label("Microphone").count() == 2 && shows(h, "Speaker")
    });
    assert!(pickers, "the device pickers did not open");

    click(&mut harness, "Hang up");
    assert!(!harness.state().in_call());
    harness.get_by_label("Call");
    // The other side hears that we left.
    let report = runtime.block_on(other.finished());
    assert_eq!(report.end_reason, "peer left");
    runtime.block_on(server.stop());
}

#[test]
fn a_call_that_ends_by_itself_shows_why_in_the_lobby() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let lobby = Lobby {
        server: format!("127.0.0.1:{port}"),
        room: "nobody-home".into(),
        video: VideoChoice::TestPattern,
        audio: AudioChoice::Tone,
        ..Lobby::default()
    };
    let mut harness = window(&runtime, lobby);
    harness.get_by_label("Call").click();
    let mut shown = false;
    for _ in 0..300 {
        harness.run_steps(1);
        if harness.query_by_label_contains("unreachable").is_some() {
            shown = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(shown, "no error shown for an unreachable server");
    assert!(!harness.state().in_call());
}

#[test]
fn incoming_calls_ring_and_can_be_declined_and_accepted() {
    let (runtime, server) = runtime_and_server();
    let lobby = Lobby {
        server: server.ws_url(),
        name: "bob".into(),
        video: VideoChoice::TestPattern,
        audio: AudioChoice::Tone,
        preview: false,
        ..Lobby::default()
    };
    let mut harness = window(&runtime, lobby);
    harness.get_by_label("Sign in as bob").click();
    assert!(step_until(&mut harness, 10, |h| shows(
        h,
        "Signed in as bob"
    )));
    assert_eq!(harness.state().signed_in_as(), Some("bob"));

    let dial = |name: &str| {
        let mut config = SessionConfig::synthetic(&server.ws_url(), "");
        config.target = Target::Dial { to: "bob".into() };
        config.name = Some(name.into());
        let _guard = runtime.enter();
        call::start(config)
    };

    // Declined: the caller is told.
    let alice = dial("alice");
    assert!(step_until(&mut harness, 10, |h| shows(
        h,
        "alice is calling"
    )));
    assert!(harness.state().is_ringing());
    // The dialog just appeared: a window is laid out in its first frame and takes
    // clicks from the next, so click as `click` does, after it settled.
    click(&mut harness, "Decline");
    assert!(!harness.state().is_ringing());
    let report = runtime.block_on(alice.finished());
    assert_eq!(report.end_reason, "bob declined the call");

    // Accepted: a real call, named after the caller.
    let carol = dial("carol");
    assert!(step_until(&mut harness, 10, |h| shows(
        h,
        "carol is calling"
    )));
    click(&mut harness, "Accept");
    assert!(step_until(&mut harness, 20, |h| shows(h, "connected")));
    assert!(harness.state().in_call(), "{:?}", harness.state().message);
    assert!(shows(&harness, "call with carol"));
    assert!(
        runtime.block_on(carol.wait_for(Duration::from_secs(10), |s| matches!(
            s,
            CallState::InCall { .. }
        )))
    );
    click(&mut harness, "Hang up");
    assert!(!harness.state().in_call());
    assert_eq!(runtime.block_on(carol.finished()).end_reason, "peer left");
    // Signed in again afterwards, reachable for the next call.
    assert!(step_until(&mut harness, 10, |h| h.state().signed_in_as()
        == Some("bob")));

    // A name someone else holds is a readable error.
    let mut lobby2 = Lobby {
        server: server.ws_url(),
        name: "bob".into(),
        preview: false,
        ..Lobby::default()
    };
    lobby2.video = VideoChoice::TestPattern;
    let mut second = window(&runtime, lobby2);
    second.get_by_label("Sign in as bob").click();
    assert!(step_until(&mut second, 10, |h| shows(
        h,
        "already signed in elsewhere"
    )));
    runtime.block_on(server.stop());
}

#[test]
fn new_meeting_hosted_and_ended_for_both_and_a_scheduled_one_is_not_open_yet() {
    let (runtime, server) = runtime_and_server();
    let lobby = Lobby {
        server: server.ws_url(),
        name: "host".into(),
        video: VideoChoice::TestPattern,
        audio: AudioChoice::Tone,
        preview: false,
        ..Lobby::default()
    };
    let mut harness = window(&runtime, lobby);
    harness.get_by_label("New meeting").click();
    assert!(step_until(&mut harness, 10, |h| h
        .state()
        .created_meeting()
        .is_some()));
    let created = harness.state().created_meeting().unwrap().clone();
    assert!(signaling_server::ids::is_room_id(&created.room_id));
    assert_eq!(harness.state().lobby.room, created.room_id);
    assert!(step_until(&mut harness, 5, |h| shows(
        h,
        &format!("Meeting {}", created.room_id)
    )));

    // The creator joins as host; the guest joins by the link.
    harness.get_by_label("Call").click();
    assert!(step_until(&mut harness, 10, |h| shows(
        h,
        "waiting for the other person"
    )));
    let guest = {
        let _guard = runtime.enter();
        let mut config = SessionConfig::synthetic(&server.ws_url(), "");
        config.target = Target::room(&duet::ui::room_from_input(&created.join_url));
        call::start(config)
    };
    assert!(step_until(&mut harness, 20, |h| shows(h, "connected")));
    assert!(step_until(&mut harness, 5, |h| shows(
        h,
        "End meeting for both"
    )));
    click(&mut harness, "End meeting for both");
    assert!(step_until(&mut harness, 10, |h| !h.state().in_call()));
    assert_eq!(
        harness.state().message.as_deref(),
        Some("Call ended: the host ended the meeting.")
    );
    assert_eq!(
        runtime.block_on(guest.finished()).end_reason,
        "the host ended the meeting"
    );

    // Scheduled for tomorrow: created, but joining says it has not started.
    let tomorrow = jiff::Zoned::now().date().tomorrow().unwrap();
    harness.state_mut().set_schedule(tomorrow, 10, 30);
    harness.run_steps(2);
    harness.get_by_label("Create").click();
    assert!(step_until(&mut harness, 10, |h| h
        .state()
        .created_meeting()
        .is_some_and(|m| m.room_id != created.room_id)));
    harness.get_by_label("Call").click();
    assert!(step_until(&mut harness, 10, |h| shows(
        h,
        "has not started yet"
    )));
    assert!(!harness.state().in_call());
    runtime.block_on(server.stop());
}

#[test]
fn new_meeting_sends_the_api_key_a_server_requires() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let key = "k".repeat(40);
    let server = runtime
        .block_on(signaling_server::Server::start(signaling_server::Config {
            api_key: Some(signaling_server::config::Secret(key.clone())),
            ..signaling_server::Config::ephemeral()
        }))
        .unwrap();
    let lobby = Lobby {
        server: server.ws_url(),
        name: "host".into(),
        video: VideoChoice::TestPattern,
        audio: AudioChoice::Tone,
        preview: false,
        ..Lobby::default()
    };
    // Without the key: refused, in words.
    let mut harness = window(&runtime, lobby.clone());
    harness.get_by_label("New meeting").click();
    assert!(step_until(&mut harness, 10, |h| shows(
        h,
        "needs an API key"
    )));
    assert!(harness.state().created_meeting().is_none());
    // A wrong key is refused too.
    let mut harness = window(
        &runtime,
        Lobby {
            api_key: "w".repeat(40),
            ..lobby.clone()
        },
    );
    harness.get_by_label("New meeting").click();
    assert!(step_until(&mut harness, 10, |h| shows(
        h,
        "needs an API key"
    )));
    // With it (typed into the lobby's field): created.
    let mut harness = window(&runtime, lobby);
    harness.state_mut().lobby.api_key = key;
    harness.get_by_label("New meeting").click();
    assert!(step_until(&mut harness, 10, |h| h
        .state()
        .created_meeting()
        .is_some()));
}
