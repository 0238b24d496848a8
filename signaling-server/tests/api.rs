//! The HTTP API (rooms, ICE servers, OpenAPI) and meetings over the WebSocket, against a
//! real server on loopback: every endpoint and error case, API keys, host-only ending
//! through WebSocket and HTTP, early join, expiry, restart persistence, parallel creates.
//!
//! The meeting tests run twice (`on_both_topologies!`): on one server (meetings in
//! SQLite), and on two instances sharing a `redis-server` (meetings in Redis), where each
//! request and each client goes to the next instance in turn: a room created through one
//! is read, joined, listed and deleted through the other.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::{Client, HttpResponse, Servers, Target, Topology, request, start_server};
use serde_json::{Value, json};
use signaling_server::api::{CreatedRoom, RoomInfo, RoomState};
use signaling_server::config::{ConfigError, Secret};
use signaling_server::{Config, Server, StartError, ids, store};

const KEY: &str = "0123456789abcdef0123456789abcdef-test-key";
/// The `Authorization` header for [`KEY`]. A server without a key ignores it.
const AUTH: [(&str, &str); 1] = [(
    "Authorization",
    "Bearer 0123456789abcdef0123456789abcdef-test-key",
)];

on_both_topologies!(
    create_then_read_list_and_the_other_endpoints,
    ad_hoc_rooms_are_readable_too,
    an_api_key_guards_creating_and_listing,
    the_host_token_makes_the_host_and_only_the_host_ends_it_over_websocket,
    delete_with_the_host_token_ends_the_room_for_its_members,
    joins_before_the_early_join_grace_get_not_started,
    empty_rooms_expire_after_their_ttl,
    rooms_and_host_tokens_survive_a_restart,
    a_hundred_parallel_creates_get_distinct_ids_all_stored,
    join_urls_use_the_public_url_when_set,
);

/// Creates a room, sending [`KEY`] (which a server without a key ignores).
async fn post(s: &impl Target, body: Value) -> HttpResponse {
    let s = s.next_server();
    request(s, "POST", "/api/rooms", &AUTH, body.to_string().as_bytes()).await
}

/// Lists rooms with [`KEY`] (listing always needs a key).
async fn list_rooms(s: &impl Target, query: &str) -> HttpResponse {
    let s = s.next_server();
    request(s, "GET", &format!("/api/rooms{query}"), &AUTH, b"").await
}

fn with_key(c: &mut Config) {
    c.api_key = Some(Secret(KEY.into()));
}

async fn create(s: &impl Target, body: Value) -> CreatedRoom {
    let r = post(s, body).await;
    assert_eq!(r.status, 201, "{r:?}");
    serde_json::from_str(&r.body).unwrap()
}

async fn get_room(s: &impl Target, id: &str) -> RoomInfo {
    let s = s.next_server();
    let r = request(s, "GET", &format!("/api/rooms/{id}"), &[], b"").await;
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_str(&r.body).unwrap()
}

/// Starts `t` with `tweak`; `None` when a cluster cannot run here (skipped).
async fn servers(t: Topology, tweak: impl Fn(&mut Config)) -> Option<Servers> {
    Servers::start(t, tweak).await
}

async fn delete(s: &impl Target, id: &str, token: Option<&str>) -> HttpResponse {
    let s = s.next_server();
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    request(s, "DELETE", &format!("/api/rooms/{id}"), &headers, b"").await
}

fn rfc3339_in(seconds: i64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds);
    signaling_server::clock::format_rfc3339(t)
}

async fn join_with_token(c: &mut Client, room: &str, token: &str) -> Value {
    c.send(json!({"type":"join","room":room,"host_token":token}))
        .await;
    c.recv().await
}

fn db_server_config(path: &Path) -> impl FnOnce(&mut Config) + use<> {
    let path = path.to_owned();
    move |c: &mut Config| c.db = path
}

