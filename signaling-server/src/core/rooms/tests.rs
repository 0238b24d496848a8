use super::*;

const CFG: RoomsConfig = RoomsConfig {
    room_ttl: Duration::from_secs(600),
    ring_timeout: Duration::from_secs(30),
    early_join: Duration::from_secs(300),
    ended_retention: ENDED_RETENTION,
    resume_grace: Duration::ZERO,
    max_rooms: 1_000,
    rooms_per_minute: 30,
    rooms_per_minute_per_address: 120,
};

fn kinds(out: &Outbox) -> Vec<(ConnId, &'static str)> {
    out.iter()
        .map(|(c, m)| {
            let kind = match m {
                ServerMessage::Joined { .. } => "joined",
                ServerMessage::PeerJoined { .. } => "peer_joined",
                ServerMessage::RoomFull { .. } => "room_full",
                ServerMessage::PeerLeft { .. } => "peer_left",
                ServerMessage::HostChanged { .. } => "host_changed",
                ServerMessage::Ringing { .. } => "ringing",
                ServerMessage::IncomingCall { .. } => "incoming_call",
                ServerMessage::CallRejected { .. } => "call_rejected",
                ServerMessage::CallCancelled { .. } => "call_cancelled",
                ServerMessage::Registered { .. } => "registered",
                ServerMessage::RoomEnded { .. } => "room_ended",
                ServerMessage::Error { .. } => "error",
                ServerMessage::PeerReconnecting { .. } => "peer_reconnecting",
                ServerMessage::Offer { .. } => "offer",
                ServerMessage::Candidate { .. } => "candidate",
                _ => "other",
            };
            (*c, kind)
        })
        .collect()
}

fn rooms_with(n: u64) -> Rooms {
    let mut r = Rooms::new(CFG);
    for c in 1..=n {
        r.connect(c, format!("peer{c}"), None);
    }
    r
}

fn join(room: &str) -> ClientMessage {
    ClientMessage::Join {
        room: room.into(),
        name: None,
        host_token: None,
    }
}

fn join_with(room: &str, token: &str) -> ClientMessage {
    ClientMessage::Join {
        room: room.into(),
        name: None,
        host_token: Some(token.into()),
    }
}

fn meeting(now: Now, starts_in: Duration, ttl: Duration) -> Meeting {
    Meeting {
        token_hash: ids::secret_hash("secret"),
        title: Some("t".into()),
        starts_at: now.wall + starts_in,
        ttl,
        created_at: now.wall,
        ended: None,
    }
}

fn state(r: &Rooms, room: &str, now: Now) -> RoomState {
    r.room_info(room, now).unwrap().state
}

#[test]
fn meeting_opens_early_by_the_grace_and_says_when() {
    let t = Now::system();
    let mut r = rooms_with(1);
    let mut out = Outbox::new();
    let hour = Duration::from_secs(3600);
    assert!(r.add_meeting("m", meeting(t, hour, Duration::from_secs(60)), t));
    assert!(!r.add_meeting("m", meeting(t, hour, Duration::from_secs(60)), t));
    assert_eq!(state(&r, "m", t), RoomState::Scheduled);
    r.handle(1, join("m"), t, &mut out);
    let ServerMessage::Error {
        code: ErrorCode::NotStarted,
        starts_at: Some(starts_at),
        ..
    } = &out[0].1
    else {
        panic!("{out:?}");
    };
    assert_eq!(starts_at, &format_rfc3339(t.wall + hour));
    out.clear();
    let early = t.later(hour - Duration::from_secs(300));
    assert_eq!(state(&r, "m", early), RoomState::Open);
    r.handle(1, join("m"), early, &mut out);
    assert!(matches!(
        out[0].1,
        ServerMessage::Joined { host: false, .. }
    ));
    assert_eq!(state(&r, "m", early), RoomState::Active);
    // Nobody expires it before starts_at + ttl, even when empty for longer.
    r.handle(1, ClientMessage::Leave, early, &mut out);
    r.tick(t.later(hour + Duration::from_secs(59)), &mut out);
    assert_eq!(state(&r, "m", early), RoomState::Open);
    r.tick(t.later(hour + Duration::from_secs(60)), &mut out);
    assert_eq!(state(&r, "m", early), RoomState::Ended);
    assert!(matches!(
        r.take_events()[..],
        [MeetingEvent::Ended {
            reason: RoomEndReason::Expired,
            ..
        }]
    ));
}

