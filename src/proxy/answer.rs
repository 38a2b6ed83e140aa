//! Answers the router gives itself: any status, any fields, and a short or streamed body.
//! An error's plain text, a redirect to https, and an auth service's 401 or 302 passed
//! through are all one `LocalAnswer`, written by each protocol path's writer.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

/// A body streamed from elsewhere (another service's answer, relayed). Its error is an
/// `io::Error`, not a boxed one: a boxed error's lifetime trips rustc's check that the
/// connection futures are `Send` (the higher-ranked lifetime bug).
pub type StreamBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// The body of a local answer.
#[derive(Debug)]
pub enum AnswerBody {
    /// A fixed text.
    Static(&'static str),
    /// Bytes made for this answer.
    Bytes(Bytes),
    /// Another service's body, streamed through.
    Stream(StreamBody),
}

impl AnswerBody {
    /// The body's bytes, when it is not streamed.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            AnswerBody::Static(s) => Some(s.as_bytes()),
            AnswerBody::Bytes(b) => Some(b),
            AnswerBody::Stream(_) => None,
        }
    }
}

/// A response the router makes itself.
#[derive(Debug)]
pub struct LocalAnswer {
    /// The status.
    pub status: StatusCode,
    /// Its fields, framing fields excluded (the writers add them). A `Static` body gets
    /// `Content-Type: text/plain` and a 503 `Retry-After` unless set here, so the usual
    /// answer needs no map (an empty `HeaderMap` does not allocate).
    pub headers: HeaderMap,
    /// The body.
    pub body: AnswerBody,
}

/// How long a 503's client is asked to wait before trying again.
pub const RETRY_AFTER: &str = "5";
/// The type of the router's own texts.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

impl LocalAnswer {
    /// A short plain-text answer; a 503 carries `Retry-After`.
    pub fn text(status: StatusCode, text: &'static str) -> Self {
        LocalAnswer {
            status,
            headers: HeaderMap::new(),
            body: AnswerBody::Static(text),
        }
    }

    /// The fields the writers add: `(name as HTTP/1 writes it, name, value)` for the
    /// content type of a static text and `Retry-After` on a 503, unless `headers` sets them.
    pub fn implied(&self) -> [Option<(&'static str, HeaderName, &'static str)>; 2] {
        let text = matches!(self.body, AnswerBody::Static(_))
            && !self.headers.contains_key(header::CONTENT_TYPE);
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE
            && !self.headers.contains_key(header::RETRY_AFTER);
        [
            text.then_some(("Content-Type", header::CONTENT_TYPE, TEXT_PLAIN)),
            retry.then_some(("Retry-After", header::RETRY_AFTER, RETRY_AFTER)),
        ]
    }

    /// A permanent redirect (308 keeps the method and body) to `location`.
    pub fn redirect(location: HeaderValue) -> Self {
        let mut a = LocalAnswer::text(StatusCode::PERMANENT_REDIRECT, "redirecting to https\n");
        a.headers.insert(header::LOCATION, location);
        a
    }

    /// Body bytes when the body is not streamed, else `None`.
    pub fn body_len(&self) -> Option<usize> {
        self.body.as_bytes().map(<[u8]>::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_and_redirects() {
        let a = LocalAnswer::text(StatusCode::SERVICE_UNAVAILABLE, "no\n");
        let implied: Vec<_> = a
            .implied()
            .into_iter()
            .flatten()
            .map(|f| (f.0, f.2))
            .collect();
        assert_eq!(
            implied,
            [("Content-Type", TEXT_PLAIN), ("Retry-After", "5")]
        );
        assert_eq!(a.body_len(), Some(3));
        let r = LocalAnswer::redirect(HeaderValue::from_static("https://a.example/x"));
        assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers[header::LOCATION], "https://a.example/x");
        assert_eq!(r.implied().into_iter().flatten().count(), 1);
    }
}
