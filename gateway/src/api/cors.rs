//! vLLM's CORS flags (`--allowed-origins`, `--allowed-methods`,
//! `--allowed-headers`, `--allow-credentials`), so a web page can call the API
//! from a browser, preflight included. vLLM's defaults allow every origin,
//! method and header without credentials; ferry keeps them.

use axum::http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CorsConfig {
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<String>,
    pub allowed_headers: Vec<String>,
    pub allow_credentials: bool,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig { allowed_origins: vec!["*".into()], allowed_methods: vec!["*".into()], allowed_headers: vec!["*".into()], allow_credentials: false }
    }
}

/// vLLM takes these flags as JSON lists (`'["https://a.example"]'`); a plain
/// comma-separated list is read too.
pub(crate) fn parse_list(raw: &str) -> Result<Vec<String>, String> {
    let t = raw.trim();
    if t.starts_with('[') {
        serde_json::from_str::<Vec<String>>(t).map_err(|e| format!("{raw:?} is not a JSON list of strings: {e}"))
    } else {
        Ok(t.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
    }
}

impl CorsConfig {
    pub(crate) fn layer(&self) -> Result<CorsLayer, String> {
        let wild = |v: &[String]| v.iter().any(|s| s == "*");
        // Browsers refuse a wildcard with credentials; mirror the request then.
        let origin = if wild(&self.allowed_origins) {
            if self.allow_credentials { AllowOrigin::mirror_request() } else { AllowOrigin::any() }
        } else {
            let list: Result<Vec<HeaderValue>, _> = self.allowed_origins.iter().map(|o| HeaderValue::from_str(o)).collect();
            AllowOrigin::list(list.map_err(|e| format!("bad --allowed-origins entry: {e}"))?)
        };
        let methods = if wild(&self.allowed_methods) {
            if self.allow_credentials { AllowMethods::mirror_request() } else { AllowMethods::any() }
        } else {
            let list: Result<Vec<Method>, _> = self.allowed_methods.iter().map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes())).collect();
            AllowMethods::list(list.map_err(|e| format!("bad --allowed-methods entry: {e}"))?)
        };
        let headers = if wild(&self.allowed_headers) {
            if self.allow_credentials { AllowHeaders::mirror_request() } else { AllowHeaders::any() }
        } else {
            let list: Result<Vec<HeaderName>, _> = self.allowed_headers.iter().map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())).collect();
            AllowHeaders::list(list.map_err(|e| format!("bad --allowed-headers entry: {e}"))?)
        };
        Ok(CorsLayer::new().allow_origin(origin).allow_methods(methods).allow_headers(headers).allow_credentials(self.allow_credentials))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_as_vllm_writes_them_or_comma_separated() {
        assert_eq!(parse_list(r#"["https://a.example", "http://b"]"#).unwrap(), vec!["https://a.example", "http://b"]);
        assert_eq!(parse_list("GET, POST").unwrap(), vec!["GET", "POST"]);
        assert!(parse_list("[1, 2]").is_err());
        assert!(CorsConfig::default().layer().is_ok());
        let strict = CorsConfig { allowed_origins: vec!["https://app.example".into()], allow_credentials: true, ..Default::default() };
        assert!(strict.layer().is_ok());
    }
}
