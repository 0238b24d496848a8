//! Cluster mode (`--redis`): two server instances in this process, sharing rooms through
//! a real `redis-server` (started by the test, see `common/redis.rs`), and real WebSocket
//! clients connected to one instance or the other.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use common::{Client, http, request, start_server, wait_health};
use serde_json::json;
use signaling_server::config::Secret;
use signaling_server::{Config, Server};

/// An instance of the cluster on `redis`, ready.
async fn instance(redis: &RedisServer) -> Server {
    instance_with(redis, |_| {}).await
}

/// An instance of the cluster on `redis` with `tweak` applied to its configuration.
async fn instance_with(redis: &RedisServer, tweak: impl FnOnce(&mut Config)) -> Server {
    let url = redis.url();
    let s = start_server(|c| {
        tweak(c);
        c.redis = Some(Secret(url));
    })
    .await;
    wait_health(&s, 200).await;
    s
}

fn id(v: &serde_json::Value) -> String {
    v["peer_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn members_on_two_instances_meet_and_relay_both_ways_in_order() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (one, two) = (instance(&redis).await, instance(&redis).await);
    let mut a = Client::connect(&one).await;
    let mut b = Client::connect(&two).await;

    let ja = a.join_named("  standup ", "Ann").await;
    assert_eq!(ja["room"], "standup");
    assert_eq!(ja["members"], 1);
    assert_eq!(ja["host"], true);
    assert_eq!(ja["peers"], json!([]));
    let jb = b.join_named("standup", "Bob").await;
    assert_eq!(jb["members"], 2);
    assert_eq!(jb["host"], false);
    assert_eq!(jb["peers"], json!([{"peer_id": id(&ja), "name": "Ann"}]));
    let pj = a.expect("peer_joined").await;
    assert_eq!(
        pj,
        json!({"type":"peer_joined","peer_id": id(&jb),"name":"Bob"})
    );

    // Offer, candidates, answer: each side receives the other's in the order sent.
    a.send(json!({"type":"offer","sdp":"v=0 offer"})).await;
    for i in 0..30 {
        let c = json!({"candidate": format!("candidate:{i} 1 udp 1 10.0.0.1 {i} typ host"),
                       "sdp_mid": "0", "sdp_mline_index": 0});
        a.send(json!({"type":"candidate","candidate": c})).await;
    }
    let offer = b.expect("offer").await;
    assert_eq!(
        offer,
        json!({"type":"offer","from": id(&ja),"sdp":"v=0 offer"})
    );
    for i in 0..30 {
        let c = b.expect("candidate").await;
        assert_eq!(c["from"], id(&ja));
        assert_eq!(
            c["candidate"]["candidate"],
            format!("candidate:{i} 1 udp 1 10.0.0.1 {i} typ host")
        );
    }
    b.send(json!({"type":"answer","sdp":"v=0 answer"})).await;
    for i in 0..30 {
        let c = json!({"candidate": format!("candidate:{i} 1 udp 1 10.0.0.2 {i} typ host"),
                       "sdp_mid": "0", "sdp_mline_index": 0});
        b.send(json!({"type":"candidate","candidate": c})).await;
    }
    b.send(json!({"type":"candidate","candidate": null})).await;
    let answer = a.expect("answer").await;
    assert_eq!(
        answer,
        json!({"type":"answer","from": id(&jb),"sdp":"v=0 answer"})
    );
    for i in 0..30 {
        let c = a.expect("candidate").await;
        assert_eq!(
            c["candidate"]["candidate"],
            format!("candidate:{i} 1 udp 1 10.0.0.2 {i} typ host")
        );
    }
    let end = a.expect("candidate").await;
    assert_eq!(end["candidate"], serde_json::Value::Null, "{end}");
    a.expect_silence(Duration::from_millis(100)).await;
    b.expect_silence(Duration::from_millis(100)).await;

    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn ten_racing_joins_through_two_instances_seat_exactly_two() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (one, two) = (instance(&redis).await, instance(&redis).await);
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(Client::connect(if i % 2 == 0 { &one } else { &two }).await);
    }
    // Every join is on the wire before any answer is read.
    for c in &mut clients {
        c.send(json!({"type":"join","room":"race"})).await;
    }
    let mut joined = 0;
    let mut full = 0;
    for c in &mut clients {
        let m = c.recv().await;
        match m["type"].as_str() {
            Some("joined") => joined += 1,
            Some("room_full") => {
                assert_eq!(m, json!({"type":"room_full","room":"race","members":2}));
                full += 1;
            }
            _ => panic!("unexpected answer to a join: {m}"),
        }
    }
    assert_eq!((joined, full), (2, 8));

    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn leaving_on_one_instance_is_seen_on_the_other() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let short = |c: &mut Config| c.resume_grace = Duration::from_millis(300);
    let (one, two) = (
        instance_with(&redis, short).await,
        instance_with(&redis, short).await,
    );
    let mut a = Client::connect(&one).await;
    let mut b = Client::connect(&two).await;
    let ja = a.join("desk").await;
    let jb = b.join("desk").await;
    a.expect("peer_joined").await;

    // The host leaves: the other hears it, then becomes host.
    a.send(json!({"type":"leave"})).await;
    let left = b.expect("peer_left").await;
    assert_eq!(
        left,
        json!({"type":"peer_left","peer_id": id(&ja),"reason":"left"})
    );
    let host = b.expect("host_changed").await;
    assert_eq!(host["peer_id"], id(&jb));
    a.send(json!({"type":"offer","sdp":"x"})).await;
    a.expect_error("not_in_call").await;

    // Somebody on the first instance joins, then its connection drops.
    let mut c = Client::connect(&one).await;
    let jc = c.join("desk").await;
    assert_eq!(jc["host"], false);
    b.expect("peer_joined").await;
    c.close().await;
    // Its seat is kept for the (short) resume grace, then given up.
    assert_eq!(b.expect("peer_reconnecting").await["peer_id"], id(&jc));
    let dropped = b.expect("peer_left").await;
    assert_eq!(
        dropped,
        json!({"type":"peer_left","peer_id": id(&jc),"reason":"disconnected"})
    );
    b.send(json!({"type":"offer","sdp":"x"})).await;
    b.expect_error("not_in_call").await;

    // The seat is free again, from either instance.
    let jd = Client::connect(&one).await.join("desk").await;
    assert_eq!(jd["members"], 2);

    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn only_the_host_ends_a_room_and_both_instances_hear_it() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (one, two) = (instance(&redis).await, instance(&redis).await);
    let mut a = Client::connect(&one).await;
    let mut b = Client::connect(&two).await;
    a.join("townhall").await;
    b.join("townhall").await;
    a.expect("peer_joined").await;

    b.send(json!({"type":"end_room"})).await;
    b.expect_error("not_host").await;
    a.send(json!({"type":"end_room"})).await;
    let ended = json!({"type":"room_ended","room":"townhall","reason":"host_ended"});
    assert_eq!(a.expect("room_ended").await, ended);
    assert_eq!(b.expect("room_ended").await, ended);
    // Ended for everybody, whichever instance they ask.
    b.send(json!({"type":"join","room":"townhall"})).await;
    b.expect_error("room_ended").await;
    let mut c = Client::connect(&one).await;
    c.send(json!({"type":"join","room":"townhall"})).await;
    c.expect_error("room_ended").await;

    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn members_of_a_dead_instance_hold_no_seats_and_no_names() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    // Resume off: a dead instance's member is removed at once (with resume on, its seat
    // waits for the grace like any dropped one; see the killed-instance tests).
    let off = |c: &mut Config| c.resume_grace = Duration::ZERO;
    let (one, two) = (
        instance_with(&redis, off).await,
        instance_with(&redis, off).await,
    );
    // A member whose instance is gone (no liveness key), as a SIGKILLed instance leaves.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut r = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("HSET")
        .arg("duet:room:orphan")
        .arg("m:ghost")
        .arg("dead-instance\nGhost")
        .arg("host")
        .arg("ghost")
        .query_async::<()>(&mut r)
        .await
        .unwrap();

    let mut a = Client::connect(&one).await;
    let mut b = Client::connect(&two).await;
    let ja = a.join("orphan").await;
    assert_eq!(ja["members"], 1, "{ja}");
    assert_eq!(ja["host"], true, "the dead host's role is not kept: {ja}");
    let jb = b.join("orphan").await;
    assert_eq!(jb["members"], 2);
    a.expect("peer_joined").await;

    // Nor names.
    redis::cmd("SET")
        .arg("duet:name:ghost")
        .arg("ghost\ndead-instance")
        .query_async::<()>(&mut r)
        .await
        .unwrap();
    b.send(json!({"type":"register","name":"ghost"})).await;
    assert_eq!(b.expect("registered").await["name"], "ghost");

    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn without_redis_an_instance_is_not_ready_and_refuses_joins_then_recovers() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let (one, two) = (instance(&redis).await, instance(&redis).await);
    let mut a = Client::connect(&one).await;

    redis.kill();
    wait_health(&one, 503).await;
    let (_, body) = http(&one, "GET", "/healthz").await;
    assert!(body.starts_with("not ready: "), "{body}");
    a.send(json!({"type":"join","room":"later"})).await;
    let refused = a.expect_error("unavailable").await;
    assert!(
        refused["message"].as_str().unwrap().contains("Redis"),
        "{refused}"
    );

    // Redis is back (empty: no persistence): both instances recover by themselves.
    redis.restart().await;
    wait_health(&one, 200).await;
    wait_health(&two, 200).await;
    let ja = a.join("later").await;
    assert_eq!(ja["members"], 1);
    let mut b = Client::connect(&two).await;
    b.join("later").await;
    a.expect("peer_joined").await;
    b.send(json!({"type":"offer","sdp":"after the restart"}))
        .await;
    assert_eq!(a.expect("offer").await["sdp"], "after the restart");

    one.stop().await;
    two.stop().await;
}

