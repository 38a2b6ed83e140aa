//! HTTP/1 on raw TCP, byte for byte: a backend that records every byte it receives, per
//! connection, and answers from a script; and clients that send raw bytes and read the
//! responses off the wire.
//!
//! Request IDs are generated, so [`Seen::bytes`] has the value of every `X-Request-Id` line
//! masked as `*` (see [`mask_ids`]); [`Seen::raw`] and each [`Conn`] keep them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::wait::POLL;

/// A backend's plain answer: `200 OK`, body `ok`.
pub const RAW_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
/// Between two parts of a message sent "later" (by [`Script::later`] or [`talk`]'s callers).
pub const LATER: Duration = Duration::from_millis(60);
/// Longest wait for any answer in [`talk`] and [`exactly`].
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// `bytes` with the value of every `X-Request-Id` and `X-Forwarded-Port` line the router
/// wrote (1 to 64 visible ASCII bytes) replaced by `*`: request IDs are generated and the
/// router's port is bound to 0, so expected bytes say `*`.
pub fn mask_ids(bytes: &[u8]) -> Vec<u8> {
    mask(&mask(bytes, b"\nX-Request-Id: "), b"\nX-Forwarded-Port: ")
}

fn mask(bytes: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(at) = find(&bytes[i..], name) {
        let start = i + at + name.len();
        out.extend_from_slice(&bytes[i..start]);
        i = start;
        if let Some(len) = find(&bytes[start..], b"\r\n") {
            let value = &bytes[start..start + len];
            if (1..=64).contains(&value.len()) && value.iter().all(u8::is_ascii_graphic) {
                out.push(b'*');
                i = start + len;
            }
        }
    }
    out.extend_from_slice(&bytes[i..]);
    out
}

/// Bytes as a quoted, escaped string, for messages.
pub fn esc(b: &[u8]) -> String {
    format!("\"{}\"", b.escape_ascii())
}

pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Where `needle` first occurs in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// The raw backend
// ---------------------------------------------------------------------------------------

/// How a [`RawBackend`] answers each request.
#[derive(Clone, Debug)]
pub struct Script {
    /// Answer as soon as the head is in (else after the whole request).
    pub early: bool,
    /// Written one after the other, `pause` apart.
    pub parts: Vec<Vec<u8>>,
    pub pause: Duration,
    /// Close (write side) after answering; what still comes is recorded.
    pub close: bool,
    /// Answer only the first this many requests of each connection: at the head of the
    /// next, drop the connection without a word.
    pub answer_first: Option<usize>,
}

impl Script {
    /// Answers `bytes` to every request, once it is whole.
    pub fn answer(bytes: &[u8]) -> Self {
        Script {
            early: false,
            parts: vec![bytes.to_vec()],
            pause: Duration::ZERO,
            close: false,
            answer_first: None,
        }
    }

    /// Answers `bytes`, then closes its side of the connection.
    pub fn closing(bytes: &[u8]) -> Self {
        Script {
            close: true,
            ..Self::answer(bytes)
        }
    }

    /// `parts` with a pause ([`LATER`]) between them, then close.
    pub fn later(parts: &[&[u8]]) -> Self {
        Script {
            parts: parts.iter().map(|p| p.to_vec()).collect(),
            pause: LATER,
            close: true,
            ..Self::answer(b"")
        }
    }

    /// Answers (this much of a response) right after the head, then keeps reading.
    pub fn early(bytes: &[u8]) -> Self {
        Script {
            early: true,
            ..Self::answer(bytes)
        }
    }

    /// Answers only the first `n` requests of each connection, then drops it at the next.
    pub fn answer_first(self, n: usize) -> Self {
        Script {
            answer_first: Some(n),
            ..self
        }
    }
}

#[derive(Debug)]
enum Event {
    Accepted(usize),
    Data(usize, Vec<u8>),
    Eof(usize),
}

/// One backend connection, as of a [`Seen`].
#[derive(Debug, Clone)]
pub struct Conn {
    /// Numbered from 0 in accept order.
    pub id: usize,
    /// The bytes it received, exactly (request IDs not masked).
    pub bytes: Vec<u8>,
    /// Whether the router closed it (EOF or an error on read).
    pub eof: bool,
}

/// What a [`RawBackend`] received after a mark.
#[derive(Debug)]
pub struct Seen {
    /// All bytes, in arrival order, request IDs masked (see [`mask_ids`]).
    pub bytes: Vec<u8>,
    /// The same, unmasked.
    pub raw: Vec<u8>,
    /// Per connection that received bytes since the mark, in order of its first bytes.
    pub conns: Vec<Conn>,
    /// Connections accepted since the mark.
    pub accepted: usize,
}

