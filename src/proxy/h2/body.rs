//! Bodies on the HTTP/2 path: a backend's body streamed through, or a local answer's.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::routing::Service;
use crate::upstream::{BoxError, H2Lease, InFlight, Sender, Stall};

use crate::proxy::core::{Core, Finished, LogFields, RequestId};

/// What closes an HTTP/2 request in the core once its response body has ended (or was
/// dropped): so its duration, bytes and access log line cover the whole response, as on
/// the HTTP/1 path.
#[derive(Debug)]
pub struct Closing {
    /// The core.
    pub core: Arc<Core>,
    /// The service.
    pub service: Arc<Service>,
    /// The instance's Consul ID.
    pub instance: Box<str>,
    /// The status relayed.
    pub status: u16,
    /// When the request was routed.
    pub start: Instant,
    /// Time to the backend's response head.
    pub upstream: std::time::Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// The request's ID.
    pub request_id: RequestId,
    /// The access log's fields, when it is on.
    pub log: Option<LogFields>,
    /// The request body's data bytes so far (`None`: it had none).
    pub received: Option<Arc<AtomicU64>>,
    /// Forward auth's decision, if the service has it.
    pub auth: Option<crate::proxy::auth::Outcome>,
}

impl Closing {
    /// Closes the request with `bytes_out` response body bytes sent.
    pub fn close(self, bytes_out: u64) {
        self.core.finish(
            &Finished {
                service: Some(&self.service),
                instance: &self.instance,
                status: self.status,
                start: Some(self.start),
                upstream: Some(self.upstream),
                retries: self.retries,
                bytes_in: self
                    .received
                    .as_ref()
                    .map_or(0, |n| n.load(Ordering::Relaxed)),
                bytes_out,
                request_id: self.request_id.as_bytes(),
                auth: self.auth,
            },
            self.log.as_ref(),
        );
    }
}

/// A backend's response body. When it has been read to the end, its connection goes back to
/// the instance's idle pool; the in-flight count lasts as long as the body. A body that
/// fails (the backend broke it, or it stalled) drops its connection instead.
#[derive(Debug)]
pub struct UpstreamBody {
    /// `None` once let go (a gRPC deadline passed).
    inner: Option<Stall<Incoming>>,
    sender: Option<Sender>,
    in_flight: InFlight,
    closing: Option<Box<Closing>>,
    bytes: u64,
    /// The stream slot of an HTTP/2 backend connection, freed with the body.
    lease: Option<H2Lease>,
    /// A gRPC call's deadline (`grpc-timeout`): at it, the body ends with
    /// `grpc-status: 4` and the backend's stream is reset.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl UpstreamBody {
    /// Wraps `inner`, failing it when it stalls for `stall`; `sender` (if any) is pooled
    /// once the body ends.
    pub fn new(
        inner: Incoming,
        sender: Option<Sender>,
        in_flight: InFlight,
        stall: Duration,
        closing: Option<Box<Closing>>,
    ) -> Self {
        UpstreamBody {
            inner: Some(Stall::new(inner, stall)),
            sender,
            in_flight,
            closing,
            bytes: 0,
            lease: None,
            deadline: None,
        }
    }

    /// The body of a response from an HTTP/2 backend: `lease` is held until it ends; it
    /// fails when it stalls for `stall` (`None`: never), and ends with a gRPC
    /// `DEADLINE_EXCEEDED` at `deadline`, if given.
    pub fn h2(
        inner: Incoming,
        lease: H2Lease,
        in_flight: InFlight,
        stall: Option<Duration>,
        deadline: Option<tokio::time::Instant>,
        closing: Box<Closing>,
    ) -> Self {
        UpstreamBody {
            inner: Some(Stall::limited(inner, stall)),
            sender: None,
            in_flight,
            closing: Some(closing),
            bytes: 0,
            lease: Some(lease),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        }
    }

    /// Whether the call's deadline has passed; if so the backend's stream is let go.
    fn expire(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(sleep) = &mut self.deadline else {
            return false;
        };
        if sleep.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.deadline = None;
        // Dropping the backend's body resets its stream (CANCEL).
        self.inner = None;
        self.lease = None;
        true
    }

    fn close(&mut self) {
        if let Some(c) = self.closing.take() {
            c.close(self.bytes);
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
        if this.expire(cx) {
            this.close();
            return Poll::Ready(Some(Ok(Frame::trailers(deadline_trailers()))));
        }
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                this.release();
                this.close();
            }
            Poll::Ready(Some(Err(_))) => {
                this.sender = None;
                this.close();
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            None => true,
            Some(inner) => self.deadline.is_none() && inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// The trailers of a gRPC call the router ended at its deadline.
pub fn deadline_trailers() -> http::HeaderMap {
    let mut t = http::HeaderMap::with_capacity(2);
    t.insert("grpc-status", http::HeaderValue::from_static("4"));
    t.insert(
        "grpc-message",
        http::HeaderValue::from_static("deadline%20exceeded%20at%20the%20router"),
    );
    t
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Bodies known to be empty (HEAD, 204, 304) may never be polled.
        if self.inner.as_ref().is_some_and(Body::is_end_stream) {
            self.release();
        }
        // A body dropped before its end (the client reset the stream) closes too.
        self.close();
    }
}

/// What the proxy answers with: the backend's body, or a local answer's (short, or another
/// service's streamed through).
pub type ProxyBody = http_body_util::Either<
    http_body_util::Either<UpstreamBody, super::direct::DirectBody>,
    http_body_util::Either<Full<Bytes>, crate::proxy::answer::StreamBody>,
>;
