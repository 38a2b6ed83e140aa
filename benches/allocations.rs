//! Allocations per proxied request, counted by a wrapping global allocator.
//!
//! Everything runs in this process on loopback: a backend, the proxy (`server::serve_proxy`,
//! the HTTP/1 fast path, with a routing table built by hand, no Consul), and a keep-alive
//! client. The client's and the backend's own allocations are measured by sending the same
//! requests straight to the backend; the difference is what the proxy adds per request.
//!
//! `cargo bench --bench allocations`

use std::alloc::System;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tokio::net::{TcpListener, TcpStream};

use consul_router::config::Config;
use consul_router::proxy::Proxy;
use consul_router::routing::{build, BuildOptions, Health, InstanceSpec, Routes, StateRegistry};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const N: usize = 20_000;

async fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                // An X-Request-Id in the answer, so the client parses the same head
                // whether the proxy (which puts its own there) is in between or not.
                let svc = hyper::service::service_fn(|_req| async {
                    let mut resp = hyper::Response::new(Full::new(Bytes::from_static(b"ok\n")));
                    resp.headers_mut().insert(
                        HeaderName::from_static("x-request-id"),
                        HeaderValue::from_static("backend-1"),
                    );
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Sends N GETs on one keep-alive connection; returns (allocations, bytes) during them.
/// `direct` requests carry the X-Forwarded-Host/Proto, X-Real-IP and X-Request-Id fields the
/// proxy would add, so the backend parses the same head either way and the difference is
/// the proxy's alone.
async fn run(addr: SocketAddr, direct: bool) -> (usize, usize) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    // Static names and values, so building the request allocates the same either way.
    let fields: &[(&'static str, &'static str)] = &[
        ("host", "origin.bench.local"),
        ("user-agent", "bench"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-host", "origin.bench.local"),
        ("x-forwarded-proto", "http"),
        ("x-real-ip", "203.0.113.7"),
        ("x-request-id", "5f3a9c01-1-2a"),
    ];
    let fields = if direct { fields } else { &fields[..3] };
    let req = || {
        let mut r = Request::get("/").body(Full::<Bytes>::default()).unwrap();
        let h = r.headers_mut();
        h.reserve(8);
        for &(k, v) in fields {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        r
    };
    // Warm up pools and buffers, then count.
    let mut region = None;
    for i in 0..1_000 + N {
        if i == 1_000 {
            region = Some(Region::new(GLOBAL));
        }
        let resp = tx.send_request(req()).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }
    let region = region.unwrap();
    let c = region.change();
    (c.allocations, c.bytes_allocated)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The real recorder, so the metrics a request records are counted too.
        let _prometheus = consul_router::metrics::handle();
        let origin = backend().await;
        let routes = Arc::new(Routes::new());
        let catalog: BTreeMap<Arc<str>, Arc<[InstanceSpec]>> = [(
            Arc::from("origin"),
            Arc::from(vec![InstanceSpec {
                id: "origin-1".into(),
                node: "n1".into(),
                address: origin.ip().to_string(),
                port: origin.port(),
                tags: vec![],
                load: None,
                weight_passing: 1,
                weight_warning: 1,
                health: Health::Passing,
            }]),
        )]
        .into();
        let opts = BuildOptions {
            domains: vec!["bench.local".into()],
            default_strategy: consul_router::balance::Strategy::Random,
            include_warning: false,
            max_idle_per_instance: 64,
            exclude_services: vec![],
            expose: consul_router::config::Expose::All,
            static_services: Default::default(),
            dns_ttl: std::time::Duration::from_secs(30),
        };
        routes.store(build(
            &catalog,
            &Default::default(),
            &opts,
            &mut StateRegistry::default(),
        ));
        let cfg = Config::default();
        let proxy = Arc::new(arc_swap::ArcSwap::from_pointee(Proxy::new(
            &cfg,
            routes,
            consul_router::access_log::AccessLog::off(),
        )));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = l.local_addr().unwrap();
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(consul_router::listener::serve(
            l,
            proxy,
            consul_router::listener::Layers::plain(),
            stopped,
        ));

        let (direct_n, direct_b) = run(origin, true).await;
        let (proxied_n, proxied_b) = run(proxy_addr, false).await;
        let per = |x: usize| x as f64 / N as f64;
        println!("allocations per request, {N} keep-alive GETs:");
        println!(
            "  client + backend alone:  {:6.2} allocations, {:7.0} bytes",
            per(direct_n),
            per(direct_b)
        );
        println!(
            "  through consul-router:   {:6.2} allocations, {:7.0} bytes",
            per(proxied_n),
            per(proxied_b)
        );
        println!(
            "  added by the proxy:      {:6.2} allocations, {:7.0} bytes",
            per(proxied_n) - per(direct_n),
            per(proxied_b) - per(direct_b)
        );
    });
}
