//! The HTTP client of outbound postbacks (SPEC 10), safe against SSRF: the destination is
//! vetted ([`super::ssrf`]) and the connection goes to an address that was vetted (no
//! second resolution). Redirects are never followed (a `3xx` is an answer like any other,
//! which the caller counts as a failure) and no proxy is read from the environment.
//! Bounded: the connection within the connect timeout, the whole attempt within the
//! attempt timeout, and at most 64 KiB of the answer read (its first 1 KiB kept).
//!
//! TLS is rustls with the `ring` provider and Mozilla's roots from `webpki-roots`: pure
//! Rust but for ring's small C and assembly core (about a minute to build), where
//! rustls' default provider (aws-lc-rs) would add a second large C build beside RocksDB,
//! and native-tls would add OpenSSL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::ssrf::{vet_url, Refused, Resolve};

/// Most bytes of an answer read; the rest is not waited for.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Bytes of an answer kept with the attempt.
pub const KEPT_ANSWER_BYTES: usize = 1024;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an attempt got no HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("ssrf_blocked: {0}")]
    Ssrf(Refused),
    #[error("connect: {0}")]
    Connect(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("http: {0}")]
    Http(String),
    #[error("timeout after {0:?}")]
    Timeout(Duration),
}

impl Failure {
    /// A closed label for metrics and the attempt log.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Ssrf(_) => "ssrf_blocked",
            Failure::Connect(_) => "connect",
            Failure::Tls(_) => "tls",
            Failure::Http(_) => "http",
            Failure::Timeout(_) => "timeout",
        }
    }
}

/// What one attempt got.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The first [`KEPT_ANSWER_BYTES`] of the body.
    pub head: Bytes,
    /// The `Retry-After` header, as sent.
    pub retry_after: Option<String>,
}

/// One attempt: its answer or why there was none, and how long it took.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub result: Result<Answer, Failure>,
    pub duration: Duration,
}

/// A request to send: the method, the URL (already expanded) and the body.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub method: Method,
    pub url: url::Url,
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
    pub body: Bytes,
}

/// The client. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct Client {
    tls: tokio_rustls::TlsConnector,
    resolver: Arc<dyn Resolve>,
    allow_private: bool,
    connect_timeout: Duration,
    attempt_timeout: Duration,
}

/// Mozilla's root certificates (webpki-roots).
pub fn default_roots() -> rustls::RootCertStore {
    rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }
}

impl Client {
    pub fn new(
        roots: rustls::RootCertStore,
        resolver: Arc<dyn Resolve>,
        allow_private: bool,
        connect_timeout: Duration,
        attempt_timeout: Duration,
    ) -> Result<Client, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Client {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            resolver,
            allow_private,
            connect_timeout,
            attempt_timeout,
        })
    }

    /// Sends one attempt. Never follows a redirect; never resolves the host twice.
    pub async fn send(&self, out: &Outgoing) -> Attempt {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.attempt_timeout, self.attempt(out)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout(self.attempt_timeout)),
        };
        Attempt { result, duration: started.elapsed() }
    }

    async fn attempt(&self, out: &Outgoing) -> Result<Answer, Failure> {
        let addrs = vet_url(&out.url, self.allow_private, self.resolver.as_ref()).await.map_err(Failure::Ssrf)?;
        let mut last = Failure::Connect("no address".into());
        let mut stream = None;
        for addr in addrs {
            match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    break;
                }
                Ok(Err(e)) => last = Failure::Connect(format!("{addr}: {e}")),
                Err(_) => last = Failure::Timeout(self.connect_timeout),
            }
        }
        let stream = stream.ok_or(last)?;
        let _ = stream.set_nodelay(true);
        if out.url.scheme() == "https" {
            let name = match out.url.host() {
                Some(url::Host::Domain(d)) => {
                    rustls::pki_types::ServerName::try_from(d.trim_end_matches('.').to_string())
                        .map_err(|e| Failure::Tls(e.to_string()))?
                }
                Some(url::Host::Ipv4(ip)) => rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::V4(ip).into()),
                Some(url::Host::Ipv6(ip)) => rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::V6(ip).into()),
                None => return Err(Failure::Tls("no host".into())),
            };
            let tls = self.tls.connect(name, stream).await.map_err(|e| Failure::Tls(e.to_string()))?;
            exchange(TokioIo::new(tls), out).await
        } else {
            exchange(TokioIo::new(stream), out).await
        }
    }
}

/// One HTTP/1.1 exchange on an established connection.
#[allow(clippy::disallowed_methods)] // the body is read through Limited, within the attempt's deadline
async fn exchange<T>(io: T, out: &Outgoing) -> Result<Answer, Failure>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let http = |e: &dyn std::fmt::Display| Failure::Http(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| http(&e))?;
    tokio::spawn(conn);
    let host = match (out.url.host_str(), out.url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        (None, _) => return Err(Failure::Http("no host".into())),
    };
    let target = &out.url[url::Position::BeforePath..url::Position::AfterQuery];
    let mut req = Request::builder().method(out.method.clone()).uri(target).header(header::HOST, host);
    req = req.header(header::USER_AGENT, concat!("tally/", env!("CARGO_PKG_VERSION")));
    for (name, value) in &out.headers {
        req = req.header(name, value);
    }
    let req = req.body(Full::new(out.body.clone())).map_err(|e| http(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut body = resp.into_body();
    let mut kept = Vec::new();
    let mut read = 0;
    // Read at most MAX_ANSWER_BYTES, then stop listening: the answer is the status.
    while read < MAX_ANSWER_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    read += data.len();
                    let room = KEPT_ANSWER_BYTES.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Some(Err(e)) => return Err(http(&e)),
            None => break,
        }
    }
    Ok(Answer { status, head: Bytes::from(kept), retry_after })
}
