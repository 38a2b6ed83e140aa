//! Header rewriting: hop-by-hop removal (RFC 9110 §7.6.1) and X-Forwarded-*.

use std::io::Write as _;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// `Proxy:` is not a real header; dropping it defuses "httpoxy" in CGI-style backends.
const PROXY: HeaderName = HeaderName::from_static("proxy");
/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    header::TE,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    PROXY_CONNECTION,
    PROXY,
];

/// `X-Request-Id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `X-Real-IP`.
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// `Forwarded` (RFC 7239).
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Dashed names whose `_` spellings are never forwarded: frameworks that map names to
/// variables (PHP's `$_SERVER`, WSGI, CGI) read `X_Forwarded_For` as `X-Forwarded-For`.
const DASHED: [&str; 11] = [
    "x-real-ip",
    "keep-alive",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-host",
    "proxy-connection",
    "x-forwarded-proto",
    "transfer-encoding",
    "proxy-authenticate",
    "proxy-authorization",
    "forwarded",
];

/// Whether `name` has an `_` and reads as a client-address, framing or hop-by-hop field
/// once `_` is `-` (case-insensitive).
pub fn is_lookalike(name: &str) -> bool {
    let name = name.as_bytes();
    name.contains(&b'_')
        && DASHED.iter().any(|d| {
            d.len() == name.len()
                && name
                    .iter()
                    .zip(d.as_bytes())
                    .all(|(&a, &b)| a.to_ascii_lowercase() == b || (a == b'_' && b == b'-'))
        })
}

/// Removes the request fields a backend could mistake for ours: `_` lookalikes of
/// client-address and framing fields (with `drop_underscores`, every name with `_`), and
/// `Forwarded` and `X-Real-IP` unless the peer is trusted.
pub fn drop_spoofable(headers: &mut HeaderMap, peer_trusted: bool, drop_underscores: bool) {
    if !peer_trusted {
        headers.remove(FORWARDED);
    }
    headers.remove(X_REAL_IP);
    let spoofed =
        |n: &HeaderName| n.as_str().contains('_') && (drop_underscores || is_lookalike(n.as_str()));
    if headers.keys().any(spoofed) {
        // Rare: only then collect the names to drop.
        let names: Vec<HeaderName> = headers.keys().filter(|n| spoofed(n)).cloned().collect();
        for n in names {
            headers.remove(n);
        }
    }
}

/// Whether the request asks for an HTTP/1.1 upgrade (`Connection: upgrade` plus `Upgrade`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"upgrade"))
}

fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether `name` is one of the fixed hop-by-hop headers (case-insensitive).
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.as_str().eq_ignore_ascii_case(name))
}

