//! The HTTP API handlers: rooms (create, read, list, end), ICE servers, the OpenAPI
//! document, and the `/r/{room_id}` join URLs: the web client for browsers, a line of
//! text for everything else.
//!
//! Every failure is JSON `{"error": code, "message": text}` with a fitting status, also
//! for bodies axum would reject by itself: handlers take raw bytes and extractor results
//! and classify failures here, so no request body can produce a plain-text error or a
//! panic. Creating a room answers `201` only after the store has committed it.
//! Secrets (API key, host tokens) are compared as SHA-256 hashes in constant time and
//! never logged.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{
    DefaultBodyLimit, FromRequest as _, FromRequestParts, Path, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use time::OffsetDateTime;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

use crate::core::clock::{Now, format_rfc3339, parse_rfc3339};
use crate::core::rate_limit::{RateLimit, RateLimiter, Verdict};
use crate::core::rooms::Meeting;
use crate::ids;
use crate::protocol::IceServer;
use crate::protocol::api::{
    ApiError, CreateRoomRequest, CreatedRoom, DEFAULT_TTL_S, IceServers, MAX_TITLE_CHARS,
    MAX_TTL_S, RoomInfo, RoomList, RoomState, join_url,
};
use crate::state::{BackendError, EndRefused, Meetings};
use crate::turn::IceConfig;

/// Largest request body; more is `413`.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// How far in the past `starts_at` may lie (clocks differ; a meeting may be running).
pub const MAX_STARTS_AT_PAST: Duration = Duration::from_secs(3600);
/// How far ahead a room can be scheduled.
pub const MAX_STARTS_AT_AHEAD: Duration = Duration::from_secs(366 * 24 * 3600);

/// The address a request came from (set by the accept loop): the TCP peer, or behind a
/// trusted reverse proxy the client it names (see [`client_addr`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(pub SocketAddr);

