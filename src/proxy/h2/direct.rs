//! The HTTP/2 path's exchange for a request without a body (most of them: GET, HEAD),
//! driven inside the stream's own task with the fast path's pieces: its pooled backend
//! sockets, the request head written as bytes, the response head parsed in place
//! (`h1::response`), the body followed by `h1::framing`. hyper's HTTP/1 client would add a
//! task per backend connection, a channel each way and three task wake-ups per request.
//! Requests with a body still go through it (`client.rs`): their upload must run beside
//! the response.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::Request;
use tokio::io::AsyncWriteExt;
use tokio::time::Sleep;

use super::body::Closing;
use crate::proxy::attempts::{connect_backend, Attempts};
use crate::proxy::core::{Core, LoadHeader};
use crate::proxy::error::Error;
use crate::proxy::h1::framing::Framing;
use crate::proxy::h1::head::slots;
use crate::proxy::h1::response::parse_response;
use crate::upstream::{BackendConn, BoxError, ErrorKind, InFlight, Stalled};

/// Room for a response head and what comes with it.
const HEAD_BUF: usize = 8 * 1024;
/// Read size for a body that did not come with its head.
const BODY_BUF: usize = 64 * 1024;

/// Writes the backend's head for `req` (already rewritten for the backend) into `out`.
pub fn write_head(req: &Request<Incoming>, out: &mut Vec<u8>) {
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A backend's answer: its status, the client's fields, and the body to stream.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The fields for the client.
    pub headers: HeaderMap,
    /// The body, still on the backend's socket.
    pub body: DirectBody,
    /// The instance's Consul ID.
    pub instance: Box<str>,
}

/// Sends `head` by `attempts` and reads the response head: an idle connection first, then
/// a fresh one, another instance when the rule says so; all under the attempts' deadline.
/// The load header's value goes to the instance that answers (`core`'s setting).
pub async fn send(
    core: &Core,
    attempts: &mut Attempts<'_>,
    head: &[u8],
    head_request: bool,
) -> Result<Answer, Error> {
    while let Some(t) = attempts.next_try(|inst| &inst.state.idle) {
        let reused = t.conn.is_some();
        let conn = match t.conn {
            Some(c) => c,
            None => match connect_backend(t.inst, attempts.rules().connect_timeout).await {
                Ok(c) => c,
                Err(e) => {
                    attempts.try_failed(e, false);
                    continue;
                }
            },
        };
        let in_flight = InFlight::new(t.inst.state.clone());
        let load = core.load_header(&in_flight.state().load);
        let due = tokio::time::Instant::from_std(attempts.deadline());
        let result = tokio::time::timeout_at(due, exchange(conn, head, head_request, load)).await;
        match result.unwrap_or_else(|_| Err(Error::upstream(ErrorKind::ResponseTimeout))) {
            Ok((status, headers, mut body)) => {
                attempts.answered(status.as_u16());
                body.in_flight = Some(in_flight);
                body.stall = attempts.rules().response_timeout;
                return Ok(Answer {
                    status,
                    headers,
                    body,
                    instance: t.inst.id.clone(),
                });
            }
            Err(e) => attempts.try_failed(e, reused),
        }
    }
    Err(attempts.last_error())
}

/// One exchange on one connection, to the end of the response head.
async fn exchange(
    mut conn: BackendConn,
    head: &[u8],
    head_request: bool,
    load: LoadHeader<'_>,
) -> Result<(StatusCode, HeaderMap, DirectBody), Error> {
    if let Err(e) = conn.stream.write_all(head).await {
        return Err(Error::upstream(ErrorKind::Reset).because(e).unsent());
    }
    let mut buf = BytesMut::with_capacity(HEAD_BUF);
    loop {
        // A connection that breaks before any response byte is a reset (a kept-alive one
        // may get a replay); one that breaks mid-head sent a bad response.
        let kind = if buf.is_empty() {
            ErrorKind::Reset
        } else {
            ErrorKind::BadResponse
        };
        match tokio::io::AsyncReadExt::read_buf(&mut conn.stream, &mut buf).await {
            Ok(0) => return Err(Error::upstream(kind).because("connection closed before response")),
            Err(e) => return Err(Error::upstream(kind).because(e)),
            Ok(_) => {}
        }
        let mut slots = slots();
        let parsed = match parse_response(&buf, &mut slots, head_request) {
            Ok(Some(h)) => h,
            Ok(None) => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(HEAD_BUF);
                }
                continue;
            }
            Err(e) => return Err(Error::upstream(ErrorKind::BadResponse).because(e)),
        };
        if (100..200).contains(&parsed.status) {
            if parsed.status == 101 {
                // Nothing on HTTP/2 asked for an upgrade.
                return Err(Error::upstream(ErrorKind::BadResponse).because("unexpected 101"));
            }
            // Interim answers are not relayed on this path; the real one follows.
            let len = parsed.len;
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(parsed.status)
            .map_err(|e| Error::upstream(ErrorKind::BadResponse).because(e))?;
        let mut headers = HeaderMap::new();
        if let Some(value) = parsed.to_header_map(&mut headers, load.name) {
            load.report(value);
        }
        let (len, framing, keep_alive) = (parsed.len, parsed.body, parsed.keep_alive);
        buf.advance(len);
        let body = DirectBody {
            conn: Some(conn),
            buf,
            framing,
            keep_alive,
            leftover: false,
            in_flight: None,
            stall: Duration::ZERO,
            sleep: None,
            closing: None,
            bytes: 0,
        };
        return Ok((status, headers, body));
    }
}

