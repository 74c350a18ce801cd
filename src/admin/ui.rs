//! The admin UI: the single-page app built from `admin-ui/` (`make ui`), embedded in the
//! binary and served on the admin port. It is a client of the admin API only.
//!
//! Release builds carry the files of `admin-ui/dist` as they were at compile time; debug builds
//! read them from that folder as they are asked for. A binary built without the UI answers its
//! page with a note saying how to build it; the API works either way.

use axum::body::Body;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rust_embed::Embed;

use super::error::AppError;

#[derive(Embed)]
#[folder = "admin-ui/dist/"]
#[allow_missing = true]
struct Assets;

/// The page's policy: scripts, styles and calls from this origin only, no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; \
                   form-action 'self'";

const NOT_BUILT: &str = "<!doctype html><title>llm-relay admin</title>\
<p>The admin UI is not part of this build. Build it with <code>make ui</code> (or \
<code>make run</code>), then rebuild the relay. The admin API at <code>/api/</code> works \
without it; <code>/api/openapi.json</code> describes it.</p>";

/// Answers everything the API routes do not: the UI's files for `GET` and `HEAD`, the API's
/// own 404 for anything under `/api/`, and 404 or 405 otherwise.
pub async fn serve(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    if path == "/api" || path.starts_with("/api/") {
        return AppError::NotFound.into_response();
    }
    if method != Method::GET && method != Method::HEAD {
        let mut res = page(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "no-cache",
            Body::from("method not allowed\n"),
        );
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    let name = match path.trim_start_matches('/') {
        "" | "index.html" => "index.html",
        other => other,
    };
    match Assets::get(name) {
        Some(file) => {
            // Built assets carry a content hash in their names: cached for good. The page
            // itself is asked for again each time, so a new build shows at once.
            let cache = if name.starts_with("assets/") {
                "public, max-age=31536000, immutable"
            } else {
                "no-cache"
            };
            let mime = file.metadata.mimetype().to_owned();
            page(
                StatusCode::OK,
                &mime,
                cache,
                Body::from(file.data.into_owned()),
            )
        }
        None if name == "index.html" => page(
            StatusCode::OK,
            "text/html; charset=utf-8",
            "no-cache",
            Body::from(NOT_BUILT),
        ),
        None => page(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "no-cache",
            Body::from("not found\n"),
        ),
    }
}

fn page(status: StatusCode, mime: &str, cache: &'static str, body: Body) -> Response {
    let mut res = (status, body).into_response();
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(mime) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}
