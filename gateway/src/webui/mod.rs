//! The chat page (issue 24): `GET /` and its script and style sheet, built
//! into the binary, served by the API's own Router, so over HTTP/1.1, HTTP/2
//! and HTTP/3 alike. `ferry serve --no-webui` leaves it out (then `/` is 404).
//!
//! The page talks to the API as any client does (`/v1/models`,
//! `/v1/chat/completions` streamed), with the key the user typed. The page and
//! its assets are served without a key (they hold nothing secret; the API
//! behind them still asks for one). Every response carries a strict
//! Content-Security-Policy: no inline script or style, no other origin, so
//! text a model writes can never run as code even if it reached the DOM as
//! markup (it does not: the page's renderer builds text nodes only).

mod assets;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use assets::{Asset, ASSETS};

/// The page's policy: its own script and style files only, requests to its
/// own origin only, no framing, no forms, no `<base>`.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's routes, to merge into the API's Router.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS.iter().fold(Router::new(), |r, asset| r.route(asset.path, get(move |headers: HeaderMap| async move { respond(asset, &headers) })))
}

/// A path of the page or one of its assets: open without an API key.
pub(crate) fn is_page_path(path: &str) -> bool {
    ASSETS.iter().any(|a| a.path == path)
}

/// The asset, or 304 when the client's copy (`If-None-Match`) is current.
/// `Cache-Control: no-cache` makes a browser ask every time, so a new binary's
/// page is seen at once; the ETag (a hash of the content) makes the asking cheap.
fn respond(asset: &'static Asset, headers: &HeaderMap) -> Response {
    let etag = asset.etag();
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').map(|t| t.trim().trim_start_matches("W/")).any(|t| t == "*" || t == etag));
    let mut resp = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { asset.body.into_response() };
    let h = resp.headers_mut();
    if !fresh {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    }
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // For browsers that predate frame-ancestors.
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

#[cfg(test)]
mod tests;