/// The client a request is from. `peer` is the TCP peer; when it is a trusted proxy, the
/// `X-Forwarded-For` entries are read from the right (each proxy appends the address it
/// was reached from) and the first one that is not a trusted proxy is the client. A
/// malformed entry stops the walk at the last trusted hop (its peer is used): entries to
/// the left of it could have been written by anyone.
pub(crate) fn client_addr(
    peer: SocketAddr,
    headers: &HeaderMap,
    trusted: &[ipnet::IpNet],
) -> SocketAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(&ip.to_canonical()));
    if !is_trusted(peer.ip()) {
        return peer;
    }
    let mut client = peer;
    let entries = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect::<Vec<_>>();
    for entry in entries.into_iter().rev() {
        let Ok(ip) = entry
            .parse::<IpAddr>()
            .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        else {
            break;
        };
        client = SocketAddr::new(ip.to_canonical(), 0);
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

/// One token bucket per client address.
#[derive(Debug)]
struct Buckets {
    limit: RateLimit,
    buckets: Mutex<HashMap<IpAddr, (RateLimiter, Instant)>>,
}

impl Buckets {
    fn new(limit: RateLimit) -> Self {
        Buckets {
            // Over HTTP a refused request is simply refused; there is no connection to close.
            limit: RateLimit {
                max_dropped: u32::MAX,
                ..limit
            },
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Charges one request from `ip`; when refused, how long until one would pass.
    fn charge(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() > 10_000 {
            // Forget addresses whose bucket has refilled completely.
            let full = Duration::from_secs_f64(self.limit.burst / self.limit.per_second.max(0.001));
            buckets.retain(|_, (_, seen)| now.saturating_duration_since(*seen) < full);
        }
        let (bucket, seen) = buckets
            .entry(ip)
            .or_insert_with(|| (RateLimiter::new(self.limit, now), now));
        *seen = now;
        match bucket.check(now) {
            Verdict::Allow => Ok(()),
            Verdict::Drop { .. } | Verdict::Close => Err(bucket.retry_after()),
        }
    }
}

/// HTTP API state: the API key, the join-URL base and the per-address rate limits.
#[derive(Debug)]
pub(crate) struct ApiState {
    key_hash: Option<[u8; 32]>,
    public_url: Option<String>,
    /// Every `/api/` request.
    requests: Buckets,
    /// Rooms created without an API key (`None` with a key, or when turned off).
    creates: Option<Buckets>,
}

impl ApiState {
    pub fn new(
        api_key: Option<&str>,
        public_url: Option<String>,
        limit: RateLimit,
        create_limit: RateLimit,
    ) -> Self {
        // Key holders are trusted to create what they need; without a key, creating is
        // open to anyone and this limit is what keeps the database from being filled.
        let creates = (api_key.is_none() && create_limit.per_second > 0.0)
            .then(|| Buckets::new(create_limit));
        ApiState {
            key_hash: api_key.map(ids::secret_hash),
            public_url,
            requests: Buckets::new(limit),
            creates,
        }
    }

    /// Charges one API request from `ip`.
    fn admit(&self, ip: IpAddr) -> Result<(), Failure> {
        self.requests.charge(ip).map_err(|_| {
            Failure::rate_limited(
                "too many requests from your address; try again in a second",
                Duration::from_secs(1),
            )
        })
    }

    /// Charges one room created by `ip` without an API key.
    fn admit_create(&self, ip: IpAddr) -> Result<(), Failure> {
        let Some(creates) = &self.creates else {
            return Ok(());
        };
        creates.charge(ip).map_err(|wait| {
            let limit = creates.limit.per_second * 60.0;
            Failure::rate_limited(
                format!(
                    "too many rooms created from your address (at most {limit} a minute \
                     without an API key); try again later"
                ),
                wait,
            )
        })
    }
}

/// What the HTTP API handlers need from the server, and nothing more (built by
/// [`crate::server`], which this module does not know).
#[derive(Debug)]
pub(crate) struct ApiContext {
    pub api: ApiState,
    /// Where meetings live: the in-process backend or Redis.
    pub meetings: Arc<dyn Meetings>,
    pub ice: Arc<IceConfig>,
    /// `https` with TLS, else `http` (for join URLs without `--public-url`).
    pub scheme: &'static str,
    pub local_addr: SocketAddr,
    /// `--http-body-timeout`.
    pub body_timeout: Duration,
    /// Tasks the server's stop waits for (creating and ending rooms run in their own).
    pub tasks: TaskTracker,
}

/// A JSON body ending in a newline (so `curl` output ends its line).
pub(crate) struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(mut body) => {
                body.push(b'\n');
                (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    body,
                )
                    .into_response()
            }
            Err(e) => {
                error!(error = %e, "cannot serialize a response");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

/// An error answer.
#[derive(Debug)]
pub(crate) struct Failure {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// `Retry-After` for `429`.
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn rate_limited(message: impl Into<String>, retry_after: Duration) -> Self {
        Failure {
            retry_after: Some(retry_after),
            ..Failure::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }

    fn request_timeout(limit: Duration) -> Self {
        Failure::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} s",
                limit.as_secs_f64()
            ),
        )
    }

    fn bad_field(message: impl Into<String>) -> Self {
        Failure::new(StatusCode::BAD_REQUEST, "bad_field", message)
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        Failure::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 503 when cluster mode cannot reach Redis; 500 when the database failed.
    fn backend(e: &BackendError) -> Self {
        match e {
            BackendError::Unreachable(e) => {
                warn!(error = %e, "Redis operation for the HTTP API failed");
                Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the service's shared state (Redis) is unreachable; try again shortly",
                )
            }
            BackendError::Store(e) => {
                error!(error = %e, "the database failed");
                Failure::internal()
            }
        }
    }

    fn unknown_room(room: &str) -> Self {
        Failure::new(
            StatusCode::NOT_FOUND,
            "unknown_room",
            format!("no room `{room}`"),
        )
    }

    fn internal() -> Self {
        Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server could not do this; see its log",
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = ApiError {
            error: self.code.to_owned(),
            message: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(wait) = self.retry_after {
            // Whole seconds, rounded up: a client that waits this long gets through.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still come; the connection cannot be reused.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<ClientAddr>()
            .copied()
            .unwrap_or(ClientAddr(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))))
    }
}

/// The routes of this module (merged into the server's router).
pub(crate) fn routes() -> Router<Arc<ApiContext>> {
    Router::new()
        .route("/api/rooms", get(list_rooms).post(create_room))
        .route("/api/rooms/{room_id}", get(get_room).delete(delete_room))
        .route("/api/ice-servers", get(ice_servers))
        .route("/api/openapi.json", get(openapi))
        .route("/r/{room_id}", get(join_page))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// JSON `404` for every path nobody serves.
pub(crate) async fn not_found() -> Failure {
    Failure::new(StatusCode::NOT_FOUND, "not_found", "no such path")
}

/// JSON `405` for a known path with another method.
pub(crate) async fn method_not_allowed() -> Failure {
    Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this path does not take that method",
    )
}

/// The secret of an `Authorization: Bearer <secret>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, secret) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| secret.trim())
        .filter(|s| !s.is_empty())
}

fn require_api_key(ctx: &ApiContext, headers: &HeaderMap) -> Result<(), Failure> {
    let Some(hash) = &ctx.api.key_hash else {
        return Ok(());
    };
    match bearer(headers) {
        None => Err(Failure::unauthorized(
            "this server needs an API key: Authorization: Bearer <key>",
        )),
        Some(key) if ids::secret_matches(hash, key) => Ok(()),
        Some(_) => Err(Failure::unauthorized("wrong API key")),
    }
}

/// `http://<Host>` (`https://` with TLS) when no `--public-url` is set (the Host header
/// checked for shape).
fn base_url(ctx: &ApiContext, headers: &HeaderMap) -> String {
    if let Some(url) = &ctx.api.public_url {
        return url.clone();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
        });
    match host {
        Some(host) => format!("{}://{host}", ctx.scheme),
        None => format!("{}://{}", ctx.scheme, ctx.local_addr),
    }
}

