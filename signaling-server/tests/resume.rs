//! Seats that survive a dropped WebSocket: `peer_reconnecting`, `resume` with the token
//! from `joined`, the queue of what was sent meanwhile, and the grace running out; each
//! on one server and with the clients on two instances sharing a `redis-server` (a seat
//! is then resumed on the other instance).
#![allow(clippy::unwrap_used)]

mod common;

on_both_topologies!(
    a_dropped_member_resumes_its_seat_and_gets_what_was_sent_meanwhile,
    the_away_queue_keeps_the_newest_within_its_bounds,
    a_wrong_token_is_refused_and_the_seat_stays_taken,
    when_the_grace_runs_out_the_member_is_gone_as_disconnected,
    a_resume_after_the_grace_fails_and_a_fresh_join_works,
    with_no_grace_a_drop_is_peer_left_at_once_and_there_is_no_token,
    leave_and_end_room_still_act_at_once,
    a_resume_takes_over_a_connection_not_yet_noticed_dead,
);

use std::time::Duration;

use common::{Client, Servers, Topology, pair};
use serde_json::{Value, json};

/// Long enough that a resume in a test never races the sweep.
const LONG_GRACE: Duration = Duration::from_secs(30);
/// Short enough that waiting for its end stays well inside [`common::WAIT`].
const SHORT_GRACE: Duration = Duration::from_millis(300);

fn token(joined: &Value) -> String {
    let t = joined["resume_token"].as_str().expect("a resume_token");
    assert!(t.len() >= 32, "{joined}");
    t.to_owned()
}

async fn resume(c: &mut Client, room: &str, peer_id: &str, token: &str) {
    c.send(json!({"type":"resume","room":room,"peer_id":peer_id,"resume_token":token}))
        .await;
}

async fn a_dropped_member_resumes_its_seat_and_gets_what_was_sent_meanwhile(t: Topology) {
    let Some(s) = Servers::start(t, |c| c.resume_grace = LONG_GRACE).await else {
        return;
    };
    let mut a = s.client().await;
    let mut b = s.client().await;
    let ja = a.join_named("r", "Ann").await;
    let jb = b.join_named("r", "Bob").await;
    a.expect("peer_joined").await;
    let a_id = ja["peer_id"].as_str().unwrap().to_owned();
    let b_id = jb["peer_id"].as_str().unwrap().to_owned();
    let b_token = token(&jb);
    assert_ne!(token(&ja), b_token);

    drop(b); // the TCP connection just goes away: no `leave`, no close frame
    let note = a.expect("peer_reconnecting").await;
    assert_eq!(
        note,
        json!({"type":"peer_reconnecting","peer_id":b_id.as_str()})
    );
    // Relaying to an away member is not an error: it waits for the member.
    a.send(json!({"type":"offer","sdp":"v=0 while away"})).await;
    a.send(json!({"type":"candidate","candidate":null})).await;

    let mut b2 = s.client().await;
    resume(&mut b2, "r", &b_id, &b_token).await;
    let back = b2.expect("joined").await;
    assert_eq!(back["room"], "r");
    assert_eq!(back["peer_id"], b_id.as_str());
    assert_eq!(back["members"], 2);
    assert_eq!(back["host"], false);
    assert_eq!(
        back["peers"],
        json!([{"peer_id":a_id.as_str(),"name":"Ann"}])
    );
    let fresh = token(&back);
    assert_ne!(fresh, b_token);
    let offer = b2.expect("offer").await;
    assert_eq!(
        offer,
        json!({"type":"offer","from":a_id.as_str(),"sdp":"v=0 while away"})
    );
    assert_eq!(b2.expect("candidate").await["candidate"], Value::Null);

    // The partner hears nothing about the resume: the next thing it gets is the answer.
    b2.send(json!({"type":"answer","sdp":"v=0 answer"})).await;
    let answer = a.expect("answer").await;
    assert_eq!(answer["from"], b_id.as_str());
    a.send(json!({"type":"offer","sdp":"again"})).await;
    assert_eq!(b2.expect("offer").await["sdp"], "again");
    assert_eq!(s.members("r").await, Some(2));

    // The spent token no longer works; the fresh one does, once more.
    drop(b2);
    a.expect("peer_reconnecting").await;
    let mut b3 = s.client().await;
    resume(&mut b3, "r", &b_id, &b_token).await;
    b3.expect_error("resume_failed").await;
    resume(&mut b3, "r", &b_id, &fresh).await;
    assert_eq!(b3.expect("joined").await["peer_id"], b_id.as_str());
    s.stop().await;
}