/// A backend on raw TCP (127.0.0.1:0): records every byte it receives, per connection, and
/// answers each request from its [`Script`] (which the test may change between requests).
/// Requests are delimited leniently (Content-Length or chunked): the router's output is
/// what is under test, not this reading of it.
pub struct RawBackend {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Event>>>,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    /// A backend answering [`RAW_OK`].
    pub async fn start() -> RawBackend {
        Self::start_with(Script::answer(RAW_OK)).await
    }

    pub async fn start_with(script: Script) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script));
        let (l, s) = (log.clone(), script.clone());
        let task = tokio::spawn(async move {
            for id in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                l.lock().unwrap().push(Event::Accepted(id));
                tokio::spawn(serve_raw(stream, id, l.clone(), s.clone()));
            }
        });
        RawBackend {
            addr,
            log,
            script,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Answers from now on by `s`.
    pub fn set(&self, s: Script) {
        *self.script.lock().unwrap() = s;
    }

    /// A mark: what comes after it is [`RawBackend::since`] it.
    pub fn mark(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Everything received since it started.
    pub fn received(&self) -> Seen {
        self.since(0)
    }

    /// What it received after `mark`.
    pub fn since(&self, mark: usize) -> Seen {
        let log = self.log.lock().unwrap();
        let mut conns: Vec<Conn> = Vec::new();
        let mut raw = Vec::new();
        let mut accepted = 0;
        for e in &log[mark.min(log.len())..] {
            let id = match e {
                Event::Accepted(_) => {
                    accepted += 1;
                    continue;
                }
                Event::Data(id, _) | Event::Eof(id) => *id,
            };
            let at = match conns.iter().position(|c| c.id == id) {
                Some(at) => at,
                None => {
                    conns.push(Conn {
                        id,
                        bytes: Vec::new(),
                        eof: false,
                    });
                    conns.len() - 1
                }
            };
            match e {
                Event::Data(_, d) => {
                    raw.extend_from_slice(d);
                    conns[at].bytes.extend_from_slice(d);
                }
                _ => conns[at].eof = true,
            }
        }
        conns.retain(|c| !c.bytes.is_empty());
        Seen {
            bytes: mask_ids(&raw),
            raw,
            conns,
            accepted,
        }
    }

    /// What it received after `mark`, once the router has had a moment to send anything
    /// more. For asserting that something did NOT arrive (a refused request reaches no
    /// backend): absence has no event to wait on, so this waits out a short window (60 ms,
    /// against a router that answers the client within a millisecond or two).
    pub async fn settled(&self, mark: usize) -> Seen {
        tokio::time::sleep(Duration::from_millis(60)).await;
        self.since(mark)
    }

    /// Waits (at most `limit`) until what arrived after `mark` satisfies `pred`; the last
    /// [`Seen`] either way, `Err` with what came when it never did.
    pub async fn wait_seen(
        &self,
        mark: usize,
        limit: Duration,
        pred: impl Fn(&Seen) -> bool,
    ) -> Result<Seen, Seen> {
        let until = Instant::now() + limit;
        loop {
            let seen = self.since(mark);
            if pred(&seen) {
                return Ok(seen);
            }
            if Instant::now() >= until {
                return Err(seen);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Every backend connection that received bytes since `mark` is closed by the router
    /// (within 2 s).
    pub async fn closed_since(&self, mark: usize) -> Result<(), String> {
        self.wait_seen(mark, Duration::from_secs(2), |s| {
            s.conns.iter().all(|c| c.eof)
        })
        .await
        .map(drop)
        .map_err(|seen| {
            format!(
                "the backend connection was left open after {}",
                esc(&seen.bytes)
            )
        })
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads into `buf`, logging; false at EOF or on an error.
async fn read_logged(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    id: usize,
    log: &Mutex<Vec<Event>>,
) -> bool {
    let mut tmp = [0u8; 16 * 1024];
    match s.read(&mut tmp).await {
        Ok(0) | Err(_) => {
            log.lock().unwrap().push(Event::Eof(id));
            false
        }
        Ok(n) => {
            log.lock().unwrap().push(Event::Data(id, tmp[..n].to_vec()));
            buf.extend_from_slice(&tmp[..n]);
            true
        }
    }
}

async fn play(s: &mut TcpStream, script: &Script) -> bool {
    for (i, p) in script.parts.iter().enumerate() {
        if i > 0 {
            // Part of the script: the parts are meant to arrive apart.
            tokio::time::sleep(script.pause).await;
        }
        if s.write_all(p).await.is_err() {
            return false;
        }
    }
    true
}

async fn serve_raw(
    mut s: TcpStream,
    id: usize,
    log: Arc<Mutex<Vec<Event>>>,
    script: Arc<Mutex<Script>>,
) {
    let mut buf = Vec::new();
    for n in 0.. {
        let head_end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            if !read_logged(&mut s, &mut buf, id, &log).await {
                return;
            }
        };
        let script = script.lock().unwrap().clone();
        if script.answer_first.is_some_and(|first| n >= first) {
            return;
        }
        if script.early && !play(&mut s, &script).await {
            return;
        }
        let end = loop {
            if let Some(end) = request_end(&buf, head_end) {
                break end;
            }
            if !read_logged(&mut s, &mut buf, id, &log).await {
                return;
            }
        };
        buf.drain(..end);
        if !script.early && !play(&mut s, &script).await {
            return;
        }
        if script.close {
            let _ = s.shutdown().await;
            while read_logged(&mut s, &mut buf, id, &log).await {}
            return;
        }
    }
}

/// Where the request whose head ends at `head_end` ends (a lenient reading: the router's
/// output is what is under test, not this).
fn request_end(buf: &[u8], head_end: usize) -> Option<usize> {
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let mut length = None;
    let mut chunked = false;
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            if name == "content-length" {
                length = value.trim().parse::<usize>().ok();
            } else if name == "transfer-encoding" && value.contains("chunked") {
                chunked = true;
            }
        }
    }
    if chunked {
        chunked_end(&buf[head_end..]).map(|(n, _)| head_end + n)
    } else {
        let n = length.unwrap_or(0);
        (buf.len() >= head_end + n).then_some(head_end + n)
    }
}

/// Where a chunked body ends and its data (lenient; garbage ends it at once).
pub fn chunked_end(b: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut i = 0;
    let mut data = Vec::new();
    loop {
        let line_end = i + find(&b[i..], b"\r\n")?;
        let digits = b[i..line_end]
            .iter()
            .take_while(|c| c.is_ascii_hexdigit())
            .count();
        if digits == 0 || digits > 15 {
            return Some((b.len(), data));
        }
        let size = usize::from_str_radix(std::str::from_utf8(&b[i..i + digits]).unwrap(), 16)
            .unwrap_or(usize::MAX / 2);
        i = line_end + 2;
        if size == 0 {
            loop {
                let end = i + find(&b[i..], b"\r\n")?;
                let empty = end == i;
                i = end + 2;
                if empty {
                    return Some((i, data));
                }
            }
        }
        if b.len() < i + size + 2 {
            return None;
        }
        data.extend_from_slice(&b[i..i + size]);
        i += size + 2;
    }
}

/// Reads a request head from `s`: the head (without its blank line) and whatever followed
/// it in the same reads. Panics at EOF before the head ends.
pub async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.expect("read head");
        assert!(n > 0, "EOF before the head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return (head, buf[end + 4..].to_vec());
        }
    }
}

/// Reads from `s` until EOF or an error; the bytes read.
pub async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The raw client
// ---------------------------------------------------------------------------------------

/// A response as read off the wire.
#[derive(Debug, Default)]
pub struct Resp {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body as framed on the wire.
    pub raw_body: Vec<u8>,
    /// The payload.
    pub body: Vec<u8>,
}

impl Resp {
    /// Every value of field `name` (any case), in order.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The first value of field `name` (any case).
    pub fn header(&self, name: &str) -> Option<String> {
        self.all(name).into_iter().next()
    }
}

/// One response at the start of `buf` (to a request that was not HEAD): `Ok(None)` when
/// more is needed; `eof` says no more will come.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(Resp, usize)>, String> {
    parse_response_to(buf, eof, false)
}

