//! [`Stall`]: fails a body that stops sending.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Buf;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

/// The error type of the bodies on this path.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body that sent nothing for too long.
#[derive(Debug, thiserror::Error)]
#[error("body stalled: no data for {0:?}")]
pub struct Stalled(pub Duration);

/// A client's request body on its way to a backend, failed if it stalls.
pub type RequestBody = Stall<Incoming>;

/// Fails `inner` with [`Stalled`] when a frame is asked for and none comes within `timeout`.
/// The wait starts when a frame is asked for, so time spent while the reader is not asking
/// (its peer applying back-pressure) does not count. The error makes hyper reset the HTTP/2
/// stream, or abort the HTTP/1 backend connection the body was being written to.
#[derive(Debug)]
pub struct Stall<B> {
    inner: B,
    /// `None`: no limit (gRPC streams, whose gaps between messages are the application's).
    timeout: Option<Duration>,
    /// Made at the first wait, then moved; one per body.
    sleep: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    /// Data bytes that passed, for the access log's `bytes_in`.
    passed: Option<Arc<AtomicU64>>,
}

impl<B> Stall<B> {
    /// Wraps `inner` with a stall limit of `timeout`.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self::limited(inner, Some(timeout))
    }

    /// Wraps `inner` with a stall limit of `timeout`, or none.
    pub fn limited(inner: B, timeout: Option<Duration>) -> Self {
        Stall {
            inner,
            timeout,
            sleep: None,
            waiting: false,
            passed: None,
        }
    }

    /// Counts the data bytes that pass into `passed`.
    pub fn counting(mut self, passed: Option<Arc<AtomicU64>>) -> Self {
        self.passed = passed;
        self
    }
}

impl<B> Body for Stall<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            if let (Some(passed), Some(Ok(f))) = (&this.passed, &frame) {
                let n = f.data_ref().map_or(0, Buf::remaining);
                passed.fetch_add(n as u64, Ordering::Relaxed);
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let Some(timeout) = this.timeout else {
            return Poll::Pending;
        };
        if !this.waiting {
            this.waiting = true;
            let due = Instant::now() + timeout;
            match &mut this.sleep {
                Some(sleep) => sleep.as_mut().reset(due),
                None => this.sleep = Some(Box::pin(tokio::time::sleep_until(due))),
            }
        }
        if let Some(sleep) = &mut this.sleep {
            ready!(sleep.as_mut().poll(cx));
        }
        Poll::Ready(Some(Err(Stalled(timeout).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
