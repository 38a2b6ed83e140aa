//! The admin listener's accept loop (plain hyper, HTTP/1.1 and h2c), one task per
//! connection, graceful shutdown with a bounded grace period; and the accept helpers the
//! proxy's listener (`crate::listener`) shares.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::listener::h2::{drive, Limits, Streams};

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
/// finish their current requests for at most `grace`. A connection with no request in
/// progress for `idle()` (the proxy's `header_timeout`, read per connection so a reload
/// applies) is closed, HTTP/2 (h2c) ones with a GOAWAY, as the proxy's are.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    idle: impl Fn() -> Duration,
) {
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
        let streams = Arc::new(Streams::new());
        let svc = {
            let streams = streams.clone();
            service_fn(move |req| {
                // The bodies are whole when answered: counted until then.
                let open = streams.enter();
                let h = h.clone();
                async move {
                    let resp = h.call(req, peer).await;
                    drop(open);
                    Ok::<_, Infallible>(resp)
                }
            })
        };
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let limits = Limits {
            idle: idle(),
            send: None,
        };
        let stop = shutdown.clone();
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
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

/// The next connection, with Nagle off, or `None` once `shutdown` turns true.
pub(crate) async fn next_conn(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr)> {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: the connection stays in the
                    // backlog; back off (50 ms doubling to 1 s) instead of spinning on it.
                    let reason = accept_failure_reason(&e);
                    metrics::counter!("consul_router_accept_errors_total", "reason" => reason)
                        .increment(1);
                    if failures == 0 {
                        tracing::warn!(error = %e, reason, "accept failed; backing off");
                    }
                    let wait = ACCEPT_BACKOFF.saturating_mul(1 << failures.min(5));
                    failures += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(wait.min(Duration::from_secs(1))) => {}
                        _ = stopped(shutdown) => return None,
                    }
                }
            },
            _ = stopped(shutdown) => return None,
        }
    }
}

/// The first wait after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The `reason` label of `consul_router_accept_errors_total`.
fn accept_failure_reason(e: &std::io::Error) -> &'static str {
    use rustix::io::Errno;
    match Errno::from_io_error(e) {
        Some(Errno::MFILE) => "process_fd_limit",
        Some(Errno::NFILE) => "system_fd_limit",
        _ => "other",
    }
}

/// Resolves once `shutdown` turns true.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard wait_for returns is not Send: drop it here.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// Resolves once `progress` has returned the same `Some` value for `limit`: checked every
/// half `limit`, so it fires between `limit` and 1.5 × `limit` after the last change. `None`
/// (nothing to wait for) starts the count again. One timer, and the watched side pays only
/// for bumping its counter.
pub(crate) async fn quiet_for(limit: Duration, progress: impl Fn() -> Option<u64>) {
    let tick = limit / 2;
    let mut seen = progress();
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(tick).await;
        let now = progress();
        if now.is_some() && now == seen {
            quiet += tick;
            if quiet >= limit {
                return;
            }
        } else {
            seen = now;
            quiet = Duration::ZERO;
        }
    }
}
