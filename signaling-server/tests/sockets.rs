//! Thousands of connections from one address that never send a byte (what a port scanner
//! or a slowloris leaves behind), as many as the file limit allows up to 20,000: past
//! `--max-tcp-connections-per-ip` they are answered 429 and closed at once, so the
//! server's file descriptors and memory stay bounded, a client from another address is
//! served within 1 s, and shutdown is not held up.
//!
//! A file of its own: the test takes most of the process's file descriptors, which the
//! tests of another file, run in parallel threads of one process, would then miss.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::proc::rss_bytes;
use common::{request, start_server};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::net::TcpSocket;

/// The soft file limit raised to the hard one (at most 60,000); returns it.
fn raise_file_limit() -> u64 {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let wanted = hard.min(60_000).max(soft);
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).is_ok() {
        wanted
    } else {
        soft
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_from_one_address_are_capped() {
    const CAP: usize = 100;
    let limit = raise_file_limit() as usize;
    // Room for the server's side of the connections it keeps, and everything else.
    let n = 20_000.min(limit.saturating_sub(2_000).max(limit / 2));
    assert!(n > 2 * CAP, "file limit {limit} too small for this test");
    let s = start_server(|c| c.max_tcp_connections_per_ip = CAP).await;
    let before = rss_bytes("self");
    let started = Instant::now();
    // From 127.0.0.2 (the normal client below comes from 127.0.0.1), four at a time.
    let addr = s.local_addr();
    let openers: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(async move {
                let mut opened = Vec::new();
                for _ in (i..n).step_by(4) {
                    let socket = TcpSocket::new_v4().unwrap();
                    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                    opened.push(socket.connect(addr).await.unwrap());
                }
                opened
            })
        })
        .collect();
    let mut idle = Vec::with_capacity(n);
    for opener in openers {
        idle.extend(opener.await.unwrap());
    }
    println!("{n} connections opened in {:?}", started.elapsed());
    // The normal client is served while they are all held.
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        request(&s, "GET", "/healthz", &[], b""),
    )
    .await
    .expect("a normal client was not served within 1 s");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    // The server keeps at most CAP of them; the rest were told 429 and closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let open = loop {
        let open = idle
            .iter()
            .filter(|tcp| {
                let mut buf = [0u8; 128];
                matches!(tcp.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count();
        if open <= CAP || Instant::now() > deadline {
            break open;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        open <= CAP,
        "{open} of {n} connections still open (cap {CAP})"
    );
    assert!(open > 0, "the first {CAP} are served as usual");
    let grown = rss_bytes("self").saturating_sub(before);
    println!(
        "{open} of {n} held by the server; this process grew {} MB",
        grown >> 20
    );
    // The client side's sockets are in this process too (a few hundred bytes each);
    // a server holding all of them would grow by several hundred MB.
    assert!(grown < 100 << 20, "grew {} MB", grown >> 20);
    let stopping = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), s.stop())
        .await
        .expect("stop() hung");
    assert!(stopping.elapsed() < Duration::from_secs(5));
    drop(idle);
}
