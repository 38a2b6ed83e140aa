//! The request and response field rules, one set for both protocol paths: which fields are
//! hop-by-hop, which names are lookalikes, which forwarding fields a peer may send, and
//! what the router sets (X-Forwarded-For/Host/Proto/Port, X-Real-IP, X-Request-Id) with
//! the scheme and port taken from the connection. The HTTP/1 path writes the result as
//! bytes (`h1::request`), the HTTP/2 path into a `HeaderMap` (`h2::fields`); both ask
//! [`request_fate`] and [`response_fate`] per field and call [`set_fields`].

use std::io::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

/// Most `Connection` tokens honoured per message; a longer list is refused.
pub const MAX_CONNECTION_TOKENS: usize = 8;

/// The fields the router treats specially, recognised once per field by length first, so
/// the usual field costs one comparison or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `Host`.
    Host,
    /// `Connection`.
    Connection,
    /// `Content-Length`.
    ContentLength,
    /// `Transfer-Encoding`.
    TransferEncoding,
    /// `Upgrade`.
    Upgrade,
    /// `X-Forwarded-For`.
    ForwardedFor,
    /// `X-Forwarded-Host`.
    ForwardedHost,
    /// `X-Forwarded-Proto`.
    ForwardedProto,
    /// `X-Forwarded-Port`.
    ForwardedPort,
    /// Any other `X-Forwarded-*` (`-Ssl`, `-Prefix`, ...), `Forwarded` (RFC 7239) and
    /// `X-Client-IP`: what a trusted proxy says about the client, kept from it only.
    Forwarding,
    /// `X-Real-IP`.
    RealIp,
    /// `X-Request-Id`.
    RequestId,
    /// The other fixed hop-by-hop fields: TE, Keep-Alive, Proxy-Connection,
    /// Proxy-Authenticate, Proxy-Authorization, and `Proxy` (httpoxy).
    HopByHop,
    /// A name with `_` that reads as one of the fields above once `_` is `-` (as PHP, WSGI
    /// and CGI read names): never forwarded.
    Lookalike,
    /// Anything else.
    Other,
}

/// Classifies a field name (any case).
pub fn classify(name: &str) -> Field {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    let kind = match name.len() {
        2 if is("te") => Field::HopByHop,
        4 if is("host") => Field::Host,
        5 if is("proxy") => Field::HopByHop,
        7 if is("upgrade") => Field::Upgrade,
        9 if is("forwarded") => Field::Forwarding,
        9 if is("x-real-ip") => Field::RealIp,
        10 if is("connection") => Field::Connection,
        10 if is("keep-alive") => Field::HopByHop,
        11 if is("x-client-ip") => Field::Forwarding,
        12 if is("x-request-id") => Field::RequestId,
        14 if is("content-length") => Field::ContentLength,
        15 if is("x-forwarded-for") => Field::ForwardedFor,
        16 if is("x-forwarded-host") => Field::ForwardedHost,
        16 if is("x-forwarded-port") => Field::ForwardedPort,
        16 if is("proxy-connection") => Field::HopByHop,
        17 if is("x-forwarded-proto") => Field::ForwardedProto,
        17 if is("transfer-encoding") => Field::TransferEncoding,
        18 if is("proxy-authenticate") => Field::HopByHop,
        19 if is("proxy-authorization") => Field::HopByHop,
        n if n > 12 && name.as_bytes()[..12].eq_ignore_ascii_case(b"x-forwarded-") => {
            Field::Forwarding
        }
        _ => Field::Other,
    };
    if kind == Field::Other && name.len() >= 9 && name.contains('_') && is_lookalike(name) {
        return Field::Lookalike;
    }
    kind
}

/// Dashed names whose `_` spellings are never forwarded: frameworks that map names to
/// variables (PHP's `$_SERVER`, WSGI, CGI) read `X_Forwarded_For` as `X-Forwarded-For`.
const DASHED: [&str; 11] = [
    "x-real-ip",
    "forwarded",
    "keep-alive",
    "x-client-ip",
    "content-length",
    "proxy-connection",
    "transfer-encoding",
    "proxy-authenticate",
    "proxy-authorization",
    // Every X-Forwarded-* name, by prefix (below).
    "x-forwarded-",
    "x-request-id",
];

