//! The admin listener: `/healthz`, `/api/routes`, `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use crate::routing::{Health, Routes, RoutingTable};
use crate::server::Handler;

/// Answers admin requests from the live routing table.
#[derive(Debug)]
pub struct Admin {
    routes: Arc<Routes>,
    metrics: PrometheusHandle,
}

impl Admin {
    /// An admin handler over `routes`.
    pub fn new(routes: Arc<Routes>, metrics: PrometheusHandle) -> Self {
        Admin { routes, metrics }
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        }
        match req.uri().path() {
            "/healthz" => {
                if self.routes.load().ready {
                    text(StatusCode::OK, "ok\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "routing table not loaded yet\n",
                    )
                }
            }
            "/api/routes" => {
                let table = self.routes.load_full();
                match serde_json::to_vec_pretty(&RoutesView::from(&*table)) {
                    Ok(body) => with_type(StatusCode::OK, body.into(), "application/json"),
                    Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot render routes\n"),
                }
            }
            "/metrics" => with_type(
                StatusCode::OK,
                self.metrics.render().into(),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

impl Handler for Admin {
    type Body = Full<Bytes>;
    async fn call(&self, req: Request<Incoming>, _peer: SocketAddr) -> Response<Full<Bytes>> {
        self.answer(&req)
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(
        status,
        Bytes::from_static(body.as_bytes()),
        "text/plain; charset=utf-8",
    )
}

fn with_type(status: StatusCode, body: Bytes, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// `/api/routes` body.
#[derive(Serialize)]
struct RoutesView<'a> {
    ready: bool,
    generation: u64,
    routes: Vec<RouteView<'a>>,
}

#[derive(Serialize)]
struct RouteView<'a> {
    host: String,
    service: &'a str,
    strategy: &'static str,
    instances: Vec<InstanceView<'a>>,
}

#[derive(Serialize)]
struct InstanceView<'a> {
    id: &'a str,
    node: &'a str,
    address: &'a str,
    port: u16,
    health: Health,
    routable: bool,
    weight: u32,
    load: Option<f64>,
    in_flight: u64,
}

impl<'a> From<&'a RoutingTable> for RoutesView<'a> {
    fn from(t: &'a RoutingTable) -> Self {
        let routes = t
            .host_map()
            .into_iter()
            .map(|(host, svc)| RouteView {
                host,
                service: &svc.name,
                strategy: svc.strategy().as_str(),
                instances: svc
                    .instances
                    .iter()
                    .enumerate()
                    .map(|(i, inst)| InstanceView {
                        id: &inst.id,
                        node: &inst.node,
                        address: &inst.address,
                        port: inst.port,
                        health: inst.health,
                        routable: i < svc.routable,
                        weight: inst.weight,
                        load: inst.load,
                        in_flight: inst
                            .state
                            .in_flight
                            .load(std::sync::atomic::Ordering::Relaxed),
                    })
                    .collect(),
            })
            .collect();
        RoutesView {
            ready: t.ready,
            generation: t.generation,
            routes,
        }
    }
}
