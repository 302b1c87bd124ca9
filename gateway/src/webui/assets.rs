//! The page's files, compiled in: nothing is read from disk or fetched at run
//! time, so the binary alone serves the page.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// One file of the page, at one path.
pub(crate) struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
    etag: OnceLock<String>,
}

impl Asset {
    const fn new(path: &'static str, content_type: &'static str, body: &'static [u8]) -> Self {
        Asset { path, content_type, body, etag: OnceLock::new() }
    }

    /// A strong ETag: the first 128 bits of the content's SHA-256, computed once.
    pub(crate) fn etag(&self) -> &str {
        self.etag.get_or_init(|| {
            let hex: String = Sha256::digest(self.body)[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("\"{hex}\"")
        })
    }
}

/// Every file the page loads. The HTML names the others by these paths.
pub(crate) static ASSETS: [Asset; 4] = [
    Asset::new("/", "text/html; charset=utf-8", include_bytes!("static/index.html")),
    Asset::new("/webui/app.css", "text/css; charset=utf-8", include_bytes!("static/app.css")),
    Asset::new("/webui/markdown.js", "text/javascript; charset=utf-8", include_bytes!("static/markdown.js")),
    Asset::new("/webui/app.js", "text/javascript; charset=utf-8", include_bytes!("static/app.js")),
];
