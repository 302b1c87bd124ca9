//! The page's responses: types, the security headers, revalidation.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::{routes, CONTENT_SECURITY_POLICY};

async fn get(path: &str, if_none_match: Option<&str>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut req = Request::get(path);
    if let Some(tag) = if_none_match {
        req = req.header(header::IF_NONE_MATCH, tag);
    }
    let resp = routes::<()>().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes().to_vec())
}

#[tokio::test]
async fn every_file_has_its_type_the_policy_and_an_etag() {
    for (path, ty) in [
        ("/", "text/html; charset=utf-8"),
        ("/webui/app.css", "text/css; charset=utf-8"),
        ("/webui/app.js", "text/javascript; charset=utf-8"),
        ("/webui/markdown.js", "text/javascript; charset=utf-8"),
    ] {
        let (status, h, body) = get(path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(h[header::CONTENT_TYPE], ty, "{path}");
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY, "{path}");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
        assert_eq!(h[header::CACHE_CONTROL], "no-cache", "{path}");
        let etag = h[header::ETAG].to_str().unwrap();
        assert!(etag.len() == 34 && etag.starts_with('"') && etag.ends_with('"'), "{etag}");
        assert!(!body.is_empty());
        assert!(super::is_page_path(path));
    }
    assert!(!super::is_page_path("/v1/models"));
    assert!(!super::is_page_path("/webui/other.js"));
}

#[tokio::test]
async fn a_current_copy_gets_304_and_a_stale_one_the_file() {
    let (_, h, _) = get("/webui/app.js", None).await;
    let etag = h[header::ETAG].to_str().unwrap().to_string();
    let (status, h, body) = get("/webui/app.js", Some(&etag)).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    assert_eq!(h[header::ETAG], etag.as_str());
    let (status, _, _) = get("/webui/app.js", Some(&format!("\"stale\", W/{etag}"))).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    let (status, _, body) = get("/webui/app.js", Some("\"stale\"")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.is_empty());
}

/// The CSP forbids inline script and style, so the page must have none: its
/// code and style come from the files it names.
#[test]
fn the_page_has_no_inline_script_or_style() {
    let html = std::str::from_utf8(super::ASSETS[0].body).unwrap();
    assert!(!html.contains("<style"));
    assert!(!html.contains(" style="));
    // No inline event handlers (` onclick=` and the like).
    let handler = html.match_indices(" on").any(|(i, _)| {
        let rest = &html[i + 3..];
        let name_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        name_len > 0 && rest[name_len..].starts_with('=')
    });
    assert!(!handler, "an inline event handler");
    for tag in html.split("<script").skip(1) {
        assert!(tag.trim_start().starts_with("src=\"/webui/"), "{tag}");
        assert!(tag.contains("></script>"));
    }
    for asset in &super::ASSETS[1..] {
        assert!(html.contains(&format!("\"{}\"", asset.path)), "{} is not loaded by the page", asset.path);
    }
}
