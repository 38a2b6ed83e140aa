//! Where an HTTP/1.1 message body ends (RFC 9112 §6), found while its bytes pass through
//! unchanged: bodies are relayed verbatim, chunk framing included, never re-encoded.
//!
//! Because the bytes are relayed as they came, every chunk line and trailer is checked
//! against the grammar byte by byte (RFC 9112 §7.1); anything a stricter or laxer parser
//! behind us could read differently is refused. Valid chunk extensions and trailers pass
//! through; trailers naming a framing, routing, hop-by-hop or credential field do not.

/// A body's framing could not be followed; the connection cannot be trusted any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct FramingError;

/// How far a body has been seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (or its end was reached).
    Done,
    /// `Content-Length`: bytes still to come.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunk),
    /// A response without length: everything until the backend closes.
    UntilClose,
}

/// Position inside a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    at: At,
    /// The chunk size being read, then the data bytes still to come.
    size: u64,
    /// Bytes in the current chunk line, or in the whole trailer section.
    line: u32,
    /// Hash of the trailer field name being read (lowercase, `_` as `-`).
    name: u64,
    /// Every trailer field is refused ([`Framing::refuse_trailers`]).
    no_trailers: bool,
}

/// Where in the chunked grammar the next byte falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Before the first digit of a chunk size.
    SizeStart,
    /// Inside the hex size.
    Size,
    /// Whitespace after the size: only `;` may follow.
    SizeWs,
    /// After `;` (and whitespace): an extension name must start.
    ExtStart,
    /// Inside an extension name.
    ExtName,
    /// Whitespace after an extension name: `=` or `;` must follow.
    ExtNameWs,
    /// After `=` (and whitespace): a token or quoted value must start.
    ExtValue,
    /// Inside a token value.
    ExtToken,
    /// Inside a quoted value.
    Quoted,
    /// After a backslash in a quoted value.
    QuotedEscape,
    /// Right after a value: whitespace, `;` or CR.
    ExtValueEnd,
    /// Whitespace after a value: only `;` may follow.
    ExtValueWs,
    /// After the size line's CR.
    SizeLf,
    /// Chunk data (`size` bytes left).
    Data,
    /// After chunk data, expecting CR.
    DataCr,
    /// After chunk data's CR.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field name.
    TrailerName,
    /// Inside a trailer field value.
    TrailerValue,
    /// After a trailer line's CR.
    TrailerLf,
    /// After the final empty line's CR.
    FinalLf,
}

/// Significant hex digits allowed in a chunk size: 2^60 bytes is more than any body.
const MAX_SIZE_DIGITS: u32 = 15;
/// Longest chunk-size line (with extensions) we read.
const MAX_CHUNK_LINE: u32 = 4096;
/// Longest trailer section we read.
const MAX_TRAILERS: u32 = 16 * 1024;

/// `tchar` (RFC 9110 §5.6.2).
const TCHAR: [bool; 256] = byte_table(b"!#$%&'*+-.^_`|~");
/// `field-vchar` plus SP and HTAB: VCHAR, obs-text, whitespace; no control bytes.
const FIELD_VALUE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0x20;
    while b < 256 {
        t[b] = b != 0x7f;
        b += 1;
    }
    t[b'\t' as usize] = true;
    t
};
/// `qdtext` (RFC 9110 §5.6.4): like a field value but no `"` or `\`.
const QDTEXT: [bool; 256] = {
    let mut t = FIELD_VALUE;
    t[b'"' as usize] = false;
    t[b'\\' as usize] = false;
    t
};

/// A table of the alphanumerics plus `extra`.
const fn byte_table(extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}

/// Whether `b` is a `tchar`.
pub fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// One byte of a field name into its hash: case-insensitive, `_` read as `-` (as CGI-style
/// backends read names).
const fn name_step(hash: u64, b: u8) -> u64 {
    let b = if b == b'_' {
        b'-'
    } else {
        b.to_ascii_lowercase()
    };
    (hash ^ b as u64).wrapping_mul(FNV_PRIME)
}

