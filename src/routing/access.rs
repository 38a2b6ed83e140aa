//! Who may call a service, from its instances' tags: an IP allow-list (`router.allow=`) and
//! forward auth to another service (`router.auth=`, `router.auth-headers=`,
//! `router.auth-cache=`, `router.auth-cache-key=`). Read once per rebuild; a service
//! without these tags carries no policy at all. A tag that cannot be read fails closed:
//! the service is then refused rather than opened.

use std::net::IpAddr;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;

use super::table::InstanceSpec;

/// `router.allow=10.0.0.0/8,192.0.2.7`: only these client addresses may call.
pub const ALLOW_TAG: &str = "router.allow=";
/// `router.auth=<service>`: every request needs that service's permission.
pub const AUTH_TAG: &str = "router.auth=";
/// `router.auth-headers=X-User,X-Scopes`: the auth answer's fields copied onto the request.
pub const AUTH_HEADERS_TAG: &str = "router.auth-headers=";
/// `router.auth-cache=10s`: allow decisions kept this long.
pub const AUTH_CACHE_TAG: &str = "router.auth-cache=";
/// `router.auth-cache-key=Authorization` (the default) or `cookie:<name>`.
pub const AUTH_CACHE_KEY_TAG: &str = "router.auth-cache-key=";

/// The longest `router.auth-cache=` honoured: a revoked credential must stop working soon.
pub const MAX_AUTH_CACHE: Duration = Duration::from_secs(300);

/// A service's access policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Allow-lists; a client must be in every one (instances that disagree all count).
    /// Empty: any client. A list with no valid entry refuses everyone.
    pub allow: Box<[Box<[IpNet]>]>,
    /// Forward auth, if required.
    pub auth: Option<AuthSpec>,
}

/// Forward auth for a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSpec {
    /// The Consul service asked; empty when the tag had no value (always unavailable).
    pub service: Box<str>,
    /// The auth answer's fields copied onto the request (client copies removed first).
    pub copy: Box<[HeaderName]>,
    /// How long an allow decision is kept, if caching is on.
    pub cache: Option<Duration>,
    /// What a cached decision is keyed by.
    pub cache_key: CacheKey,
}

/// The request field an allow decision is cached under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheKey {
    /// A whole field's value (lowercase name), e.g. `authorization`.
    Field(HeaderName),
    /// One cookie's value.
    Cookie(Box<str>),
}

impl Access {
    /// Whether `client` passes the allow-lists.
    pub fn allows(&self, client: IpAddr) -> bool {
        self.allow
            .iter()
            .all(|list| list.iter().any(|net| net.contains(&client)))
    }

    /// The policy the instances' tags declare, or `None` when they declare none. Instances
    /// that disagree fail closed: every allow-list applies, and auth is required when any
    /// instance asks for it (the first service by name, with every field to copy).
    pub fn from_specs(service: &str, specs: &[InstanceSpec]) -> Option<Access> {
        let mut allow: Vec<Box<[IpNet]>> = Vec::new();
        let mut auth: Vec<&str> = Vec::new();
        let mut copy: Vec<HeaderName> = Vec::new();
        let mut cache: Vec<Option<Duration>> = Vec::new();
        let mut key: Option<CacheKey> = None;
        for spec in specs {
            // Each instance's own cache time (`None` without the tag): they all must agree.
            cache.push(
                spec.tags
                    .iter()
                    .find_map(|t| t.strip_prefix(AUTH_CACHE_TAG))
                    .and_then(|v| parse_cache(service, v)),
            );
        }
        for tag in specs.iter().flat_map(|s| s.tags.iter()) {
            if let Some(v) = tag.strip_prefix(ALLOW_TAG) {
                let list = parse_allow(service, v);
                if !allow.contains(&list) {
                    allow.push(list);
                }
            } else if let Some(v) = tag.strip_prefix(AUTH_TAG) {
                auth.push(v.trim());
            } else if let Some(v) = tag.strip_prefix(AUTH_HEADERS_TAG) {
                for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    match HeaderName::from_bytes(name.as_bytes()) {
                        Ok(n) if !grantable(&n) => {
                            tracing::warn!(service, tag = %tag, field = %n, "router.auth-headers: a framing, connection, routing or forwarding field is never granted; left out")
                        }
                        Ok(n) if !copy.contains(&n) => copy.push(n),
                        Ok(_) => {}
                        Err(_) => {
                            tracing::warn!(service, tag = %tag, "ignoring a field name that is not a token")
                        }
                    }
                }
            } else if let Some(v) = tag.strip_prefix(AUTH_CACHE_KEY_TAG) {
                key = parse_cache_key(service, v).or(key);
            }
        }
        auth.sort_unstable();
        auth.dedup();
        if auth.len() > 1 {
            tracing::warn!(
                service,
                ?auth,
                "instances name different router.auth services; the first by name is asked"
            );
        }
        let auth = auth.first().map(|name| AuthSpec {
            service: (*name).into(),
            copy: copy.into_boxed_slice(),
            // Instances that disagree: the shortest time, none if any says none.
            cache: cache.iter().copied().min().flatten(),
            cache_key: key.unwrap_or(CacheKey::Field(http::header::AUTHORIZATION)),
        });
        if allow.is_empty() && auth.is_none() {
            return None;
        }
        Some(Access {
            allow: allow.into_boxed_slice(),
            auth,
        })
    }
}