/// The body as a JSON object: `bad_json` when it is not one, `too_large` over the limit.
fn json_object(body: Result<Bytes, BytesRejection>) -> Result<serde_json::Value, Failure> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            Failure::new(StatusCode::BAD_REQUEST, "bad_json", rejection.body_text())
        }
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Object(serde_json::Map::new()));
    }
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the body is not JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "the body must be a JSON object",
        ));
    }
    Ok(value)
}

/// A create request, checked.
#[derive(Debug)]
struct NewRoom {
    starts_at: OffsetDateTime,
    title: Option<String>,
    ttl: Duration,
}

fn check_create(request: CreateRoomRequest, now: Now) -> Result<NewRoom, Failure> {
    let starts_at = match request.starts_at.as_deref() {
        None => now.wall,
        Some(text) => {
            parse_rfc3339(text).map_err(|e| Failure::bad_field(format!("`starts_at`: {e}")))?
        }
    };
    if starts_at < now.wall - MAX_STARTS_AT_PAST {
        return Err(Failure::bad_field(
            "`starts_at` is more than an hour in the past",
        ));
    }
    if starts_at > now.wall + MAX_STARTS_AT_AHEAD {
        return Err(Failure::bad_field("`starts_at` is more than a year ahead"));
    }
    let title = match request.title.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(t) if t.chars().count() > MAX_TITLE_CHARS => {
            return Err(Failure::bad_field(format!(
                "`title` is longer than {MAX_TITLE_CHARS} characters"
            )));
        }
        Some(t) if t.chars().any(char::is_control) => {
            return Err(Failure::bad_field("`title` contains control characters"));
        }
        Some(t) => Some(t.to_owned()),
    };
    let ttl_s = request.ttl_s.unwrap_or(DEFAULT_TTL_S);
    if !(1..=MAX_TTL_S).contains(&ttl_s) {
        return Err(Failure::bad_field(format!(
            "`ttl_s` must be between 1 and {MAX_TTL_S} seconds"
        )));
    }
    Ok(NewRoom {
        starts_at,
        title,
        ttl: Duration::from_secs(ttl_s.unsigned_abs()),
    })
}

/// The checks of `POST /api/rooms` on a body, now (for the fuzzer).
pub(crate) fn check_create_body(body: &[u8]) -> Result<(), ()> {
    let value = json_object(Ok(Bytes::copy_from_slice(body))).map_err(|_| ())?;
    let request: CreateRoomRequest = serde_json::from_value(value).map_err(|_| ())?;
    check_create(request, Now::system())
        .map(|_| ())
        .map_err(|_| ())
}

