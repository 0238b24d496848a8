//! Direct calls by name: every row of the protocol's Direct calls tables, each on one
//! server and with the clients on two instances sharing a `redis-server` (cluster mode).
#![allow(clippy::unwrap_used)]

mod common;

on_both_topologies!(
    register_claims_a_name_until_the_connection_closes,
    call_accept_and_talk,
    reject_tells_the_caller_and_removes_the_room,
    unanswered_call_times_out,
    caller_giving_up_cancels_the_ringing,
    callee_dropping_while_rung_is_offline,
    offline_and_busy,
    call_requires_registration_and_a_valid_target,
    only_the_callee_can_answer_and_the_ringing_room_is_closed_to_others,
    joining_elsewhere_while_ringing_cancels_the_call,
);

use std::time::Duration;

use common::{Client, Servers, Target, Topology};
use serde_json::{Value, json};

async fn registered(s: &impl Target, name: &str) -> Client {
    let mut c = Client::connect(s.next_server()).await;
    c.send(json!({"type":"register","name":name})).await;
    assert_eq!(
        c.expect("registered").await,
        json!({"type":"registered","name":name})
    );
    c
}

/// alice calls bob; returns the call id after checking what both sides hear.
async fn ring(alice: &mut Client, bob: &mut Client) -> String {
    alice.send(json!({"type":"call","to":"bob"})).await;
    let ringing = alice.expect("ringing").await;
    let call_id = ringing["call_id"].as_str().unwrap().to_owned();
    assert_eq!(ringing["to"], "bob");
    let joined = alice.expect("joined").await;
    assert_eq!(joined["room"], call_id.as_str());
    assert_eq!(joined["members"], 1);
    assert_eq!(joined["host"], true);
    let incoming = bob.expect("incoming_call").await;
    assert_eq!(
        incoming,
        json!({"type":"incoming_call","call_id":call_id,"from":"alice"})
    );
    call_id
}

fn is_unguessable(id: &Value) -> bool {
    id.as_str().is_some_and(|s| s.len() >= 26)
}

