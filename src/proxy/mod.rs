//! The request path: host → service → instance → stream through.
//!
//! HTTP/1 connections take the fast path in [`h1`]: heads parsed in place and rewritten as
//! bytes, bodies relayed verbatim, backend connections driven in the client's task.
//! Requests that arrive over HTTP/2 go through hyper: [`Proxy::handle`] reads the routing
//! snapshot once, answers bad or unroutable requests itself, rewrites headers, and hands
//! the request to [`upstream::Upstream`]. On both paths bodies are never buffered: the
//! client's body goes to the backend as it arrives and the backend's comes back the same
//! way.

pub mod body;
pub mod core;
pub mod h1;
pub mod headers;
pub mod upstream;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use ipnet::IpNet;

use crate::config::{Config, UnderscoreHeaders};
use crate::routing::{self, HostError, Routes};

use self::core::{ClientConn, Finished, LogFields, RequestId};

pub use body::{ProxyBody, UpstreamBody};
use upstream::Upstream;

/// Why a request got a local answer instead of a backend's.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Missing or malformed Host.
    #[error("{0}")]
    BadHost(#[from] HostError),
    /// No service for this host.
    #[error("no service for this host")]
    UnknownHost,
    /// CONNECT tunnels are not offered.
    #[error("CONNECT is not supported")]
    Connect405,
    /// The first routing table has not been built yet.
    #[error("routing table not loaded yet")]
    NotReady,
    /// The service is known but no instance may take traffic.
    #[error("no healthy instance")]
    NoHealthyInstance,
    /// No instance accepted a connection.
    #[error("cannot connect to backend: {0}")]
    Connect(String),
    /// Connecting took too long on every instance tried.
    #[error("backend connect timeout")]
    ConnectTimeout,
    /// The backend did not send response headers in time.
    #[error("backend response timeout")]
    ResponseTimeout,
    /// The request body's chunked framing is broken.
    #[error("malformed request body")]
    BadBody,
    /// The backend broke the exchange (reset or closed).
    #[error("backend error: {0}")]
    Upstream(String),
    /// The backend's response could not be parsed or framed.
    #[error("bad response from backend: {0}")]
    BadResponse(String),
}

impl From<crate::upstream::ConnectError> for ProxyError {
    fn from(e: crate::upstream::ConnectError) -> Self {
        match e {
            crate::upstream::ConnectError::Failed(e) => ProxyError::Connect(e.to_string()),
            crate::upstream::ConnectError::Timeout => ProxyError::ConnectTimeout,
        }
    }
}

impl ProxyError {
    /// The status and short body sent to the client.
    pub fn answer(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::BadHost(HostError::Missing) => {
                (StatusCode::BAD_REQUEST, "missing Host header\n")
            }
            ProxyError::BadHost(HostError::Invalid) => {
                (StatusCode::BAD_REQUEST, "invalid Host header\n")
            }
            ProxyError::UnknownHost => (StatusCode::NOT_FOUND, "no service for this host\n"),
            ProxyError::Connect405 => {
                (StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n")
            }
            ProxyError::NotReady => (
                StatusCode::SERVICE_UNAVAILABLE,
                "routing table not loaded yet\n",
            ),
            ProxyError::NoHealthyInstance => {
                (StatusCode::SERVICE_UNAVAILABLE, "no healthy instance\n")
            }
            ProxyError::Connect(_)
            | ProxyError::ConnectTimeout
            | ProxyError::Upstream(_)
            | ProxyError::BadResponse(_) => (StatusCode::BAD_GATEWAY, "bad gateway\n"),
            ProxyError::ResponseTimeout => (StatusCode::GATEWAY_TIMEOUT, "gateway timeout\n"),
            ProxyError::BadBody => (StatusCode::BAD_REQUEST, "malformed request body\n"),
        }
    }

    /// The kind of backend failure this is, if it is one.
    pub fn upstream_kind(&self) -> Option<crate::upstream::ErrorKind> {
        use crate::upstream::ErrorKind;
        match self {
            ProxyError::Connect(_) => Some(ErrorKind::ConnectRefused),
            ProxyError::ConnectTimeout => Some(ErrorKind::ConnectTimeout),
            ProxyError::ResponseTimeout => Some(ErrorKind::ResponseTimeout),
            ProxyError::Upstream(_) => Some(ErrorKind::Reset),
            ProxyError::BadResponse(_) => Some(ErrorKind::BadResponse),
            _ => None,
        }
    }

    /// The local response for this error.
    pub fn into_response(self) -> Response<ProxyBody> {
        let (status, text) = self.answer();
        local(status, text)
    }
}

/// A short plain-text local answer; 503s carry `Retry-After`.
pub fn local(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    resp
}

