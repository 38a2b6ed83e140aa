//! The field rules of `proxy::fields` applied to a `HeaderMap`: the HTTP/2 path's writer.
//! The usual request needs no removal at all (fields the router replaces are overwritten
//! in place), so it costs one classification per field and the inserts of our own.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::proxy::auth::is_copied;
use crate::proxy::fields::{
    classify, request_fate, response_fate, set_fields, Connection, Fate, Field, FieldWriter,
    Forwarding, Kept, SetField,
};
use crate::proxy::h1::framing::forbidden_trailer;

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Request-Id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest forwarding value built on the stack; a longer chain allocates.
const STACK_VALUE: usize = 512;

/// Rewrites a request's fields for the backend as [`request_fate`] says, then sets the
/// router's own ([`set_fields`]), X-Forwarded-Host from `host`. HTTP/2 has no hop-by-hop
/// fields (the h2 crate refuses them), but the rules are applied all the same. A value
/// equal to one of `known` (made once per connection or request) is shared, not copied.
pub fn rewrite_request(
    headers: &mut HeaderMap,
    fwd: &Forwarding<'_>,
    host: &HeaderValue,
    known: &[&HeaderValue],
) {
    let mut kept = Kept::default();
    let mut drop = false;
    for name in headers.keys() {
        let kind = classify(name.as_str());
        match request_fate(kind, name.as_str(), fwd) {
            Fate::Drop => drop = true,
            Fate::KeepInstead => kept.note(kind),
            // Framing: the HTTP/1 client to the backend frames the body itself.
            Fate::Framing => drop |= kind == Field::TransferEncoding,
            Fate::Keep | Fate::Replace => {}
        }
    }
    if drop || headers.contains_key(header::CONNECTION) {
        remove_dropped(headers, fwd);
    }
    let mut chain = [0u8; STACK_VALUE];
    let mut xff = Value::new(&mut chain);
    if fwd.trusted {
        for v in headers.get_all(X_FORWARDED_FOR) {
            xff.push(v.as_bytes());
            xff.push(b",");
        }
    }
    let chain_text = xff.take();
    let mut w = MapWriter {
        headers,
        known,
        field: SetField::ForwardedFor,
        buf: [0; STACK_VALUE],
        len: 0,
        spill: None,
    };
    set_fields(
        &mut w,
        fwd,
        kept,
        Some(host.as_bytes()),
        std::iter::once(&chain_text[..]),
    );
}

/// The slow path: removes the fields that go, those a `Connection` names included.
fn remove_dropped(headers: &mut HeaderMap, fwd: &Forwarding<'_>) {
    remove_where(headers, |name, named| {
        let kind = classify(name);
        match request_fate(kind, name, fwd) {
            Fate::Drop => true,
            Fate::Framing => kind == Field::TransferEncoding,
            Fate::Keep => kind != Field::Host && named(name),
            Fate::Replace | Fate::KeepInstead => false,
        }
    });
    headers.remove(header::UPGRADE);
}

/// Removes the fields `gone(name, named_by_connection)` picks.
fn remove_where(headers: &mut HeaderMap, gone: impl Fn(&str, &dyn Fn(&str) -> bool) -> bool) {
    let values: Vec<HeaderValue> = headers
        .get_all(header::CONNECTION)
        .iter()
        .cloned()
        .collect();
    let mut connection = Connection::default();
    for v in &values {
        // Past the token limit the rest stay: HTTP/2 has no Connection field anyway.
        let _ = connection.add(v.as_bytes());
    }
    let named = |n: &str| connection.names(n);
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| gone(n.as_str(), &named))
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
}

/// Rewrites a backend's response fields for the client as [`response_fate`] says (no
/// upgrades on this path), leaving the load header to the caller.
pub fn rewrite_response(headers: &mut HeaderMap) {
    let drop = headers
        .keys()
        .any(|n| response_fate(classify(n.as_str()), false) == Fate::Drop);
    if !drop {
        return;
    }
    remove_where(headers, |name, named| {
        let fate = response_fate(classify(name), false);
        fate == Fate::Drop || (fate == Fate::Keep && named(name))
    });
}

