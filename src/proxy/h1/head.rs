//! What HTTP/1 request and response heads share on the fast path: header slots for
//! httparse, the refusals, body lengths from the framing fields, and the small writers.
//! Requests are in `request.rs`, responses in `response.rs`, and the field rules both
//! paths share in `proxy::fields`.

use std::mem::MaybeUninit;

use http::StatusCode;

use crate::access_log::push_u64;
use crate::proxy::fields::{Field, TooManyTokens};

/// Most header fields in one head (as hyper).
pub const MAX_HEADERS: usize = 100;
/// Largest head we read; more gets 431.
pub const MAX_HEAD: usize = 64 * 1024;

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

impl HeadError {
    /// The short body the client gets with [`HeadError::status`].
    pub fn text(self) -> &'static str {
        match self {
            HeadError::TooLarge => "request header too large\n",
            HeadError::UnsupportedCoding => "unsupported transfer coding\n",
            HeadError::Malformed | HeadError::BadFraming => "bad request\n",
        }
    }
}

impl From<TooManyTokens> for HeadError {
    fn from(_: TooManyTokens) -> Self {
        HeadError::TooLarge
    }
}

pub(super) fn parse_error(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooLarge,
        _ => HeadError::Malformed,
    }
}

/// Each field's kind, in order.
pub(super) type Kinds = [Field; MAX_HEADERS];

/// Body framing from the Content-Length and Transfer-Encoding fields (RFC 9112 §6.3).
/// Both are re-written from what is parsed here, never relayed as they came, so a repeated
/// or oddly spelled value reaches the next parser as one plain value.
#[derive(Debug, Default)]
pub(super) struct Lengths {
    pub(super) length: Option<u64>,
    /// `chunked` codings seen, in every Transfer-Encoding field.
    pub(super) chunked: u8,
    /// Any other coding seen.
    pub(super) other_coding: bool,
    pub(super) seen_te: bool,
}

impl Lengths {
    pub(super) fn content_length(&mut self, value: &[u8]) -> Result<(), HeadError> {
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

    pub(super) fn transfer_encoding(&mut self, value: &[u8]) {
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
    pub(super) fn just_chunked(&self) -> bool {
        self.chunked == 1 && !self.other_coding
    }
}

/// Writes the framing fields a head had, as parsed: one `Content-Length: N` or one
/// `Transfer-Encoding: chunked`, at the place of the first such field.
pub(super) fn framing_field(
    out: &mut Vec<u8>,
    kind: Field,
    written: &mut bool,
    length: Option<u64>,
) {
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

pub(super) fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}
