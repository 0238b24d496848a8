//! Rooms: every row of the protocol's Rooms tables, against a real server on loopback.
//! Most tests run twice (`on_both_topologies!`): on one server, and with the members on
//! two instances sharing a `redis-server` (cluster mode).
#![allow(clippy::unwrap_used)]

mod common;

on_both_topologies!(
    first_member_is_host_and_second_sees_the_first,
    third_member_gets_room_full_and_changes_nothing,
    offer_answer_candidates_are_relayed_in_order_with_from,
    relay_refused_when_alone_or_outside_a_room,
    host_leaving_hands_over_and_only_host_ends_the_room,
    join_while_in_a_room_leaves_the_old_one,
    nothing_crosses_rooms,
    ten_simultaneous_joins_give_two_joined_and_eight_room_full,
    bad_join_fields_are_refused,
    room_caps_hold_across_instances,
);

use std::time::Duration;

use common::{Client, Servers, Topology, pair, start_server};
use serde_json::json;

async fn first_member_is_host_and_second_sees_the_first(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let mut a = s.client().await;
    let mut b = s.client().await;
    assert_eq!(a.welcome["protocol"], 1);
    assert!(a.welcome["ice_servers"].is_array());
    assert!(
        a.welcome["server"]
            .as_str()
            .unwrap()
            .starts_with("signaling-server ")
    );

    let ja = a.join_named("  standup  ", "Ann").await;
    assert_eq!(ja["room"], "standup", "room names are trimmed");
    assert_eq!(ja["members"], 1);
    assert_eq!(ja["host"], true);
    assert_eq!(ja["peers"], json!([]));
    let a_id = ja["peer_id"].as_str().unwrap().to_owned();

    let jb = b.join_named("standup", "Bob").await;
    assert_eq!(jb["members"], 2);
    assert_eq!(jb["host"], false);
    assert_eq!(jb["peers"], json!([{"peer_id": a_id, "name": "Ann"}]));
    let pj = a.expect("peer_joined").await;
    assert_eq!(pj["peer_id"], jb["peer_id"]);
    assert_eq!(pj["name"], "Bob");
    assert_ne!(a_id, jb["peer_id"].as_str().unwrap());
    assert_eq!(s.members("standup").await, Some(2));
    s.stop().await;
}

async fn third_member_gets_room_full_and_changes_nothing(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let (mut a, mut b, _, _) = pair(&s, "r").await;
    let mut c = s.client().await;
    c.send(json!({"type":"join","room":"r"})).await;
    let full = c.expect("room_full").await;
    assert_eq!(full, json!({"type":"room_full","room":"r","members":2}));
    a.expect_silence(Duration::from_millis(100)).await;
    b.expect_silence(Duration::from_millis(1)).await;
    // c is in no room: relaying is refused.
    c.send(json!({"type":"offer","sdp":"v=0"})).await;
    c.expect_error("not_in_call").await;
    s.stop().await;
}

async fn offer_answer_candidates_are_relayed_in_order_with_from(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let (mut a, mut b, a_id, b_id) = pair(&s, "relay").await;
    a.send(json!({"type":"offer","sdp":"v=0 offer"})).await;
    let offer = b.expect("offer").await;
    assert_eq!(offer, json!({"type":"offer","from":a_id,"sdp":"v=0 offer"}));
    b.send(json!({"type":"answer","sdp":"v=0 answer","ignored":true}))
        .await;
    let answer = a.expect("answer").await;
    assert_eq!(
        answer,
        json!({"type":"answer","from":b_id,"sdp":"v=0 answer"})
    );

    for i in 0..150 {
        let mid = if i % 2 == 0 { json!("0") } else { json!(null) };
        a.send(json!({"type":"candidate","candidate":{
            "candidate": format!("candidate:{i} 1 udp 2130706431 127.0.0.1 {} typ host", 5000 + i),
            "sdp_mid": mid, "sdp_mline_index": 0}}))
            .await;
    }
    a.send(json!({"type":"candidate","candidate":null})).await;
    for i in 0..150 {
        let c = b.expect("candidate").await;
        assert_eq!(c["from"], a_id.as_str());
        let text = c["candidate"]["candidate"].as_str().unwrap();
        assert!(
            text.starts_with(&format!("candidate:{i} ")),
            "out of order: {text}"
        );
        if i % 2 == 1 {
            assert!(c["candidate"]["sdp_mid"].is_null());
        }
    }
    let end = b.expect("candidate").await;
    assert!(
        end["candidate"].is_null(),
        "end-of-candidates relayed as null: {end}"
    );
    s.stop().await;
}

async fn relay_refused_when_alone_or_outside_a_room(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let mut a = s.client().await;
    for msg in [
        json!({"type":"offer","sdp":"x"}),
        json!({"type":"answer","sdp":"x"}),
        json!({"type":"candidate","candidate":null}),
        json!({"type":"leave"}),
        json!({"type":"end_room"}),
    ] {
        a.send(msg).await;
        a.expect_error("not_in_call").await;
    }
    a.join("alone").await;
    a.send(json!({"type":"offer","sdp":"x"})).await;
    a.expect_error("not_in_call").await;
    s.stop().await;
}