async fn create_then_read_list_and_the_other_endpoints(t: Topology) {
    let Some(s) = servers(t, with_key).await else {
        return;
    };
    let first = s.next_server();
    let r = post(first, json!({"title":"Weekly 1:1","ttl_s":900})).await;
    assert_eq!(r.status, 201, "{r:?}");
    let created: CreatedRoom = serde_json::from_str(&r.body).unwrap();
    assert!(ids::is_room_id(&created.room_id), "{}", created.room_id);
    assert_eq!(
        created.join_url,
        format!("{}/r/{}", first.http_url(), created.room_id)
    );
    assert_eq!(created.host_token.len(), 32);
    assert_eq!(
        r.header("location"),
        Some(format!("/api/rooms/{}", created.room_id).as_str())
    );
    let starts = signaling_server::clock::parse_rfc3339(&created.starts_at).unwrap();
    let expires = signaling_server::clock::parse_rfc3339(&created.expires_at).unwrap();
    assert_eq!(expires - starts, time::Duration::seconds(900));
    assert!(!r.body.contains("token_hash"));

    let info = get_room(&s, &created.room_id).await;
    assert_eq!(info.state, RoomState::Open);
    assert_eq!(info.members, 0);
    assert_eq!(info.title.as_deref(), Some("Weekly 1:1"));
    assert_eq!(info.starts_at.as_deref(), Some(created.starts_at.as_str()));
    assert_eq!(info.ttl_s, 900);

    // An empty body is `{}`: default start (now) and ttl (600 s).
    let plain = request(s.next_server(), "POST", "/api/rooms", &AUTH, b"").await;
    assert_eq!(plain.status, 201, "{plain:?}");
    let plain: CreatedRoom = serde_json::from_str(&plain.body).unwrap();
    assert_eq!(get_room(&s, &plain.room_id).await.ttl_s, 600);

    let later = create(&s, json!({"starts_at": rfc3339_in(7200)})).await;
    let list = list_rooms(&s, "").await.json();
    let listed: Vec<&str> = list["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["room_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[2], later.room_id, "earliest first");
    let window = format!("?from={}&to={}", rfc3339_in(3600), rfc3339_in(3 * 3600));
    let list = list_rooms(&s, &window).await.json();
    assert_eq!(list["rooms"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["rooms"][0]["room_id"], later.room_id.as_str());
    assert_eq!(list["rooms"][0]["state"], "scheduled");
    // An unescaped `+` in an offset reads as a space; it is still understood.
    let plus = list_rooms(&s, "?from=2000-01-01T00:00:00+01:00").await;
    assert_eq!(plus.json()["rooms"].as_array().unwrap().len(), 3);

    let ice = request(s.next_server(), "GET", "/api/ice-servers", &[], b"").await;
    assert_eq!(ice.json(), json!({"ice_servers": []}));

    let doc = request(s.next_server(), "GET", "/api/openapi.json", &[], b"").await;
    assert_eq!(doc.header("content-type"), Some("application/json"));
    let doc = doc.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["paths"]["/api/rooms/{room_id}"]["delete"].is_object());

    for server in &s.all {
        let page = request(server, "GET", &format!("/r/{}", created.room_id), &[], b"").await;
        assert_eq!(page.status, 200);
        assert!(page.body.contains(&created.room_id) && page.body.contains("Weekly 1:1"));
    }
    s.stop().await;
}

async fn ad_hoc_rooms_are_readable_too(t: Topology) {
    let Some(s) = servers(t, with_key).await else {
        return;
    };
    let mut a = s.client().await;
    a.join("standup").await;
    let info = get_room(&s, "standup").await;
    assert_eq!(info.state, RoomState::Active);
    assert_eq!(info.members, 1);
    assert_eq!(info.starts_at, None);
    assert_eq!(info.expires_at, None, "occupied rooms do not expire");
    let mut b = s.client().await;
    b.join("standup").await;
    a.expect("peer_joined").await;
    assert_eq!(get_room(&s, "standup").await.members, 2);
    b.send(json!({"type":"leave"})).await;
    a.expect("peer_left").await;
    a.send(json!({"type":"leave"})).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    if s.clustered() {
        // A cluster forgets an empty ad-hoc room at once (it has nothing to keep).
        for server in &s.all {
            let r = request(server, "GET", "/api/rooms/standup", &[], b"").await;
            r.assert_error(404, "unknown_room");
        }
    } else {
        let info = get_room(&s, "standup").await;
        assert_eq!(info.state, RoomState::Open);
        assert!(info.expires_at.is_some());
    }
    let mut c = s.client().await;
    c.join("standup").await;
    // Ad-hoc rooms are not listed (they have no schedule) and have no host token.
    assert_eq!(list_rooms(&s, "").await.json(), json!({"rooms": []}));
    delete(&s, "standup", Some("anything"))
        .await
        .assert_error(401, "unauthorized");
    s.stop().await;
}

