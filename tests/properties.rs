//! Property tests of the fast path's two parsers against small, strict reference parsers
//! written here from the grammar (RFC 9110 §5, RFC 9112 §3, §5, §6.3, §7.1, and the notes in
//! shared/notes/http1-strictness.md):
//!
//! - `framing::Framing` over chunked bodies: valid bodies in any split end exactly where they
//!   end; a mutated body is refused, or agrees with the reference, and no byte it consumes
//!   (and so relays) makes the body invalid.
//! - `head::parse_request`: valid heads with every Content-Length / Transfer-Encoding
//!   combination give the reference's length and framing (or its refusal); mutated heads are
//!   refused, or agree with the reference.
//!
//! The references accept *at most* what the fast path may accept. Where the grammar leaves
//! room (bare LF ending a head line, empty list elements, obs-text in a target) they are
//! lenient, so that only accepting something the reference refuses, or reading it
//! differently, fails a property.

use consul_router::proxy::h1::framing::Framing;
use consul_router::proxy::h1::head::slots;
use consul_router::proxy::h1::request::parse_request;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

// ---------------------------------------------------------------------------------------
// Grammar helpers
// ---------------------------------------------------------------------------------------

/// `tchar` (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A byte a field value may hold: VCHAR, SP, HTAB, obs-text.
fn is_field_byte(b: u8) -> bool {
    b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// `qdtext` (RFC 9110 §5.6.4).
fn is_qdtext(b: u8) -> bool {
    is_field_byte(b) && b != b'"' && b != b'\\'
}

/// Field names a trailer may not carry: framing, routing, hop-by-hop, credentials and the
/// client-address fields. Compared case-insensitively with `_` read as `-`.
const FORBIDDEN_TRAILERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "authorization",
    "cookie",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "forwarded",
    "x-real-ip",
];

/// Names the generators never use for a trailer: the forbidden ones and a few more a
/// careful implementation may refuse too (representation and cookie fields).
const AVOIDED_TRAILERS: &[&str] = &[
    "set-cookie",
    "expect",
    "content-type",
    "content-encoding",
    "content-range",
];

fn canonical_name(name: &[u8]) -> String {
    name.iter()
        .map(|&b| {
            if b == b'_' {
                '-'
            } else {
                b.to_ascii_lowercase() as char
            }
        })
        .collect()
}

/// Why a reference parse stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The input ended; everything so far can still start a valid message.
    Incomplete,
    /// The input can no longer be (the start of) a valid message. For heads: the statuses
    /// a refusal may carry.
    Invalid(&'static [u16]),
}

const BAD: Stop = Stop::Invalid(&[400]);

/// A cursor over the input; running off its end is `Stop::Incomplete`.
struct Cur<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cur<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cur { b, i: 0 }
    }

    fn peek(&self) -> Result<u8, Stop> {
        self.b.get(self.i).copied().ok_or(Stop::Incomplete)
    }

    fn next(&mut self) -> Result<u8, Stop> {
        let b = self.peek()?;
        self.i += 1;
        Ok(b)
    }

    fn expect(&mut self, want: u8) -> Result<(), Stop> {
        if self.next()? == want {
            Ok(())
        } else {
            Err(BAD)
        }
    }

    /// `BWS` / `OWS`: SP and HTAB; returns how many.
    fn ws(&mut self) -> Result<usize, Stop> {
        let start = self.i;
        while matches!(self.peek()?, b' ' | b'\t') {
            self.i += 1;
        }
        Ok(self.i - start)
    }

    /// `token`; returns it.
    fn token(&mut self) -> Result<&'a [u8], Stop> {
        let start = self.i;
        if !is_tchar(self.next()?) {
            return Err(BAD);
        }
        while is_tchar(self.peek()?) {
            self.i += 1;
        }
        Ok(&self.b[start..self.i])
    }
}

// ---------------------------------------------------------------------------------------
// Reference: chunked body (RFC 9112 §7.1)
// ---------------------------------------------------------------------------------------

/// The length of the chunked body at the start of `b`.
fn ref_chunked(b: &[u8]) -> Result<usize, Stop> {
    let mut c = Cur::new(b);
    loop {
        let size = chunk_size(&mut c)?;
        chunk_ext(&mut c)?;
        if size == 0 {
            trailer_section(&mut c)?;
            return Ok(c.i);
        }
        let left = (b.len() - c.i) as u64;
        if left < size {
            return Err(Stop::Incomplete);
        }
        c.i += size as usize;
        c.expect(b'\r')?;
        c.expect(b'\n')?;
    }
}

