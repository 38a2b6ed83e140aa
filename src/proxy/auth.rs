//! Forward auth (`router.auth=<service>`), one step between routing and the backend's
//! request, the same for both protocol paths: the backend's head (HTTP/1.1 bytes, already
//! rewritten by the field rules) becomes the question put to the auth service: same method
//! and target, same fields without body or connection fields, plus `X-Forwarded-Method` and
//! `X-Forwarded-Uri`. It is exchanged like any bodiless request (the core's `Attempts`, the
//! fast path's socket pool) within `proxy.auth_timeout`. A 2xx lets the request through
//! with the fields named in `router.auth-headers=` copied onto it; any other answer is
//! the client's, as the auth service gave it; no answer is a 503.
//!
//! This is nginx's `auth_request` and Traefik's forwardAuth. Allow decisions may be cached
//! (`router.auth-cache=`) in a fixed table of slots, made on first use; denials never are.

use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::BodyExt;

use super::answer::StreamBody;
use super::answer::{AnswerBody, LocalAnswer};
use super::attempts::{AttemptRules, Attempts};
use super::core::{Core, Refused, Routed};
use super::error::{Error, ErrorType};
use super::h2::direct;
use super::h2::fields as h2fields;
use super::h2up;
use crate::routing::{AuthSpec, CacheKey, Service};
use crate::upstream::H2Body;

/// Most fields a question may carry: more than any head either path lets through (the
/// fast path's limit is 100; HTTP/2's 16 KiB header list holds at most 496 fields of 33
/// bytes, plus the router's own and the granted ones). A head the parser could not take
/// would answer 503 to any client that sent many short fields.
const MAX_FIELDS: usize = 640;
/// Most body bytes of an allowing answer read so its connection can be pooled.
const DRAIN_LIMIT: u64 = 64 * 1024;
/// Slots in the decision cache; a colliding decision replaces the older one.
const CACHE_SLOTS: usize = 4096;
/// Longest key value cached (a longer one is always asked): 4,096 slots of 64 KiB keys
/// would hold 256 MiB.
const MAX_CACHE_KEY: usize = 4096;

/// What came of asking: the metric label and access log value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The auth service answered 2xx.
    Allowed,
    /// A cached 2xx.
    Cached,
    /// It answered otherwise (not 5xx); the client got its answer.
    Denied,
    /// It gave no answer (503), or a 5xx (relayed).
    Error,
}

