//! Attacks on forward auth (`router.auth=`) and allow-lists (`router.allow=`), each against
//! a real Consul agent, the real router, raw-bytes backends (every byte recorded) and auth
//! services that answer from a script:
//! - a client's `X_User` (an underscore spelling of a granted field) must not reach the
//!   backend, which may read it as `X-User` (WSGI, PHP, CGI);
//! - a request trailer named like a granted field (or a forwarding field, on HTTP/2) must
//!   not reach the backend, which may merge trailers into its fields;
//! - an auth service's 304 relayed to an HTTP/1 client has no body: no chunked
//!   terminator after its head to be read as the next response;
//! - the decision cache must not key an allow decision under a value the auth service did
//!   not decide on (a duplicated cache cookie);
//! - an IPv4-mapped address a trusted proxy names is checked as its IPv4 address, as
//!   `X-Real-IP` says it.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;

use common::backend::{serve_http, Backend, ReceiverStream};
use common::client::{h2_client, request, Proto};
use common::consul::ConsulAgent;
use common::raw::{esc, find, talk, RawBackend, Script, Wait, RAW_OK};
use common::router::{start_router, wait_routable};

const EXPOSE: &str = "router.expose=true";
const COPY: &str = "router.auth-headers=X-User";

/// An auth service that allows every request and names the user `alice`.
const ALLOW_ALICE: &[u8] = b"HTTP/1.1 200 OK\r\nX-User: alice\r\nContent-Length: 0\r\n\r\n";
/// One that allows every request without naming anyone (anonymous access is allowed).
const ALLOW_ANON: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
/// One whose framework answered a conditional question with 304 (ETag matched).
const NOT_MODIFIED: &[u8] = b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n";

struct Setup {
    _consul: ConsulAgent,
    router: consul_router::Running,
    backend: RawBackend,
    _auth: Vec<RawBackend>,
}

/// A router and one raw backend behind `app` (auth granting X-User: alice), `anon` (auth
/// allowing without X-User) and `etag` (auth answering 304), all copying `X-User`.
async fn setup() -> Setup {
    let consul = ConsulAgent::start().await;
    let backend = RawBackend::start_with(Script::answer(RAW_OK)).await;
    let alice = RawBackend::start_with(Script::answer(ALLOW_ALICE)).await;
    let anon = RawBackend::start_with(Script::answer(ALLOW_ANON)).await;
    let etag = RawBackend::start_with(Script::answer(NOT_MODIFIED)).await;
    consul.register("alice", "alice-1", alice.port(), &[]).await;
    consul
        .register("anonok", "anonok-1", anon.port(), &[])
        .await;
    consul
        .register("notmod", "notmod-1", etag.port(), &[])
        .await;
    let port = backend.port();
    for (name, auth) in [
        ("app", "router.auth=alice"),
        ("anon", "router.auth=anonok"),
        ("etag", "router.auth=notmod"),
    ] {
        let id = format!("{name}-1");
        consul
            .register(name, &id, port, &[EXPOSE, auth, COPY])
            .await;
    }
    let router = start_router(&consul.addr(), "expose = \"tagged\"\n").await;
    for host in ["app.app.test", "anon.app.test", "etag.app.test"] {
        wait_routable(&router, host).await;
    }
    Setup {
        _consul: consul,
        router,
        backend,
        _auth: vec![alice, anon, etag],
    }
}

/// Case-insensitive search of `needle` in the backend's bytes.
fn has(bytes: &[u8], needle: &str) -> bool {
    find(
        &bytes.to_ascii_lowercase(),
        needle.to_ascii_lowercase().as_bytes(),
    )
    .is_some()
}

