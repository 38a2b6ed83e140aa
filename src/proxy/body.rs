//! Bodies on the HTTP/2 path: a backend's body streamed through, or a short local answer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::upstream::{BoxError, InFlight, Sender, Stall};

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