impl Outcome {
    /// The label value (`allowed`, `cached`, `denied`, `error`).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Cached => "cached",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

/// Fields an allowing answer gives the request.
pub type Grant = Option<Arc<[(HeaderName, HeaderValue)]>>;

/// What the request does next.
#[derive(Debug)]
pub struct Decision {
    /// For metrics and the access log.
    pub outcome: Outcome,
    /// Pass with these fields, or answer.
    pub result: Result<Grant, Refused>,
}

/// Forward auth's settings and decision cache, kept by the core.
#[derive(Debug)]
pub struct Auth {
    /// The rules an auth exchange follows: the proxy's, with `proxy.auth_timeout` as the
    /// deadline for all tries together.
    rules: AttemptRules,
    cache: Cache,
}

impl Auth {
    /// Auth under `rules` with `timeout` in place of the response timeout.
    pub fn new(rules: AttemptRules, timeout: Duration) -> Self {
        Auth {
            rules: AttemptRules {
                response_timeout: timeout,
                ..rules
            },
            cache: Cache::default(),
        }
    }
}

/// Asks `routed`'s auth service about the request whose backend head is `head`.
pub async fn authorize(core: &Core, routed: &Routed, spec: &AuthSpec, head: &[u8]) -> Decision {
    let start = Instant::now();
    let decision = match Question::parse(head) {
        Ok(q) => decide(core, routed, spec, &q).await,
        Err(e) => Decision {
            outcome: Outcome::Error,
            result: Err(Refused::from(e)),
        },
    };
    let metrics = routed.service.stats.metrics.get();
    metrics.auth(decision.outcome.as_str(), start.elapsed());
    decision
}

async fn decide(core: &Core, routed: &Routed, spec: &AuthSpec, q: &Question<'_>) -> Decision {
    let auth = core.auth();
    let key = spec.cache.and_then(|_| q.cache_key(&spec.cache_key));
    if let Some(key) = key {
        if let Some(grant) = auth.cache.get(&routed.service.name, spec, key) {
            return Decision {
                outcome: Outcome::Cached,
                result: Ok(grant),
            };
        }
    }
    let unavailable = |why: &str| {
        tracing::debug!(service = %routed.service.name, auth = %spec.service, why, "no auth answer");
        Decision {
            outcome: Outcome::Error,
            result: Err(Refused {
                error: ErrorType::AuthUnavailable.into(),
                service: Some(routed.service.clone()),
                answer: None,
            }),
        }
    };
    let Some(service) = core.routes().load().service_named(&spec.service).cloned() else {
        return unavailable("no such service");
    };
    if service.routable == 0 {
        return unavailable("no routable instance");
    }
    let now = Instant::now();
    // An auth service carries traffic: it is watched like any busy service.
    service.stats.touch_at(now);
    let balance = core.balance_key(&service, routed.client, q.target.as_bytes());
    // A question has no body and changes nothing: a broken pooled connection may get it again.
    let mut attempts = Attempts::new(&auth.rules, &service, balance, now, true);
    let asked = ask(core, &service, &mut attempts, q, &spec.copy);
    let answer = match tokio::time::timeout(auth.rules.response_timeout, asked).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return unavailable(&e.to_string()),
        Err(_) => return unavailable("auth_timeout"),
    };
    if !answer.status.is_success() {
        let outcome = if answer.status.is_server_error() {
            Outcome::Error
        } else {
            Outcome::Denied
        };
        let relayed = LocalAnswer {
            status: answer.status,
            headers: answer.headers,
            body: AnswerBody::Stream(answer.body),
        };
        return Decision {
            outcome,
            result: Err(Refused {
                error: ErrorType::AuthDenied.into(),
                service: Some(routed.service.clone()),
                answer: Some(Box::new(relayed)),
            }),
        };
    }
    let granted: Vec<(HeaderName, HeaderValue)> = spec
        .copy
        .iter()
        .flat_map(|name| {
            answer
                .headers
                .get_all(name)
                .iter()
                .map(move |v| (name.clone(), v.clone()))
        })
        .collect();
    let grant: Grant = (!granted.is_empty()).then(|| granted.into());
    // Read what little body it has, so its connection goes back to the pool.
    let mut body = answer.body;
    let drain = async {
        let mut read = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
            if read > DRAIN_LIMIT {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(auth.rules.response_timeout, drain).await;
    if let (Some(ttl), Some(key)) = (spec.cache, key) {
        auth.cache
            .put(&routed.service.name, spec, key, ttl, grant.clone());
    }
    Decision {
        outcome: Outcome::Allowed,
        result: Ok(grant),
    }
}

/// An auth service's answer, in whichever protocol it was asked: the fields for the
/// client (the response rules applied), and the body.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: StreamBody,
}

/// Puts the question to `service` by `attempts`: as HTTP/1.1 bytes on the fast path's
/// pool, or as an HTTP/2 request on the instance's pool for a `router.proto=h2c`/`h2`
/// service.
async fn ask(
    core: &Core,
    service: &Service,
    attempts: &mut Attempts<'_>,
    q: &Question<'_>,
    copy: &[HeaderName],
) -> Result<Reply, Error> {
    if !service.proto.is_h2() {
        let mut out = Vec::with_capacity(q.len + 128);
        q.write(&mut out, copy);
        let a = direct::send(core, attempts, &out, q.method == "HEAD").await?;
        return Ok(Reply {
            status: a.status,
            headers: a.headers,
            body: a.body.map_err(std::io::Error::other).boxed_unsync(),
        });
    }
    let mut req = q.h2_request(copy)?;
    h2up::to_h2(&mut req, service.proto)?;
    let deadline = attempts.deadline();
    let a = h2up::send(core.h2_backends(), attempts, req, deadline).await?;
    let (parts, body) = a.response.into_parts();
    let mut headers = parts.headers;
    h2fields::rewrite_response(&mut headers);
    // The stream's slot and the in-flight count are held until the body is dropped.
    let held = (a.lease, a.in_flight);
    let body = body.map_err(move |e| {
        let _held = &held;
        std::io::Error::other(e)
    });
    Ok(Reply {
        status: parts.status,
        headers,
        body: body.boxed_unsync(),
    })
}

/// The backend's head, parsed again for the question (only on auth's path).
struct Question<'h> {
    method: &'h str,
    target: &'h str,
    fields: Vec<(&'h str, &'h [u8])>,
    len: usize,
    /// The head's HTTP version: 1.0 (`0`) or 1.1 (`1`).
    version: u8,
}