async fn a_wrong_token_is_refused_and_the_seat_stays_taken(t: Topology) {
    let Some(s) = Servers::start(t, |c| c.resume_grace = LONG_GRACE).await else {
        return;
    };
    let mut a = s.client().await;
    let ja = a.join("r").await;
    let (a_id, a_token) = (ja["peer_id"].as_str().unwrap().to_owned(), token(&ja));
    let mut b = s.client().await;
    b.join("r").await;
    a.expect("peer_joined").await;
    a.close().await; // a clean close without `leave` also keeps the seat

    let note = b.expect("peer_reconnecting").await;
    assert_eq!(note["peer_id"], a_id.as_str());
    let mut thief = s.client().await;
    resume(&mut thief, "r", &a_id, &"x".repeat(32)).await;
    let e = thief.expect_error("resume_failed").await;
    assert!(e["message"].as_str().unwrap().contains("token"), "{e}");
    for (room, peer) in [("nope", a_id.as_str()), ("r", "nobody")] {
        resume(&mut thief, room, peer, &a_token).await;
        thief.expect_error("resume_failed").await;
    }
    // A third person cannot take the away member's seat, and the refused
    // connection is still usable.
    thief.send(json!({"type":"join","room":"r"})).await;
    assert_eq!(thief.expect("room_full").await["members"], 2);
    thief.join("elsewhere").await;
    assert_eq!(s.members("r").await, Some(2));

    // The owner still gets its seat back, host role included.
    let mut a2 = s.client().await;
    resume(&mut a2, "r", &a_id, &a_token).await;
    let back = a2.expect("joined").await;
    assert_eq!(back["host"], true);
    b.send(json!({"type":"offer","sdp":"x"})).await;
    assert_eq!(a2.expect("offer").await["sdp"], "x");
    s.stop().await;
}

async fn when_the_grace_runs_out_the_member_is_gone_as_disconnected(t: Topology) {
    let Some(s) = Servers::start(t, |c| c.resume_grace = SHORT_GRACE).await else {
        return;
    };
    let (a, mut b, a_id, b_id) = pair(&s, "r").await;
    drop(a); // the host drops
    assert_eq!(
        b.expect("peer_reconnecting").await["peer_id"],
        a_id.as_str()
    );
    // `expect` waits up to 3 s; the grace is 300 ms.
    let left = b.expect("peer_left").await;
    assert_eq!(
        left,
        json!({"type":"peer_left","peer_id":a_id.as_str(),"reason":"disconnected"})
    );
    assert_eq!(b.expect("host_changed").await["peer_id"], b_id.as_str());
    assert_eq!(s.members("r").await, Some(1));
    // The seat is free again for anybody.
    let mut c = s.client().await;
    assert_eq!(c.join("r").await["members"], 2);
    s.stop().await;
}

async fn a_resume_after_the_grace_fails_and_a_fresh_join_works(t: Topology) {
    let Some(s) = Servers::start(t, |c| c.resume_grace = SHORT_GRACE).await else {
        return;
    };
    let mut a = s.client().await;
    let mut b = s.client().await;
    a.join("r").await;
    let jb = b.join("r").await;
    a.expect("peer_joined").await;
    let (b_id, b_token) = (jb["peer_id"].as_str().unwrap().to_owned(), token(&jb));
    drop(b);
    a.expect("peer_reconnecting").await;
    a.expect("peer_left").await;
    let mut b2 = s.client().await;
    resume(&mut b2, "r", &b_id, &b_token).await;
    b2.expect_error("resume_failed").await;
    let rejoined = b2.join("r").await;
    assert_ne!(rejoined["peer_id"], b_id.as_str());
    assert_eq!(rejoined["members"], 2);
    a.expect("peer_joined").await;
    s.stop().await;
}

async fn with_no_grace_a_drop_is_peer_left_at_once_and_there_is_no_token(t: Topology) {
    let Some(s) = Servers::start(t, |c| c.resume_grace = Duration::ZERO).await else {
        return;
    };
    let mut a = s.client().await;
    let mut b = s.client().await;
    let ja = a.join("r").await;
    let jb = b.join("r").await;
    a.expect("peer_joined").await;
    assert!(ja.get("resume_token").is_none(), "{ja}");
    assert!(jb.get("resume_token").is_none(), "{jb}");
    let b_id = jb["peer_id"].as_str().unwrap().to_owned();
    drop(b);
    let left = a.expect("peer_left").await;
    assert_eq!(left["reason"], "disconnected");
    let mut b2 = s.client().await;
    resume(&mut b2, "r", &b_id, &"x".repeat(32)).await;
    b2.expect_error("resume_failed").await;
    s.stop().await;
}

