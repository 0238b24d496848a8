//! The web client: plain HTML, CSS and JavaScript modules compiled into the binary and
//! served from `/` (start page), `/r/{room_id}` (a join link opened in a browser) and
//! `/app/{file}`. The client speaks the same WebSocket protocol as the desktop app.
//!
//! Every answer carries a strict Content-Security-Policy (no inline script or style, no
//! third-party origin; WebSocket only back to the host the page came from), `nosniff`,
//! no referrer (join links are the room's credential) and an `ETag`; `Cache-Control:
//! no-cache` makes browsers revalidate, so a new server version is picked up at once
//! while unchanged files cost a `304`.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

/// One compiled-in file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";

/// The page every route of the web client answers with (the script reads the path).
const INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("../../web/index.html"),
};

/// What `/app/{file}` serves.
const ASSETS: &[Asset] = &[
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../web/style.css"),
    },
    Asset {
        name: "main.js",
        content_type: JS,
        body: include_bytes!("../../web/main.js"),
    },
    Asset {
        name: "signaling.js",
        content_type: JS,
        body: include_bytes!("../../web/signaling.js"),
    },
    Asset {
        name: "call.js",
        content_type: JS,
        body: include_bytes!("../../web/call.js"),
    },
    Asset {
        name: "media.js",
        content_type: JS,
        body: include_bytes!("../../web/media.js"),
    },
    Asset {
        name: "words.js",
        content_type: JS,
        body: include_bytes!("../../web/words.js"),
    },
    Asset {
        name: "ring.wav",
        content_type: "audio/wav",
        body: include_bytes!("../../../assets/ring.wav"),
    },
    Asset {
        name: "icon.png",
        content_type: "image/png",
        body: include_bytes!("../../../assets/icon.png"),
    },
];

/// The routes of the web client (merged into the server's router). `/r/{room_id}` lives
/// in `http::api`, which hands browsers to [`index_page`].
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/app/{file}", get(asset))
        .route("/favicon.ico", get(favicon))
}

async fn index(headers: HeaderMap) -> Response {
    index_page(&headers)
}

/// The web client's page, for `/` and for join links opened in a browser.
pub(crate) fn index_page(headers: &HeaderMap) -> Response {
    serve(&INDEX, etag(usize::MAX), headers)
}

/// Whether a request comes from a browser that wants a page (not from a script that
/// wants the room's one line of text).
pub(crate) fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().position(|a| a.name == file) {
        Some(i) => serve(&ASSETS[i], etag(i), &headers),
        None => {
            tracing::debug!(file, "unknown web client file");
            crate::http::api::not_found().await.into_response()
        }
    }
}

async fn favicon(headers: HeaderMap) -> Response {
    match ASSETS.iter().position(|a| a.name == "icon.png") {
        Some(i) => serve(&ASSETS[i], etag(i), &headers),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The `ETag` of asset `i` (`usize::MAX`: the page), a hash of its bytes computed once.
fn etag(i: usize) -> &'static str {
    static TAGS: OnceLock<(String, Vec<String>)> = OnceLock::new();
    let (page, assets) = TAGS.get_or_init(|| {
        let tag = |body: &[u8]| {
            let hash = Sha256::digest(body);
            let hex: String = hash[..12].iter().map(|b| format!("{b:02x}")).collect();
            format!("\"{hex}\"")
        };
        (
            tag(INDEX.body),
            ASSETS.iter().map(|a| tag(a.body)).collect(),
        )
    });
    assets.get(i).unwrap_or(page)
}

fn serve(asset: &Asset, etag: &'static str, request: &HeaderMap) -> Response {
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == etag || t.trim() == "*");
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, asset.body).into_response()
    };
    let h = response.headers_mut();
    if !fresh {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
    }
    h.insert(header::ETAG, HeaderValue::from_static(etag));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(self), microphone=(self), geolocation=()"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if let Ok(csp) = HeaderValue::from_str(&content_security_policy(request)) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    response
}

/// The policy: only this origin's files run; the page may open a WebSocket to the host
/// it was loaded from (`ws:` or `wss:`), and show camera pictures and streams (`blob:`).
fn content_security_policy(request: &HeaderMap) -> String {
    let host = request
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| valid_host(h));
    let sockets = host.map_or_else(String::new, |h| format!(" ws://{h} wss://{h}"));
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; \
         media-src 'self' blob:; connect-src 'self'{sockets}; object-src 'none'; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// A `Host` header safe to repeat in the policy: a name or address and an optional port.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_the_host_only_when_it_is_well_formed() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("duet.example:8443"));
        let csp = content_security_policy(&h);
        assert!(csp.contains("connect-src 'self' ws://duet.example:8443 wss://duet.example:8443;"));
        assert!(csp.starts_with("default-src 'self'; script-src 'self';"));
        assert!(!csp.contains("unsafe"));
        h.insert(header::HOST, HeaderValue::from_static("evil; script-src *"));
        assert!(content_security_policy(&h).contains("connect-src 'self';"));
    }

    #[test]
    fn every_asset_has_a_distinct_tag_and_the_page_loads_only_listed_files() {
        let mut tags: Vec<&str> = (0..ASSETS.len()).map(etag).collect();
        tags.push(etag(usize::MAX));
        let n = tags.len();
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), n);
        let page = std::str::from_utf8(INDEX.body).unwrap_or_default();
        for part in page.split("/app/").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                .collect();
            assert!(ASSETS.iter().any(|a| a.name == name), "{name}");
        }
        assert!(!page.contains("<script>"), "no inline script");
        assert!(!page.contains("style=\""), "no inline style");
    }

    #[test]
    fn browsers_get_the_page() {
        let mut h = HeaderMap::new();
        assert!(!wants_html(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/html,application/xhtml+xml,*/*;q=0.8"),
        );
        assert!(wants_html(&h));
    }
}