/// Removes hop-by-hop headers: those named by `Connection`, then the fixed list. With
/// `upgrade`, `Upgrade` is kept and `Connection: upgrade` restored.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let mut values = headers.get_all(header::CONNECTION).iter();
    match (values.next().cloned(), values.next().is_some()) {
        (None, _) => {}
        // The usual case: one Connection header. Its value is a cheap shared clone.
        (Some(v), false) => remove_named(headers, &v, upgrade),
        (Some(_), true) => {
            let all: Vec<HeaderValue> = headers
                .get_all(header::CONNECTION)
                .iter()
                .cloned()
                .collect();
            for v in &all {
                remove_named(headers, v, upgrade);
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Removes the headers a `Connection` value names (but `Upgrade` when upgrading).
fn remove_named(headers: &mut HeaderMap, value: &HeaderValue, upgrade: bool) {
    for token in value.as_bytes().split(|&b| b == b',') {
        let Ok(name) = std::str::from_utf8(token.trim_ascii()) else {
            continue;
        };
        if name.is_empty() || (upgrade && name.eq_ignore_ascii_case("upgrade")) {
            continue;
        }
        // Lookup by &str is case-insensitive and allocates nothing.
        headers.remove(name);
    }
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

/// The client's address: from a trusted peer, the right-most `X-Forwarded-For` address that
/// is not itself a trusted proxy (the left-most if all are, as nginx's `real_ip_recursive`);
/// otherwise the peer.
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    let chain = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .map(HeaderValue::as_bytes);
    client_ip_in(chain, peer, trusted)
}

/// [`client_ip`] over the `X-Forwarded-For` values in order, as raw bytes.
pub fn client_ip_in<'a>(
    chain: impl DoubleEndedIterator<Item = &'a [u8]>,
    peer: IpAddr,
    trusted: &[IpNet],
) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    // Headers are in order; within one, addresses are left to right. Walk from the right.
    for v in chain.rev() {
        for part in v.rsplit(|&b| b == b',') {
            let Some(ip) = std::str::from_utf8(part.trim_ascii())
                .ok()
                .and_then(|s| s.parse::<IpAddr>().ok())
            else {
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

/// Sets X-Forwarded-For/Host/Proto and X-Real-IP (`client`). From a trusted peer the
/// existing chain, host and proto are kept (nginx terminating TLS says `https`); from
/// anyone else they are replaced.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    peer_trusted: bool,
    host: &HeaderValue,
    client: IpAddr,
) {
    let mut buf = [0u8; 512];
    let mut w = &mut buf[..];
    let mut fits = true;
    if peer_trusted {
        for v in headers.get_all(X_FORWARDED_FOR) {
            fits &= w.write_all(v.as_bytes()).is_ok() && w.write_all(b", ").is_ok();
        }
    }
    fits &= write!(w, "{}", canonical(peer)).is_ok();
    let remaining = w.len();
    let xff = if fits {
        HeaderValue::from_bytes(&buf[..buf.len() - remaining]).ok()
    } else {
        // A chain longer than the stack buffer: rare, so allocate.
        let mut s = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        s.push_str(", ");
        s.push_str(&canonical(peer).to_string());
        HeaderValue::from_str(&s).ok()
    };
    if let Some(xff) = xff {
        headers.insert(X_FORWARDED_FOR, xff);
    }
    if !peer_trusted || !headers.contains_key(X_FORWARDED_HOST) {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    if !peer_trusted || !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    let mut buf = [0u8; 48];
    let mut w = &mut buf[..];
    if write!(w, "{}", canonical(client)).is_ok() {
        let n = 48 - w.len();
        if let Ok(v) = HeaderValue::from_bytes(&buf[..n]) {
            headers.insert(X_REAL_IP, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> Vec<IpNet> {
        vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "x"),
            ("proxy", "http://evil"),
            ("x-kept", "yes"),
            ("host", "a"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept", "host"]);
    }

    #[test]
    fn joins_h2_cookies() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");
    }

    #[test]
    fn keeps_upgrade_when_upgrading() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn client_ip_from_trusted_chain() {
        let t = trusted();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let h = map(&[
            ("x-forwarded-for", "6.6.6.6, 203.0.113.9"),
            ("x-forwarded-for", "127.0.0.2"),
        ]);
        assert_eq!(
            client_ip(&h, lo, &t),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // An untrusted peer's header is ignored.
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(client_ip(&h, other, &t), other);
        // No header: the peer.
        assert_eq!(client_ip(&HeaderMap::new(), lo, &t), lo);
        // Garbage stops the walk at the last good address.
        let h = map(&[("x-forwarded-for", "junk, 127.0.0.9")]);
        assert_eq!(
            client_ip(&h, lo, &t),
            "127.0.0.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn forwarded_headers_trusted_and_not() {
        let host = HeaderValue::from_static("chat.app.example.net");
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
        ]);
        let lo = "127.0.0.1".parse().unwrap();
        set_forwarded(&mut h, lo, true, &host, "203.0.113.9".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(h["x-real-ip"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "chat.app.example.net");

        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-proto", "https"),
        ]);
        let peer = "198.51.100.1".parse().unwrap();
        set_forwarded(&mut h, peer, false, &host, peer);
        assert_eq!(h["x-forwarded-for"], "198.51.100.1");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn spoofable_fields_are_dropped() {
        let pairs = [
            ("x_forwarded_for", "1.1.1.1"),
            ("x-forwarded_host", "evil"),
            ("x_real_ip", "1.1.1.1"),
            ("content_length", "5"),
            ("x-real-ip", "2.2.2.2"),
            ("forwarded", "for=3.3.3.3"),
            ("x_custom", "kept"),
            ("accept", "*/*"),
        ];
        let mut h = map(&pairs);
        drop_spoofable(&mut h, false, false);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["accept", "x_custom"]);
        let mut h = map(&pairs);
        drop_spoofable(&mut h, true, true);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["accept", "forwarded"]);
        assert!(is_lookalike("X_Forwarded_Proto"));
        assert!(!is_lookalike("x-forwarded-proto"));
    }

    #[test]
    fn long_chains_still_append() {
        let long = vec!["10.0.0.1"; 100].join(", ");
        let mut h = map(&[("x-forwarded-for", &long)]);
        let host = HeaderValue::from_static("h");
        let lo = "127.0.0.1".parse().unwrap();
        set_forwarded(&mut h, lo, true, &host, lo);
        assert!(h["x-forwarded-for"]
            .to_str()
            .unwrap()
            .ends_with("10.0.0.1, 127.0.0.1"));
    }
}