/// Create a room (a meeting), optionally scheduled for later.
#[utoipa::path(
    post,
    path = "/api/rooms",
    tag = "rooms",
    request_body(content = CreateRoomRequest, description = "All fields optional; an empty body is `{}`."),
    responses(
        (status = 201, description = "Created and stored", body = CreatedRoom,
         headers(("Location" = String, description = "/api/rooms/{room_id}"))),
        (status = 400, description = "Not JSON (`bad_json`) or a bad field (`bad_field`)", body = ApiError),
        (status = 401, description = "Missing or wrong API key", body = ApiError),
        (status = 408, description = "The body did not arrive in time (`request_timeout`); the connection is closed", body = ApiError),
        (status = 413, description = "Body over 16 KiB", body = ApiError),
        (status = 429, description = "Too many requests, or (without an API key) too many rooms created from this address (`rate_limited`, with `Retry-After`)", body = ApiError),
    ),
    security((), ("api_key" = [])),
)]
async fn create_room(
    State(ctx): State<Arc<ApiContext>>,
    ClientAddr(addr): ClientAddr,
    request: Request,
) -> Result<Response, Failure> {
    ctx.api.admit(addr.ip())?;
    let headers = request.headers().clone();
    require_api_key(&ctx, &headers)?;
    // A client announcing a body and never sending it must not hold the connection
    // (and with it the server's shutdown) for ever.
    let limit = ctx.body_timeout;
    let body = tokio::time::timeout(limit, Bytes::from_request(request, &ctx))
        .await
        .map_err(|_| Failure::request_timeout(limit))?;
    let request: CreateRoomRequest = serde_json::from_value(json_object(body)?)
        .map_err(|e| Failure::bad_field(e.to_string()))?;
    let now = Now::system();
    let new = check_create(request, now)?;
    // Charged only for a room that would be created: bad requests cost the general
    // API limit only.
    ctx.api.admit_create(addr.ip())?;
    // Finished in a task of its own: a client that goes away mid-request must not leave
    // a stored room the state machine does not know.
    let base = base_url(&ctx, &headers);
    let tasks = ctx.tasks.clone();
    tasks
        .spawn(store_new_room(ctx, new, now, base))
        .await
        .map_err(|_| Failure::internal())?
}

/// Stores a new room, then adds it to the state machine; the `201` answer.
async fn store_new_room(
    ctx: Arc<ApiContext>,
    new: NewRoom,
    now: Now,
    base: String,
) -> Result<Response, Failure> {
    // 65 random bits make a collision practically impossible; retry anyway.
    for _ in 0..8 {
        let room_id = ids::room_id();
        let token = ids::host_token();
        let meeting = Meeting {
            token_hash: ids::secret_hash(&token),
            title: new.title.clone(),
            starts_at: new.starts_at,
            ttl: new.ttl,
            created_at: now.wall,
            ended: None,
        };
        let info = match ctx.meetings.create(&room_id, meeting).await {
            Ok(Some(info)) => Some(info),
            Ok(None) => continue,
            Err(e) => return Err(Failure::backend(&e)),
        };
        let Some(info) = info else {
            return Err(Failure::internal());
        };
        info!(
            room = %room_id,
            starts_at = %format_rfc3339(new.starts_at),
            ttl_s = new.ttl.as_secs(),
            "room created through the API"
        );
        let location = HeaderValue::from_str(&format!("/api/rooms/{room_id}"))
            .map_err(|_| Failure::internal())?;
        let created = CreatedRoom {
            join_url: join_url(&base, &room_id),
            room_id,
            host_token: token,
            starts_at: format_rfc3339(new.starts_at),
            expires_at: info.expires_at.unwrap_or_default(),
        };
        return Ok((
            StatusCode::CREATED,
            [(header::LOCATION, location)],
            Json(created),
        )
            .into_response());
    }
    error!("no free room id found");
    Err(Failure::internal())
}

fn room_id_from(path: Result<Path<String>, PathRejection>) -> Result<String, Failure> {
    path.map(|Path(id)| id)
        .map_err(|r| Failure::bad_field(format!("bad room id in the path: {}", r.body_text())))
}