/// `X_User` reads as `X-User` to WSGI, PHP and CGI (`HTTP_X_USER`): a client's copy of a
/// granted field under that spelling must be taken out like `X-User` itself, on both
/// protocols, whether the auth answer grants the field or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_underscore_spelling_of_a_granted_field_never_reaches_the_backend() {
    let s = setup().await;
    let mut failed = Vec::new();
    for host in ["app.app.test", "anon.app.test"] {
        for name in ["X_User", "x_user", "X_USER"] {
            let mark = s.backend.mark();
            let raw = format!("GET /u HTTP/1.1\r\nHost: {host}\r\n{name}: admin\r\n\r\n");
            let got = talk(s.router.proxy_addr, &[raw], Duration::ZERO, 1, Wait::No).await;
            let status = got.first().map(|r| r.status).unwrap_or(0);
            let seen = s.backend.settled(mark).await;
            if status == 200 && has(&seen.bytes, "admin") {
                failed.push(format!("[H1] {host} {name}: {}", esc(&seen.bytes)));
            }
        }
        let mark = s.backend.mark();
        let req = ("GET", host, "/u2");
        let got = request(
            Proto::H2,
            s.router.proxy_addr,
            req,
            &[("x_user", "admin")],
            "",
        )
        .await;
        let seen = s.backend.settled(mark).await;
        if got.status == 200 && has(&seen.bytes, "admin") {
            failed.push(format!("[H2] {host} x_user: {}", esc(&seen.bytes)));
        }
    }
    assert!(
        failed.is_empty(),
        "a client's X_User reached the backend:\n  {}",
        failed.join("\n  ")
    );
}

/// A chunked request's trailer named `X-User` (or `X_User`) is relayed byte for byte to a
/// backend that may merge trailers into its fields: it must be refused (or never reach it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_trailer_named_like_a_granted_field_never_reaches_the_backend() {
    let s = setup().await;
    let mut failed = Vec::new();
    for trailer in ["X-User", "x-user", "X_User"] {
        let mark = s.backend.mark();
        let raw = format!(
            "POST /t HTTP/1.1\r\nHost: app.app.test\r\nTransfer-Encoding: chunked\r\n\r\n\
             1\r\na\r\n0\r\n{trailer}: admin\r\n\r\n"
        );
        let _ = talk(s.router.proxy_addr, &[raw], Duration::ZERO, 1, Wait::No).await;
        let seen = s.backend.settled(mark).await;
        if has(&seen.bytes, "admin") {
            failed.push(format!("{trailer}: {}", esc(&seen.bytes)));
        }
    }
    assert!(
        failed.is_empty(),
        "a trailer forged a granted field:\n  {}",
        failed.join("\n  ")
    );
}

/// On HTTP/2 a request's trailers go to the backend through hyper's HTTP/1 client, which
/// writes every trailer the request's `trailer` field names, except a few: a client's
/// `x-user`, `x-forwarded-for` or `cookie` trailer must not reach the backend (the HTTP/1
/// path refuses such trailers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_trailer_never_forges_a_granted_or_forwarding_field() {
    let s = setup().await;
    let mark = s.backend.mark();
    let (mut sender, _conn) = h2_client(s.router.proxy_addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let body = StreamBody::new(ReceiverStream(rx));
    let req = Request::post("http://app.app.test/t2")
        .header(
            "trailer",
            "x-user, x_user, x-forwarded-for, x-real-ip, cookie",
        )
        .body(body)
        .unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-user", "admin".parse().unwrap());
    trailers.insert("x_user", "admin".parse().unwrap());
    trailers.insert("x-forwarded-for", "10.66.66.66".parse().unwrap());
    trailers.insert("x-real-ip", "10.66.66.66".parse().unwrap());
    trailers.insert("cookie", "session=admin".parse().unwrap());
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"a")))).await;
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("an answer in time");
    if let Ok(r) = resp {
        let _ = r.into_body().collect().await;
    }
    let seen = s.backend.settled(mark).await;
    for bad in ["admin", "10.66.66.66"] {
        assert!(
            !has(&seen.bytes, bad),
            "a client's HTTP/2 trailer reached the backend ({bad}): {}",
            esc(&seen.bytes)
        );
    }
}

/// An auth service's 304 goes to the client as the auth service gave it; on HTTP/1 a 304
/// has no body whatever its fields say (RFC 9112 §6.3), so the chunked terminator the
/// router writes after its head is read as the start of the next response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_304_leaves_no_bytes_before_the_next_response() {
    let s = setup().await;
    let one = "GET /e HTTP/1.1\r\nHost: etag.app.test\r\nIf-None-Match: \"v1\"\r\n\r\n";
    let two = format!("{one}{one}");
    let got = talk(s.router.proxy_addr, &[two], Duration::ZERO, 2, Wait::No).await;
    assert!(
        got.garbage.is_none() && got.responses.len() == 2,
        "two responses, nothing else: {:?}; received {}",
        got.garbage,
        esc(&got.bytes)
    );
    assert_eq!(got.responses[0].status, 304);
}

