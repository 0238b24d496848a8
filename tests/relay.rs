//! Relay-only calls on loopback: both sessions offer only TURN relay candidates, so every
//! packet goes through the signaling server's embedded TURN server (allowed to reach
//! loopback peers for this test only), and media still flows both ways.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use duet::call::{self, AudioInput, CallState, SessionConfig};
use signaling_server::{Config, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_call_on_loopback_goes_through_the_embedded_turn_server() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let mut config = Config::ephemeral();
    config.turn_server.listen = Some("127.0.0.1:0".parse().unwrap());
    config.turn_server.allow_peers = vec!["127.0.0.0/8".parse().unwrap()];
    let server = Server::start(config).await.unwrap();
    let turn = server.turn_server().unwrap();

    let session = |tone: f64| {
        let mut c = SessionConfig::synthetic(&server.ws_url(), "relayed");
        c.audio = AudioInput::Sine(tone);
        c.reference_pattern = Some(false);
        c.relay_only = true;
        c
    };
    let a = call::start(session(440.0));
    assert!(
        a.wait_for(Duration::from_secs(5), |s| matches!(
            s,
            CallState::WaitingForPeer { .. }
        ))
        .await
    );
    let b = call::start(session(880.0));
    for side in [&a, &b] {
        assert!(
            side.wait_for(Duration::from_secs(15), |s| matches!(
                s,
                CallState::InCall { .. }
            ))
            .await,
            "not connected: {:?}",
            side.state()
        );
    }
    assert!(turn.allocations() >= 1, "no TURN allocation");
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.hang_up();
    let (ra, rb) = (a.finished().await, b.finished().await);
    for (r, heard) in [(&ra, 880.0), (&rb, 440.0)] {
        assert_eq!(r.candidate_type.as_deref(), Some("relay"), "{r:?}");
        assert_eq!(r.local_candidate_type.as_deref(), Some("relay"), "{r:?}");
        assert!(r.frames_decoded >= 45, "{r:?}");
        assert!(r.psnr_db_mean.unwrap() > 35.0, "{r:?}");
        let hz = r.audio_dominant_hz.unwrap();
        assert!((hz - heard).abs() < 20.0, "heard {hz} Hz: {r:?}");
    }
    server.stop().await;
}