/// Whether `name` has an `_` and reads as a client-address, framing or hop-by-hop field
/// once `_` is `-` (case-insensitive).
pub fn is_lookalike(name: &str) -> bool {
    let name = name.as_bytes();
    let same = |a: &[u8], d: &[u8]| {
        a.iter()
            .zip(d)
            .all(|(&a, &b)| a.to_ascii_lowercase() == b || (a == b'_' && b == b'-'))
    };
    name.contains(&b'_')
        && DASHED.iter().any(|d| {
            let d = d.as_bytes();
            if d.ends_with(b"-") {
                name.len() > d.len() && same(&name[..d.len()], d)
            } else {
                d.len() == name.len() && same(name, d)
            }
        })
}

/// The `Connection` tokens of a message: the options it sets and the fields it names.
#[derive(Debug, Default)]
pub struct Connection<'b> {
    /// `close`.
    pub close: bool,
    /// `keep-alive`.
    pub keep_alive: bool,
    /// `upgrade`.
    pub upgrade: bool,
    named: [&'b [u8]; MAX_CONNECTION_TOKENS],
    len: usize,
}

/// Too many `Connection` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyTokens;

impl<'b> Connection<'b> {
    /// Adds one `Connection` field's value.
    pub fn add(&mut self, value: &'b [u8]) -> Result<(), TooManyTokens> {
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
                *self.named.get_mut(self.len).ok_or(TooManyTokens)? = token;
                self.len += 1;
            }
        }
        Ok(())
    }

    /// Whether `name` is one of the fields this `Connection` names.
    pub fn names(&self, name: &str) -> bool {
        self.len > 0
            && self.named[..self.len]
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// Whether an `Upgrade` value asks for h2c, which RFC 9113 retired: such a request is
/// forwarded as a plain request, never as an upgrade (as Envoy does).
pub fn is_h2c_upgrade(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
}

/// The scheme the client used to reach the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheme {
    /// Plain TCP.
    #[default]
    Http,
    /// TLS terminated here.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// What happens to one field of a request or response on its way through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Relayed as it is.
    Keep,
    /// Left out.
    Drop,
    /// Left out, and replaced by the router's own (set after the relayed fields, so
    /// one that came is not removed separately on the HTTP/2 path).
    Replace,
    /// A framing field: written once, as parsed, by the path that frames the body.
    Framing,
    /// A trusted peer's X-Forwarded-Host/Proto/Port: relayed, and the router does not set
    /// its own.
    KeepInstead,
}

/// The facts a request's field rules need.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The peer's address text, appended to `X-Forwarded-For`.
    pub peer: &'a PeerText,
    /// Whether the peer is a trusted proxy, whose forwarding fields are kept.
    pub trusted: bool,
    /// The client's address for `X-Real-IP` (the peer, or from a trusted peer's chain).
    pub client: &'a PeerText,
    /// Drop every field name with `_`, not just the lookalikes.
    pub drop_underscores: bool,
    /// The request's ID, sent as `X-Request-Id` (any the client sent is replaced).
    pub request_id: &'a [u8],
    /// The scheme the client used, for `X-Forwarded-Proto`.
    pub scheme: Scheme,
    /// The port the client connected to, as text, for `X-Forwarded-Port`.
    pub port: &'a str,
}