/// Read one room: scheduled, open, active or ended. Ad-hoc rooms are readable too.
#[utoipa::path(
    get,
    path = "/api/rooms/{room_id}",
    tag = "rooms",
    params(("room_id" = String, Path, description = "e.g. `kxp-47qm-zt9-4fh`")),
    responses(
        (status = 200, body = RoomInfo),
        (status = 404, description = "Unknown room (`unknown_room`)", body = ApiError),
        (status = 429, description = "Too many requests", body = ApiError),
    ),
)]
async fn get_room(
    State(ctx): State<Arc<ApiContext>>,
    ClientAddr(addr): ClientAddr,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RoomInfo>, Failure> {
    ctx.api.admit(addr.ip())?;
    let room_id = room_id_from(path)?;
    let info = ctx
        .meetings
        .info(&room_id)
        .await
        .map_err(|e| Failure::backend(&e))?;
    info.map(Json)
        .ok_or_else(|| Failure::unknown_room(&room_id))
}

/// The `from`/`to` of a listing.
#[derive(Debug, Deserialize)]
struct Window {
    from: Option<String>,
    to: Option<String>,
}

fn window_bound(name: &str, value: Option<&str>) -> Result<Option<OffsetDateTime>, Failure> {
    value
        .map(|v| {
            // A `+01:00` offset arrives as ` 01:00` when the client did not escape `+`.
            parse_rfc3339(&v.replace(' ', "+"))
                .map_err(|e| Failure::bad_field(format!("`{name}`: {e}")))
        })
        .transpose()
}

/// List the rooms created through the API whose `starts_at` lies in `[from, to]`.
/// Always needs the API key; a server without one answers `403`.
#[utoipa::path(
    get,
    path = "/api/rooms",
    tag = "rooms",
    params(
        ("from" = Option<String>, Query, description = "RFC 3339; no lower bound when missing"),
        ("to" = Option<String>, Query, description = "RFC 3339, inclusive; no upper bound when missing"),
    ),
    responses(
        (status = 200, body = RoomList),
        (status = 400, description = "Bad `from`/`to` (`bad_field`)", body = ApiError),
        (status = 401, description = "Missing or wrong API key", body = ApiError),
        (status = 403, description = "The server has no API key, so listing is disabled (`forbidden`)", body = ApiError),
        (status = 429, description = "Too many requests", body = ApiError),
    ),
    security(("api_key" = [])),
)]
async fn list_rooms(
    State(ctx): State<Arc<ApiContext>>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    query: Result<Query<Window>, QueryRejection>,
) -> Result<Json<RoomList>, Failure> {
    ctx.api.admit(addr.ip())?;
    // Room ids are the guests' only credential: without a key to restrict it to, a
    // listing would hand every meeting to anyone.
    if ctx.api.key_hash.is_none() {
        return Err(Failure::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "listing rooms is disabled on this server because it has no API key; \
             start it with --api-key-file (or DUET_API_KEY) and send \
             Authorization: Bearer <key>",
        ));
    }
    require_api_key(&ctx, &headers)?;
    let Query(window) = query.map_err(|r| Failure::bad_field(r.body_text()))?;
    let from = window_bound("from", window.from.as_deref())?;
    let to = window_bound("to", window.to.as_deref())?;
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        return Err(Failure::bad_field("`from` is after `to`"));
    }
    let rooms = ctx
        .meetings
        .list(from, to)
        .await
        .map_err(|e| Failure::backend(&e))?;
    Ok(Json(RoomList { rooms }))
}