impl<'h> Question<'h> {
    fn parse(head: &'h [u8]) -> Result<Self, Error> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut slots);
        let bad = |why: &str| Error::new(ErrorType::AuthUnavailable).because(why);
        let len = match req.parse(head) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Err(bad("incomplete head")),
            Err(e) => return Err(bad(&e.to_string())),
        };
        Ok(Question {
            method: req.method.unwrap_or("GET"),
            target: req.path.unwrap_or("/"),
            fields: req.headers.iter().map(|h| (h.name, h.value)).collect(),
            len,
            version: req.version.unwrap_or(1),
        })
    }

    /// Writes the question: the request line, the fields except those about the body or
    /// the connection and the client's copies of what the auth answer will set, then
    /// `X-Forwarded-Method` and `X-Forwarded-Uri`.
    fn write(&self, out: &mut Vec<u8>, copy: &[HeaderName]) {
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in self.asked(copy) {
            push_field(out, name, value);
        }
        out.extend_from_slice(b"\r\n");
    }

    /// The question's fields: the request's, less those about the body or the connection
    /// and the client's copies of what the auth answer will set, then
    /// `X-Forwarded-Method` and `X-Forwarded-Uri`.
    fn asked<'q>(&'q self, copy: &'q [HeaderName]) -> impl Iterator<Item = (&'q str, &'h [u8])> {
        self.fields
            .iter()
            .filter(move |(name, _)| !is_left_out(name) && !is_copied(name, copy))
            .copied()
            .chain([
                ("X-Forwarded-Method", self.method.as_bytes()),
                ("X-Forwarded-Uri", self.target.as_bytes()),
            ])
    }

    /// The question as an HTTP/2 request (`Host` still a field: `h2up::to_h2` makes it the
    /// authority).
    fn h2_request(&self, copy: &[HeaderName]) -> Result<http::Request<H2Body>, Error> {
        let bad = |why: &str| Error::new(ErrorType::AuthUnavailable).because(why);
        let method =
            http::Method::from_bytes(self.method.as_bytes()).map_err(|e| bad(&e.to_string()))?;
        let body = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        let mut req = http::Request::builder()
            .method(method)
            .uri(self.target)
            .body(body)
            .map_err(|e| bad(&e.to_string()))?;
        let headers = req.headers_mut();
        for (name, value) in self.asked(copy) {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| bad(&e.to_string()))?;
            let value = HeaderValue::from_bytes(value).map_err(|e| bad(&e.to_string()))?;
            headers.append(name, value);
        }
        Ok(req)
    }

    /// The value a decision is cached under, if the request has exactly one. A key field
    /// or cookie given twice is not cached (always asked): the auth service may decide on
    /// another copy than the one the router would key by (the last cookie of a name, as a
    /// Python `dict` reads them), and a forged value would then be cached as an allow.
    fn cache_key(&self, key: &CacheKey) -> Option<&'h [u8]> {
        let mut values: Box<dyn Iterator<Item = &'h [u8]> + '_> = match key {
            CacheKey::Field(name) => Box::new(
                self.fields
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
                    .map(|(_, v)| *v),
            ),
            CacheKey::Cookie(cookie) => Box::new(
                self.fields
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
                    .flat_map(|(_, v)| v.split(|&b| b == b';'))
                    .filter_map(|pair| {
                        let pair = pair.trim_ascii();
                        let eq = pair.iter().position(|&b| b == b'=')?;
                        (pair[..eq].trim_ascii() == cookie.as_bytes()).then_some(&pair[eq + 1..])
                    }),
            ),
        };
        let first = values.next()?;
        if values.next().is_some() {
            return None;
        }
        Some(first).filter(|v| !v.is_empty() && v.len() <= MAX_CACHE_KEY)
    }
}

/// Fields a question never carries: framing (it has no body), connection options, an
/// expectation of a body, and the two it sets itself.
fn is_left_out(name: &str) -> bool {
    const LEFT_OUT: [&str; 10] = [
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "expect",
        "x-forwarded-method",
        "x-forwarded-uri",
    ];
    LEFT_OUT.iter().any(|l| name.eq_ignore_ascii_case(l))
}

