//! Real calls: two headless sessions through an in-process signaling server, with real
//! WebRTC peer connections on loopback, real H.264 and Opus; directly, and relay-only
//! through the server's embedded TURN server.
#![allow(clippy::unwrap_used)]

use std::sync::LazyLock;
use std::time::Duration;

use duet::call::{self, AudioInput, CallState, EndReason, SessionConfig};
use signaling_server::{Config, Server};

/// Calls share two cores: run them one at a time so timing is realistic.
static ONE_AT_A_TIME: LazyLock<tokio::sync::Mutex<()>> =
    LazyLock::new(|| tokio::sync::Mutex::new(()));

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

async fn server() -> Server {
    logs();
    Server::start(Config::ephemeral()).await.unwrap()
}

fn config(server: &Server, room: &str, tone: f64, chat: &str) -> SessionConfig {
    let mut c = SessionConfig::synthetic(&server.ws_url(), room);
    c.audio = AudioInput::Sine(tone);
    c.reference_pattern = Some(duet::call::pipelines::ExpectedPattern {
        noisy: false,
        width: 640,
        height: 360,
    });
    c.chat = vec![chat.to_owned()];
    c
}

/// Starts `a`, waits until it is alone in the room, starts `b`, waits until both are in
/// the call.
async fn connect(a: SessionConfig, b: SessionConfig) -> (call::SessionHandle, call::SessionHandle) {
    let a = call::start(a);
    assert!(
        a.wait_for(Duration::from_secs(5), |st| matches!(
            st,
            CallState::WaitingForPeer { .. }
        ))
        .await
    );
    let b = call::start(b);
    for side in [&a, &b] {
        assert!(
            side.wait_for(Duration::from_secs(10), |st| matches!(
                st,
                CallState::InCall { .. }
            ))
            .await,
            "not connected: {:?}",
            side.state()
        );
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_exchange_video_audio_and_chat_then_hang_up() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server().await;
    let (a, b) = connect(
        config(&s, "talk", 440.0, "hello from a"),
        config(&s, "talk", 660.0, "hello from b"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    a.hang_up();
    let hung_up = std::time::Instant::now();
    assert!(
        b.wait_for(Duration::from_secs(1), |st| st.is_ended()).await,
        "the other side did not see the hang-up within 1 s: {:?}",
        b.state()
    );
    let b_ended = hung_up.elapsed();
    let ra = a.finished().await;
    let rb = b.finished().await;
    println!("A: {}", serde_json::to_string_pretty(&ra).unwrap());
    println!("B: {}", serde_json::to_string_pretty(&rb).unwrap());
    println!("B saw the hang-up after {b_ended:?}");

    assert_eq!(ra.ended, Some(EndReason::HungUp));
    assert_eq!(
        rb.ended,
        Some(EndReason::PeerLeft {
            disconnected: false
        })
    );
    assert_eq!(rb.end_reason, "peer left");
    for (me, other, tone) in [(&ra, &rb, 660.0), (&rb, &ra, 440.0)] {
        assert!(me.time_to_connected_ms.is_some());
        assert!(other.frames_sent > 60, "{}", other.frames_sent);
        // Frames still in flight when the call ended may be missing: compare against
        // what the other side had sent, allowing 10%.
        assert!(
            me.frames_decoded as f64 >= 0.9 * other.frames_sent as f64,
            "decoded {} of {} sent",
            me.frames_decoded,
            other.frames_sent
        );
        assert!(me.frames_with_strip >= me.frames_decoded * 9 / 10);
        assert_eq!(
            me.frames_out_of_order, 0,
            "strip read back in increasing order"
        );
        assert!(
            me.psnr_db_mean.unwrap() > 30.0,
            "PSNR {:?}",
            me.psnr_db_mean
        );
        assert_eq!(me.decoded_resolution, Some((640, 360)));
        let hz = me.audio_dominant_hz.unwrap();
        assert!((hz - tone).abs() <= 10.0, "heard {hz} Hz, expected {tone}");
        assert!(me.audio_frames_decoded > 100);
        assert!(me.latency_ms_p50.unwrap() < 200.0);
    }
    assert_eq!(ra.chat_received, vec!["hello from b".to_owned()]);
    assert_eq!(rb.chat_received, vec!["hello from a".to_owned()]);
    s.stop().await;
}

/// Threads this crate started (they are all named `duet-...`).
/// The client's media and device threads (`duet-*`). The signaling servers other tests
/// of this file start and stop meanwhile have a database thread (`duet-db`) that comes
/// and goes with them: not counted, or the baseline depends on which test runs when.
fn duet_thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("duet-") && !name.starts_with("duet-db"))
        .map(|name| name.trim().to_owned())
        .collect()
}

fn duet_threads() -> usize {
    duet_thread_names().len()
}

fn open_sockets() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits until `f` gives the same value 5 times in a row, 50 ms apart (resources are
/// released asynchronously), up to 3 s; returns that value.
async fn steady<T: PartialEq + Copy>(f: impl Fn() -> T) -> T {
    let mut last = f();
    let mut same = 0;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = f();
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same >= 5 {
            break;
        }
    }
    last
}

/// Polls until `f` holds (resources are released asynchronously), up to 3 s.
async fn settles(f: impl Fn() -> bool) -> bool {
    for _ in 0..60 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

async fn short_call(s: &Server, room: &str) -> (call::Report, call::Report) {
    let (a, b) = connect(config(s, room, 440.0, "a"), config(s, room, 660.0, "b")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.hang_up();
    b.hang_up();
    (a.finished().await, b.finished().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_up_frees_everything_and_a_second_call_works() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server().await;
    let threads = duet_threads();
    // Sockets and tasks are compared from the end of the first call on: the first call
    // in a process may create lazily-initialised globals that stay (whichever test of
    // this file happens to run first); a leak shows as growth from call to call.
    let (mut sockets, mut tasks) = (0, 0);
    for round in 0..3 {
        let (ra, rb) = short_call(&s, &format!("again-{round}")).await;
        for r in [&ra, &rb] {
            assert!(
                r.frames_decoded > 20,
                "round {round}: {} decoded",
                r.frames_decoded
            );
            assert!(r.audio_frames_decoded > 30);
        }
        assert!(
            settles(|| duet_threads() == threads).await,
            "round {round}: media threads left: {:?} (before {threads})",
            duet_thread_names()
        );
        if round == 0 {
            (sockets, tasks) = steady(|| (open_sockets(), alive_tasks())).await;
        }
        assert!(
            settles(|| open_sockets() == sockets).await,
            "round {round}: sockets left: {} (after the first call {sockets})",
            open_sockets()
        );
        assert!(
            settles(|| alive_tasks() <= tasks).await,
            "round {round}: tasks left: {} (after the first call {tasks})",
            alive_tasks()
        );
        println!(
            "after call {round}: {} duet threads, {} sockets, {} tasks (baseline: {threads}, {sockets}, {tasks})",
            duet_threads(),
            open_sockets(),
            alive_tasks()
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_that_arrive_before_the_description_are_not_lost() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server().await;
    let mut ca = config(&s, "early", 440.0, "a");
    let mut cb = config(&s, "early", 660.0, "b");
    // Both sides hold their offer/answer back: every candidate is relayed first.
    ca.hold_description = Some(Duration::from_millis(400));
    cb.hold_description = Some(Duration::from_millis(400));
    let (a, b) = connect(ca, cb).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    a.hang_up();
    let (ra, rb) = (a.finished().await, b.finished().await);
    assert!(ra.frames_decoded > 10 && rb.frames_decoded > 10);
    assert!(
        ra.time_to_connected_ms.unwrap() >= 400.0,
        "the offer was held back"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dtls_handshake_is_retried_on_a_fresh_connection() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server().await;
    // One side's first description names a wrong certificate (as if changed in
    // transit): the other side's handshake fails, while this side's may succeed and
    // start its media. Both must end up on fresh connections, with everything working.
    for corrupt_offerer in [true, false] {
        let room = format!("fresh-{corrupt_offerer}");
        let mut ca = config(&s, &room, 440.0, "hello from a");
        let mut cb = config(&s, &room, 660.0, "hello from b");
        if corrupt_offerer {
            ca.corrupt_first_fingerprint = true;
        } else {
            cb.corrupt_first_fingerprint = true;
        }
        let a = call::start(ca);
        assert!(
            a.wait_for(Duration::from_secs(5), |st| matches!(
                st,
                CallState::WaitingForPeer { .. }
            ))
            .await
        );
        let b = call::start(cb);
        // Media flows once both are in the call on the fresh connection.
        // (The failed handshake is noticed 5 s after ICE found its path.)
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        while std::time::Instant::now() < deadline
            && [&a, &b].iter().any(|side| {
                !matches!(side.state(), CallState::InCall { .. })
                    || side.stats().lock().video_frames_decoded < 30
            })
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        a.hang_up();
        let (ra, rb) = (a.finished().await, b.finished().await);
        println!(
            "corrupt offerer {corrupt_offerer}: fresh connections {} / {}, decoded {} / {}, connected after {:?} / {:?} ms",
            ra.fresh_connections,
            rb.fresh_connections,
            ra.frames_decoded,
            rb.frames_decoded,
            ra.time_to_connected_ms,
            rb.time_to_connected_ms
        );
        assert_eq!(ra.ended, Some(EndReason::HungUp));
        for r in [&ra, &rb] {
            // Once each; twice on the polite side when both gave up at once (its own
            // fresh offer crossed theirs, and another fresh one answered it).
            assert!(
                (1..=2).contains(&r.fresh_connections),
                "each side replaced its connection: {}",
                r.fresh_connections
            );
            assert!(r.frames_decoded >= 30, "decoded {}", r.frames_decoded);
            assert!(r.audio_frames_decoded > 10);
        }
        assert_eq!(ra.chat_received, vec!["hello from b".to_owned()]);
        assert_eq!(rb.chat_received, vec!["hello from a".to_owned()]);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_and_full_room_end_with_clear_reasons() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let lonely = call::start(SessionConfig::synthetic(&format!("127.0.0.1:{port}"), "x"));
    let report = lonely.finished().await;
    assert!(
        matches!(report.ended, Some(EndReason::ServerLost { .. })),
        "{report:?}"
    );
    assert!(
        report.end_reason.contains("unreachable"),
        "{}",
        report.end_reason
    );

    let s = server().await;
    let (a, b) = connect(
        config(&s, "crowded", 440.0, "a"),
        config(&s, "crowded", 660.0, "b"),
    )
    .await;
    let third = call::start(config(&s, "crowded", 880.0, "c"));
    let report = third.finished().await;
    assert_eq!(report.ended, Some(EndReason::RoomFull));
    assert_eq!(report.frames_sent, 0);
    a.hang_up();
    b.hang_up();
    a.finished().await;
    b.finished().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_call_on_loopback_goes_through_the_embedded_turn_server() {
    let _serial = ONE_AT_A_TIME.lock().await;
    logs();
    let mut config = Config::ephemeral();
    config.turn_server.listen = Some("127.0.0.1:0".parse().unwrap());
    config.turn_server.allow_peers = vec!["127.0.0.0/8".parse().unwrap()];
    let server = Server::start(config).await.unwrap();
    let turn = server.turn_server().unwrap();

    // Only TURN relay candidates: every packet goes through the embedded TURN server
    // (allowed to reach loopback peers for this test only).
    let session = |tone: f64| {
        let mut c = SessionConfig::synthetic(&server.ws_url(), "relayed");
        c.audio = AudioInput::Sine(tone);
        c.reference_pattern = Some(duet::call::pipelines::ExpectedPattern {
            noisy: false,
            width: 640,
            height: 360,
        });
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
