//! HTTP/2 backends that are not gRPC, with a real Consul agent: HTTP/1.1 clients bridged to
//! an h2c backend (the exact bytes they get back), `router.proto=h2` over TLS verified
//! against `[upstream_tls] ca_file` (and a backend outside that CA refused and counted),
//! and RFC 8441 extended CONNECT refused cleanly.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use common::certs::{cert_dir, make_ca, make_cert, make_cert_signed};
use common::consul::ConsulAgent;
use common::metrics::{metrics, sample};
use common::raw::{esc, exactly, mask_ids};
use common::router::{start_router, wait_routable};
use common::wait::wait_until;

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

fn full(s: String) -> Body {
    Full::new(Bytes::from(s))
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The backend's answers:
/// - `/info`: what it got (method, target, authority, `te`, `host`, `connection`,
///   `content-length`), with a length;
/// - `/echo`: the request body streamed back, without a length;
/// - `/trailers`: `abc` without a length, then the trailer `x-sum: 42`;
/// - `/empty`: 204.
async fn answer(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let info = format!(
        "{} {} authority={} te={} host={} connection={} length={}\n",
        req.method(),
        req.uri().path_and_query().map_or("", |p| p.as_str()),
        req.uri().authority().map_or("-", |a| a.as_str()),
        h("te"),
        h("host"),
        h("connection"),
        h("content-length"),
    );
    let resp = match req.uri().path() {
        "/echo" => {
            let frames = req
                .into_body()
                .into_data_stream()
                .map(|r| r.map(Frame::data));
            Response::new(StreamBody::new(frames).boxed_unsync())
        }
        "/trailers" => {
            let mut t = HeaderMap::new();
            t.insert("x-sum", "42".parse().expect("value"));
            let frames: Vec<Result<Frame<Bytes>, hyper::Error>> = vec![
                Ok(Frame::data(Bytes::from_static(b"abc"))),
                Ok(Frame::trailers(t)),
            ];
            Response::new(StreamBody::new(tokio_stream::iter(frames)).boxed_unsync())
        }
        "/empty" => {
            let mut r = Response::new(full(String::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        _ => Response::new(full(info)),
    };
    Ok(resp)
}

/// Serves HTTP/2 (prior knowledge, or over `tls`) with [`answer`], without `date`.
async fn h2_backend(
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let (_, gate) = watch::channel(true);
    h2_backend_with(tls, None, gate).await
}

/// [`h2_backend`] advertising `max_streams`; `/hold` answers once `gate` is true.
async fn h2_backend_with(
    tls: Option<Arc<rustls::ServerConfig>>,
    max_streams: Option<u32>,
    gate: watch::Receiver<bool>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tls = tls.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                b.auto_date_header(false)
                    .max_concurrent_streams(max_streams);
                let svc = service_fn(move |req: Request<Incoming>| {
                    let mut gate = gate.clone();
                    async move {
                        if req.uri().path() == "/hold" {
                            let _ = gate.wait_for(|open| *open).await;
                        }
                        answer(req).await
                    }
                });
                match tls {
                    None => {
                        let _ = b.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(cfg) => {
                        let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
                        else {
                            return;
                        };
                        let _ = b.serve_connection(TokioIo::new(s), svc).await;
                    }
                }
            });
        }
    });
    (addr, task)
}

