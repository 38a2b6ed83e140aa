//! HTTP/1 message heads on the fast path: parsed in place with httparse and rewritten
//! straight into the outgoing buffer, so no header map is built and no header is copied
//! twice.

use std::io::Write as _;
use std::mem::MaybeUninit;
use std::net::IpAddr;

use http::StatusCode;

use super::framing::Framing;
use crate::access_log::push_u64;
use crate::proxy::headers::{canonical, is_lookalike};

/// Most header fields in one head (as hyper).
pub const MAX_HEADERS: usize = 100;
/// Largest head we read; more gets 431.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most `Connection` tokens honoured per message; a longer list is refused.
const MAX_CONNECTION_TOKENS: usize = 8;

/// Header slots for one parse, left uninitialised until httparse fills them.
pub type HeaderSlots<'b> = [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS];

/// A fresh set of header slots.
pub fn slots<'b>() -> HeaderSlots<'b> {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Not HTTP/1.x syntax.
    #[error("malformed message head")]
    Malformed,
    /// Longer than [`MAX_HEAD`] or more than [`MAX_HEADERS`] fields.
    #[error("message head too large")]
    TooLarge,
    /// Contradictory or invalid Content-Length / Transfer-Encoding.
    #[error("invalid message framing")]
    BadFraming,
    /// A transfer coding other than chunked.
    #[error("unsupported transfer coding")]
    UnsupportedCoding,
}

impl HeadError {
    /// The status a client gets for a request head refused this way.
    pub fn status(self) -> StatusCode {
        match self {
            HeadError::Malformed | HeadError::BadFraming => StatusCode::BAD_REQUEST,
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

fn parse_error(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooLarge,
        _ => HeadError::Malformed,
    }
}

/// The `Connection` tokens of a message: the options it sets and the fields it names.
#[derive(Debug, Default)]
struct Connection<'b> {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    named: [&'b [u8]; MAX_CONNECTION_TOKENS],
    len: usize,
}

impl<'b> Connection<'b> {
    fn add(&mut self, value: &'b [u8]) -> Result<(), HeadError> {
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if token.is_empty() {
                continue;
            }
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else {
                *self.named.get_mut(self.len).ok_or(HeadError::TooLarge)? = token;
                self.len += 1;
            }
        }
        Ok(())
    }

    /// Whether `name` is one of the fields this `Connection` names (hop-by-hop too).
    fn names(&self, name: &str) -> bool {
        self.named[..self.len]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// The fields the proxy treats specially, recognised once per field by length first, so
/// the usual field costs one comparison or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Host,
    Connection,
    ContentLength,
    TransferEncoding,
    Upgrade,
    ForwardedFor,
    ForwardedHost,
    ForwardedProto,
    /// `Forwarded` (RFC 7239).
    Forwarded,
    /// `X-Real-IP`.
    RealIp,
    /// `X-Request-Id`.
    RequestId,
    /// The other fixed hop-by-hop fields (`headers::is_hop_by_hop`).
    HopByHop,
    /// A name with `_` that reads as one of the fields above once `_` is `-` (as PHP, WSGI
    /// and CGI read names): never forwarded.
    Lookalike,
    Other,
}

fn classify(name: &str) -> Field {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    let kind = match name.len() {
        2 if is("te") => Field::HopByHop,
        4 if is("host") => Field::Host,
        5 if is("proxy") => Field::HopByHop,
        7 if is("upgrade") => Field::Upgrade,
        9 if is("forwarded") => Field::Forwarded,
        9 if is("x-real-ip") => Field::RealIp,
        10 if is("connection") => Field::Connection,
        10 if is("keep-alive") => Field::HopByHop,
        12 if is("x-request-id") => Field::RequestId,
        14 if is("content-length") => Field::ContentLength,
        15 if is("x-forwarded-for") => Field::ForwardedFor,
        16 if is("x-forwarded-host") => Field::ForwardedHost,
        16 if is("proxy-connection") => Field::HopByHop,
        17 if is("x-forwarded-proto") => Field::ForwardedProto,
        17 if is("transfer-encoding") => Field::TransferEncoding,
        18 if is("proxy-authenticate") => Field::HopByHop,
        19 if is("proxy-authorization") => Field::HopByHop,
        _ => Field::Other,
    };
    // Only names as long as a dashed special name can be its lookalike.
    if kind == Field::Other && matches!(name.len(), 9 | 10 | 12 | 14..=19) && is_lookalike(name) {
        return Field::Lookalike;
    }
    kind
}