/// Registers `name` on `c`; the answer (`registered` or an error).
async fn register(c: &mut Client, name: &str) -> serde_json::Value {
    c.send(json!({"type":"register","name":name})).await;
    c.recv().await
}

#[tokio::test]
async fn a_name_is_registered_once_across_instances() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (one, two) = (instance(&redis).await, instance(&redis).await);
    let mut a = Client::connect(&one).await;
    let mut b = Client::connect(&two).await;
    let mut c = Client::connect(&one).await;
    assert_eq!(
        register(&mut a, " ann ").await,
        json!({"type":"registered","name":"ann"})
    );
    // Again by its holder: fine. By anybody else, on either instance: taken.
    assert_eq!(register(&mut a, "ann").await["type"], "registered");
    assert_eq!(register(&mut b, "ann").await["code"], "name_taken");
    assert_eq!(register(&mut c, "ann").await["code"], "name_taken");

    // A new name frees the old one cluster-wide.
    assert_eq!(register(&mut a, "anna").await["type"], "registered");
    assert_eq!(register(&mut b, "ann").await["type"], "registered");
    assert_eq!(register(&mut c, "anna").await["code"], "name_taken");

    // A closed connection's name is freed (once its instance has noticed the close).
    a.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let answer = register(&mut c, "anna").await;
        if answer["type"] == "registered" {
            break;
        }
        assert_eq!(answer["code"], "name_taken", "{answer}");
        assert!(tokio::time::Instant::now() < deadline, "name never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(register(&mut b, "anna").await["code"], "name_taken");

    one.stop().await;
    two.stop().await;
}