fn tls_config(cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(consul_router::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// One request on a fresh HTTP/1.1 connection; the exact response bytes, request ID
/// masked.
async fn raw(router: SocketAddr, req: &str, at_least: usize) -> String {
    let got = exactly(router, req.as_bytes(), at_least).await;
    String::from_utf8(mask_ids(&got)).unwrap_or_else(|_| esc(&got))
}

/// Checks that `req` on a fresh HTTP/1.1 connection is answered with exactly `want`.
async fn answers(router: SocketAddr, req: &str, want: &str) {
    assert_eq!(raw(router, req, want.len()).await, want, "for {req:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_to_an_h2c_backend_get_http1_bytes() {
    let consul = ConsulAgent::start().await;
    let (backend, _task) = h2_backend(None).await;
    consul
        .register("h2", "h2-1", backend.port(), &["router.proto=h2c"])
        .await;
    let router = start_router(&consul.addr(), "").await;
    wait_routable(&router, "h2.app.test").await;
    let at = router.proxy_addr;

    // GET: the backend gets an HTTP/2 request with :authority, te: trailers, no Host or
    // Connection; the client gets HTTP/1.1 with the length.
    let body = "GET /info?x=1 authority=h2.app.test te=trailers host=- connection=- length=-\n";
    let want = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Request-Id: *\r\n\r\n{body}",
        body.len()
    );
    answers(
        at,
        "GET /info?x=1 HTTP/1.1\r\nHost: h2.app.test\r\nConnection: keep-alive\r\nTE: gzip\r\n\r\n",
        &want,
    )
    .await;

    // HEAD: the length, no body.
    let got = raw(at, "HEAD /info HTTP/1.1\r\nHost: h2.app.test\r\n\r\n", 20).await;
    assert!(
        got.starts_with("HTTP/1.1 200 OK\r\nContent-Length: ")
            && got.ends_with("X-Request-Id: *\r\n\r\n"),
        "{got:?}"
    );

    // 204: no body, no framing fields.
    let got = raw(at, "GET /empty HTTP/1.1\r\nHost: h2.app.test\r\n\r\n", 20).await;
    assert_eq!(got, "HTTP/1.1 204 No Content\r\nX-Request-Id: *\r\n\r\n");

    // POST with Content-Length, answered without a length: chunked back.
    let want = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Request-Id: *\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    answers(
        at,
        "POST /echo HTTP/1.1\r\nHost: h2.app.test\r\nContent-Length: 5\r\n\r\nhello",
        want,
    )
    .await;

    // POST chunked: de-chunked to the backend, its echo chunked back (chunk sizes as the
    // data frames came).
    let got = raw(
        at,
        "POST /echo HTTP/1.1\r\nHost: h2.app.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        60,
    )
    .await;
    let (head, chunks) = got.split_once("\r\n\r\n").expect("a head");
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Request-Id: *"
    );
    assert_eq!(dechunk(chunks), "abcde", "{chunks:?}");

    // What the backend got for a chunked POST: no length, no Transfer-Encoding.
    let body = "POST /info authority=h2.app.test te=trailers host=- connection=- length=-\n";
    let want = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Request-Id: *\r\n\r\n{body}",
        body.len()
    );
    answers(at, "POST /info HTTP/1.1\r\nHost: h2.app.test\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n", &want).await;

    // Trailers come in the last chunk.
    let want = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Request-Id: *\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 42\r\n\r\n";
    answers(
        at,
        "GET /trailers HTTP/1.1\r\nHost: h2.app.test\r\n\r\n",
        want,
    )
    .await;

    // HTTP/1.0 without a length: the body until close.
    let want = "HTTP/1.0 200 OK\r\nX-Request-Id: *\r\nConnection: close\r\n\r\nhi";
    answers(
        at,
        "POST /echo HTTP/1.0\r\nHost: h2.app.test\r\nContent-Length: 2\r\n\r\nhi",
        want,
    )
    .await;

    // Expect: 100-continue: the router says 100 itself, then the body goes through.
    let mut s = TcpStream::connect(at).await.expect("connect");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: h2.app.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("100 in time")
        .expect("read");
    assert_eq!(buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.expect("write");
    let want = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Request-Id: *\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let mut got = Vec::new();
    while mask_ids(&got).len() < want.len() && got.len() < 4096 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut got))
            .await
            .expect("answer in time")
            .expect("read");
        if n == 0 {
            break;
        }
    }
    assert_eq!(String::from_utf8_lossy(&mask_ids(&got)), want);

    // Keep-alive: two requests on one connection, one backend connection for all.
    let mut s = TcpStream::connect(at).await.expect("connect");
    for _ in 0..2 {
        s.write_all(b"GET /empty HTTP/1.1\r\nHost: h2.app.test\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 204 "), "{}", esc(&buf[..n]));
    }
    let table = router.routes.load();
    let inst = &table.lookup("h2.app.test").expect("service").instances[0];
    assert_eq!(inst.state.h2.usage().0, 1, "one multiplexed connection");
}