#[test]
fn meeting_host_is_whoever_has_the_token() {
    let t = Now::system();
    let mut r = rooms_with(3);
    let mut out = Outbox::new();
    r.add_meeting("m", meeting(t, Duration::ZERO, Duration::from_secs(60)), t);
    r.handle(1, join_with("m", "wrong"), t, &mut out);
    assert!(matches!(
        out[0].1,
        ServerMessage::Error {
            code: ErrorCode::NotHost,
            ..
        }
    ));
    assert_eq!(r.members("m"), Some(0));
    out.clear();
    r.handle(1, join("m"), t, &mut out);
    r.handle(2, join_with("m", "secret"), t, &mut out);
    assert!(matches!(
        out[0].1,
        ServerMessage::Joined { host: false, .. }
    ));
    assert!(matches!(out[1].1, ServerMessage::Joined { host: true, .. }));
    out.clear();
    r.handle(1, ClientMessage::EndRoom, t, &mut out);
    assert_eq!(kinds(&out), vec![(1, "error")]);
    out.clear();
    // The host leaving hands nothing over; the token brings the role back.
    r.handle(2, ClientMessage::Leave, t, &mut out);
    assert_eq!(kinds(&out), vec![(1, "peer_left")]);
    out.clear();
    r.handle(3, join_with("m", "secret"), t, &mut out);
    r.handle(3, ClientMessage::EndRoom, t, &mut out);
    assert_eq!(
        kinds(&out),
        vec![
            (3, "joined"),
            (1, "peer_joined"),
            (1, "room_ended"),
            (3, "room_ended")
        ]
    );
    assert!(matches!(
        r.take_events()[..],
        [MeetingEvent::Ended {
            reason: RoomEndReason::HostEnded,
            ..
        }]
    ));
    assert_eq!(r.check_host("m", Some("secret")), Err(HostCheck::Ended));
    assert_eq!(r.check_host("m", Some("x")), Err(HostCheck::WrongToken));
    assert_eq!(r.check_host("n", Some("x")), Err(HostCheck::UnknownRoom));
    // Ended meetings are remembered for the retention, then forgotten.
    r.tick(t.later(ENDED_RETENTION - Duration::from_secs(1)), &mut out);
    assert_eq!(r.room_count(), 1);
    r.tick(t.later(ENDED_RETENTION), &mut out);
    assert_eq!(r.room_count(), 0);
    assert!(matches!(
        r.take_events()[..],
        [MeetingEvent::Forgotten { .. }]
    ));
}

#[test]
fn one_address_creates_at_most_its_rooms_a_minute_however_many_connections_it_opens() {
    let t = Now::system();
    let mut r = Rooms::new(RoomsConfig {
        rooms_per_minute: 3,
        rooms_per_minute_per_address: 4,
        ..CFG
    });
    let here: IpAddr = "198.51.100.7".parse().unwrap();
    let there: IpAddr = "198.51.100.8".parse().unwrap();
    let mut out = Outbox::new();
    // A new connection for every room: 4 rooms, then refused.
    for c in 1..=5 {
        r.connect(c, format!("peer{c}"), Some(here));
        r.handle(c, join(&format!("r{c}")), t, &mut out);
    }
    assert_eq!(error_code(&out), Some(ErrorCode::RateLimited));
    assert_eq!(r.room_count(), 4);
    // Another address is not affected; a minute later this one may again.
    r.connect(6, "peer6".into(), Some(there));
    r.handle(6, join("r6"), t, &mut out);
    assert_eq!(kinds(&out).last(), Some(&(6, "joined")));
    let later = Now {
        mono: t.mono + MINUTE,
        wall: t.wall,
    };
    r.connect(7, "peer7".into(), Some(here));
    r.handle(7, join("r7"), later, &mut out);
    assert_eq!(kinds(&out).last(), Some(&(7, "joined")));
}

