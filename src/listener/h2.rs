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
use crate::server::{quiet_for, stopped};

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
/// finished within [`H2_CLOSE_WAIT`]) on shutdown, once no stream has been open for
/// `proxy.header_timeout` (which also bounds the handshake), or once the client has taken
/// no response bytes for `proxy.send_timeout` while some wait for it (a client that keeps
/// its flow-control window at zero: hyper polls a body only when the window has room, so
/// neither the stall timer nor keep-alive PINGs, which it answers, would see it).
pub(super) async fn serve_h2<T>(
    io: T,
    proxy: Arc<Proxy>,
    builder: &http2::Builder<TokioExecutor>,
    facts: ConnFacts,
    stop: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = Limits {
        idle: proxy.header_timeout,
        send: Some(proxy.send_timeout),
    };
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
                Ok::<_, Infallible>(resp.map(|inner| Counted::new(inner, open)))
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    let conn = std::pin::pin!(conn);
    drive(
        conn,
        |c| c.graceful_shutdown(),
        &streams,
        limits,
        stop,
        peer,
    )
    .await;
}

/// When a connection driven by [`drive`] is closed besides shutdown.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// No stream open for this long.
    pub idle: Duration,
    /// Response bytes waiting and none taken by the client for this long; `None`: never.
    pub send: Option<Duration>,
}

/// Why [`drive`] began to close a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    Shutdown,
    Idle,
    Stalled,
}

/// Drives a hyper connection whose requests are counted in `streams` until it ends; on
/// shutdown or past `limits`, asks it to close (`graceful`: GOAWAY for HTTP/2) and drops it
/// if it has not finished within [`H2_CLOSE_WAIT`] (at once for a stalled client's).
pub(crate) async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    graceful: impl FnOnce(Pin<&mut C>),
    streams: &Streams,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    peer: SocketAddr,
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let stalled = async {
        match limits.send {
            Some(limit) => streams.stalled_for(limit).await,
            None => std::future::pending().await,
        }
    };
    let closing = tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with error");
            }
            return;
        }
        _ = stopped(&mut stop) => Closing::Shutdown,
        _ = streams.idle_for(limits.idle) => {
            tracing::debug!(%peer, "connection without open streams for {:?}; closing", limits.idle);
            Closing::Idle
        }
        _ = stalled => {
            tracing::debug!(%peer, "client took no response bytes for {:?}; closing", limits.send);
            metrics::counter!("consul_router_send_timeouts_total").increment(1);
            Closing::Stalled
        }
    };
    graceful(conn.as_mut());
    // Streams still open may finish (on shutdown, within the server's grace period); a
    // stalled client's never will.
    let close_wait = async {
        if closing == Closing::Stalled {
            tokio::time::sleep(H2_CLOSE_WAIT).await;
        } else {
            streams.idle_for(H2_CLOSE_WAIT).await;
        }
    };
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with error");
            }
        }
        _ = close_wait => {
            tracing::debug!(%peer, "connection still open after GOAWAY; dropping it");
        }
    }
}

/// The open streams of one HTTP/2 connection and when the last one ended. hyper runs each
/// stream in its own task, so this is shared and atomic.
pub(crate) struct Streams {
    open: AtomicUsize,
    /// Streams whose response has bytes for the client that hyper has not asked for yet
    /// (it asks only when the client's window has room).
    wanting: AtomicUsize,
    /// Response frames handed to hyper, over all streams: the client's progress.
    sent: AtomicU64,
    /// When a stream last ended, in nanoseconds after `start`.
    last_end: AtomicU64,
    start: Instant,
}

impl Streams {
    pub(crate) fn new() -> Self {
        Streams {
            open: AtomicUsize::new(0),
            wanting: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            last_end: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// Counts a stream as open until the guard is dropped.
    pub(crate) fn enter(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenStream {
            streams: self.clone(),
            wanting: false,
        }
    }

    /// Resolves once some stream has had bytes waiting and the client has taken none for
    /// `limit`.
    async fn stalled_for(&self, limit: Duration) {
        quiet_for(limit, || {
            (self.wanting.load(Ordering::Relaxed) > 0).then(|| self.sent.load(Ordering::Relaxed))
        })
        .await;
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
pub(crate) struct OpenStream {
    streams: Arc<Streams>,
    /// Counted in `Streams::wanting`.
    wanting: bool,
}

impl OpenStream {
    fn set_wanting(&mut self, wanting: bool) {
        if self.wanting != wanting {
            self.wanting = wanting;
            if wanting {
                self.streams.wanting.fetch_add(1, Ordering::Relaxed);
            } else {
                self.streams.wanting.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.set_wanting(false);
        let s = &self.streams;
        let at = u64::try_from(s.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        s.last_end.fetch_max(at, Ordering::Relaxed);
        // Release: whoever sees the count fall sees `last_end` too.
        s.open.fetch_sub(1, Ordering::Release);
    }
}

/// A response body that keeps its stream counted as open until it ends or is dropped, and
/// tells whether it waits for the client: from the head until hyper first asks for a frame,
/// and after each frame until hyper asks again (hyper asks only when the client's window
/// has room); not while the body itself has nothing yet.
struct Counted<B> {
    inner: B,
    open: Option<OpenStream>,
}

impl<B> Counted<B> {
    fn new(inner: B, mut open: OpenStream) -> Self {
        open.set_wanting(true);
        Counted {
            inner,
            open: Some(open),
        }
    }
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
        match &polled {
            Poll::Ready(None | Some(Err(_))) => this.open = None,
            Poll::Ready(Some(Ok(_))) => {
                if let Some(open) = &mut this.open {
                    open.streams.sent.fetch_add(1, Ordering::Relaxed);
                    open.set_wanting(true);
                }
            }
            Poll::Pending => {
                if let Some(open) = &mut this.open {
                    open.set_wanting(false);
                }
            }
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