#[tokio::test]
async fn every_bad_request_gets_a_json_error_with_a_fitting_status() {
    let s = start_server(|_| {}).await;
    let bodies: &[(&[u8], &str)] = &[
        (b"{", "bad_json"),
        (b"[]", "bad_json"),
        (b"\"room\"", "bad_json"),
        (b"null", "bad_json"),
        (b"\xff\xfe\x00garbage", "bad_json"),
        (br#"{"ttl_s":"600"}"#, "bad_field"),
        (br#"{"ttl_s":1.5}"#, "bad_field"),
        (br#"{"ttl_s":1e30}"#, "bad_field"),
        (br#"{"ttl_s":-1}"#, "bad_field"),
        (br#"{"ttl_s":0}"#, "bad_field"),
        (br#"{"ttl_s":604801}"#, "bad_field"),
        (br#"{"title":5}"#, "bad_field"),
        (br#"{"title":"tab\tinside"}"#, "bad_field"),
        (br#"{"starts_at":5}"#, "bad_field"),
        (br#"{"starts_at":"tomorrow"}"#, "bad_field"),
        (br#"{"starts_at":"2026-11-20 10:00"}"#, "bad_field"),
        (br#"{"starts_at":"2001-01-01T00:00:00Z"}"#, "bad_field"),
        (br#"{"starts_at":"9999-01-01T00:00:00Z"}"#, "bad_field"),
    ];
    for (body, code) in bodies {
        let r = request(&s, "POST", "/api/rooms", &[], body).await;
        let what = String::from_utf8_lossy(body);
        assert_eq!(r.status, 400, "{what}: {r:?}");
        r.assert_error(400, code);
    }
    let long_title = json!({"title": "x".repeat(201)});
    post(&s, long_title).await.assert_error(400, "bad_field");
    let big = format!(r#"{{"title":"{}"}}"#, "x".repeat(20_000));
    request(&s, "POST", "/api/rooms", &[], big.as_bytes())
        .await
        .assert_error(413, "too_large");

    request(&s, "GET", "/api/rooms/kxp-47qm-zt9-4fh", &[], b"")
        .await
        .assert_error(404, "unknown_room");
    delete(&s, "kxp-47qm-zt9-4fh", Some("x"))
        .await
        .assert_error(404, "unknown_room");
    let room = create(&s, json!({})).await;
    let m = delete(&s, &room.room_id, None)
        .await
        .assert_error(401, "unauthorized");
    assert!(m.contains("host token"), "{m}");
    let wrong = delete(&s, &room.room_id, Some("not-the-token")).await;
    wrong.assert_error(401, "unauthorized");
    assert_eq!(wrong.header("www-authenticate"), Some("Bearer"));
    let basic = [("Authorization", "Basic Zm9vOmJhcg==")];
    request(
        &s,
        "DELETE",
        &format!("/api/rooms/{}", room.room_id),
        &basic,
        b"",
    )
    .await
    .assert_error(401, "unauthorized");
    let ended = delete(&s, &room.room_id, Some(&room.host_token)).await;
    assert_eq!(ended.status, 200, "{ended:?}");
    assert_eq!(ended.json()["state"], "ended");
    delete(&s, &room.room_id, Some(&room.host_token))
        .await
        .assert_error(409, "room_ended");

    // Without an API key, listing is refused whatever the query.
    let m = list_rooms(&s, "?from=yesterday")
        .await
        .assert_error(403, "forbidden");
    assert!(m.contains("API key"), "{m}");
    request(&s, "PUT", "/api/rooms", &[], b"{}")
        .await
        .assert_error(405, "method_not_allowed");
    request(&s, "GET", "/api/nothing", &[], b"")
        .await
        .assert_error(404, "not_found");
    s.stop().await;

    let s = start_server(with_key).await;
    for q in [
        "from=yesterday",
        "to=2026-13-01T00:00:00Z",
        "from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
        "from=%ZZ",
    ] {
        list_rooms(&s, &format!("?{q}"))
            .await
            .assert_error(400, "bad_field");
    }
    s.stop().await;
}

#[tokio::test]
async fn random_bodies_never_break_the_server() {
    let s = start_server(|c| {
        c.api_rate_per_second = 0.0;
        c.create_rate_per_minute = 0.0;
    })
    .await;
    let pieces = [
        "{",
        "}",
        "[",
        "]",
        "\"",
        ":",
        ",",
        "null",
        "-1",
        "1e999",
        "\"ttl_s\"",
        "\"title\"",
        "\"starts_at\"",
        "\"2026-11-20T10:00:00Z\"",
        "\\u0000",
        "\u{1F600}",
        "true",
        " ",
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..150 {
        let mut body = String::new();
        for _ in 0..(seed % 12) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            body.push_str(pieces[(seed % pieces.len() as u64) as usize]);
        }
        let r = request(&s, "POST", "/api/rooms", &[], body.as_bytes()).await;
        assert!(r.status == 201 || r.status == 400, "{body:?} -> {r:?}");
        let v = r.json();
        assert!(v["room_id"].is_string() || v["error"].is_string(), "{v}");
    }
    assert_eq!(request(&s, "GET", "/healthz", &[], b"").await.body, "ok");
    s.stop().await;
}

async fn an_api_key_guards_creating_and_listing(t: Topology) {
    let Some(all) = servers(t, with_key).await else {
        return;
    };
    let with_key = AUTH;
    let wrong = [("Authorization", "Bearer 0123456789abcdef0123456789abcdeX")];
    let s = || all.next_server();
    let m = request(s(), "POST", "/api/rooms", &[], b"{}")
        .await
        .assert_error(401, "unauthorized");
    assert!(m.contains("API key"), "{m}");
    request(s(), "POST", "/api/rooms", &wrong, b"{}")
        .await
        .assert_error(401, "unauthorized");
    request(s(), "GET", "/api/rooms", &[], b"")
        .await
        .assert_error(401, "unauthorized");
    request(s(), "GET", "/api/rooms", &wrong, b"")
        .await
        .assert_error(401, "unauthorized");
    let r = request(s(), "POST", "/api/rooms", &with_key, b"{}").await;
    assert_eq!(r.status, 201, "{r:?}");
    let room: CreatedRoom = serde_json::from_str(&r.body).unwrap();
    let list = request(s(), "GET", "/api/rooms", &with_key, b"").await;
    assert_eq!(list.json()["rooms"].as_array().unwrap().len(), 1);
    // Reading one room needs no key (its id is the invitation); ending needs the token.
    assert_eq!(get_room(s(), &room.room_id).await.state, RoomState::Open);
    delete(s(), &room.room_id, Some(KEY))
        .await
        .assert_error(401, "unauthorized");
    assert_eq!(
        delete(s(), &room.room_id, Some(&room.host_token))
            .await
            .status,
        200
    );
    all.stop().await;

    // From a file, surrounding whitespace ignored.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api.key");
    std::fs::write(&file, format!("  {KEY}\n")).unwrap();
    let Some(s) = servers(t, |c| c.api_key_file = Some(file.clone())).await else {
        return;
    };
    let r = request(s.next_server(), "POST", "/api/rooms", &with_key, b"{}").await;
    assert_eq!(r.status, 201, "{r:?}");
    s.stop().await;
}

#[tokio::test]
async fn short_api_keys_and_unusable_databases_are_refused_at_start_up() {
    let config = Config {
        api_key: Some(Secret("too short".into())),
        ..Config::ephemeral()
    };
    let e = Server::start(config).await.unwrap_err();
    assert!(
        matches!(e, StartError::Config(ConfigError::ApiKeyTooShort(9))),
        "{e}"
    );
    assert!(e.to_string().contains("at least 32"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let config = Config {
        db: blocker.join("db.sqlite3"),
        ..Config::ephemeral()
    };
    let e = Server::start(config).await.unwrap_err();
    assert!(matches!(e, StartError::Store(_)), "{e}");
}

async fn the_host_token_makes_the_host_and_only_the_host_ends_it_over_websocket(t: Topology) {
    let Some(s) = servers(t, |_| {}).await else {
        return;
    };
    let room = create(&s, json!({})).await;
    let id = room.room_id.as_str();
    let mut guest = s.client().await;
    let mut host = s.client().await;
    let joined = guest.join(id).await;
    assert_eq!(joined["host"], false, "no token, no host");
    let refused = join_with_token(&mut host, id, "wrong-token").await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "not_host");
    guest.expect_silence(Duration::from_millis(50)).await;
    let joined = join_with_token(&mut host, id, &room.host_token).await;
    assert_eq!(joined["type"], "joined");
    assert_eq!(joined["host"], true);
    guest.expect("peer_joined").await;
    assert_eq!(get_room(&s, id).await.state, RoomState::Active);

    guest.send(json!({"type":"end_room"})).await;
    guest.expect_error("not_host").await;
    host.send(json!({"type":"end_room"})).await;
    for c in [&mut host, &mut guest] {
        let ended = c.expect("room_ended").await;
        assert_eq!(
            ended,
            json!({"type":"room_ended","room":id,"reason":"host_ended"})
        );
    }
    assert_eq!(get_room(&s, id).await.state, RoomState::Ended);
    guest.send(json!({"type":"join","room":id})).await;
    guest.expect_error("room_ended").await;
    delete(&s, id, Some(&room.host_token))
        .await
        .assert_error(409, "room_ended");
    s.stop().await;
}

async fn delete_with_the_host_token_ends_the_room_for_its_members(t: Topology) {
    let Some(s) = servers(t, |_| {}).await else {
        return;
    };
    let room = create(&s, json!({"title":"standup"})).await;
    let id = room.room_id.as_str();
    let mut a = s.client().await;
    let mut b = s.client().await;
    a.join(id).await;
    b.join(id).await;
    a.expect("peer_joined").await;
    let r = delete(&s, id, Some(&room.host_token)).await;
    assert_eq!(r.status, 200, "{r:?}");
    let info: RoomInfo = serde_json::from_str(&r.body).unwrap();
    assert_eq!((info.state, info.members), (RoomState::Ended, 0));
    for c in [&mut a, &mut b] {
        let ended = c.expect("room_ended").await;
        assert_eq!(ended["reason"], "host_ended");
    }
    a.send(json!({"type":"join","room":id})).await;
    a.expect_error("room_ended").await;
    a.send(json!({"type":"join","room":id,"host_token":room.host_token}))
        .await;
    a.expect_error("room_ended").await;
    s.stop().await;
}

async fn joins_before_the_early_join_grace_get_not_started(t: Topology) {
    let Some(s) = servers(t, |_| {}).await else {
        return;
    };
    let later = create(&s, json!({"starts_at": rfc3339_in(600)})).await;
    assert_eq!(
        get_room(&s, &later.room_id).await.state,
        RoomState::Scheduled
    );
    let mut a = s.client().await;
    a.send(json!({"type":"join","room":later.room_id,"host_token":later.host_token}))
        .await;
    let e = a.expect_error("not_started").await;
    assert_eq!(e["starts_at"], later.starts_at.as_str());
    assert_eq!(s.members(&later.room_id).await, Some(0));

    // Four minutes ahead is within the default 5-minute grace.
    let soon = create(&s, json!({"starts_at": rfc3339_in(240)})).await;
    assert_eq!(get_room(&s, &soon.room_id).await.state, RoomState::Open);
    let joined = a.join(&soon.room_id).await;
    assert_eq!(joined["members"], 1);
    s.stop().await;

    // The grace is configurable; with none, a room opens at its start.
    let Some(s) = servers(t, |c| c.early_join = Duration::ZERO).await else {
        return;
    };
    let room = create(&s, json!({"starts_at": rfc3339_in(2)})).await;
    let mut a = s.client().await;
    a.send(json!({"type":"join","room":room.room_id})).await;
    a.expect_error("not_started").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    a.join(&room.room_id).await;
    s.stop().await;
}

async fn empty_rooms_expire_after_their_ttl(t: Topology) {
    let Some(s) = servers(t, |_| {}).await else {
        return;
    };
    let used = create(&s, json!({"ttl_s": 1})).await;
    let unused = create(&s, json!({"ttl_s": 1})).await;
    let kept = create(&s, json!({"ttl_s": 60})).await;
    let mut a = s.client().await;
    a.join(&used.room_id).await;
    // Occupied rooms do not expire.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(get_room(&s, &used.room_id).await.state, RoomState::Active);
    assert_eq!(get_room(&s, &unused.room_id).await.state, RoomState::Ended);
    a.send(json!({"type":"leave"})).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get_room(&s, &used.room_id).await.state, RoomState::Open);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let info = get_room(&s, &used.room_id).await;
    assert_eq!(info.state, RoomState::Ended);
    assert!(info.expires_at.is_some());
    assert_eq!(get_room(&s, &kept.room_id).await.state, RoomState::Open);
    a.send(json!({"type":"join","room":used.room_id})).await;
    a.expect_error("room_ended").await;
    delete(&s, &unused.room_id, Some(&unused.host_token))
        .await
        .assert_error(409, "room_ended");
    s.stop().await;
}

/// Meetings outlive the service: one server restarted on its SQLite file, or every
/// instance of a cluster restarted on the same Redis.
async fn rooms_and_host_tokens_survive_a_restart(t: Topology) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duet.sqlite3");
    let with_db = |c: &mut Config| c.db = db.clone();
    let Some(mut s) = servers(t, with_db).await else {
        return;
    };
    let scheduled = create(&s, json!({"starts_at": rfc3339_in(3600), "title":"later"})).await;
    let open = create(&s, json!({"ttl_s": 3600})).await;
    let ended = create(&s, json!({})).await;
    assert_eq!(
        delete(&s, &ended.room_id, Some(&ended.host_token))
            .await
            .status,
        200
    );
    let by_ws = create(&s, json!({})).await;
    let mut host = s.client().await;
    join_with_token(&mut host, &by_ws.room_id, &by_ws.host_token).await;
    host.send(json!({"type":"end_room"})).await;
    host.expect("room_ended").await;
    let before = get_room(&s, &scheduled.room_id).await;
    s.restart(with_db).await;

    assert_eq!(get_room(&s, &scheduled.room_id).await, before);
    assert_eq!(get_room(&s, &scheduled.room_id).await, before);
    assert_eq!(get_room(&s, &open.room_id).await.state, RoomState::Open);
    assert_eq!(get_room(&s, &ended.room_id).await.state, RoomState::Ended);
    assert_eq!(get_room(&s, &by_ws.room_id).await.state, RoomState::Ended);
    let mut a = s.client().await;
    let joined = join_with_token(&mut a, &open.room_id, &open.host_token).await;
    assert_eq!(
        joined["host"], true,
        "same token after the restart: {joined}"
    );
    a.send(json!({"type":"join","room":ended.room_id})).await;
    a.expect_error("room_ended").await;
    delete(&s, &scheduled.room_id, Some(&open.host_token))
        .await
        .assert_error(401, "unauthorized");
    let r = delete(&s, &scheduled.room_id, Some(&scheduled.host_token)).await;
    assert_eq!(r.status, 200, "{r:?}");
    s.restart(with_db).await;
    assert_eq!(
        get_room(&s, &scheduled.room_id).await.state,
        RoomState::Ended
    );
    s.stop().await;
}

/// A meeting ended over WebSocket is in the database before anybody hears `room_ended`
/// (a crash right after must not bring it back).
#[tokio::test]
async fn a_meeting_ended_over_websocket_is_stored_before_room_ended_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duet.sqlite3");
    let s = start_server(db_server_config(&db)).await;
    let file = rusqlite::Connection::open(&db).unwrap();
    let ended_at = |room: &str| -> Option<i64> {
        file.query_row(
            "SELECT ended_at FROM rooms WHERE room_id = ?1",
            [room],
            |row| row.get(0),
        )
        .unwrap()
    };
    for round in 0..5 {
        let meeting = create(&s, json!({})).await;
        let mut host = Client::connect(&s).await;
        join_with_token(&mut host, &meeting.room_id, &meeting.host_token).await;
        let mut guest = Client::connect(&s).await;
        guest.join(&meeting.room_id).await;
        host.expect("peer_joined").await;
        assert_eq!(ended_at(&meeting.room_id), None);
        host.send(json!({"type":"end_room"})).await;
        guest.expect("room_ended").await;
        assert!(
            ended_at(&meeting.room_id).is_some(),
            "round {round}: room_ended arrived before the end was stored"
        );
        host.expect("room_ended").await;
    }
    s.stop().await;
}

async fn a_hundred_parallel_creates_get_distinct_ids_all_stored(t: Topology) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duet.sqlite3");
    let config = |c: &mut Config| {
        c.db = db.clone();
        c.api_rate_per_second = 0.0;
        with_key(c);
    };
    let Some(mut s) = servers(t, config).await else {
        return;
    };
    let clustered = s.clustered();
    let shared = std::sync::Arc::new(s);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let s = std::sync::Arc::clone(&shared);
        tasks.push(tokio::spawn(async move {
            create(&*s, json!({"title": format!("room {i}")})).await
        }));
    }
    let mut created = Vec::new();
    for t in tasks {
        created.push(t.await.unwrap());
    }
    let ids: HashSet<String> = created.iter().map(|c| c.room_id.clone()).collect();
    assert_eq!(ids.len(), 100);
    let tokens: HashSet<&str> = created.iter().map(|c| c.host_token.as_str()).collect();
    assert_eq!(tokens.len(), 100);
    if !clustered {
        // Every acknowledged room is in the file already, before any shutdown.
        let stored: HashSet<String> = store::stored_room_ids(&db).unwrap().into_iter().collect();
        assert_eq!(stored, ids);
    }
    s = std::sync::Arc::try_unwrap(shared).ok().unwrap();
    s.restart(config).await;
    for _ in 0..2 {
        let list = list_rooms(&s, "").await.json();
        let listed: HashSet<String> = list["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["room_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(listed, ids);
    }
    s.stop().await;
}

#[tokio::test]
async fn too_many_requests_get_429() {
    let s = start_server(|c| {
        c.api_rate_burst = 3.0;
        c.api_rate_per_second = 0.5;
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            request(&s, "GET", "/api/ice-servers", &[], b"")
                .await
                .status,
            200
        );
    }
    let r = request(&s, "POST", "/api/rooms", &[], b"{}").await;
    r.assert_error(429, "rate_limited");
    assert_eq!(r.header("retry-after"), Some("1"));
    // The WebSocket endpoint and health check are not part of the API limit.
    assert_eq!(request(&s, "GET", "/healthz", &[], b"").await.status, 200);
    s.stop().await;
}

async fn join_urls_use_the_public_url_when_set(t: Topology) {
    let Some(s) = servers(t, |c| {
        c.public_url = Some("https://duet.example.org/".into())
    })
    .await
    else {
        return;
    };
    let room = create(&s, json!({})).await;
    assert_eq!(
        room.join_url,
        format!("https://duet.example.org/r/{}", room.room_id)
    );
    assert_eq!(
        signaling_server::api::parse_room_ref(&room.join_url),
        Some(room.room_id.clone())
    );
    s.stop().await;
}
