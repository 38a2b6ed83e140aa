//! HTTP/1 clients to HTTP/2 backends (`router.proto=h2c`/`h2`): the fast path's rewritten
//! head becomes an HTTP/2 request on the instance's pool ([`crate::proxy::h2up`]); the
//! request body, de-chunked, streams into it through a small channel as it is read; the
//! response is written back as HTTP/1.1: its `Content-Length` kept, else chunked (the
//! backend's trailers in the last chunk), or delimited by close for an HTTP/1.0 client;
//! no body after HEAD, 1xx, 204 or 304. Upgrades cannot cross to HTTP/2 and are refused.

use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::framing::{Framing, FramingError};
use super::head::{field, slots};
use super::relay::{write_pair, Tally};
use super::response::write_status;
use super::{ClientIo, Conn, Exchange, BODY_BUF};
use crate::access_log::push_u64;
use crate::proxy::answer::LocalAnswer;
use crate::proxy::error::{Error, ErrorType};
use crate::proxy::fields::{classify, response_fate, Fate};
use crate::proxy::h2::fields::rewrite_response;
use crate::proxy::h2up;
use crate::upstream::{BoxError, H2Body};

/// Request body frames waiting for the backend's stream: a little read-ahead, no more.
const UPLOAD_QUEUE: usize = 2;

/// What the connection's task hands the backend's stream.
enum Piece {
    /// Payload bytes.
    Data(Bytes),
    /// The body reached its end as framed.
    End,
}

/// The request body as the backend's HTTP/2 stream reads it: the pieces the connection's
/// task reads from the client. A channel closed before [`Piece::End`] (the client's body
/// broke, or the exchange was dropped) fails the body, which resets the stream: a
/// truncated body never looks complete.
struct Upload(mpsc::Receiver<Piece>);

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let rx = &mut self.get_mut().0;
        Poll::Ready(match std::task::ready!(rx.poll_recv(cx)) {
            Some(Piece::Data(d)) => Some(Ok(Frame::data(d))),
            Some(Piece::End) => {
                rx.close();
                None
            }
            None => Some(Err("request body cut off".into())),
        })
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Why the client's body did not reach its end.
#[derive(Debug, thiserror::Error)]
enum UploadError {
    #[error("malformed request body")]
    Framing(#[from] FramingError),
    #[error("request body: {0}")]
    Io(#[from] std::io::Error),
    #[error("request body stalled")]
    Stalled,
    #[error("client closed during the request body")]
    Closed,
}

/// Reads the client's body (the bytes already in `cbuf[*cpos..]` first), de-chunked, into
/// `tx` until its framing says it ended; each read within `stall`. Counts payload bytes.
async fn upload<R: AsyncRead + Unpin>(
    client: &mut R,
    cbuf: &mut Vec<u8>,
    cpos: &mut usize,
    mut body: Framing,
    tx: mpsc::Sender<Piece>,
    stall: Duration,
    bytes_in: &mut u64,
) -> Result<(), UploadError> {
    loop {
        let mut data = Vec::new();
        let n = body.advance_payload(&cbuf[*cpos..], &mut data)?;
        *cpos += n;
        if !data.is_empty() {
            *bytes_in += data.len() as u64;
            // The backend's stream gone: the response says why; stop reading.
            if tx.send(Piece::Data(Bytes::from(data))).await.is_err() {
                return Ok(());
            }
        }
        if body.is_done() {
            let _ = tx.send(Piece::End).await;
            return Ok(());
        }
        cbuf.clear();
        *cpos = 0;
        cbuf.reserve(BODY_BUF);
        match tokio::time::timeout(stall, client.read_buf(cbuf)).await {
            Err(_) => return Err(UploadError::Stalled),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(0)) => return Err(UploadError::Closed),
            Ok(Ok(_)) => {}
        }
    }
}

/// The backend's head (written by the field rules into `head`) as an HTTP/2 request, and
/// whether it asked for `100-continue`.
fn request_from_head(head: &[u8], body: H2Body) -> Result<(Request<H2Body>, bool), Error> {
    let mut slots = slots();
    let mut req = httparse::Request::new(&mut []);
    let bad = || Error::new(ErrorType::BadTarget);
    match req.parse_with_uninit_headers(head, &mut slots) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(bad()),
    }
    let method = Method::from_bytes(req.method.unwrap_or("GET").as_bytes()).map_err(|_| bad())?;
    let mut r = Request::builder()
        .method(method)
        .uri(req.path.unwrap_or("/"))
        .body(body)
        .map_err(|_| bad())?;
    let headers = r.headers_mut();
    let mut expects = false;
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Err(bad());
        };
        let continue_ = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        expects |= name == header::EXPECT && continue_;
        // HTTP/2 frames the body itself and has no connection-specific fields; the router
        // answers `Expect: 100-continue` itself (hyper's client does not pass 1xx on).
        if !matches!(
            name,
            header::TRANSFER_ENCODING | header::CONNECTION | header::UPGRADE | header::EXPECT
        ) {
            headers.append(name, value);
        }
    }
    Ok((r, expects))
}

