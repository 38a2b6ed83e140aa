//! HTTP/1 response heads on the fast path: a backend's head parsed in place and rewritten
//! for the client by the field rules of `proxy::fields`, and the router's own answers.

use super::framing::Framing;
use super::head::{field, framing_field, parse_error, HeadError, HeaderSlots, Kinds, Lengths};
use super::head::{MAX_HEAD, MAX_HEADERS};
use crate::access_log::push_u64;
use crate::proxy::answer::LocalAnswer;
use crate::proxy::fields::{classify, response_fate, Connection, Fate, Field};

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
            let keep = match response_fate(*kind, upgrade) {
                // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; drop the latter.
                Fate::Framing => {
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
                Fate::Drop | Fate::Replace => false,
                // By length first: the usual field costs one comparison.
                _ if h.name.len() == load_header.len()
                    && h.name.as_bytes().eq_ignore_ascii_case(load_header) =>
                {
                    load = Some(h.value);
                    false
                }
                _ => *kind == Field::Upgrade || !self.connection.names(h.name),
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

impl<'b> ResponseHead<'_, 'b> {
    /// The fields the client gets on HTTP/2, by the same rules as [`Self::write_client`]:
    /// hop-by-hop, framing (HTTP/2 frames itself; a length is kept) and the request ID out,
    /// the load header taken out and returned. A field that is not valid for a `HeaderMap`
    /// (it cannot be on HTTP/2) is left out.
    pub fn to_header_map(&self, map: &mut http::HeaderMap, load_header: &[u8]) -> Option<&'b [u8]> {
        let mut load = None;
        map.reserve(self.headers.len());
        for (h, kind) in self.headers.iter().zip(&self.kinds) {
            let keep = match response_fate(*kind, false) {
                Fate::Framing => *kind == Field::ContentLength && !self.has_coding,
                Fate::Drop | Fate::Replace => false,
                _ if h.name.len() == load_header.len()
                    && h.name.as_bytes().eq_ignore_ascii_case(load_header) =>
                {
                    load = Some(h.value);
                    false
                }
                _ => !self.connection.names(h.name),
            };
            if !keep {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(h.name.as_bytes()),
                http::HeaderValue::from_bytes(h.value),
            ) {
                map.append(n, v);
            }
        }
        load
    }
}

/// Whether a response with `status` never has a body, whatever its fields say (RFC 9112
/// §6.3): 1xx, 204 and 304.
pub fn never_has_body(status: u16) -> bool {
    matches!(status, 100..=199 | 204 | 304)
}

/// Writes a status code's three digits.
pub(super) fn write_status(out: &mut Vec<u8>, status: u16) {
    let s = status.min(999);
    out.extend_from_slice(&[
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]);
}

/// Writes a local answer's head, and its body unless it is streamed (then the head says
/// `Transfer-Encoding: chunked` and the caller relays the body). The request's ID goes
/// with it when it has one.
pub fn write_local(
    out: &mut Vec<u8>,
    answer: &LocalAnswer,
    close: bool,
    request_id: Option<&[u8]>,
    head_request: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    write_status(out, answer.status.as_u16());
    out.push(b' ');
    out.extend_from_slice(answer.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let [text, retry] = answer.implied();
    if let Some((title, _, value)) = text {
        field(out, title.as_bytes(), value.as_bytes());
    }
    // A 1xx, 204 or 304 (an auth service's, relayed) has no body and no framing fields:
    // a chunked terminator after it would be read as the start of the next response.
    let status_bodiless = never_has_body(answer.status.as_u16());
    match answer.body.as_bytes() {
        _ if status_bodiless => {}
        Some(body) => {
            out.extend_from_slice(b"Content-Length: ");
            push_u64(out, body.len() as u64);
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    if let Some((title, _, value)) = retry {
        field(out, title.as_bytes(), value.as_bytes());
    }
    for (name, value) in &answer.headers {
        // Framing and connection fields are ours to write.
        if response_fate(classify(name.as_str()), false) == Fate::Keep {
            field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if let Some(id) = request_id {
        field(out, b"X-Request-Id", id);
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // A HEAD's answer has the fields a GET's would, and no body (RFC 9110 §9.3.2).
    if let Some(body) = answer
        .body
        .as_bytes()
        .filter(|_| !head_request && !status_bodiless)
    {
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod tests {
    use super::super::head::slots;
    use super::*;

    #[test]
    fn transfer_encoding_wins_over_content_length() {
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
