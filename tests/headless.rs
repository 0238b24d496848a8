//! The headless command as a person or script runs it: two `duet call --headless`
//! processes call each other through a server, record what they receive and write
//! JSON reports.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use duet::media::audio::dominant_frequency;
use duet::media::video::{read_strip, read_y4m};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_headless_processes_call_record_and_report() {
    let server = signaling_server::Server::start(signaling_server::Config::ephemeral())
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("duet-headless-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |name: &str, tone: &str, processing: &str| {
        Command::new(env!("CARGO_BIN_EXE_duet"))
            .args([
                "call",
                "--headless",
                "--server",
                &server.ws_url(),
                "--room",
                "proc",
            ])
            .args([
                "--name",
                name,
                "--audio",
                tone,
                "--duration",
                "3s",
                "--wait",
                "20s",
            ])
            .args(["--expect-pattern", "--chat", &format!("hi from {name}")])
            .arg("--audio-processing")
            .args(processing.split(' '))
            .arg("--report")
            .arg(dir.join(format!("{name}.json")))
            .arg("--record-video")
            .arg(dir.join(format!("{name}.y4m")))
            .arg("--record-audio")
            .arg(dir.join(format!("{name}.wav")))
            .spawn()
            .unwrap()
    };
    // Bob's tone goes through echo cancellation, noise suppression and gain (as a
    // microphone's would) and must still arrive.
    let mut a = run("ann", "sine:500", "off");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut b = run("bob", "sine:700", "on --noise-suppression off");
    let (sa, sb) = tokio::task::spawn_blocking(move || (a.wait().unwrap(), b.wait().unwrap()))
        .await
        .unwrap();
    assert!(sa.success() && sb.success(), "{sa:?} {sb:?}");

    for (me, other, heard) in [("ann", "bob", 700.0), ("bob", "ann", 500.0)] {
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{me}.json"))).unwrap())
                .unwrap();
        println!("{me}: {report}");
        assert!(report["time_to_connected_ms"].as_f64().unwrap() < 5000.0);
        assert!(report["frames_decoded"].as_u64().unwrap() > 45);
        assert!(report["psnr_db_mean"].as_f64().unwrap() > 30.0);
        assert_eq!(report["candidate_type"], "host");
        assert_eq!(report["chat_received"][0], format!("hi from {other}"));
        assert!(report["rtt_ms"].as_f64().is_some());
        // Both tones count as speech, sent and received; the processing is reported
        // where it ran, with the stages chosen.
        assert!(
            report["speech_sent_dbfs"].as_f64().unwrap() < 0.0,
            "{report}"
        );
        assert!(
            report["speech_received_dbfs"].as_f64().unwrap() < 0.0,
            "{report}"
        );
        let processing = &report["audio_processing"];
        if me == "bob" {
            assert_eq!(processing["echo_cancellation"], true);
            assert_eq!(processing["noise_suppression"], false);
            assert_eq!(processing["auto_gain"], true);
            assert!(
                processing["ms_per_frame_p95"].as_f64().unwrap() > 0.0,
                "{report}"
            );
        } else {
            assert!(processing.is_null(), "{report}");
        }
        // The recordings hold what was received.
        let frames = read_y4m(std::fs::File::open(dir.join(format!("{me}.y4m"))).unwrap()).unwrap();
        assert!(frames.len() > 45, "{} frames recorded", frames.len());
        let numbers: Vec<u32> = frames
            .iter()
            .filter_map(|f| read_strip(f).map(|s| s.frame_number))
            .collect();
        assert!(numbers.len() > frames.len() * 9 / 10);
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "increasing frame numbers"
        );
        let wav = hound::WavReader::open(dir.join(format!("{me}.wav"))).unwrap();
        assert_eq!(wav.spec().sample_rate, 48_000);
        let pcm: Vec<i16> = wav.into_samples::<i16>().map(Result::unwrap).collect();
        assert!(pcm.len() > 48_000, "{} samples", pcm.len());
        assert!((dominant_frequency(&pcm) - heard).abs() <= 10.0);
    }
    let _ = std::fs::remove_dir_all(&dir);
    server.stop().await;
}

#[test]
fn help_explains_the_headless_call() {
    let out = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["call", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--headless",
        "--video",
        "--audio",
        "--duration",
        "--record-video",
        "--report",
        "--relay-only",
        "--audio-processing",
        "--echo-cancellation",
        "--noise-suppression",
        "--auto-gain",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn unreachable_server_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args([
            "call",
            "--headless",
            "--room",
            "r",
            "--server",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unreachable"), "{err}");
}
