//! The desktop UI driven through its real egui code (egui_kittest), against a real
//! in-process signaling server: the lobby validates, Call opens the call view, the call
//! connects to a second (headless) participant, Hang up returns to the lobby.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use duet::call::{self, CallState, SessionConfig};
use duet::ui::{App, AudioChoice, Lobby, VideoChoice};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable as _;

#[test]
fn lobby_call_and_hang_up() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime
        .block_on(signaling_server::Server::start(
            signaling_server::Config::ephemeral(),
        ))
        .unwrap();
    let lobby = Lobby {
        server: server.ws_url(),
        video: VideoChoice::TestPattern,
        audio: AudioChoice::Tone,
        ..Lobby::default()
    };
    let app = App::new(runtime.handle().clone(), lobby);
    let mut harness = Harness::new_ui_state(|ui, app: &mut App| app.ui(ui), app);
    harness.run();

    // No room yet: Call explains instead of calling.
    harness.get_by_label("Call").click();
    harness.run();
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

    harness.get_by_label("Hang up").click();
    harness.run_steps(2);
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
    let mut harness = Harness::new_ui_state(
        |ui, app: &mut App| app.ui(ui),
        App::new(runtime.handle().clone(), lobby),
    );
    harness.run();
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