async fn leave_and_end_room_still_act_at_once(t: Topology) {
    let Some(s) = Servers::start(t, |c| c.resume_grace = LONG_GRACE).await else {
        return;
    };
    let (mut a, mut b, _, b_id) = pair(&s, "r").await;
    b.send(json!({"type":"leave"})).await;
    assert_eq!(
        a.expect("peer_left").await,
        json!({"type":"peer_left","peer_id":b_id.as_str(),"reason":"left"})
    );
    // The host ends the room while the partner is away: the seat ends with it.
    let mut c = s.client().await;
    let jc = c.join("r").await;
    a.expect("peer_joined").await;
    let (c_id, c_token) = (jc["peer_id"].as_str().unwrap().to_owned(), token(&jc));
    drop(c);
    a.expect("peer_reconnecting").await;
    a.send(json!({"type":"end_room"})).await;
    a.expect("room_ended").await;
    let mut c2 = s.client().await;
    resume(&mut c2, "r", &c_id, &c_token).await;
    let e = c2.expect_error("resume_failed").await;
    assert!(e["message"].as_str().unwrap().contains("ended"), "{e}");
    c2.send(json!({"type":"join","room":"r"})).await;
    c2.expect_error("room_ended").await;
    s.stop().await;
}

async fn a_resume_takes_over_a_connection_not_yet_noticed_dead(t: Topology) {
    let Some(s) = Servers::start(t, |c| c.resume_grace = LONG_GRACE).await else {
        return;
    };
    let mut a = s.client().await;
    let mut b = s.client().await;
    a.join_named("r", "Ann").await;
    let jb = b.join("r").await;
    a.expect("peer_joined").await;
    let (b_id, b_token) = (jb["peer_id"].as_str().unwrap().to_owned(), token(&jb));

    // b's client resumes on a new connection while the old one still looks open
    // (a path that died silently): the token proves it, the new connection wins.
    let mut b2 = s.client().await;
    resume(&mut b2, "r", &b_id, &b_token).await;
    let back = b2.expect("joined").await;
    assert_eq!(back["peer_id"], b_id.as_str());
    assert_eq!(back["peers"][0]["name"], "Ann");
    assert_eq!(
        a.expect("peer_reconnecting").await["peer_id"],
        b_id.as_str()
    );
    a.send(json!({"type":"offer","sdp":"to the new connection"}))
        .await;
    assert_eq!(b2.expect("offer").await["sdp"], "to the new connection");
    b2.send(json!({"type":"answer","sdp":"from it"})).await;
    assert_eq!(a.expect("answer").await["sdp"], "from it");
    b.expect_silence(Duration::from_millis(100)).await;
    s.stop().await;
}

/// Returns once the server has handled everything `c` sent before (its messages are
/// handled in order; the error for a bad join answers only after them).
async fn queued(c: &mut Client) {
    c.send(json!({"type":"join","room":""})).await;
    c.expect_error("bad_field").await;
}

/// The `sdp` of the next `n` offers.
async fn offers(c: &mut Client, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(c.expect("offer").await["sdp"].as_str().unwrap().to_owned());
    }
    got
}

/// What waits for an away member is bounded in messages (64) and bytes (256 KiB), on one
/// instance and in Redis alike: the oldest go first.
async fn the_away_queue_keeps_the_newest_within_its_bounds(t: Topology) {
    let Some(s) = Servers::start(t, |c| c.resume_grace = LONG_GRACE).await else {
        return;
    };
    let mut a = s.client().await;
    let mut b = s.client().await;
    a.join("q").await;
    let jb = b.join("q").await;
    a.expect("peer_joined").await;
    let b_id = jb["peer_id"].as_str().unwrap().to_owned();

    // 70 small messages: the 6 oldest are dropped.
    drop(b);
    a.expect("peer_reconnecting").await;
    for i in 0..70 {
        a.send(json!({"type":"offer","sdp":format!("n{i}")})).await;
    }
    queued(&mut a).await;
    let mut b2 = s.client().await;
    resume(&mut b2, "q", &b_id, &token(&jb)).await;
    let back = b2.expect("joined").await;
    let got = offers(&mut b2, 64).await;
    let want: Vec<String> = (6..70).map(|i| format!("n{i}")).collect();
    assert_eq!(got, want);
    b2.expect_silence(Duration::from_millis(100)).await;

    // Six messages of 60 kB: only the newest four fit in 256 KiB.
    drop(b2);
    a.expect("peer_reconnecting").await;
    for i in 0..6 {
        let sdp = format!("{i}{}", "x".repeat(60_000));
        a.send(json!({"type":"offer","sdp":sdp})).await;
    }
    queued(&mut a).await;
    let mut b3 = s.client().await;
    resume(&mut b3, "q", &b_id, &token(&back)).await;
    b3.expect("joined").await;
    let got = offers(&mut b3, 4).await;
    let firsts: Vec<char> = got.iter().map(|g| g.chars().next().unwrap()).collect();
    assert_eq!(firsts, ['2', '3', '4', '5']);
    b3.expect_silence(Duration::from_millis(100)).await;
    s.stop().await;
}
