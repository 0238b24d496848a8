//! Persistence of meetings (rooms created through the HTTP API) in SQLite, so that
//! scheduled rooms and their host tokens survive a restart. Live membership is not
//! stored: after a restart every meeting is empty.
//!
//! One dedicated thread owns the `rusqlite` connection and runs the jobs sent to it in
//! order, so blocking disk I/O never runs on the async executor and writes cannot
//! interleave. Every write is its own transaction on a WAL database with
//! `synchronous=FULL`: when [`Store::insert`] or [`Store::end`] returns, the change is on
//! disk, which is when the HTTP API answers. Changes made by the state machine itself
//! (WebSocket `end_room`, expiry, forgetting) are recorded in the background, in order.
//!
//! The schema is versioned with `PRAGMA user_version`; [`MIGRATIONS`] brings any older
//! file up to date at start-up, each step in a transaction.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, params};
use tracing::{debug, info, warn};

use crate::core::clock::from_unix;
use crate::core::rooms::{Meeting, MeetingEvent};
use crate::protocol::RoomEndReason;

/// The path that means "keep it in memory only" (tests and throw-away servers).
pub const IN_MEMORY: &str = ":memory:";

/// Schema steps; `user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: meetings.
    "CREATE TABLE rooms (
        room_id      TEXT PRIMARY KEY NOT NULL,
        token_sha256 BLOB NOT NULL,
        title        TEXT,
        starts_at    INTEGER NOT NULL, -- unix seconds, UTC
        ttl_s        INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        ended_at     INTEGER,          -- unix seconds; NULL while not ended
        end_reason   TEXT              -- host_ended | expired
    ) STRICT;
    CREATE INDEX rooms_by_start ON rooms (starts_at);",
];

/// The database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the directory of the database {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this server knows ({known}); \
         use a newer signaling-server"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("database {path} holds an invalid room `{room}`")]
    BadRow { path: PathBuf, room: String },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the database thread has stopped")]
    Closed,
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

enum Command {
    Run(Job),
    Stop,
}

/// A handle to the database thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    jobs: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Run(_) => "Run",
            Command::Stop => "Stop",
        })
    }
}

/// The database thread; [`StoreThread::stop`] ends it after the jobs already queued.
#[derive(Debug)]
pub struct StoreThread {
    jobs: mpsc::Sender<Command>,
    thread: JoinHandle<()>,
}

impl StoreThread {
    /// Runs the queued jobs, closes the database and waits for the thread (blocking).
    pub fn stop(self) {
        let _ = self.jobs.send(Command::Stop);
        if self.thread.join().is_err() {
            warn!("the database thread panicked");
        }
    }
}