/// `1*HEXDIG`, at most 15 significant digits (leading zeros do not count).
fn chunk_size(c: &mut Cur) -> Result<u64, Stop> {
    let hex = |b: u8| (b as char).to_digit(16).map(u64::from);
    let mut d = hex(c.next()?).ok_or(BAD)?;
    let mut value = 0u64;
    let mut significant = 0;
    loop {
        if value > 0 || d > 0 {
            significant += 1;
            if significant > 15 {
                return Err(BAD);
            }
        }
        value = value << 4 | d;
        match hex(c.peek()?) {
            Some(next) => {
                c.i += 1;
                d = next;
            }
            None => return Ok(value),
        }
    }
}

/// `*( BWS ";" BWS name [ BWS "=" BWS value ] ) CRLF`.
fn chunk_ext(c: &mut Cur) -> Result<(), Stop> {
    loop {
        let ws = c.ws()?;
        match c.next()? {
            b'\r' if ws == 0 => return c.expect(b'\n'),
            b';' => {
                c.ws()?;
                c.token()?;
                let before = c.i;
                c.ws()?;
                if c.peek()? == b'=' {
                    c.i += 1;
                    c.ws()?;
                    ext_value(c)?;
                } else {
                    // Whitespace not followed by `=`: only `;` may come after it.
                    c.i = before;
                }
            }
            _ => return Err(BAD),
        }
    }
}

/// `token / quoted-string`.
fn ext_value(c: &mut Cur) -> Result<(), Stop> {
    if c.peek()? != b'"' {
        return c.token().map(|_| ());
    }
    c.i += 1;
    loop {
        match c.next()? {
            b'"' => return Ok(()),
            b'\\' => {
                if !is_field_byte(c.next()?) {
                    return Err(BAD);
                }
            }
            b if is_qdtext(b) => {}
            _ => return Err(BAD),
        }
    }
}