#[test]
fn a_connection_creates_at_most_its_rooms_a_minute_and_the_server_its_total() {
    let t = Now::system();
    let mut r = Rooms::new(RoomsConfig {
        rooms_per_minute: 3,
        max_rooms: 5,
        ..CFG
    });
    for c in 1..=3 {
        r.connect(c, format!("peer{c}"), None);
    }
    let mut out = Outbox::new();
    for i in 0..3 {
        r.handle(1, join(&format!("r{i}")), t, &mut out);
        assert_eq!(kinds(&out).last(), Some(&(1, "joined")));
    }
    r.handle(1, join("r3"), t, &mut out);
    assert_eq!(error_code(&out), Some(ErrorCode::RateLimited));
    assert_eq!(r.room_count(), 3, "nothing created");
    // Joining a room that exists is not creating one.
    out.clear();
    r.handle(1, join("r0"), t, &mut out);
    assert_eq!(kinds(&out).last(), Some(&(1, "joined")));
    // A minute later it may create again.
    r.handle(1, join("r3"), t.later(Duration::from_secs(60)), &mut out);
    assert_eq!(kinds(&out).last(), Some(&(1, "joined")));
    // The total: 5 rooms held (r0-r3, and r4 from another connection), no sixth.
    out.clear();
    r.handle(2, join("r4"), t, &mut out);
    assert_eq!(kinds(&out).last(), Some(&(2, "joined")));
    assert_eq!(r.room_count(), 5);
    out.clear();
    r.handle(3, join("r5"), t, &mut out);
    assert_eq!(error_code(&out), Some(ErrorCode::RateLimited));
    assert_eq!(r.room_count(), 5);
}

#[test]
fn join_order_decides_host_and_fullness() {
    let t = Now::system();
    let mut r = rooms_with(3);
    let mut out = Outbox::new();
    for c in 1..=3 {
        r.handle(c, join("x"), t, &mut out);
    }
    assert_eq!(
        kinds(&out),
        vec![
            (1, "joined"),
            (2, "joined"),
            (1, "peer_joined"),
            (3, "room_full")
        ]
    );
    assert!(matches!(out[0].1, ServerMessage::Joined { host: true, .. }));
    assert!(matches!(
        out[1].1,
        ServerMessage::Joined { host: false, .. }
    ));
}

#[test]
fn ringing_times_out_on_the_clock_not_before() {
    let t = Now::system();
    let mut r = rooms_with(2);
    let mut out = Outbox::new();
    r.handle(1, ClientMessage::Register { name: "a".into() }, t, &mut out);
    r.handle(2, ClientMessage::Register { name: "b".into() }, t, &mut out);
    r.handle(1, ClientMessage::Call { to: "b".into() }, t, &mut out);
    out.clear();
    r.tick(t.later(Duration::from_secs(29)), &mut out);
    assert!(out.is_empty());
    r.tick(t.later(Duration::from_secs(30)), &mut out);
    assert_eq!(
        kinds(&out),
        vec![(1, "call_rejected"), (2, "call_cancelled")]
    );
    assert_eq!(r.room_count(), 0);
}

#[test]
fn empty_and_ended_rooms_expire_after_the_ttl() {
    let t = Now::system();
    let mut r = rooms_with(2);
    let mut out = Outbox::new();
    r.handle(1, join("empty"), t, &mut out);
    r.handle(1, ClientMessage::Leave, t, &mut out);
    r.handle(2, join("ended"), t, &mut out);
    r.handle(2, ClientMessage::EndRoom, t, &mut out);
    out.clear();
    r.tick(t.later(Duration::from_secs(599)), &mut out);
    assert_eq!(r.room_count(), 2);
    // An ended room refuses joins until it expires, then the name is free again.
    r.handle(1, join("ended"), t, &mut out);
    assert_eq!(kinds(&out), vec![(1, "error")]);
    r.tick(t.later(Duration::from_secs(600)), &mut out);
    assert_eq!(r.room_count(), 0);
}

#[test]
fn disconnect_cleans_everything() {
    let t = Now::system();
    let mut r = rooms_with(2);
    let mut out = Outbox::new();
    r.handle(1, ClientMessage::Register { name: "a".into() }, t, &mut out);
    r.handle(1, join("x"), t, &mut out);
    r.handle(2, join("x"), t, &mut out);
    out.clear();
    r.disconnect(1, t, &mut out);
    assert_eq!(kinds(&out), vec![(2, "peer_left"), (2, "host_changed")]);
    assert_eq!(r.connection_count(), 1);
    r.connect(3, "peer3".into(), None);
    out.clear();
    r.handle(3, ClientMessage::Register { name: "a".into() }, t, &mut out);
    assert_eq!(kinds(&out), vec![(3, "registered")], "name freed");
}

