//! The HTTP/1 fast path: one task per client connection reads a request head, routes it,
//! writes the rewritten head to a pooled backend connection and relays both bodies
//! verbatim, all in that task. There is no header map, no second task per backend
//! connection and no channel between the two sides: a small request costs one read and one
//! write on each socket. The connection may be plain TCP or TLS ([`ClientIo`]); the
//! listener has already read its first bytes and decided it is HTTP/1.

mod bridge;
pub mod framing;
pub mod head;
mod relay;
pub mod request;
pub mod response;
mod timer;
mod tunnel;

use std::io::Write as _;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use framing::Framing;
use head::{slots, HeadError};
use request::parse_request;
use response::write_local;

use relay::{respond, upload, write_pair, End, Tally, UploadError};
use timer::Timer;

use super::answer::{AnswerBody, LocalAnswer, StreamBody};
use super::attempts::connect_backend;
use super::auth::{self, Outcome};
use super::core::{ConnFacts, Core, Finished, LogFields, Protocol, Refused, RequestId, Routed};
use super::error::{Error, ErrorType};
use super::fields::PeerText;
use crate::routing::Service;
use crate::upstream::{BackendConn, ErrorKind, InFlight};

/// A client connection the fast path can serve: plain TCP or TLS.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// The read and write halves, for relaying a request body while the response comes.
    fn halves(
        &mut self,
    ) -> (
        impl AsyncRead + Unpin + Send + '_,
        impl AsyncWrite + Unpin + Send + '_,
    );
}

impl ClientIo for TcpStream {
    fn halves(
        &mut self,
    ) -> (
        impl AsyncRead + Unpin + Send + '_,
        impl AsyncWrite + Unpin + Send + '_,
    ) {
        // Borrowed halves: no lock, no allocation.
        self.split()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for tokio_rustls::server::TlsStream<S> {
    fn halves(
        &mut self,
    ) -> (
        impl AsyncRead + Unpin + Send + '_,
        impl AsyncWrite + Unpin + Send + '_,
    ) {
        // One TLS session cannot be split; tokio's split shares it behind a small lock,
        // taken only while a body is relayed in both directions at once.
        tokio::io::split(self)
    }
}

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
/// When a drain begins, how long an idle keep-alive connection still waits for a request.
const IDLE_CLOSE_WAIT: Duration = Duration::from_millis(250);

/// What one request needs once its head has been read and rewritten.
struct Exchange {
    routed: Routed,
    body: Framing,
    keep_alive: bool,
    upgrade: bool,
    head_request: bool,
    replayable: bool,
    http10: bool,
    /// The request's ID, sent to the backend and back to the client.
    request_id: RequestId,
    /// Forward auth's decision, once asked.
    auth: Option<Outcome>,
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
}

/// Per-connection state: buffers reused by every request on the connection.
struct Conn<'p, S> {
    core: &'p Core,
    /// `proxy.header_timeout`.
    header_timeout: Duration,
    /// Connections joined after a 101.
    upgraded: &'p metrics::Gauge,
    /// `proxy.upgrade_idle_timeout` and `proxy.shutdown_grace`, for joined connections.
    tunnel: TunnelLimits,
    client: S,
    info: ConnFacts,
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
    /// The current request is a HEAD: a local answer then has no body.
    head_request: bool,
    /// A request has been read. A connection without one is not idle but just accepted:
    /// a drain lets it send its first request (within the header timeout), so one that
    /// raced the listener's close is served, not closed unanswered.
    served: bool,
    /// When the connection last went idle (the last response ended). Clock readings are
    /// shared like this so that a request reads the clock twice, not five times.
    idle_since: std::time::Instant,
}

/// What the fast path needs besides the core: the connection-level settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// The request core.
    pub core: &'a Core,
    /// `proxy.header_timeout`.
    pub header_timeout: Duration,
    /// Counts connections joined after a 101.
    pub upgraded: &'a metrics::Gauge,
    /// How long a joined connection may stay idle and may outlive a drain's start.
    pub tunnel: TunnelLimits,
}

