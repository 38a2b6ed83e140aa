//! Bodies on the HTTP/2 path: a backend's body streamed through, or a short local answer;
//! and [`Stall`], which fails a body that stops sending.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::routing::InstanceState;

use super::pool::Sender;

/// Counts one request in flight to an instance until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<InstanceState>);

impl InFlight {
    /// Starts counting.
    pub fn new(state: Arc<InstanceState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(state)
    }

    /// The instance's state.
    pub fn state(&self) -> &Arc<InstanceState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

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
    timeout: Duration,
    /// Made at the first wait, then moved; one per body.
    sleep: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl<B> Stall<B> {
    /// Wraps `inner` with a stall limit of `timeout`.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Stall {
            inner,
            timeout,
            sleep: None,
            waiting: false,
        }
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
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if !this.waiting {
            this.waiting = true;
            let due = Instant::now() + this.timeout;
            match &mut this.sleep {
                Some(sleep) => sleep.as_mut().reset(due),
                None => this.sleep = Some(Box::pin(tokio::time::sleep_until(due))),
            }
        }
        if let Some(sleep) = &mut this.sleep {
            ready!(sleep.as_mut().poll(cx));
        }
        Poll::Ready(Some(Err(Stalled(this.timeout).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A backend's response body. When it has been read to the end, its connection goes back to
/// the instance's idle pool; the in-flight count lasts as long as the body. A body that
/// fails (the backend broke it, or it stalled) drops its connection instead.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Stall<Incoming>,
    sender: Option<Sender>,
    in_flight: InFlight,
}

impl UpstreamBody {
    /// Wraps `inner`, failing it when it stalls for `stall`; `sender` (if any) is pooled
    /// once the body ends.
    pub fn new(
        inner: Incoming,
        sender: Option<Sender>,
        in_flight: InFlight,
        stall: Duration,
    ) -> Self {
        UpstreamBody {
            inner: Stall::new(inner, stall),
            sender,
            in_flight,
        }
    }

    fn release(&mut self) {
        if let Some(s) = self.sender.take() {
            self.in_flight
                .state()
                .idle_hyper
                .put(s, std::time::Instant::now());
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Err(_))) => this.sender = None,
            _ => {}
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

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Bodies known to be empty (HEAD, 204, 304) may never be polled.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

/// What the proxy answers with: the backend's body, or a short local one.
pub type ProxyBody = http_body_util::Either<UpstreamBody, Full<Bytes>>;