/// The rule for one request field of `kind` named `name`. From an untrusted peer the whole
/// forwarding family (X-Forwarded-*, X-Real-IP, X-Client-IP, Forwarded) is dropped, as
/// Traefik does; from a trusted one the chain is extended and the rest kept.
pub fn request_fate(kind: Field, name: &str, fwd: &Forwarding<'_>) -> Fate {
    match kind {
        Field::Host | Field::Upgrade => Fate::Keep,
        Field::Connection | Field::HopByHop | Field::Lookalike => Fate::Drop,
        Field::ContentLength | Field::TransferEncoding => Fate::Framing,
        Field::ForwardedFor | Field::RealIp | Field::RequestId => Fate::Replace,
        Field::ForwardedHost | Field::ForwardedProto | Field::ForwardedPort if fwd.trusted => {
            Fate::KeepInstead
        }
        Field::ForwardedHost | Field::ForwardedProto | Field::ForwardedPort => Fate::Replace,
        Field::Forwarding if fwd.trusted => Fate::Keep,
        Field::Forwarding => Fate::Drop,
        Field::Other if fwd.drop_underscores && name.contains('_') => Fate::Drop,
        Field::Other => Fate::Keep,
    }
}

/// The rule for one response field of `kind` (the load header and `Connection`-named
/// fields are the writers' own checks).
pub fn response_fate(kind: Field, upgrade: bool) -> Fate {
    match kind {
        Field::Connection | Field::HopByHop => Fate::Drop,
        Field::ContentLength | Field::TransferEncoding => Fate::Framing,
        Field::Upgrade if upgrade => Fate::Keep,
        Field::Upgrade => Fate::Drop,
        Field::RequestId => Fate::Replace,
        _ => Fate::Keep,
    }
}

/// Which of X-Forwarded-Host/Proto/Port a trusted peer sent (kept instead of ours).
#[derive(Debug, Clone, Copy, Default)]
pub struct Kept {
    host: bool,
    proto: bool,
    port: bool,
}

impl Kept {
    /// Notes a field kept under [`Fate::KeepInstead`].
    pub fn note(&mut self, kind: Field) {
        match kind {
            Field::ForwardedHost => self.host = true,
            Field::ForwardedProto => self.proto = true,
            Field::ForwardedPort => self.port = true,
            _ => {}
        }
    }
}

/// A field the router sets on every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetField {
    /// `X-Forwarded-For`.
    ForwardedFor,
    /// `X-Forwarded-Host`.
    ForwardedHost,
    /// `X-Forwarded-Proto`.
    ForwardedProto,
    /// `X-Forwarded-Port`.
    ForwardedPort,
    /// `X-Real-IP`.
    RealIp,
    /// `X-Request-Id`.
    RequestId,
}

impl SetField {
    /// The name as HTTP/1 writes it.
    pub fn title(self) -> &'static str {
        match self {
            SetField::ForwardedFor => "X-Forwarded-For",
            SetField::ForwardedHost => "X-Forwarded-Host",
            SetField::ForwardedProto => "X-Forwarded-Proto",
            SetField::ForwardedPort => "X-Forwarded-Port",
            SetField::RealIp => "X-Real-IP",
            SetField::RequestId => "X-Request-Id",
        }
    }

    /// The name in lowercase, as HTTP/2 and `HeaderName` want it.
    pub fn lower(self) -> &'static str {
        match self {
            SetField::ForwardedFor => "x-forwarded-for",
            SetField::ForwardedHost => "x-forwarded-host",
            SetField::ForwardedProto => "x-forwarded-proto",
            SetField::ForwardedPort => "x-forwarded-port",
            SetField::RealIp => "x-real-ip",
            SetField::RequestId => "x-request-id",
        }
    }
}

/// Where [`set_fields`] writes: a field is begun, given its value in parts, and ended.
pub trait FieldWriter {
    /// Starts `field`.
    fn begin(&mut self, field: SetField);
    /// Appends to the value.
    fn push(&mut self, part: &[u8]);
    /// Ends the field.
    fn end(&mut self);
}

