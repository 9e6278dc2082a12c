//! The admin page (`/admin/ui`): the partner report as a chart and a table, program
//! health and the CSV exports, for a manager with the admin token. Its three files are
//! compiled into the binary (no CDN, nothing fetched from elsewhere) and served with a
//! strict Content-Security-Policy. The page holds the token only in the tab's memory and
//! calls the same admin API as everyone else; serving it needs no token.

use http::{header, HeaderValue, Response, StatusCode};

use super::Body;

const INDEX: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The file at `/admin/ui/<name>`, if it is one of the page's.
pub fn asset(name: &str) -> Option<Response<Body>> {
    let (body, content_type) = match name {
        "" => (INDEX, "text/html; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut resp = Response::new(super::full(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(resp)
}
