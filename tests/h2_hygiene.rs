//! HTTP/2 connection hygiene: handshake and idle timeout, advertised stream limit, and
//! stalled bodies cut on the HTTP/2 path.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
const GOAWAY: u8 = 7;
const SETTINGS: u8 = 4;
/// SETTINGS_MAX_CONCURRENT_STREAMS.
const MAX_CONCURRENT_STREAMS: u16 = 3;
/// The router closes an idle HTTP/2 connection with a GOAWAY, then drops it within about a
/// second; this is that second plus scheduling slack on a loaded 2-core machine.
const CLOSE_SLACK: Duration = Duration::from_secs(6);

/// What a raw client saw until the router closed the connection.
struct Seen {
    /// HTTP/2 frames: type, flags, payload.
    frames: Vec<(u8, u8, Vec<u8>)>,
    /// From the end of the client's writes to EOF (or reset).
    closed_after: Duration,
}

/// Connects, writes `bytes`, and reads until the router closes the connection, for at
/// most `limit`. Panics if it is still open then.
async fn raw_until_closed(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Seen {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let t = Instant::now();
    let mut got = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                // A reset closes it too.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("read: {e}"),
            }
        }
    };
    tokio::time::timeout(limit, read_all)
        .await
        .unwrap_or_else(|_| panic!("the router kept the connection open for {limit:?}"));
    Seen {
        frames: frames(&got),
        closed_after: t.elapsed(),
    }
}

/// Splits server bytes into HTTP/2 frames (a partial last frame is ignored).
fn frames(mut b: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 9 {
        let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
        if b.len() < 9 + len {
            break;
        }
        out.push((b[3], b[4], b[9..9 + len].to_vec()));
        b = &b[9 + len..];
    }
    out
}

/// The value of setting `id` in the router's first (non-ACK) SETTINGS frame.
fn setting(seen: &Seen, id: u16) -> Option<u32> {
    let (_, _, payload) = seen
        .frames
        .iter()
        .find(|(ty, flags, _)| *ty == SETTINGS && flags & 1 == 0)?;
    payload.chunks_exact(6).find_map(|p| {
        (u16::from_be_bytes([p[0], p[1]]) == id)
            .then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
    })
}