/// Whether a request field named `name` is a client's copy of one of the granted fields
/// `copy`: in any case, and with `_` read as `-`, as WSGI, PHP and CGI read names (a
/// client's `X_User` is their `HTTP_X_USER`, as `X-User` is).
pub fn is_copied(name: &str, copy: &[HeaderName]) -> bool {
    let fold = |b: u8| {
        if b == b'_' {
            b'-'
        } else {
            b.to_ascii_lowercase()
        }
    };
    copy.iter().any(|c| {
        let c = c.as_str().as_bytes();
        c.len() == name.len() && name.bytes().zip(c).all(|(a, &b)| fold(a) == fold(b))
    })
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Rewrites an HTTP/1 backend head in `head` (its version kept): every field named in `copy` (the client's
/// copies) out, then the granted fields in, before the blank line.
pub fn amend_head(head: &mut Vec<u8>, copy: &[HeaderName], grant: &Grant) -> Result<(), Error> {
    if copy.is_empty() {
        return Ok(());
    }
    let q = Question::parse(head)?;
    let mut out = Vec::with_capacity(head.len() + 64);
    out.extend_from_slice(q.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(q.target.as_bytes());
    // An HTTP/1.0 request goes on as HTTP/1.0.
    let version: &[u8] = if q.version == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    };
    out.extend_from_slice(version);
    for (name, value) in &q.fields {
        if !is_copied(name, copy) {
            push_field(&mut out, name, value);
        }
    }
    for (name, value) in grant.iter().flat_map(|g| g.iter()) {
        push_field(&mut out, name.as_str(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    // Whatever followed the head (none today) stays after it.
    out.extend_from_slice(&head[q.len..]);
    *head = out;
    Ok(())
}

/// The same for a request's `HeaderMap` (the HTTP/2 path).
pub fn amend_map(headers: &mut http::HeaderMap, copy: &[HeaderName], grant: &Grant) {
    if copy.is_empty() {
        return;
    }
    let gone: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_copied(n.as_str(), copy))
        .cloned()
        .collect();
    for name in gone {
        headers.remove(name);
    }
    for (name, value) in grant.iter().flat_map(|g| g.iter()) {
        headers.append(name.clone(), value.clone());
    }
}

/// Cached allow decisions: a fixed table of slots made on first use, each holding one
/// decision for a service and key. Lookups take no lock; a collision replaces the older.
#[derive(Debug, Default)]
struct Cache {
    slots: OnceLock<Box<[ArcSwapOption<Entry>]>>,
    hasher: foldhash::fast::RandomState,
}

#[derive(Debug)]
struct Entry {
    service: Box<str>,
    /// The policy that decided ([`Cache::policy`]): a decision made under another auth
    /// service or other granted fields is not reused once the tags change.
    policy: u64,
    key: Box<[u8]>,
    until: Instant,
    grant: Grant,
}

impl Cache {
    fn slot(&self, service: &str, key: &[u8]) -> usize {
        let mut h = self.hasher.build_hasher();
        h.write(service.as_bytes());
        h.write_u8(0);
        h.write(key);
        (h.finish() as usize) % CACHE_SLOTS
    }

    /// A hash of what a decision depends on besides the key: the auth service asked and the
    /// fields it grants.
    fn policy(&self, spec: &AuthSpec) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(spec.service.as_bytes());
        for name in spec.copy.iter() {
            h.write_u8(0);
            h.write(name.as_str().as_bytes());
        }
        h.finish()
    }

    fn get(&self, service: &str, spec: &AuthSpec, key: &[u8]) -> Option<Grant> {
        let slots = self.slots.get()?;
        let entry = slots[self.slot(service, key)].load();
        let e = entry.as_ref()?;
        (*e.service == *service
            && *e.key == *key
            && e.policy == self.policy(spec)
            && Instant::now() < e.until)
            .then(|| e.grant.clone())
    }

    fn put(&self, service: &str, spec: &AuthSpec, key: &[u8], ttl: Duration, grant: Grant) {
        let slots = self
            .slots
            .get_or_init(|| (0..CACHE_SLOTS).map(|_| ArcSwapOption::empty()).collect());
        slots[self.slot(service, key)].store(Some(Arc::new(Entry {
            service: service.into(),
            policy: self.policy(spec),
            key: key.into(),
            until: Instant::now() + ttl,
            grant,
        })));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"POST /api/x?y=1 HTTP/1.1\r\nHost: chat.example\r\nContent-Length: 5\r\nAuthorization: Bearer t\r\nX-User: mallory\r\nCookie: a=1; session=abc\r\nExpect: 100-continue\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Uri: /evil\r\n\r\n";

    #[test]
    fn the_question() {
        let q = Question::parse(HEAD).unwrap();
        let mut out = Vec::new();
        q.write(&mut out, &[HeaderName::from_static("x-user")]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /api/x?y=1 HTTP/1.1\r\nHost: chat.example\r\nAuthorization: Bearer t\r\nCookie: a=1; session=abc\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Method: POST\r\nX-Forwarded-Uri: /api/x?y=1\r\n\r\n"
        );
        assert_eq!(
            q.cache_key(&CacheKey::Field(http::header::AUTHORIZATION)),
            Some(&b"Bearer t"[..])
        );
        assert_eq!(
            q.cache_key(&CacheKey::Cookie("session".into())),
            Some(&b"abc"[..])
        );
        assert_eq!(q.cache_key(&CacheKey::Cookie("none".into())), None);
        // Given twice: never cached.
        let twice = b"GET / HTTP/1.1\r\nCookie: session=forged; session=good\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n";
        let q = Question::parse(twice).unwrap();
        let long = format!(
            "GET / HTTP/1.1\r\nAuthorization: {}\r\n\r\n",
            "a".repeat(5000)
        );
        let q_long = Question::parse(long.as_bytes()).unwrap();
        assert_eq!(
            q_long.cache_key(&CacheKey::Field(http::header::AUTHORIZATION)),
            None,
            "too long to cache"
        );
        assert_eq!(q.cache_key(&CacheKey::Cookie("session".into())), None);
        assert_eq!(
            q.cache_key(&CacheKey::Field(http::header::AUTHORIZATION)),
            None
        );
    }

    #[test]
    fn amending_the_backend_head() {
        let mut head = HEAD.to_vec();
        let grant: Grant = Some(
            vec![(
                HeaderName::from_static("x-user"),
                HeaderValue::from_static("alice"),
            )]
            .into(),
        );
        amend_head(&mut head, &[HeaderName::from_static("x-user")], &grant).unwrap();
        let text = String::from_utf8(head).unwrap();
        assert!(!text.contains("mallory"), "{text}");
        assert!(
            text.ends_with("X-Forwarded-Uri: /evil\r\nx-user: alice\r\n\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 5\r\n"), "{text}");
        // Underscore spellings read as the granted field by CGI-style backends go too.
        let mut head = b"GET / HTTP/1.1\r\nX_User: a\r\nx_USER: b\r\nX_Users: c\r\n\r\n".to_vec();
        amend_head(&mut head, &[HeaderName::from_static("x-user")], &None).unwrap();
        assert_eq!(head, b"GET / HTTP/1.1\r\nX_Users: c\r\n\r\n");
    }

    #[test]
    fn the_cache_keeps_allow_decisions_for_their_time() {
        let c = Cache::default();
        let spec = AuthSpec {
            service: "sso".into(),
            copy: Box::new([HeaderName::from_static("x-user")]),
            cache: Some(Duration::from_secs(60)),
            cache_key: CacheKey::Field(http::header::AUTHORIZATION),
        };
        assert!(c.get("s", &spec, b"k").is_none());
        c.put("s", &spec, b"k", Duration::from_secs(60), None);
        assert!(matches!(c.get("s", &spec, b"k"), Some(None)));
        assert!(c.get("t", &spec, b"k").is_none(), "keyed by service too");
        assert!(c.get("s", &spec, b"j").is_none());
        // A decision of another policy (auth service, granted fields) is not reused.
        let stricter = AuthSpec {
            service: "sso-strict".into(),
            ..spec.clone()
        };
        assert!(c.get("s", &stricter, b"k").is_none());
        let more = AuthSpec {
            copy: Box::new([
                HeaderName::from_static("x-user"),
                HeaderName::from_static("x-scopes"),
            ]),
            ..spec.clone()
        };
        assert!(c.get("s", &more, b"k").is_none());
        c.put("s", &spec, b"old", Duration::ZERO, None);
        assert!(c.get("s", &spec, b"old").is_none(), "expired");
    }
}
