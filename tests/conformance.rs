//! Request-smuggling conformance of the HTTP/1 fast path: raw bytes in, exact bytes out.
//!
//! The fast path relays bodies verbatim, so every byte it lets through is one a backend must
//! parse the way the router did. Each test runs a table of cases against one Consul agent,
//! one raw backend (a TCP listener that records every byte per connection and answers from
//! a script) and one or more routers; every case opens a fresh client connection. All the
//! cases of a table run, and the test then fails listing every case that did not hold.
//!
//! Request IDs are generated, so expected bytes say `X-Request-Id: *` where the router
//! writes one (after `X-Real-IP` to a backend, after the other fields to a client, before
//! `Connection`), and received bytes have their IDs masked the same way (`mask_ids`).
//!
//! The raw backend and the raw client are tests/common/raw.rs's.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http::StatusCode;

/// The backend's usual answer.
const OK: &[u8] = RAW_OK;

/// Routers: an untrusted peer (127.0.0.1 is not a trusted proxy), the default (loopback
/// trusted), and one that drops every name with an underscore.
const UNTRUSTED: &str = "trusted_proxies = [\"10.9.9.9/32\"]\n[proxy]\nresponse_timeout = \"3s\"\n";
const TRUSTED: &str = "[proxy]\nresponse_timeout = \"3s\"\n";
const UNDERSCORES: &str = "trusted_proxies = [\"10.9.9.9/32\"]\nunderscore_headers = \"all\"\n[proxy]\nresponse_timeout = \"3s\"\n";

/// What an untrusted peer's request gets appended, for `Host: host`.
fn tail(host: &str) -> String {
    format!(
        "X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Host: {host}\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: *\r\nX-Real-IP: 127.0.0.1\r\nX-Request-Id: *\r\n\r\n"
    )
}