/// `GET /api/rooms/{id}` from instance `s`, as JSON (with its status).
async fn room_info(s: &Server, room: &str) -> (u16, serde_json::Value) {
    let r = request(s, "GET", &format!("/api/rooms/{room}"), &[], b"").await;
    (r.status, serde_json::from_str(&r.body).unwrap())
}

#[tokio::test]
async fn every_instance_shows_a_room_the_same() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (one, two) = (instance(&redis).await, instance(&redis).await);
    for s in [&one, &two] {
        let (status, body) = room_info(s, "lobby").await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"], "unknown_room");
    }
    let mut a = Client::connect(&one).await;
    a.join("lobby").await;
    let (_, on_one) = room_info(&one, "lobby").await;
    assert_eq!(on_one, room_info(&two, "lobby").await.1);
    assert_eq!(on_one["members"], 1);
    assert_eq!(on_one["state"], "active");
    assert_eq!(on_one["expires_at"], serde_json::Value::Null);

    let mut b = Client::connect(&two).await;
    b.join("lobby").await;
    a.expect("peer_joined").await;
    assert_eq!(room_info(&one, "lobby").await.1["members"], 2);
    assert_eq!(room_info(&two, "lobby").await.1["members"], 2);

    a.send(json!({"type":"end_room"})).await;
    a.expect("room_ended").await;
    b.expect("room_ended").await;
    let (_, ended) = room_info(&two, "lobby").await;
    assert_eq!(ended, room_info(&one, "lobby").await.1);
    assert_eq!(ended["state"], "ended");
    assert_eq!(ended["members"], 0);
    assert!(
        ended["expires_at"].as_str().unwrap().ends_with('Z'),
        "{ended}"
    );

    one.stop().await;
    two.stop().await;
}

