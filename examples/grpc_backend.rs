//! A gRPC-style echo backend for the benchmark's `grpc` scenario (scripts/bench.sh): HTTP/2
//! cleartext only (prior knowledge, as gRPC backends speak it) on 127.0.0.1:PORT, one thread.
//!
//! A `POST` with `content-type: application/grpc` whose body is one length-prefixed gRPC
//! message is answered 200, `content-type: application/grpc`, the same message echoed and the
//! trailer `grpc-status: 0`. A body that is not one whole message gets `grpc-status: 13`
//! (INTERNAL) instead; another method gets 405 and another content type 415. The path is not
//! looked at: every method is the echo.
//!
//! Speaking HTTP/1.1 to it fails: the connection is closed at the first bytes, as a gRPC
//! server would, so a proxy that does not speak HTTP/2 to it answers with an error of its own.
//!
//! `cargo run --release --example grpc_backend -- PORT` (PORT 0: any free port; the address
//! is printed once listening)

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

const GRPC: &str = "application/grpc";

/// One thread, like the benchmark's other origin (nginx with one worker); the script pins it.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0".into())
        .parse()?;
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("grpc_backend: listening on {}", listener.local_addr()?);

    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // Room for any client's streams per connection (the benchmark's use at most a few dozen).
    http2.max_concurrent_streams(1024);
    let serve = async {
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let conn =
                http2.serve_connection(TokioIo::new(stream), hyper::service::service_fn(echo));
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = serve => r?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// The echo: the request's message back with `grpc-status: 0`, or why not.
async fn echo(req: Request<Incoming>) -> Result<Response<Reply>, Infallible> {
    if req.method() != Method::POST {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED));
    }
    let grpc = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == GRPC || v.starts_with("application/grpc+"));
    if !grpc {
        return Ok(plain(StatusCode::UNSUPPORTED_MEDIA_TYPE));
    }
    let (message, status) = match req.into_body().collect().await {
        Ok(body) => {
            let body = body.to_bytes();
            if is_one_message(&body) {
                (body, "0")
            } else {
                (Bytes::new(), "13")
            }
        }
        Err(_) => (Bytes::new(), "13"),
    };
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    let mut response = Response::new(Reply {
        data: (!message.is_empty()).then_some(message),
        trailers: Some(trailers),
    });
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(GRPC));
    Ok(response)
}

/// Whether `body` is exactly one gRPC message: a compression flag (0 or 1), a 4-byte
/// big-endian length, and that many bytes.
fn is_one_message(body: &[u8]) -> bool {
    let mut head = body;
    if head.len() < 5 || head[0] > 1 {
        return false;
    }
    head.advance(1);
    head.get_u32() as usize == head.len()
}

/// A response without a body or trailers.
fn plain(status: StatusCode) -> Response<Reply> {
    let mut response = Response::new(Reply {
        data: None,
        trailers: None,
    });
    *response.status_mut() = status;
    response
}

/// A response body: at most one data frame, then the trailers if any. Its length is not
/// announced (no content-length), as gRPC servers send none.
struct Reply {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = match self.data.take() {
            Some(data) => Frame::data(data),
            None => match self.trailers.take() {
                Some(trailers) => Frame::trailers(trailers),
                None => return Poll::Ready(None),
            },
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}
