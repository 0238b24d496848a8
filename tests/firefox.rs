//! The web client in Firefox: Debian's `firefox-esr` (headless, fake camera and
//! microphone) driven by `puppeteer-core` over WebDriver BiDi (tests/browser/firefox.mjs),
//! against a real signaling server started here, a real native peer (`duet call
//! --headless`) and real Chromium. Firefox here has no H.264 (it downloads its OpenH264
//! plugin at first use), so every call here runs on VP8: the native client's libvpx path,
//! and Chromium's VP8.
//!
//! Each test uses one server for both directions of its pair (who joins first offers) and
//! short calls, to keep CI time small. Without node, npm or firefox-esr (or chromium for
//! the mixed test) the tests skip with a reason, unless `DUET_REQUIRE_BROWSER_TEST=1`
//! (set by `make test`), where that fails. `npm ci` installs the pinned puppeteer-core
//! (no browser download) when it is missing from tests/browser/node_modules.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use serde_json::{Value, json};

#[path = "common/web.rs"]
mod web;
use web::{
    MIN_DECODED, artifacts, forward_stderr, install_node_packages, native, native_best_fps,
    nothing_missing, num, wait_members, wait_native, works,
};

/// One browser scenario at a time: they share two cores with everything else.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The native client's test pattern rate.
const NATIVE_FPS: f64 = 30.0;

