//! The HTTP/1 fast path: one task per client connection reads a request head, routes it,
//! writes the rewritten head to a pooled backend connection and relays both bodies
//! verbatim, all in that task. There is no header map, no second task per backend
//! connection and no channel between the two sides: a small request costs one read and one
//! write on each socket. Connections that open with the HTTP/2 preface are handed back for
//! hyper to serve.

pub mod framing;
pub mod head;
mod relay;
mod timer;

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use framing::Framing;
use head::{parse_request, slots, write_local, Forwarding, HeadError, PeerText};

use relay::{respond, upload, write_pair, End, Tally, UploadError};
use timer::Timer;

use super::core::{ClientConn, Failed, Finished, LogFields, Next, Protocol, Refused, RequestId};
use super::{Proxy, ProxyError};
use crate::balance::Exclude;
use crate::routing::Service;
use crate::upstream::{connect_tcp, BackendConn, ErrorKind, InFlight};

/// Client read buffer to start with; it grows for larger heads, up to [`head::MAX_HEAD`].
const CLIENT_BUF: usize = 4 * 1024;
/// Backend read buffer to start with; it grows once to [`BODY_BUF`] for a body that does
/// not arrive with its head.
const BACKEND_BUF: usize = 8 * 1024;
/// Read size for large bodies.
const BODY_BUF: usize = 64 * 1024;
/// After a local answer that closes the connection, how long unread request bytes are
/// drained so the client sees the answer instead of a reset.
const LINGER: Duration = Duration::from_secs(1);

/// The HTTP/2 client preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How a client connection left the fast path.
#[derive(Debug)]
pub enum Ended {
    /// Closed (or to be dropped).
    Closed,
    /// It spoke the HTTP/2 preface: the stream and the bytes already read from it.
    Http2(TcpStream, Vec<u8>),
}

/// What one request needs once its head has been read and rewritten.
struct Exchange {
    service: Arc<Service>,
    key: u64,
    body: Framing,
    keep_alive: bool,
    upgrade: bool,
    head_request: bool,
    replayable: bool,
    http10: bool,
    /// When the head was complete.
    start: std::time::Instant,
    /// The request's ID, sent to the backend and back to the client.
    request_id: RequestId,
}

/// The outcome of reading one complete request head.
enum Step {
    /// Answer locally, then close if told to; the head's `len` is consumed first.
    Local {
        refused: Refused,
        close: bool,
        len: usize,
        request_id: RequestId,
    },
    /// A bad head.
    Bad(HeadError),
    /// Forward it; the backend head is in the write buffer.
    Forward(Exchange),
    /// The HTTP/2 preface.
    Http2,
}

/// Why one attempt on a backend connection did not produce a complete exchange.
enum Failure {
    /// Nothing usable came back and the request may go to another connection.
    /// (`unsent`: the request did not get through whole, so no backend acted on it.)
    Retry { error: ProxyError, unsent: bool },
    /// Nothing was sent to the client yet: answer with this error.
    Answer(ProxyError),
    /// The client's side broke, or the response broke after its head was sent.
    Abort,
}

/// Per-connection state: buffers reused by every request on the connection.
struct Conn<'p> {
    proxy: &'p Proxy,
    client: TcpStream,
    info: ClientConn,
    /// The access log's copy of the current request's fields (only when it is on).
    log: LogFields,
    /// Bytes read from the client; `cbuf[cpos..]` are not consumed yet.
    cbuf: Vec<u8>,
    cpos: usize,
    /// Bytes read from the backend.
    bbuf: Vec<u8>,
    /// Heads being written (the backend's, then the client's).
    wbuf: Vec<u8>,
    timer: Timer,
    shutdown: watch::Receiver<bool>,
    /// When the connection last went idle (the last response ended). Clock readings are
    /// shared like this so that a request reads the clock twice, not five times.
    idle_since: std::time::Instant,
}

impl Proxy {
    /// Serves one client connection on the HTTP/1 fast path until it closes, or hands it
    /// back if it opens with the HTTP/2 preface.
    pub async fn serve_h1(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) -> Ended {
        let mut conn = Conn {
            proxy: self,
            client,
            info: ClientConn::new(self, peer),
            log: LogFields::default(),
            cbuf: Vec::with_capacity(CLIENT_BUF),
            cpos: 0,
            bbuf: Vec::new(),
            wbuf: Vec::with_capacity(1024),
            timer: Timer::new(),
            shutdown,
            idle_since: std::time::Instant::now(),
        };
        match conn.run().await {
            Some(preface) => Ended::Http2(conn.client, preface),
            None => Ended::Closed,
        }
    }
}

