//! HTTP/2 connections through hyper: the server settings, the idle-stream close, and the
//! response body that keeps its stream counted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::proxy::{ConnFacts, Proxy};
use crate::server::stopped;

/// How long an HTTP/2 connection that is closing, with no stream open, may take to finish
/// its GOAWAY exchange before it is dropped. A peer that never completed the handshake or
/// never answers the GOAWAY's ping would otherwise keep it.
const H2_CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Keep-alive pings: one after this long without a frame from the peer, and the
/// connection (open streams included) is closed if the peer does not answer within as long.
/// This finds dead peers that hold streams open.
const H2_PING: Duration = Duration::from_secs(20);
/// Streams the peer may open and reset before we accept them (rapid reset,
/// CVE-2023-44487); beyond that the connection gets a GOAWAY. h2's default, made explicit.
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams we may reset for the peer's stream errors before the connection gets a GOAWAY,
/// so invalid frames can't make us reset streams forever. hyper's default, made explicit.
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// The largest header list (HPACK-decoded) a request may carry: hyper's default, and
/// nginx's for HTTP/2. Each of up to `h2_max_concurrent_streams` streams may hold one.
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;

/// The HTTP/2 server settings shared by every connection.
pub(super) fn h2_builder(proxy: &Proxy) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(proxy.h2_max_concurrent_streams)
        .keep_alive_interval(H2_PING)
        .keep_alive_timeout(H2_PING)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
        .max_header_list_size(H2_MAX_HEADER_LIST);
    b
}

/// One HTTP/2 connection through hyper. It is closed (GOAWAY, then dropped if it has not
/// finished within [`H2_CLOSE_WAIT`]) on shutdown, or once no stream has been open for
/// `proxy.header_timeout`, which also bounds the handshake.
pub(super) async fn serve_h2<T>(
    io: T,
    proxy: Arc<Proxy>,
    builder: &http2::Builder<TokioExecutor>,
    facts: ConnFacts,
    mut stop: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle_limit = proxy.header_timeout;
    let peer: SocketAddr = facts.peer;
    let streams = Arc::new(Streams::new());
    let conn = Arc::new(facts);
    let core = proxy.core.clone();
    let svc = {
        let streams = streams.clone();
        service_fn(move |req| {
            let open = streams.enter();
            let core = core.clone();
            let conn = conn.clone();
            async move {
                let resp = crate::proxy::h2::handle(&core, req, &conn).await;
                Ok::<_, Infallible>(resp.map(|inner| Counted {
                    inner,
                    open: Some(open),
                }))
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "h2 connection ended with error");
            }
            return;
        }
        _ = stopped(&mut stop) => {}
        _ = streams.idle_for(idle_limit) => {
            tracing::debug!(%peer, "h2 connection without open streams for {idle_limit:?}; closing");
        }
    }
    conn.as_mut().graceful_shutdown();
    // Streams still open may finish (on shutdown, within the server's grace period).
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "h2 connection ended with error");
            }
        }
        _ = streams.idle_for(H2_CLOSE_WAIT) => {
            tracing::debug!(%peer, "h2 connection still open after GOAWAY; dropping it");
        }
    }
}

/// The open streams of one HTTP/2 connection and when the last one ended. hyper runs each
/// stream in its own task, so this is shared and atomic.
struct Streams {
    open: AtomicUsize,
    /// When a stream last ended, in nanoseconds after `start`.
    last_end: AtomicU64,
    start: Instant,
}

impl Streams {
    fn new() -> Self {
        Streams {
            open: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// Counts a stream as open until the guard is dropped.
    fn enter(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.clone())
    }

    /// Resolves once no stream has been open for `limit`, counting from the call at the
    /// earliest. One timer, moved only when it fires early.
    async fn idle_for(&self, limit: Duration) {
        let from = Instant::now();
        let sleep = tokio::time::sleep_until(from + limit);
        let mut sleep = std::pin::pin!(sleep);
        loop {
            sleep.as_mut().await;
            let now = Instant::now();
            let due = if self.open.load(Ordering::Acquire) == 0 {
                let last_end =
                    self.start + Duration::from_nanos(self.last_end.load(Ordering::Relaxed));
                last_end.max(from) + limit
            } else {
                now + limit
            };
            if due <= now {
                return;
            }
            sleep.as_mut().reset(due);
        }
    }
}

/// One open stream of a [`Streams`].
struct OpenStream(Arc<Streams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let s = &self.0;
        let at = u64::try_from(s.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        s.last_end.fetch_max(at, Ordering::Relaxed);
        // Release: whoever sees the count fall sees `last_end` too.
        s.open.fetch_sub(1, Ordering::Release);
    }
}

/// A response body that keeps its stream counted as open until it ends or is dropped.
struct Counted<B> {
    inner: B,
    open: Option<OpenStream>,
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = polled {
            this.open = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