/// Whether the Firefox tests can run here (and Chromium too, with `chromium`); panics
/// instead of skipping when required.
fn ready(chromium: bool) -> bool {
    let firefox = std::env::var("DUET_FIREFOX").unwrap_or_else(|_| "/usr/bin/firefox-esr".into());
    let chromium_path =
        std::env::var("DUET_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let missing: Vec<&str> = [
        (!works("node", "--version")).then_some("node"),
        (!works("npm", "--version")).then_some("npm"),
        (!Path::new(&firefox).exists()).then_some("firefox-esr (apt-get install firefox-esr)"),
        (chromium && !Path::new(&chromium_path).exists())
            .then_some("chromium (apt-get install chromium)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !nothing_missing("the Firefox tests", &missing) {
        return false;
    }
    install_node_packages(&["puppeteer-core", "playwright-core"]);
    true
}

/// Runs one scenario of firefox.mjs and returns its JSON (asserting it succeeded).
fn scenario(name: &str, args: Value) -> Value {
    web::scenario("firefox.mjs", name, args)
}

/// The server's pages as Firefox must see them: on `localhost` (a secure context, so
/// the camera may open).
fn base(server: &signaling_server::Server) -> String {
    server.http_url().replace("127.0.0.1", "localhost")
}

/// Both sides of a Firefox <-> native call decoded each other's video (>= 90 % of the
/// frames sent) and audio, on VP8 both ways, and the hang-up reached the other side.
fn assert_vp8_native_call(web: &Value, report: &Value, web_hung_up: bool) {
    let window = &web["window"];
    let seconds = num(&window["seconds"]);
    // Firefox: the native pattern at 30 fps, decoded over the window, as VP8.
    let decoded = num(&window["frames_decoded"]);
    assert!(
        decoded >= MIN_DECODED * NATIVE_FPS * seconds,
        "Firefox decoded {decoded} frames in {seconds} s"
    );
    let codec_in = window["codec_in"].as_str().unwrap();
    assert!(codec_in.starts_with("video/VP8"), "{codec_in}");
    let codec_out = window["codec_out"].as_str().unwrap();
    assert!(codec_out.starts_with("video/VP8"), "{codec_out}");
    assert_eq!(report["video_codec_sent"], "VP8");
    assert_eq!(report["video_codec_received"], "VP8");
    // Firefox heard the native 500 Hz tone.
    assert!(
        (num(&window["audio_hz"]) - 500.0).abs() <= 15.0,
        "{}",
        window["audio_hz"]
    );
    // Native: over its best stretch of at least 8 s (its timeline samples the count about
    // once a second), at least 90 % of Firefox's frame rate; and audio.
    let browser_fps = num(&window["frames_sent"]) / seconds;
    assert!(browser_fps > 10.0, "Firefox sent {browser_fps:.1} fps");
    let best_fps = native_best_fps(report);
    println!(
        "Firefox decoded {decoded} frames in {seconds:.1} s ({:.1} fps), sent {browser_fps:.1} fps; \
         native decoded {best_fps:.1} fps over 8 s",
        decoded / seconds
    );
    assert!(
        best_fps >= MIN_DECODED * browser_fps,
        "native decoded {best_fps:.1} fps over 8 s; Firefox sent {browser_fps:.1} fps"
    );
    assert!(num(&report["audio_frames_decoded"]) > 100.0);
    // Chat both ways over the data channel.
    assert_eq!(report["chat_received"][0], "hello from Firefox");
    let ended = web["ended"].as_str().unwrap();
    if web_hung_up {
        assert!(ended.contains("You hung up"), "{ended}");
        assert_eq!(report["end_reason"], "peer left");
    } else {
        assert!(ended.contains("Native hung up"), "{ended}");
        assert_eq!(report["end_reason"], "you hung up");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firefox_and_the_native_client_call_on_vp8_each_offering() {
    let _serial = SERIAL.lock().await;
    if !ready(false) {
        return;
    }
    let server = signaling_server::Server::start(signaling_server::Config::ephemeral())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Firefox joins first, so it offers (VP8, VP9, AV1); the native client answers VP8
    // and hangs up after its --duration.
    let report = dir.path().join("firefox-offers.json");
    let room = "firefox-offers";
    let args = json!({
        "base": base(&server), "room": room, "chat_out": "hello from Firefox",
        "chat_in": "hello from native", "hang_up": "native",
        "screenshot": artifacts().join("firefox-with-native.png"),
    });
    let web = tokio::task::spawn_blocking(move || scenario("native", args));
    wait_members(&server, room, 1).await;
    let mut child = native(
        &server,
        &report,
        &[
            "--room",
            room,
            "--name",
            "Native",
            "--duration",
            "22s",
            "--chat",
            "hello from native",
        ],
    );
    forward_stderr(&mut child, "native");
    let web = web.await.unwrap();
    let native_report = tokio::task::spawn_blocking(move || wait_native(child, &report))
        .await
        .unwrap();
    assert_vp8_native_call(&web, &native_report, false);

    // The native client joins first, so it offers (H.264 first, VP8); Firefox answers
    // VP8 and hangs up.
    let report = dir.path().join("native-offers.json");
    let room = "native-offers-firefox";
    let mut child = native(
        &server,
        &report,
        &[
            "--room",
            room,
            "--name",
            "Native",
            "--duration",
            "120s",
            "--chat",
            "hello from native",
        ],
    );
    forward_stderr(&mut child, "native");
    wait_members(&server, room, 1).await;
    let args = json!({
        "base": base(&server), "room": room, "chat_out": "hello from Firefox",
        "chat_in": "hello from native", "hang_up": "browser", "window_ms": 10_000,
        "loopback": true,
    });
    let web = tokio::task::spawn_blocking(move || scenario("native", args))
        .await
        .unwrap();
    let native_report = tokio::task::spawn_blocking(move || wait_native(child, &report))
        .await
        .unwrap();
    assert_vp8_native_call(&web, &native_report, true);
    server.stop().await;
}

/// Frames decoded by one page over the window, against what the other page sent; audio
/// heard; the video codec the one sent.
fn assert_vp8_decoded(receiver: &Value, sender: &Value, who: &str) {
    web::assert_decoded(receiver, sender, who);
    let codec = receiver["codec_in"].as_str().unwrap();
    assert!(codec.starts_with("video/VP8"), "{who} received {codec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firefox_and_chromium_call_each_offering() {
    let _serial = SERIAL.lock().await;
    if !ready(true) {
        return;
    }
    let server = signaling_server::Server::start(signaling_server::Config::ephemeral())
        .await
        .unwrap();
    for first in ["firefox", "chromium"] {
        let args =
            json!({ "base": base(&server), "room": format!("{first}-first"), "first": first });
        let r = tokio::task::spawn_blocking(move || scenario("mixed", args))
            .await
            .unwrap();
        assert_vp8_decoded(&r["firefox"], &r["chromium"], "firefox");
        assert_vp8_decoded(&r["chromium"], &r["firefox"], "chromium");
        assert!(
            r["ended_first"].as_str().unwrap().contains("hung up"),
            "{}",
            r["ended_first"]
        );
        assert!(r["ended_second"].as_str().unwrap().contains("You hung up"));
    }
    server.stop().await;
}
