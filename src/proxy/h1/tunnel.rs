//! An upgraded (101) connection: client and backend joined byte for byte, closed when
//! either side closes, when no byte has passed either way for `proxy.upgrade_idle_timeout`,
//! or when a drain's grace period ends. The router does not speak the upgraded protocol
//! (it sends no WebSocket close frame): it ends both sides with a clean shutdown (TLS
//! close_notify, then FIN).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::server::{quiet_for, stopped};

/// How long each side's shutdown may take before the socket is dropped.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TunnelEnd {
    /// One side closed (or failed).
    Closed,
    /// No byte passed either way for the idle timeout.
    Idle,
    /// The drain's grace period ended.
    Drained,
}

/// Relays `client` and `backend` until one closes, the idle timeout passes (`None`:
/// never) or, once `shutdown` turns true, `grace` has passed; then shuts both down.
pub(crate) async fn join<C, B>(
    client: &mut C,
    backend: &mut B,
    idle: Option<Duration>,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> TunnelEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Reads bump one counter; the idle check compares it between its ticks, so a busy
    // tunnel costs one relaxed add per read, not a timer reset.
    let reads = AtomicU64::new(0);
    let end = {
        let mut c = Counting {
            inner: &mut *client,
            reads: &reads,
        };
        let mut b = Counting {
            inner: &mut *backend,
            reads: &reads,
        };
        let drained = async {
            stopped(&mut shutdown).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut c, &mut b) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upgraded connection ended with error");
                }
                TunnelEnd::Closed
            }
            _ = idle_for(&reads, idle) => TunnelEnd::Idle,
            _ = drained => TunnelEnd::Drained,
        }
    };
    if end != TunnelEnd::Closed {
        tracing::debug!(?end, "closing an upgraded connection");
    }
    // Both sides at once, each bounded: a peer that does not read cannot hold the other.
    let _ = tokio::join!(
        tokio::time::timeout(SHUTDOWN_WAIT, client.shutdown()),
        tokio::time::timeout(SHUTDOWN_WAIT, backend.shutdown()),
    );
    end
}

/// Resolves once `reads` has not moved for `limit` (see [`quiet_for`]); never without one.
async fn idle_for(reads: &AtomicU64, limit: Option<Duration>) {
    match limit {
        Some(limit) => quiet_for(limit, || Some(reads.load(Ordering::Relaxed))).await,
        None => std::future::pending().await,
    }
}

/// A stream whose reads of at least one byte are counted.
struct Counting<'a, S> {
    inner: &'a mut S,
    reads: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.reads.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt};

    #[tokio::test(start_paused = true)]
    async fn idle_tunnel_closes_and_active_one_does_not() {
        let (mut client, mut client_end) = duplex(64);
        let (mut backend, mut backend_end) = duplex(64);
        let (_stop, shutdown) = watch::channel(false);
        let limit = Duration::from_secs(10);
        let tunnel = tokio::spawn(async move {
            join(
                &mut client_end,
                &mut backend_end,
                Some(limit),
                limit,
                shutdown,
            )
            .await
        });
        // Traffic every 4 s for 40 s keeps it open.
        let mut buf = [0u8; 4];
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            client.write_all(b"ping").await.unwrap();
            backend.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            assert!(!tunnel.is_finished());
        }
        // Then silence: closed within 1.5 × the limit, both sides shut down.
        let end = tokio::time::timeout(Duration::from_secs(16), tunnel)
            .await
            .expect("closed when idle")
            .unwrap();
        assert_eq!(end, TunnelEnd::Idle);
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        assert_eq!(backend.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_closes_after_the_grace_period() {
        let (mut client, mut client_end) = duplex(64);
        let (_backend, mut backend_end) = duplex(64);
        let (stop, shutdown) = watch::channel(false);
        let grace = Duration::from_secs(5);
        let tunnel = tokio::spawn(async move {
            join(&mut client_end, &mut backend_end, None, grace, shutdown).await
        });
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!tunnel.is_finished(), "no idle timeout by default");
        stop.send(true).unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!tunnel.is_finished(), "open within the grace period");
        let end = tokio::time::timeout(Duration::from_secs(2), tunnel)
            .await
            .expect("closed at the end of the grace period")
            .unwrap();
        assert_eq!(end, TunnelEnd::Drained);
        let mut buf = [0u8; 4];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
    }
}
