//! HTTP: the only module that names hyper. The accept loop (connection semaphore,
//! timeouts, graceful shutdown), the two routers, body limits and the mapping of errors
//! to problem+json.

mod admin;
mod b2b;
pub mod client;
mod conn;
mod csv;
mod partner;
mod payouts;
pub mod problem;
mod public;
mod reports;
pub mod routes;
mod ui;
mod views;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::Instrument;

use crate::backend::Backend;
use crate::config::Settings;
use crate::domain::clock::Clock;
use crate::metrics::Metrics;
use crate::signing::ReplayGuard;
use problem::ApiError;

/// A response body: whole, or streamed (the ledger export).
pub type Body = http_body_util::Either<Full<Bytes>, Streamed>;

/// A whole response body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Either::Left(Full::new(bytes.into()))
}

/// A body streamed from a channel. An `Err` item ends the response without its last
/// chunk (HTTP/1.1) or with a reset stream (HTTP/2): the client can tell it is cut short.
#[derive(Debug)]
pub struct Streamed {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
}

impl Streamed {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>) -> Body {
        http_body_util::Either::Right(Streamed { rx })
    }
}

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|item| {
            item.map(|chunk| {
                chunk.map(hyper::body::Frame::data).map_err(Box::<dyn std::error::Error + Send + Sync>::from)
            })
        })
    }
}

/// Everything a handler needs, shared by both listeners.
pub struct Ctx {
    /// Storage and the engine behind it.
    pub backend: Arc<dyn Backend>,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    pub settings: Settings,
    pub admin_token: SecretString,
    pub replay: Mutex<ReplayGuard>,
    pub limits: crate::limits::Limits,
    /// Ledger exports streaming now (`reports.max_exports`).
    pub exports: Arc<Semaphore>,
}

/// Which listener a request came in on: the `listener` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Public,
    Admin,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Public => "public",
            Listener::Admin => "admin",
        }
    }
}

/// Declares [`Route`], its label values and [`Route::ALL`] from one list, so a new
/// route cannot be left out of `ALL` (which the route table's test walks).
macro_rules! routes {
    ($($variant:ident => $label:literal,)+) => {
        /// Routes, the closed set of `route` label values.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Route {
            $($variant,)+
        }

        impl Route {
            /// Every route.
            pub const ALL: &'static [Route] = &[$(Route::$variant,)+];

            /// The `route` label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Route::$variant => $label,)+
                }
            }
        }
    };
}

routes! {
    Click => "click",
    Postback => "postback",
    Conversion => "conversion",
    ConversionBatch => "conversion_batch",
    ServerClick => "server_click",
    Adjustment => "adjustment",
    Touch => "touch",
    Deal => "deal",
    PartnerConversions => "partner_conversions",
    PartnerStatement => "partner_statement",
    AdminReassign => "admin_reassign",
    AdminMerchant => "admin_merchant",
    AdminSecretRotate => "admin_secret_rotate",
    AdminTokenRotate => "admin_token_rotate",
    AdminPartner => "admin_partner",
    AdminLink => "admin_link",
    AdminPlan => "admin_plan",
    AdminConversion => "admin_conversion",
    AdminConversions => "admin_conversions",
    AdminReview => "admin_review",
    AdminAccount => "admin_account",
    AdminBackup => "admin_backup",
    AdminDeliveries => "admin_deliveries",
    AdminDelivery => "admin_delivery",
    AdminDeliveryRetry => "admin_delivery_retry",
    AdminOutboundEnable => "admin_outbound_enable",
    AdminPartnerSecretRotate => "admin_partner_secret_rotate",
    AdminReportPartners => "admin_report_partners",
    AdminReportProgram => "admin_report_program",
    AdminLedger => "admin_ledger",
    AdminPartnerBalance => "admin_partner_balance",
    AdminStatement => "admin_statement",
    AdminPayouts => "admin_payouts",
    AdminPayout => "admin_payout",
    AdminPayoutLine => "admin_payout_line",
    AdminUi => "admin_ui",
    Metrics => "metrics",
    Health => "healthz",
    Ready => "readyz",
    NotFound => "not_found",
}