const fn name_hash(name: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    let mut i = 0;
    while i < name.len() {
        h = name_step(h, name[i]);
        i += 1;
    }
    h
}

/// Fields a trailer may not carry (RFC 9110 §6.5.1): framing, routing, hop-by-hop,
/// credentials and the client-address fields, which a backend that merges trailers into
/// its headers would otherwise take from the client. A hash collision only refuses a body.
const FORBIDDEN_TRAILERS: [u64; 23] = {
    const NAMES: [&[u8]; 23] = [
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"authorization",
        b"cookie",
        b"set-cookie",
        b"expect",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"forwarded",
        b"x-real-ip",
    ];
    let mut out = [0u64; 23];
    let mut i = 0;
    while i < NAMES.len() {
        out[i] = name_hash(NAMES[i]);
        i += 1;
    }
    out
};

/// Whether a trailer named `name` is refused on the HTTP/1 path (any case, `_` as `-`):
/// the HTTP/2 path asks too, for the trailers hyper's client would write to a backend.
pub fn forbidden_trailer(name: &[u8]) -> bool {
    FORBIDDEN_TRAILERS.contains(&name_hash(name))
}

impl Framing {
    /// A chunked body at its start.
    pub const CHUNKED: Framing = Framing::Chunked(Chunk {
        at: At::SizeStart,
        size: 0,
        line: 0,
        name: 0,
        no_trailers: false,
    });

    /// Refuses every trailer field of a chunked body, not only the forbidden ones: for a
    /// request to a service whose forward auth grants fields (`router.auth-headers=`),
    /// which a trailer of that name would otherwise forge to a backend that merges
    /// trailers into its fields.
    pub fn refuse_trailers(&mut self) {
        if let Framing::Chunked(c) = self {
            c.no_trailers = true;
        }
    }

    /// Whether the body has ended (an `UntilClose` body ends only at EOF).
    pub fn is_done(&self) -> bool {
        matches!(self, Framing::Done)
    }

    /// Whether the body is chunked (and not yet ended).
    pub fn is_chunked(&self) -> bool {
        matches!(self, Framing::Chunked(_))
    }

    /// Takes as much of `buf` as belongs to the body and returns how many bytes that is;
    /// bytes after the body's end are left for whoever comes next.
    pub fn advance(&mut self, buf: &[u8]) -> Result<usize, FramingError> {
        self.step(buf, |_| {})
    }