const GRACE: Duration = Duration::from_secs(30);

fn resumable(n: u64) -> Rooms {
    let mut r = Rooms::new(RoomsConfig {
        resume_grace: GRACE,
        ..CFG
    });
    for c in 1..=n {
        r.connect(c, format!("peer{c}"), None);
    }
    r
}

/// The `resume_token` of the last `joined` sent to `conn`.
fn token_of(out: &Outbox, conn: ConnId) -> String {
    out.iter()
        .rev()
        .find_map(|(c, m)| match m {
            ServerMessage::Joined {
                resume_token: Some(t),
                ..
            } if *c == conn => Some(t.clone()),
            _ => None,
        })
        .expect("a joined with a token")
}

fn resume(room: &str, peer_id: &str, token: &str) -> ClientMessage {
    ClientMessage::Resume {
        room: room.into(),
        peer_id: peer_id.into(),
        resume_token: token.into(),
    }
}

fn error_code(out: &Outbox) -> Option<ErrorCode> {
    out.iter().find_map(|(_, m)| match m {
        ServerMessage::Error { code, .. } => Some(*code),
        _ => None,
    })
}

#[test]
fn a_dropped_member_keeps_its_seat_and_resumes_it() {
    let t = Now::system();
    let mut r = resumable(5);
    let mut out = Outbox::new();
    r.handle(1, join("x"), t, &mut out);
    r.handle(2, join("x"), t, &mut out);
    let token = token_of(&out, 1);
    assert!(token.len() >= 32);
    assert_ne!(token, token_of(&out, 2));
    out.clear();
    r.disconnect(1, t, &mut out);
    assert_eq!(kinds(&out), vec![(2, "peer_reconnecting")]);
    assert_eq!((r.connection_count(), r.away_count()), (4, 1));
    out.clear();
    // The seat still counts, and what the partner sends waits for it.
    r.handle(3, join("x"), t, &mut out);
    assert_eq!(kinds(&out), vec![(3, "room_full")]);
    out.clear();
    r.handle(2, ClientMessage::Offer { sdp: "o".into() }, t, &mut out);
    assert!(out.is_empty(), "{out:?}");
    // A wrong token changes nothing.
    r.handle(4, resume("x", "peer1", "wrong"), t, &mut out);
    assert_eq!(error_code(&out), Some(ErrorCode::ResumeFailed));
    assert_eq!(out.len(), 1);
    assert_eq!((r.members("x"), r.away_count()), (Some(2), 1));
    out.clear();
    let soon = t.later(Duration::from_secs(10));
    r.handle(4, resume(" x ", "peer1", &token), soon, &mut out);
    assert_eq!(kinds(&out), vec![(4, "joined"), (4, "offer")]);
    let ServerMessage::Joined {
        room,
        peer_id,
        members,
        host,
        peers,
        resume_token: Some(fresh),
    } = &out[0].1
    else {
        panic!("{out:?}");
    };
    assert_eq!((room.as_str(), peer_id.as_str()), ("x", "peer1"));
    assert_eq!((*members, *host), (2, true));
    assert_eq!(peers[0].peer_id, "peer2");
    assert_ne!(fresh, &token);
    let fresh = fresh.clone();
    assert_eq!((r.connection_count(), r.away_count()), (4, 0));
    out.clear();
    // The resumed seat is an ordinary one: relaying works both ways, the host
    // role is there, and the grace no longer runs.
    r.handle(2, ClientMessage::Answer { sdp: "a".into() }, soon, &mut out);
    r.handle(4, ClientMessage::Offer { sdp: "o".into() }, soon, &mut out);
    assert_eq!(kinds(&out), vec![(4, "other"), (2, "offer")]);
    out.clear();
    r.tick(t.later(GRACE * 2), &mut out);
    assert!(out.is_empty(), "{out:?}");
    // The old token is spent; the fresh one works once more.
    r.disconnect(4, soon, &mut out);
    out.clear();
    r.handle(5, resume("x", "peer1", &token), soon, &mut out);
    assert_eq!(error_code(&out), Some(ErrorCode::ResumeFailed));
    out.clear();
    r.handle(5, resume("x", "peer1", &fresh), soon, &mut out);
    assert_eq!(kinds(&out), vec![(5, "joined")]);
    r.handle(5, ClientMessage::EndRoom, soon, &mut out);
    assert_eq!(r.members("x"), Some(0));
}

