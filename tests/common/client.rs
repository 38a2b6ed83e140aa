//! An HTTP client for the tests: whole responses over HTTP/1.1 or HTTP/2, the admin API.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::wait::wait_until;

/// A response read whole (tests only: the bodies here are small).
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

/// A fresh HTTP/1.1 client connection to `addr`, its connection task spawned.
pub async fn open<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// Sends `req` on a fresh connection to `addr`.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Got {
    let mut sender = open(addr).await;
    send_on(&mut sender, req, Duration::from_secs(30)).await
}

/// Sends `req` on an open HTTP/1 connection and reads the whole answer within `limit`.
pub async fn send_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    limit: Duration,
) -> Got {
    let resp = tokio::time::timeout(limit, sender.send_request(req))
        .await
        .expect("response in time")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// An HTTP/2 (prior knowledge) connection to `addr`.
pub async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    h2_client(addr).await.0
}

/// An HTTP/2 (prior knowledge) connection to `addr` with any request body type; the handle
/// resolves when the connection ends.
pub async fn h2_client<B>(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<()>,
)
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, task)
}

/// GET `path` with `Host: host`.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Got {
    let req = Request::get(path)
        .header("host", host)
        .body(Full::default())
        .unwrap();
    send(addr, req).await
}

pub async fn get_admin(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let g = get(addr, "admin", path).await;
    (g.status, g.body)
}

/// Which backend answered (backends put their name first in the body).
pub fn who(g: &Got) -> String {
    g.body.lines().next().unwrap_or_default().to_owned()
}

/// Waits (20 s at most) until GET / with `Host: host` answers `want`.
pub async fn wait_status(addr: SocketAddr, host: &str, want: StatusCode) {
    wait_until(
        Duration::from_secs(20),
        &format!("{host} answering {want}"),
        || async move { get(addr, host, "/").await.status == want },
    )
    .await;
}

/// The routes of the live table, as `/api/routes` lists them (no admin token).
pub async fn routes(admin: SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = get_admin(admin, "/api/routes").await;
    assert_eq!(status, StatusCode::OK, "/api/routes: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("routes JSON");
    v["routes"].as_array().cloned().unwrap_or_default()
}

/// The instance `id` as `/api/routes` lists it, if it is in the table.
pub async fn listed_instance(admin: SocketAddr, id: &str) -> Option<serde_json::Value> {
    routes(admin)
        .await
        .iter()
        .flat_map(|r| r["instances"].as_array().cloned().unwrap_or_default())
        .find(|i| i["id"] == id)
}

/// The client protocol a table case runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
}

/// One request of a table case over `proto` on a fresh connection: `method` `target` for
/// `host` with `fields` and `body`. HTTP/2 carries the host as `:authority` and leaves out
/// connection-specific fields. A stream error comes back as status 599 with its text.
pub async fn request(
    proto: Proto,
    addr: SocketAddr,
    (method, host, target): (&str, &str, &str),
    fields: &[(&str, &str)],
    body: &'static str,
) -> Got {
    let uri: http::Uri = match proto {
        Proto::H2 => http::Uri::builder()
            .scheme("http")
            .authority(host)
            .path_and_query(target)
            .build()
            .unwrap(),
        Proto::H1 => target.parse().unwrap(),
    };
    let mut req = Request::builder()
        .method(http::Method::from_bytes(method.as_bytes()).unwrap())
        .uri(uri);
    if proto == Proto::H1 {
        req = req.header("host", host);
    }
    for (k, v) in fields {
        let h1_only = matches!(*k, "upgrade" | "connection" | "te" | "proxy");
        if proto == Proto::H1 || !h1_only {
            req = req.header(*k, *v);
        }
    }
    let req = req
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    match proto {
        Proto::H1 => send(addr, req).await,
        Proto::H2 => {
            let mut s = h2(addr).await;
            let resp = tokio::time::timeout(Duration::from_secs(30), s.send_request(req))
                .await
                .expect("answer in time");
            match resp {
                Ok(r) => {
                    let (parts, body) = r.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    Got {
                        status: parts.status,
                        headers: parts.headers,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    }
                }
                // Not an answer from the router: never what a case wants.
                Err(e) => Got {
                    status: StatusCode::from_u16(599).unwrap(),
                    headers: http::HeaderMap::new(),
                    body: format!("stream error: {e}"),
                },
            }
        }
    }
}