/// [`parse_response`] to a HEAD request when `head`: then the response has no body.
pub fn parse_response_to(
    buf: &[u8],
    eof: bool,
    head: bool,
) -> Result<Option<(Resp, usize)>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut h = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut h);
    let n = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if eof => return Err(format!("truncated head {}", esc(buf))),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("unparsable response ({e}): {}", esc(buf))),
    };
    let mut resp = Resp {
        status: r.code.unwrap_or(0),
        reason: r.reason.unwrap_or("").to_owned(),
        headers: r
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect(),
        ..Resp::default()
    };
    let rest = &buf[n..];
    if head || (100..200).contains(&resp.status) || resp.status == 204 || resp.status == 304 {
        return Ok(Some((resp, n)));
    }
    let te = resp.header("transfer-encoding");
    let len = resp.header("content-length");
    if te.is_some_and(|t| t.to_ascii_lowercase().contains("chunked")) {
        match chunked_end(rest) {
            Some((end, data)) => {
                resp.raw_body = rest[..end].to_vec();
                resp.body = data;
                Ok(Some((resp, n + end)))
            }
            None if eof => Err(format!("truncated chunked body {}", esc(rest))),
            None => Ok(None),
        }
    } else if let Some(len) = len {
        let len: usize = len
            .trim()
            .parse()
            .map_err(|_| format!("Content-Length {len:?}"))?;
        if rest.len() < len {
            return if eof {
                Err(format!("truncated body {}", esc(rest)))
            } else {
                Ok(None)
            };
        }
        resp.raw_body = rest[..len].to_vec();
        resp.body = resp.raw_body.clone();
        Ok(Some((resp, n + len)))
    } else if eof {
        resp.raw_body = rest.to_vec();
        resp.body = rest.to_vec();
        Ok(Some((resp, buf.len())))
    } else {
        Ok(None)
    }
}

