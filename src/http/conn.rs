//! Time limits hyper does not apply by itself to a connection.
//!
//! - Protocol detection: hyper-util's `auto` builder reads the first bytes to tell
//!   HTTP/1 from the HTTP/2 preface with no timer, so a socket that sends nothing (or
//!   trickles the 24-byte preface) would hold its connection for ever. [`first_bytes`]
//!   bounds that phase by the header read timeout.
//! - Idleness: HTTP/1's idle keep-alive is bounded by hyper's header read timeout, which
//!   restarts when the connection waits for its next request. HTTP/2 has no such limit:
//!   [`IdleLimited`] closes any connection on which nothing was read or written for the
//!   idle timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits, for at most `within`, until the first bytes tell which protocol the client
/// speaks: any byte that leaves the HTTP/2 preface, or the whole preface. `false` when
/// the client closed or stayed silent.
pub async fn first_bytes(stream: &TcpStream, within: Duration) -> bool {
    let detect = async {
        let mut buf = [0u8; 24];
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            if n == buf.len() || buf[..n] != H2_PREFACE[..n] {
                return Ok(true);
            }
            // Part of the preface: `peek` leaves the socket readable, so wait a little
            // rather than spin until the rest arrives.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    matches!(tokio::time::timeout(within, detect).await, Ok(Ok::<bool, io::Error>(true)))
}

/// A socket whose reads fail with `TimedOut` once nothing has been read or written for
/// `idle`. Activity only records an instant; the timer is re-armed when it fires early.
pub struct IdleLimited {
    io: TcpStream,
    idle: Duration,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
}

impl IdleLimited {
    pub fn new(io: TcpStream, idle: Duration) -> IdleLimited {
        let now = Instant::now();
        IdleLimited { io, idle, last_activity: now, timer: Box::pin(tokio::time::sleep_until(now + idle)) }
    }

    /// `Ready` once the connection has really been idle for the whole limit.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.last_activity + self.idle;
            if Instant::now() >= due {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(due);
        }
    }
}

impl AsyncRead for IdleLimited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.last_activity = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.poll_idle(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle"))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for IdleLimited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last_activity = Instant::now();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last_activity = Instant::now();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
