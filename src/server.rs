//! Accept loops, one task per connection, graceful shutdown with a bounded grace period.
//! The proxy listener runs the HTTP/1 fast path and hands HTTP/2 to hyper; the admin
//! listener is plain hyper (HTTP/1.1 and h2c).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::proxy::h1::Ended;
use crate::proxy::Proxy;

/// Something that answers requests from a peer.
pub trait Handler: Send + Sync + 'static {
    /// Response body type.
    type Body: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static;
    /// Answers one request.
    fn call(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Self::Body>> + Send;
}

/// Serves `listener` with hyper until `shutdown` turns true, then lets open connections
/// finish their current requests for at most `grace`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(TokioTimer::new());
    // Connection tasks, so the ones still open when the grace period ends can be closed.
    let mut conns = tokio::task::JoinSet::new();
    while let Some((stream, peer)) = next_conn(&listener, &mut shutdown).await {
        let h = handler.clone();
        let svc = service_fn(move |req| {
            let h = h.clone();
            async move { Ok::<_, Infallible>(h.call(req, peer).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn.into_owned());
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            while conns.try_join_next().is_some() {}
            tracing::warn!(?grace, open = conns.len(), "grace period over; closing remaining connections");
        }
    }
    conns.abort_all();
}

/// Serves the proxy listener: HTTP/1 on the fast path, HTTP/2 (prior knowledge) through
/// hyper. Each connection takes the proxy in `current` when it is accepted and keeps it
/// for its life, so a reload applies to new connections without touching open ones. On
/// shutdown it stops accepting, lets connections finish their current request for at most
/// `proxy.shutdown_grace` (as configured then), then closes the rest.
pub async fn serve_proxy(
    listener: TcpListener,
    current: Arc<ArcSwap<Proxy>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    while let Some((stream, peer)) = next_conn(&listener, &mut shutdown).await {
        let proxy = current.load_full();
        let stop = shutdown.clone();
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            let open = Open::new(&proxy.open_connections[0]);
            if let Ended::Http2(stream, read) = proxy.serve_h1(stream, peer, stop.clone()).await {
                drop(open);
                let _open = Open::new(&proxy.open_connections[1]);
                let h2 = h2_builder(&proxy);
                serve_h2(Prefixed::new(read, stream), proxy, &h2, peer, stop).await;
            }
        });
    }
    drop(listener);
    let grace = current.load().shutdown_grace;
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            open = conns.len(),
            "grace period over; closing remaining connections"
        );
    }
    conns.abort_all();
}

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
fn h2_builder(proxy: &Proxy) -> http2::Builder<TokioExecutor> {
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
async fn serve_h2(
    io: Prefixed,
    proxy: Arc<Proxy>,
    builder: &http2::Builder<TokioExecutor>,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let idle_limit = proxy.header_timeout;
    let streams = Arc::new(Streams::new());
    let conn = Arc::new(crate::proxy::core::ClientConn::new(&proxy, peer));
    let svc = {
        let streams = streams.clone();
        service_fn(move |req| {
            let open = streams.enter();
            let proxy = proxy.clone();
            let conn = conn.clone();
            async move {
                let resp = proxy.handle(req, &conn).await;
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

/// Counts one open client connection in a gauge while it lives.
struct Open(metrics::Gauge);

impl Open {
    fn new(gauge: &metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Open(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A stream with bytes already read from it put back in front.
struct Prefixed {
    read: Vec<u8>,
    pos: usize,
    stream: TcpStream,
}

impl Prefixed {
    fn new(read: Vec<u8>, stream: TcpStream) -> Self {
        Prefixed {
            read,
            pos: 0,
            stream,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.read.len() {
            let n = (this.read.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.read[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.read.len() {
                this.read = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The next connection, with Nagle off, or `None` once `shutdown` turns true.
async fn next_conn(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(shutdown) => return None,
        }
    }
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard wait_for returns is not Send: drop it here.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}