/// End a room: its members get `room_ended/host_ended`, later joins `error/room_ended`.
#[utoipa::path(
    delete,
    path = "/api/rooms/{room_id}",
    tag = "rooms",
    params(("room_id" = String, Path, description = "e.g. `kxp-47qm-zt9-4fh`")),
    responses(
        (status = 200, description = "Ended (and stored as ended)", body = RoomInfo),
        (status = 401, description = "Missing or wrong host token", body = ApiError),
        (status = 404, description = "Unknown room (`unknown_room`)", body = ApiError),
        (status = 409, description = "Ended already (`room_ended`)", body = ApiError),
        (status = 429, description = "Too many requests", body = ApiError),
    ),
    security(("host_token" = [])),
)]
async fn delete_room(
    State(ctx): State<Arc<ApiContext>>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RoomInfo>, Failure> {
    ctx.api.admit(addr.ip())?;
    let room_id = room_id_from(path)?;
    let wrong_token = || {
        let message = if bearer(&headers).is_some() {
            "wrong host token for this room"
        } else {
            "ending a room needs its host token: Authorization: Bearer <host_token>"
        };
        Failure::unauthorized(message)
    };
    let ended = || {
        Failure::new(
            StatusCode::CONFLICT,
            "room_ended",
            format!("room `{room_id}` has ended already"),
        )
    };
    // In a task of its own, like creating: a client that goes away mid-request must not
    // leave the end stored but not announced.
    let tasks = ctx.tasks.clone();
    let token = bearer(&headers).map(str::to_owned);
    let room = room_id.clone();
    let ended_room = tasks
        .spawn(async move { ctx.meetings.end(&room, token.as_deref()).await })
        .await
        .map_err(|_| Failure::internal())?;
    match ended_room {
        Ok(Ok(info)) => Ok(Json(info)),
        Ok(Err(EndRefused::UnknownRoom)) => Err(Failure::unknown_room(&room_id)),
        Ok(Err(EndRefused::WrongToken)) => Err(wrong_token()),
        Ok(Err(EndRefused::Ended)) => Err(ended()),
        Err(e) => Err(Failure::backend(&e)),
    }
}

/// The ICE servers (STUN/TURN) with freshly minted TURN credentials, as in `welcome`.
#[utoipa::path(
    get,
    path = "/api/ice-servers",
    tag = "ice",
    responses((status = 200, body = IceServers), (status = 429, body = ApiError)),
)]
async fn ice_servers(
    State(ctx): State<Arc<ApiContext>>,
    ClientAddr(addr): ClientAddr,
) -> Result<Json<IceServers>, Failure> {
    ctx.api.admit(addr.ip())?;
    let ice_servers: Vec<IceServer> = ctx
        .ice
        .ice_servers(&ids::random_chars(13), SystemTime::now());
    Ok(Json(IceServers { ice_servers }))
}

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "host_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Duet signaling server",
        description = "Scheduling API of Duet's signaling server. Creating rooms needs \
                       `Authorization: Bearer <api key>` when the server has an API key \
                       (without one it is open but rate-limited per client address); listing \
                       always needs the key (`403` on a server without one); ending a room \
                       needs its host token. Errors are \
                       `{\"error\": code, \"message\": text}`. The WebSocket protocol at `/ws` \
                       is described in docs/PROTOCOL.md."
    ),
    paths(create_room, get_room, list_rooms, delete_room, ice_servers),
    components(schemas(
        CreateRoomRequest, CreatedRoom, RoomInfo, RoomList, RoomState, IceServers, IceServer,
        ApiError
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "rooms", description = "Rooms created ahead of time, with host tokens"),
        (name = "ice", description = "STUN/TURN servers for WebRTC"),
    )
)]
struct ApiDoc;

/// The OpenAPI 3 document, built from the handlers' annotations.
pub fn openapi_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .unwrap_or_else(|_| "{}".to_owned())
    })
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        openapi_json(),
    )
        .into_response()
}