/// Each field's kind, in order.
type Kinds = [Field; MAX_HEADERS];

/// Body framing from the Content-Length and Transfer-Encoding fields (RFC 9112 §6.3).
/// Both are re-written from what is parsed here, never relayed as they came, so a repeated
/// or oddly spelled value reaches the next parser as one plain value.
#[derive(Debug, Default)]
struct Lengths {
    length: Option<u64>,
    /// `chunked` codings seen, in every Transfer-Encoding field.
    chunked: u8,
    /// Any other coding seen.
    other_coding: bool,
    seen_te: bool,
}

impl Lengths {
    fn content_length(&mut self, value: &[u8]) -> Result<(), HeadError> {
        // "5, 5" from merged duplicates is allowed (and forwarded as one); differing values
        // are not.
        for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(HeadError::BadFraming);
            }
            let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            match self.length {
                Some(prev) if prev != n => return Err(HeadError::BadFraming),
                _ => self.length = Some(n),
            }
        }
        Ok(())
    }

    fn transfer_encoding(&mut self, value: &[u8]) {
        self.seen_te = true;
        for coding in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if coding.is_empty() {
                continue;
            }
            if coding.eq_ignore_ascii_case(b"chunked") {
                self.chunked = self.chunked.saturating_add(1);
            } else {
                self.other_coding = true;
            }
        }
    }

    /// Transfer-Encoding is exactly one `chunked`: the only coding relayed.
    fn just_chunked(&self) -> bool {
        self.chunked == 1 && !self.other_coding
    }
}

/// Writes the framing fields a head had, as parsed: one `Content-Length: N` or one
/// `Transfer-Encoding: chunked`, at the place of the first such field.
fn framing_field(out: &mut Vec<u8>, kind: Field, written: &mut bool, length: Option<u64>) {
    if std::mem::replace(written, true) {
        return;
    }
    match (kind, length) {
        (Field::TransferEncoding, _) => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        (_, Some(n)) => {
            out.extend_from_slice(b"Content-Length: ");
            push_u64(out, n);
            out.extend_from_slice(b"\r\n");
        }
        (_, None) => {}
    }
}

/// A parsed request head, borrowing the read buffer.
#[derive(Debug)]
pub struct RequestHead<'h, 'b> {
    /// Bytes taken by the head, CRLFCRLF included.
    pub len: usize,
    /// Method token.
    pub method: &'b str,
    /// Request target as sent.
    pub target: &'b str,
    /// HTTP/1.0 (else 1.1).
    pub http10: bool,
    /// The header fields in order.
    pub headers: &'h [httparse::Header<'b>],
    /// The client wants the connection kept after this exchange.
    pub keep_alive: bool,
    /// The request body's framing.
    pub body: Framing,
    /// `Connection: upgrade` with an `Upgrade` field, on HTTP/1.1.
    pub upgrade: bool,
    /// The host to route by: the absolute-form authority, else the single Host field.
    pub host: Option<&'b [u8]>,
    /// What follows the authority in an absolute-form target: empty, `/path...` or `?query`.
    pub absolute_path: Option<&'b str>,
    /// The Content-Length, as parsed.
    length: Option<u64>,
    connection: Connection<'b>,
    kinds: Kinds,
}

/// How a request's client-address fields are written for the backend.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The peer's address text, appended to `X-Forwarded-For`.
    pub peer: &'a PeerText,
    /// Whether the peer is a trusted proxy, whose X-Forwarded-*, `Forwarded` are kept.
    pub trusted: bool,
    /// The client's address for `X-Real-IP` (the peer, or from a trusted peer's chain).
    pub client: &'a PeerText,
    /// Drop every field name with `_`, not just the lookalikes.
    pub drop_underscores: bool,
    /// The request's ID, sent as `X-Request-Id` (any the client sent is replaced).
    pub request_id: &'a [u8],
}

