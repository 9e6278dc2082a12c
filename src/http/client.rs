//! The one HTTP client tally's own commands need: `tally backup` asks a running tally
//! on its admin listener (which holds the store) to take the backup.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

/// Largest answer read from the admin listener.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Why an admin request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there: no tally is running on this configuration.
    #[error("nothing listens on {0}")]
    NotListening(SocketAddr),
    #[error("{0}")]
    Failed(String),
}

/// Sends `method path` with the admin bearer token to `addr`; the status and the body.
///
/// # Errors
/// [`ClientError::NotListening`] when the connection is refused, else `Failed`.
#[allow(clippy::disallowed_methods)] // the answer is bounded (Limited) and the whole call has a deadline
pub async fn admin_request(
    addr: SocketAddr,
    token: &str,
    method: Method,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Bytes), ClientError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| ClientError::Failed(format!("{what} {addr}: {e}"));
    let stream = match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(ClientError::NotListening(addr)),
        Ok(Err(e)) => return Err(failed("connect to", &e)),
        Err(_) => return Err(failed("connect to", &"timed out")),
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| failed("talk to", &e))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .map_err(|e| failed("build a request for", &e))?;
    let answer = async {
        let resp = sender.send_request(req).await.map_err(|e| failed("send to", &e))?;
        let status = resp.status().as_u16();
        let body =
            Limited::new(resp.into_body(), MAX_ANSWER_BYTES).collect().await.map_err(|e| failed("read from", &e))?;
        Ok((status, body.to_bytes()))
    };
    tokio::time::timeout(timeout, answer).await.map_err(|_| failed("no answer in time from", &"timeout"))?
}