/// `*( field-line CRLF ) CRLF`, no forbidden names.
fn trailer_section(c: &mut Cur) -> Result<(), Stop> {
    loop {
        if c.peek()? == b'\r' {
            c.i += 1;
            return c.expect(b'\n');
        }
        let name = c.token()?;
        c.expect(b':')?;
        if FORBIDDEN_TRAILERS.contains(&canonical_name(name).as_str()) {
            return Err(BAD);
        }
        loop {
            match c.next()? {
                b'\r' => {
                    c.expect(b'\n')?;
                    break;
                }
                b if is_field_byte(b) => {}
                _ => return Err(BAD),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reference: request head (RFC 9112 §2-§3, §5, §6.3)
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RefHead {
    len: usize,
    body: Body,
}

/// A line end: CRLF, or a bare LF (RFC 9112 §2.2 lets a recipient take LF as one; the head
/// is rewritten, so the backend never sees it). A bare CR is invalid.
fn eol(c: &mut Cur) -> Result<bool, Stop> {
    match c.peek()? {
        b'\r' => {
            c.i += 1;
            c.expect(b'\n')?;
            Ok(true)
        }
        b'\n' => {
            c.i += 1;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The request head at the start of `b`: its length and its body's framing.
fn ref_head(b: &[u8]) -> Result<RefHead, Stop> {
    let mut c = Cur::new(b);
    // Empty lines before the request line may be ignored (RFC 9112 §2.2).
    while eol(&mut c)? {}
    let method = c.token()?;
    c.expect(b' ')?;
    let start = c.i;
    loop {
        match c.peek()? {
            b' ' => break,
            b if b <= 0x20 || b == 0x7f => return Err(BAD),
            _ => c.i += 1,
        }
    }
    let target = &b[start..c.i];
    c.expect(b' ')?;
    for &want in b"HTTP/1." {
        c.expect(want)?;
    }
    let http10 = match c.next()? {
        b'0' => true,
        b'1' => false,
        _ => return Err(BAD),
    };
    if !eol(&mut c)? {
        return Err(BAD);
    }

    let mut hosts = 0;
    let mut lengths: Vec<u64> = Vec::new();
    let mut cl_fields = 0;
    let mut te_fields = 0;
    let mut codings: Vec<Vec<u8>> = Vec::new();
    loop {
        if eol(&mut c)? {
            break;
        }
        // No whitespace before a field name: that is obs-fold (or junk) here.
        let name = c.token()?;
        c.expect(b':')?;
        let vstart = c.i;
        loop {
            match c.peek()? {
                b'\r' | b'\n' => break,
                b if is_field_byte(b) => c.i += 1,
                _ => return Err(BAD),
            }
        }
        let value = b[vstart..c.i].trim_ascii();
        eol(&mut c)?;
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            cl_fields += 1;
            for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if part.is_empty() {
                    continue;
                }
                if !part.iter().all(u8::is_ascii_digit) {
                    return Err(BAD);
                }
                let n = std::str::from_utf8(part)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(BAD)?;
                lengths.push(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te_fields += 1;
            codings.extend(
                value
                    .split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .filter(|p| !p.is_empty())
                    .map(<[u8]>::to_vec),
            );
        }
    }
    let len = c.i;

    if hosts > 1 || !target_ok(method, target) {
        return Err(BAD);
    }
    if cl_fields > 0 && (lengths.is_empty() || lengths.iter().any(|&n| n != lengths[0])) {
        return Err(BAD);
    }
    let chunked_only = codings.len() == 1 && codings[0].eq_ignore_ascii_case(b"chunked");
    let body = if te_fields > 0 {
        if cl_fields > 0 || http10 {
            // Ambiguous framing; with an unknown coding too, either refusal is right.
            return Err(if chunked_only {
                BAD
            } else {
                Stop::Invalid(&[400, 501])
            });
        }
        if !chunked_only {
            return Err(if codings.is_empty() {
                Stop::Invalid(&[400, 501])
            } else {
                Stop::Invalid(&[501])
            });
        }
        Body::Chunked
    } else {
        match lengths.first() {
            None | Some(0) => Body::None,
            Some(&n) => Body::Length(n),
        }
    };
    Ok(RefHead { len, body })
}

/// origin-form, `*` for OPTIONS, absolute-form (http or https, no userinfo); anything goes
/// for CONNECT, which is refused later (405). No fragment anywhere.
fn target_ok(method: &[u8], target: &[u8]) -> bool {
    if method == b"CONNECT" {
        return true;
    }
    if target.contains(&b'#') {
        return false;
    }
    if target == b"*" {
        return method == b"OPTIONS";
    }
    if target.first() == Some(&b'/') {
        return true;
    }
    let lower = target.to_ascii_lowercase();
    let rest = if lower.starts_with(b"http://") {
        &target[7..]
    } else if lower.starts_with(b"https://") {
        &target[8..]
    } else {
        return false;
    };
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    !authority.is_empty() && !authority.contains(&b'@')
}

// ---------------------------------------------------------------------------------------
// Driving the real parsers
// ---------------------------------------------------------------------------------------

/// What `Framing` made of an input fed in pieces.
#[derive(Debug, PartialEq, Eq)]
enum Fed {
    /// The body ended after this many bytes.
    Done(usize),
    /// Refused, after consuming this many bytes.
    Refused(usize),
    /// The input ran out first, this many bytes consumed.
    Short(usize),
}

/// Feeds `input` to a fresh chunked `Framing`, cut at `cuts`. Bytes it leaves unconsumed
/// without ending are handed to it again with the next piece. After every step, whatever
/// it has consumed must be a prefix the reference accepts as the start of a body.
fn feed_chunked(input: &[u8], cuts: &[usize]) -> Result<Fed, TestCaseError> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c % (input.len() + 1)).collect();
    cuts.push(input.len());
    cuts.sort_unstable();
    cuts.dedup();
    let mut f = Framing::CHUNKED;
    let mut consumed = 0;
    for cut in cuts {
        let pending = &input[consumed..cut];
        if pending.is_empty() {
            continue;
        }
        let n = match f.advance(pending) {
            Ok(n) => n,
            Err(_) => return Ok(Fed::Refused(consumed)),
        };
        prop_assert!(n <= pending.len(), "advance used {n} of {}", pending.len());
        consumed += n;
        if f.is_done() {
            return Ok(Fed::Done(consumed));
        }
        prop_assert_eq!(
            ref_chunked(&input[..consumed]),
            Err(Stop::Incomplete),
            "Framing consumed {:?}, which the reference does not accept as the start of a body",
            String::from_utf8_lossy(&input[..consumed])
        );
    }
    Ok(Fed::Short(consumed))
}

/// The reference's view of a `Framing` taken from a head.
fn body_of(f: &Framing) -> Option<Body> {
    if f.is_done() {
        return Some(Body::None);
    }
    if *f == Framing::CHUNKED {
        return Some(Body::Chunked);
    }
    match *f {
        Framing::Length(0) => Some(Body::None),
        Framing::Length(n) => Some(Body::Length(n)),
        _ => None,
    }
}

/// What `parse_request` made of `buf`.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Head(usize, Option<Body>),
    Partial,
    Refused(u16),
}

fn parse(buf: &[u8]) -> Parsed {
    let mut s = slots();
    match parse_request(buf, &mut s) {
        Ok(Some(h)) => Parsed::Head(h.len, body_of(&h.body)),
        Ok(None) => Parsed::Partial,
        Err(e) => Parsed::Refused(e.status().as_u16()),
    }
}

// ---------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------

fn token(min: usize, max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            8 => proptest::char::range('a', 'z'),
            4 => proptest::char::range('A', 'Z'),
            3 => proptest::char::range('0', '9'),
            2 => proptest::sample::select(b"!#$%&'*+-.^_`|~".map(char::from).to_vec()),
        ],
        min..=max,
    )
    .prop_map(|v| v.into_iter().collect())
}

/// A path segment (or query): unreserved and a few sub-delims.
fn segment() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            6 => proptest::char::range('a', 'z'),
            2 => proptest::char::range('0', '9'),
            1 => proptest::sample::select(vec!['-', '.', '_', '~', '!', '$', '&', '\'', '*', '+']),
        ],
        0..10,
    )
    .prop_map(|v| v.into_iter().collect())
}

