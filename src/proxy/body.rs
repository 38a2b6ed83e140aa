//! Response bodies: a backend's body streamed through, or a short local answer.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

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

/// A backend's response body. When it has been read to the end, its connection goes back to
/// the instance's idle pool; the in-flight count lasts as long as the body.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    sender: Option<Sender>,
    in_flight: InFlight,
}

impl UpstreamBody {
    /// Wraps `inner`; `sender` (if any) is pooled once the body ends.
    pub fn new(inner: Incoming, sender: Option<Sender>, in_flight: InFlight) -> Self {
        UpstreamBody {
            inner,
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