/// A meeting created through one instance is the same meeting on the other: read,
/// joined (host by its token on one, guest on the other), ended from either side.
#[tokio::test]
async fn a_meeting_created_on_one_instance_is_joined_and_ended_through_the_other() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (one, two) = (instance(&redis).await, instance(&redis).await);
    let r = request(
        &one,
        "POST",
        "/api/rooms",
        &[],
        br#"{"title":"Ops review"}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let created: serde_json::Value = r.json();
    let room = created["room_id"].as_str().unwrap();
    let token = created["host_token"].as_str().unwrap();
    let (status, on_one) = room_info(&one, room).await;
    assert_eq!(status, 200);
    assert_eq!(on_one, room_info(&two, room).await.1);
    assert_eq!(on_one["state"], "open");
    assert_eq!(on_one["title"], "Ops review");

    let mut guest = Client::connect(&two).await;
    let jg = guest.join(room).await;
    assert_eq!(jg["host"], false, "no token, no host: {jg}");
    let mut host = Client::connect(&one).await;
    host.send(json!({"type":"join","room":room,"host_token":"wrong"}))
        .await;
    host.expect_error("not_host").await;
    host.send(json!({"type":"join","room":room,"host_token":token}))
        .await;
    let jh = host.expect("joined").await;
    assert_eq!(jh["host"], true, "{jh}");
    guest.expect("peer_joined").await;
    assert_eq!(room_info(&two, room).await.1["state"], "active");
    guest.send(json!({"type":"end_room"})).await;
    guest.expect_error("not_host").await;

    // DELETE through the guest's instance (the host is on the other): both hear it.
    let wrong = request(&two, "DELETE", &format!("/api/rooms/{room}"), &[], b"").await;
    wrong.assert_error(401, "unauthorized");
    let bearer = format!("Bearer {token}");
    let r = request(
        &two,
        "DELETE",
        &format!("/api/rooms/{room}"),
        &[("Authorization", bearer.as_str())],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["state"], "ended");
    for c in [&mut host, &mut guest] {
        let ended = c.expect("room_ended").await;
        assert_eq!(ended["reason"], "host_ended");
    }
    assert_eq!(room_info(&one, room).await.1, room_info(&two, room).await.1);
    let again = request(
        &one,
        "DELETE",
        &format!("/api/rooms/{room}"),
        &[("Authorization", bearer.as_str())],
        b"",
    )
    .await;
    again.assert_error(409, "room_ended");
    guest.send(json!({"type":"join","room":room})).await;
    guest.expect_error("room_ended").await;

    one.stop().await;
    two.stop().await;
}