/// `head_without_blank_line` + the untrusted tail for raw.app.test + `body`.
fn fwd(head: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!("{head}{}", tail("raw.app.test")).into_bytes();
    v.extend_from_slice(body);
    v
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// A local answer, exactly: `HTTP/1.1 <code> <reason>`, Content-Type, Content-Length,
/// Retry-After on 503, Connection: close when `close` (either when `None`), a short text.
fn check_local(r: &Resp, status: u16, close: Option<bool>) -> Result<(), String> {
    let code = StatusCode::from_u16(status).unwrap();
    ensure!(
        r.status == status,
        "status {} {} (want {status}), body {}",
        r.status,
        r.reason,
        esc(&r.body)
    );
    ensure!(
        r.reason == code.canonical_reason().unwrap_or(""),
        "reason {:?}",
        r.reason
    );
    let got: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    let mut want = vec![
        (
            "Content-Type".to_string(),
            "text/plain; charset=utf-8".to_string(),
        ),
        ("Content-Length".to_string(), r.body.len().to_string()),
    ];
    if status == 503 {
        want.push(("Retry-After".into(), "5".into()));
    }
    // The request's ID, when it has one, comes before the connection field.
    let mut got = got;
    if let Some(at) = got.iter().position(|(k, _)| k == "X-Request-Id") {
        let (_, id) = got.remove(at);
        ensure!(
            at == want.len()
                && (1..=64).contains(&id.len())
                && id.bytes().all(|b| b.is_ascii_graphic()),
            "X-Request-Id {id:?} at {at} in the local answer's headers"
        );
    }
    let closing = ("Connection".to_string(), "close".to_string());
    let said_close = got.last() == Some(&closing);
    if close == Some(true) || (close.is_none() && said_close) {
        want.push(closing);
    }
    ensure!(got == want, "local answer headers {got:?}, want {want:?}");
    ensure!(
        !r.body.is_empty() && r.body.len() < 100 && r.body.ends_with(b"\n"),
        "local answer body {}",
        esc(&r.body)
    );
    Ok(())
}

/// A refused request: the local answer with `Connection: close`, the connection closed,
/// and not one byte at the backend.
async fn refused<P: AsRef<[u8]>>(
    b: &RawBackend,
    proxy: SocketAddr,
    parts: &[P],
    status: u16,
) -> Result<(), String> {
    let mark = b.mark();
    let a = talk(proxy, parts, LATER, 1, Wait::Close).await;
    let seen = b.settled(mark).await;
    ensure!(
        seen.bytes.is_empty(),
        "backend received {} (client got {})",
        esc(&seen.bytes),
        esc(&a.bytes)
    );
    check_local(a.first()?, status, Some(true))?;
    ensure!(a.closed, "connection left open after the {status}");
    ensure!(
        a.responses.len() == 1 && a.garbage.is_none(),
        "more after the {status}: {}",
        esc(&a.bytes)
    );
    Ok(())
}

/// A forwarded request: the backend receives exactly `want` and its answer reaches the client.
async fn forwarded<P: AsRef<[u8]>>(
    b: &RawBackend,
    proxy: SocketAddr,
    parts: &[P],
    pause: Duration,
    want: &[u8],
) -> Result<(), String> {
    let mark = b.mark();
    let a = talk(proxy, parts, pause, 1, Wait::No).await;
    let seen = b.since(mark);
    ensure!(
        seen.bytes == want,
        "backend received\n      {}\n    want\n      {}",
        esc(&seen.bytes),
        esc(want)
    );
    let r = a.first()?;
    ensure!(
        r.status == 200 && r.body == b"ok",
        "client got {}",
        esc(&a.bytes)
    );
    Ok(())
}

/// Failed cases of one table.
struct Report {
    group: &'static str,
    ran: usize,
    failed: Vec<String>,
}

impl Report {
    fn new(group: &'static str) -> Self {
        Report {
            group,
            ran: 0,
            failed: Vec::new(),
        }
    }

    fn check(&mut self, case: &str, r: Result<(), String>) {
        self.ran += 1;
        if let Err(e) = r {
            self.failed.push(format!("[{case}] {e}"));
        }
    }

    fn finish(self) {
        assert!(
            self.failed.is_empty(),
            "{}: {} of {} cases failed:\n  {}",
            self.group,
            self.failed.len(),
            self.ran,
            self.failed.join("\n  ")
        );
    }
}

/// One Consul agent, one raw backend registered as `raw`, and a router per config, each
/// routing raw.app.test.
struct Env {
    consul: ConsulAgent,
    backend: RawBackend,
    routers: Vec<consul_router::Running>,
}

impl Env {
    async fn start(configs: &[&str]) -> Env {
        let consul = ConsulAgent::start().await;
        let backend = RawBackend::start().await;
        consul.register("raw", "raw", backend.port(), &[]).await;
        let mut routers = Vec::new();
        for c in configs {
            let r = start_router(&consul.addr(), c).await;
            wait_status(r.proxy_addr, "raw.app.test", StatusCode::OK).await;
            routers.push(r);
        }
        Env {
            consul,
            backend,
            routers,
        }
    }

    fn proxy(&self, i: usize) -> SocketAddr {
        self.routers[i].proxy_addr
    }

    async fn stop(self) {
        for r in self.routers {
            r.shutdown().await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Request heads
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_reach_the_backend_exactly_as_specified() {
    let env = Env::start(&[UNTRUSTED, TRUSTED, UNDERSCORES]).await;
    let b = &env.backend;
    let mut report = Report::new("request heads");

    let untrusted: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "plain GET",
            b"GET /path?q=1 HTTP/1.1\r\nHost: raw.app.test\r\nAccept: */*\r\n\r\n".to_vec(),
            fwd("GET /path?q=1 HTTP/1.1\r\nHost: raw.app.test\r\nAccept: */*\r\n", b""),
        ),
        (
            "hop-by-hop fields out",
            b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Authenticate: Basic\r\nProxy: http://evil.example\r\nUpgrade: h2c\r\nX-Secret: 1\r\nX-Kept: yes\r\n\r\n".to_vec(),
            fwd("GET / HTTP/1.1\r\nHost: raw.app.test\r\nX-Kept: yes\r\n", b""),
        ),
        (
            "fields named by Connection out",
            b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nConnection: x-a, X-B\r\nX-A: 1\r\nx-b: 2\r\nX-C: 3\r\n\r\n".to_vec(),
            fwd("GET / HTTP/1.1\r\nHost: raw.app.test\r\nX-C: 3\r\n", b""),
        ),
        (
            "client-address fields of an untrusted peer out",
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6\r\nHost: raw.app.test\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6;proto=https\r\nX-Real-IP: 6.6.6.6\r\nx-real-ip: 6.6.6.7\r\nX-Kept: 1\r\n\r\n".to_vec(),
            fwd("GET / HTTP/1.1\r\nHost: raw.app.test\r\nX-Kept: 1\r\n", b""),
        ),
        (
            "underscore lookalikes out",
            b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nX_Forwarded_For: 6.6.6.6\r\nx_forwarded_host: evil\r\nX_FORWARDED_PROTO: https\r\nX_Real_IP: 6.6.6.6\r\nX-Forwarded_For: 6.6.6.6\r\nContent_Length: 50\r\nTransfer_Encoding: chunked\r\nKeep_Alive: 1\r\nProxy_Connection: close\r\nProxy_Authorization: x\r\nX_Custom_Header: kept\r\n\r\n".to_vec(),
            fwd("GET / HTTP/1.1\r\nHost: raw.app.test\r\nX_Custom_Header: kept\r\n", b""),
        ),
        (
            "Content-Length twice becomes one, at the first's place",
            b"POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 5\r\nX-A: 1\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            fwd("POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 5\r\nX-A: 1\r\n", b"hello"),
        ),
        (
            "Content-Length list becomes one value",
            b"POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 5, 5\r\n\r\nhello".to_vec(),
            fwd("POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 5\r\n", b"hello"),
        ),
        (
            "Content-Length normalised (case, whitespace, leading zeros)",
            b"POST /up HTTP/1.1\r\nHost: raw.app.test\r\ncontent-length:\t 005 \r\n\r\nhello".to_vec(),
            fwd("POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 5\r\n", b"hello"),
        ),
        (
            "Content-Length 0",
            b"POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 000\r\n\r\n".to_vec(),
            fwd("POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 0\r\n", b""),
        ),
        (
            "a Content_Length lookalike beside the real one",
            b"POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent_Length: 0\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            fwd("POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 5\r\n", b"hello"),
        ),
        (
            "a Transfer_Encoding lookalike beside Content-Length",
            b"POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 5\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            fwd("POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
        ),
        (
            "Connection cannot drop Content-Length",
            b"POST /up HTTP/1.1\r\nHost: raw.app.test\r\nConnection: content-length, x-a\r\nX-A: 1\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            fwd("POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 5\r\n", b"hello"),
        ),
        (
            "Connection cannot drop Transfer-Encoding",
            b"POST /up HTTP/1.1\r\nHost: raw.app.test\r\nTransfer-Encoding: chunked\r\nConnection: Transfer-Encoding\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
            fwd("POST /up HTTP/1.1\r\nHost: raw.app.test\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "Transfer-Encoding normalised (case, tab)",
            b"POST /up HTTP/1.1\r\nHost: raw.app.test\r\ntransfer-encoding:\tChunked \r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
            fwd("POST /up HTTP/1.1\r\nHost: raw.app.test\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "absolute-form with an empty path and a query",
            b"GET http://raw.app.test?q=1 HTTP/1.1\r\nHost: other.example\r\nX-A: 1\r\n\r\n".to_vec(),
            fwd("GET /?q=1 HTTP/1.1\r\nX-A: 1\r\nHost: raw.app.test\r\n", b""),
        ),
        (
            "absolute-form without a path",
            b"GET http://raw.app.test HTTP/1.1\r\nHost: raw.app.test\r\n\r\n".to_vec(),
            fwd("GET / HTTP/1.1\r\nHost: raw.app.test\r\n", b""),
        ),
        (
            "absolute-form with a path",
            b"GET http://raw.app.test/a/b?c=d HTTP/1.1\r\nHost: raw.app.test\r\n\r\n".to_vec(),
            fwd("GET /a/b?c=d HTTP/1.1\r\nHost: raw.app.test\r\n", b""),
        ),
        (
            "OPTIONS *",
            b"OPTIONS * HTTP/1.1\r\nHost: raw.app.test\r\n\r\n".to_vec(),
            fwd("OPTIONS * HTTP/1.1\r\nHost: raw.app.test\r\n", b""),
        ),
        (
            "HTTP/1.0 stays 1.0",
            b"GET /old HTTP/1.0\r\nHost: raw.app.test\r\nConnection: keep-alive\r\n\r\n".to_vec(),
            fwd("GET /old HTTP/1.0\r\nHost: raw.app.test\r\n", b""),
        ),
        (
            "an upgrade keeps Upgrade and says Connection: upgrade last",
            b"GET /ws HTTP/1.1\r\nHost: raw.app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec(),
            b"GET /ws HTTP/1.1\r\nHost: raw.app.test\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Host: raw.app.test\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: *\r\nX-Real-IP: 127.0.0.1\r\nX-Request-Id: *\r\nConnection: upgrade\r\n\r\n".to_vec(),
        ),
    ];
    for (name, req, want) in &untrusted {
        report.check(
            &format!("untrusted: {name}"),
            forwarded(b, env.proxy(0), &[req], Duration::ZERO, want).await,
        );
    }

    let trusted: [(&str, &[u8], &[u8]); 5] = [
        (
            "a trusted peer's chain, host and proto kept; X-Real-IP from the chain",
            b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nX-Forwarded-For: 203.0.113.7, 10.0.0.1\r\nX-Forwarded-Host: public.example\r\nX-Forwarded-Proto: https\r\nForwarded: for=203.0.113.7\r\nX-Real-IP: 6.6.6.6\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nX-Forwarded-Host: public.example\r\nX-Forwarded-Proto: https\r\nForwarded: for=203.0.113.7\r\nX-Forwarded-For: 203.0.113.7, 10.0.0.1, 127.0.0.1\r\nX-Forwarded-Port: *\r\nX-Real-IP: 10.0.0.1\r\nX-Request-Id: *\r\n\r\n",
        ),
        (
            "trusted addresses at the right of the chain are skipped for X-Real-IP",
            b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nX-Forwarded-For: 203.0.113.7, 127.0.0.9\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nX-Forwarded-For: 203.0.113.7, 127.0.0.9, 127.0.0.1\r\nX-Forwarded-Host: raw.app.test\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: *\r\nX-Real-IP: 203.0.113.7\r\nX-Request-Id: *\r\n\r\n",
        ),
        (
            "an all-trusted chain: X-Real-IP is its left-most address (as nginx real_ip_recursive)",
            b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nX-Forwarded-For: 127.0.0.5\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nX-Forwarded-For: 127.0.0.5, 127.0.0.1\r\nX-Forwarded-Host: raw.app.test\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: *\r\nX-Real-IP: 127.0.0.5\r\nX-Request-Id: *\r\n\r\n",
        ),
        (
            "two X-Forwarded-For fields join in order",
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 198.51.100.1\r\nHost: raw.app.test\r\nX-Forwarded-For: 198.51.100.2\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nX-Forwarded-For: 198.51.100.1, 198.51.100.2, 127.0.0.1\r\nX-Forwarded-Host: raw.app.test\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: *\r\nX-Real-IP: 198.51.100.2\r\nX-Request-Id: *\r\n\r\n",
        ),
        (
            "lookalikes are dropped even from a trusted peer",
            b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nX_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nX_Forwarded_Host: evil\r\nx_forwarded_proto: https\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Host: raw.app.test\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: *\r\nX-Real-IP: 127.0.0.1\r\nX-Request-Id: *\r\n\r\n",
        ),
    ];
    for (name, req, want) in trusted {
        report.check(
            &format!("trusted: {name}"),
            forwarded(b, env.proxy(1), &[req], Duration::ZERO, want).await,
        );
    }

    report.check(
        "underscore_headers = all: every name with an underscore out",
        forwarded(
            b,
            env.proxy(2),
            &[b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nX_Custom: 1\r\nx-custom: 2\r\nMy_Header: 3\r\nX_Forwarded_For: 6.6.6.6\r\n\r\n"],
            Duration::ZERO,
            &fwd("GET / HTTP/1.1\r\nHost: raw.app.test\r\nx-custom: 2\r\n", b""),
        )
        .await,
    );
    // A client's X-Request-Id: replaced unless a trusted peer sent it; the client gets the ID
    // the backend got, not the backend's own.
    b.set(Script::answer(
        b"HTTP/1.1 200 OK\r\nX-Request-Id: from-backend\r\nContent-Length: 2\r\n\r\nok",
    ));
    for (name, proxy, kept) in [
        ("untrusted", env.proxy(0), false),
        ("trusted", env.proxy(1), true),
    ] {
        let mark = b.mark();
        let a = talk(
            proxy,
            &[b"GET / HTTP/1.1\r\nX-Request-Id: client-id-1\r\nHost: raw.app.test\r\n\r\n"],
            Duration::ZERO,
            1,
            Wait::No,
        )
        .await;
        let seen = b.since(mark);
        let r = (|| -> Result<(), String> {
            let tail_at = find(&seen.raw, b"X-Request-Id: ").ok_or("no X-Request-Id sent")?;
            let id_line = &seen.raw[tail_at..];
            let id = &id_line[14..find(id_line, b"\r\n").unwrap_or(id_line.len())];
            ensure!(
                seen.raw
                    .starts_with(b"GET / HTTP/1.1\r\nHost: raw.app.test\r\n")
                    && seen.raw.ends_with(b"\r\n\r\n")
                    && find(&seen.raw[..tail_at], b"X-Request-Id").is_none(),
                "backend received {}",
                esc(&seen.raw)
            );
            ensure!(
                (id == b"client-id-1") == kept,
                "backend got X-Request-Id {} from a{} peer",
                esc(id),
                if kept { " trusted" } else { "n untrusted" }
            );
            let r = a.first()?;
            ensure!(
                r.all("x-request-id") == [String::from_utf8_lossy(id)],
                "client got {}",
                esc(&a.bytes)
            );
            Ok(())
        })();
        report.check(&format!("{name}: X-Request-Id"), r);
    }

    env.stop().await;
    report.finish();
}

// ---------------------------------------------------------------------------------------
// Malformed requests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_before_a_byte_reaches_a_backend() {
    let env = Env::start(&[UNTRUSTED]).await;
    let (b, p) = (&env.backend, env.proxy(0));
    let mut report = Report::new("malformed requests");

    const H: &str = "Host: raw.app.test\r\n";
    let post = |fields: &str, body: &str| format!("POST /up HTTP/1.1\r\n{H}{fields}\r\n{body}");
    let mut cases: Vec<(String, Vec<u8>, u16)> = Vec::new();
    let mut add =
        |name: &str, req: Vec<u8>, status: u16| cases.push((name.to_owned(), req, status));

    // Framing.
    add(
        "CL then TE",
        post(
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "0\r\n\r\n",
        )
        .into(),
        400,
    );
    add(
        "TE then CL",
        post(
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "0\r\n\r\n",
        )
        .into(),
        400,
    );
    add(
        "CL.TE classic",
        post(
            "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
            "0\r\n\r\nG",
        )
        .into(),
        400,
    );
    add(
        "TE.CL classic",
        post("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", "5c\r\nGPOST /admin HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 15\r\n\r\nx=1\r\n0\r\n\r\n").into(),
        400,
    );
    add(
        "TE with a tab and CL",
        post(
            "Transfer-Encoding:\tchunked\r\nContent-Length: 5\r\n",
            "0\r\n\r\n",
        )
        .into(),
        400,
    );
    add(
        "differing CL fields",
        post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!").into(),
        400,
    );
    add(
        "differing CL list",
        post("Content-Length: 5, 6\r\n", "hello!").into(),
        400,
    );
    add(
        "differing CL, other case",
        post("Content-Length: 5\r\ncontent-length: 6\r\n", "hello!").into(),
        400,
    );
    for bad in [
        "+5",
        "-1",
        "5 5",
        "",
        "abc",
        "0x5",
        "5.0",
        "1e3",
        "5;q=1",
        "99999999999999999999999",
    ] {
        add(
            &format!("CL {bad:?}"),
            post(&format!("Content-Length: {bad}\r\n"), "hello").into(),
            400,
        );
    }
    add(
        "CL with NUL",
        post("Content-Length: 5\0\r\n", "hello").into(),
        400,
    );
    add(
        "CL with VT",
        post("Content-Length:\x0b5\r\n", "hello").into(),
        400,
    );
    for coding in [
        "gzip, chunked",
        "chunked, identity",
        "chunked, chunked",
        "identity",
        "gzip",
        "xchunked",
        "chunked;q=1",
        "\"chunked\"",
    ] {
        add(
            &format!("TE {coding:?}"),
            post(&format!("Transfer-Encoding: {coding}\r\n"), "0\r\n\r\n").into(),
            501,
        );
    }
    add(
        "TE chunked twice",
        post(
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "0\r\n\r\n",
        )
        .into(),
        501,
    );
    add(
        "TE gzip then chunked fields",
        post(
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            "0\r\n\r\n",
        )
        .into(),
        501,
    );
    add(
        "TE chunked then x fields",
        post(
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n",
            "0\r\n\r\n",
        )
        .into(),
        501,
    );
    add(
        "TE on HTTP/1.0",
        format!("POST /up HTTP/1.0\r\n{H}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n").into(),
        400,
    );
    add(
        "CL with space before the colon",
        post("Content-Length : 5\r\n", "hello").into(),
        400,
    );
    add(
        "TE with space before the colon",
        post("Transfer-Encoding : chunked\r\n", "0\r\n\r\n").into(),
        400,
    );
    add(
        "TE with space before the colon, and CL",
        post(
            "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n",
            "0\r\n\r\n",
        )
        .into(),
        400,
    );
    add(
        "TE value with a VT after",
        post("Transfer-Encoding: chunked\x0b\r\n", "0\r\n\r\n").into(),
        400,
    );
    add(
        "TE value with a VT before",
        post("Transfer-Encoding:\x0bchunked\r\n", "0\r\n\r\n").into(),
        400,
    );
    add(
        "TE value with a NUL",
        post("Transfer-Encoding: \0chunked\r\n", "0\r\n\r\n").into(),
        400,
    );
    add(
        "TE folded onto the previous field",
        post("X-A: 1\r\n Transfer-Encoding: chunked\r\n", "0\r\n\r\n").into(),
        400,
    );
    add(
        "TE value folded",
        post("Transfer-Encoding:\r\n chunked\r\n", "0\r\n\r\n").into(),
        400,
    );
    add(
        "whitespace before the first field",
        format!("POST /up HTTP/1.1\r\n Transfer-Encoding: chunked\r\n{H}\r\n0\r\n\r\n").into(),
        400,
    );
    add(
        "TE name with a CR",
        post("Transfer-Encoding\r: chunked\r\n", "0\r\n\r\n").into(),
        400,
    );

    // Fields.
    let get_with = |fields: &[u8]| cat(&[b"GET / HTTP/1.1\r\n", fields, b"\r\n"]);
    add(
        "two Host fields",
        get_with(b"Host: raw.app.test\r\nHost: raw.app.test\r\n"),
        400,
    );
    add(
        "two Host fields, other case",
        get_with(b"Host: raw.app.test\r\nhost: other.app.test\r\n"),
        400,
    );
    add(
        "space before the colon",
        get_with(b"Host : raw.app.test\r\n"),
        400,
    );
    add(
        "tab before the colon",
        get_with(b"Host: raw.app.test\r\nX-A\t: 1\r\n"),
        400,
    );
    add(
        "obs-fold with a space",
        get_with(b"Host: raw.app.test\r\nX-A: 1\r\n 2\r\n"),
        400,
    );
    add(
        "obs-fold with a tab",
        get_with(b"Host: raw.app.test\r\nX-A: 1\r\n\t2\r\n"),
        400,
    );
    for (name, value) in [
        ("NUL", &b"a\0b"[..]),
        ("CR", b"a\rb"),
        ("SOH", b"a\x01b"),
        ("VT", b"a\x0bb"),
        ("FF", b"a\x0cb"),
        ("DEL", b"a\x7fb"),
        ("ESC", b"a\x1bb"),
    ] {
        add(
            &format!("{name} in a value"),
            get_with(&cat(&[b"Host: raw.app.test\r\nX-A: ", value, b"\r\n"])),
            400,
        );
    }
    for (name, field) in [
        ("@", &b"X@A: 1"[..]),
        ("space", b"X A: 1"),
        ("NUL", b"X\0A: 1"),
        ("obs-text", b"X\x80A: 1"),
        ("empty", b": 1"),
        ("quotes", b"\"X\": 1"),
        ("parenthesis", b"X(A): 1"),
        ("slash", b"X/A: 1"),
    ] {
        add(
            &format!("name with {name}"),
            get_with(&cat(&[b"Host: raw.app.test\r\n", field, b"\r\n"])),
            400,
        );
    }

    // Request lines and targets.
    let line = |l: &str| format!("{l}\r\n{H}\r\n").into_bytes();
    add("two spaces after the method", line("GET  / HTTP/1.1"), 400);
    add("two spaces after the target", line("GET /  HTTP/1.1"), 400);
    add("a space after the version", line("GET / HTTP/1.1 "), 400);
    add("a tab for a space", line("GET\t/ HTTP/1.1"), 400);
    add("a space before the method", line(" GET / HTTP/1.1"), 400);
    add("lowercase version", line("GET / http/1.1"), 400);
    add("no version (HTTP/0.9)", b"GET /\r\n\r\n".to_vec(), 400);
    add("GET *", line("GET * HTTP/1.1"), 400);
    add("POST *", line("POST * HTTP/1.1"), 400);
    add("GET abc", line("GET abc HTTP/1.1"), 400);
    add(
        "authority-form on GET",
        line("GET raw.app.test:80 HTTP/1.1"),
        400,
    );
    add("GET http:/x", line("GET http:/x HTTP/1.1"), 400);
    add("GET ftp://", line("GET ftp://raw.app.test/x HTTP/1.1"), 400);
    add("a fragment", line("GET /a#frag HTTP/1.1"), 400);
    add(
        "a fragment in absolute-form",
        line("GET http://raw.app.test/a#frag HTTP/1.1"),
        400,
    );
    add(
        "userinfo",
        line("GET http://user@raw.app.test/ HTTP/1.1"),
        400,
    );
    add(
        "userinfo and password",
        line("GET http://user:pw@raw.app.test/ HTTP/1.1"),
        400,
    );
    add(
        "CONNECT",
        b"CONNECT raw.app.test:443 HTTP/1.1\r\nHost: raw.app.test:443\r\n\r\n".to_vec(),
        405,
    );
    add(
        "a head over 64 KiB",
        format!("GET / HTTP/1.1\r\n{H}X-Big: {}\r\n\r\n", "a".repeat(70_000)).into_bytes(),
        431,
    );
    add(
        "no Host on HTTP/1.1",
        b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n".to_vec(),
        400,
    );
    add(
        "an empty Host",
        b"GET / HTTP/1.1\r\nHost: \r\n\r\n".to_vec(),
        400,
    );

    for (name, req, status) in &cases {
        report.check(name, refused(b, p, &[req], *status).await);
    }
    env.stop().await;
    report.finish();
}

// ---------------------------------------------------------------------------------------
// Chunked request bodies
// ---------------------------------------------------------------------------------------

const CHUNKED_HEAD: &[u8] =
    b"POST /up HTTP/1.1\r\nHost: raw.app.test\r\nTransfer-Encoding: chunked\r\n\r\n";

fn chunked_head_fwd() -> Vec<u8> {
    fwd(
        "POST /up HTTP/1.1\r\nHost: raw.app.test\r\nTransfer-Encoding: chunked\r\n",
        b"",
    )
}

/// A valid body with extensions of every shape, and trailers.
const RICH_BODY: &[u8] = b"5;a=b\r\nhello\r\n6 ; name = \"q\\\"v\" ;x\t;y=\"\"\r\n world\r\n0;last=1\r\nX-Trailer: v\r\nX-Other:\tw x \r\nX-Empty:\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_chunked_bodies_pass_verbatim_however_they_are_split() {
    let env = Env::start(&[UNTRUSTED]).await;
    let (b, p) = (&env.backend, env.proxy(0));
    let mut report = Report::new("valid chunked bodies");
    let head = chunked_head_fwd();
    let next = b"GET /next HTTP/1.1\r\nHost: raw.app.test\r\n\r\n";
    let next_fwd = fwd("GET /next HTTP/1.1\r\nHost: raw.app.test\r\n", b"");

    let bodies: [(&str, &[u8]); 8] = [
        ("simple", b"5\r\nhello\r\n0\r\n\r\n"),
        ("extensions and trailers", RICH_BODY),
        (
            "leading zeros past 15 digits",
            b"00000000000000000005\r\nhello\r\n000\r\n\r\n",
        ),
        (
            "upper and lower hex",
            b"A\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n",
        ),
        ("chunk data that is CRLF", b"2\r\n\r\n\r\n0\r\n\r\n"),
        (
            "chunk data that looks like a chunk",
            b"5\r\n0\r\n\r\n\r\n0\r\n\r\n",
        ),
        ("obs-text in a trailer", b"0\r\nX-T: caf\xe9\r\n\r\n"),
        (
            "a request in the data",
            b"2b\r\nGET /admin HTTP/1.1\r\nHost: raw.app.test\r\n\r\n\r\n0\r\n\r\n",
        ),
    ];
    // Each body, then a pipelined request that we must parse as a request (and rewrite).
    for (name, body) in bodies {
        let mark = b.mark();
        let a = talk(
            p,
            &[&cat(&[CHUNKED_HEAD, body, next])],
            Duration::ZERO,
            2,
            Wait::Open,
        )
        .await;
        let seen = b.since(mark);
        let want = cat(&[&head, body, &next_fwd]);
        let r = (|| -> Result<(), String> {
            ensure!(
                seen.bytes == want,
                "backend received\n      {}\n    want\n      {}",
                esc(&seen.bytes),
                esc(&want)
            );
            ensure!(
                a.responses.len() == 2 && a.responses.iter().all(|r| r.status == 200),
                "client got {}",
                esc(&a.bytes)
            );
            ensure!(!a.closed, "connection closed");
            Ok(())
        })();
        report.check(name, r);
    }

    // The rich body cut in two at every byte position of the whole request.
    let full = cat(&[CHUNKED_HEAD, RICH_BODY]);
    let want = cat(&[&head, RICH_BODY]);
    for k in 1..full.len() {
        report.check(
            &format!(
                "split at {k}: {}|{}",
                esc(&full[k.saturating_sub(4)..k]),
                esc(&full[k..(k + 4).min(full.len())])
            ),
            forwarded(
                b,
                p,
                &[&full[..k], &full[k..]],
                Duration::from_millis(8),
                &want,
            )
            .await,
        );
    }
    // And one byte at a time.
    let bytes: Vec<&[u8]> = full.chunks(1).collect();
    report.check(
        "one byte at a time",
        forwarded(b, p, &bytes, Duration::from_millis(2), &want).await,
    );
    env.stop().await;
    report.finish();
}

/// Chunk lines and trailer sections that must be refused, with the valid part before them.
fn bad_bodies() -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>, Vec<u8>)> = Vec::new();
    let rest: &[u8] = b"hello\r\n0\r\n\r\n";
    for (name, line) in [
        ("two sizes", &b"5 6\r\n"[..]),
        ("whitespace without ;", b"5 \r\n"),
        ("tab without ;", b"5\t\r\n"),
        ("NUL extension", b"5;\0\r\n"),
        ("control byte in a value", b"5;a=\x01\r\n"),
        ("open quote", b"5;a=\"x\r\n"),
        ("control byte in a quoted value", b"5;a=\"\x01\"\r\n"),
        ("trailing whitespace after a name", b"5;a \r\n"),
        ("trailing whitespace after a value", b"5;a=b \r\n"),
        ("trailing tab after a quoted value", b"5;a=\"b\"\t\r\n"),
        ("empty extension name", b"5;=b\r\n"),
        ("empty extension value", b"5;a=\r\n"),
        ("a second =", b"5;a=b=c\r\n"),
        ("junk after a quoted value", b"5;a=\"x\"y\r\n"),
        ("a lone ;", b"5;\r\n"),
        ("two ;", b"5;;a\r\n"),
        ("extension name with a slash", b"5;a/b\r\n"),
        ("bare LF after the size", b"5\n"),
        ("bare LF after an extension", b"5;a=b\n"),
        ("bare CR after the size", b"5\rX"),
        ("not hex", b"g\r\n"),
        ("0x prefix", b"0x5\r\n"),
        ("a sign", b"+5\r\n"),
        ("a leading space", b" 5\r\n"),
        ("no size", b"\r\n"),
        ("16 significant hex digits", b"1000000000000000\r\n"),
        ("u64 overflow", b"ffffffffffffffffff\r\n"),
    ] {
        v.push((format!("chunk line: {name}"), line.to_vec(), rest.to_vec()));
    }
    v.push((
        "data longer than its size".into(),
        b"X\r\n".to_vec(),
        b"0\r\n\r\n".to_vec(),
    ));
    v.push((
        "bare LF after the data".into(),
        b"\n".to_vec(),
        b"0\r\n\r\n".to_vec(),
    ));
    for (name, trailer) in [
        ("a request line", &b"GET /admin?a:b HTTP/1.1\r\n"[..]),
        ("no colon", b"X-A\r\n"),
        ("space in the name", b"X A: 1\r\n"),
        ("NUL in the name", b"X\0A: 1\r\n"),
        ("non-token name", b"X@A: 1\r\n"),
        ("empty name", b": 1\r\n"),
        ("space before the colon", b"X-A : 1\r\n"),
        ("control byte in the value", b"X-A: a\x01b\r\n"),
        ("NUL in the value", b"X-A: a\0b\r\n"),
        ("DEL in the value", b"X-A: a\x7fb\r\n"),
        ("bare CR in the value", b"X-A: a\rb\r\n"),
        ("bare LF ending the line", b"X-A: 1\n"),
        ("folded line", b" X-A: 1\r\n"),
        ("bare LF ending the section", b"\n"),
    ] {
        v.push((
            format!("trailer: {name}"),
            trailer.to_vec(),
            b"\r\n".to_vec(),
        ));
    }
    for name in [
        "Content-Length",
        "content-length",
        "Content_Length",
        "Transfer-Encoding",
        "Host",
        "Connection",
        "TE",
        "Trailer",
        "Upgrade",
        "Keep-Alive",
        "Authorization",
        "Cookie",
        "X-Forwarded-For",
        "x_forwarded_for",
        "X-Forwarded-Host",
        "X-Forwarded-Proto",
        "X-Real-IP",
        "X_Real_IP",
        "Forwarded",
        "Proxy-Authorization",
        "Proxy-Connection",
    ] {
        v.push((
            format!("trailer: forbidden {name}"),
            format!("{name}: 1\r\n").into_bytes(),
            b"\r\n".to_vec(),
        ));
    }
    v
}

/// What comes before each bad part: trailers follow a last chunk, the rest a valid chunk
/// (and data-length cases a size line and its data).
fn before_bad(name: &str) -> &'static [u8] {
    if name.starts_with("trailer") {
        b"5\r\nhello\r\n0\r\n"
    } else if name.starts_with("data") || name.starts_with("bare LF after the data") {
        b"5\r\nhello\r\n3\r\nabc"
    } else {
        b"5\r\nhello\r\n"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_bodies_sent_with_the_head_reach_no_backend() {
    let env = Env::start(&[UNTRUSTED]).await;
    let (b, p) = (&env.backend, env.proxy(0));
    let mut report = Report::new("malformed chunked bodies with the head");
    for (name, bad, rest) in bad_bodies() {
        let req = cat(&[CHUNKED_HEAD, before_bad(&name), &bad, &rest]);
        report.check(&name, refused(b, p, &[&req], 400).await);
    }
    env.stop().await;
    report.finish();
}

/// The bad bodies also tried after a response has started.
const STARTED: [&str; 8] = [
    "two sizes",
    "open quote",
    "bare LF after the size",
    "16 significant hex digits",
    "data longer than its size",
    "trailer: a request line",
    "forbidden Content-Length",
    "control byte in the value",
];

/// The head and the valid part, a pause, then the bad part: the backend gets at most the
/// valid part (never a byte of the bad line) and its connection is closed; the client gets
/// a 400 when no response had started, else a cut connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_bodies_arriving_later_are_cut_before_the_bad_line() {
    let env = Env::start(&[UNTRUSTED]).await;
    let (b, p) = (&env.backend, env.proxy(0));
    let mut report = Report::new("malformed chunked bodies arriving later");
    let head = chunked_head_fwd();
    for (name, bad, rest) in bad_bodies() {
        let valid = before_bad(&name);
        let first = cat(&[CHUNKED_HEAD, valid]);
        let second = cat(&[&bad, &rest]);
        let allowed = cat(&[&head, valid]);

        // No response yet: a 400.
        b.set(Script::answer(OK));
        let mark = b.mark();
        let a = talk(p, &[&first, &second], LATER, 1, Wait::Close).await;
        let r = async {
            let seen = b.settled(mark).await;
            ensure!(
                allowed.starts_with(&seen.bytes),
                "backend received\n      {}\n    want a prefix of\n      {}",
                esc(&seen.bytes),
                esc(&allowed)
            );
            b.closed_since(mark).await?;
            check_local(a.first()?, 400, Some(true))?;
            ensure!(a.closed, "client connection left open");
            Ok::<(), String>(())
        }
        .await;
        report.check(&format!("{name} (no response yet)"), r);

        // A response already started: the client connection is cut (a few cases suffice).
        if !STARTED.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        b.set(Script::early(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
        ));
        let mark = b.mark();
        let a = talk(p, &[&first, &second], LATER, 1, Wait::Close).await;
        let r = async {
            let seen = b.settled(mark).await;
            ensure!(
                allowed.starts_with(&seen.bytes),
                "backend received\n      {}\n    want a prefix of\n      {}",
                esc(&seen.bytes),
                esc(&allowed)
            );
            b.closed_since(mark).await?;
            ensure!(a.closed, "client connection left open");
            ensure!(
                a.bytes.starts_with(b"HTTP/1.1 200 ") && find(&a.bytes, b"HTTP/1.1 4").is_none(),
                "client got {}",
                esc(&a.bytes)
            );
            Ok(())
        }
        .await;
        report.check(&format!("{name} (response started)"), r);
    }
    env.stop().await;
    report.finish();
}

/// A bad line split at every position. Two checks per split: no byte from the first invalid
/// one on reaches the backend ("no invalid byte"), and no byte of the bad line at all, even
/// those that could still have started a valid line ("line held back"): the specification
/// says the backend never gets a byte of the bad line, which a relay that validates byte by
/// byte but forwards every read meets only for the first check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_chunk_line_split_anywhere_never_reaches_the_backend() {
    let env = Env::start(&[UNTRUSTED]).await;
    let (b, p) = (&env.backend, env.proxy(0));
    let mut report = Report::new("bad lines split anywhere");
    let head = chunked_head_fwd();
    // The valid part, the bad part, and where in the bad part the first invalid byte is.
    let cases: [(&str, &[u8], &[u8], usize); 3] = [
        (
            "two sizes",
            b"5\r\nhello\r\n",
            b"5 6\r\nhello\r\n0\r\n\r\n",
            2,
        ),
        (
            "a request line as a trailer",
            b"5\r\nhello\r\n0\r\n",
            b"GET /admin?a:b HTTP/1.1\r\n\r\n",
            3,
        ),
        (
            "a forbidden trailer",
            b"5\r\nhello\r\n0\r\n",
            b"Content-Length: 0\r\n\r\n",
            14,
        ),
    ];
    for (name, valid, bad, invalid_at) in cases {
        let line_len = find(bad, b"\r\n").unwrap() + 2;
        let no_invalid = cat(&[&head, valid, &bad[..invalid_at]]);
        for k in 1..line_len {
            let first = cat(&[CHUNKED_HEAD, valid, &bad[..k]]);
            let mark = b.mark();
            let a = talk(
                p,
                &[&first, &bad[k..]],
                Duration::from_millis(60),
                1,
                Wait::Close,
            )
            .await;
            let seen = b.settled(mark).await;
            let case = format!("{name}, split after {}", esc(&bad[..k]));
            let r = (|| -> Result<(), String> {
                ensure!(
                    no_invalid.starts_with(&seen.bytes),
                    "backend received\n      {}\n    want a prefix of\n      {}",
                    esc(&seen.bytes),
                    esc(&no_invalid)
                );
                check_local(a.first()?, 400, Some(true))
            })();
            report.check(&format!("{case}: no invalid byte"), r);
            // Bytes that could still have begun a valid line (`5`, `GET`) may have gone out
            // before the refusal; the backend connection is then closed under them, so
            // they can never be read as the start of anything.
            let r = b.closed_since(mark).await;
            report.check(&format!("{case}: backend closed"), r);
        }
    }
    env.stop().await;
    report.finish();
}

