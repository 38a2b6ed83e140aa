//! HTTP backends on 127.0.0.1:0: a real hyper server for any handler, and [`Backend`], which
//! echoes what it got and has a few paths for streaming, slowness and upgrades.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::wait::wait_until;

/// Serves HTTP/1.1 (upgrades allowed) on `listener`, one task per connection, until aborted.
pub fn serve_http<F, Fut, B>(listener: TcpListener, handler: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve(listener, handler, false)
}

/// Serves HTTP/2 with prior knowledge (h2c) on `listener`, one task per connection, until
/// aborted.
pub fn serve_h2c<F, Fut, B>(listener: TcpListener, handler: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve(listener, handler, true)
}

fn serve<F, Fut, B>(listener: TcpListener, handler: F, h2c: bool) -> tokio::task::JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let h = handler.clone();
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                let _ = if h2c {
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(io, service_fn(h))
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service_fn(h))
                        .with_upgrades()
                        .await
                };
            });
        }
    })
}

/// A real HTTP backend on 127.0.0.1:0. Answers with its name on the first line, then the
/// request's method, target and headers. Paths:
/// - `/echo`: streams the request body back as it arrives;
/// - `/collect`: reads the whole request body, then answers with it;
/// - `/bytes/N`: streams N bytes of 'x' in 64 KiB chunks;
/// - `/slow/MS`: waits MS milliseconds before answering;
/// - any request with `Upgrade:`: 101, then echoes bytes on the upgraded connection.
///
/// Every request's `METHOD target` is recorded as its head arrives ([`Backend::requests`]),
/// so a test can wait until a request has reached it.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Self::start_as(name, false).await
    }

    /// The same backend speaking HTTP/2 with prior knowledge (`router.proto=h2c`).
    pub async fn start_h2c(name: &str) -> Backend {
        Self::start_as(name, true).await
    }

    async fn start_as(name: &str, h2c: bool) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let n = name.to_owned();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let handler = move |req: Request<Incoming>| {
            seen.lock()
                .unwrap()
                .push(format!("{} {}", req.method(), req.uri()));
            backend_answer(n.clone(), req)
        };
        let task = if h2c {
            serve_h2c(listener, handler)
        } else {
            serve_http(listener, handler)
        };
        Backend {
            name: name.into(),
            addr,
            requests,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `METHOD target` of every request that reached it so far, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits (10 s at most) until a request `METHOD target` equal to `request` has reached
    /// it: from then on it is in the backend's hands (e.g. sleeping in `/slow/MS`).
    pub async fn wait_request(&self, request: &str) {
        wait_until(
            Duration::from_secs(10),
            &format!("{request} at backend {}", self.name),
            || async { self.requests().iter().any(|r| r == request) },
        )
        .await;
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(s: String) -> BoxBody {
    Full::new(Bytes::from(s))
        .map_err(|never| match never {})
        .boxed()
}

async fn backend_answer(
    name: String,
    mut req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let path = req.uri().path().to_owned();
    if req.headers().contains_key("upgrade") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let resp = Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(full(String::new()))
            .unwrap();
        return Ok(resp);
    }
    if path == "/echo" {
        let body = req.into_body().boxed();
        return Ok(Response::new(body));
    }
    if path == "/collect" {
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let text = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
        return Ok(Response::new(full(text)));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let total: usize = n.parse().unwrap_or(0);
        let stream = futures_stream(total);
        return Ok(Response::new(stream));
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    // `/load/N`: the answer reports load N in the default load header.
    let load = path.strip_prefix("/load/").map(str::to_owned);
    let mut text = format!("{name}\n{} {}\n", req.method(), req.uri());
    for (k, v) in req.headers() {
        text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
    }
    let mut resp = Response::builder();
    if let Some(load) = load {
        resp = resp.header("x-backend-load", load);
    }
    let resp = resp
        .header("x-backend", name.as_str())
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "should be removed")
        .header("keep-alive", "timeout=5")
        .body(full(text))
        .unwrap();
    Ok(resp)
}

/// A body of `total` 'x' bytes produced chunk by chunk.
fn futures_stream(total: usize) -> BoxBody {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, hyper::Error>>(4);
    tokio::spawn(async move {
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            if tx
                .send(Ok(hyper::body::Frame::data(chunk.slice(..n))))
                .await
                .is_err()
            {
                return;
            }
            left -= n;
        }
    });
    http_body_util::StreamBody::new(ReceiverStream(rx)).boxed()
}

/// Minimal Stream over an mpsc receiver (avoids a dependency on tokio-stream).
pub struct ReceiverStream<T>(pub tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}