/// The README's auth service (a session cookie, the last of a name wins, as Python's
/// `dict` reading does) with the decision cache keyed by that cookie. The router keys the
/// decision by the first `session` while the auth service decided on the last: a forged
/// value is cached as alice's session, and later requests with only that value pass as
/// alice without being asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_cache_cookie_does_not_cache_a_decision_under_a_forged_value() {
    let consul = ConsulAgent::start().await;
    let wiki = Backend::start("wiki").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sso_port = listener.local_addr().unwrap().port();
    let _sso = serve_http(listener, |req: Request<Incoming>| async move {
        // As the README's Python: every `name=value` of the Cookie field, the last wins.
        let cookie = req
            .headers()
            .get("cookie")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let session = cookie
            .split(';')
            .filter_map(|c| c.trim().split_once('='))
            .rfind(|(k, _)| *k == "session")
            .map(|(_, v)| v);
        let resp = match session {
            Some("abc123") => Response::builder().status(200).header("x-user", "alice"),
            _ => Response::builder()
                .status(302)
                .header("location", "https://login.example/"),
        };
        Ok::<_, Infallible>(resp.body(Full::new(Bytes::new())).unwrap())
    });
    consul.register("sso", "sso-1", sso_port, &[]).await;
    let tags = [
        EXPOSE,
        "router.auth=sso",
        COPY,
        "router.auth-cache=30s",
        "router.auth-cache-key=cookie:session",
    ];
    consul.register("wiki", "wiki-1", wiki.port(), &tags).await;
    let router = start_router(&consul.addr(), "expose = \"tagged\"\n").await;
    wait_routable(&router, "wiki.app.test").await;

    for proto in [Proto::H1, Proto::H2] {
        let forged = format!("forged-{proto:?}");
        let req = ("GET", "wiki.app.test", "/");
        let both = format!("session={forged}; session=abc123");
        let got = request(proto, router.proxy_addr, req, &[("cookie", &both)], "").await;
        assert_eq!(
            got.status, 200,
            "[{proto:?}] alice's own session: {}",
            got.body
        );
        let only = format!("session={forged}");
        let got = request(proto, router.proxy_addr, req, &[("cookie", &only)], "").await;
        assert_eq!(
            got.status, 302,
            "[{proto:?}] a session the auth service never allowed passed from the cache: {}",
            got.body
        );
    }
}

/// A trusted proxy may name its client in IPv4-mapped IPv6 form (a dual-stack socket):
/// `X-Real-IP` says the IPv4 address, and the allow-list must check that same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv4_mapped_client_is_checked_as_its_ipv4_address() {
    let consul = ConsulAgent::start().await;
    let backend = RawBackend::start_with(Script::answer(RAW_OK)).await;
    let tags = [EXPOSE, "router.allow=10.0.0.0/8"];
    consul
        .register("walled", "walled-1", backend.port(), &tags)
        .await;
    // 127.0.0.1 is a trusted proxy by default.
    let router = start_router(&consul.addr(), "expose = \"tagged\"\n").await;
    wait_routable(&router, "walled.app.test").await;
    let raw = "GET / HTTP/1.1\r\nHost: walled.app.test\r\nX-Forwarded-For: ::ffff:10.1.2.3\r\n\r\n";
    let got = talk(router.proxy_addr, &[raw], Duration::ZERO, 1, Wait::No).await;
    let status = got.first().map(|r| r.status).unwrap_or(0);
    assert_eq!(status, 200, "{}", esc(&got.bytes));
    let seen = backend.received();
    assert!(
        has(&seen.bytes, "x-real-ip: 10.1.2.3"),
        "{}",
        esc(&seen.bytes)
    );
}