/// Writes the fields the router sets on a request, after the relayed ones:
/// `X-Forwarded-For` (a trusted peer's chain, empty elements left out, then the peer),
/// `X-Forwarded-Host` (the routed host), `X-Forwarded-Proto` and `X-Forwarded-Port` (from
/// the connection) unless a trusted peer sent them, `X-Real-IP` and `X-Request-Id`.
pub fn set_fields<'c>(
    w: &mut impl FieldWriter,
    fwd: &Forwarding<'_>,
    kept: Kept,
    host: Option<&[u8]>,
    chain: impl Iterator<Item = &'c [u8]>,
) {
    w.begin(SetField::ForwardedFor);
    if fwd.trusted {
        for v in chain {
            for part in v.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if !part.is_empty() {
                    w.push(part);
                    w.push(b", ");
                }
            }
        }
    }
    w.push(fwd.peer.as_bytes());
    w.end();
    if let Some(host) = host.filter(|_| !kept.host) {
        w.begin(SetField::ForwardedHost);
        w.push(host);
        w.end();
    }
    if !kept.proto {
        w.begin(SetField::ForwardedProto);
        w.push(fwd.scheme.as_str().as_bytes());
        w.end();
    }
    if !kept.port {
        w.begin(SetField::ForwardedPort);
        w.push(fwd.port.as_bytes());
        w.end();
    }
    w.begin(SetField::RealIp);
    w.push(fwd.client.as_bytes());
    w.end();
    w.begin(SetField::RequestId);
    w.push(fwd.request_id);
    w.end();
}

/// An address as written into forwarding fields, formatted once per connection.
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

/// Whether `ip` is in the trusted proxies.
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|n| n.contains(&ip))
}

/// IPv4-mapped IPv6 peers (from a dual-stack listener) count as their IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` element as an address: plain, or with a port as some proxies write
/// it (`203.0.113.9:50123`, `[2001:db8::9]:50123`, `[2001:db8::9]`). Read as no address, such
/// an element made the trusted proxy itself the client, whatever the client's address.
fn forwarded_ip(part: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(part).ok()?;
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    let port_ok = |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let ok = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        return ok.then(|| v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6))?;
    }
    let (v4, port) = text.split_once(':')?;
    port_ok(port)
        .then(|| v4.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4))
        .flatten()
}