#[test]
fn the_grace_runs_out_on_the_clock_like_a_disconnect() {
    let t = Now::system();
    let mut r = resumable(3);
    let mut out = Outbox::new();
    r.handle(1, join("x"), t, &mut out);
    r.handle(2, join("x"), t, &mut out);
    let token = token_of(&out, 1);
    r.disconnect(1, t, &mut out);
    out.clear();
    r.tick(t.later(GRACE - Duration::from_millis(1)), &mut out);
    assert!(out.is_empty(), "{out:?}");
    r.tick(t.later(GRACE), &mut out);
    assert_eq!(kinds(&out), vec![(2, "peer_left"), (2, "host_changed")]);
    assert!(matches!(
        out[0].1,
        ServerMessage::PeerLeft {
            reason: LeaveReason::Disconnected,
            ..
        }
    ));
    assert_eq!((r.connection_count(), r.away_count()), (2, 0));
    assert_eq!(r.members("x"), Some(1));
    out.clear();
    r.handle(3, resume("x", "peer1", &token), t, &mut out);
    assert_eq!(error_code(&out), Some(ErrorCode::ResumeFailed));
    // A resume that beats the sweep to an overdue seat finds the grace over too.
    r.handle(3, join("x"), t, &mut out);
    let token3 = token_of(&out, 3);
    r.disconnect(3, t, &mut out);
    r.connect(4, "peer4".into(), None);
    out.clear();
    r.handle(4, resume("x", "peer3", &token3), t.later(GRACE), &mut out);
    assert_eq!(kinds(&out), vec![(2, "peer_left"), (4, "error")]);
    assert_eq!(r.members("x"), Some(1));
}

#[test]
fn the_away_queue_is_bounded_and_keeps_the_newest() {
    let t = Now::system();
    let mut r = resumable(3);
    let mut out = Outbox::new();
    r.handle(1, join("x"), t, &mut out);
    r.handle(2, join("x"), t, &mut out);
    let token = token_of(&out, 1);
    r.disconnect(1, t, &mut out);
    for i in 0..100 {
        let sdp = format!("{i}");
        r.handle(2, ClientMessage::Offer { sdp }, t, &mut out);
    }
    out.clear();
    r.handle(3, resume("x", "peer1", &token), t, &mut out);
    assert_eq!(out.len(), 1 + AWAY_QUEUE_MESSAGES);
    assert!(matches!(&out[1].1, ServerMessage::Offer { sdp, .. } if sdp == "36"));
    assert!(matches!(&out[64].1, ServerMessage::Offer { sdp, .. } if sdp == "99"));
    let token = token_of(&out, 3);
    r.disconnect(3, t, &mut out);
    // Big messages hit the byte bound before the count bound.
    let big = "v".repeat(60_000);
    for _ in 0..10 {
        let sdp = big.clone();
        r.handle(2, ClientMessage::Offer { sdp }, t, &mut out);
    }
    r.connect(4, "peer4".into(), None);
    out.clear();
    r.handle(4, resume("x", "peer1", &token), t, &mut out);
    assert_eq!(out.len(), 1 + 4, "256 KiB hold four 60 kB offers");
}

#[test]
fn without_a_grace_a_drop_leaves_at_once_and_resume_is_refused() {
    let t = Now::system();
    let mut r = rooms_with(3);
    let mut out = Outbox::new();
    r.handle(1, join("x"), t, &mut out);
    r.handle(2, join("x"), t, &mut out);
    assert!(out.iter().all(|(_, m)| !matches!(
        m,
        ServerMessage::Joined {
            resume_token: Some(_),
            ..
        }
    )));
    out.clear();
    r.disconnect(1, t, &mut out);
    assert_eq!(kinds(&out), vec![(2, "peer_left"), (2, "host_changed")]);
    out.clear();
    r.handle(3, resume("x", "peer1", "anything"), t, &mut out);
    assert_eq!(error_code(&out), Some(ErrorCode::ResumeFailed));
}

fn wrong_token(token: &str) -> String {
    token.chars().rev().collect()
}

