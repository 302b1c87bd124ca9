//! The `alt-svc` header that tells TCP clients HTTP/3 is on offer (RFC 7838).

use http::header::{HeaderMap, HeaderValue, ALT_SVC};

/// `h3=":<port>"; ma=86400`: HTTP/3 on the same host, this UDP port, for a day.
pub fn alt_svc_value(port: u16) -> HeaderValue {
    HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400"))
        .unwrap_or_else(|_| HeaderValue::from_static("clear"))
}

/// Add the advertisement unless the app set its own.
pub(crate) fn advertise(headers: &mut HeaderMap, value: &Option<HeaderValue>) {
    if let Some(v) = value {
        if !headers.contains_key(ALT_SVC) {
            headers.insert(ALT_SVC, v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_matches_rfc7838_syntax() {
        assert_eq!(
            alt_svc_value(8443).to_str().unwrap(),
            "h3=\":8443\"; ma=86400"
        );
        let mut h = HeaderMap::new();
        advertise(&mut h, &Some(alt_svc_value(1)));
        assert_eq!(h[ALT_SVC], "h3=\":1\"; ma=86400");
        // The app's own value wins.
        let mut h = HeaderMap::new();
        h.insert(ALT_SVC, HeaderValue::from_static("clear"));
        advertise(&mut h, &Some(alt_svc_value(1)));
        assert_eq!(h[ALT_SVC], "clear");
    }
}