/// The data of a chunked body.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("chunk line");
        let n = usize::from_str_radix(size, 16).expect("chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_tls_is_verified_against_the_configured_ca() {
    let dir = cert_dir("h2-upstream-tls");
    let ca = make_ca(&dir, "upstream");
    let (cert, key) = make_cert_signed(&dir, "good", &["backend.test", "IP:127.0.0.1"], &ca);
    let (self_cert, self_key) = make_cert(&dir, "stranger", &["backend.test", "IP:127.0.0.1"]);
    let (good, _g) = h2_backend(Some(tls_config(&cert, &key))).await;
    let (bad, _b) = h2_backend(Some(tls_config(&self_cert, &self_key))).await;

    let consul = ConsulAgent::start().await;
    consul
        .register("h2tls", "h2tls-1", good.port(), &["router.proto=h2"])
        .await;
    consul
        .register(
            "h2stranger",
            "h2stranger-1",
            bad.port(),
            &["router.proto=h2"],
        )
        .await;
    let toml = format!("[upstream_tls]\nca_file = \"{}\"\n", ca.cert.display());
    let router = start_router(&consul.addr(), &toml).await;
    wait_routable(&router, "h2tls.app.test").await;
    wait_routable(&router, "h2stranger.app.test").await;

    // An HTTP/2 client and an HTTP/1 client: both reach it, with :scheme https.
    let mut h2 = common::client::h2(router.proxy_addr).await;
    let req = Request::get("http://h2tls.app.test/info")
        .body(Full::default())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), h2.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(
        body.starts_with(b"GET /info authority=h2tls.app.test te=trailers"),
        "{}",
        esc(&body)
    );
    let got = raw(
        router.proxy_addr,
        "GET /info HTTP/1.1\r\nHost: h2tls.app.test\r\n\r\n",
        40,
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got:?}");

    // A certificate the CA did not sign: 502, counted as a TLS failure.
    let got = raw(
        router.proxy_addr,
        "GET /info HTTP/1.1\r\nHost: h2stranger.app.test\r\n\r\n",
        12,
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 502 "), "{got:?}");
    let text = metrics(router.admin_addr).await;
    let n = sample(
        &text,
        "consul_router_upstream_errors_total",
        &[("service", "h2stranger"), ("kind", "tls")],
    );
    assert!(n >= 1.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_opens_connections_at_the_servers_stream_limit() {
    let consul = ConsulAgent::start().await;
    let (open, gate) = watch::channel(false);
    // The server allows 2 streams per connection; the router, 3 connections per instance.
    let (backend, _task) = h2_backend_with(None, Some(2), gate).await;
    consul
        .register("pool", "pool-1", backend.port(), &["router.proto=h2c"])
        .await;
    // A long idle_timeout: the reaper must not close the first connection mid-test.
    let toml = "[proxy]\nh2_backend_max_connections = 3\nidle_timeout = \"60s\"\n";
    let router = start_router(&consul.addr(), toml).await;
    wait_routable(&router, "pool.app.test").await;
    let table = router.routes.load();
    let state = table.lookup("pool.app.test").expect("service").instances[0]
        .state
        .clone();

    // A first connection, its SETTINGS read (before them it takes one stream).
    let got = raw(
        router.proxy_addr,
        "GET /empty HTTP/1.1\r\nHost: pool.app.test\r\n\r\n",
        20,
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 204 "), "{got:?}");
    // 8 requests held at the backend: 3 connections × 2 streams, the last 2 queued on
    // connections at their limit.
    let mut held = Vec::new();
    for _ in 0..8 {
        let at = router.proxy_addr;
        held.push(tokio::spawn(async move {
            raw(at, "GET /hold HTTP/1.1\r\nHost: pool.app.test\r\n\r\n", 40).await
        }));
    }
    wait_until(
        Duration::from_secs(10),
        "8 streams on 3 connections",
        || async { state.h2.usage() == (3, 8) },
    )
    .await;
    open.send_replace(true);
    for h in held {
        let got = h.await.expect("request task");
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got:?}");
    }
    wait_until(Duration::from_secs(5), "streams released", || async {
        state.h2.usage() == (3, 0)
    })
    .await;
    let text = metrics(router.admin_addr).await;
    assert!(sample(&text, "consul_router_h2_backend_streams_queued_total", &[]) >= 2.0);
    // The admin API shows the pool.
    let inst = common::client::listed_instance(router.admin_addr, "pool-1")
        .await
        .expect("listed");
    assert_eq!(inst["proto"], "h2c");
    assert_eq!(inst["h2_pool"]["connections"], 3);
}

/// An HTTP/2 frame head.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK literal field without indexing, new name, no Huffman coding.
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_connect_is_refused_and_not_advertised() {
    let consul = ConsulAgent::start().await;
    let (backend, _task) = h2_backend(None).await;
    consul
        .register("ws", "ws-1", backend.port(), &["router.proto=h2c"])
        .await;
    let router = start_router(&consul.addr(), "").await;
    wait_routable(&router, "ws.app.test").await;

    // Not advertised: a client sees SETTINGS_ENABLE_CONNECT_PROTOCOL off.
    let stream = TcpStream::connect(router.proxy_addr)
        .await
        .expect("connect");
    let (mut sender, mut conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("handshake");
    // A request round trip, so the server's SETTINGS have been read.
    let req = Request::get("http://ws.app.test/empty")
        .body(Full::default())
        .expect("request");
    let (resp, _) = tokio::join!(
        async {
            let r = sender.send_request(req).await;
            r.map(|r| r.status())
        },
        async { tokio::time::timeout(Duration::from_millis(500), &mut conn).await }
    );
    assert_eq!(resp.expect("response"), StatusCode::NO_CONTENT);
    assert!(!conn.is_extended_connect_protocol_enabled());

    // Sent anyway, by hand: the stream is reset (PROTOCOL_ERROR), the connection lives.
    let mut s = TcpStream::connect(router.proxy_addr)
        .await
        .expect("connect");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    let mut block = Vec::new();
    for (n, v) in [
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "http"),
        (":path", "/chat"),
        (":authority", "ws.app.test"),
    ] {
        literal(&mut block, n, v);
    }
    out.extend(frame(0x1, 0x4, 1, &block));
    s.write_all(&out).await.expect("write");
    let mut buf = Vec::new();
    let reset = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = s.read_buf(&mut buf).await.expect("read");
            assert!(n > 0, "closed without a reset");
            let mut at = 0;
            while buf.len() >= at + 9 {
                let len =
                    (buf[at] as usize) << 16 | (buf[at + 1] as usize) << 8 | buf[at + 2] as usize;
                if buf.len() < at + 9 + len {
                    break;
                }
                let (kind, id) = (
                    buf[at + 3],
                    u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]]),
                );
                let payload = &buf[at + 9..at + 9 + len];
                if kind == 0x3 && id == 1 {
                    return u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                }
                assert!(
                    kind != 0x1 || id != 1,
                    "CONNECT got a response instead of a reset"
                );
                at += 9 + len;
            }
        }
    })
    .await
    .expect("a reset within 5 s");
    assert_eq!(reset, 0x1, "PROTOCOL_ERROR");
}