/// A host label's tail: letters, digits, hyphens.
fn label() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            6 => proptest::char::range('a', 'z'),
            2 => proptest::char::range('0', '9'),
            1 => Just('-'),
        ],
        0..10,
    )
    .prop_map(|v| v.into_iter().collect::<String>() + "x")
}

/// A field value: VCHAR, inner SP/HTAB, obs-text; no leading or trailing whitespace.
fn field_value() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            10 => 0x21u8..=0x7e,
            2 => Just(b' '),
            1 => Just(b'\t'),
            1 => 0x80u8..=0xff,
        ],
        0..24,
    )
    .prop_map(|mut v| {
        while v.last().is_some_and(|b| *b == b' ' || *b == b'\t') {
            v.pop();
        }
        while v.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            v.remove(0);
        }
        v
    })
}

fn ows() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec!["", "", " ", "\t", "  ", " \t"])
}

fn quoted_string() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            10 => (0x20u8..=0x7e).prop_filter("qdtext", |b| *b != b'"' && *b != b'\\')
                .prop_map(|b| vec![b]),
            1 => Just(b"\t".to_vec()),
            1 => (0x80u8..=0xff).prop_map(|b| vec![b]),
            2 => (0x20u8..=0x7e).prop_map(|b| vec![b'\\', b]),
        ],
        0..10,
    )
    .prop_map(|parts| {
        let mut v = vec![b'"'];
        v.extend(parts.into_iter().flatten());
        v.push(b'"');
        v
    })
}

/// One chunk extension: `BWS ";" BWS name [ BWS "=" BWS value ]`.
fn chunk_ext_gen() -> impl Strategy<Value = Vec<u8>> {
    (
        ows(),
        ows(),
        token(1, 8),
        proptest::option::of((
            ows(),
            ows(),
            prop_oneof![token(1, 8).prop_map(String::into_bytes), quoted_string()],
        )),
    )
        .prop_map(|(w1, w2, name, value)| {
            let mut v = Vec::new();
            v.extend_from_slice(w1.as_bytes());
            v.push(b';');
            v.extend_from_slice(w2.as_bytes());
            v.extend_from_slice(name.as_bytes());
            if let Some((w3, w4, val)) = value {
                v.extend_from_slice(w3.as_bytes());
                v.push(b'=');
                v.extend_from_slice(w4.as_bytes());
                v.extend_from_slice(&val);
            }
            v
        })
}

fn chunk_size_text(size: usize) -> impl Strategy<Value = String> {
    (0usize..3, any::<bool>()).prop_map(move |(zeros, upper)| {
        let hex = if upper {
            format!("{size:X}")
        } else {
            format!("{size:x}")
        };
        format!("{}{hex}", "0".repeat(zeros))
    })
}

/// A trailer name no implementation should refuse.
fn trailer_name() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(vec![
            "Expires".to_string(),
            "Server-Timing".to_string(),
            "Digest".to_string(),
            "X-Checksum".to_string(),
            "etag".to_string(),
        ]),
        token(1, 10).prop_map(|t| format!("X-T{t}")),
    ]
    .prop_filter("not a forbidden trailer", |n| {
        let c = canonical_name(n.as_bytes());
        !FORBIDDEN_TRAILERS.contains(&c.as_str()) && !AVOIDED_TRAILERS.contains(&c.as_str())
    })
}

fn trailer_line() -> impl Strategy<Value = Vec<u8>> {
    (trailer_name(), ows(), field_value(), ows()).prop_map(|(name, w1, value, w2)| {
        let mut v = name.into_bytes();
        v.push(b':');
        v.extend_from_slice(w1.as_bytes());
        v.extend_from_slice(&value);
        if !value.is_empty() {
            v.extend_from_slice(w2.as_bytes());
        }
        v.extend_from_slice(b"\r\n");
        v
    })
}