/// `router.auth-headers=` naming a framing field: the client's `Content-Length` was taken
/// out of the backend's head and the auth answer's (`Content-Length: 0`) put in, while the
/// router still relayed the body by the client's length: the backend read the body as a
/// second request that no one asked the auth service about, with any `X-User` it liked.
/// Such names (framing, hop-by-hop, Host, the router's own forwarding fields) are not
/// copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_framing_field_named_in_auth_headers_smuggles_no_request() {
    let consul = ConsulAgent::start().await;
    let backend = RawBackend::start_with(Script::answer(RAW_OK)).await;
    let alice = RawBackend::start_with(Script::answer(ALLOW_ALICE)).await;
    consul.register("alice", "alice-1", alice.port(), &[]).await;
    let tags = [
        EXPOSE,
        "router.auth=alice",
        "router.auth-headers=X-User, Content-Length, Transfer-Encoding, Host, X-Real-IP",
    ];
    consul
        .register("selfharm", "selfharm-1", backend.port(), &tags)
        .await;
    let router = start_router(&consul.addr(), "expose = \"tagged\"\n").await;
    wait_routable(&router, "selfharm.app.test").await;
    let inner = "GET /smuggled HTTP/1.1\r\nHost: selfharm.app.test\r\nX-User: admin\r\n\r\n";
    let raw = format!(
        "POST /outer HTTP/1.1\r\nHost: selfharm.app.test\r\nContent-Length: {}\r\n\r\n{inner}",
        inner.len()
    );
    let _ = talk(router.proxy_addr, &[raw], Duration::ZERO, 1, Wait::No).await;
    let seen = backend.settled(0).await;
    let text = String::from_utf8_lossy(&seen.bytes).to_ascii_lowercase();
    let head = &text[..text.find("\r\n\r\n").unwrap_or(text.len())];
    assert!(
        head.contains(&format!("content-length: {}", inner.len()))
            && !head.contains("content-length: 0"),
        "the backend's head must frame the body as the router relays it: {}",
        esc(&seen.bytes)
    );
    assert!(
        head.contains("host: selfharm.app.test") && head.contains("x-user: alice"),
        "{}",
        esc(&seen.bytes)
    );
}

/// An HTTP/2 request may carry more fields than the question's parser took (128; the
/// listener's 16 KiB header list holds about 490 short ones): any client could then make a
/// protected service answer `503 authorization service unavailable`, counted as an auth
/// error and a 5xx, at will (and page on ConsulRouterHigh5xxRatio).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_http2_fields_are_asked_about_not_answered_503() {
    let s = setup().await;
    let names: Vec<String> = (0..300).map(|i| format!("f{i}")).collect();
    let mut fields: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    fields.push(("x-user", "mallory"));
    let req = ("GET", "app.app.test", "/many");
    let got = request(Proto::H2, s.router.proxy_addr, req, &fields, "").await;
    assert_eq!(got.status, 200, "{}", got.body);
    let seen = s.backend.settled(0).await;
    assert!(
        has(&seen.bytes, "x-user: alice") && !has(&seen.bytes, "mallory"),
        "{}",
        esc(&seen.bytes)
    );
}

/// An auth service that refuses everything, with every field a relay must not pass on.
const DENY: &[u8] = b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\n\
Transfer-Encoding: chunked\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n\
Keep-Alive: timeout=1\r\nUpgrade: websocket\r\nX-Request-Id: evil\r\n\
Proxy-Authenticate: Basic\r\n\r\n5\r\nnope\n\r\n0\r\n\r\n";