/// A meeting as stored: its id and everything but live membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMeeting {
    pub room_id: String,
    pub meeting: Meeting,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, brings its schema up to date,
    /// and starts the database thread. Returns every stored meeting too. Blocking.
    pub fn open(path: &Path) -> Result<(Store, StoreThread, Vec<StoredMeeting>), StoreError> {
        let mut conn = open_connection(path)?;
        migrate(&mut conn, path)?;
        let meetings = load(&conn, path)?;
        let (jobs, queue) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("duet-db".into())
            .spawn(move || {
                while let Ok(Command::Run(job)) = queue.recv() {
                    job(&mut conn);
                }
                drop(conn);
                debug!("database closed");
            })
            .map_err(|source| StoreError::Directory {
                path: path.to_owned(),
                source,
            })?;
        info!(path = %path.display(), meetings = meetings.len(), "database open");
        Ok((
            Store { jobs: jobs.clone() },
            StoreThread { jobs, thread },
            meetings,
        ))
    }

    /// Runs `f` on the database thread and waits for its result.
    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (reply, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = reply.send(f(conn));
        });
        self.jobs
            .send(Command::Run(job))
            .map_err(|_| StoreError::Closed)?;
        Ok(result.await.map_err(|_| StoreError::Closed)??)
    }

    /// Stores a new meeting, durably. `Ok(false)` when the id is taken already.
    pub async fn insert(&self, m: StoredMeeting) -> Result<bool, StoreError> {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let meeting = &m.meeting;
            let (ended_at, reason) = ended_columns(meeting.ended);
            let inserted = tx.execute(
                "INSERT INTO rooms (room_id, token_sha256, title, starts_at, ttl_s, created_at,
                                    ended_at, end_reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (room_id) DO NOTHING",
                params![
                    m.room_id,
                    meeting.token_hash.as_slice(),
                    meeting.title,
                    meeting.starts_at.unix_timestamp(),
                    i64::try_from(meeting.ttl.as_secs()).unwrap_or(i64::MAX),
                    meeting.created_at.unix_timestamp(),
                    ended_at,
                    reason,
                ],
            )?;
            tx.commit()?;
            Ok(inserted == 1)
        })
        .await
    }

    /// Marks a meeting ended, durably (the first end counts; later ones change nothing).
    pub async fn end(
        &self,
        room_id: String,
        at: time::OffsetDateTime,
        reason: RoomEndReason,
    ) -> Result<(), StoreError> {
        self.call(move |conn| record_end(conn, &room_id, at, reason))
            .await
    }

    /// Records what the state machine changed, in the background and in order.
    pub fn record(&self, events: Vec<MeetingEvent>) {
        if events.is_empty() {
            return;
        }
        let job: Job = Box::new(move |conn| {
            for event in events {
                let result = match &event {
                    MeetingEvent::Ended { room, at, reason } => {
                        record_end(conn, room, *at, *reason)
                    }
                    MeetingEvent::Forgotten { room } => conn
                        .execute("DELETE FROM rooms WHERE room_id = ?1", params![room])
                        .map(drop),
                };
                if let Err(e) = result {
                    warn!(error = %e, ?event, "cannot record a meeting change");
                }
            }
        });
        if self.jobs.send(Command::Run(job)).is_err() {
            warn!("the database thread has stopped; a meeting change is not recorded");
        }
    }

    /// Every stored meeting (as loaded at start-up).
    pub async fn load_all(&self) -> Result<Vec<StoredMeeting>, StoreError> {
        let (reply, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = reply.send(load(conn, Path::new("(open database)")));
        });
        self.jobs
            .send(Command::Run(job))
            .map_err(|_| StoreError::Closed)?;
        result.await.map_err(|_| StoreError::Closed)?
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let conn = if path == Path::new(IN_MEMORY) {
        Connection::open_in_memory().map_err(open_err)?
    } else {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Directory {
                path: dir.to_owned(),
                source,
            })?;
        }
        Connection::open(path).map_err(open_err)?
    };
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(open_err)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let known = MIGRATIONS.len();
    let applied = usize::try_from(version).map_err(|_| StoreError::TooNew {
        path: path.to_owned(),
        found: version,
        known,
    })?;
    if applied > known {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: version,
            known,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )?;
        tx.commit()?;
        info!(path = %path.display(), version = i + 1, "database schema migrated");
    }
    Ok(())
}

fn ended_columns(
    ended: Option<(time::OffsetDateTime, RoomEndReason)>,
) -> (Option<i64>, Option<&'static str>) {
    match ended {
        Some((at, reason)) => (Some(at.unix_timestamp()), Some(reason_name(reason))),
        None => (None, None),
    }
}

fn reason_name(reason: RoomEndReason) -> &'static str {
    match reason {
        RoomEndReason::HostEnded => "host_ended",
        RoomEndReason::Expired => "expired",
    }
}

fn record_end(
    conn: &mut Connection,
    room_id: &str,
    at: time::OffsetDateTime,
    reason: RoomEndReason,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute(
        "UPDATE rooms SET ended_at = ?2, end_reason = ?3 WHERE room_id = ?1 AND ended_at IS NULL",
        params![room_id, at.unix_timestamp(), reason_name(reason)],
    )?;
    tx.commit()
}

type Row = (
    String,
    Vec<u8>,
    Option<String>,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<String>,
);