/// `route` label values of requests that never reach a handler: hyper answers them
/// itself (malformed, headers too large) or closes them (header read timeout), and of
/// handlers that panicked.
const ROUTE_MALFORMED: &str = "http_malformed";
const ROUTE_HEADERS_TOO_LARGE: &str = "http_headers_too_large";
const ROUTE_HEADER_TIMEOUT: &str = "http_header_timeout";
const ROUTE_PANIC: &str = "handler_panic";

/// The `route` and `status` under which a connection error is counted, when hyper
/// answered (or closed) the request by itself.
fn refused_by_http(e: &(dyn std::error::Error + 'static)) -> Option<(&'static str, &'static str)> {
    let e = e.downcast_ref::<hyper::Error>()?;
    if e.is_parse_too_large() {
        Some((ROUTE_HEADERS_TOO_LARGE, "431"))
    } else if e.is_parse() && e.to_string().contains("too long") {
        Some((ROUTE_MALFORMED, "414"))
    } else if e.is_parse() {
        Some((ROUTE_MALFORMED, "400"))
    } else if e.is_timeout() {
        Some((ROUTE_HEADER_TIMEOUT, "408"))
    } else {
        None
    }
}

/// Accepts connections until `shutdown` flips, then lets in-flight requests finish for
/// up to the configured grace.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>, kind: Listener, mut shutdown: watch::Receiver<bool>) {
    let limits = &ctx.settings.http;
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        // A client that half-closes after its request (`nc -N`, some proxies) still gets the answer.
        .half_close(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    if kind == Listener::Admin {
        builder = builder.http1_only();
    }
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let ctx = Arc::clone(&ctx);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let open = OpenConnection::new(&ctx.metrics);
            let http = &ctx.settings.http;
            if !conn::first_bytes(&stream, Duration::from_millis(http.header_read_timeout_ms)).await {
                ctx.metrics.connections_silent.inc();
                return;
            }
            let io = conn::IdleLimited::new(stream, Duration::from_millis(http.idle_timeout_ms));
            let svc_ctx = Arc::clone(&ctx);
            let svc = service_fn(move |req| dispatch(Arc::clone(&svc_ctx), kind, peer, req));
            if let Err(e) = watcher.watch(builder.serve_connection(TokioIo::new(io), svc).into_owned()).await {
                if let Some((route, status)) = refused_by_http(e.as_ref()) {
                    ctx.metrics.http_requests.with_label_values(&[kind.as_str(), route, status]).inc();
                    tracing::debug!(listener = kind.as_str(), %peer, route, status, error = %e, "request refused by the HTTP layer");
                }
            }
            drop(open);
        });
    }
    drop(listener);
    let grace = Duration::from_millis(ctx.settings.http.shutdown_grace_ms);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(listener = kind.as_str(), "connections still open after the shutdown grace; closing them");
    }
}

/// Counts a connection in `tally_http_connections` while it lives.
struct OpenConnection(prometheus::IntGauge);