async fn register_claims_a_name_until_the_connection_closes(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let alice = registered(&s, "alice").await;
    let mut other = s.client().await;
    other.send(json!({"type":"register","name":"alice"})).await;
    other.expect_error("name_taken").await;
    other.send(json!({"type":"register","name":""})).await;
    other.expect_error("bad_field").await;
    other.send(json!({"type":"register"})).await;
    other.expect_error("bad_field").await;
    drop(alice);
    // Once alice's connection is gone the name is free again.
    let mut tries = 0;
    loop {
        other.send(json!({"type":"register","name":"alice"})).await;
        let m = other.recv().await;
        if m["type"] == "registered" {
            break;
        }
        tries += 1;
        assert!(tries < 50, "name never freed: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.stop().await;
}

async fn call_accept_and_talk(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let mut alice = registered(&s, "alice").await;
    let mut bob = registered(&s, "bob").await;
    let call_id = ring(&mut alice, &mut bob).await;
    assert!(call_id.len() >= 26, "call ids are unguessable: {call_id}");

    bob.send(json!({"type":"accept","call_id":call_id})).await;
    let joined = bob.expect("joined").await;
    assert_eq!(joined["room"], call_id.as_str());
    assert_eq!(joined["members"], 2);
    assert_eq!(joined["host"], false);
    assert_eq!(joined["peers"][0]["name"], "alice");
    let pj = alice.expect("peer_joined").await;
    assert_eq!(pj["name"], "bob");
    assert_eq!(pj["peer_id"], joined["peer_id"]);

    // From here it is an ordinary room: the member already there offers.
    alice.send(json!({"type":"offer","sdp":"v=0"})).await;
    assert_eq!(bob.expect("offer").await["sdp"], "v=0");
    bob.send(json!({"type":"leave"})).await;
    assert_eq!(alice.expect("peer_left").await["reason"], "left");
    s.stop().await;
}

async fn reject_tells_the_caller_and_removes_the_room(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let mut alice = registered(&s, "alice").await;
    let mut bob = registered(&s, "bob").await;
    let call_id = ring(&mut alice, &mut bob).await;
    bob.send(json!({"type":"reject","call_id":call_id})).await;
    assert_eq!(
        alice.expect("call_rejected").await,
        json!({"type":"call_rejected","call_id":call_id,"reason":"rejected"})
    );
    assert_eq!(s.members(&call_id).await, None);
    alice.send(json!({"type":"offer","sdp":"x"})).await;
    alice.expect_error("not_in_call").await;
    // The call is over: accepting it now is an unknown call.
    bob.send(json!({"type":"accept","call_id":call_id})).await;
    bob.expect_error("unknown_call").await;
    s.stop().await;
}

async fn unanswered_call_times_out(t: Topology) {
    let Some(s) = Servers::start(t, |c| c.ring_timeout = Duration::from_millis(300)).await else {
        return;
    };
    let mut alice = registered(&s, "alice").await;
    let mut bob = registered(&s, "bob").await;
    let call_id = ring(&mut alice, &mut bob).await;
    assert_eq!(
        alice.expect("call_rejected").await,
        json!({"type":"call_rejected","call_id":call_id,"reason":"no_answer"})
    );
    assert_eq!(
        bob.expect("call_cancelled").await,
        json!({"type":"call_cancelled","call_id":call_id})
    );
    assert_eq!(s.members(&call_id).await, None);
    s.stop().await;
}

async fn caller_giving_up_cancels_the_ringing(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let mut alice = registered(&s, "alice").await;
    let mut bob = registered(&s, "bob").await;
    let call_id = ring(&mut alice, &mut bob).await;
    alice.send(json!({"type":"leave"})).await;
    assert_eq!(
        bob.expect("call_cancelled").await["call_id"],
        call_id.as_str()
    );
    bob.send(json!({"type":"accept","call_id":call_id})).await;
    bob.expect_error("unknown_call").await;

    // Hanging up by dropping the connection cancels too.
    let call_id = ring(&mut alice, &mut bob).await;
    drop(alice);
    assert_eq!(
        bob.expect("call_cancelled").await["call_id"],
        call_id.as_str()
    );
    s.stop().await;
}

async fn callee_dropping_while_rung_is_offline(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let mut alice = registered(&s, "alice").await;
    let mut bob = registered(&s, "bob").await;
    let call_id = ring(&mut alice, &mut bob).await;
    drop(bob);
    let r = alice.expect("call_rejected").await;
    assert_eq!(r["call_id"], call_id.as_str());
    assert_eq!(r["reason"], "offline");
    s.stop().await;
}

async fn offline_and_busy(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let mut alice = registered(&s, "alice").await;
    alice.send(json!({"type":"call","to":"nobody"})).await;
    let r = alice.expect("call_rejected").await;
    assert_eq!(r["reason"], "offline");
    assert!(is_unguessable(&r["call_id"]), "{r}");
    alice.expect_silence(Duration::from_millis(50)).await; // no ringing, no joined

    // bob in a room is busy.
    let mut bob = registered(&s, "bob").await;
    bob.join("elsewhere").await;
    alice.send(json!({"type":"call","to":"bob"})).await;
    assert_eq!(alice.expect("call_rejected").await["reason"], "busy");
    bob.send(json!({"type":"leave"})).await;
    // `leave` has no answer: wait until it has taken effect (on a cluster it is a Redis
    // round trip, which carol's calling could otherwise overtake).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while s.members("elsewhere").await == Some(1) {
        assert!(tokio::time::Instant::now() < deadline, "bob never left");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // bob being rung by carol is busy for alice.
    let mut carol = registered(&s, "carol").await;
    carol.send(json!({"type":"call","to":"bob"})).await;
    carol.expect("ringing").await;
    carol.expect("joined").await;
    bob.expect("incoming_call").await;
    alice.send(json!({"type":"call","to":"bob"})).await;
    let r = alice.expect("call_rejected").await;
    assert_eq!(r["reason"], "busy");
    assert!(is_unguessable(&r["call_id"]));
    s.stop().await;
}

async fn call_requires_registration_and_a_valid_target(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let mut anon = s.client().await;
    anon.send(json!({"type":"call","to":"bob"})).await;
    anon.expect_error("bad_field").await;
    let mut alice = registered(&s, "alice").await;
    alice.send(json!({"type":"call","to":"alice"})).await;
    alice.expect_error("bad_field").await;
    alice.send(json!({"type":"call"})).await;
    alice.expect_error("bad_field").await;
    alice
        .send(json!({"type":"accept","call_id":"call-nothing"}))
        .await;
    alice.expect_error("unknown_call").await;
    alice
        .send(json!({"type":"reject","call_id":"call-nothing"}))
        .await;
    alice.expect_error("unknown_call").await;
    alice.send(json!({"type":"accept"})).await;
    alice.expect_error("bad_field").await;
    s.stop().await;
}

async fn joining_elsewhere_while_ringing_cancels_the_call(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let mut alice = registered(&s, "alice").await;
    let mut bob = registered(&s, "bob").await;
    let call_id = ring(&mut alice, &mut bob).await;
    let j = alice.join("elsewhere").await;
    assert_eq!(j["members"], 1);
    assert_eq!(
        bob.expect("call_cancelled").await,
        json!({"type":"call_cancelled","call_id":call_id})
    );
    bob.send(json!({"type":"accept","call_id":call_id})).await;
    bob.expect_error("unknown_call").await;
    alice.expect_silence(Duration::from_millis(50)).await;
    s.stop().await;
}

async fn only_the_callee_can_answer_and_the_ringing_room_is_closed_to_others(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let mut alice = registered(&s, "alice").await;
    let mut bob = registered(&s, "bob").await;
    let mut eve = registered(&s, "eve").await;
    let call_id = ring(&mut alice, &mut bob).await;
    eve.send(json!({"type":"accept","call_id":call_id})).await;
    eve.expect_error("unknown_call").await;
    eve.send(json!({"type":"reject","call_id":call_id})).await;
    eve.expect_error("unknown_call").await;
    eve.send(json!({"type":"join","room":call_id})).await;
    eve.expect("room_full").await;
    // The call still works for bob.
    bob.send(json!({"type":"accept","call_id":call_id})).await;
    bob.expect("joined").await;
    alice.expect("peer_joined").await;
    s.stop().await;
}
