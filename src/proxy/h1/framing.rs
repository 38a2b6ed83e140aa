//! Where an HTTP/1.1 message body ends (RFC 9112 §6), found while its bytes pass through
//! unchanged: bodies are relayed verbatim, chunk framing included, never re-encoded.

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
pub enum Chunk {
    /// Reading the hex size: its value so far and how many digits.
    Size(u64, u8),
    /// Skipping a chunk extension up to CR, with the size read before it.
    Ext(u64),
    /// After the size line's CR.
    SizeLf(u64),
    /// Chunk data still to come.
    Data(u64),
    /// After chunk data, expecting CR.
    DataCr,
    /// After chunk data's CR.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field line; whether its colon was seen.
    Trailer(bool),
    /// After a trailer line's CR.
    TrailerLf,
    /// After the final empty line's CR.
    FinalLf,
}

/// Hex digits allowed in a chunk size: 2^60 bytes is more than any body.
const MAX_SIZE_DIGITS: u8 = 15;

impl Framing {
    /// A chunked body at its start.
    pub const CHUNKED: Framing = Framing::Chunked(Chunk::Size(0, 0));

    /// Whether the body has ended (an `UntilClose` body ends only at EOF).
    pub fn is_done(&self) -> bool {
        matches!(self, Framing::Done)
    }

    /// Takes as much of `buf` as belongs to the body and returns how many bytes that is;
    /// bytes after the body's end are left for whoever comes next.
    pub fn advance(&mut self, buf: &[u8]) -> Result<usize, FramingError> {
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
                let (used, done) = advance_chunked(state, buf)?;
                if done {
                    *self = Framing::Done;
                }
                Ok(used)
            }
        }
    }
}

/// Steps the chunk state machine over `buf`; returns bytes used and whether the body ended.
/// Bare LF and anything but hex in sizes are refused: lenient chunk parsing is how requests
/// get smuggled past one server and not the next.
fn advance_chunked(state: &mut Chunk, buf: &[u8]) -> Result<(usize, bool), FramingError> {
    let mut i = 0;
    while i < buf.len() {
        let b = buf[i];
        match *state {
            Chunk::Data(left) => {
                let n = left.min((buf.len() - i) as u64);
                i += n as usize;
                *state = if left == n {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left - n)
                };
                continue;
            }
            Chunk::Size(value, digits) => {
                *state = match b {
                    b'\r' if digits > 0 => Chunk::SizeLf(value),
                    b';' | b' ' | b'\t' if digits > 0 => Chunk::Ext(value),
                    _ => {
                        let d = (b as char).to_digit(16).ok_or(FramingError)?;
                        if digits == MAX_SIZE_DIGITS {
                            return Err(FramingError);
                        }
                        Chunk::Size(value << 4 | u64::from(d), digits + 1)
                    }
                };
            }
            Chunk::Ext(value) => match b {
                b'\r' => *state = Chunk::SizeLf(value),
                b'\n' => return Err(FramingError),
                _ => {}
            },
            Chunk::SizeLf(value) => {
                expect(b, b'\n')?;
                *state = if value == 0 {
                    Chunk::TrailerStart
                } else {
                    Chunk::Data(value)
                };
            }
            Chunk::DataCr => {
                expect(b, b'\r')?;
                *state = Chunk::DataLf;
            }
            Chunk::DataLf => {
                expect(b, b'\n')?;
                *state = Chunk::Size(0, 0);
            }
            Chunk::TrailerStart => {
                *state = match b {
                    b'\r' => Chunk::FinalLf,
                    // A field line starts with its name: no folding, no bare LF.
                    b'\n' | b' ' | b'\t' | b':' => return Err(FramingError),
                    _ => Chunk::Trailer(false),
                };
            }
            Chunk::Trailer(colon) => match b {
                // Only `name: value` lines: nothing that could pass for a request line.
                b'\r' if colon => *state = Chunk::TrailerLf,
                b'\r' | b'\n' => return Err(FramingError),
                b':' => *state = Chunk::Trailer(true),
                _ => {}
            },
            Chunk::TrailerLf => {
                expect(b, b'\n')?;
                *state = Chunk::TrailerStart;
            }
            Chunk::FinalLf => {
                expect(b, b'\n')?;
                return Ok((i + 1, true));
            }
        }
        i += 1;
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
        let body = b"4\r\nWiki\r\n5;name=value\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\n";
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
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"\r\n"[..],                    // no size
            b"g\r\n",                        // not hex
            b"4\nWiki\r\n0\r\n\r\n",         // bare LF after size
            b"4\r\nWikiX\r\n",               // data longer than its size
            b"4\r\nWiki\r\n0\r\n\n",         // bare LF at the end
            b"1000000000000000\r\n",         // size too large
            b"-1\r\n",                       // sign
            b"4;ext\nWiki",                  // bare LF after an extension
            b"0\r\n \r\n\r\n",               // folded trailer
            b"0\r\nGET /x HTTP/1.1\r\n\r\n", // a "trailer" without a colon
        ] {
            assert_eq!(run(Framing::CHUNKED, bad, 1), Err(FramingError), "{bad:?}");
        }
    }

    #[test]
    fn until_close_takes_everything() {
        let mut f = Framing::UntilClose;
        assert_eq!(f.advance(b"all of it").unwrap(), 9);
        assert!(!f.is_done());
    }
}