#[tokio::test]
async fn leave_says_left_and_disconnect_says_disconnected() {
    // A dropped member keeps its seat for the resume grace; short here, so that the
    // final `peer_left` comes quickly.
    let s = start_server(|c| c.resume_grace = Duration::from_millis(300)).await;
    let (mut a, mut b, a_id, b_id) = pair(&s, "bye").await;
    b.send(json!({"type":"leave"})).await;
    let left = a.expect("peer_left").await;
    assert_eq!(
        left,
        json!({"type":"peer_left","peer_id":b_id,"reason":"left"})
    );
    // After leaving, b may not relay.
    b.send(json!({"type":"offer","sdp":"x"})).await;
    b.expect_error("not_in_call").await;

    let mut c = Client::connect(&s).await;
    let jc = c.join("bye").await;
    assert_eq!(jc["members"], 2);
    a.expect("peer_joined").await;
    drop(c); // TCP connection closed without `leave` or a close frame
    assert_eq!(
        a.expect("peer_reconnecting").await["peer_id"],
        jc["peer_id"]
    );
    let gone = a.expect("peer_left").await;
    assert_eq!(gone["peer_id"], jc["peer_id"]);
    assert_eq!(gone["reason"], "disconnected");

    let mut d = Client::connect(&s).await;
    d.join("bye").await;
    a.expect("peer_joined").await;
    d.close().await; // a clean WebSocket close without `leave` is still "disconnected"
    a.expect("peer_reconnecting").await;
    assert_eq!(a.expect("peer_left").await["reason"], "disconnected");
    assert_eq!(s.room_members("bye"), Some(1));
    let _ = a_id;
    s.stop().await;
}

async fn host_leaving_hands_over_and_only_host_ends_the_room(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let (mut a, mut b, _, b_id) = pair(&s, "hosted").await;
    b.send(json!({"type":"end_room"})).await;
    b.expect_error("not_host").await;
    a.expect_silence(Duration::from_millis(50)).await;

    a.send(json!({"type":"leave"})).await;
    assert_eq!(b.expect("peer_left").await["reason"], "left");
    let hc = b.expect("host_changed").await;
    assert_eq!(hc, json!({"type":"host_changed","peer_id":b_id}));

    // The newcomer is not host; b (now host) ends the room for both.
    let mut c = s.client().await;
    assert_eq!(c.join("hosted").await["host"], false);
    b.expect("peer_joined").await;
    b.send(json!({"type":"end_room"})).await;
    let ended = json!({"type":"room_ended","room":"hosted","reason":"host_ended"});
    assert_eq!(b.expect("room_ended").await, ended);
    assert_eq!(c.expect("room_ended").await, ended);
    // Nobody is in it any more, and it cannot be re-entered.
    c.send(json!({"type":"offer","sdp":"x"})).await;
    c.expect_error("not_in_call").await;
    a.send(json!({"type":"join","room":"hosted"})).await;
    a.expect_error("room_ended").await;
    s.stop().await;
}

async fn join_while_in_a_room_leaves_the_old_one(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let (mut a, mut b, a_id, _) = pair(&s, "one").await;
    let j = a.join("two").await;
    assert_eq!(j["members"], 1);
    let left = b.expect("peer_left").await;
    assert_eq!(
        left,
        json!({"type":"peer_left","peer_id":a_id,"reason":"left"})
    );
    assert_eq!(b.expect("host_changed").await["type"], "host_changed");
    assert_eq!(s.members("one").await, Some(1));
    assert_eq!(s.members("two").await, Some(1));
    // A refused join (full room) keeps the old membership.
    let (_c, _d, _, _) = pair(&s, "full").await;
    a.send(json!({"type":"join","room":"full"})).await;
    a.expect("room_full").await;
    assert_eq!(s.members("two").await, Some(1));
    s.stop().await;
}

async fn nothing_crosses_rooms(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let (mut a, mut b, _, _) = pair(&s, "room-a").await;
    let (mut c, mut d, _, _) = pair(&s, "room-b").await;
    for i in 0..20 {
        a.send(json!({"type":"offer","sdp":format!("a{i}")})).await;
        c.send(json!({"type":"offer","sdp":format!("c{i}")})).await;
    }
    for i in 0..20 {
        assert_eq!(b.expect("offer").await["sdp"], format!("a{i}"));
        assert_eq!(d.expect("offer").await["sdp"], format!("c{i}"));
    }
    a.send(json!({"type":"leave"})).await;
    b.expect("peer_left").await;
    for client in [&mut a, &mut c, &mut d] {
        client.expect_silence(Duration::from_millis(100)).await;
    }
    s.stop().await;
}