/// How the response body goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// As it comes, its length given.
    Length,
    /// In chunks.
    Chunked,
    /// As it comes, ended by closing (an HTTP/1.0 client, no length).
    UntilClose,
}

/// Writes the client's head for `response`; how its body goes, and whether the client
/// connection stays open.
fn write_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    ex: &Exchange,
    closing: bool,
) -> (Out, bool) {
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let bodiless = ex.head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let how = match (bodiless, length) {
        (true, _) => Out::None,
        (false, Some(_)) => Out::Length,
        (false, None) if ex.http10 => Out::UntilClose,
        (false, None) => Out::Chunked,
    };
    let keep = ex.keep_alive && !closing && how != Out::UntilClose;
    out.extend_from_slice(if ex.http10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    write_status(out, status.as_u16());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if response_fate(classify(name.as_str()), false) == Fate::Keep {
            field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    // A HEAD or 304 answer's length describes the body it would have had.
    if let Some(n) = length.filter(|_| how == Out::Length || ex.head_request || status == 304) {
        out.extend_from_slice(b"Content-Length: ");
        push_u64(out, n);
        out.extend_from_slice(b"\r\n");
    }
    if how == Out::Chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    field(out, b"X-Request-Id", ex.request_id.as_bytes());
    if !keep {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if ex.http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (how, keep)
}

/// Relays the response body in `how` form, each frame within `stall`; the payload bytes.
async fn relay_body<W: AsyncWrite + Unpin>(
    client: &mut W,
    mut body: Incoming,
    how: Out,
    stall: Duration,
    scratch: &mut Vec<u8>,
) -> Result<u64, Error> {
    let cut = |e: &dyn std::fmt::Display| Error::new(ErrorType::Aborted).because(e);
    let mut sent = 0u64;
    if how == Out::None {
        return Ok(0);
    }
    let mut trailers = None;
    loop {
        let frame = match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => return Err(cut(&"response body stalled")),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(cut(&e)),
            Ok(Some(Ok(f))) => f,
        };
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(f) => {
                trailers = f.into_trailers().ok();
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        scratch.clear();
        if how == Out::Chunked {
            scratch.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        let write = async {
            write_pair(client, scratch, &data).await?;
            if how == Out::Chunked {
                client.write_all(b"\r\n").await?;
            }
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(stall, write).await {
            Ok(Ok(())) => sent += data.len() as u64,
            Ok(Err(e)) => return Err(cut(&e)),
            Err(_) => return Err(cut(&"client stalled")),
        }
    }
    if how == Out::Chunked {
        scratch.clear();
        scratch.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            field(scratch, name.as_str().as_bytes(), value.as_bytes());
        }
        scratch.extend_from_slice(b"\r\n");
        match tokio::time::timeout(stall, client.write_all(scratch)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(cut(&e)),
            Err(_) => return Err(cut(&"client stalled")),
        }
    }
    Ok(sent)
}

impl<S: ClientIo> Conn<'_, S> {
    /// Sends a request routed to an HTTP/2 service and relays its answer; false when the
    /// client connection must close.
    pub(super) async fn bridge(&mut self, ex: Exchange) -> bool {
        if ex.upgrade {
            let answer = LocalAnswer::text(
                StatusCode::NOT_IMPLEMENTED,
                "upgrades to an HTTP/2 backend are not supported\n",
            );
            return self.answer_local_as(answer, &ex, true).await;
        }
        let core = self.core;
        let stall = core.rules().response_timeout;
        let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
        let body: H2Body = if ex.body.is_done() {
            Empty::new().map_err(|never| match never {}).boxed_unsync()
        } else {
            Upload(rx).boxed_unsync()
        };
        let prepared = request_from_head(&self.wbuf, body).and_then(|(mut r, expects)| {
            h2up::to_h2(&mut r, ex.routed.service.proto).map(|()| (r, expects))
        });
        let (req, expects) = match prepared {
            Ok(r) => r,
            Err(e) => return self.answer_local_as(e.answer(), &ex, true).await,
        };
        if expects && !ex.body.is_done() && !ex.http10 {
            let ok = tokio::time::timeout(
                stall,
                self.client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n"),
            )
            .await;
            if !matches!(ok, Ok(Ok(()))) {
                return false;
            }
        }
        let mut attempts = core.attempts(&ex.routed, ex.replayable);
        let deadline = attempts.deadline();
        let closing = self.closing();
        let mut tally = Tally::default();
        let mut bytes_in = 0u64;
        let mut who = (Box::<str>::default(), 0u32);
        let mut keep = false;
        // Whether the response head went out: until then a broken body gets a 400.
        let head_out = std::sync::atomic::AtomicBool::new(false);
        let (result, uploaded) = {
            let (mut cr, mut cw) = self.client.halves();
            let mut upload = pin!(upload(
                &mut cr,
                &mut self.cbuf,
                &mut self.cpos,
                ex.body,
                tx,
                stall,
                &mut bytes_in,
            ));
            let wbuf = &mut self.wbuf;
            let attempts = &mut attempts;
            let tally = &mut tally;
            let who = &mut who;
            let keep = &mut keep;
            let ex = &ex;
            let head_out = &head_out;
            let mut respond = pin!(async move {
                let a = h2up::send(core.h2_backends(), attempts, req, deadline).await;
                who.1 = attempts.retries();
                let a = a?;
                who.0 = a.instance.clone();
                tally.upstream = Some(ex.routed.start.elapsed());
                let (mut parts, body) = a.response.into_parts();
                rewrite_response(&mut parts.headers);
                if let Some(name) = core.load_header_name() {
                    if let Some(value) = parts.headers.remove(name) {
                        core.load_header(&a.in_flight.state().load)
                            .report(value.as_bytes());
                    }
                }
                tally.status = parts.status.as_u16();
                head_out.store(true, std::sync::atomic::Ordering::Relaxed);
                wbuf.clear();
                let (how, k) = write_head(wbuf, parts.status, &parts.headers, ex, closing);
                *keep = k;
                let head = std::mem::take(wbuf);
                match tokio::time::timeout(stall, cw.write_all(&head)).await {
                    Ok(Ok(())) => {}
                    _ => return Err(Error::new(ErrorType::Aborted)),
                }
                *wbuf = head;
                tally.bytes_out = relay_body(&mut cw, body, how, stall, wbuf).await?;
                let _ = cw.flush().await;
                drop(a.lease);
                Ok::<(), Error>(())
            });
            let mut uploaded = ex.body.is_done();
            let r = loop {
                tokio::select! {
                    biased;
                    r = &mut respond => break r,
                    u = &mut upload, if !uploaded => match u {
                        Ok(()) => uploaded = true,
                        Err(e) => {
                            tracing::debug!(peer = %self.info.peer, error = %e, "request body broke off");
                            // The channel closed without its end: the stream is reset.
                            break Err(match e {
                                UploadError::Framing(_) if !head_out.load(std::sync::atomic::Ordering::Relaxed) => Error::new(ErrorType::BadBody),
                                _ => Error::new(ErrorType::Aborted),
                            });
                        }
                    },
                }
            };
            (r, uploaded)
        };
        let instance = &*who.0;
        match result {
            Ok(()) => {
                self.finish(&ex, &tally, (instance, who.1), bytes_in);
                self.idle_since = std::time::Instant::now();
                if !uploaded {
                    self.linger().await;
                    return false;
                }
                keep && !self.closing()
            }
            Err(e) if e.kind == ErrorType::Aborted || tally.status != 0 => {
                tally.status = if tally.status == 0 { 499 } else { tally.status };
                self.finish(&ex, &tally, (instance, who.1), bytes_in);
                false
            }
            Err(e) => {
                tracing::debug!(service = %ex.routed.service.name, error = %e, "no backend answer");
                let close = !ex.keep_alive || !uploaded;
                self.answer_local_as(e.answer(), &ex, close).await
            }
        }
    }
}
