//! Accept loops, one task per connection, graceful shutdown with a bounded grace period.
//! The proxy listener runs the HTTP/1 fast path and hands HTTP/2 to hyper; the admin
//! listener is plain hyper (HTTP/1.1 and h2c).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

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
/// hyper. On shutdown it stops accepting, lets connections finish their current request
/// for at most `grace`, then closes the rest.
pub async fn serve_proxy(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut conns = tokio::task::JoinSet::new();
    while let Some((stream, peer)) = next_conn(&listener, &mut shutdown).await {
        let proxy = proxy.clone();
        let stop = shutdown.clone();
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            if let Ended::Http2(stream, read) = proxy.serve_h1(stream, peer, stop.clone()).await {
                serve_h2(Prefixed::new(read, stream), proxy, peer, stop).await;
            }
        });
    }
    drop(listener);
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

/// One HTTP/2 connection through hyper, closed gracefully on shutdown.
async fn serve_h2(
    io: Prefixed,
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let conn = Arc::new(crate::proxy::core::ClientConn::new(&proxy, peer));
    let svc = service_fn(move |req| {
        let proxy = proxy.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req, &conn).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "h2 connection ended with error");
            }
            return;
        }
        _ = stopped(&mut stop) => conn.as_mut().graceful_shutdown(),
    }
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "h2 connection ended with error");
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