impl OpenConnection {
    fn new(metrics: &Metrics) -> OpenConnection {
        metrics.connections_open.inc();
        OpenConnection(metrics.connections_open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn dispatch(
    ctx: Arc<Ctx>,
    kind: Listener,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let request_id = request_id(req.headers());
    let uri = req.uri().clone();
    let client = client_addr(&ctx.settings.http.trusted_proxies, peer, req.headers());
    // Built only when request logs are on: this runs for every click.
    let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| (req.method().clone(), redacted_target(req.uri())));
    let span = tracing::info_span!("request", request_id = %request_id);
    // Boxed: the handlers' futures are kilobytes, and every move of this one (into the
    // panic guard, into hyper's connection) would copy them (17 KB per request unboxed).
    let handled = Box::pin(async {
        match kind {
            Listener::Public => public::handle(&ctx, client, req).await,
            Listener::Admin => admin::handle(&ctx, req).await,
        }
    });
    let (route, result) = guarded(&ctx.metrics, &span, handled).await;
    let mut resp = result.unwrap_or_else(ApiError::into_response);
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        if let Ok(allow) = HeaderValue::from_str(&routes::allowed_methods(kind, uri.path())) {
            resp.headers_mut().insert(header::ALLOW, allow);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    let m = &ctx.metrics;
    m.http_requests.with_label_values(&[kind.as_str(), route, resp.status().as_str()]).inc();
    m.http_duration.with_label_values(&[route]).observe(started.elapsed().as_secs_f64());
    if let Some((method, path)) = logged {
        span.in_scope(|| {
            tracing::debug!(
                listener = kind.as_str(),
                peer = %client,
                %method,
                path = %path,
                route,
                status = resp.status().as_u16(),
                micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                "request"
            )
        });
    }
    Ok(resp)
}

/// Runs a handler; a panic in it becomes `500` problem+json (`code: internal`), counted in
/// `tally_http_handler_panics_total` and logged with the request's id, instead of a
/// connection dropped without an answer.
async fn guarded(
    metrics: &Metrics,
    span: &tracing::Span,
    handler: impl std::future::Future<Output = (Route, Result<Response<Body>, ApiError>)>,
) -> (&'static str, Result<Response<Body>, ApiError>) {
    match AssertUnwindSafe(handler.instrument(span.clone())).catch_unwind().await {
        Ok((route, result)) => (route.as_str(), result),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            metrics.handler_panics.inc();
            span.in_scope(
                || tracing::error!(panic = %why, "a handler panicked; answered 500 (a bug: please report it)"),
            );
            (ROUTE_PANIC, Err(ApiError::Internal))
        }
    }
}

static REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// The incoming `x-request-id` when it is 1..=128 of `[A-Za-z0-9._:-]` (so it can be
/// logged and echoed safely), else a fresh random one.
fn request_id(headers: &HeaderMap) -> String {
    let valid = |v: &[u8]| {
        (1..=128).contains(&v.len())
            && v.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    };
    match headers.get(&REQUEST_ID).map(HeaderValue::as_bytes).filter(|v| valid(v)) {
        Some(v) => String::from_utf8_lossy(v).into_owned(),
        None => format!("{:032x}", rand::random::<u128>()),
    }
}

/// The client's address: the socket's peer, or, when the peer is one of
/// `http.trusted_proxies`, the right-most address of `X-Forwarded-For` that is not a
/// trusted proxy (addresses further left were written by the client and prove nothing).
fn client_addr(trusted: &[ipnet::IpNet], peer: SocketAddr, headers: &HeaderMap) -> SocketAddr {
    let is_trusted = |ip: &std::net::IpAddr| trusted.iter().any(|net| net.contains(&ip.to_canonical()));
    if trusted.is_empty() || !is_trusted(&peer.ip()) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        match hop.parse::<std::net::IpAddr>().or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip())) {
            Ok(ip) if is_trusted(&ip) => continue,
            Ok(ip) => return SocketAddr::new(ip.to_canonical(), 0),
            // A hop we cannot read: the chain cannot be trusted beyond it.
            Err(_) => return peer,
        }
    }
    peer
}

/// Query parameters whose values never reach a log line.
const SECRET_PARAMS: [&str; 2] = ["token", "sig"];

/// The path and query for logs, with the values of `token` and `sig` replaced.
pub fn redacted_target(uri: &http::Uri) -> String {
    let Some(query) = uri.query() else { return uri.path().to_string() };
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
            if SECRET_PARAMS.iter().any(|s| decoded.eq_ignore_ascii_case(s)) {
                format!("{name}=REDACTED")
            } else {
                pair.to_string()
            }
        })
        .collect();
    format!("{}?{}", uri.path(), redacted.join("&"))
}

/// A JSON response.
/// Marks an answer that replays an earlier one (SPEC: `Idempotent-Replayed: true`).
pub fn replayed(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut().insert("idempotent-replayed", http::HeaderValue::from_static("true"));
    resp
}

pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => json_bytes(status, Bytes::from(body)),
        Err(e) => {
            tracing::error!(error = %e, "an answer could not be rendered as JSON; answered 500 (a bug: please report it)");
            ApiError::Internal.into_response()
        }
    }
}

/// A JSON response from a body rendered earlier.
pub fn json_bytes(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Reads a body of at most `limit` bytes within the body deadline. A declared
/// `Content-Length` over the limit is refused before anything is read.
#[allow(clippy::disallowed_methods)] // the one bounded reader the lint points everyone else to
async fn read_body(ctx: &Ctx, headers: &HeaderMap, body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let deadline = Duration::from_millis(ctx.settings.http.body_read_timeout_ms);
    match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::PayloadTooLarge(limit)),
        Ok(Err(e)) => Err(ApiError::BadRequest(format!("the body could not be read: {e}"))),
    }
}

