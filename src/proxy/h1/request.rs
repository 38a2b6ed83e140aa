//! HTTP/1 request heads on the fast path: parsed in place with httparse (target checked by
//! `proxy::target`) and rewritten straight into the backend's write buffer by the field
//! rules of `proxy::fields`, so no header map is built and no header is copied twice.

use super::framing::Framing;
use super::head::{field, framing_field, parse_error, HeadError, HeaderSlots, Kinds, Lengths};
use super::head::{MAX_HEAD, MAX_HEADERS};
use crate::proxy::fields::{self, classify, request_fate, set_fields, Connection, Fate, Field};
use crate::proxy::fields::{FieldWriter, Forwarding, Kept, SetField};
use crate::proxy::target::{self, Target};

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
    let absolute = match target::check(method, target).map_err(|_| HeadError::Malformed)? {
        Target::Absolute { authority, rest } => Some((authority, rest)),
        _ => None,
    };

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
            // h2c was retired (RFC 9113): such a request goes on as a plain one.
            Field::Upgrade => has_upgrade = !fields::is_h2c_upgrade(h.value),
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

impl RequestHead<'_, '_> {
    /// Whether the method is HEAD (its response has no body).
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// Whether resending this request on another connection is harmless.
    pub fn is_idempotent(&self) -> bool {
        crate::proxy::attempts::is_idempotent(self.method)
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
    /// backend never answers them chunked), origin-form, each field as
    /// [`fields::request_fate`] says (framing fields written once as parsed: the body
    /// passes verbatim), then the router's own forwarding fields ([`fields::set_fields`]).
    /// `Connection` may not drop framing fields or Host: the backend must frame the body
    /// the way we relay it.
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
        let mut kept = Kept::default();
        let mut framing = false;
        let absolute = self.absolute_path.is_some();
        for (h, kind) in self.headers.iter().zip(&self.kinds) {
            match request_fate(*kind, h.name, fwd) {
                Fate::Drop | Fate::Replace => continue,
                Fate::Framing => {
                    framing_field(out, *kind, &mut framing, self.length);
                    continue;
                }
                Fate::KeepInstead => kept.note(*kind),
                Fate::Keep => match kind {
                    Field::Host if absolute => continue,
                    Field::Upgrade if !self.upgrade => continue,
                    Field::Other | Field::Forwarding if self.connection.names(h.name) => continue,
                    _ => {}
                },
            }
            field(out, h.name.as_bytes(), h.value);
        }
        if absolute {
            if let Some(host) = self.host {
                field(out, b"Host", host);
            }
        }
        set_fields(&mut Bytes(out), fwd, kept, self.host, self.forwarded_for());
        if self.upgrade {
            out.extend_from_slice(b"Connection: upgrade\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// [`fields::set_fields`] writing HTTP/1 field lines.
struct Bytes<'a>(&'a mut Vec<u8>);

impl FieldWriter for Bytes<'_> {
    fn begin(&mut self, field: SetField) {
        self.0.extend_from_slice(field.title().as_bytes());
        self.0.extend_from_slice(b": ");
    }
    fn push(&mut self, part: &[u8]) {
        self.0.extend_from_slice(part);
    }
    fn end(&mut self) {
        self.0.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::super::head::slots;
    use super::*;
    use crate::proxy::fields::{PeerText, Scheme};

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
            scheme: Scheme::Http,
            port: "80",
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
            "GET / HTTP/1.1\r\nHost: a\r\nX_Other: kept\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-Host: a\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: 80\r\nX-Real-IP: 198.51.100.1\r\nX-Request-Id: rid\r\n\r\n"
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
            "POST /a?b HTTP/1.1\r\nHost: chat.app.test\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-Host: chat.app.test\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: 80\r\nX-Real-IP: 198.51.100.1\r\nX-Request-Id: rid\r\n\r\n"
        );
        assert_eq!(
            backend_head(raw, "127.0.0.1", true),
            "POST /a?b HTTP/1.1\r\nHost: chat.app.test\r\nTransfer-Encoding: chunked\r\nX-Forwarded-Proto: https\r\nX-Kept: yes\r\nX-Forwarded-For: 6.6.6.6, 127.0.0.1\r\nX-Forwarded-Host: chat.app.test\r\nX-Forwarded-Port: 80\r\nX-Real-IP: 127.0.0.1\r\nX-Request-Id: rid\r\n\r\n"
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
    fn h2c_upgrades_and_the_forwarding_family() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
        let mut slots = slots();
        let head = parse_request(raw, &mut slots).unwrap().unwrap();
        assert!(!head.upgrade);
        let out = backend_head(raw, "10.0.0.1", false);
        assert!(!out.contains("pgrade") && !out.contains("HTTP2"), "{out}");
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Port: 1\r\nX-Forwarded-Ssl: on\r\nX-Client-IP: 6.6.6.6\r\nX-Forwarded-Prefix: /x\r\n\r\n";
        let out = backend_head(raw, "10.0.0.1", false);
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Host: a\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: 80\r\nX-Real-IP: 10.0.0.1\r\nX-Request-Id: rid\r\n\r\n"
        );
        let out = backend_head(raw, "127.0.0.1", true);
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Port: 1\r\nX-Forwarded-Ssl: on\r\nX-Client-IP: 6.6.6.6\r\nX-Forwarded-Prefix: /x\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Host: a\r\nX-Forwarded-Proto: http\r\nX-Real-IP: 127.0.0.1\r\nX-Request-Id: rid\r\n\r\n"
        );
    }
}