/// The client's address: from a trusted peer, the right-most `X-Forwarded-For` address that
/// is not itself a trusted proxy (the left-most if all are, as nginx's `real_ip_recursive`);
/// otherwise the peer. `chain` is the field's values in order, as raw bytes; empty
/// elements are skipped, as [`set_fields`] leaves them out.
pub fn client_ip_in<'a>(
    chain: impl DoubleEndedIterator<Item = &'a [u8]>,
    peer: IpAddr,
    trusted: &[IpNet],
) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    // Fields are in order; within one, addresses are left to right. Walk from the right.
    for v in chain.rev() {
        for part in v.rsplit(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if part.is_empty() {
                continue;
            }
            // An IPv4-mapped address is its IPv4 address, as X-Real-IP writes it and as
            // allow-lists and ip_hash must read it.
            let Some(ip) = forwarded_ip(part).map(canonical) else {
                return client;
            };
            if !is_trusted(ip, trusted) {
                return ip;
            }
            client = ip;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_classified_in_any_case() {
        assert_eq!(classify("X-Forwarded-Port"), Field::ForwardedPort);
        assert_eq!(classify("x-forwarded-ssl"), Field::Forwarding);
        assert_eq!(classify("X-Forwarded-Prefix"), Field::Forwarding);
        assert_eq!(classify("x-client-ip"), Field::Forwarding);
        assert_eq!(classify("Forwarded"), Field::Forwarding);
        assert_eq!(classify("x-forwarded-"), Field::Other);
        assert_eq!(classify("X_Forwarded_Ssl"), Field::Lookalike);
        assert_eq!(classify("X_Client_IP"), Field::Lookalike);
        assert_eq!(classify("x_request_id"), Field::Lookalike);
        assert_eq!(classify("x_custom_thing"), Field::Other);
        for name in [
            "te",
            "proxy",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "PROXY-AUTHORIZATION",
        ] {
            assert_eq!(classify(name), Field::HopByHop, "{name}");
        }
    }

    fn fwd<'a>(peer: &'a PeerText, trusted: bool) -> Forwarding<'a> {
        Forwarding {
            peer,
            trusted,
            client: peer,
            drop_underscores: false,
            request_id: b"id-1",
            scheme: Scheme::Https,
            port: "443",
        }
    }

    #[test]
    fn the_forwarding_family_is_trusted_or_dropped_whole() {
        let p = PeerText::new("10.0.0.1".parse().unwrap());
        for name in [
            "x-forwarded-ssl",
            "forwarded",
            "x-client-ip",
            "x-forwarded-prefix",
        ] {
            let k = classify(name);
            assert_eq!(request_fate(k, name, &fwd(&p, false)), Fate::Drop, "{name}");
            assert_eq!(request_fate(k, name, &fwd(&p, true)), Fate::Keep, "{name}");
        }
        for name in ["x-forwarded-host", "x-forwarded-proto", "x-forwarded-port"] {
            let k = classify(name);
            assert_eq!(request_fate(k, name, &fwd(&p, false)), Fate::Replace);
            assert_eq!(request_fate(k, name, &fwd(&p, true)), Fate::KeepInstead);
        }
    }

    struct Text(String);
    impl FieldWriter for Text {
        fn begin(&mut self, field: SetField) {
            self.0.push_str(field.title());
            self.0.push_str(": ");
        }
        fn push(&mut self, part: &[u8]) {
            self.0.push_str(std::str::from_utf8(part).unwrap());
        }
        fn end(&mut self) {
            self.0.push('\n');
        }
    }

    #[test]
    fn set_fields_take_scheme_and_port_from_the_connection() {
        let p = PeerText::new("10.0.0.1".parse().unwrap());
        let mut w = Text(String::new());
        let chain = [&b"1.2.3.4, ,5.6.7.8"[..], b""];
        set_fields(
            &mut w,
            &fwd(&p, true),
            Kept::default(),
            Some(b"a.example"),
            chain.into_iter(),
        );
        assert_eq!(
            w.0,
            "X-Forwarded-For: 1.2.3.4, 5.6.7.8, 10.0.0.1\nX-Forwarded-Host: a.example\n\
             X-Forwarded-Proto: https\nX-Forwarded-Port: 443\nX-Real-IP: 10.0.0.1\n\
             X-Request-Id: id-1\n"
        );
        let mut kept = Kept::default();
        kept.note(Field::ForwardedProto);
        let mut w = Text(String::new());
        set_fields(&mut w, &fwd(&p, false), kept, None, chain.into_iter());
        assert_eq!(
            w.0,
            "X-Forwarded-For: 10.0.0.1\nX-Forwarded-Port: 443\nX-Real-IP: 10.0.0.1\n\
             X-Request-Id: id-1\n"
        );
    }

    #[test]
    fn client_ip_from_a_trusted_chain() {
        let trusted: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let chain = [&b"9.9.9.9, 1.1.1.1, ,127.0.0.5"[..]];
        assert_eq!(client_ip_in(chain.into_iter(), lo, &trusted), ip("1.1.1.1"));
        assert_eq!(
            client_ip_in(chain.into_iter(), ip("8.8.8.8"), &trusted),
            ip("8.8.8.8")
        );
        assert_eq!(client_ip_in([&b"junk"[..]].into_iter(), lo, &trusted), lo);
        for (with_port, want) in [
            ("203.0.113.9:50123", "203.0.113.9"),
            ("[2001:db8::9]:443", "2001:db8::9"),
            ("[2001:db8::9]", "2001:db8::9"),
        ] {
            let chain = [with_port.as_bytes()];
            assert_eq!(client_ip_in(chain.into_iter(), lo, &trusted), ip(want));
        }
        for junk in [
            "1.2.3.4:",
            "1.2.3.4:x",
            "[2001:db8::9",
            "2001:db8::9]:1",
            "a:1",
        ] {
            assert_eq!(
                client_ip_in([junk.as_bytes()].into_iter(), lo, &trusted),
                lo,
                "{junk}"
            );
        }
        let mapped = [&b"::ffff:10.1.2.3"[..]];
        assert_eq!(
            client_ip_in(mapped.into_iter(), lo, &trusted),
            ip("10.1.2.3")
        );
        assert!(is_h2c_upgrade(b"h2c"));
        assert!(is_h2c_upgrade(b"websocket, H2C"));
        assert!(!is_h2c_upgrade(b"websocket"));
    }
}