/// Every way into a backend behind an auth service that says no: nothing reaches it, on
/// HTTP/1 (upgrades, h2c, absolute form, `OPTIONS *`, HEAD, HTTP/1.0, bodies hiding a
/// request, `Expect`, pipelining) and HTTP/2; and the denial reaches the client framed by
/// the router, without the auth service's connection fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_reaches_a_backend_its_auth_service_refuses() {
    let consul = ConsulAgent::start().await;
    let backend = RawBackend::start_with(Script::answer(RAW_OK)).await;
    let deny = RawBackend::start_with(Script::answer(DENY)).await;
    consul.register("deny", "deny-1", deny.port(), &[]).await;
    let tags = [EXPOSE, "router.auth=deny", COPY];
    consul
        .register("locked", "locked-1", backend.port(), &tags)
        .await;
    let router = start_router(&consul.addr(), "expose = \"tagged\"\n").await;
    wait_routable(&router, "locked.app.test").await;
    let h = "Host: locked.app.test\r\n";
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: locked.app.test\r\n\r\n";
    // Each request and the responses it gets (a denial, or 400 for what follows it).
    let raws: Vec<(String, usize)> = vec![
        (format!("GET / HTTP/1.1\r\n{h}\r\n"), 1),
        (format!("OPTIONS * HTTP/1.1\r\n{h}\r\n"), 1),
        ("GET http://locked.app.test/abs HTTP/1.1\r\nHost: other.app.test\r\n\r\n".into(), 1),
        (format!("GET / HTTP/1.0\r\n{h}\r\n"), 1),
        (format!("GET /ws HTTP/1.1\r\n{h}Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x01\x05hello"), 2),
        (format!("GET / HTTP/1.1\r\n{h}Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 2),
        (format!("POST / HTTP/1.1\r\n{h}Content-Length: {}\r\n\r\n{smuggled}", smuggled.len()), 1),
        (format!("POST / HTTP/1.1\r\n{h}Expect: 100-continue\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()), 1),
        (format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len()), 1),
        (format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n{smuggled}"), 1),
        (format!("GET /1 HTTP/1.1\r\n{h}\r\nGET /2 HTTP/1.1\r\n{h}\r\n{smuggled}"), 3),
        (format!("GET / HTTP/1.1\r\n{h}Connection: Authorization, X-Forwarded-For\r\nAuthorization: x\r\n\r\n"), 1),
    ];
    let mut failed = Vec::new();
    for (raw, want) in &raws {
        let got = talk(router.proxy_addr, &[raw], Duration::ZERO, *want, Wait::No).await;
        for r in &got.responses {
            let bad = ["x-secret", "upgrade", "keep-alive", "proxy-authenticate"]
                .iter()
                .find(|f| r.header(f).is_some());
            if r.status != 401 && r.status != 400 || bad.is_some() {
                failed.push(format!("{}: {} {bad:?}", esc(raw.as_bytes()), r.status));
            }
            if r.header("x-request-id").as_deref() == Some("evil") {
                failed.push(format!(
                    "{}: the auth service's X-Request-Id",
                    esc(raw.as_bytes())
                ));
            }
        }
        if got.garbage.is_some() || got.responses.len() != *want {
            failed.push(format!(
                "{}: {:?} {}",
                esc(raw.as_bytes()),
                got.garbage,
                esc(&got.bytes)
            ));
        }
    }
    // HEAD: the denial's head, no body.
    let head = format!("HEAD / HTTP/1.1\r\n{h}\r\n");
    let got = common::raw::exactly(router.proxy_addr, head.as_bytes(), 20).await;
    if !got.starts_with(b"HTTP/1.1 401") || !got.ends_with(b"\r\n\r\n") {
        failed.push(format!("HEAD: {}", esc(&got)));
    }
    for (method, target, body) in [
        ("GET", "/", ""),
        ("HEAD", "/", ""),
        ("POST", "/", "body"),
        ("OPTIONS", "*", ""),
    ] {
        let req = (method, "locked.app.test", target);
        let got = request(Proto::H2, router.proxy_addr, req, &[], body).await;
        if got.status != 401 || got.headers.contains_key("x-secret") {
            failed.push(format!(
                "[H2] {method} {target}: {} {:?}",
                got.status, got.headers
            ));
        }
    }
    let seen = backend.settled(0).await;
    assert!(
        seen.accepted == 0 && seen.bytes.is_empty(),
        "the backend was reached: {}",
        esc(&seen.bytes)
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// An auth service that never answers (each question times out) or answers an allow with a
/// large body: the router gives up its connections and in-flight counts, nothing stays
/// open or counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_or_verbose_auth_service_leaks_no_connection_or_in_flight_count() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    let consul = ConsulAgent::start().await;
    let backend = RawBackend::start_with(Script::answer(RAW_OK)).await;
    // Hung: reads questions, never answers; counts connections opened and closed.
    let hung = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (o, c) = (opened.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = hung.accept().await {
            o.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let mut big = b"HTTP/1.1 200 OK\r\nX-User: alice\r\nContent-Length: 1000000\r\n\r\n".to_vec();
    big.resize(big.len() + 1_000_000, b'x');
    let verbose = RawBackend::start_with(Script::answer(&big)).await;
    consul.register("hung", "hung-1", hung_port, &[]).await;
    consul
        .register("verbose", "verbose-1", verbose.port(), &[])
        .await;
    let port = backend.port();
    consul
        .register("h", "h-1", port, &[EXPOSE, "router.auth=hung", COPY])
        .await;
    consul
        .register("v", "v-1", port, &[EXPOSE, "router.auth=verbose", COPY])
        .await;
    let toml = "expose = \"tagged\"\n[proxy]\nauth_timeout = \"300ms\"\n";
    let router = start_router(&consul.addr(), toml).await;
    wait_routable(&router, "h.app.test").await;
    wait_routable(&router, "v.app.test").await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let addr = router.proxy_addr;
        let proto = if i % 2 == 0 { Proto::H1 } else { Proto::H2 };
        tasks.push(tokio::spawn(async move {
            let h = request(proto, addr, ("GET", "h.app.test", "/"), &[], "").await;
            let v = request(proto, addr, ("GET", "v.app.test", "/"), &[], "").await;
            (h.status.as_u16(), v.status.as_u16())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (503, 200));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let table = router.routes.load();
    for name in ["hung", "verbose"] {
        let svc = table.service_named(name).expect("the auth service");
        let n: u64 = svc
            .instances
            .iter()
            .map(|i| i.state.in_flight.load(Ordering::Relaxed))
            .sum();
        assert_eq!(n, 0, "{name}: in flight after every answer");
    }
    assert_eq!(
        opened.load(Ordering::SeqCst),
        closed.load(Ordering::SeqCst),
        "every connection to the hung auth service was closed"
    );
}

/// An HTTP/1.0 request is forwarded as HTTP/1.0 (README, Proxying); granting fields
/// rewrote its request line as HTTP/1.1, so the backend read it with HTTP/1.1's defaults
/// (persistent connection, chunked answers) that the router does not give a 1.0 client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_fields_keep_an_http10_request_line() {
    let s = setup().await;
    let raw = "GET /old HTTP/1.0\r\nHost: app.app.test\r\n\r\n";
    let got = talk(s.router.proxy_addr, &[raw], Duration::ZERO, 1, Wait::No).await;
    assert_eq!(
        got.first().map(|r| r.status),
        Ok(200),
        "{}",
        esc(&got.bytes)
    );
    let seen = s.backend.settled(0).await;
    assert!(
        seen.bytes.starts_with(b"GET /old HTTP/1.0\r\n") && has(&seen.bytes, "x-user: alice"),
        "{}",
        esc(&seen.bytes)
    );
}

/// Some trusted proxies append the client with its port (`203.0.113.9:50123`, Azure
/// Application Gateway; `[2001:db8::9]:50123`): read as no address, the client became the
/// proxy itself, and an allow-list that lists the proxy's network (an internal service
/// behind an internal load balancer) let every client in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_address_with_a_port_is_the_client_not_the_proxy() {
    let consul = ConsulAgent::start().await;
    let backend = RawBackend::start_with(Script::answer(RAW_OK)).await;
    // The proxy (127.0.0.1, trusted by default) is on the list; its clients are not.
    let tags = [EXPOSE, "router.allow=127.0.0.0/8"];
    consul
        .register("internal", "internal-1", backend.port(), &tags)
        .await;
    let router = start_router(&consul.addr(), "expose = \"tagged\"\n").await;
    wait_routable(&router, "internal.app.test").await;
    for xff in ["203.0.113.9:50123", "[2001:db8::9]:50123", "[2001:db8::9]"] {
        let raw =
            format!("GET / HTTP/1.1\r\nHost: internal.app.test\r\nX-Forwarded-For: {xff}\r\n\r\n");
        let got = talk(router.proxy_addr, &[raw], Duration::ZERO, 1, Wait::No).await;
        let status = got.first().map(|r| r.status).unwrap_or(0);
        assert_eq!(status, 403, "{xff}: {}", esc(&got.bytes));
    }
    let raw =
        "GET / HTTP/1.1\r\nHost: internal.app.test\r\nX-Forwarded-For: 127.0.0.9:50123\r\n\r\n";
    let got = talk(router.proxy_addr, &[raw], Duration::ZERO, 1, Wait::No).await;
    assert_eq!(
        got.first().map(|r| r.status),
        Ok(200),
        "{}",
        esc(&got.bytes)
    );
    assert!(has(&backend.received().bytes, "x-real-ip: 127.0.0.9"));
}

/// A client's X-User in every shape a parser behind us might read as a field: folded onto
/// another field, bare LF line ends, whitespace around the name, a NUL, in a value that a
/// lax backend splits, twice: the backend gets alice's and nothing of the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_of_a_forged_granted_field_reaches_the_backend() {
    let s = setup().await;
    let h = "Host: app.app.test";
    let heads: Vec<String> = vec![
        format!("GET / HTTP/1.1\r\n{h}\r\nX-Test: a\r\n X-User: admin\r\n\r\n"),
        format!("GET / HTTP/1.1\r\n{h}\r\nX-Test: a\r\n\tX-User: admin\r\n\r\n"),
        format!("GET / HTTP/1.1\n{h}\nX-User: admin\n\n"),
        format!("GET / HTTP/1.1\r\n{h}\r\nX-User : admin\r\n\r\n"),
        format!("GET / HTTP/1.1\r\n{h}\r\n X-User: admin\r\n\r\n"),
        format!("GET / HTTP/1.1\r\n{h}\r\nX-User\t: admin\r\n\r\n"),
        format!("GET / HTTP/1.1\r\n{h}\r\nX-Test: a\rX-User: admin\r\n\r\n"),
        format!("GET / HTTP/1.1\r\n{h}\r\nX-Test: a\nX-User: admin\r\n\r\n"),
        format!("GET / HTTP/1.1\r\n{h}\r\nX-User: admin\r\nX-USER: admin\r\nx-user: admin\r\n\r\n"),
        format!("GET / HTTP/1.1\r\n{h}\r\nX-User\0: admin\r\n\r\n"),
        format!("GET / HTTP/1.1\r\n{h}\r\nX-User:admin\r\n\r\n"),
    ];
    let mut failed = Vec::new();
    for raw in &heads {
        let mark = s.backend.mark();
        let got = talk(s.router.proxy_addr, &[raw], Duration::ZERO, 1, Wait::No).await;
        let seen = s.backend.settled(mark).await;
        let status = got.first().map(|r| r.status).unwrap_or(0);
        if has(&seen.bytes, "admin") || (status == 200 && !has(&seen.bytes, "x-user: alice")) {
            failed.push(format!(
                "{} -> {status}: {}",
                esc(raw.as_bytes()),
                esc(&seen.bytes)
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// HTTP/2 clients to an HTTP/2 backend (`router.proto=h2c`): the request's body goes on
/// frame by frame, its trailers too, so a client's trailers named like a granted field or
/// a forwarding field reached the backend (the `Trailer`-field limit only binds hyper's
/// HTTP/1 client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_trailer_to_an_h2_backend_never_forges_a_granted_or_forwarding_field() {
    use std::sync::{Arc, Mutex};
    let consul = ConsulAgent::start().await;
    let alice = RawBackend::start_with(Script::answer(ALLOW_ALICE)).await;
    consul.register("alice", "alice-1", alice.port(), &[]).await;
    // An h2c backend that records every request trailer it gets.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let mut body = req.into_body();
                        while let Some(Ok(frame)) = body.frame().await {
                            if let Ok(t) = frame.into_trailers() {
                                for (k, v) in &t {
                                    let v = v.to_str().unwrap_or("?");
                                    log.lock().unwrap().push(format!("{k}: {v}"));
                                }
                            }
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let exec = hyper_util::rt::TokioExecutor::new();
                let _ = hyper::server::conn::http2::Builder::new(exec)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let tags = [EXPOSE, "router.proto=h2c", "router.auth=alice", COPY];
    consul.register("grpcish", "grpcish-1", port, &tags).await;
    let router = start_router(&consul.addr(), "expose = \"tagged\"\n").await;
    wait_routable(&router, "grpcish.app.test").await;

    let (mut sender, _conn) = h2_client(router.proxy_addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let body = StreamBody::new(ReceiverStream(rx));
    let req = Request::post("http://grpcish.app.test/t")
        .body(body)
        .unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-user", "admin".parse().unwrap());
    trailers.insert("x_user", "admin".parse().unwrap());
    trailers.insert("x-forwarded-for", "10.66.66.66".parse().unwrap());
    trailers.insert("authorization", "Bearer admin".parse().unwrap());
    trailers.insert("x-fine", "kept".parse().unwrap());
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"a")))).await;
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("an answer in time");
    if let Ok(r) = resp {
        let _ = r.into_body().collect().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = seen.lock().unwrap().clone();
    let forged: Vec<&String> = got
        .iter()
        .filter(|t| t.contains("admin") || t.contains("10.66.66.66"))
        .collect();
    assert!(
        forged.is_empty(),
        "a client's trailers reached the h2 backend: {got:?}"
    );
}