/// The limits of a connection joined after a 101.
#[derive(Debug, Clone, Copy)]
pub struct TunnelLimits {
    /// `proxy.upgrade_idle_timeout`: closed after this long without a byte; `None`: never.
    pub idle: Option<Duration>,
    /// `proxy.shutdown_grace`: closed this long after a drain begins.
    pub grace: Duration,
}

/// Serves one client connection on the HTTP/1 fast path until it closes. `read` holds the
/// bytes the listener already read from it.
pub async fn serve<S: ClientIo>(
    settings: Settings<'_>,
    client: S,
    read: Vec<u8>,
    info: ConnFacts,
    shutdown: watch::Receiver<bool>,
) {
    let mut cbuf = read;
    if cbuf.capacity() < CLIENT_BUF {
        cbuf.reserve(CLIENT_BUF - cbuf.len());
    }
    let mut conn = Conn {
        core: settings.core,
        header_timeout: settings.header_timeout,
        upgraded: settings.upgraded,
        tunnel: settings.tunnel,
        client,
        info,
        log: LogFields::default(),
        cbuf,
        cpos: 0,
        bbuf: Vec::new(),
        wbuf: Vec::with_capacity(1024),
        timer: Timer::new(),
        shutdown,
        head_request: false,
        served: false,
        idle_since: std::time::Instant::now(),
    };
    conn.run().await;
}