/// A header that must appear at most once: `Ok(None)` when absent, `Err` when repeated
/// or not visible ASCII.
fn single_header<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, ()> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(());
    }
    first.to_str().map(Some).map_err(|_| ())
}

/// Refuses a `Content-Type` other than JSON (a missing one is accepted, as curl sends none by default with --data-binary @file).
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("")) {
        None => Ok(()),
        Some(ct) if ct.trim_start().to_ascii_lowercase().starts_with("application/json") => Ok(()),
        Some(_) => Err(ApiError::UnsupportedMediaType),
    }
}

/// Parses a JSON body into `T`: [`crate::domain::json::parse_object`] as an [`ApiError`].
fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    crate::domain::json::parse_object(bytes).map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    #[allow(clippy::disallowed_methods)] // reading our own answer
    async fn a_panicking_handler_is_answered_500_and_counted() {
        let metrics = Metrics::new();
        let span = tracing::Span::none();
        let (route, result) = guarded(&metrics, &span, async { panic!("boom") }).await;
        assert_eq!(route, ROUTE_PANIC);
        let resp = result.unwrap_err().into_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/problem+json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["code"], "internal");
        assert_eq!(metrics.handler_panics.get(), 1);
        let (route, result) = guarded(&metrics, &span, async { (Route::Health, Err(ApiError::NotFound)) }).await;
        assert_eq!((route, result.unwrap_err().status()), ("healthz", StatusCode::NOT_FOUND));
        assert_eq!(metrics.handler_panics.get(), 1);
    }

    #[test]
    fn the_client_address_is_taken_from_trusted_proxies_only() {
        let nets: Vec<ipnet::IpNet> =
            ["10.0.0.0/8", "192.0.2.7/32", "::1/128"].iter().map(|n| n.parse().unwrap()).collect();
        let peer = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 4000);
        let cases: [(&[ipnet::IpNet], &str, &[&str], &str); 10] = [
            // No trusted proxies: the socket, whatever the header says.
            (&[], "10.1.1.1", &["203.0.113.9"], "10.1.1.1"),
            // An untrusted peer cannot choose its address.
            (&nets, "198.51.100.1", &["203.0.113.9"], "198.51.100.1"),
            (&nets, "10.1.1.1", &["203.0.113.9"], "203.0.113.9"),
            (&nets, "192.0.2.7", &["203.0.113.9"], "203.0.113.9"),
            // The right-most untrusted hop: what the client wrote further left is ignored.
            (&nets, "10.1.1.1", &["6.6.6.6, 203.0.113.9, 10.2.2.2"], "203.0.113.9"),
            (&nets, "10.1.1.1", &["6.6.6.6", "203.0.113.9"], "203.0.113.9"),
            // Only proxies in the chain, no header, or an unreadable hop: the socket.
            (&nets, "10.1.1.1", &["10.3.3.3"], "10.1.1.1"),
            (&nets, "10.1.1.1", &[], "10.1.1.1"),
            (&nets, "10.1.1.1", &["203.0.113.9, junk"], "10.1.1.1"),
            // IPv6 and IPv4-mapped forms.
            (&nets, "::ffff:10.1.1.1", &["2001:db8::5"], "2001:db8::5"),
        ];
        for (trusted, from, xff, want) in cases {
            let mut headers = HeaderMap::new();
            for v in xff {
                headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
            }
            let got = client_addr(trusted, peer(from), &headers).ip();
            assert_eq!(got, want.parse::<std::net::IpAddr>().unwrap(), "{from} {xff:?}");
        }
    }

    #[test]
    fn request_ids_are_echoed_only_when_safe() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-request-id", HeaderValue::from_str(v).unwrap());
            request_id(&h)
        };
        assert_eq!(with("abc-123.x:y_z"), "abc-123.x:y_z");
        for bad in ["", "has space", "quote\"", &"a".repeat(129)] {
            let id = with(bad);
            assert_eq!(id.len(), 32, "{bad:?} -> {id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
    }
}
