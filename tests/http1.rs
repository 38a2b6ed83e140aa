//! The HTTP/1 fast path on the wire: raw bytes from the client, real and scripted backends.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A response as read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response from `s` (Content-Length, chunked, or until close), keeping any bytes
/// after it in `buf`. `head` says the request was HEAD.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head: bool) -> Raw {
    let (status, headers, len) = loop {
        let mut h = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut h);
        if let httparse::Status::Complete(n) = r.parse(buf).unwrap() {
            let headers: Vec<(String, String)> = r
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            break (r.code.unwrap(), headers, n);
        }
        read_more(s, buf).await;
    };
    buf.drain(..len);
    let raw = Raw {
        status,
        headers,
        body: Vec::new(),
    };
    if head || status == 204 || status == 304 || (100..200).contains(&status) {
        return raw;
    }
    let mut raw = raw;
    if let Some(n) = raw.header("content-length") {
        let n: usize = n.parse().unwrap();
        while buf.len() < n {
            read_more(s, buf).await;
        }
        raw.body = buf.drain(..n).collect();
    } else if raw.header("transfer-encoding").is_some() {
        loop {
            let line_end = loop {
                if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                    break p;
                }
                read_more(s, buf).await;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap(), 16).unwrap();
            while buf.len() < line_end + 2 + size + 2 {
                read_more(s, buf).await;
            }
            raw.body
                .extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
            buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    } else {
        while s.read_buf(buf).await.unwrap() > 0 {}
        raw.body = std::mem::take(buf);
    }
    raw
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) {
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(buf))
        .await
        .expect("no answer within 5 s")
        .unwrap();
    assert!(
        n > 0,
        "connection closed; had {:?}",
        String::from_utf8_lossy(buf)
    );
}

/// Whether the peer closed `s` (EOF within 2 s).
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// A scripted backend: for the n-th request on a connection (from 0), `answer(n)` gives the
/// bytes to send, or `None` to close the connection without answering. With
/// `close_after_answer`, every connection closes right after its first answer.
fn scripted_backend(
    close_after_answer: bool,
    answer: impl Fn(usize) -> Option<&'static [u8]> + Send + Sync + 'static,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    let task = tokio::spawn(async move {
        let listener = TcpListener::from_std(std_listener).unwrap();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for n in 0.. {
                    // Heads only: these scripted exchanges carry no request bodies.
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    match answer(n) {
                        Some(bytes) => {
                            if s.write_all(bytes).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    }
                    if close_after_answer {
                        let _ = s.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

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
    wait_until(Duration::from_secs(5), "routed", || async move {
        get(p, "pipe.app.test", "/").await.status == StatusCode::OK
    })
    .await;

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
        assert_eq!(r.header("connection"), Some("keep-alive"));
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
        assert_eq!(r.header("connection"), Some("close"));
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
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let (addr, _task) = scripted_backend(false, |n| (n == 0).then_some(OK));
    let (_consul, router) = routed("flaky", addr.port()).await;
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
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let (addr, _task) = scripted_backend(true, |_| Some(OK));
    let (_consul, router) = routed("idleclose", addr.port()).await;
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
        tokio::time::sleep(Duration::from_millis(100)).await;
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
    let (addr, _task) = scripted_backend(true, |_| {
        Some(&b"HTTP/1.1 200 OK\r\nX-Kind: unframed\r\n\r\nuntil the end"[..])
    });
    let (_consul, router) = routed("unframed", addr.port()).await;
    let mut s = TcpStream::connect(router.proxy_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: unframed.app.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.body, b"until the end");
    router.shutdown().await;
}