/// A request's `Trailer` field says which trailers hyper's HTTP/1 client writes to the
/// backend (it drops the others): the names the HTTP/1 path refuses in a trailer (framing,
/// routing, credentials, the client's address; any case, `_` as `-`) and the fields forward
/// auth grants (`copy`) are taken out of it, and the field itself when none is left, so a
/// client's HTTP/2 trailers forge none of them to a backend that merges trailers into its
/// fields.
pub fn limit_trailers(headers: &mut HeaderMap, copy: &[HeaderName]) {
    if !headers.contains_key(header::TRAILER) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty() && !forbidden_trailer(n.as_bytes()) && !is_copied(n, copy))
        .map(str::to_owned)
        .collect();
    headers.remove(header::TRAILER);
    if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
        if !kept.is_empty() {
            headers.insert(header::TRAILER, v);
        }
    }
}

/// A request body's frame on its way to an HTTP/2 backend: a trailers frame loses the
/// fields a trailer may not carry on the HTTP/1 path ([`forbidden_trailer`]) and the
/// fields forward auth grants (`copy`, any case, `_` as `-`); data frames pass as they are.
pub fn clean_trailers(
    frame: hyper::body::Frame<bytes::Bytes>,
    copy: &[HeaderName],
) -> hyper::body::Frame<bytes::Bytes> {
    let mut trailers = match frame.into_trailers() {
        Ok(t) => t,
        Err(data) => return data,
    };
    let gone: Vec<HeaderName> = trailers
        .keys()
        .filter(|n| forbidden_trailer(n.as_str().as_bytes()) || is_copied(n.as_str(), copy))
        .cloned()
        .collect();
    for name in gone {
        trailers.remove(name);
    }
    hyper::body::Frame::trailers(trailers)
}

/// HTTP/2 clients may split `Cookie` into several fields; HTTP/1.1 wants one, joined with
/// "; " (RFC 9113 §8.2.3).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

/// A value assembled on the stack, spilling to the heap when it outgrows it.
struct Value<'b> {
    buf: &'b mut [u8; STACK_VALUE],
    len: usize,
    spill: Option<Vec<u8>>,
}

impl<'b> Value<'b> {
    fn new(buf: &'b mut [u8; STACK_VALUE]) -> Self {
        Value {
            buf,
            len: 0,
            spill: None,
        }
    }

    fn push(&mut self, part: &[u8]) {
        if let Some(v) = &mut self.spill {
            v.extend_from_slice(part);
        } else if self.len + part.len() <= STACK_VALUE {
            self.buf[self.len..self.len + part.len()].copy_from_slice(part);
            self.len += part.len();
        } else {
            let mut v = self.buf[..self.len].to_vec();
            v.extend_from_slice(part);
            self.spill = Some(v);
        }
    }

    fn take(self) -> std::borrow::Cow<'b, [u8]> {
        match self.spill {
            Some(v) => std::borrow::Cow::Owned(v),
            None => std::borrow::Cow::Borrowed(&self.buf[..self.len]),
        }
    }
}

/// [`set_fields`] inserting into a `HeaderMap`.
struct MapWriter<'m> {
    headers: &'m mut HeaderMap,
    known: &'m [&'m HeaderValue],
    field: SetField,
    buf: [u8; STACK_VALUE],
    len: usize,
    spill: Option<Vec<u8>>,
}

impl FieldWriter for MapWriter<'_> {
    fn begin(&mut self, field: SetField) {
        self.field = field;
        self.len = 0;
        self.spill = None;
    }

    fn push(&mut self, part: &[u8]) {
        let mut v = Value {
            buf: &mut self.buf,
            len: self.len,
            spill: self.spill.take(),
        };
        v.push(part);
        self.len = v.len;
        self.spill = v.spill;
    }

    fn end(&mut self) {
        let bytes = match &self.spill {
            Some(v) => &v[..],
            None => &self.buf[..self.len],
        };
        let value = match self.known.iter().find(|k| k.as_bytes() == bytes) {
            // A shared copy: no allocation.
            Some(k) => Ok((*k).clone()),
            None => HeaderValue::from_bytes(bytes),
        };
        if let Ok(value) = value {
            self.headers
                .insert(HeaderName::from_static(self.field.lower()), value);
        }
    }
}