// ---------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------

const GET_R: &[u8] = b"GET /r HTTP/1.1\r\nHost: raw.app.test\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_held_to_the_same_rules() {
    let env = Env::start(&[UNTRUSTED]).await;
    let (b, p) = (&env.backend, env.proxy(0));
    let mut report = Report::new("responses");

    // Repeated identical lengths: one Content-Length.
    for (name, resp) in [
        (
            "CL twice",
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"[..],
        ),
        (
            "CL list",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        ),
    ] {
        b.set(Script::answer(resp));
        let a = talk(p, &[GET_R], Duration::ZERO, 1, Wait::No).await;
        let r = (|| -> Result<(), String> {
            let r = a.first()?;
            ensure!(
                r.status == 200 && r.body == b"ok",
                "client got {}",
                esc(&a.bytes)
            );
            ensure!(
                r.all("content-length") == ["2"],
                "client got {}",
                esc(&a.bytes)
            );
            Ok(())
        })();
        report.check(name, r);
    }

    // TE beside CL: CL dropped, the chunked body verbatim.
    let body: &[u8] = b"5;e=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n";
    b.set(Script::answer(&cat(&[
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n",
        body,
    ])));
    let a = talk(p, &[GET_R], Duration::ZERO, 1, Wait::No).await;
    let r = (|| -> Result<(), String> {
        let r = a.first()?;
        ensure!(r.status == 200, "client got {}", esc(&a.bytes));
        ensure!(
            r.all("content-length").is_empty(),
            "Content-Length kept: {}",
            esc(&a.bytes)
        );
        ensure!(
            r.all("transfer-encoding") == ["chunked"],
            "client got {}",
            esc(&a.bytes)
        );
        ensure!(
            r.raw_body == body,
            "body {} want {}",
            esc(&r.raw_body),
            esc(body)
        );
        Ok(())
    })();
    report.check("TE with CL", r);

    // The load header (any case, repeated, or not a number) never reaches the client; the
    // rest of the head and the body do, unchanged.
    b.set(Script::answer(
        b"HTTP/1.1 200 OK\r\nx-backend-load: 7\r\nContent-Length: 2\r\nX-App: 1\r\nX-BACKEND-LOAD: lots\r\nX-Backend-Loads: 3\r\n\r\nok",
    ));
    let a = talk(p, &[GET_R], Duration::ZERO, 1, Wait::No).await;
    let r = (|| -> Result<(), String> {
        let r = a.first()?;
        ensure!(
            r.status == 200 && r.body == b"ok",
            "client got {}",
            esc(&a.bytes)
        );
        let lower = a.bytes.to_ascii_lowercase();
        ensure!(
            find(&lower, b"x-backend-load:").is_none(),
            "load header relayed: {}",
            esc(&a.bytes)
        );
        ensure!(
            r.header("x-app").as_deref() == Some("1")
                && r.header("x-backend-loads").as_deref() == Some("3"),
            "client got {}",
            esc(&a.bytes)
        );
        Ok(())
    })();
    report.check("load header taken out", r);

    // A valid body with extensions and trailers passes verbatim.
    b.set(Script::answer(&cat(&[
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        RICH_BODY,
    ])));
    let a = talk(p, &[GET_R], Duration::ZERO, 1, Wait::No).await;
    let r = (|| -> Result<(), String> {
        let r = a.first()?;
        ensure!(
            r.status == 200 && r.raw_body == RICH_BODY,
            "client got {}",
            esc(&a.bytes)
        );
        Ok(())
    })();
    report.check("extensions and trailers verbatim", r);

    // Bytes past the end of a response are not relayed, and the connection they came on is
    // not used again (the next answer would be the backend's leftover).
    b.set(Script::answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil",
    ));
    let a = talk(p, &[cat(&[GET_R, GET_R])], Duration::ZERO, 2, Wait::Open).await;
    let r = (|| -> Result<(), String> {
        ensure!(
            find(&a.bytes, b"evil").is_none(),
            "client got {}",
            esc(&a.bytes)
        );
        ensure!(
            a.responses.len() == 2
                && a.responses
                    .iter()
                    .all(|r| r.status == 200 && r.body == b"ok"),
            "client got {}",
            esc(&a.bytes)
        );
        Ok(())
    })();
    report.check("bytes after a Content-Length body", r);
    b.set(Script::answer(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\nevil",
    ));
    let a = talk(p, &[cat(&[GET_R, GET_R])], Duration::ZERO, 2, Wait::Open).await;
    let r = (|| -> Result<(), String> {
        ensure!(
            find(&a.bytes, b"evil").is_none(),
            "client got {}",
            esc(&a.bytes)
        );
        ensure!(
            a.responses.len() == 2 && a.responses.iter().all(|r| r.status == 204),
            "client got {}",
            esc(&a.bytes)
        );
        Ok(())
    })();
    report.check("a body on a 204", r);
    b.set(Script::answer(OK));
    let head_r: &[u8] = b"HEAD /r HTTP/1.1\r\nHost: raw.app.test\r\n\r\n";
    let want: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Id: *\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Id: *\r\n\r\n";
    let got = mask_ids(&exactly(p, &cat(&[head_r, head_r]), want.len()).await);
    report.check(
        "a body on a response to HEAD",
        if got == want {
            Ok(())
        } else {
            Err(format!("client got {}, want {}", esc(&got), esc(want)))
        },
    );

    // Framing or syntax a backend must not send: 502.
    let mut bad_heads: Vec<(String, Vec<u8>)> = Vec::new();
    bad_heads.push((
        "differing CL".into(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!".to_vec(),
    ));
    for te in [
        "chunked, chunked",
        "gzip",
        "gzip, chunked",
        "identity",
        "chunked, identity",
    ] {
        bad_heads.push((
            format!("TE {te:?}"),
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\n").into_bytes(),
        ));
    }
    bad_heads.push(("TE chunked twice".into(), b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()));
    bad_heads.push((
        "space before a colon".into(),
        b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok".to_vec(),
    ));
    bad_heads.push((
        "obs-fold".into(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n 2\r\n\r\nok".to_vec(),
    ));
    bad_heads.push((
        "NUL in a value".into(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: a\0b\r\n\r\nok".to_vec(),
    ));
    bad_heads.push((
        "non-token name".into(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX@A: 1\r\n\r\nok".to_vec(),
    ));
    bad_heads.push((
        "CL +2".into(),
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok".to_vec(),
    ));
    for (name, resp) in &bad_heads {
        b.set(Script::closing(resp));
        let a = talk(p, &[GET_R], Duration::ZERO, 1, Wait::No).await;
        let r = (|| -> Result<(), String> {
            let r = a.first()?;
            check_local(r, 502, None)?;
            ensure!(r.body == b"bad gateway\n", "body {}", esc(&r.body));
            Ok(())
        })();
        report.check(&format!("head: {name}"), r);
    }

    // Malformed chunk lines and trailers: never relayed.
    let bad: [(&str, &[u8]); 12] = [
        ("two sizes", b"5 6\r\nhello\r\n0\r\n\r\n"),
        ("whitespace without ;", b"5 \r\nhello\r\n0\r\n\r\n"),
        ("NUL extension", b"5;\0\r\nhello\r\n0\r\n\r\n"),
        ("open quote", b"5;a=\"x\r\nhello\r\n0\r\n\r\n"),
        ("bare LF", b"5\nhello\r\n0\r\n\r\n"),
        ("not hex", b"zz\r\nhello\r\n0\r\n\r\n"),
        (
            "16 significant digits",
            b"1000000000000000\r\nhello\r\n0\r\n\r\n",
        ),
        ("data longer than its size", b"4\r\nhello\r\n0\r\n\r\n"),
        (
            "a request line as a trailer",
            b"0\r\nGET /admin?a:b HTTP/1.1\r\n\r\n",
        ),
        ("forbidden trailer", b"0\r\nContent-Length: 5\r\n\r\n"),
        ("control byte in a trailer", b"0\r\nX-A: a\x01b\r\n\r\n"),
        ("space before a trailer's colon", b"0\r\nX-A : 1\r\n\r\n"),
    ];
    let head: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    let valid: &[u8] = b"3\r\nabc\r\n";
    for (name, bad) in bad {
        // With the head: nothing sent yet, so a 502.
        b.set(Script::closing(&cat(&[head, bad])));
        let a = talk(p, &[GET_R], Duration::ZERO, 1, Wait::No).await;
        let r = (|| -> Result<(), String> {
            ensure!(find(&a.bytes, bad).is_none(), "relayed: {}", esc(&a.bytes));
            let r = a.first()?;
            check_local(r, 502, None)?;
            ensure!(r.body == b"bad gateway\n", "body {}", esc(&r.body));
            Ok(())
        })();
        report.check(&format!("body with the head: {name}"), r);

        // Later: the client connection is cut before the bad line.
        b.set(Script::later(&[&cat(&[head, valid]), bad]));
        let a = talk(p, &[GET_R], Duration::ZERO, 1, Wait::Close).await;
        let r = (|| -> Result<(), String> {
            ensure!(a.closed, "client connection left open: {}", esc(&a.bytes));
            ensure!(find(&a.bytes, bad).is_none(), "relayed: {}", esc(&a.bytes));
            if a.bytes.starts_with(b"HTTP/1.1 502 ") {
                // Nothing had been sent (the router held the valid part back): a 502.
                return check_local(a.first()?, 502, None);
            }
            // The head (rewritten) and at most the valid part, then the cut.
            let at = find(&a.bytes, b"\r\n\r\n").map_or(a.bytes.len(), |p| p + 4);
            ensure!(
                a.bytes.starts_with(b"HTTP/1.1 200 ") && valid.starts_with(&a.bytes[at..]),
                "client got {}",
                esc(&a.bytes)
            );
            Ok(())
        })();
        report.check(&format!("body later: {name}"), r);
    }
    env.stop().await;
    report.finish();
}

// ---------------------------------------------------------------------------------------
// HTTP/1.0 clients
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_no_interim_and_no_chunked_responses() {
    let env = Env::start(&[UNTRUSTED]).await;
    let (b, p) = (&env.backend, env.proxy(0));
    let mut report = Report::new("HTTP/1.0 clients");
    let interim = cat(&[
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
        OK,
    ]);

    b.set(Script::answer(&interim));
    let a = talk(
        p,
        &[b"GET / HTTP/1.0\r\nHost: raw.app.test\r\n\r\n"],
        Duration::ZERO,
        1,
        Wait::Close,
    )
    .await;
    let r = (|| -> Result<(), String> {
        let r = a.first()?;
        ensure!(
            r.status == 200 && r.body == b"ok",
            "client got {}",
            esc(&a.bytes)
        );
        ensure!(
            find(&a.bytes, b" 100 ").is_none() && find(&a.bytes, b" 103 ").is_none(),
            "client got {}",
            esc(&a.bytes)
        );
        Ok(())
    })();
    report.check("1.0: 100 and 103 dropped", r);

    let a = talk(
        p,
        &[b"POST /up HTTP/1.0\r\nHost: raw.app.test\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"],
        Duration::ZERO,
        1,
        Wait::Close,
    )
    .await;
    let r = (|| -> Result<(), String> {
        let r = a.first()?;
        ensure!(
            r.status == 200 && r.body == b"ok",
            "client got {}",
            esc(&a.bytes)
        );
        Ok(())
    })();
    report.check("1.0 with Expect: 100 dropped", r);

    // Sanity: an HTTP/1.1 client does get them.
    let a = talk(p, &[GET_R], Duration::ZERO, 1, Wait::No).await;
    let statuses: Vec<u16> = a.responses.iter().map(|r| r.status).collect();
    report.check(
        "1.1: 100 and 103 relayed",
        if statuses == [100, 103, 200] {
            Ok(())
        } else {
            Err(format!("client got {}", esc(&a.bytes)))
        },
    );

    let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-App: 1\r\n\r\n5;e=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n";
    for (name, req) in [
        (
            "1.0: chunked de-chunked, then close",
            &b"GET / HTTP/1.0\r\nHost: raw.app.test\r\n\r\n"[..],
        ),
        (
            "1.0 keep-alive: chunked de-chunked, then close",
            b"GET / HTTP/1.0\r\nHost: raw.app.test\r\nConnection: keep-alive\r\n\r\n",
        ),
    ] {
        b.set(Script::answer(chunked));
        let a = talk(p, &[req], Duration::ZERO, 1, Wait::Close).await;
        let r = (|| -> Result<(), String> {
            let r = a.first()?;
            ensure!(r.status == 200, "client got {}", esc(&a.bytes));
            ensure!(
                r.all("transfer-encoding").is_empty(),
                "client got {}",
                esc(&a.bytes)
            );
            ensure!(
                r.header("connection").as_deref() == Some("close"),
                "client got {}",
                esc(&a.bytes)
            );
            ensure!(
                r.all("content-length").iter().all(|l| l == "11"),
                "client got {}",
                esc(&a.bytes)
            );
            ensure!(r.body == b"hello world", "body {}", esc(&r.body));
            ensure!(a.closed, "connection left open");
            ensure!(
                a.responses.len() == 1 && a.garbage.is_none(),
                "client got {}",
                esc(&a.bytes)
            );
            Ok(())
        })();
        report.check(name, r);
    }
    env.stop().await;
    report.finish();
}

// ---------------------------------------------------------------------------------------
// Pipelining
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_after_local_answers() {
    let env = Env::start(&[UNTRUSTED]).await;
    let (b, p) = (&env.backend, env.proxy(0));
    env.consul
        .register_ttl("down", "down", b.port(), "critical")
        .await;
    wait_until(Duration::from_secs(10), "down answers 503", || async move {
        get(p, "down.app.test", "/").await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let mut report = Report::new("pipelining");
    let to_raw = b"GET /b HTTP/1.1\r\nHost: raw.app.test\r\n\r\n";
    let to_raw_fwd = fwd("GET /b HTTP/1.1\r\nHost: raw.app.test\r\n", b"");

    // Local answers that keep the connection: the next request is answered.
    for (name, first, status) in [
        (
            "404 unknown host",
            &b"GET /a HTTP/1.1\r\nHost: nope.app.test\r\n\r\n"[..],
            404,
        ),
        (
            "503 no instance",
            b"GET /a HTTP/1.1\r\nHost: down.app.test\r\n\r\n",
            503,
        ),
    ] {
        let mark = b.mark();
        let a = talk(
            p,
            &[&cat(&[first, to_raw, first, to_raw])],
            Duration::ZERO,
            4,
            Wait::Open,
        )
        .await;
        let seen = b.since(mark);
        let r = (|| -> Result<(), String> {
            ensure!(a.responses.len() == 4, "client got {}", esc(&a.bytes));
            check_local(&a.responses[0], status, Some(false))?;
            check_local(&a.responses[2], status, Some(false))?;
            ensure!(
                a.responses[1].status == 200 && a.responses[3].status == 200,
                "client got {}",
                esc(&a.bytes)
            );
            let want = cat(&[&to_raw_fwd, &to_raw_fwd]);
            ensure!(seen.bytes == want, "backend received {}", esc(&seen.bytes));
            ensure!(!a.closed, "connection closed");
            Ok(())
        })();
        report.check(name, r);
    }

    // A HEAD's local answer has no body, so the next answer on the connection is read right.
    for (name, host) in [("HEAD 404", "nope.app.test"), ("HEAD 503", "down.app.test")] {
        let r = async {
            let mut s = connect(p).await;
            let head = format!("HEAD /a HTTP/1.1\r\nHost: {host}\r\n\r\n");
            let req = cat(&[head.as_bytes(), to_raw]);
            tokio::io::AsyncWriteExt::write_all(&mut s, &req)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            let first = read_response(&mut s, &mut buf, true).await;
            ensure!(
                first.header("content-length").is_some(),
                "no Content-Length"
            );
            // A body sent after the HEAD's answer would be read here as a response, and fail.
            let second = read_response(&mut s, &mut buf, false).await;
            ensure!(
                second.status == 200,
                "then got {} {}",
                second.status,
                esc(&buf)
            );
            Ok(())
        }
        .await;
        report.check(name, r);
    }

    // After a 400 (or 501, 405) the connection closes and nothing after reaches a backend.
    for (name, first, status) in [
        ("two Hosts", &b"GET / HTTP/1.1\r\nHost: raw.app.test\r\nHost: raw.app.test\r\n\r\n"[..], 400),
        ("CL.TE", b"POST / HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        ("bad chunk", b"POST / HTTP/1.1\r\nHost: raw.app.test\r\nTransfer-Encoding: chunked\r\n\r\n5 6\r\nhello\r\n0\r\n\r\n", 400),
        ("bad trailer", b"POST / HTTP/1.1\r\nHost: raw.app.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nGET /admin?a:b HTTP/1.1\r\n\r\n", 400),
        ("GET *", b"GET * HTTP/1.1\r\nHost: raw.app.test\r\n\r\n", 400),
        ("TE gzip", b"POST / HTTP/1.1\r\nHost: raw.app.test\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        ("CONNECT", b"CONNECT raw.app.test:80 HTTP/1.1\r\nHost: raw.app.test:80\r\n\r\n", 405),
    ] {
        report.check(name, refused(b, p, &[&cat(&[first, to_raw])], status).await);
    }

    // Bodies that hold requests are bodies; what follows them is a request.
    let body = b"GET /admin HTTP/1.1\r\nHost: raw.app.test\r\n\r\n";
    let cl = format!(
        "POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mark = b.mark();
    let a = talk(
        p,
        &[&cat(&[cl.as_bytes(), body, to_raw])],
        Duration::ZERO,
        2,
        Wait::No,
    )
    .await;
    let seen = b.since(mark);
    let want = cat(&[
        &fwd(
            &format!(
                "POST /up HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: {}\r\n",
                body.len()
            ),
            body,
        ),
        &to_raw_fwd,
    ]);
    report.check(
        "a request inside a Content-Length body",
        if seen.bytes == want && a.responses.len() == 2 {
            Ok(())
        } else {
            Err(format!(
                "backend received {}; client got {}",
                esc(&seen.bytes),
                esc(&a.bytes)
            ))
        },
    );
    let mark = b.mark();
    let a = talk(
        p,
        &[&cat(&[
            b"GET /a HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 0\r\n\r\n",
            to_raw,
        ])],
        Duration::ZERO,
        2,
        Wait::No,
    )
    .await;
    let seen = b.since(mark);
    let want = cat(&[
        &fwd(
            "GET /a HTTP/1.1\r\nHost: raw.app.test\r\nContent-Length: 0\r\n",
            b"",
        ),
        &to_raw_fwd,
    ]);
    report.check(
        "a request after Content-Length: 0",
        if seen.bytes == want && a.responses.len() == 2 {
            Ok(())
        } else {
            Err(format!(
                "backend received {}; client got {}",
                esc(&seen.bytes),
                esc(&a.bytes)
            ))
        },
    );
    env.stop().await;
    report.finish();
}