impl Conn<'_> {
    /// The request loop; returns the bytes read so far if the client speaks HTTP/2.
    async fn run(&mut self) -> Option<Vec<u8>> {
        let mut first = true;
        loop {
            // The whole head, and the idle time before it, must fit in the header timeout.
            let mut deadline = None;
            let step = loop {
                self.wbuf.clear();
                if let Some(step) = self.prepare(first) {
                    break step;
                }
                let due = *deadline.get_or_insert_with(|| {
                    Instant::from_std(self.idle_since) + self.proxy.header_timeout
                });
                if !self.read_head_bytes(due).await {
                    return None;
                }
            };
            first = false;
            let keep = match step {
                Step::Http2 => return Some(std::mem::take(&mut self.cbuf)),
                Step::Bad(e) => {
                    tracing::debug!(peer = %self.info.peer, error = %e, "bad request head");
                    let start = std::time::Instant::now();
                    let keep = self
                        .answer_raw(e.status(), short_text(e.status()), true, None)
                        .await;
                    if self.proxy.logs() {
                        self.log.fill(self.info.peer_ip, Protocol::Http11, [b""; 5]);
                    }
                    let done = Finished {
                        status: e.status().as_u16(),
                        start: Some(start),
                        bytes_out: short_text(e.status()).len() as u64,
                        ..Finished::default()
                    };
                    self.proxy
                        .finish(&done, self.proxy.logs().then_some(&self.log));
                    keep
                }
                Step::Local {
                    refused,
                    close,
                    len,
                    request_id,
                } => {
                    self.cpos += len;
                    let start = std::time::Instant::now();
                    self.answer_error(
                        refused.error,
                        refused.service.as_deref(),
                        close,
                        start,
                        &request_id,
                    )
                    .await
                }
                // Sets `idle_since` itself, with the clock reading it pools the backend with.
                Step::Forward(ex) => self.forward(ex).await,
            };
            if !keep {
                return None;
            }
        }
    }

    /// Whether shutdown has begun. The flag only ever turns true, so any change means it
    /// has; unlike `borrow()` this takes no lock.
    fn closing(&self) -> bool {
        !matches!(self.shutdown.has_changed(), Ok(false))
    }

    /// Parses the next head in the client buffer and, when complete, routes it and writes
    /// the backend's head into `wbuf`. `None` until the head is complete.
    fn prepare(&mut self, first: bool) -> Option<Step> {
        let buf = &self.cbuf[self.cpos..];
        if first && buf.len() >= 4 && buf.starts_with(b"PRI ") {
            if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
                return None;
            }
            if buf.starts_with(H2_PREFACE) {
                return Some(Step::Http2);
            }
        }
        let mut slots = slots();
        let head = match parse_request(buf, &mut slots) {
            Ok(Some(h)) => h,
            Ok(None) => return None,
            Err(e) => return Some(Step::Bad(e)),
        };
        // Body bytes that came with the head are checked before anything is routed, so a
        // malformed chunk never costs a backend connection.
        if head.body.is_chunked() {
            let mut probe = head.body;
            if probe.advance(&buf[head.len..]).is_err() {
                return Some(Step::Bad(HeadError::BadFraming));
            }
        }
        let proxy = self.proxy;
        if proxy.logs() {
            let protocol = if head.http10 {
                Protocol::Http10
            } else {
                Protocol::Http11
            };
            let parts = [
                head.method.as_bytes(),
                head.target.as_bytes(),
                head.host.unwrap_or(b""),
                head.field("referer").unwrap_or(b""),
                head.field("user-agent").unwrap_or(b""),
            ];
            self.log.fill(self.info.peer_ip, protocol, parts);
        }
        let has_body = !head.body.is_done();
        let request_id = match head.request_id().filter(|_| self.info.trusted) {
            Some(v) => RequestId::from_peer(v),
            None => None,
        }
        .unwrap_or_else(|| self.info.next_request_id(proxy.salt));
        let routed = proxy.route(
            &self.info,
            head.method,
            head.host,
            head.hash_path(true),
            head.forwarded_for(),
        );
        let routed = match routed {
            Ok(r) => r,
            Err(refused) => {
                // A local answer consumes the head; with a body left unread, or a client
                // that asked to close, the connection closes after it. Whatever follows a
                // CONNECT head is tunnel bytes, not a request: close. A bad Host makes a
                // malformed message: close, as for any 400.
                let close = has_body
                    || !head.keep_alive
                    || matches!(
                        refused.error,
                        ProxyError::Connect405 | ProxyError::BadHost(_)
                    );
                return Some(Step::Local {
                    refused,
                    close,
                    len: head.len,
                    request_id,
                });
            }
        };
        self.log.client = routed.client;
        let client_text;
        let client = if routed.client == self.info.peer_ip {
            &self.info.peer_text
        } else {
            client_text = PeerText::new(routed.client);
            &client_text
        };
        let fwd = Forwarding {
            peer: &self.info.peer_text,
            trusted: self.info.trusted,
            client,
            drop_underscores: proxy.drop_underscores,
            request_id: request_id.as_bytes(),
        };
        head.write_backend(&mut self.wbuf, &fwd);
        let ex = Exchange {
            service: routed.service,
            key: routed.key,
            body: head.body,
            keep_alive: head.keep_alive,
            upgrade: head.upgrade,
            head_request: head.is_head(),
            replayable: !has_body && head.is_idempotent(),
            http10: head.http10,
            start: routed.start,
            request_id,
        };
        self.cpos += head.len;
        Some(Step::Forward(ex))
    }

    /// Reads more of a request head, due by `deadline`; false when the connection should
    /// just close (EOF, error, timeout, or shutdown while idle).
    async fn read_head_bytes(&mut self, deadline: Instant) -> bool {
        if self.cpos == self.cbuf.len() {
            self.cbuf.clear();
            self.cpos = 0;
        } else if self.cpos > 0 {
            self.cbuf.drain(..self.cpos);
            self.cpos = 0;
        }
        if self.cbuf.capacity() - self.cbuf.len() < 1024 {
            self.cbuf.reserve(CLIENT_BUF);
        }
        let idle = self.cbuf.is_empty();
        if idle && self.closing() {
            return false;
        }
        let read = self.client.read_buf(&mut self.cbuf);
        let stop = async {
            if idle {
                let _ = self.shutdown.wait_for(|s| *s).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let raced = async {
            tokio::select! {
                r = read => Some(r),
                _ = stop => None,
            }
        };
        match self.timer.before(deadline, raced).await {
            Some(Some(Ok(n))) => n > 0,
            _ => false,
        }
    }

    /// Writes a local answer; false when the connection closes after it.
    async fn answer_raw(
        &mut self,
        status: StatusCode,
        text: &str,
        close: bool,
        request_id: Option<&RequestId>,
    ) -> bool {
        self.wbuf.clear();
        write_local(
            &mut self.wbuf,
            status,
            text,
            close,
            request_id.map(RequestId::as_bytes),
        );
        let write = self.client.write_all(&self.wbuf);
        let limit = self.proxy.header_timeout;
        if !matches!(self.timer.within(limit, write).await, Some(Ok(()))) {
            return false;
        }
        self.idle_since = std::time::Instant::now();
        if close {
            self.linger().await;
            return false;
        }
        true
    }

    /// Half-closes and drains what the client still sends, briefly, so that closing with
    /// unread bytes does not reset the connection before the client has read our answer.
    async fn linger(&mut self) {
        let _ = self.client.shutdown().await;
        let mut sink = [0u8; 4096];
        let drain = async {
            let mut total = 0usize;
            while let Ok(n) = self.client.read(&mut sink).await {
                total += n;
                if n == 0 || total > 1 << 20 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    /// Sends one request to the service and relays the answer; false when the client
    /// connection must close.
    async fn forward(&mut self, ex: Exchange) -> bool {
        let proxy = self.proxy;
        let up = &proxy.upstream;
        let mut exclude = Exclude::default();
        let mut last = ProxyError::NoHealthyInstance;
        let mut tries = 0;
        'instances: while let Some((pos, inst)) = ex.service.pick(ex.key, exclude) {
            exclude.add(pos);
            let in_flight = InFlight::new(inst.state.clone());
            // A pooled connection first. One the backend closed as we took it gets one fresh
            // retry on the same instance when the request can be replayed.
            let mut pooled = inst.state.idle.take(up.idle_timeout, ex.start);
            loop {
                tries += 1;
                let reused = pooled.is_some();
                let attempt = match pooled.take() {
                    Some(b) => Ok(b),
                    None => connect_tcp(inst.socket, &inst.address, inst.port, up.connect_timeout)
                        .await
                        .map(|stream| BackendConn { stream })
                        .map_err(ProxyError::from),
                };
                let (error, unsent) = match attempt {
                    Ok(backend) => match self
                        .exchange(&ex, backend, &in_flight, reused, (&inst.id, tries - 1))
                        .await
                    {
                        Ok(keep) => return keep,
                        Err(Failure::Abort) => return false,
                        Err(Failure::Answer(e)) => {
                            if let Some(kind) = e.upstream_kind() {
                                ex.service.stats.metrics.get().upstream_error(kind);
                            }
                            return self.fail(&ex, e).await;
                        }
                        Err(Failure::Retry { error, unsent }) => (error, unsent),
                    },
                    Err(e) => (e, true),
                };
                tracing::debug!(service = %ex.service.name, instance = %inst.id, error = %error, reused, "attempt failed");
                let kind = error.upstream_kind().unwrap_or(ErrorKind::Reset);
                let failed = Failed {
                    kind,
                    reused,
                    unsent,
                    replayable: ex.replayable,
                    tries,
                };
                last = error;
                match proxy.after_failure(&ex.service, failed) {
                    Next::FreshConnection => continue,
                    Next::OtherInstance => continue 'instances,
                    Next::Answer => break 'instances,
                }
            }
        }
        self.fail(&ex, last).await
    }

    /// Answers a request that no backend answered.
    async fn fail(&mut self, ex: &Exchange, e: ProxyError) -> bool {
        tracing::debug!(service = %ex.service.name, error = %e, "no backend answer");
        let close = !ex.keep_alive || !ex.body.is_done();
        self.answer_error(e, Some(&ex.service), close, ex.start, &ex.request_id)
            .await
    }

    /// Answers `error` locally and closes the request for `service`; closes the connection
    /// after it when told to or when shutting down. False when the connection closes.
    async fn answer_error(
        &mut self,
        error: ProxyError,
        service: Option<&Service>,
        close: bool,
        start: std::time::Instant,
        request_id: &RequestId,
    ) -> bool {
        let (status, text) = error.answer();
        let close = close || self.closing();
        let keep = self.answer_raw(status, text, close, Some(request_id)).await;
        let done = Finished {
            service,
            status: status.as_u16(),
            start: Some(start),
            bytes_out: text.len() as u64,
            request_id: request_id.as_bytes(),
            ..Finished::default()
        };
        self.proxy
            .finish(&done, self.proxy.logs().then_some(&self.log));
        keep
    }

    /// One exchange on one backend connection. `Ok(keep)` when the response was relayed.
    async fn exchange(
        &mut self,
        ex: &Exchange,
        mut backend: BackendConn,
        in_flight: &InFlight,
        reused: bool,
        (instance, retries): (&str, u32),
    ) -> Result<bool, Failure> {
        // The head and whatever body bytes are already here go out in one (vectored) write,
        // the body straight from the read buffer. The head stays in `wbuf` for a retry.
        let mut body = ex.body;
        let avail = &self.cbuf[self.cpos..];
        let n = body
            .advance(avail)
            .map_err(|_| Failure::Answer(ProxyError::BadBody))?;
        let timeout = self.proxy.upstream.response_timeout;
        let write = write_pair(&mut backend.stream, &self.wbuf, &avail[..n]);
        match self.timer.within(timeout, write).await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                return Err(Failure::Retry {
                    error: ProxyError::Upstream(e.to_string()),
                    unsent: true,
                });
            }
            None => return Err(Failure::Answer(ProxyError::ResponseTimeout)),
        }
        self.cpos += n;

        let closing = self.closing();
        let replayable = reused && ex.replayable;
        // Whether any response byte went to the client: until then a broken request body
        // can still be answered with a 400. (An atomic only so the future stays Send.)
        let sent = AtomicBool::new(false);
        let mut tally = Tally::default();
        let mut bytes_in = n as u64;
        let (result, uploaded) = if body.is_done() {
            let r = respond(
                &mut self.client,
                &mut backend.stream,
                &mut self.bbuf,
                &mut self.wbuf,
                &mut self.timer,
                timeout,
                ex,
                replayable,
                closing,
                &sent,
                &mut tally,
                self.proxy.load_header(&in_flight.state().load),
            )
            .await;
            (r, true)
        } else {
            let (mut cr, mut cw) = self.client.split();
            let (mut br, mut bw) = backend.stream.split();
            let mut upload = pin!(upload(
                &mut cr,
                &mut self.cbuf,
                &mut self.cpos,
                body,
                &mut bw,
                timeout,
                &mut bytes_in,
            ));
            let mut respond = pin!(respond(
                &mut cw,
                &mut br,
                &mut self.bbuf,
                &mut self.wbuf,
                &mut self.timer,
                timeout,
                ex,
                false,
                closing,
                &sent,
                &mut tally,
                self.proxy.load_header(&in_flight.state().load),
            ));
            let mut uploaded = false;
            let r = loop {
                tokio::select! {
                    biased;
                    r = &mut respond => break r,
                    u = &mut upload, if !uploaded => match u {
                        Ok(()) => uploaded = true,
                        Err(UploadError::Framing(_)) if !sent.load(Ordering::Relaxed) => {
                            tracing::debug!(peer = %self.info.peer, "malformed request body");
                            break Err(Failure::Answer(ProxyError::BadBody));
                        }
                        Err(e) => {
                            tracing::debug!(peer = %self.info.peer, error = %e, "request body broke off");
                            break Err(Failure::Abort);
                        }
                    },
                }
            };
            (r, uploaded)
        };
        let relayed = match result {
            Ok(r) => r,
            Err(Failure::Abort) => {
                // Cut off: the status that went out, or 499 (as nginx) if none did.
                let status = if tally.status == 0 { 499 } else { tally.status };
                tally.status = status;
                self.finish(ex, &tally, (instance, retries), bytes_in);
                return Err(Failure::Abort);
            }
            Err(e) => return Err(e),
        };
        self.finish(ex, &tally, (instance, retries), bytes_in);
        match relayed.end {
            End::Upgraded(leftover) => {
                self.tunnel(backend, leftover).await;
                Ok(false)
            }
            End::Complete { backend_reusable } => {
                let now = std::time::Instant::now();
                self.idle_since = now;
                if backend_reusable && uploaded && !ex.http10 {
                    in_flight.state().idle.put(backend, now);
                }
                if !uploaded {
                    // The answer came before the whole body: drain a little of what is left
                    // so closing does not reset the connection under the client's answer.
                    self.linger().await;
                    return Ok(false);
                }
                Ok(relayed.keep_client && !self.closing())
            }
        }
    }

    /// Closes a relayed request in the core.
    fn finish(
        &self,
        ex: &Exchange,
        tally: &Tally,
        (instance, retries): (&str, u32),
        bytes_in: u64,
    ) {
        self.proxy.finish(
            &Finished {
                service: Some(&ex.service),
                instance,
                status: tally.status,
                start: Some(ex.start),
                upstream: tally.upstream,
                retries,
                bytes_in,
                bytes_out: tally.bytes_out,
                request_id: ex.request_id.as_bytes(),
            },
            self.proxy.logs().then_some(&self.log),
        );
    }

    /// Joins client and backend after a 101 until either side closes.
    async fn tunnel(&mut self, mut backend: BackendConn, leftover: Vec<u8>) {
        let pending = &self.cbuf[self.cpos..];
        if !pending.is_empty() && backend.stream.write_all(pending).await.is_err() {
            return;
        }
        self.cbuf.clear();
        self.cpos = 0;
        if !leftover.is_empty() && self.client.write_all(&leftover).await.is_err() {
            return;
        }
        let gauge = &self.proxy.upgraded;
        gauge.increment(1.0);
        if let Err(e) = tokio::io::copy_bidirectional(&mut self.client, &mut backend.stream).await {
            tracing::debug!(error = %e, "upgraded connection ended with error");
        }
        gauge.decrement(1.0);
    }
}

/// Body text for a refused head.
fn short_text(status: StatusCode) -> &'static str {
    match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "request header too large\n",
        StatusCode::NOT_IMPLEMENTED => "unsupported transfer coding\n",
        _ => "bad request\n",
    }
}