async fn ten_simultaneous_joins_give_two_joined_and_eight_room_full(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    for round in 0..10 {
        let room = format!("race-{round}");
        let mut clients = Vec::new();
        for _ in 0..10 {
            clients.push(s.client().await);
        }
        // All ten joins go out together, from ten tasks.
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(10));
        let mut tasks = Vec::new();
        for mut c in clients {
            let barrier = barrier.clone();
            let room = room.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                c.send(json!({"type":"join","room":room})).await;
                let reply = c.recv().await;
                (reply["type"].as_str().unwrap().to_owned(), c)
            }));
        }
        let mut joined = 0;
        let mut full = 0;
        // Held until the count is checked: a dropped member would leave.
        let mut held = Vec::new();
        for t in tasks {
            let (reply, client) = t.await.unwrap();
            match reply.as_str() {
                "joined" => joined += 1,
                "room_full" => full += 1,
                other => panic!("unexpected {other}"),
            }
            held.push(client);
        }
        assert_eq!((joined, full), (2, 8), "round {round}");
        assert_eq!(s.members(&room).await, Some(2));
    }
    s.stop().await;
}

/// `--max-rooms`, `--rooms-per-minute` and `--rooms-per-minute-per-address` on one
/// server, and cluster-wide on two instances (checked and counted in one Redis script).
async fn room_caps_hold_across_instances(t: Topology) {
    // Ten joins racing for five free rooms through both instances: exactly five made.
    let Some(s) = Servers::start(t, |c| c.max_rooms = 5).await else {
        return;
    };
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(s.client().await);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(10));
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            c.send(json!({"type":"join","room":format!("cap-{i}")}))
                .await;
            let reply = c.recv().await;
            (reply, c)
        }));
    }
    let mut outcomes = Vec::new();
    let mut held = Vec::new();
    for t in tasks {
        let (reply, client) = t.await.unwrap();
        outcomes.push(match reply["type"].as_str().unwrap() {
            "joined" => "joined".to_owned(),
            "error" => reply["code"].as_str().unwrap().to_owned(),
            other => panic!("unexpected {other}: {reply}"),
        });
        held.push(client);
    }
    let joined = outcomes.iter().filter(|o| *o == "joined").count();
    let refused = outcomes.iter().filter(|o| *o == "rate_limited").count();
    assert_eq!((joined, refused), (5, 5), "{outcomes:?}");
    // Joining a room that exists creates nothing: still allowed at the cap.
    let mut guest = s.client().await;
    let room = held
        .iter()
        .zip(&outcomes)
        .position(|(_, o)| o == "joined")
        .unwrap();
    guest.join(&format!("cap-{room}")).await;
    s.stop().await;

    // Per address: all these clients come from 127.0.0.1, on both instances.
    let Some(s) = Servers::start(t, |c| c.rooms_per_minute_per_address = 3).await else {
        return;
    };
    let mut held = Vec::new();
    for i in 0..3 {
        let mut c = s.client().await;
        c.join(&format!("addr-{i}")).await;
        held.push(c);
    }
    let mut late = s.client().await;
    late.send(json!({"type":"join","room":"addr-3"})).await;
    let e = late.expect_error("rate_limited").await;
    assert!(
        e["message"].as_str().unwrap().contains("one address"),
        "{e}"
    );
    late.join("addr-0").await;
    s.stop().await;

    // Per connection: its third new room in a minute is refused.
    let Some(s) = Servers::start(t, |c| c.rooms_per_minute = 2).await else {
        return;
    };
    let mut c = s.client().await;
    c.join("conn-1").await;
    c.join("conn-2").await;
    c.send(json!({"type":"join","room":"conn-3"})).await;
    let e = c.expect_error("rate_limited").await;
    assert!(e["message"].as_str().unwrap().contains("at most 2"), "{e}");
    // Another connection may.
    s.client().await.join("conn-3").await;
    s.stop().await;
}

async fn bad_join_fields_are_refused(t: Topology) {
    let Some(s) = Servers::start(t, |_| {}).await else {
        return;
    };
    let mut a = s.client().await;
    for bad in [
        json!({"type":"join"}),
        json!({"type":"join","room":""}),
        json!({"type":"join","room":"   "}),
        json!({"type":"join","room":"x".repeat(65)}),
        json!({"type":"join","room":"tab\there"}),
        json!({"type":"join","room":17}),
        json!({"type":"join","room":"ok","name":"n".repeat(65)}),
        json!({"type":"join","room":"ok","name":5}),
    ] {
        a.send(bad.clone()).await;
        let e = a.expect_error("bad_field").await;
        assert!(!e["message"].as_str().unwrap().is_empty(), "{bad}");
    }
    // 64 characters (not bytes) is fine.
    let j = a.join(&"é".repeat(64)).await;
    assert_eq!(j["members"], 1);
    assert_eq!(s.members("ok").await, None, "refused joins created nothing");
    s.stop().await;
}

#[tokio::test]
async fn empty_rooms_expire_after_the_ttl() {
    let s = start_server(|c| c.room_ttl = Duration::from_millis(300)).await;
    let mut a = Client::connect(&s).await;
    let first = a.join("brief").await;
    assert_eq!(first["host"], true);
    a.send(json!({"type":"leave"})).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        s.room_members("brief"),
        Some(0),
        "kept while within its ttl"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.room_members("brief"), None, "removed after its ttl");
    // A room that is not empty does not expire.
    let (_b, _c, _, _) = pair(&s, "busy").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.room_members("busy"), Some(2));
    s.stop().await;
}
