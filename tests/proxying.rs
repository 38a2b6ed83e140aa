//! Proxying: headers, streaming both ways, upgrades, retries, timeouts, h2c, graceful shutdown.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn one_backend(name: &str, toml: &str) -> (ConsulAgent, Backend, consul_router::Running) {
    let consul = ConsulAgent::start().await;
    let b = Backend::start(name).await;
    consul.register(name, name, b.port(), &[]).await;
    let router = start_router(&consul.addr(), toml).await;
    wait_status(
        router.proxy_addr,
        &format!("{name}.app.test"),
        StatusCode::OK,
    )
    .await;
    (consul, b, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_headers() {
    let (_c, _b, router) = one_backend("hdr", "").await;
    let p = router.proxy_addr;
    let req = Request::get("/")
        .header("host", "hdr.app.test")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic eA==")
        .header("proxy", "http://evil")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-custom", "kept")
        .body(Full::<Bytes>::default())
        .unwrap();
    let g = send(p, req).await;
    let body = g.body.to_lowercase();
    for gone in [
        "x-private",
        "keep-alive:",
        "te:",
        "proxy-authorization",
        "proxy:",
    ] {
        assert!(!body.contains(gone), "{gone} reached the backend:\n{body}");
    }
    assert!(body.contains("x-custom: kept"));
    // nginx on loopback is trusted: its chain and its proto are kept, the peer appended.
    assert!(
        body.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1\n"),
        "{body}"
    );
    assert!(body.contains("x-forwarded-proto: https\n"), "{body}");
    assert!(body.contains("x-forwarded-host: hdr.app.test\n"), "{body}");
    // The backend's hop-by-hop headers do not reach the client.
    assert!(!g.headers.contains_key("x-hop"));
    assert!(!g.headers.contains_key("keep-alive"));
    assert_eq!(g.headers["x-backend"], "hdr");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_peers_forwarded_headers_are_replaced() {
    // Trust nobody: the loopback test client is then an untrusted peer.
    let (_c, _b, router) = one_backend("untrusted", "trusted_proxies = []").await;
    let req = Request::get("/")
        .header("host", "untrusted.app.test")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .body(Full::<Bytes>::default())
        .unwrap();
    let body = send(router.proxy_addr, req).await.body;
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
    assert!(
        body.contains("x-forwarded-host: untrusted.app.test\n"),
        "{body}"
    );
    router.shutdown().await;
}

/// The client sends a chunk and waits for its echo before sending the next: a proxy that
/// buffered either body would deadlock here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_both_ways_without_buffering() {
    let (_c, _b, router) = one_backend("stream", "").await;
    let mut sender = open(router.proxy_addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let req = Request::post("/echo")
        .header("host", "stream.app.test")
        .body(StreamBody::new(ReceiverStream(rx)))
        .unwrap();
    let resp_fut = sender.send_request(req);
    let chunk = Bytes::from(vec![b'y'; 32 * 1024]);
    tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp_fut)
        .await
        .expect("headers arrive before the upload ends")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut echoed = 0usize;
    for round in 0..64 {
        // Read back the chunk just sent...
        let mut got = 0;
        while got < chunk.len() {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap_or_else(|_| panic!("round {round}: echo did not stream back"))
                .unwrap()
                .unwrap();
            got += frame.into_data().map(|d| d.len()).unwrap_or(0);
        }
        echoed += got;
        // ...then send the next.
        tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
    }
    drop(tx);
    while let Some(f) = body.frame().await {
        echoed += f.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(echoed, 65 * chunk.len());
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_through() {
    let (_c, _b, router) = one_backend("big", "").await;
    let mut sender = open(router.proxy_addr).await;
    let total = 256 * 1024 * 1024;
    let req = Request::get(format!("/bytes/{total}"))
        .header("host", "big.app.test")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut n = 0usize;
    while let Some(f) = body.frame().await {
        n += f.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(n, total);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let (_c, _b, router) = one_backend("ws", "").await;
    let mut s = TcpStream::connect(router.proxy_addr).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"hello"[..], b"through the tunnel", &[0u8, 1, 2, 255]] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_retry_elsewhere_then_502() {
    let consul = ConsulAgent::start().await;
    let live = Backend::start("live").await;
    // Two instances on ports where nothing listens.
    consul.register("mixed", "dead-1", free_port(), &[]).await;
    consul.register("mixed", "dead-2", free_port(), &[]).await;
    consul.register("mixed", "live", live.port(), &[]).await;
    consul.register("gone", "gone-1", free_port(), &[]).await;
    let router = start_router(&consul.addr(), "").await;
    let p = router.proxy_addr;
    wait_status(p, "mixed.app.test", StatusCode::OK).await;
    // With 2 retries, every request finds the live instance, whichever it tries first.
    for _ in 0..50 {
        let g = get(p, "mixed.app.test", "/").await;
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(who(&g), "live");
    }
    let g = get(p, "gone.app.test", "/").await;
    assert_eq!(g.status, StatusCode::BAD_GATEWAY);
    assert_eq!(g.body, "bad gateway\n");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gets_504() {
    let (_c, _b, router) = one_backend("slow", "[proxy]\nresponse_timeout = \"300ms\"").await;
    let g = get(router.proxy_addr, "slow.app.test", "/slow/2000").await;
    assert_eq!(g.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(g.body, "gateway timeout\n");
    let g = get(router.proxy_addr, "slow.app.test", "/slow/10").await;
    assert_eq!(g.status, StatusCode::OK);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served() {
    let (_c, _b, router) = one_backend("h2", "").await;
    let stream = TcpStream::connect(router.proxy_addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://h2.app.test/via-h2")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with("h2\nGET /via-h2\n"), "{body}");
    assert!(body.contains("host: h2.app.test\n"), "{body}");
    assert!(body.contains("cookie: a=1; b=2\n"), "{body}");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish() {
    let (_c, b, router) = one_backend("drain", "").await;
    let p = router.proxy_addr;
    let in_flight = tokio::spawn(async move { get(p, "drain.app.test", "/slow/700").await });
    // In flight: the backend has the request (and answers it 700 ms later).
    b.wait_request("GET /slow/700").await;
    let t = std::time::Instant::now();
    router.shutdown().await;
    let g = in_flight.await.unwrap();
    assert_eq!(g.status, StatusCode::OK, "the in-flight request was cut");
    assert!(t.elapsed() < Duration::from_secs(10));
    // And no new connections are accepted.
    assert!(TcpStream::connect(p).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_gives_502() {
    // A listener that never accepts, with its accept queue filled: the kernel drops further
    // SYNs, so a connect hangs until our connect timeout.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let black_hole = sock.listen(1).unwrap();
    let port = black_hole.local_addr().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    let consul = ConsulAgent::start().await;
    consul.register("hole", "hole-1", port, &[]).await;
    let router = start_router(
        &consul.addr(),
        "[proxy]\nconnect_timeout = \"300ms\"\nretries = 0",
    )
    .await;
    let t = std::time::Instant::now();
    let g = get(router.proxy_addr, "hole.app.test", "/").await;
    assert_eq!(g.status, StatusCode::BAD_GATEWAY, "{}", g.body);
    // It waited for the connect timeout (not a refusal), and no longer.
    assert!(
        t.elapsed() >= Duration::from_millis(250) && t.elapsed() < Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    drop(black_hole);
    router.shutdown().await;
}