/// A valid chunked body: chunks of random sizes with extensions, a last chunk with
/// extensions, trailers.
fn chunked_body() -> impl Strategy<Value = Vec<u8>> {
    let chunk = (1usize..40)
        .prop_flat_map(|size| {
            (
                chunk_size_text(size),
                proptest::collection::vec(chunk_ext_gen(), 0..3),
                proptest::collection::vec(any::<u8>(), size),
            )
        })
        .prop_map(|(size, exts, data)| {
            let mut v = size.into_bytes();
            v.extend(exts.into_iter().flatten());
            v.extend_from_slice(b"\r\n");
            v.extend_from_slice(&data);
            v.extend_from_slice(b"\r\n");
            v
        });
    (
        proptest::collection::vec(chunk, 0..5),
        1usize..4,
        proptest::collection::vec(chunk_ext_gen(), 0..3),
        proptest::collection::vec(trailer_line(), 0..4),
    )
        .prop_map(|(chunks, zeros, exts, trailers)| {
            let mut v: Vec<u8> = chunks.into_iter().flatten().collect();
            v.extend(std::iter::repeat_n(b'0', zeros));
            v.extend(exts.into_iter().flatten());
            v.extend_from_slice(b"\r\n");
            v.extend(trailers.into_iter().flatten());
            v.extend_from_slice(b"\r\n");
            v
        })
}

/// Bytes that matter to the grammars, and any byte.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => proptest::sample::select(b"\r\n \t\0;\":=\\,/?#*@".to_vec()),
        2 => proptest::sample::select(b"0159aAfFgGxX-+".to_vec()),
        1 => proptest::sample::select(vec![0x01u8, 0x0b, 0x0c, 0x7f, 0x80, 0xff]),
        1 => any::<u8>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Insert(usize, u8),
    Delete(usize),
    Replace(usize, u8),
}