    /// As [`Framing::advance`], and appends the body's payload to `out`: the data of a
    /// chunked body without its framing, or the bytes themselves for other bodies. For
    /// recipients that cannot take chunked (HTTP/1.0 clients).
    pub fn advance_payload(
        &mut self,
        buf: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<usize, FramingError> {
        if self.is_chunked() {
            self.step(buf, |data| out.extend_from_slice(data))
        } else {
            let n = self.advance(buf)?;
            out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    fn step(&mut self, buf: &[u8], data: impl FnMut(&[u8])) -> Result<usize, FramingError> {
        match self {
            Framing::Done => Ok(0),
            Framing::UntilClose => Ok(buf.len()),
            Framing::Length(left) => {
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                if *left == 0 {
                    *self = Framing::Done;
                }
                // n <= buf.len(), so it fits in usize.
                Ok(n as usize)
            }
            Framing::Chunked(state) => {
                let (used, done) = advance_chunked(state, buf, data)?;
                if done {
                    *self = Framing::Done;
                }
                Ok(used)
            }
        }
    }
}

/// Steps the chunk state machine over `buf`, handing chunk data to `data`; returns bytes
/// used and whether the body ended.
fn advance_chunked(
    c: &mut Chunk,
    buf: &[u8],
    mut data: impl FnMut(&[u8]),
) -> Result<(usize, bool), FramingError> {
    let mut i = 0;
    while i < buf.len() {
        if c.at == At::Data {
            let n = c.size.min((buf.len() - i) as u64);
            // n <= buf.len() - i, so it fits in usize.
            let n = n as usize;
            data(&buf[i..i + n]);
            i += n;
            c.size -= n as u64;
            if c.size == 0 {
                c.at = At::DataCr;
            }
            continue;
        }
        let b = buf[i];
        i += 1;
        match c.at {
            At::SizeStart | At::Size => {
                let at_start = c.at == At::SizeStart;
                c.at = match b {
                    b'\r' if !at_start => At::SizeLf,
                    b';' if !at_start => At::ExtStart,
                    b' ' | b'\t' if !at_start => At::SizeWs,
                    _ => {
                        let d = (b as char).to_digit(16).ok_or(FramingError)?;
                        if c.size >> (4 * (MAX_SIZE_DIGITS - 1)) != 0 {
                            return Err(FramingError);
                        }
                        c.size = c.size << 4 | u64::from(d);
                        At::Size
                    }
                };
            }
            At::SizeWs | At::ExtValueWs => match b {
                b' ' | b'\t' => {}
                b';' => c.at = At::ExtStart,
                _ => return Err(FramingError),
            },
            At::ExtStart => match b {
                b' ' | b'\t' => {}
                _ if is_tchar(b) => c.at = At::ExtName,
                _ => return Err(FramingError),
            },
            At::ExtName => match b {
                b'\r' => c.at = At::SizeLf,
                b';' => c.at = At::ExtStart,
                b'=' => c.at = At::ExtValue,
                b' ' | b'\t' => c.at = At::ExtNameWs,
                _ if is_tchar(b) => {}
                _ => return Err(FramingError),
            },
            At::ExtNameWs => match b {
                b' ' | b'\t' => {}
                b';' => c.at = At::ExtStart,
                b'=' => c.at = At::ExtValue,
                _ => return Err(FramingError),
            },
            At::ExtValue => match b {
                b' ' | b'\t' => {}
                b'"' => c.at = At::Quoted,
                _ if is_tchar(b) => c.at = At::ExtToken,
                _ => return Err(FramingError),
            },
            At::ExtToken | At::ExtValueEnd => match b {
                b'\r' => c.at = At::SizeLf,
                b';' => c.at = At::ExtStart,
                b' ' | b'\t' => c.at = At::ExtValueWs,
                _ if c.at == At::ExtToken && is_tchar(b) => {}
                _ => return Err(FramingError),
            },
            At::Quoted => match b {
                b'"' => c.at = At::ExtValueEnd,
                b'\\' => c.at = At::QuotedEscape,
                _ if QDTEXT[usize::from(b)] => {}
                _ => return Err(FramingError),
            },
            At::QuotedEscape => {
                if !FIELD_VALUE[usize::from(b)] {
                    return Err(FramingError);
                }
                c.at = At::Quoted;
            }
            At::SizeLf => {
                expect(b, b'\n')?;
                c.line = 0;
                c.at = if c.size == 0 {
                    At::TrailerStart
                } else {
                    At::Data
                };
                continue;
            }
            At::DataCr => {
                expect(b, b'\r')?;
                c.at = At::DataLf;
                continue;
            }
            At::DataLf => {
                expect(b, b'\n')?;
                c.at = At::SizeStart;
                continue;
            }
            At::TrailerStart => match b {
                b'\r' => c.at = At::FinalLf,
                // A field line starts with its name: no folding, no bare LF, no empty name.
                _ if is_tchar(b) && !c.no_trailers => {
                    c.name = name_step(FNV_OFFSET, b);
                    c.at = At::TrailerName;
                }
                _ => return Err(FramingError),
            },
            At::TrailerName => match b {
                // `name:` with nothing between: whitespace before the colon is refused.
                b':' => {
                    if FORBIDDEN_TRAILERS.contains(&c.name) {
                        return Err(FramingError);
                    }
                    c.at = At::TrailerValue;
                }
                _ if is_tchar(b) => c.name = name_step(c.name, b),
                _ => return Err(FramingError),
            },
            At::TrailerValue => match b {
                b'\r' => c.at = At::TrailerLf,
                _ if FIELD_VALUE[usize::from(b)] => {}
                _ => return Err(FramingError),
            },
            At::TrailerLf => expect(b, b'\n').map(|()| c.at = At::TrailerStart)?,
            At::FinalLf => {
                expect(b, b'\n')?;
                return Ok((i, true));
            }
            // Data is taken before a byte is read; this arm cannot be reached.
            At::Data => return Err(FramingError),
        }
        // Chunk-line and trailer bytes count toward their limits.
        c.line += 1;
        let limit = if matches!(
            c.at,
            At::TrailerStart | At::TrailerName | At::TrailerValue | At::TrailerLf | At::FinalLf
        ) {
            MAX_TRAILERS
        } else {
            MAX_CHUNK_LINE
        };
        if c.line > limit {
            return Err(FramingError);
        }
    }
    Ok((i, false))
}

/// `b` must be `want`.
fn expect(b: u8, want: u8) -> Result<(), FramingError> {
    if b == want {
        Ok(())
    } else {
        Err(FramingError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns the body length found.
    fn run(mut f: Framing, input: &[u8], step: usize) -> Result<usize, FramingError> {
        let mut used = 0;
        for piece in input.chunks(step) {
            let n = f.advance(piece)?;
            used += n;
            if n < piece.len() || f.is_done() {
                assert!(f.is_done(), "stopped early without ending");
                return Ok(used);
            }
        }
        assert!(f.is_done(), "body did not end");
        Ok(used)
    }

    /// Whether `input` is refused at some point, fed in one piece.
    fn refused(input: &[u8]) -> bool {
        let mut f = Framing::CHUNKED;
        f.advance(input).is_err()
    }

    #[test]
    fn length_stops_at_its_end() {
        let mut f = Framing::Length(5);
        assert_eq!(f.advance(b"abc").unwrap(), 3);
        assert_eq!(f.advance(b"deNEXT").unwrap(), 2);
        assert!(f.is_done());
        assert_eq!(f.advance(b"more").unwrap(), 0);
    }

    #[test]
    fn chunked_in_any_split_ends_exactly() {
        let body = b"4\r\nWiki\r\n5;name=value\r\npedia\r\nE ; a = \"q\\\"x\" ;b\r\n in\r\n\r\nchunks.\r\n000\r\nExpires: never \r\nX-N:\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET / HTTP/1.1\r\n");
        for step in 1..=input.len() {
            assert_eq!(
                run(Framing::CHUNKED, &input, step).unwrap(),
                body.len(),
                "step {step}"
            );
        }
    }

    #[test]
    fn chunked_without_trailers() {
        let body = b"1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n";
        assert_eq!(run(Framing::CHUNKED, body, 7).unwrap(), body.len());
        let mut strict = Framing::CHUNKED;
        strict.refuse_trailers();
        assert_eq!(run(strict, body, 7).unwrap(), body.len());
        assert!(run(strict, b"1\r\na\r\n0\r\nX-User: admin\r\n\r\n", 7).is_err());
    }

    #[test]
    fn payload_drops_the_framing() {
        let body = b"4;x=y\r\nWiki\r\n5\r\npedia\r\n0\r\nA: b\r\n\r\nNEXT";
        for step in 1..body.len() {
            let mut f = Framing::CHUNKED;
            let mut out = Vec::new();
            let mut used = 0;
            for piece in body.chunks(step) {
                used += f.advance_payload(piece, &mut out).unwrap();
                if f.is_done() {
                    break;
                }
            }
            assert_eq!(out, b"Wikipedia", "step {step}");
            assert_eq!(used, body.len() - 4, "step {step}");
        }
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"\r\n"[..],                            // no size
            b"g\r\n",                                // not hex
            b"4\nWiki\r\n0\r\n\r\n",                 // bare LF after size
            b"4\r\nWikiX\r\n",                       // data longer than its size
            b"4\r\nWiki\r\n0\r\n\n",                 // bare LF at the end
            b"1000000000000000\r\n",                 // size too large
            b"-1\r\n",                               // sign
            b"0x5\r\n",                              // prefix
            b"4;ext\nWiki",                          // bare LF after an extension
            b"5 6\r\n",                              // two sizes
            b"5 \r\n",                               // whitespace without an extension
            b" 5\r\n",                               // leading whitespace
            b"5;\r\n",                               // empty extension name
            b"5;\x00\r\n",                           // NUL
            b"5;a=\x01\r\n",                         // control byte in a value
            b"5;a=\"x\r\n",                          // open quote
            b"5;a \r\n",                             // whitespace after a name, then CR
            b"5;a=b \r\n",                           // whitespace after a value, then CR
            b"5;a=\r\n",                             // empty value
            b"5;a=b\"c\"\r\n",                       // quote inside a token
            b"5;a=\"b\"c\r\n",                       // token after a quoted value
            b"5;a=\"\x7f\"\r\n",                     // DEL in a quoted value
            b"5;a\x0b\r\n",                          // vertical tab
            b"0\r\n \r\n\r\n",                       // folded trailer
            b"0\r\nGET /x HTTP/1.1\r\n\r\n",         // a "trailer" without a colon
            b"0\r\nGET /admin?a:b HTTP/1.1\r\n\r\n", // a request line with a colon
            b"0\r\nA b: c\r\n\r\n",                  // space in a name
            b"0\r\nA : c\r\n\r\n",                   // space before the colon
            b"0\r\n: c\r\n\r\n",                     // empty name
            b"0\r\nA\x00: c\r\n\r\n",                // NUL in a name
            b"0\r\nA: c\x00\r\n\r\n",                // NUL in a value
            b"0\r\nA: c\x1b\r\n\r\n",                // escape in a value
            b"0\r\nA: c\rd\r\n\r\n",                 // bare CR in a value
            b"0\r\nContent-Length: 5\r\n\r\n",       // framing field
            b"0\r\ntransfer-encoding: chunked\r\n\r\n",
            b"0\r\nHost: admin\r\n\r\n",
            b"0\r\nX_Forwarded_For: 1.2.3.4\r\n\r\n", // lookalike of a client-address field
            b"0\r\nx-real-ip: 1.2.3.4\r\n\r\n",
        ] {
            assert!(refused(bad), "{:?}", String::from_utf8_lossy(bad));
            assert_eq!(run(Framing::CHUNKED, bad, 1), Err(FramingError), "{bad:?}");
        }
    }

    #[test]
    fn valid_extension_forms_pass() {
        for good in [
            &b"5;a\r\nhello\r\n0\r\n\r\n"[..],
            b"5 ;a\r\nhello\r\n0\r\n\r\n",
            b"5\t; a = b ; c\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"\"\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"x \\\" \\\\ y\"\r\nhello\r\n0\r\n\r\n",
            b"0005\r\nhello\r\n0\r\n\r\n",
            b"0;last=1\r\nA-B: c d \r\n\r\n",
            b"0\r\nA:\r\n\r\n",
            b"0\r\nX-Obs: caf\xc3\xa9\r\n\r\n",
        ] {
            assert_eq!(
                run(Framing::CHUNKED, good, 1).unwrap(),
                good.len(),
                "{:?}",
                String::from_utf8_lossy(good)
            );
        }
    }

    #[test]
    fn long_lines_are_refused() {
        let mut line = b"5;a=".to_vec();
        line.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE as usize));
        assert!(refused(&line));
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"A: bbbbbbbbbb\r\n");
        }
        assert!(refused(&trailers));
    }

    #[test]
    fn until_close_takes_everything() {
        let mut f = Framing::UntilClose;
        assert_eq!(f.advance(b"all of it").unwrap(), 9);
        assert!(!f.is_done());
    }
}