/// The proxy's request handler and what it needs.
#[derive(Debug)]
pub struct Proxy {
    routes: Arc<Routes>,
    upstream: Upstream,
    trusted: Box<[IpNet]>,
    hash_query: bool,
    /// Drop every request field name with `_` (else only the lookalikes).
    drop_underscores: bool,
    upgraded: metrics::Gauge,
    /// `consul_router_open_connections{protocol}`: HTTP/1 and HTTP/2 client connections.
    pub(crate) open_connections: [metrics::Gauge; 2],
    /// Client connections accepted, numbering them for request IDs.
    conns: std::sync::atomic::AtomicU64,
    /// This process's request ID prefix.
    salt: u32,
    /// Where `finish` writes each request's line (off by default).
    access_log: crate::access_log::AccessLog,
    /// `proxy.header_timeout`. On HTTP/2: how long a connection may have no open stream,
    /// the handshake included, before it is closed.
    pub(crate) header_timeout: std::time::Duration,
    /// `proxy.h2_max_concurrent_streams`, advertised in our HTTP/2 SETTINGS.
    pub(crate) h2_max_concurrent_streams: u32,
    /// `proxy.load_header`: read as the instance's load, never relayed.
    load_header: Option<http::HeaderName>,
    /// `proxy.shutdown_grace`: how long connections may finish when their listener stops.
    pub(crate) shutdown_grace: std::time::Duration,
}

impl Proxy {
    /// A proxy reading `routes`, logging requests to `access_log`.
    pub fn new(
        cfg: &Config,
        routes: Arc<Routes>,
        access_log: crate::access_log::AccessLog,
    ) -> Self {
        Proxy {
            routes,
            upstream: Upstream::new(&cfg.proxy),
            trusted: cfg.trusted_proxies.clone().into_boxed_slice(),
            hash_query: cfg.hash_query,
            drop_underscores: cfg.underscore_headers == UnderscoreHeaders::All,
            upgraded: metrics::gauge!("consul_router_upgraded_connections"),
            open_connections: [
                metrics::gauge!("consul_router_open_connections", "protocol" => "http1"),
                metrics::gauge!("consul_router_open_connections", "protocol" => "http2"),
            ],
            conns: std::sync::atomic::AtomicU64::new(0),
            salt: fastrand::u32(..),
            access_log,
            header_timeout: cfg.proxy.header_timeout,
            h2_max_concurrent_streams: cfg.proxy.h2_max_concurrent_streams,
            load_header: cfg.proxy.load_header.clone(),
            shutdown_grace: cfg.proxy.shutdown_grace,
        }
    }