/// A response body read from the backend's socket as the client's stream asks for it: the
/// payload of each read as a frame (de-chunked), checked against its framing. When it ends
/// cleanly its connection goes back to the instance's pool; a body that breaks or stalls
/// for `stall` fails the client's stream.
#[derive(Debug)]
pub struct DirectBody {
    conn: Option<BackendConn>,
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
    /// Bytes came after the body's end: the connection cannot be reused.
    leftover: bool,
    in_flight: Option<InFlight>,
    stall: Duration,
    /// Made at the first wait for the backend, then moved.
    sleep: Option<Pin<Box<Sleep>>>,
    closing: Option<Box<Closing>>,
    bytes: u64,
}

impl DirectBody {
    /// Closes the request in the core when the body ends (or is dropped).
    pub fn closing(mut self, closing: Box<Closing>) -> Self {
        self.closing = Some(closing);
        self
    }

    fn close(&mut self) {
        if let Some(c) = self.closing.take() {
            c.close(self.bytes);
        }
    }

    /// The body ended: pool the connection if it can serve another request.
    fn end(&mut self) {
        if let (Some(conn), Some(in_flight)) = (self.conn.take(), &self.in_flight) {
            if self.keep_alive && !self.leftover && self.buf.is_empty() {
                in_flight.state().idle.put(conn, Instant::now());
            }
        }
        self.close();
    }

    /// The next payload from what is buffered, if any.
    fn take_payload(&mut self) -> Result<Option<Bytes>, BoxError> {
        if self.buf.is_empty() || self.framing.is_done() {
            return Ok(None);
        }
        let payload = if self.framing.is_chunked() {
            let mut out = Vec::with_capacity(self.buf.len());
            let n = self.framing.advance_payload(&self.buf, &mut out)?;
            self.buf.advance(n);
            Bytes::from(out)
        } else {
            let n = self.framing.advance(&self.buf)?;
            self.buf.split_to(n).freeze()
        };
        if self.framing.is_done() && !self.buf.is_empty() {
            self.leftover = true;
            self.buf.clear();
        }
        self.bytes += payload.len() as u64;
        Ok(Some(payload))
    }

    /// Reads more from the backend; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, BoxError>> {
        let Some(conn) = &self.conn else {
            return Poll::Ready(Ok(0));
        };
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(BODY_BUF);
        }
        loop {
            match conn.stream.try_read_buf(&mut self.buf) {
                Ok(n) => {
                    self.sleep = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
            match conn.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => {}
            }
            // Nothing to read: the stall timer runs from the first wait.
            let stall = self.stall;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
            ready!(sleep.as_mut().poll(cx));
            return Poll::Ready(Err(Stalled(stall).into()));
        }
    }
}

impl Body for DirectBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.take_payload() {
                Ok(Some(p)) if !p.is_empty() => return Poll::Ready(Some(Ok(Frame::data(p)))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
            }
            if this.framing.is_done() {
                this.end();
                return Poll::Ready(None);
            }
            match ready!(this.poll_fill(cx)) {
                Ok(0) if this.framing == Framing::UntilClose => {
                    this.keep_alive = false;
                    this.framing = Framing::Done;
                }
                Ok(0) => {
                    let e: BoxError = "backend closed mid-body".into();
                    return Poll::Ready(Some(Err(this.fail(e))));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl DirectBody {
    /// A failed body: its connection is closed, never pooled.
    fn fail(&mut self, e: BoxError) -> BoxError {
        self.conn = None;
        self.close();
        e
    }
}

impl Drop for DirectBody {
    fn drop(&mut self) {
        // Bodies known to be empty (HEAD, 204, 304) may never be polled.
        if self.framing.is_done() {
            self.end();
        }
        // A body dropped before its end (the client reset the stream) closes too.
        self.close();
    }
}