/// Parses a request head at the start of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    slots: &'h mut HeaderSlots<'b>,
) -> Result<Option<RequestHead<'h, 'b>>, HeadError> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(parse_error(e)),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed);
    };
    let headers: &'h [httparse::Header<'b>] = req.headers;
    let http10 = version == 0;
    let absolute = check_target(method, target)?;

    let mut connection = Connection::default();
    let mut lengths = Lengths::default();
    let mut host = None;
    let mut hosts = 0;
    let mut has_upgrade = false;
    let mut kinds = [Field::Other; MAX_HEADERS];
    for (h, kind) in headers.iter().zip(&mut kinds) {
        *kind = classify(h.name);
        match kind {
            Field::Host => {
                hosts += 1;
                host = Some(h.value);
            }
            Field::Connection => connection.add(h.value)?,
            Field::ContentLength => lengths.content_length(h.value)?,
            Field::TransferEncoding => lengths.transfer_encoding(h.value),
            Field::Upgrade => has_upgrade = true,
            _ => {}
        }
    }
    if hosts > 1 {
        return Err(HeadError::Malformed);
    }
    // A request body is chunked, sized, or absent; anything else is refused (RFC 9112
    // §6.3), and both at once is how requests get smuggled.
    let body = match (lengths.seen_te, lengths.length) {
        (true, Some(_)) => return Err(HeadError::BadFraming),
        (true, None) if http10 => return Err(HeadError::BadFraming),
        (true, None) if lengths.chunked == 0 && !lengths.other_coding => {
            return Err(HeadError::BadFraming)
        }
        (true, None) if !lengths.just_chunked() => return Err(HeadError::UnsupportedCoding),
        (true, None) => Framing::CHUNKED,
        (false, Some(0)) | (false, None) => Framing::Done,
        (false, Some(n)) => Framing::Length(n),
    };

    let (host, absolute_path) = match absolute {
        Some((authority, path)) => (Some(authority.as_bytes()), Some(path)),
        None => (host, None),
    };
    let keep_alive = if http10 {
        connection.keep_alive && !connection.close
    } else {
        !connection.close
    };
    Ok(Some(RequestHead {
        len,
        method,
        target,
        http10,
        headers,
        keep_alive,
        body,
        upgrade: !http10 && connection.upgrade && has_upgrade,
        host,
        absolute_path,
        length: lengths.length,
        connection,
        kinds,
    }))
}

/// Checks the request target's form (RFC 9112 §3.2): origin-form, absolute-form with an
/// http(s) scheme, `*` for OPTIONS, or anything for CONNECT (which is refused later). No
/// fragment and nothing outside ASCII. Returns the authority and the rest of an
/// absolute-form target.
fn check_target<'b>(
    method: &str,
    target: &'b str,
) -> Result<Option<(&'b str, &'b str)>, HeadError> {
    if method == "CONNECT" {
        return Ok(None);
    }
    if target.bytes().any(|b| b == b'#' || !b.is_ascii()) {
        return Err(HeadError::Malformed);
    }
    if target.starts_with('/') {
        return Ok(None);
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok(None)
        } else {
            Err(HeadError::Malformed)
        };
    }
    let (scheme, rest) = target.split_once("://").ok_or(HeadError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(HeadError::Malformed);
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    // No userinfo (`user@host`): RFC 9110 §4.2.4 forbids it in http(s) URIs.
    if authority.is_empty() || authority.contains('@') {
        return Err(HeadError::Malformed);
    }
    Ok(Some((authority, path)))
}

impl RequestHead<'_, '_> {
    /// Whether the method is HEAD (its response has no body).
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// Whether resending this request on another connection is harmless.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self.method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }

    /// The path (and query, with `with_query`) for URL hashing. An absolute-form target
    /// with an empty path hashes as `/`.
    pub fn hash_path(&self, with_query: bool) -> &[u8] {
        let target = match self.absolute_path {
            Some("") => "/",
            Some(p) => p,
            None => self.target,
        };
        let path = if with_query {
            target
        } else {
            target.split_once('?').map_or(target, |(p, _)| p)
        };
        path.as_bytes()
    }

    /// The first value of field `name` (lowercase), if any.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// The first `X-Request-Id` value, if any.
    pub fn request_id(&self) -> Option<&[u8]> {
        self.headers
            .iter()
            .zip(&self.kinds)
            .find(|(_, k)| **k == Field::RequestId)
            .map(|(h, _)| h.value)
    }

