//! FAKE Consul, for what a real agent cannot be made to do: answer 500s, send an index that
//! goes backwards, hang, refuse the endpoints of a bulk read, or read a service slowly (the
//! window after a restart); it can also mark answers as filtered by ACLs. It serves just
//! /v1/catalog/services, /v1/health/service/<name> and an empty /v1/health/state/any from a
//! scripted model (no /v1/catalog/nodes: a bulk read fails). Everything else in the suite runs against a real `consul agent -dev`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpListener;

/// How the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Every request gets a 500 "No cluster leader".
    Error500,
    /// Requests are accepted and never answered.
    Hang,
}

#[derive(Debug)]
pub struct Model {
    pub mode: Mode,
    pub index: u64,
    /// service -> [(id, port)]
    pub services: BTreeMap<String, Vec<(String, u16)>>,
    pub requests: u64,
    /// Requests per path.
    pub paths: BTreeMap<String, u64>,
    /// service -> tags, in the service list and on each instance.
    pub tags: BTreeMap<String, Vec<String>>,
    /// How long `/v1/health/service/<name>` takes to answer (a slow read after a restart).
    pub health_delay: Duration,
    /// Answers carry `X-Consul-Results-Filtered-By-ACLs: true`.
    pub acl_filtered: bool,
}

pub struct FakeConsul {
    pub addr: SocketAddr,
    pub model: Arc<Mutex<Model>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeConsul {
    pub async fn start() -> FakeConsul {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let model = Arc::new(Mutex::new(Model {
            mode: Mode::Normal,
            index: 10,
            services: BTreeMap::new(),
            requests: 0,
            paths: BTreeMap::new(),
            tags: BTreeMap::new(),
            health_delay: Duration::ZERO,
            acl_filtered: false,
        }));
        let m = model.clone();
        let task = super::serve_http(listener, move |req| answer(m.clone(), req));
        FakeConsul { addr, model, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, f: impl FnOnce(&mut Model)) {
        f(&mut self.model.lock().unwrap());
    }
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    model: Arc<Mutex<Model>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let asked: u64 = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("index="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (mode, health_delay) = {
        let mut m = model.lock().unwrap();
        m.requests += 1;
        *m.paths.entry(req.uri().path().to_owned()).or_default() += 1;
        (m.mode, m.health_delay)
    };
    if req.uri().path().starts_with("/v1/health/service/") {
        tokio::time::sleep(health_delay).await;
    }
    match mode {
        Mode::Hang => std::future::pending::<()>().await,
        Mode::Error500 => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"No cluster leader")));
            *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            return Ok(r);
        }
        Mode::Normal => {}
    }
    // A short "blocking" wait when nothing changed, so the router polls at a modest rate.
    if asked > 0 && asked == model.lock().unwrap().index {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = model.lock().unwrap();
    let path = req.uri().path();
    let body = if path == "/v1/catalog/services" {
        let map: BTreeMap<&String, Vec<String>> = m
            .services
            .keys()
            .map(|k| (k, m.tags.get(k).cloned().unwrap_or_default()))
            .collect();
        serde_json::to_string(&map).unwrap()
    } else if let Some(name) = path.strip_prefix("/v1/health/service/") {
        let entries: Vec<serde_json::Value> = m
            .services
            .get(name)
            .into_iter()
            .flatten()
            .map(|(id, port)| {
                let tags = m.tags.get(name).cloned().unwrap_or_default();
                serde_json::json!({
                    "Node": {"Node": "fake", "Address": "127.0.0.1"},
                    "Service": {"ID": id, "Service": name, "Tags": tags, "Address": "127.0.0.1",
                                "Port": port, "Meta": {}, "Weights": {"Passing": 1, "Warning": 1}},
                    "Checks": []
                })
            })
            .collect();
        serde_json::to_string(&entries).unwrap()
    } else if path == "/v1/health/state/any" {
        "[]".to_owned()
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not faked")));
        *r.status_mut() = hyper::StatusCode::NOT_FOUND;
        return Ok(r);
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert("x-consul-index", m.index.to_string().parse().unwrap());
    if m.acl_filtered {
        r.headers_mut().insert(
            "x-consul-results-filtered-by-acls",
            hyper::header::HeaderValue::from_static("true"),
        );
    }
    Ok(r)
}