/// A join URL: browsers get the web client (which joins the room); other clients a
/// line of text with the room id and how to use it.
async fn join_page(
    State(ctx): State<Arc<ApiContext>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    if crate::http::web::wants_html(&headers) {
        return crate::http::web::index_page(&headers);
    }
    let Ok(Path(room_id)) = path else {
        return (StatusCode::BAD_REQUEST, "bad room id\n").into_response();
    };
    let info = match ctx.meetings.info(&room_id).await {
        Ok(info) => info,
        Err(e) => {
            warn!(error = %e, "no answer for a join page");
            return (StatusCode::SERVICE_UNAVAILABLE, "try again shortly\n").into_response();
        }
    };
    match info {
        Some(info) => {
            let title = info.title.map(|t| format!(" ({t})")).unwrap_or_default();
            let when = match (info.state, info.starts_at) {
                (RoomState::Ended, _) => "It has ended.".to_owned(),
                (_, Some(start)) => format!("It starts at {start}."),
                _ => String::new(),
            };
            let text = format!(
                "Duet room {room_id}{title}. {when}\nTo join, open the Duet app and paste this \
                 link or the room id.\n"
            );
            (StatusCode::OK, text).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such room\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_behind_a_trusted_proxy_is_read_from_x_forwarded_for() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/24".parse().unwrap()];
        let proxy: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let xff = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", HeaderValue::from_str(v).unwrap());
            h
        };
        let ip = |a: SocketAddr| a.ip().to_string();
        // Not from a trusted proxy: the header is anyone's to write.
        assert_eq!(
            ip(client_addr(stranger, &xff("198.51.100.7"), &trusted)),
            "203.0.113.9"
        );
        // From the proxy: the client it names; a forged entry to its left is ignored.
        assert_eq!(
            ip(client_addr(proxy, &xff("198.51.100.7"), &trusted)),
            "198.51.100.7"
        );
        assert_eq!(
            ip(client_addr(proxy, &xff("1.2.3.4, 198.51.100.7"), &trusted)),
            "198.51.100.7"
        );
        // Two proxies in a row, both trusted.
        assert_eq!(
            ip(client_addr(proxy, &xff("198.51.100.7, 10.0.0.9"), &trusted)),
            "198.51.100.7"
        );
        // No header, or garbage: the proxy itself.
        assert_eq!(
            ip(client_addr(proxy, &HeaderMap::new(), &trusted)),
            "10.0.0.5"
        );
        assert_eq!(
            ip(client_addr(proxy, &xff("nonsense"), &trusted)),
            "10.0.0.5"
        );
        // No trusted proxy configured: always the peer.
        assert_eq!(
            ip(client_addr(proxy, &xff("198.51.100.7"), &[])),
            "10.0.0.5"
        );
    }

    #[test]
    fn openapi_lists_every_endpoint() {
        let doc: serde_json::Value = serde_json::from_str(openapi_json()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in ["/api/rooms", "/api/rooms/{room_id}", "/api/ice-servers"] {
            assert!(paths.contains_key(p), "{p}");
        }
        assert!(doc["paths"]["/api/rooms"]["post"].is_object());
        assert!(doc["paths"]["/api/rooms/{room_id}"]["delete"].is_object());
        assert!(doc["components"]["schemas"]["CreatedRoom"].is_object());
        assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
        let list = &doc["paths"]["/api/rooms"]["get"]["responses"];
        assert!(list["403"].is_object(), "{list}");
        let create = &doc["paths"]["/api/rooms"]["post"]["responses"];
        assert!(
            create["408"].is_object() && create["429"].is_object(),
            "{create}"
        );
    }

    #[test]
    fn create_requests_are_checked() {
        let now = Now::system();
        let ok = |r: CreateRoomRequest| check_create(r, now);
        let new = ok(CreateRoomRequest::default()).unwrap();
        assert_eq!(new.starts_at, now.wall);
        assert_eq!(new.ttl, Duration::from_secs(600));
        let bad = |r: CreateRoomRequest| ok(r).unwrap_err().code;
        assert_eq!(
            bad(CreateRoomRequest {
                ttl_s: Some(-5),
                ..Default::default()
            }),
            "bad_field"
        );
        assert_eq!(
            bad(CreateRoomRequest {
                ttl_s: Some(MAX_TTL_S + 1),
                ..Default::default()
            }),
            "bad_field"
        );
        assert_eq!(
            bad(CreateRoomRequest {
                starts_at: Some(format_rfc3339(now.wall - Duration::from_secs(7200))),
                ..Default::default()
            }),
            "bad_field"
        );
        assert_eq!(
            bad(CreateRoomRequest {
                title: Some("a\u{7}".into()),
                ..Default::default()
            }),
            "bad_field"
        );
        let titled = ok(CreateRoomRequest {
            title: Some("  Weekly  ".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(titled.title.as_deref(), Some("Weekly"));
    }

    #[test]
    fn bearer_tokens_are_parsed_leniently() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer"));
        assert_eq!(bearer(&h), None);
    }
}