fn load(conn: &Connection, path: &Path) -> Result<Vec<StoredMeeting>, StoreError> {
    let mut statement = conn.prepare(
        "SELECT room_id, token_sha256, title, starts_at, ttl_s, created_at, ended_at, end_reason
         FROM rooms ORDER BY starts_at",
    )?;
    let rows = statement.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
        ))
    })?;
    let mut meetings = Vec::new();
    for row in rows {
        let row: Row = row?;
        let room_id = row.0.clone();
        let meeting = meeting_from_row(row).ok_or_else(|| StoreError::BadRow {
            path: path.to_owned(),
            room: room_id.clone(),
        })?;
        meetings.push(StoredMeeting { room_id, meeting });
    }
    Ok(meetings)
}

fn meeting_from_row(row: Row) -> Option<Meeting> {
    let (_, token, title, starts_at, ttl_s, created_at, ended_at, reason) = row;
    let ended = match (ended_at, reason.as_deref()) {
        (None, _) => None,
        (Some(at), Some("expired")) => Some((from_unix(at)?, RoomEndReason::Expired)),
        (Some(at), _) => Some((from_unix(at)?, RoomEndReason::HostEnded)),
    };
    Some(Meeting {
        token_hash: token.try_into().ok()?,
        title,
        starts_at: from_unix(starts_at)?,
        ttl: Duration::from_secs(u64::try_from(ttl_s).ok()?),
        created_at: from_unix(created_at)?,
        ended,
    })
}

/// The ids of every meeting in the database file at `path`, read with a connection of
/// its own (for tests and tools; a running server may hold the file too).
pub fn stored_room_ids(path: &Path) -> Result<Vec<String>, StoreError> {
    let conn = open_connection(path)?;
    let mut statement = conn.prepare("SELECT room_id FROM rooms ORDER BY room_id")?;
    let ids = statement
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::clock::Now;
    use crate::ids;

    fn meeting(now: Now) -> Meeting {
        Meeting {
            token_hash: ids::secret_hash("tok"),
            title: Some("Weekly".into()),
            starts_at: now.wall,
            ttl: Duration::from_secs(600),
            created_at: now.wall,
            ended: None,
        }
    }

    #[tokio::test]
    async fn meetings_survive_reopening_and_migrations_run_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/db.sqlite3");
        let now = Now::system();
        let (store, thread, loaded) = Store::open(&path).unwrap();
        assert!(loaded.is_empty());
        let m = StoredMeeting {
            room_id: "abc-defg-hij-kmn".into(),
            meeting: meeting(now),
        };
        assert!(store.insert(m.clone()).await.unwrap());
        assert!(!store.insert(m.clone()).await.unwrap(), "duplicate id");
        let second = StoredMeeting {
            room_id: "zzz-zzzz-zzz-zzz".into(),
            meeting: meeting(now),
        };
        assert!(store.insert(second.clone()).await.unwrap());
        store
            .end(second.room_id.clone(), now.wall, RoomEndReason::HostEnded)
            .await
            .unwrap();
        store.record(vec![MeetingEvent::Ended {
            room: second.room_id.clone(),
            at: now.wall + Duration::from_secs(5),
            reason: RoomEndReason::Expired,
        }]);
        assert_eq!(store.load_all().await.unwrap().len(), 2);
        thread.stop();
        assert!(matches!(
            store.insert(m.clone()).await,
            Err(StoreError::Closed)
        ));

        let (store, thread, loaded) = Store::open(&path).unwrap();
        assert_eq!(loaded.len(), 2);
        let first = loaded.iter().find(|s| s.room_id == m.room_id).unwrap();
        assert_eq!(first, &m);
        let ended = loaded.iter().find(|s| s.room_id == second.room_id).unwrap();
        assert_eq!(
            ended.meeting.ended,
            Some((now.wall, RoomEndReason::HostEnded)),
            "the first end counts"
        );
        store.record(vec![MeetingEvent::Forgotten {
            room: second.room_id.clone(),
        }]);
        assert_eq!(store.load_all().await.unwrap().len(), 1);
        thread.stop();
        assert_eq!(stored_room_ids(&path).unwrap(), vec![m.room_id.clone()]);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite3");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
