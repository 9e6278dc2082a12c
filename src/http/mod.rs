//! HTTP: the only module that names hyper. The accept loop (connection semaphore,
//! timeouts, graceful shutdown), the two routers, body limits and the mapping of errors
//! to problem+json.

mod admin;
mod b2b;
mod conn;
pub mod problem;
mod public;
mod views;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
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

use crate::config::Settings;
use crate::domain::clock::Clock;
use crate::metrics::Metrics;
use crate::signing::ReplayGuard;
use crate::store::Store;
use problem::ApiError;

pub type Body = Full<Bytes>;

/// Everything a handler needs, shared by both listeners.
pub struct Ctx {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    pub settings: Settings,
    pub admin_token: SecretString,
    pub replay: Mutex<ReplayGuard>,
    pub limits: crate::limits::Limits,
}

/// Which listener a request came in on: the `listener` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Public,
    Admin,
}

impl Listener {
    fn as_str(self) -> &'static str {
        match self {
            Listener::Public => "public",
            Listener::Admin => "admin",
        }
    }
}

/// Routes, the closed set of `route` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Click,
    Postback,
    Conversion,
    ConversionBatch,
    ServerClick,
    Adjustment,
    Touch,
    Deal,
    AdminReassign,
    AdminMerchant,
    AdminSecretRotate,
    AdminTokenRotate,
    AdminPartner,
    AdminLink,
    AdminPlan,
    AdminConversion,
    Metrics,
    Health,
    Ready,
    NotFound,
}

impl Route {
    fn as_str(self) -> &'static str {
        match self {
            Route::Click => "click",
            Route::Postback => "postback",
            Route::Conversion => "conversion",
            Route::ConversionBatch => "conversion_batch",
            Route::ServerClick => "server_click",
            Route::Adjustment => "adjustment",
            Route::Touch => "touch",
            Route::Deal => "deal",
            Route::AdminReassign => "admin_reassign",
            Route::AdminMerchant => "admin_merchant",
            Route::AdminSecretRotate => "admin_secret_rotate",
            Route::AdminTokenRotate => "admin_token_rotate",
            Route::AdminPartner => "admin_partner",
            Route::AdminLink => "admin_link",
            Route::AdminPlan => "admin_plan",
            Route::AdminConversion => "admin_conversion",
            Route::Metrics => "metrics",
            Route::Health => "healthz",
            Route::Ready => "readyz",
            Route::NotFound => "not_found",
        }
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
            let svc = service_fn(move |req| dispatch(Arc::clone(&ctx), kind, peer, req));
            let _ = watcher.watch(builder.serve_connection(TokioIo::new(io), svc).into_owned()).await;
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
    // Built only when request logs are on: this runs for every click.
    let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| (req.method().clone(), redacted_target(req.uri())));
    let (route, result) = match kind {
        Listener::Public => public::handle(&ctx, peer, req).await,
        Listener::Admin => admin::handle(&ctx, req).await,
    };
    let resp = result.unwrap_or_else(ApiError::into_response);
    let m = &ctx.metrics;
    m.http_requests.with_label_values(&[kind.as_str(), route.as_str(), resp.status().as_str()]).inc();
    m.http_duration.with_label_values(&[route.as_str()]).observe(started.elapsed().as_secs_f64());
    if let Some((method, target)) = logged {
        tracing::debug!(
            listener = kind.as_str(),
            %peer,
            %method,
            target = %target,
            route = route.as_str(),
            status = resp.status().as_u16(),
            micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "request"
        );
    }
    Ok(resp)
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
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    json_bytes(status, Bytes::from(serde_json::to_vec(value).unwrap_or_default()))
}

/// A JSON response from a body rendered earlier.
pub fn json_bytes(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body));
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
