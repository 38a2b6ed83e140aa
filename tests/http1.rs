//! The HTTP/1 fast path on the wire: raw bytes from the client, real and scripted backends
//! (tests/common/raw.rs's raw client and `RawBackend`).

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn routed(name: &str, port: u16) -> (ConsulAgent, consul_router::Running) {
    let consul = ConsulAgent::start().await;
    consul.register(name, name, port, &[]).await;
    let router = start_router(&consul.addr(), "").await;
    let p = router.proxy_addr;
    let host = format!("{name}.app.test");
    wait_until(Duration::from_secs(5), "routed", || {
        let host = host.clone();
        async move { get(p, &host, "/").await.status != StatusCode::SERVICE_UNAVAILABLE }
    })
    .await;
    (consul, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_answer_in_order() {
    let consul = ConsulAgent::start().await;
    let b = Backend::start("pipe").await;
    consul.register("pipe", "pipe", b.port(), &[]).await;
    let router = start_router(&consul.addr(), "").await;
    let p = router.proxy_addr;
    wait_status(p, "pipe.app.test", StatusCode::OK).await;

    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(
        b"GET /nowhere HTTP/1.1\r\nHost: nope.app.test\r\n\r\n\
          GET /first HTTP/1.1\r\nHost: pipe.app.test\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: pipe.app.test\r\nContent-Length: 5\r\n\r\nhello\
          HEAD /third HTTP/1.1\r\nHost: pipe.app.test\r\n\r\n\
          GET /fourth HTTP/1.1\r\nHost: pipe.app.test\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    // A local answer consumes its request: the next one is answered, once.
    let unknown = read_response(&mut s, &mut buf, false).await;
    assert_eq!(unknown.status, 404);
    let first = read_response(&mut s, &mut buf, false).await;
    assert!(String::from_utf8_lossy(&first.body).contains("GET /first"));
    let second = read_response(&mut s, &mut buf, false).await;
    assert_eq!(second.body, b"hello");
    let third = read_response(&mut s, &mut buf, true).await;
    assert_eq!(third.status, 200);
    assert!(third.body.is_empty());
    let fourth = read_response(&mut s, &mut buf, false).await;
    assert!(String::from_utf8_lossy(&fourth.body).contains("GET /fourth"));
    assert!(
        buf.is_empty(),
        "extra bytes: {:?}",
        String::from_utf8_lossy(&buf)
    );

    // A client that asks to close gets its local answer and a close.
    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: nope.app.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 404);
    assert!(closed(&mut s).await);

    // An HTTP/1.0 client asking for keep-alive is told it has it, and keeps it.
    let mut s = TcpStream::connect(p).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.0\r\nHost: pipe.app.test\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection").as_deref(), Some("keep-alive"));
    }
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_oversized_heads_are_refused() {
    let b = Backend::start("strict").await;
    let (_consul, router) = routed("strict", b.port()).await;
    let p = router.proxy_addr;
    let cases: [(&[u8], u16); 6] = [
        (
            b"POST / HTTP/1.1\r\nHost: strict.app.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: strict.app.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: strict.app.test\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: strict.app.test\r\nHost: other.app.test\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost strict.app.test\r\n\r\n", 400),
        (b"CONNECT strict.app.test:443 HTTP/1.1\r\nHost: strict.app.test\r\n\r\n", 405),
    ];
    for (raw, status) in cases {
        let mut s = TcpStream::connect(p).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut buf = Vec::new();
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(raw));
        assert_eq!(r.header("connection").as_deref(), Some("close"));
        assert!(closed(&mut s).await);
    }
    // A head past 64 KiB.
    let mut s = TcpStream::connect(p).await.unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: strict.app.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 431);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_under_a_request_is_retried() {
    // Each backend connection answers its first request and silently drops the second.
    let b = RawBackend::start_with(Script::answer(RAW_OK).answer_first(1)).await;
    let (_consul, router) = routed("flaky", b.port()).await;
    let p = router.proxy_addr;
    for _ in 0..5 {
        let g = get(p, "flaky.app.test", "/").await;
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(g.body, "ok");
    }
    // A POST with a body is not replayed: it gets a 502.
    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: flaky.app.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 200);
    s.write_all(b"POST / HTTP/1.1\r\nHost: flaky.app.test\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 502);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_backend_closed_while_idle_are_not_reused() {
    // Answers, then closes the connection without saying so.
    let b = RawBackend::start_with(Script::closing(RAW_OK)).await;
    let (_consul, router) = routed("idleclose", b.port()).await;
    let p = router.proxy_addr;
    // Stay on one client connection: a POST cannot be retried, so it only passes if the
    // closed backend connection was noticed before it was used.
    let mut s = TcpStream::connect(p).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..3 {
        s.write_all(b"POST / HTTP/1.1\r\nHost: idleclose.app.test\r\nContent-Length: 2\r\n\r\nhi")
            .await
            .unwrap();
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, 200);
        // The backend's close has reached the router: no connection to the backend is
        // established any more (the router's end waits in CLOSE_WAIT), so the FIN is in
        // and the next request must not be sent on it.
        wait_until(Duration::from_secs(5), "the backend's close", || async {
            established_to(b.port()) == 0
        })
        .await;
    }
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_and_unframed_responses() {
    let b = Backend::start("cont").await;
    let (_consul, router) = routed("cont", b.port()).await;
    let p = router.proxy_addr;
    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(
        b"POST /collect HTTP/1.1\r\nHost: cont.app.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let interim = read_response(&mut s, &mut buf, false).await;
    assert_eq!(interim.status, 100);
    s.write_all(b"hello").await.unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"hello"[..]));
    router.shutdown().await;

    // A body delimited by close reaches the client whole, and the client is told to close.
    let b = RawBackend::start_with(Script::closing(
        b"HTTP/1.1 200 OK\r\nX-Kind: unframed\r\n\r\nuntil the end",
    ))
    .await;
    let (_consul, router) = routed("unframed", b.port()).await;
    let mut s = TcpStream::connect(router.proxy_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: unframed.app.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert_eq!(r.body, b"until the end");
    router.shutdown().await;
}
