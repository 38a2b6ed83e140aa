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
pub mod h1;
pub mod headers;
pub mod pool;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use ipnet::IpNet;

use crate::balance::{hash_bytes, Strategy};
use crate::config::Config;
use crate::routing::{normalize, HostError, Routes, MAX_HOST};

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
    /// The backend broke the exchange.
    #[error("backend error: {0}")]
    Upstream(String),
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
            ProxyError::Connect(_) | ProxyError::ConnectTimeout | ProxyError::Upstream(_) => {
                (StatusCode::BAD_GATEWAY, "bad gateway\n")
            }
            ProxyError::ResponseTimeout => (StatusCode::GATEWAY_TIMEOUT, "gateway timeout\n"),
            ProxyError::BadBody => (StatusCode::BAD_REQUEST, "malformed request body\n"),
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
    requests: metrics::Counter,
    no_route: metrics::Counter,
    upgraded: metrics::Gauge,
    /// `proxy.header_timeout`. On HTTP/2: how long a connection may have no open stream,
    /// the handshake included, before it is closed.
    pub(crate) header_timeout: std::time::Duration,
    /// `proxy.h2_max_concurrent_streams`, advertised in our HTTP/2 SETTINGS.
    pub(crate) h2_max_concurrent_streams: u32,
}

impl Proxy {
    /// A proxy reading `routes`.
    pub fn new(cfg: &Config, routes: Arc<Routes>) -> Self {
        Proxy {
            routes,
            upstream: Upstream::new(&cfg.proxy),
            trusted: cfg.trusted_proxies.clone().into_boxed_slice(),
            hash_query: cfg.hash_query,
            requests: metrics::counter!("consul_router_requests_total"),
            no_route: metrics::counter!("consul_router_no_route_total"),
            upgraded: metrics::gauge!("consul_router_upgraded_connections"),
            header_timeout: cfg.proxy.header_timeout,
            h2_max_concurrent_streams: cfg.proxy.h2_max_concurrent_streams,
        }
    }

    /// Handles one request that arrived over HTTP/2 from `peer`.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        self.requests.increment(1);
        if req.method() == http::Method::CONNECT {
            return ProxyError::Connect405.into_response();
        }
        let service = {
            let table = self.routes.load();
            if !table.ready {
                return ProxyError::NotReady.into_response();
            }
            let mut buf = [0u8; MAX_HOST + 2];
            let host = match request_host(&req, &mut buf) {
                Ok(h) => h,
                Err(e) => return ProxyError::BadHost(e).into_response(),
            };
            match table.lookup(host) {
                Some(s) => s.clone(),
                None => {
                    self.no_route.increment(1);
                    return ProxyError::UnknownHost.into_response();
                }
            }
        };
        service.stats.touch();
        if service.routable == 0 {
            service.stats.count(503);
            return ProxyError::NoHealthyInstance.into_response();
        }

        let peer_ip = peer.ip();
        let peer_trusted = headers::is_trusted(peer_ip, &self.trusted);
        let key = match service.strategy() {
            Strategy::IpHash => match headers::client_ip(req.headers(), peer_ip, &self.trusted) {
                std::net::IpAddr::V4(v4) => hash_bytes(&v4.octets()),
                std::net::IpAddr::V6(v6) => hash_bytes(&v6.octets()),
            },
            Strategy::UrlHash => {
                let uri = req.uri();
                match (self.hash_query, uri.path_and_query()) {
                    (true, Some(pq)) => hash_bytes(pq.as_str().as_bytes()),
                    _ => hash_bytes(uri.path().as_bytes()),
                }
            }
            Strategy::Random | Strategy::LeastLoad => 0,
        };

        if let Err(e) = prepare_request(&mut req, peer_ip, peer_trusted) {
            return e.into_response();
        }

        let answer = match self.upstream.send(&service, key, req).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(service = %service.name, error = %e, "no backend answer");
                let resp = e.into_response();
                service.stats.count(resp.status().as_u16());
                return resp;
            }
        };
        let upstream::Answer {
            mut response,
            sender,
            in_flight,
        } = answer;
        service.stats.count(response.status().as_u16());

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            // HTTP/2 has no HTTP/1.1 upgrades (WebSocket takes the fast path), so a 101
            // answers nothing that was asked and cannot be relayed.
            return ProxyError::Upstream("unexpected 101".into()).into_response();
        }

        headers::strip_hop_by_hop(response.headers_mut(), false);
        let stall = self.upstream.response_timeout;
        response.map(|b| Either::Left(UpstreamBody::new(b, Some(sender), in_flight, stall)))
    }
}

/// The host of a request: the absolute-form target's authority, else the Host header.
fn request_host<'b>(
    req: &Request<Incoming>,
    buf: &'b mut [u8; MAX_HOST + 2],
) -> Result<&'b str, HostError> {
    if let Some(auth) = req.uri().authority() {
        return normalize(auth.as_str().as_bytes(), buf);
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(h), None) => normalize(h.as_bytes(), buf),
        (None, _) => Err(HostError::Missing),
        (Some(_), Some(_)) => Err(HostError::Invalid),
    }
}

/// Rewrites the request for the backend: HTTP/1.1, origin-form target, Host set from the
/// authority when the client sent absolute-form or HTTP/2, hop-by-hop out, X-Forwarded-* in.
fn prepare_request(
    req: &mut Request<Incoming>,
    peer: std::net::IpAddr,
    peer_trusted: bool,
) -> Result<(), ProxyError> {
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
    let host = headers
        .get(header::HOST)
        .cloned()
        .ok_or(HostError::Missing)?;
    headers::set_forwarded(headers, peer, peer_trusted, &host);
    Ok(())
}