    /// The `X-Forwarded-For` values, in order.
    pub fn forwarded_for(&self) -> impl DoubleEndedIterator<Item = &[u8]> {
        self.headers
            .iter()
            .zip(&self.kinds)
            .filter(|(_, k)| **k == Field::ForwardedFor)
            .map(|(h, _)| h.value)
    }

    /// Writes the head the backend gets into `out`: HTTP/1.1 (1.0 for 1.0 clients, so the
    /// backend never answers them chunked), origin-form, hop-by-hop fields out, framing
    /// fields written once as parsed (the body passes verbatim), and X-Forwarded-For/Host/
    /// Proto and X-Real-IP set. From a trusted peer the existing chain, host, proto and
    /// `Forwarded` are kept (nginx terminating TLS says `https`); from anyone else they are
    /// replaced or dropped. Names with `_` that read as one of these are always dropped.
    pub fn write_backend(&self, out: &mut Vec<u8>, fwd: &Forwarding<'_>) {
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        match self.absolute_path {
            // `http://h?q` has an empty path, which is `/` in origin-form (RFC 9110 §4.2.3).
            Some(p) if !p.starts_with('/') => {
                out.push(b'/');
                out.extend_from_slice(p.as_bytes());
            }
            Some(p) => out.extend_from_slice(p.as_bytes()),
            None => out.extend_from_slice(self.target.as_bytes()),
        }
        out.extend_from_slice(if self.http10 {
            b" HTTP/1.0\r\n"
        } else {
            b" HTTP/1.1\r\n"
        });
        let mut forwarded_host = false;
        let mut forwarded_proto = false;
        let mut framing = false;
        let absolute = self.absolute_path.is_some();
        for (h, kind) in self.headers.iter().zip(&self.kinds) {
            match kind {
                Field::ForwardedFor
                | Field::Connection
                | Field::HopByHop
                | Field::RealIp
                | Field::RequestId
                | Field::Lookalike => continue,
                Field::Host if absolute => continue,
                Field::ForwardedHost | Field::ForwardedProto | Field::Forwarded if !fwd.trusted => {
                    continue
                }
                Field::ForwardedHost => forwarded_host = true,
                Field::ForwardedProto => forwarded_proto = true,
                Field::Forwarded => {}
                // The body is relayed in its own framing, described once and plainly.
                // Connection cannot drop these or Host: the backend must frame the body
                // the way we relay it.
                Field::TransferEncoding | Field::ContentLength => {
                    framing_field(out, *kind, &mut framing, self.length);
                    continue;
                }
                Field::Upgrade if self.upgrade => {}
                Field::Upgrade => continue,
                Field::Host => {}
                Field::Other => {
                    if self.connection.names(h.name)
                        || (fwd.drop_underscores && h.name.as_bytes().contains(&b'_'))
                    {
                        continue;
                    }
                }
            }
            field(out, h.name.as_bytes(), h.value);
        }
        if absolute {
            if let Some(host) = self.host {
                field(out, b"Host", host);
            }
        }
        out.extend_from_slice(b"X-Forwarded-For: ");
        if fwd.trusted {
            for v in self.forwarded_for().filter(|v| !v.trim_ascii().is_empty()) {
                out.extend_from_slice(v);
                out.extend_from_slice(b", ");
            }
        }
        out.extend_from_slice(fwd.peer.as_bytes());
        out.extend_from_slice(b"\r\n");
        if !forwarded_host {
            if let Some(host) = self.host {
                field(out, b"X-Forwarded-Host", host);
            }
        }
        if !forwarded_proto {
            out.extend_from_slice(b"X-Forwarded-Proto: http\r\n");
        }
        field(out, b"X-Real-IP", fwd.client.as_bytes());
        field(out, b"X-Request-Id", fwd.request_id);
        if self.upgrade {
            out.extend_from_slice(b"Connection: upgrade\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// A client address as written into `X-Forwarded-For`, formatted once per connection.
#[derive(Debug, Clone, Copy)]
pub struct PeerText {
    buf: [u8; 48],
    len: usize,
}

impl PeerText {
    /// Formats `ip` (IPv4-mapped IPv6 as IPv4).
    pub fn new(ip: IpAddr) -> Self {
        let mut buf = [0u8; 48];
        let mut w = &mut buf[..];
        // The longest IPv6 text is 45 bytes, so this always fits.
        let _ = write!(w, "{}", canonical(ip));
        let len = 48 - w.len();
        PeerText { buf, len }
    }

    /// The text.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head, borrowing the backend read buffer.
#[derive(Debug)]
pub struct ResponseHead<'h, 'b> {
    /// Bytes taken by the head.
    pub len: usize,
    /// Status code.
    pub status: u16,
    reason: &'b str,
    headers: &'h [httparse::Header<'b>],
    /// The response body's framing.
    pub body: Framing,
    /// The backend keeps the connection open after this response.
    pub keep_alive: bool,
    connection: Connection<'b>,
    kinds: Kinds,
    /// Transfer-Encoding came with it: a Content-Length beside it is not forwarded.
    has_coding: bool,
    /// The Content-Length, as parsed.
    length: Option<u64>,
}

/// Parses a response head at the start of `buf` for a request that was (or not) HEAD.
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    slots: &'h mut HeaderSlots<'b>,
    head_request: bool,
) -> Result<Option<ResponseHead<'h, 'b>>, HeadError> {
    let mut resp = httparse::Response::new(&mut []);
    let parsed =
        httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(parse_error(e)),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(HeadError::Malformed);
    };
    let reason = resp.reason.unwrap_or("");
    let headers: &'h [httparse::Header<'b>] = resp.headers;
    let mut connection = Connection::default();
    let mut lengths = Lengths::default();
    let mut kinds = [Field::Other; MAX_HEADERS];
    for (h, kind) in headers.iter().zip(&mut kinds) {
        *kind = classify(h.name);
        match kind {
            Field::Connection => connection.add(h.value)?,
            Field::ContentLength => lengths.content_length(h.value)?,
            Field::TransferEncoding => lengths.transfer_encoding(h.value),
            _ => {}
        }
    }
    // Only `chunked` is relayed: another coding (which would be delimited by close) or a
    // repeated chunked is a framing the client might read differently (nginx refuses too).
    if lengths.seen_te && !lengths.just_chunked() {
        return Err(HeadError::BadFraming);
    }
    let body = if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Done
    } else if lengths.seen_te {
        Framing::CHUNKED
    } else {
        match lengths.length {
            Some(0) => Framing::Done,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let keep_alive = if version == 0 {
        connection.keep_alive && !connection.close
    } else {
        !connection.close
    } && body != Framing::UntilClose;
    Ok(Some(ResponseHead {
        len,
        status,
        reason,
        headers,
        body,
        keep_alive,
        connection,
        kinds,
        has_coding: lengths.seen_te,
        length: lengths.length,
    }))
}

/// How the client's head is written around a backend's response.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientHead<'a> {
    /// Say `Connection: close`: the connection closes after this response.
    pub close: bool,
    /// Say `Connection: keep-alive` (an HTTP/1.0 client that asked for it).
    pub keep_alive_10: bool,
    /// The body goes out de-chunked and delimited by close: no Transfer-Encoding.
    pub dechunk: bool,
    /// The request's ID.
    pub request_id: &'a [u8],
    /// The load header's name (lowercase), removed from the head; empty: none.
    pub load_header: &'a [u8],
}

impl<'b> ResponseHead<'_, 'b> {
    /// Writes the head the client gets: HTTP/1.1, hop-by-hop fields out, framing fields
    /// written once as parsed, the request's `X-Request-Id` (replacing the backend's), and
    /// the connection fields `how` asks for; a 101 keeps its `Upgrade` and says
    /// `Connection: upgrade`. Returns the load header's value, which is left out.
    pub fn write_client(&self, out: &mut Vec<u8>, how: &ClientHead<'_>) -> Option<&'b [u8]> {
        let ClientHead {
            close,
            keep_alive_10,
            dechunk,
            request_id,
            load_header,
        } = *how;
        let mut load = None;
        out.extend_from_slice(b"HTTP/1.1 ");
        write_status(out, self.status);
        out.push(b' ');
        out.extend_from_slice(self.reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        let upgrade = self.status == 101;
        let mut framing = false;
        for (h, kind) in self.headers.iter().zip(&self.kinds) {
            let keep = match kind {
                Field::Connection | Field::HopByHop => false,
                // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; drop the latter.
                Field::TransferEncoding | Field::ContentLength => {
                    let drop = if *kind == Field::TransferEncoding {
                        dechunk
                    } else {
                        self.has_coding
                    };
                    if !drop {
                        framing_field(out, *kind, &mut framing, self.length);
                    }
                    false
                }
                Field::Upgrade => upgrade,
                Field::RequestId => false,
                // By length first: the usual field costs one comparison.
                Field::Other
                    if h.name.len() == load_header.len()
                        && h.name.as_bytes().eq_ignore_ascii_case(load_header) =>
                {
                    load = Some(h.value);
                    false
                }
                _ => !self.connection.names(h.name),
            };
            if keep {
                field(out, h.name.as_bytes(), h.value);
            }
        }
        if !request_id.is_empty() {
            field(out, b"X-Request-Id", request_id);
        }
        if upgrade {
            out.extend_from_slice(b"Connection: upgrade\r\n");
        } else if close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if keep_alive_10 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        load
    }
}

fn write_status(out: &mut Vec<u8>, status: u16) {
    let s = status.min(999);
    out.extend_from_slice(&[
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]);
}

/// Writes a short local answer (plain text, `Retry-After` on 503, the request's ID when it
/// has one).
pub fn write_local(
    out: &mut Vec<u8>,
    status: StatusCode,
    text: &str,
    close: bool,
    request_id: Option<&[u8]>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    write_status(out, status.as_u16());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: text/plain; charset=utf-8\r\n");
    let _ = write!(out, "Content-Length: {}\r\n", text.len());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        out.extend_from_slice(b"Retry-After: 5\r\n");
    }
    if let Some(id) = request_id {
        field(out, b"X-Request-Id", id);
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend_head(raw: &[u8], peer: &str, trusted: bool) -> String {
        backend_head_with(raw, peer, trusted, false)
    }

    fn backend_head_with(raw: &[u8], peer: &str, trusted: bool, drop_all: bool) -> String {
        let mut slots = slots();
        let head = parse_request(raw, &mut slots).unwrap().unwrap();
        let mut out = Vec::new();
        let peer = PeerText::new(peer.parse().unwrap());
        let fwd = Forwarding {
            peer: &peer,
            trusted,
            client: &peer,
            drop_underscores: drop_all,
            request_id: b"rid",
        };
        head.write_backend(&mut out, &fwd);
        String::from_utf8(out).unwrap()
    }

    fn refused(raw: &[u8]) -> Option<HeadError> {
        let mut slots = slots();
        parse_request(raw, &mut slots).err()
    }

    #[test]
    fn request_targets() {
        for bad in [
            &b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET abc HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http:/x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(
                refused(bad),
                Some(HeadError::Malformed),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let out = backend_head(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", "10.0.0.1", false);
        assert!(out.starts_with("OPTIONS * HTTP/1.1\r\n"), "{out}");
        let out = backend_head(
            b"GET http://a.test?q=1 HTTP/1.1\r\nHost: b\r\n\r\n",
            "10.0.0.1",
            false,
        );
        assert!(
            out.starts_with("GET /?q=1 HTTP/1.1\r\nHost: a.test\r\n"),
            "{out}"
        );
        let out = backend_head(b"GET HTTPS://a.test HTTP/1.1\r\n\r\n", "10.0.0.1", false);
        assert!(
            out.starts_with("GET / HTTP/1.1\r\nHost: a.test\r\n"),
            "{out}"
        );
    }

    #[test]
    fn framing_fields_are_written_once_as_parsed() {
        let out = backend_head(
            b"PUT / HTTP/1.1\r\nHost: a\r\ncontent-length: 005\r\nX: 1\r\nContent-Length: 5\r\n\r\n",
            "10.0.0.1",
            false,
        );
        assert!(out.contains("\r\nContent-Length: 5\r\nX: 1\r\n"), "{out}");
        assert_eq!(out.matches("ength").count(), 1, "{out}");
        let out = backend_head(
            b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,Chunked ,\r\n\r\n",
            "10.0.0.1",
            false,
        );
        assert!(out.contains("\r\nTransfer-Encoding: chunked\r\n"), "{out}");
        for (raw, e) in [
            (&b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"[..], HeadError::UnsupportedCoding),
            (b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", HeadError::UnsupportedCoding),
            (b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n", HeadError::BadFraming),
            (b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n", HeadError::BadFraming),
            (b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", HeadError::BadFraming),
            (b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\n", HeadError::BadFraming),
            (b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n", HeadError::BadFraming),
        ] {
            assert_eq!(refused(raw), Some(e), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn client_address_fields() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 1.1.1.1\r\nx_forwarded_host: evil\r\nX-Forwarded_Proto: https\r\nX_Real_IP: 1.1.1.1\r\nX-Real-IP: 2.2.2.2\r\nForwarded: for=3.3.3.3\r\nContent_Length: 9\r\nX_Other: kept\r\n\r\n";
        let out = backend_head(raw, "198.51.100.1", false);
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nHost: a\r\nX_Other: kept\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-Host: a\r\nX-Forwarded-Proto: http\r\nX-Real-IP: 198.51.100.1\r\nX-Request-Id: rid\r\n\r\n"
        );
        // A trusted peer keeps Forwarded; lookalikes go whoever sends them.
        let out = backend_head(raw, "127.0.0.1", true);
        assert!(out.contains("Forwarded: for=3.3.3.3\r\n"), "{out}");
        for gone in ["X_F", "x_f", "X-Forwarded_", "X_R", "Content_"] {
            assert!(!out.contains(gone), "{out}");
        }
        // underscore_headers = "all" drops every name with `_`.
        let out = backend_head_with(raw, "198.51.100.1", false, true);
        assert!(!out.contains('_'), "{out}");
    }

    #[test]
    fn hop_by_hop_fields_are_recognised() {
        for name in [
            "Connection",
            "keep-alive",
            "TE",
            "transfer-encoding",
            "proxy-authenticate",
            "Proxy-Authorization",
            "proxy-connection",
            "proxy",
        ] {
            assert!(crate::proxy::headers::is_hop_by_hop(name), "{name}");
            assert_ne!(classify(name), Field::Other, "{name}");
        }
        assert_eq!(classify("X-Forwarded-For"), Field::ForwardedFor);
        assert_eq!(classify("x-real-ip"), Field::RealIp);
        assert_eq!(classify("X_Real_Ip"), Field::Lookalike);
        assert_eq!(classify("Transfer_Encoding"), Field::Lookalike);
        assert_eq!(classify("x_custom"), Field::Other);
    }

    #[test]
    fn rewrites_request_heads() {
        let raw = b"POST /a?b HTTP/1.1\r\nHost: chat.app.test\r\nConnection: keep-alive, x-secret\r\nKeep-Alive: 5\r\nX-Secret: 1\r\nTE: trailers\r\nProxy: http://evil\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Kept: yes\r\n\r\n";
        assert_eq!(
            backend_head(raw, "198.51.100.1", false),
            "POST /a?b HTTP/1.1\r\nHost: chat.app.test\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-Host: chat.app.test\r\nX-Forwarded-Proto: http\r\nX-Real-IP: 198.51.100.1\r\nX-Request-Id: rid\r\n\r\n"
        );
        assert_eq!(
            backend_head(raw, "127.0.0.1", true),
            "POST /a?b HTTP/1.1\r\nHost: chat.app.test\r\nTransfer-Encoding: chunked\r\nX-Forwarded-Proto: https\r\nX-Kept: yes\r\nX-Forwarded-For: 6.6.6.6, 127.0.0.1\r\nX-Forwarded-Host: chat.app.test\r\nX-Real-IP: 127.0.0.1\r\nX-Request-Id: rid\r\n\r\n"
        );
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        let raw = b"GET http://Chat.App.Test:80/x?y HTTP/1.1\r\nHost: other\r\n\r\n";
        let out = backend_head(raw, "10.0.0.1", false);
        assert!(
            out.starts_with("GET /x?y HTTP/1.1\r\nHost: Chat.App.Test:80\r\n"),
            "{out}"
        );
    }

    #[test]
    fn connection_cannot_drop_framing_or_host() {
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length, host, x-a\r\nContent-Length: 2\r\nX-A: 1\r\n\r\n";
        let out = backend_head(raw, "10.0.0.1", false);
        assert!(out.contains("Content-Length: 2\r\n"), "{out}");
        assert!(out.contains("Host: a\r\n"), "{out}");
        assert!(!out.contains("X-A"), "{out}");

        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        let mut slots = slots();
        let r = parse_response(raw, &mut slots, false).unwrap().unwrap();
        let mut out = Vec::new();
        r.write_client(&mut out, &ClientHead::default());
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("Content-Length"), "{out}");
        assert!(out.contains("Transfer-Encoding: chunked\r\n"), "{out}");
    }

    #[test]
    fn upgrades_keep_upgrade() {
        let raw =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let out = backend_head(raw, "10.0.0.1", false);
        assert!(out.contains("Upgrade: websocket\r\n"), "{out}");
        assert!(out.ends_with("Connection: upgrade\r\n\r\n"), "{out}");
    }

    #[test]
    fn request_framing() {
        let framing = |raw: &[u8]| {
            let mut slots = slots();
            parse_request(raw, &mut slots).map(|h| h.unwrap().body)
        };
        assert_eq!(
            framing(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Framing::Done)
        );
        assert_eq!(
            framing(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\n\r\n"),
            Ok(Framing::Length(7))
        );
        assert_eq!(
            framing(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n"),
            Ok(Framing::Length(7))
        );
        assert_eq!(
            framing(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\nContent-Length: 8\r\n\r\n"),
            Err(HeadError::BadFraming)
        );
        assert_eq!(
            framing(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"),
            Err(HeadError::BadFraming)
        );
        assert_eq!(
            framing(b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 7\r\n\r\n"),
            Err(HeadError::BadFraming)
        );
        assert_eq!(
            framing(b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Err(HeadError::UnsupportedCoding)
        );
        assert_eq!(
            framing(b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n"),
            Err(HeadError::UnsupportedCoding)
        );
        assert_eq!(
            framing(b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Framing::CHUNKED)
        );
        assert_eq!(
            framing(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        let mut slots = slots();
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost:", &mut slots),
            Ok(None)
        ));
    }

    #[test]
    fn response_framing_and_reuse() {
        let parse = |raw: &[u8], head: bool| {
            let mut slots = slots();
            let r = parse_response(raw, &mut slots, head).unwrap().unwrap();
            (r.body, r.keep_alive)
        };
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(parse(ok, false), (Framing::Length(3), true));
        assert_eq!(parse(ok, true), (Framing::Done, true));
        assert_eq!(
            parse(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            (Framing::CHUNKED, true)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\n\r\n", false),
            (Framing::UntilClose, false)
        );
        assert_eq!(
            parse(b"HTTP/1.1 204 No Content\r\n\r\n", false),
            (Framing::Done, true)
        );
        assert_eq!(
            parse(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                false
            ),
            (Framing::Length(1), false)
        );
        assert_eq!(
            parse(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false),
            (Framing::Length(1), false)
        );
    }

    #[test]
    fn rewrites_response_heads() {
        let raw = b"HTTP/1.1 200 Fine\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nContent-Length: 2\r\nX-App: yes\r\n\r\nok";
        let mut slots = slots();
        let r = parse_response(raw, &mut slots, false).unwrap().unwrap();
        let mut out = Vec::new();
        r.write_client(&mut out, &ClientHead::default());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 Fine\r\nContent-Length: 2\r\nX-App: yes\r\n\r\n"
        );
        let mut out = Vec::new();
        r.write_client(
            &mut out,
            &ClientHead {
                close: true,
                ..ClientHead::default()
            },
        );
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("Connection: close\r\n\r\n"));
    }

    #[test]
    fn the_load_header_is_taken_out() {
        let raw = b"HTTP/1.1 200 OK\r\nX-Backend-Load: 42\r\nContent-Length: 0\r\nx-backend-loads: 1\r\n\r\n";
        let mut slots = slots();
        let r = parse_response(raw, &mut slots, false).unwrap().unwrap();
        let mut out = Vec::new();
        let how = ClientHead {
            load_header: b"x-backend-load",
            ..ClientHead::default()
        };
        assert_eq!(r.write_client(&mut out, &how), Some(&b"42"[..]));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx-backend-loads: 1\r\n\r\n"
        );
        // Off: relayed as any field.
        let mut out = Vec::new();
        assert_eq!(r.write_client(&mut out, &ClientHead::default()), None);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("X-Backend-Load: 42"));
    }
}