impl<S: ClientIo> Conn<'_, S> {
    /// The request loop, until the connection closes.
    async fn run(&mut self) {
        loop {
            // The whole head, and the idle time before it, must fit in the header timeout.
            let mut deadline = None;
            let step = loop {
                self.wbuf.clear();
                if let Some(step) = self.prepare() {
                    break step;
                }
                let due = *deadline.get_or_insert_with(|| {
                    Instant::from_std(self.idle_since) + self.header_timeout
                });
                if !self.read_head_bytes(due).await {
                    return;
                }
            };
            self.served = true;
            let keep = match step {
                Step::Bad(e) => {
                    tracing::debug!(peer = %self.info.peer, error = %e, "bad request head");
                    let start = std::time::Instant::now();
                    let answer = LocalAnswer::text(e.status(), e.text());
                    let (keep, _) = self.answer(answer, true, None).await;
                    if self.core.logs() {
                        self.log.fill(&self.info, Protocol::Http11, [b""; 5]);
                    }
                    let done = Finished {
                        status: e.status().as_u16(),
                        start: Some(start),
                        bytes_out: e.text().len() as u64,
                        ..Finished::default()
                    };
                    self.core
                        .finish(&done, self.core.logs().then_some(&self.log));
                    keep
                }
                Step::Local {
                    mut refused,
                    close,
                    len,
                    request_id,
                } => {
                    self.cpos += len;
                    let start = std::time::Instant::now();
                    let answer = refused.answer();
                    let service = refused.service.as_deref();
                    self.answer_local(answer, service, close, start, (&request_id, None))
                        .await
                }
                Step::Forward(mut ex) => match self.admit(&mut ex).await {
                    // Sets `idle_since` itself, with the clock reading it pools the backend
                    // with.
                    Ok(()) => self.forward(ex).await,
                    Err(mut refused) => {
                        // The body, if any, was never read: close after the answer.
                        let close = !ex.keep_alive || !ex.body.is_done();
                        let answer = refused.answer();
                        self.answer_local_as(answer, &ex, close).await
                    }
                },
            };
            if !keep {
                return;
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
    fn prepare(&mut self) -> Option<Step> {
        let buf = &self.cbuf[self.cpos..];
        let mut slots = slots();
        let head = match parse_request(buf, &mut slots) {
            Ok(Some(h)) => h,
            Ok(None) => return None,
            Err(e) => {
                self.head_request = false;
                return Some(Step::Bad(e));
            }
        };
        self.head_request = head.is_head();
        // Body bytes that came with the head are checked before anything is routed, so a
        // malformed chunk never costs a backend connection.
        if head.body.is_chunked() {
            let mut probe = head.body;
            if probe.advance(&buf[head.len..]).is_err() {
                return Some(Step::Bad(HeadError::BadFraming));
            }
        }
        let core = self.core;
        if core.logs() {
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
            self.log.fill(&self.info, protocol, parts);
        }
        let has_body = !head.body.is_done();
        let request_id = core.request_id(&self.info, head.request_id());
        let routed = core.route(
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
                let close = has_body || !head.keep_alive || refused.error.kind.is_malformed();
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
        let fwd = core.forwarding(&self.info, client, &request_id);
        head.write_backend(&mut self.wbuf, &fwd);
        let ex = Exchange {
            routed,
            body: head.body,
            keep_alive: head.keep_alive,
            upgrade: head.upgrade,
            head_request: head.is_head(),
            replayable: !has_body && head.is_idempotent(),
            http10: head.http10,
            request_id,
            auth: None,
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
        let idle = self.cbuf.is_empty() && self.served;
        let read = self.client.read_buf(&mut self.cbuf);
        let stop = async {
            if idle {
                let _ = self.shutdown.wait_for(|s| *s).await;
                // A request already on its way (or in the socket, not yet seen by the
                // runtime while a drain wakes every connection) is answered, with
                // `Connection: close`, rather than met by a closed socket.
                tokio::time::sleep(IDLE_CLOSE_WAIT).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let raced = async {
            // Bytes that are there win over the drain.
            tokio::select! {
                biased;
                r = read => Some(r),
                _ = stop => None,
            }
        };
        match self.timer.before(deadline, raced).await {
            Some(Some(Ok(n))) => n > 0,
            _ => false,
        }
    }

    /// Writes a local answer, a streamed body chunked as it comes; whether the connection
    /// stays open after it, and the body bytes sent.
    async fn answer(
        &mut self,
        answer: LocalAnswer,
        close: bool,
        request_id: Option<&RequestId>,
    ) -> (bool, u64) {
        self.wbuf.clear();
        let head_request = self.head_request;
        write_local(
            &mut self.wbuf,
            &answer,
            close,
            request_id.map(RequestId::as_bytes),
            head_request,
        );
        // No body goes after the head either for a status that never has one.
        let head_request = head_request || response::never_has_body(answer.status.as_u16());
        let mut sent = if head_request {
            0
        } else {
            answer.body_len().unwrap_or(0) as u64
        };
        let write = self.client.write_all(&self.wbuf);
        let limit = self.header_timeout;
        if !matches!(self.timer.within(limit, write).await, Some(Ok(()))) {
            return (false, sent);
        }
        if let (AnswerBody::Stream(body), false) = (answer.body, head_request) {
            match self.relay_chunked(body).await {
                Some(n) => sent = n,
                // Cut mid-body: the client sees the connection close.
                None => return (false, sent),
            }
        }
        self.idle_since = std::time::Instant::now();
        if close {
            self.linger().await;
            return (false, sent);
        }
        (true, sent)
    }

    /// Relays another service's body to the client as chunks, each read and write within
    /// `proxy.response_timeout`; the bytes sent, or `None` if it broke.
    async fn relay_chunked(&mut self, mut body: StreamBody) -> Option<u64> {
        use http_body_util::BodyExt;
        let stall = self.core.rules().response_timeout;
        let mut sent = 0u64;
        loop {
            let frame = match self.timer.within(stall, body.frame()).await {
                Some(Some(Ok(f))) => f,
                Some(None) => break,
                _ => return None,
            };
            let Ok(data) = frame.into_data() else {
                // Trailers of a local answer are not relayed.
                continue;
            };
            if data.is_empty() {
                continue;
            }
            self.wbuf.clear();
            let _ = write!(self.wbuf, "{:x}\r\n", data.len());
            let head = std::mem::take(&mut self.wbuf);
            let write = async {
                write_pair(&mut self.client, &head, &data).await?;
                self.client.write_all(b"\r\n").await
            };
            let ok = matches!(self.timer.within(stall, write).await, Some(Ok(())));
            self.wbuf = head;
            if !ok {
                return None;
            }
            sent += data.len() as u64;
        }
        let end = self.client.write_all(b"0\r\n\r\n");
        matches!(self.timer.within(stall, end).await, Some(Ok(()))).then_some(sent)
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

    /// Forward auth, when the service requires it: the auth service's permission, with
    /// its granted fields written into the backend's head, or the answer to give instead.
    async fn admit(&mut self, ex: &mut Exchange) -> Result<(), Refused> {
        let Some(spec) = ex.routed.auth() else {
            return Ok(());
        };
        // A trailer could carry a granted field past the rewritten head.
        if !spec.copy.is_empty() {
            ex.body.refuse_trailers();
        }
        let decision = auth::authorize(self.core, &ex.routed, spec, &self.wbuf).await;
        ex.auth = Some(decision.outcome);
        let grant = decision.result?;
        auth::amend_head(&mut self.wbuf, &spec.copy, &grant)?;
        Ok(())
    }

    /// Answers `ex` locally (its service, start, ID and auth decision), closing after it if
    /// told to.
    async fn answer_local_as(&mut self, answer: LocalAnswer, ex: &Exchange, close: bool) -> bool {
        let (service, start) = (Some(&*ex.routed.service), ex.routed.start);
        self.answer_local(answer, service, close, start, (&ex.request_id, ex.auth))
            .await
    }

    /// Sends one request to the service by the core's attempts and relays the answer;
    /// false when the client connection must close.
    async fn forward(&mut self, ex: Exchange) -> bool {
        if ex.routed.service.proto.is_h2() {
            return self.bridge(ex).await;
        }
        let core = self.core;
        let mut attempts = core.attempts(&ex.routed, ex.replayable);
        // A pooled connection first. One the backend closed as we took it gets one fresh
        // retry on the same instance when the request can be replayed.
        let result = loop {
            let Some(t) = attempts.next_try(|inst| &inst.state.idle) else {
                break Err(attempts.last_error());
            };
            let reused = t.conn.is_some();
            let backend = match t.conn {
                Some(b) => b,
                None => match connect_backend(t.inst, attempts.rules().connect_timeout).await {
                    Ok(b) => b,
                    Err(e) => {
                        attempts.try_failed(e, false);
                        continue;
                    }
                },
            };
            let in_flight = InFlight::new(t.inst.state.clone());
            let who = (&*t.inst.id, attempts.retries());
            match self.exchange(&ex, backend, &in_flight, who).await {
                Ok((keep, status)) => {
                    attempts.answered(status);
                    break Ok(keep);
                }
                Err(e) if e.kind == ErrorType::Aborted => break Err(e),
                Err(e) => attempts.try_failed(e, reused),
            }
        };
        let last = match result {
            Ok(keep) => return keep,
            Err(e) if e.kind == ErrorType::Aborted => return false,
            Err(e) => e,
        };
        tracing::debug!(service = %ex.routed.service.name, error = %last, "no backend answer");
        let close = !ex.keep_alive || !ex.body.is_done();
        self.answer_local_as(last.answer(), &ex, close).await
    }

    /// Answers locally and closes the request for `service`; closes the connection after it
    /// when told to or when shutting down. False when the connection closes.
    async fn answer_local(
        &mut self,
        answer: LocalAnswer,
        service: Option<&Service>,
        close: bool,
        start: std::time::Instant,
        (request_id, auth): (&RequestId, Option<Outcome>),
    ) -> bool {
        let close = close || self.closing();
        let status = answer.status.as_u16();
        let (keep, bytes_out) = self.answer(answer, close, Some(request_id)).await;
        let done = Finished {
            service,
            status,
            start: Some(start),
            bytes_out,
            request_id: request_id.as_bytes(),
            auth,
            ..Finished::default()
        };
        self.core
            .finish(&done, self.core.logs().then_some(&self.log));
        keep
    }

    /// One exchange on one backend connection. `Ok((keep, status))` when the response was
    /// relayed.
    async fn exchange(
        &mut self,
        ex: &Exchange,
        mut backend: BackendConn,
        in_flight: &InFlight,
        (instance, retries): (&str, u32),
    ) -> Result<(bool, u16), Error> {
        // The head and whatever body bytes are already here go out in one (vectored) write,
        // the body straight from the read buffer. The head stays in `wbuf` for a retry.
        let mut body = ex.body;
        let avail = &self.cbuf[self.cpos..];
        let n = body
            .advance(avail)
            .map_err(|_| Error::new(ErrorType::BadBody))?;
        let timeout = self.core.rules().response_timeout;
        let write = write_pair(&mut backend.stream, &self.wbuf, &avail[..n]);
        match self.timer.within(timeout, write).await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                return Err(Error::upstream(ErrorKind::Reset).because(e).unsent());
            }
            None => return Err(Error::upstream(ErrorKind::ResponseTimeout)),
        }
        self.cpos += n;

        let closing = self.closing();
        // Whether any response byte went to the client: until then a broken request body
        // can still be answered with a 400. (An atomic only so the future stays Send.)
        let sent = AtomicBool::new(false);
        let mut tally = Tally::default();
        let mut bytes_in = n as u64;
        let load = self.core.load_header(&in_flight.state().load);
        let (result, uploaded) = if body.is_done() {
            let r = respond(
                &mut self.client,
                &mut backend.stream,
                &mut self.bbuf,
                &mut self.wbuf,
                &mut self.timer,
                timeout,
                ex,
                closing,
                &sent,
                &mut tally,
                load,
            )
            .await;
            (r, true)
        } else {
            let (mut cr, mut cw) = self.client.halves();
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
                closing,
                &sent,
                &mut tally,
                load,
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
                            break Err(Error::new(ErrorType::BadBody));
                        }
                        Err(e) => {
                            tracing::debug!(peer = %self.info.peer, error = %e, "request body broke off");
                            break Err(Error::new(ErrorType::Aborted));
                        }
                    },
                }
            };
            (r, uploaded)
        };
        let relayed = match result {
            Ok(r) => r,
            Err(e) if e.kind == ErrorType::Aborted => {
                // Cut off: the status that went out, or 499 (as nginx) if none did.
                let status = if tally.status == 0 { 499 } else { tally.status };
                tally.status = status;
                self.finish(ex, &tally, (instance, retries), bytes_in);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.finish(ex, &tally, (instance, retries), bytes_in);
        let status = tally.status;
        match relayed.end {
            End::Upgraded(leftover) => {
                self.tunnel(backend, leftover).await;
                Ok((false, status))
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
                    return Ok((false, status));
                }
                Ok((relayed.keep_client && !self.closing(), status))
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
        self.core.finish(
            &Finished {
                service: Some(&ex.routed.service),
                instance,
                status: tally.status,
                start: Some(ex.routed.start),
                upstream: tally.upstream,
                retries,
                bytes_in,
                bytes_out: tally.bytes_out,
                request_id: ex.request_id.as_bytes(),
                auth: ex.auth,
            },
            self.core.logs().then_some(&self.log),
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
        let gauge = self.upgraded;
        gauge.increment(1.0);
        let limits = self.tunnel;
        let shutdown = self.shutdown.clone();
        tunnel::join(
            &mut self.client,
            &mut backend.stream,
            limits.idle,
            limits.grace,
            shutdown,
        )
        .await;
        gauge.decrement(1.0);
    }
}