    /// Handles one request that arrived over HTTP/2 on connection `conn`.
    pub async fn handle(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        conn: &ClientConn,
    ) -> Response<ProxyBody> {
        let request_id = req
            .headers()
            .get(headers::X_REQUEST_ID)
            .filter(|_| conn.trusted)
            .and_then(|v| RequestId::from_peer(v.as_bytes()))
            .unwrap_or_else(|| conn.next_request_id(self.salt));
        let start = std::time::Instant::now();
        let host = request_host(&req);
        let routed = match host {
            Ok(host) => {
                let path = req
                    .uri()
                    .path_and_query()
                    .map_or(&b"/"[..], |pq| pq.as_str().as_bytes());
                let xff = req
                    .headers()
                    .get_all(headers::X_FORWARDED_FOR)
                    .iter()
                    .map(HeaderValue::as_bytes);
                self.route(conn, req.method().as_str(), host, path, xff)
            }
            Err(e) => Err(ProxyError::BadHost(e).into()),
        };
        let log = self.logs().then(|| {
            let client = routed.as_ref().map_or(conn.peer_ip, |r| r.client);
            let field = |name| {
                req.headers()
                    .get(name)
                    .map_or(&b""[..], HeaderValue::as_bytes)
            };
            let mut log = LogFields::default();
            log.fill(
                client,
                core::Protocol::Http2,
                [
                    req.method().as_str().as_bytes(),
                    req.uri()
                        .path_and_query()
                        .map_or(&b"/"[..], |pq| pq.as_str().as_bytes()),
                    request_host(&req).ok().flatten().unwrap_or(b""),
                    field(header::REFERER),
                    field(header::USER_AGENT),
                ],
            );
            log
        });
        let routed = match routed {
            Ok(r) => r,
            Err(refused) => {
                let service = refused.service.as_deref();
                return self.local_answer(refused.error, service, start, &request_id, log);
            }
        };
        let service = routed.service;
        let fwd = Forward {
            peer: conn.peer_ip,
            trusted: conn.trusted,
            client: routed.client,
            drop_underscores: self.drop_underscores,
            request_id: &request_id,
        };
        if let Err(e) = prepare_request(&mut req, &fwd) {
            return self.local_answer(e, Some(&service), routed.start, &request_id, log);
        }

        // Only a request with a body pays for a counter of its bytes.
        let received = (!hyper::body::Body::is_end_stream(req.body())).then(Arc::default);
        let answer = match self
            .upstream
            .send(self, &service, routed.key, req, received.clone())
            .await
        {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(service = %service.name, error = %e, "no backend answer");
                return self.local_answer(e, Some(&service), routed.start, &request_id, log);
            }
        };
        let upstream::Answer {
            mut response,
            sender,
            in_flight,
            instance,
            retries,
        } = answer;
        let upstream_time = routed.start.elapsed();

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            // HTTP/2 has no HTTP/1.1 upgrades (WebSocket takes the fast path), so a 101
            // answers nothing that was asked and cannot be relayed.
            service
                .stats
                .metrics
                .get()
                .upstream_error(crate::upstream::ErrorKind::BadResponse);
            let e = ProxyError::BadResponse("unexpected 101".into());
            return self.local_answer(e, Some(&service), routed.start, &request_id, log);
        }
        headers::strip_hop_by_hop(response.headers_mut(), false);
        if let Some(name) = &self.load_header {
            if let Some(value) = response.headers_mut().remove(name) {
                self.load_header(&in_flight.state().load)
                    .report(value.as_bytes());
            }
        }
        set_request_id(response.headers_mut(), &request_id);
        let closing = Box::new(body::Closing {
            proxy: self.clone(),
            status: response.status().as_u16(),
            service,
            instance,
            start: routed.start,
            upstream: upstream_time,
            retries,
            request_id,
            log,
            received,
        });
        let stall = self.upstream.response_timeout;
        response.map(|b| {
            Either::Left(UpstreamBody::new(
                b,
                Some(sender),
                in_flight,
                stall,
                Some(closing),
            ))
        })
    }

    /// A local answer on the HTTP/2 path, closed in the core like any request.
    fn local_answer(
        &self,
        error: ProxyError,
        service: Option<&routing::Service>,
        start: std::time::Instant,
        request_id: &RequestId,
        log: Option<LogFields>,
    ) -> Response<ProxyBody> {
        let (_, text) = error.answer();
        let mut resp = error.into_response();
        set_request_id(resp.headers_mut(), request_id);
        self.finish(
            &Finished {
                service,
                status: resp.status().as_u16(),
                start: Some(start),
                bytes_out: text.len() as u64,
                request_id: request_id.as_bytes(),
                ..Finished::default()
            },
            log.as_ref(),
        );
        resp
    }
}

/// Sets `X-Request-Id` on a response for the client.
fn set_request_id(headers: &mut http::HeaderMap, id: &RequestId) {
    if let Ok(v) = HeaderValue::from_bytes(id.as_bytes()) {
        headers.insert(headers::X_REQUEST_ID, v);
    }
}

/// The raw host of a request: the absolute-form target's (or HTTP/2 `:authority`)
/// authority, else the single Host header.
fn request_host(req: &Request<Incoming>) -> Result<Option<&[u8]>, HostError> {
    if let Some(auth) = req.uri().authority() {
        return Ok(Some(auth.as_str().as_bytes()));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(h), None) => Ok(Some(h.as_bytes())),
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(HostError::Invalid),
    }
}

/// The client-address facts of one request on the HTTP/2 path.
struct Forward<'a> {
    peer: std::net::IpAddr,
    trusted: bool,
    client: std::net::IpAddr,
    drop_underscores: bool,
    request_id: &'a RequestId,
}

/// Rewrites the request for the backend: HTTP/1.1, origin-form target, Host set from the
/// authority when the client sent absolute-form or HTTP/2, hop-by-hop and spoofable
/// fields out, X-Forwarded-* and X-Real-IP in.
fn prepare_request(req: &mut Request<Incoming>, fwd: &Forward<'_>) -> Result<(), ProxyError> {
    if let Some(auth) = req.uri().authority() {
        let host = HeaderValue::from_str(auth.as_str()).map_err(|_| HostError::Invalid)?;
        req.headers_mut().insert(header::HOST, host);
        let pq = req.uri().path_and_query().cloned();
        let mut parts = http::uri::Parts::default();
        parts.path_and_query =
            Some(pq.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| HostError::Invalid)?;
    }
    let from_h2 = req.version() == Version::HTTP_2;
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    if from_h2 {
        headers::join_cookies(headers);
    }
    headers::strip_hop_by_hop(headers, false);
    headers::drop_spoofable(headers, fwd.trusted, fwd.drop_underscores);
    let host = headers
        .get(header::HOST)
        .cloned()
        .ok_or(HostError::Missing)?;
    headers::set_forwarded(headers, fwd.peer, fwd.trusted, &host, fwd.client);
    if let Ok(v) = HeaderValue::from_bytes(fwd.request_id.as_bytes()) {
        headers.insert(headers::X_REQUEST_ID, v);
    }
    Ok(())
}