/// A `signaling-server` process (this crate's binary), SIGKILLed when dropped.
struct InstanceProcess {
    child: std::process::Child,
    port: u16,
}

impl InstanceProcess {
    async fn start(redis: &RedisServer, extra: &[&str]) -> InstanceProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_signaling-server"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--redis", &redis.url(), "--db", ":memory:", "--log", "warn"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let process = InstanceProcess { child, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !process.ready().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "instance process not ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        process
    }

    /// Whether `/healthz` answers 200.
    async fn ready(&self) -> bool {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let request = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        if tcp.write_all(request.as_bytes()).await.is_err() {
            return false;
        }
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut answer)).await;
        answer.starts_with(b"HTTP/1.1 200")
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for InstanceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn a_member_of_a_killed_instance_resumes_on_another() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let one = instance(&redis).await;
    let mut two = InstanceProcess::start(&redis, &[]).await;
    let mut a = Client::connect(&one).await;
    let mut b = Client::connect_url(&two.ws_url()).await;
    a.join_named("survivors", "Ann").await;
    let jb = b.join_named("survivors", "Bob").await;
    let b_token = jb["resume_token"].as_str().unwrap().to_owned();
    a.expect("peer_joined").await;

    two.kill(); // SIGKILL: nobody leaves politely
    // Noticed once its liveness key expires (6 s) at the next heartbeat (2 s).
    let note = a.recv_within(Duration::from_secs(15)).await;
    assert_eq!(note, json!({"type":"peer_reconnecting","peer_id": id(&jb)}));
    // What a sends meanwhile waits for b.
    a.send(json!({"type":"offer","sdp":"while b was away"}))
        .await;

    // b's client reconnects, to the surviving instance, and takes its seat back.
    let mut b2 = Client::connect(&one).await;
    b2.send(
        json!({"type":"resume","room":"survivors","peer_id": id(&jb),
                   "resume_token": b_token}),
    )
    .await;
    let back = b2.expect("joined").await;
    assert_eq!(back["peer_id"], id(&jb));
    assert_eq!(back["members"], 2);
    assert_eq!(back["peers"][0]["name"], "Ann");
    assert_eq!(b2.expect("offer").await["sdp"], "while b was away");
    b2.send(json!({"type":"answer","sdp":"back"})).await;
    assert_eq!(a.expect("answer").await["sdp"], "back");
    a.send(json!({"type":"offer","sdp":"again"})).await;
    assert_eq!(b2.expect("offer").await["sdp"], "again");

    one.stop().await;
}

#[tokio::test]
async fn a_member_of_a_killed_instance_that_does_not_resume_leaves() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let one = instance_with(&redis, |c| c.resume_grace = Duration::from_secs(1)).await;
    let mut two = InstanceProcess::start(&redis, &["--resume-grace", "1s"]).await;
    let mut a = Client::connect(&one).await;
    let mut b = Client::connect_url(&two.ws_url()).await;
    a.join("survivors").await;
    let jb = b.join("survivors").await;
    a.expect("peer_joined").await;

    two.kill();
    let note = a.recv_within(Duration::from_secs(15)).await;
    assert_eq!(note["type"], "peer_reconnecting", "{note}");
    let left = a.recv_within(Duration::from_secs(5)).await;
    assert_eq!(
        left,
        json!({"type":"peer_left","peer_id": id(&jb),"reason":"disconnected"})
    );
    a.send(json!({"type":"offer","sdp":"x"})).await;
    a.expect_error("not_in_call").await;
    let jc = Client::connect(&one).await.join("survivors").await;
    assert_eq!(jc["members"], 2, "the dead member's seat is free: {jc}");

    one.stop().await;
}
