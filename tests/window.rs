//! The real window, end to end: under Xvfb, two `duet` app processes (test-pattern
//! video, sine audio, `--auto-call`) call each other through a signaling server; each
//! window is photographed from its X server (`xwd`) and the picture is checked: the
//! remote video area must show the test pattern's colour bars, not black.
//!
//! Screenshots are kept in `target/window-test/` (CI keeps that folder as artifacts;
//! `DUET_WINDOW_ARTIFACTS` overrides it). Needs `Xvfb` and `xwd` (Debian: xvfb,
//! x11-apps); without them the test says so and passes, unless
//! `DUET_REQUIRE_WINDOW_TEST=1` (set by `make test`), where their absence fails it.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WIDTH: u32 = 1024;
const HEIGHT: u32 = 680;

/// Stops and reaps a child process when dropped: SIGTERM first, so an X server removes
/// its socket and lock file (killed outright, it leaves them behind, and after a few
/// dozen runs every display number looked taken), SIGKILL if it has not gone in 2 s.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if matches!(self.0.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether display `n` is taken: its lock file names a process that is still running
/// (a lock left by a process that is gone is stale; Xvfb replaces it itself).
fn display_taken(n: u32) -> bool {
    let Ok(lock) = std::fs::read_to_string(format!("/tmp/.X{n}-lock")) else {
        return Path::new(&format!("/tmp/.X11-unix/X{n}")).exists();
    };
    lock.trim()
        .parse::<i32>()
        .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts an X server on a free display number.
fn start_xvfb() -> (Reaped, u32) {
    for n in 90..140 {
        if display_taken(n) {
            continue;
        }
        // A stale socket would look like the new server is up before it is.
        let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{n}"));
        let child = Command::new("Xvfb")
            .arg(format!(":{n}"))
            .args([
                "-screen",
                "0",
                &format!("{WIDTH}x{HEIGHT}x24"),
                "-nolisten",
                "tcp",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let xvfb = Reaped(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if Path::new(&format!("/tmp/.X11-unix/X{n}")).exists() {
                return (xvfb, n);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("no Xvfb display could be started");
}

/// An RGB screenshot of a whole X display, read from `xwd`'s output.
struct Shot {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

fn screenshot(display: u32) -> Option<Shot> {
    let out = Command::new("xwd")
        .args(["-root", "-silent", "-display", &format!(":{display}")])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_xwd(&out.stdout)
}

/// XWD (X Window Dump): a big-endian header of 25 CARD32s, the window name, the colour
/// map, then the pixels (here 24/32-bit TrueColor, channels given by masks).
fn parse_xwd(data: &[u8]) -> Option<Shot> {
    let field = |i: usize| -> Option<u32> {
        Some(u32::from_be_bytes(
            data.get(i * 4..i * 4 + 4)?.try_into().ok()?,
        ))
    };
    let header_size = field(0)? as usize;
    let (width, height) = (field(4)? as usize, field(5)? as usize);
    let byte_order = field(7)?; // 0: LSBFirst
    let bits_per_pixel = field(11)?;
    let bytes_per_line = field(12)? as usize;
    let masks = [field(14)?, field(15)?, field(16)?];
    let ncolors = field(19)? as usize;
    if bits_per_pixel != 32 {
        return None;
    }
    let pixels = data.get(header_size + ncolors * 12..)?;
    let mut rgb = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let b: [u8; 4] = pixels
                .get(y * bytes_per_line + x * 4..)?
                .get(..4)?
                .try_into()
                .ok()?;
            let v = if byte_order == 0 {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            };
            for m in masks {
                rgb.push(((v & m) >> m.trailing_zeros()) as u8);
            }
        }
    }
    Some(Shot { width, height, rgb })
}

/// Does the remote-video area (left and middle of the window, away from the self-view
/// in the bottom-right corner and the lobby's preview on the right) show the test
/// pattern? Its eight colour bars give many saturated hues; a dark or black window,
/// or the lobby's text, does not.
fn shows_test_pattern(shot: &Shot) -> (bool, String) {
    let (x0, x1) = (shot.width / 10, shot.width * 6 / 10);
    let (y0, y1) = (shot.height / 5, shot.height * 6 / 10);
    let mut hues = [0usize; 12];
    let (mut lit, mut total) = (0usize, 0usize);
    for y in (y0..y1).step_by(2) {
        for x in (x0..x1).step_by(2) {
            let p = &shot.rgb[(y * shot.width + x) * 3..][..3];
            let (r, g, b) = (f32::from(p[0]), f32::from(p[1]), f32::from(p[2]));
            let (max, min) = (r.max(g).max(b), r.min(g).min(b));
            total += 1;
            if max > 40.0 {
                lit += 1;
            }
            if max > 60.0 && (max - min) / max > 0.25 {
                let h = if max == r {
                    ((g - b) / (max - min)).rem_euclid(6.0)
                } else if max == g {
                    (b - r) / (max - min) + 2.0
                } else {
                    (r - g) / (max - min) + 4.0
                };
                hues[((h * 2.0) as usize).min(11)] += 1;
            }
        }
    }
    let distinct = hues.iter().filter(|&&n| n * 100 > total).count();
    let lit_share = lit as f64 / total.max(1) as f64;
    let ok = distinct >= 4 && lit_share > 0.6;
    (
        ok,
        format!("{distinct} hues, {:.0} % lit", lit_share * 100.0),
    )
}

fn save_png(shot: &Shot, path: &Path) {
    image::save_buffer(
        path,
        &shot.rgb,
        shot.width as u32,
        shot.height as u32,
        image::ColorType::Rgb8,
    )
    .unwrap();
}

fn artifacts() -> PathBuf {
    let dir = std::env::var_os("DUET_WINDOW_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/window-test"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn two_windows_call_each_other_and_show_the_remote_video() {
    if !have("Xvfb") || !have("xwd") {
        assert!(
            std::env::var("DUET_REQUIRE_WINDOW_TEST").is_err(),
            "Xvfb and xwd are required (apt-get install xvfb x11-apps)"
        );
        eprintln!("skipped: Xvfb or xwd missing (apt-get install xvfb x11-apps)");
        return;
    }
    let dir = artifacts();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime
        .block_on(signaling_server::Server::start(
            signaling_server::Config::ephemeral(),
        ))
        .unwrap();
    let home = tempdir();
    let mut windows = Vec::new();
    for (name, extra) in [("ada", None), ("bo", Some("--stats"))] {
        let (xvfb, display) = start_xvfb();
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let app = Command::new(env!("CARGO_BIN_EXE_duet"))
            .args(["--server", &server.ws_url(), "--room", "window-test"])
            .args(["--name", name, "--video", "test-pattern", "--audio", "sine"])
            .arg("--auto-call")
            .args(extra)
            .env("DISPLAY", format!(":{display}"))
            // Each app its own settings folder, so neither reads the other's lobby.
            .env("HOME", home.join(name))
            .env("XDG_DATA_HOME", home.join(name).join("data"))
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        windows.push((name, display, Reaped(app), xvfb));
    }

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut done = vec![None; windows.len()];
    while Instant::now() < deadline && done.iter().any(Option::is_none) {
        std::thread::sleep(Duration::from_secs(1));
        for (i, (name, display, app, _)) in windows.iter_mut().enumerate() {
            if done[i].is_some() {
                continue;
            }
            if let Ok(Some(status)) = app.0.try_wait() {
                panic!("the {name} window exited early ({status}); see {name}.log");
            }
            let Some(shot) = screenshot(*display) else {
                continue;
            };
            save_png(&shot, &dir.join(format!("{name}.png")));
            let (ok, detail) = shows_test_pattern(&shot);
            if ok {
                eprintln!("{name}: remote video shown ({detail})");
                done[i] = Some(detail);
            }
        }
    }
    for (i, (name, ..)) in windows.iter().enumerate() {
        assert!(
            done[i].is_some(),
            "the {name} window never showed the remote test pattern; see {}",
            dir.join(format!("{name}.png")).display()
        );
    }
    // A few seconds into the call (rates in the stats overlay have settled): the
    // pictures for the README.
    std::thread::sleep(Duration::from_secs(4));
    for (name, display, ..) in &windows {
        let shot = screenshot(*display).unwrap();
        assert!(shows_test_pattern(&shot).0, "{name}: the video went away");
        save_png(&shot, &dir.join(format!("{name}-in-call.png")));
    }
    // Both in one room, as the server sees it.
    assert_eq!(server.room_members("window-test"), Some(2));
    drop(windows);
    runtime.block_on(server.stop());
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("duet-window-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