fn mutations(max: usize) -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(
        prop_oneof![
            (any::<usize>(), interesting_byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            any::<usize>().prop_map(Mutation::Delete),
            (any::<usize>(), interesting_byte()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        ],
        1..=max,
    )
}

/// Applies `muts` within the first `region` bytes of `v` (positions taken modulo it).
fn mutate(v: &mut Vec<u8>, muts: &[Mutation], region: &mut usize) {
    for m in muts {
        if *region == 0 {
            return;
        }
        match *m {
            Mutation::Insert(i, b) => {
                v.insert(i % (*region + 1), b);
                *region += 1;
            }
            Mutation::Delete(i) => {
                v.remove(i % *region);
                *region -= 1;
            }
            Mutation::Replace(i, b) => v[i % *region] = b,
        }
    }
}

/// How a generated head frames its body.
#[derive(Debug, Clone)]
enum Framings {
    None,
    Length(u64, &'static str),
    LengthTwice(u64),
    LengthList(u64),
    LengthZeros(u64),
    Chunked(&'static str),
    LengthAndChunked(u64, bool),
    DifferingLengths(u64, u64),
    BadLength(&'static str),
    OtherCoding(&'static str),
    ChunkedTwice,
}

fn framings() -> impl Strategy<Value = Framings> {
    prop_oneof![
        3 => Just(Framings::None),
        3 => (0u64..100_000, proptest::sample::select(vec!["Content-Length", "content-length", "CONTENT-LENGTH"]))
            .prop_map(|(n, name)| Framings::Length(n, name)),
        1 => (0u64..1000).prop_map(Framings::LengthTwice),
        1 => (0u64..1000).prop_map(Framings::LengthList),
        1 => (0u64..1000).prop_map(Framings::LengthZeros),
        3 => proptest::sample::select(vec!["chunked", "Chunked", "CHUNKED", " chunked ", "\tchunked"])
            .prop_map(Framings::Chunked),
        1 => (0u64..1000, any::<bool>()).prop_map(|(n, first)| Framings::LengthAndChunked(n, first)),
        1 => (0u64..1000, 1u64..1000).prop_map(|(a, d)| Framings::DifferingLengths(a, a + d)),
        1 => proptest::sample::select(vec!["+5", "-1", "5 5", "", "0x5", "5.0", "five", "1e3", "99999999999999999999999"])
            .prop_map(Framings::BadLength),
        1 => proptest::sample::select(vec!["gzip", "gzip, chunked", "chunked, identity", "chunked, chunked", "identity", "chunked;q=1", "\"chunked\"", "xchunked"])
            .prop_map(Framings::OtherCoding),
        1 => Just(Framings::ChunkedTwice),
    ]
}

impl Framings {
    fn fields(&self) -> Vec<String> {
        match self {
            Framings::None => vec![],
            Framings::Length(n, name) => vec![format!("{name}: {n}")],
            Framings::LengthTwice(n) => {
                vec![
                    format!("Content-Length: {n}"),
                    format!("Content-Length: {n}"),
                ]
            }
            Framings::LengthList(n) => vec![format!("Content-Length: {n}, {n}")],
            Framings::LengthZeros(n) => vec![format!("Content-Length: 000{n}")],
            Framings::Chunked(v) => vec![format!("Transfer-Encoding:{v}")],
            Framings::LengthAndChunked(n, first) => {
                let cl = format!("Content-Length: {n}");
                let te = "Transfer-Encoding: chunked".to_string();
                if *first {
                    vec![cl, te]
                } else {
                    vec![te, cl]
                }
            }
            Framings::DifferingLengths(a, b) => {
                vec![
                    format!("Content-Length: {a}"),
                    format!("Content-Length: {b}"),
                ]
            }
            Framings::BadLength(v) => vec![format!("Content-Length: {v}")],
            Framings::OtherCoding(v) => vec![format!("Transfer-Encoding: {v}")],
            Framings::ChunkedTwice => vec![
                "Transfer-Encoding: chunked".into(),
                "Transfer-Encoding: chunked".into(),
            ],
        }
    }
}

/// A generated request head: its bytes (framing fields mixed in among random fields).
fn request_head() -> impl Strategy<Value = (Vec<u8>, Framings)> {
    let target = prop_oneof![
        4 => (segment(), proptest::option::of(segment()))
            .prop_map(|(p, q)| match q {
                Some(q) => format!("/{p}?{q}"),
                None => format!("/{p}"),
            }),
        1 => (label(), segment()).prop_map(|(h, p)| format!("http://h{h}.app.test/{p}")),
        1 => label().prop_map(|h| format!("http://h{h}.app.test?q=1")),
    ];
    let field = (
        prop_oneof![
            3 => token(1, 12).prop_map(|t| format!("X-{t}")),
            1 => proptest::sample::select(vec![
                "Accept".to_string(), "User-Agent".to_string(), "Cookie".to_string(),
                "X-Forwarded-For".to_string(), "X_Forwarded_For".to_string(),
                "Content_Length".to_string(), "Transfer_Encoding".to_string(),
                "Keep-Alive".to_string(), "TE".to_string(),
            ]),
        ],
        ows(),
        field_value(),
        ows(),
    )
        .prop_map(|(name, w1, value, w2)| {
            let mut v = name.into_bytes();
            v.push(b':');
            v.extend_from_slice(w1.as_bytes());
            v.extend_from_slice(&value);
            v.extend_from_slice(w2.as_bytes());
            v
        });
    (
        proptest::sample::select(vec![
            "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "X-CUSTOM",
        ]),
        target,
        any::<bool>(),
        proptest::collection::vec(field, 0..8),
        framings(),
        any::<bool>(),
        any::<usize>(),
        any::<bool>(),
    )
        .prop_map(
            |(method, target, http10, fields, framing, asterisk, at, host)| {
                let target = if asterisk && method == "OPTIONS" {
                    "*".to_string()
                } else {
                    target
                };
                let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
                let mut lines: Vec<Vec<u8>> = fields;
                // HTTP/1.1 requires Host (RFC 9112 §3.2); an implementation may refuse without.
                if host || !http10 {
                    lines.insert(0, b"Host: raw.app.test".to_vec());
                }
                // The framing fields go in one after the other at a random place.
                let at = at % (lines.len() + 1);
                for (k, f) in framing.fields().into_iter().enumerate() {
                    lines.insert(at + k, f.into_bytes());
                }
                let mut v = format!("{method} {target} {version}\r\n").into_bytes();
                for l in lines {
                    v.extend_from_slice(&l);
                    v.extend_from_slice(b"\r\n");
                }
                v.extend_from_slice(b"\r\n");
                (v, framing)
            },
        )
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 384,
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// (a) A valid chunked body followed by anything, cut anywhere: `Framing` takes
    /// exactly the body and ends.
    #[test]
    fn valid_chunked_bodies_end_exactly(
        body in chunked_body(),
        after in proptest::collection::vec(any::<u8>(), 0..32),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        prop_assert_eq!(ref_chunked(&body), Ok(body.len()), "generator made an invalid body");
        let mut input = body.clone();
        input.extend_from_slice(&after);
        prop_assert_eq!(feed_chunked(&input, &cuts)?, Fed::Done(body.len()));
        // Byte by byte too: every boundary at once.
        let every: Vec<usize> = (1..input.len()).collect();
        prop_assert_eq!(feed_chunked(&input, &every)?, Fed::Done(body.len()));
    }

    /// (b) A mutated body: `Framing` refuses it, or ends where the reference does, and
    /// never consumes a byte that makes the body invalid.
    #[test]
    fn mutated_chunked_bodies_are_refused_or_read_as_the_reference_reads_them(
        body in chunked_body(),
        muts in mutations(3),
        after in proptest::collection::vec(any::<u8>(), 0..16),
        cuts in proptest::collection::vec(any::<usize>(), 0..4),
    ) {
        let mut input = body.clone();
        let mut region = input.len();
        mutate(&mut input, &muts, &mut region);
        input.extend_from_slice(&after);
        let reference = ref_chunked(&input);
        for cuts in [cuts, (1..input.len()).collect()] {
            match feed_chunked(&input, &cuts)? {
                Fed::Done(n) => prop_assert_eq!(
                    reference, Ok(n),
                    "Framing ended a body at {} in {:?}", n, String::from_utf8_lossy(&input)
                ),
                Fed::Short(_) => prop_assert_eq!(
                    reference, Err(Stop::Incomplete),
                    "Framing wants more of {:?}", String::from_utf8_lossy(&input)
                ),
                Fed::Refused(_) => {}
            }
        }
    }

    /// (b) Random bytes are never taken for a body the reference refuses.
    #[test]
    fn random_bytes_are_refused_or_read_as_the_reference_reads_them(
        input in proptest::collection::vec(interesting_byte(), 0..48),
    ) {
        let reference = ref_chunked(&input);
        match feed_chunked(&input, &[])? {
            Fed::Done(n) => prop_assert_eq!(reference, Ok(n)),
            Fed::Short(_) => prop_assert_eq!(reference, Err(Stop::Incomplete)),
            Fed::Refused(_) => {}
        }
    }

    /// (c) Generated heads with every framing combination: the same length and framing as
    /// the reference, or the same refusal; any strict prefix asks for more.
    #[test]
    fn request_heads_frame_bodies_as_the_reference_does(
        (head, framing) in request_head(),
        body in proptest::collection::vec(any::<u8>(), 0..32),
        cut in any::<usize>(),
    ) {
        let mut buf = head.clone();
        buf.extend_from_slice(&body);
        let reference = ref_head(&buf);
        let got = parse(&buf);
        match reference {
            Ok(r) => {
                prop_assert_eq!(r.len, head.len(), "reference misread a generated head");
                prop_assert_eq!(got, Parsed::Head(r.len, Some(r.body)), "{:?}: {:?}", framing, String::from_utf8_lossy(&head));
                let cut = cut % head.len();
                prop_assert_eq!(parse(&head[..cut]), Parsed::Partial, "prefix of {} bytes", cut);
            }
            Err(Stop::Invalid(statuses)) => match got {
                Parsed::Refused(s) => prop_assert!(statuses.contains(&s), "{:?}: refused with {} instead of {:?}: {:?}", framing, s, statuses, String::from_utf8_lossy(&head)),
                other => prop_assert!(false, "{:?}: got {:?}, want a refusal {:?}: {:?}", framing, other, statuses, String::from_utf8_lossy(&head)),
            },
            Err(Stop::Incomplete) => prop_assert!(false, "generated head incomplete"),
        }
    }

    /// (c) Mutated heads: refused, or read exactly as the reference reads them.
    #[test]
    fn mutated_request_heads_are_refused_or_read_as_the_reference_reads_them(
        (head, _framing) in request_head(),
        muts in mutations(3),
        body in proptest::collection::vec(interesting_byte(), 0..16),
    ) {
        let mut buf = head.clone();
        let mut region = buf.len();
        mutate(&mut buf, &muts, &mut region);
        buf.extend_from_slice(&body);
        let reference = ref_head(&buf);
        match parse(&buf) {
            Parsed::Head(len, body) => prop_assert_eq!(
                reference.map(|r| (r.len, Some(r.body))), Ok((len, body)),
                "parse_request accepted {:?}", String::from_utf8_lossy(&buf)
            ),
            Parsed::Partial => prop_assert!(
                reference.is_err(),
                "parse_request wants more of {:?}, which the reference reads as {:?}", String::from_utf8_lossy(&buf), reference
            ),
            Parsed::Refused(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// The references themselves, on the examples of the grammar notes
// ---------------------------------------------------------------------------------------

#[test]
fn reference_chunked_parser_knows_the_examples() {
    let ok: &[&[u8]] = &[
        b"5\r\nhello\r\n0\r\n\r\n",
        b"5 ;a\r\nhello\r\n0\r\n\r\n",
        b"5\t;\ta\t=\tb ; c=\"x\\\"y\"\r\nhello\r\n000;z\r\nX-T: v \r\nY:\r\n\r\n",
        b"00000000000000000005\r\nhello\r\n0\r\n\r\n",
        b"fffffffffffffff\r\n",
    ];
    for b in ok {
        let r = ref_chunked(b);
        assert!(
            r == Ok(b.len()) || r == Err(Stop::Incomplete),
            "{:?}: {r:?}",
            String::from_utf8_lossy(b)
        );
    }
    let bad: &[&[u8]] = &[
        b"5 6\r\n",
        b"5 \r\n",
        b"5;\x00\r\n",
        b"5;a=\x01\r\n",
        b"5;a=\"x\r\n",
        b"5;a \r\n",
        b"5;a=b \r\n",
        b"5\nhello",
        b"g\r\n",
        b"1000000000000000\r\n",
        b"5\r\nhelloX",
        b"0\r\nGET /admin?a:b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"0\r\nX Y: z\r\n\r\n",
        b"0\r\nX : z\r\n\r\n",
        b"0\r\nX: a\x01\r\n\r\n",
        b"0\r\nX: a\r\n b\r\n\r\n",
        b"0\r\nContent_Length: 5\r\n\r\n",
        b"0\r\nx-real-ip: 1.2.3.4\r\n\r\n",
    ];
    for b in bad {
        assert_eq!(ref_chunked(b), Err(BAD), "{:?}", String::from_utf8_lossy(b));
    }
}

#[test]
fn reference_head_parser_knows_the_examples() {
    let head = |s: &str| ref_head(s.as_bytes());
    assert_eq!(
        head("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        Ok(RefHead {
            len: 27,
            body: Body::None
        })
    );
    assert_eq!(
        head("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n").map(|h| h.body),
        Ok(Body::Length(5))
    );
    assert_eq!(
        head("POST / HTTP/1.1\r\nTransfer-Encoding:\tchunked\r\n\r\n").map(|h| h.body),
        Ok(Body::Chunked)
    );
    for bad in [
        "GET  / HTTP/1.1\r\n\r\n",
        "GET * HTTP/1.1\r\n\r\n",
        "GET abc HTTP/1.1\r\n\r\n",
        "GET host:80 HTTP/1.1\r\n\r\n",
        "GET http:/x HTTP/1.1\r\n\r\n",
        "GET ftp://h/x HTTP/1.1\r\n\r\n",
        "GET /a#frag HTTP/1.1\r\n\r\n",
        "GET http://user@h/ HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
        "GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        "GET / HTTP/1.1\r\nX: a\x0bb\r\n\r\n",
        "GET / HTTP/1.1\r\nX@Y: a\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        assert_eq!(head(bad), Err(BAD), "{bad:?}");
    }
    assert_eq!(
        head("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        Err(Stop::Invalid(&[501]))
    );
    assert_eq!(head("OPTIONS * HTTP/1.1\r\n\r\n").map(|h| h.len), Ok(22));
}

/// The specification's examples through `parse_request` itself: the heads it must refuse
/// (with their status) and the framing of those it must accept.
#[test]
fn parse_request_knows_the_examples() {
    let refused: &[(&str, u16)] = &[
        ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET abc HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET host:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET http:/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET ftp://h/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET http://user@h/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET http://@h/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nX@Y: 1\r\n\r\n", 400),
        ("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 501),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 501),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\x0b\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
        ("POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ];
    let mut wrong = Vec::new();
    for (head, status) in refused {
        let got = parse(head.as_bytes());
        if got != Parsed::Refused(*status) {
            wrong.push(format!("{head:?}: {got:?}, want a {status}"));
        }
    }
    let accepted: &[(&str, Body)] = &[
        ("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", Body::None),
        ("GET http://a?q=1 HTTP/1.1\r\nHost: b\r\n\r\n", Body::None),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            Body::Length(5),
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            Body::Length(5),
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 005\r\n\r\n",
            Body::Length(5),
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n",
            Body::Chunked,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked \r\n\r\n",
            Body::Chunked,
        ),
    ];
    for (head, body) in accepted {
        let got = parse(head.as_bytes());
        if got != Parsed::Head(head.len(), Some(*body)) {
            wrong.push(format!("{head:?}: {got:?}, want {body:?}"));
        }
    }
    assert!(wrong.is_empty(), "parse_request:\n  {}", wrong.join("\n  "));
}