/// Whether an auth answer's field may be copied onto a request: not one that frames the
/// body (the router relays it by the client's framing, so a backend told otherwise would
/// read the body as another request, never asked about), not a hop-by-hop or connection
/// field, not `Host` (routing), not one the router sets itself (X-Forwarded-*, X-Real-IP,
/// X-Request-Id) or any `_` spelling of those, and not `Trailer` or `Expect`.
fn grantable(name: &HeaderName) -> bool {
    use crate::proxy::fields::{classify, Field};
    classify(name.as_str()) == Field::Other && !matches!(name.as_str(), "trailer" | "expect")
}

/// An allow-list value: addresses and CIDRs separated by commas. Entries that are neither
/// are left out, with a warning; a list left empty refuses everyone.
fn parse_allow(service: &str, value: &str) -> Box<[IpNet]> {
    let mut out = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let net = entry
            .parse::<IpNet>()
            .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from));
        match net {
            Ok(net) => out.push(net),
            Err(_) => tracing::warn!(
                service,
                entry,
                "router.allow: not an address or CIDR; left out"
            ),
        }
    }
    if out.is_empty() {
        tracing::warn!(
            service,
            value,
            "router.allow names no valid address: every client is refused"
        );
    }
    out.into_boxed_slice()
}

/// A cache time (`10s`, `1m`); `0`, `off` or an unreadable value turn caching off, and a
/// time over [`MAX_AUTH_CACHE`] is cut to it.
fn parse_cache(service: &str, value: &str) -> Option<Duration> {
    let value = value.trim();
    if value == "0" || value.eq_ignore_ascii_case("off") {
        return None;
    }
    match humantime::parse_duration(value) {
        Ok(d) if d.is_zero() => None,
        Ok(d) => Some(d.min(MAX_AUTH_CACHE)),
        Err(e) => {
            tracing::warn!(
                service,
                value,
                "router.auth-cache: {e}; decisions are not cached"
            );
            None
        }
    }
}

fn parse_cache_key(service: &str, value: &str) -> Option<CacheKey> {
    let value = value.trim();
    let parsed = match value.strip_prefix("cookie:") {
        Some(name) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()) => {
            Some(CacheKey::Cookie(name.into()))
        }
        Some(_) => None,
        None => HeaderName::from_bytes(value.as_bytes())
            .ok()
            .map(CacheKey::Field),
    };
    if parsed.is_none() {
        tracing::warn!(service, value, "router.auth-cache-key: not a field name or cookie:<name>; the default (Authorization) is used");
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::testing::spec;
    use crate::routing::Health;

    fn access(tags: &[&[&str]]) -> Option<Access> {
        let specs: Vec<_> = tags
            .iter()
            .enumerate()
            .map(|(i, t)| spec(&format!("i{i}"), 1, Health::Passing, t))
            .collect();
        Access::from_specs("s", &specs)
    }

    #[test]
    fn no_tags_no_policy() {
        assert_eq!(access(&[&["router.strategy=random"]]), None);
    }

    #[test]
    fn allow_lists() {
        let a = access(&[&["router.allow=10.0.0.0/8, 192.0.2.7"]]).unwrap();
        assert!(a.auth.is_none());
        assert!(a.allows("10.1.2.3".parse().unwrap()));
        assert!(a.allows("192.0.2.7".parse().unwrap()));
        assert!(!a.allows("192.0.2.8".parse().unwrap()));
        // Two instances that disagree: a client must be in both.
        let a = access(&[&["router.allow=10.0.0.0/8"], &["router.allow=10.1.0.0/16"]]).unwrap();
        assert!(a.allows("10.1.0.1".parse().unwrap()));
        assert!(!a.allows("10.2.0.1".parse().unwrap()));
        // Nothing valid: nobody.
        let a = access(&[&["router.allow=localhost"]]).unwrap();
        assert!(!a.allows("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn auth_tags() {
        let a = access(&[
            &["router.auth=sso", "router.auth-headers=X-User, x-scopes"],
            &["router.auth=sso", "router.auth-cache=10s"],
        ])
        .unwrap();
        let auth = a.auth.unwrap();
        assert_eq!(&*auth.service, "sso");
        assert_eq!(auth.copy.len(), 2);
        assert_eq!(auth.copy[0], "x-user");
        // One instance without a cache time: not cached.
        assert_eq!(auth.cache, None);
        assert_eq!(auth.cache_key, CacheKey::Field(http::header::AUTHORIZATION));

        let a = access(&[&[
            "router.auth=sso",
            "router.auth-cache=1h",
            "router.auth-cache-key=cookie:session",
        ]])
        .unwrap();
        let auth = a.auth.unwrap();
        assert_eq!(auth.cache, Some(MAX_AUTH_CACHE));
        assert_eq!(auth.cache_key, CacheKey::Cookie("session".into()));
        // Disagreeing services: the first by name; an empty name stays (unavailable).
        let a = access(&[&["router.auth=b"], &["router.auth=a"]]).unwrap();
        assert_eq!(&*a.auth.unwrap().service, "a");
        // Framing, connection, routing and forwarding fields are never granted.
        let a = access(&[&[
            "router.auth=sso",
            "router.auth-headers=Content-Length, transfer-encoding, Host, X-Real-IP, X_Forwarded_For, Connection, TE, Trailer, X-User",
        ]])
        .unwrap();
        assert_eq!(&*a.auth.unwrap().copy, &[HeaderName::from_static("x-user")]);
        let a = access(&[&["router.auth="]]).unwrap();
        assert_eq!(&*a.auth.unwrap().service, "");
    }
}