fn has_goaway(seen: &Seen) -> bool {
    seen.frames.iter().any(|(ty, _, _)| *ty == GOAWAY)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_without_streams_is_closed_and_settings_carry_the_stream_limit() {
    let consul = ConsulAgent::start().await;
    let router = start_router(
        &consul.addr(),
        "[proxy]\nheader_timeout = \"1s\"\nh2_max_concurrent_streams = 7",
    )
    .await;
    let p = router.proxy_addr;
    let limit = Duration::from_secs(1) + CLOSE_SLACK;

    // The preface alone, then the preface and an empty SETTINGS frame: both are on hyper's
    // HTTP/2 server with no stream open, and get a GOAWAY after header_timeout, then EOF.
    let with_settings = [PREFACE, EMPTY_SETTINGS].concat();
    let (alone, settings) = tokio::join!(
        raw_until_closed(p, PREFACE, limit),
        raw_until_closed(p, &with_settings, limit),
    );
    for (what, seen) in [("preface", &alone), ("preface + SETTINGS", &settings)] {
        assert!(has_goaway(seen), "{what}: no GOAWAY before the close");
        assert!(
            seen.closed_after >= Duration::from_millis(900),
            "{what}: closed after {:?}, before header_timeout",
            seen.closed_after
        );
        assert_eq!(
            setting(seen, MAX_CONCURRENT_STREAMS),
            Some(7),
            "{what}: SETTINGS_MAX_CONCURRENT_STREAMS"
        );
    }

    // 200 at once, half of each kind: every one is closed.
    let t = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..200 {
        let bytes = if i % 2 == 0 {
            PREFACE.to_vec()
        } else {
            with_settings.clone()
        };
        clients.spawn(async move { raw_until_closed(p, &bytes, limit + CLOSE_SLACK).await });
    }
    let mut closed = 0;
    while let Some(seen) = clients.join_next().await {
        assert!(has_goaway(&seen.expect("client")), "no GOAWAY");
        closed += 1;
    }
    assert_eq!(closed, 200);
    assert!(t.elapsed() < limit + CLOSE_SLACK, "took {:?}", t.elapsed());
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_preface_is_closed() {
    let consul = ConsulAgent::start().await;
    let router = start_router(&consul.addr(), "[proxy]\nheader_timeout = \"1s\"").await;
    // A partial preface is still on the HTTP/1 path, waiting for the rest of the head, under
    // the same proxy.header_timeout.
    let limit = Duration::from_secs(1) + CLOSE_SLACK;
    let seen = raw_until_closed(router.proxy_addr, &PREFACE[..10], limit).await;
    assert!(seen.frames.is_empty() || !has_goaway(&seen));
    router.shutdown().await;
}

/// A backend whose response body sends `chunks` chunks, one every `every`.
fn drip_backend(
    listener: TcpListener,
    chunks: usize,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    serve_http(listener, move |_req| async move {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        tokio::spawn(async move {
            for i in 0..chunks {
                // The scenario: a body that keeps flowing, slowly.
                tokio::time::sleep(every).await;
                if tx
                    .send(Ok(Frame::data(Bytes::from(format!("chunk {i}\n")))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok::<_, Infallible>(Response::new(StreamBody::new(ReceiverStream(rx))))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_outlive_the_idle_timeout() {
    let consul = ConsulAgent::start().await;
    let slow = Backend::start("slow").await;
    consul.register("slow", "slow-1", slow.port(), &[]).await;
    let drip = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let drip_port = drip.local_addr().unwrap().port();
    let _drip = drip_backend(drip, 6, Duration::from_millis(500));
    consul.register("drip", "drip-1", drip_port, &[]).await;
    let router = start_router(&consul.addr(), "[proxy]\nheader_timeout = \"1s\"").await;
    wait_routable(&router, "slow.app.test").await;
    wait_routable(&router, "drip.app.test").await;

    let (mut sender, conn) = h2_client::<Full<Bytes>>(router.proxy_addr).await;
    // An answer after 2.5 × header_timeout.
    let req = Request::get("http://slow.app.test/slow/2500")
        .body(Full::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("the slow answer");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(body.starts_with(b"slow\n"));

    // A body that flows for 3 s, a chunk every 0.5 s.
    let req = Request::get("http://drip.app.test/")
        .body(Full::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("the drip answer");
    let t = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("the whole body")
        .to_bytes();
    assert!(
        t.elapsed() >= Duration::from_millis(2000),
        "{:?}",
        t.elapsed()
    );
    let want: String = (0..6).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&body), want);

    // Once no stream is open, the idle timeout applies again.
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(1) + CLOSE_SLACK, conn)
        .await
        .expect("idle connection closed by the router")
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    router.shutdown().await;
}

/// A scripted backend on raw TCP. `/stall`: a response head with 100 bytes announced, 5 sent,
/// then nothing. `/upload`: a chunked response head at once, a chunk every 200 ms while the
/// request body is read. Each connection's bytes after the head, and the time from its
/// last byte to EOF, go to the channel. Anything else: a short answer and a close.
fn raw_backend(
    listener: TcpListener,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let (head, mut body) = read_head(&mut s).await;
                let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
                match path.as_str() {
                    "/stall" => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello")
                            .await;
                        body.extend(read_until_closed(&mut s).await);
                        let _ = tx.send((path, body));
                    }
                    "/upload" => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                            .await;
                        let (mut r, mut w) = s.into_split();
                        let drip = tokio::spawn(async move {
                            loop {
                                // The scenario: a response that keeps flowing.
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                if w.write_all(b"5\r\ntick\n\r\n").await.is_err() {
                                    return;
                                }
                            }
                        });
                        let mut chunk = [0u8; 4096];
                        loop {
                            match r.read(&mut chunk).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => body.extend_from_slice(&chunk[..n]),
                            }
                        }
                        drip.abort();
                        let _ = tx.send((path, body));
                    }
                    _ => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                            .await;
                    }
                }
            });
        }
    });
    (task, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_are_cut() {
    let consul = ConsulAgent::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_backend, mut ended) = raw_backend(listener);
    consul.register("raw", "raw-1", port, &[]).await;
    let router = start_router(&consul.addr(), "[proxy]\nresponse_timeout = \"1s\"").await;
    wait_routable(&router, "raw.app.test").await;
    let bound = Duration::from_secs(1) + CLOSE_SLACK;

    // The backend stalls its response body: the client's stream fails, and the backend
    // connection is closed, not pooled.
    let (mut sender, _conn) = h2_client::<Full<Bytes>>(router.proxy_addr).await;
    let req = Request::get("http://raw.app.test/stall")
        .body(Full::default())
        .unwrap();
    let resp = sender.send_request(req).await.expect("response head");
    assert_eq!(resp.status(), StatusCode::OK);
    let t = Instant::now();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let failed = tokio::time::timeout(bound, async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => got.extend_from_slice(f.data_ref().map(|d| &d[..]).unwrap_or_default()),
                Err(_) => return true,
            }
        }
        false
    })
    .await
    .expect("the stalled stream ends in time");
    assert!(failed, "the stalled body ended cleanly");
    assert_eq!(got, b"hello");
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    let (path, _) = tokio::time::timeout(bound, ended.recv())
        .await
        .expect("the backend connection is closed in time")
        .unwrap();
    assert_eq!(path, "/stall");

    // The client starts an upload and stalls: the backend sees its request end (the
    // connection closes) while the backend's response keeps flowing.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let (mut sender, _conn) = h2_client::<
        StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>,
    >(router.proxy_addr)
    .await;
    let req = Request::post("http://raw.app.test/upload")
        .body(StreamBody::new(ReceiverStream(rx)))
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"first part\n"))))
        .await
        .unwrap();
    let resp = tokio::time::timeout(bound, sender.send_request(req))
        .await
        .expect("response head in time")
        .expect("response head");
    assert_eq!(resp.status(), StatusCode::OK);
    let t = Instant::now();
    let (path, got) = tokio::time::timeout(bound, ended.recv())
        .await
        .expect("the backend sees the upload cut in time")
        .unwrap();
    assert_eq!(path, "/upload");
    assert!(
        String::from_utf8_lossy(&got).contains("first part\n"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(!got.ends_with(b"0\r\n\r\n"), "the upload ended cleanly");
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // The client's stream fails too, rather than hang.
    let rest = tokio::time::timeout(bound, resp.into_body().collect())
        .await
        .expect("the client's stream ends in time");
    assert!(
        rest.is_err(),
        "the response ended cleanly after the upload was cut"
    );
    drop(tx);

    // The backend is still served, on a new connection.
    let req = Request::get("http://raw.app.test/")
        .body(Full::default())
        .unwrap();
    let (mut sender, _conn) = h2_client::<Full<Bytes>>(router.proxy_addr).await;
    let resp = sender.send_request(req).await.expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    router.shutdown().await;
}