#[test]
fn resume_takes_over_present_members_and_is_refused_for_ended_rooms_and_busy_connections() {
    let t = Now::system();
    let mut r = resumable(5);
    let mut out = Outbox::new();
    r.handle(1, join("x"), t, &mut out);
    r.handle(2, join("x"), t, &mut out);
    let token1 = token_of(&out, 1);
    let token2 = token_of(&out, 2);
    out.clear();
    // Peer 1 still looks connected, but the token proves it: the new connection
    // takes the seat over (its old path may have died silently).
    r.handle(3, resume("x", "peer1", &wrong_token(&token1)), t, &mut out);
    assert_eq!(kinds(&out), vec![(3, "error")], "not with a wrong token");
    out.clear();
    r.handle(3, resume("x", "peer1", &token1), t, &mut out);
    assert_eq!(
        kinds(&out),
        vec![(2, "peer_reconnecting"), (3, "joined")],
        "{out:?}"
    );
    let token1 = token_of(&out, 3);
    out.clear();
    // The old connection closing later changes nothing.
    r.disconnect(1, t, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(r.away_count(), 0);
    // Unknown room or peer.
    r.handle(5, resume("y", "peer1", &token1), t, &mut out);
    r.handle(5, resume("x", "peer9", &token1), t, &mut out);
    assert_eq!(out.len(), 2);
    out.clear();
    // A connection in a room resumes nothing.
    r.disconnect(2, t, &mut out);
    r.handle(4, join("z"), t, &mut out);
    out.clear();
    r.handle(4, resume("x", "peer2", &token2), t, &mut out);
    assert_eq!(error_code(&out), Some(ErrorCode::ResumeFailed));
    out.clear();
    // The host (peer 1, on connection 3 since the takeover) ends the room while the
    // partner is away: the seat goes with it.
    r.handle(3, ClientMessage::EndRoom, t, &mut out);
    assert_eq!(kinds(&out), vec![(3, "room_ended")]);
    assert_eq!(r.away_count(), 0);
    out.clear();
    r.handle(3, resume("x", "peer2", &token2), t, &mut out);
    assert_eq!(error_code(&out), Some(ErrorCode::ResumeFailed));
}

#[test]
fn an_explicit_leave_while_the_partner_is_away_is_queued_for_it() {
    let t = Now::system();
    let mut r = resumable(3);
    let mut out = Outbox::new();
    r.handle(1, join("x"), t, &mut out);
    r.handle(2, join("x"), t, &mut out);
    let token = token_of(&out, 2);
    r.disconnect(2, t, &mut out);
    r.handle(1, ClientMessage::Leave, t, &mut out);
    out.clear();
    r.handle(3, resume("x", "peer2", &token), t, &mut out);
    assert_eq!(
        kinds(&out),
        vec![(3, "joined"), (3, "peer_left"), (3, "host_changed")]
    );
    assert!(matches!(
        out[0].1,
        ServerMessage::Joined {
            members: 1,
            host: true,
            ..
        }
    ));
}

#[test]
fn a_ringing_caller_that_drops_cancels_the_call_and_names_are_released() {
    let t = Now::system();
    let mut r = resumable(3);
    let mut out = Outbox::new();
    r.handle(1, ClientMessage::Register { name: "a".into() }, t, &mut out);
    r.handle(2, ClientMessage::Register { name: "b".into() }, t, &mut out);
    r.handle(1, ClientMessage::Call { to: "b".into() }, t, &mut out);
    out.clear();
    r.disconnect(1, t, &mut out);
    assert_eq!(kinds(&out), vec![(2, "call_cancelled")]);
    assert_eq!(r.away_count(), 0);
    out.clear();
    // Once accepted, a call's room keeps seats like any other; the name does not
    // stay with the away seat.
    r.connect(4, "peer4".into(), None);
    r.handle(4, ClientMessage::Register { name: "d".into() }, t, &mut out);
    r.handle(4, ClientMessage::Call { to: "b".into() }, t, &mut out);
    let call_id = out
        .iter()
        .find_map(|(_, m)| match m {
            ServerMessage::IncomingCall { call_id, .. } => Some(call_id.clone()),
            _ => None,
        })
        .unwrap();
    r.handle(2, ClientMessage::Accept { call_id }, t, &mut out);
    out.clear();
    r.disconnect(2, t, &mut out);
    assert_eq!(kinds(&out), vec![(4, "peer_reconnecting")]);
    out.clear();
    r.handle(3, ClientMessage::Register { name: "b".into() }, t, &mut out);
    assert_eq!(kinds(&out), vec![(3, "registered")]);
}