/// A client connection to `addr`, Nagle off (each write goes out as it is).
pub async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    s
}

/// Reads one response from `s` (Content-Length, chunked, or until close), keeping any bytes
/// after it in `buf`. `head` says the request was HEAD. Panics if nothing comes for 5 s or
/// the connection closes before the response is whole.
pub async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head: bool) -> Resp {
    let mut eof = false;
    loop {
        match parse_response_to(buf, eof, head) {
            Ok(Some((r, n))) => {
                buf.drain(..n);
                return r;
            }
            Ok(None) if eof => panic!("connection closed; had {}", esc(buf)),
            Ok(None) => {}
            Err(e) => panic!("{e}"),
        }
        let n = tokio::time::timeout(ANSWER_WITHIN, s.read_buf(buf))
            .await
            .expect("no answer within 5 s")
            .expect("read");
        eof = n == 0;
    }
}

/// Whether the peer closed `s` (EOF, or an error, within 2 s).
pub async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// What a client connection got.
#[derive(Debug)]
pub struct Answer {
    pub bytes: Vec<u8>,
    pub responses: Vec<Resp>,
    pub closed: bool,
    /// Bytes that did not parse as a response, or a truncated one.
    pub garbage: Option<String>,
}

impl Answer {
    pub fn first(&self) -> Result<&Resp, String> {
        self.responses.first().ok_or_else(|| {
            format!(
                "no answer ({}; closed: {}; received {})",
                self.garbage.as_deref().unwrap_or("nothing parsed"),
                self.closed,
                esc(&self.bytes)
            )
        })
    }
}

/// How long [`talk`] looks for the close after the answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Up to 2 s: the connection should close.
    Close,
    /// 150 ms: the connection should stay open.
    Open,
    /// Not at all.
    No,
}

/// Sends `parts` (`pause` apart) on a fresh connection and reads until `want` final
/// responses, EOF or a timeout; then looks for EOF as `wait` says.
pub async fn talk<P: AsRef<[u8]>>(
    addr: SocketAddr,
    parts: &[P],
    pause: Duration,
    want: usize,
    wait: Wait,
) -> Answer {
    let mut s = connect(addr).await;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            // Part of the scenario: the parts are meant to arrive apart.
            tokio::time::sleep(pause).await;
        }
        if s.write_all(p.as_ref()).await.is_err() {
            break;
        }
    }
    let mut buf = Vec::new();
    let mut pos = 0;
    let mut responses = Vec::new();
    let mut eof = false;
    let mut garbage = None;
    let deadline = Instant::now() + ANSWER_WITHIN;
    let parse_all = |buf: &[u8],
                     pos: &mut usize,
                     responses: &mut Vec<Resp>,
                     garbage: &mut Option<String>,
                     eof: bool| {
        while garbage.is_none() {
            match parse_response(&buf[*pos..], eof) {
                Ok(Some((r, n))) => {
                    *pos += n;
                    responses.push(r);
                }
                Ok(None) => break,
                Err(e) => *garbage = Some(e),
            }
        }
    };
    loop {
        parse_all(&buf, &mut pos, &mut responses, &mut garbage, eof);
        let finals = responses.iter().filter(|r| r.status >= 200).count();
        if eof || garbage.is_some() || finals >= want {
            break;
        }
        match tokio::time::timeout_at(deadline, s.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => eof = true,
            Ok(Ok(_)) => {}
            Err(_) => break,
        }
    }
    let mut closed = eof;
    if !closed && wait != Wait::No {
        let wait = if wait == Wait::Close {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(150)
        };
        loop {
            match tokio::time::timeout(wait, s.read_buf(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(_)) => {}
                Err(_) => break,
            }
        }
        if garbage.is_none() {
            parse_all(&buf, &mut pos, &mut responses, &mut garbage, closed);
        }
    }
    Answer {
        bytes: buf,
        responses,
        closed,
        garbage,
    }
}

/// Sends `req` on a fresh connection; reads at least `len` bytes (or until EOF or 5 s), then
/// whatever else comes within 150 ms.
pub async fn exactly(addr: SocketAddr, req: &[u8], len: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(req).await.expect("write");
    let mut buf = Vec::new();
    let deadline = Instant::now() + ANSWER_WITHIN;
    while buf.len() < len {
        match tokio::time::timeout_at(deadline, s.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return buf,
        }
    }
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(150), s.read_buf(&mut buf)).await
    {
        if n == 0 {
            break;
        }
    }
    buf
}
