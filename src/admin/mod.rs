//! The admin listener: the admin page (`/`), `/healthz`, `/api/routes`, `/api/stats`,
//! `/metrics`.
//!
//! With an admin token configured, every path but `/healthz` and the page itself answers 401
//! without `Authorization: Bearer <token>`. The page is a static shell that holds no data:
//! it asks for the token, keeps it in the tab's `sessionStorage` and sends it on its own
//! requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

mod exposition;

use crate::config::AdminToken;
use crate::routing::{Access, Health, Instance, Routes, RoutingTable, Service};
use crate::server::Handler;

/// The admin page: one self-contained HTML file (inline CSS and JS), served from the binary.
const PAGE: &str = include_str!("page.html");

/// The page's content security policy: nothing is loaded from elsewhere, and scripts may
/// only talk to this listener.
const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// How long one `/api/stats` answer is reused: however many pages are open, the metrics
/// (7 MB of text at 2,000 services) are rendered for them at most once per 4 s. The page's
/// rates span about 10 s, so they still move with every other reading.
const STATS_FRESH: Duration = Duration::from_secs(4);

/// Answers admin requests from the live routing table.
#[derive(Debug)]
pub struct Admin {
    routes: Arc<Routes>,
    metrics: PrometheusHandle,
    /// Swapped by a reload.
    token: arc_swap::ArcSwapOption<AdminToken>,
    /// Zero of `/api/stats`'s clock (`at_seconds`).
    epoch: Instant,
    /// The last `/api/stats` body and when it was made.
    stats_cache: tokio::sync::Mutex<Option<(Instant, Bytes)>>,
    /// Set when a drain begins (SIGTERM): `/healthz` answers 503 from then on.
    draining: std::sync::atomic::AtomicBool,
}

impl Admin {
    /// An admin handler over `routes`, open to anyone who reaches the listener.
    pub fn new(routes: Arc<Routes>, metrics: PrometheusHandle) -> Self {
        Admin {
            routes,
            metrics,
            token: arc_swap::ArcSwapOption::empty(),
            epoch: Instant::now(),
            stats_cache: tokio::sync::Mutex::new(None),
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Requires `Authorization: Bearer <token>` on every path but `/healthz` and the page,
    /// when `token` is set.
    pub fn with_token(self, token: Option<AdminToken>) -> Self {
        self.set_token(token);
        self
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        }
        let path = req.uri().path();
        match path {
            "/healthz" => return self.healthz(),
            "/" => return page(),
            _ => {}
        }
        if let Some(refused) = self.refuse(&req) {
            return refused;
        }
        match path {
            "/api/routes" => self.routes_json().await,
            "/api/stats" => self.stats_json().await,
            "/metrics" => self.metrics_text().await,
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// A drain began: `/healthz` answers 503 `draining` from now on, so a load balancer
    /// stops sending before the listeners close.
    pub fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn healthz(&self) -> Response<Full<Bytes>> {
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        } else if self.routes.load().ready {
            text(StatusCode::OK, "ok\n")
        } else {
            match self.routes.waiting() {
                Some(why) => with_type(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n").into(),
                    "text/plain; charset=utf-8",
                ),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "routing table not loaded yet\n",
                ),
            }
        }
    }

    /// Replaces the token (a reload): requests from now on need the new one.
    pub fn set_token(&self, token: Option<AdminToken>) {
        self.token.store(token.map(Arc::new));
    }

    /// The 401 for a request without the configured token; `None` lets it through.
    fn refuse(&self, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
        let token = self.token.load();
        let token = token.as_deref()?;
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()));
        let challenge = match given {
            Some(given) if same(given, token.as_bytes()) => return None,
            // RFC 6750: a request without credentials gets a bare challenge.
            None => "Bearer realm=\"consul-router admin\"",
            Some(_) => "Bearer realm=\"consul-router admin\", error=\"invalid_token\"",
        };
        let mut r = text(StatusCode::UNAUTHORIZED, "admin token required\n");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
        Some(r)
    }

    /// `/metrics`, rendered off the runtime's workers: it walks the whole table.
    async fn metrics_text(&self) -> Response<Full<Bytes>> {
        let (metrics, routes) = (self.metrics.clone(), self.routes.clone());
        match tokio::task::spawn_blocking(move || exposition::render(&metrics, &routes)).await {
            Ok(text) => with_type(
                StatusCode::OK,
                text.into(),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics\n"),
        }
    }

    /// `/api/routes`, serialised off the runtime's workers (the table may be large).
    async fn routes_json(&self) -> Response<Full<Bytes>> {
        let table = self.routes.load_full();
        let body = tokio::task::spawn_blocking(move || {
            serde_json::to_vec_pretty(&RoutesView::from(&*table))
        })
        .await;
        match body {
            Ok(Ok(body)) => with_type(StatusCode::OK, body.into(), "application/json"),
            _ => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot render routes\n"),
        }
    }

    /// `/api/stats`: request counters per routed service and the table's age, read from the
    /// metrics. Reused for [`STATS_FRESH`], so open pages do not multiply the work.
    async fn stats_json(&self) -> Response<Full<Bytes>> {
        let mut cache = self.stats_cache.lock().await;
        if let Some((made, body)) = &*cache {
            if made.elapsed() < STATS_FRESH {
                return with_type(StatusCode::OK, body.clone(), "application/json");
            }
        }
        let metrics = self.metrics.clone();
        let routes = self.routes.clone();
        let table = self.routes.load_full();
        let epoch = self.epoch;
        let body = tokio::task::spawn_blocking(move || {
            let at = epoch.elapsed().as_secs_f64();
            let view = StatsView::read(&exposition::render(&metrics, &routes), &table, at);
            serde_json::to_vec(&view)
        })
        .await;
        match body {
            Ok(Ok(body)) => {
                let body = Bytes::from(body);
                *cache = Some((Instant::now(), body.clone()));
                with_type(StatusCode::OK, body, "application/json")
            }
            _ => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot render stats\n"),
        }
    }
}

impl Handler for Admin {
    type Body = Full<Bytes>;
    async fn call(&self, req: Request<Incoming>, _peer: SocketAddr) -> Response<Full<Bytes>> {
        self.answer(req).await
    }
}

/// The credentials of an `Authorization: Bearer <token>` value (scheme in any case).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let rest = rest.trim_ascii();
    (!rest.is_empty()).then_some(rest)
}

/// Compares in time that depends only on the lengths, not on where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn page() -> Response<Full<Bytes>> {
    let mut r = with_type(
        StatusCode::OK,
        Bytes::from_static(PAGE.as_bytes()),
        "text/html; charset=utf-8",
    );
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
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
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Live data, possibly behind a token: never cached.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
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
    /// Who may call it, when its tags say.
    #[serde(skip_serializing_if = "Option::is_none")]
    access: Option<AccessView<'a>>,
    /// Statuses that count as an instance's failure (`router.outlier-5xx=`).
    outlier_5xx: String,
    /// `router.hash-balance-factor=`, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    hash_balance_factor: Option<u32>,
    instances: Vec<InstanceView<'a>>,
}

/// A service's `router.allow` lists and forward auth.
#[derive(Serialize)]
struct AccessView<'a> {
    allow: Vec<Vec<String>>,
    auth: Option<&'a str>,
    auth_headers: Vec<&'a str>,
    auth_cache_seconds: Option<f64>,
}

impl<'a> From<&'a Access> for AccessView<'a> {
    fn from(a: &'a Access) -> Self {
        AccessView {
            allow: a
                .allow
                .iter()
                .map(|l| l.iter().map(ToString::to_string).collect())
                .collect(),
            auth: a.auth.as_ref().map(|x| &*x.service),
            auth_headers: a
                .auth
                .iter()
                .flat_map(|x| x.copy.iter().map(|h| h.as_str()))
                .collect(),
            auth_cache_seconds: a
                .auth
                .as_ref()
                .and_then(|x| x.cache)
                .map(|d| d.as_secs_f64()),
        }
    }
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
    /// `router.proto=`: `http1`, `h2c` or `h2`.
    proto: &'static str,
    /// HTTP/2 instances: connections open and streams in flight on them.
    #[serde(skip_serializing_if = "Option::is_none")]
    h2_pool: Option<H2PoolView>,
    /// Seconds left of its outlier ejection; `None`: not ejected.
    ejected_for_seconds: Option<f64>,
    /// Outlier ejections so far.
    ejections: u64,
}

#[derive(Serialize)]
struct H2PoolView {
    connections: usize,
    streams: usize,
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
                access: svc.access.as_deref().map(AccessView::from),
                outlier_5xx: svc.outlier_5xx.describe(),
                hash_balance_factor: svc.hash_balance_factor(),
                instances: svc
                    .instances
                    .iter()
                    .enumerate()
                    .map(|(i, inst)| InstanceView {
                        ejected_for_seconds: ejected_for(svc, inst),
                        ejections: inst.state.outlier.ejections(),
                        id: &inst.id,
                        node: &inst.node,
                        address: &inst.address,
                        port: inst.port,
                        health: inst.health,
                        routable: i < svc.routable,
                        weight: inst.weight,
                        load: inst.load(),
                        in_flight: inst
                            .state
                            .in_flight
                            .load(std::sync::atomic::Ordering::Relaxed),
                        proto: inst.proto.as_str(),
                        h2_pool: inst.proto.is_h2().then(|| {
                            let (connections, streams) = inst.state.h2.usage();
                            H2PoolView {
                                connections,
                                streams,
                            }
                        }),
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

/// Seconds left of `inst`'s ejection, if it is ejected now.
fn ejected_for(svc: &Service, inst: &Instance) -> Option<f64> {
    let now = svc.stats.millis(Instant::now());
    let until = inst.state.outlier.ejected_until();
    (until > now).then(|| (until - now) as f64 / 1000.0)
}

const REQUESTS: &str = "consul_router_requests_total";
const TABLE_AGE: &str = "consul_router_routing_table_age_seconds";

/// `/api/stats` body. The page turns two answers into rates: `(requests₂ - requests₁) /
/// (at_seconds₂ - at_seconds₁)`.
#[derive(Serialize, Debug, PartialEq)]
struct StatsView {
    /// When the counters were read, in seconds on the admin's own clock.
    at_seconds: f64,
    /// The routing table's generation.
    generation: u64,
    /// `consul_router_routing_table_age_seconds`: since Consul last gave a usable answer.
    table_age_seconds: Option<f64>,
    /// Requests so far by service and status class (`[1xx, 2xx, 3xx, 4xx, 5xx]`), for the
    /// services in the table and `unknown` (requests no service took).
    requests: BTreeMap<String, [f64; 5]>,
}

impl StatsView {
    /// Picks the page's numbers out of the Prometheus text `metrics`.
    fn read(metrics: &str, table: &RoutingTable, at_seconds: f64) -> Self {
        let mut view = StatsView {
            at_seconds,
            generation: table.generation,
            table_age_seconds: None,
            requests: BTreeMap::new(),
        };
        for line in metrics.lines() {
            let wanted = line
                .strip_prefix(REQUESTS)
                .is_some_and(|rest| rest.starts_with('{'))
                || line
                    .strip_prefix(TABLE_AGE)
                    .is_some_and(|rest| rest.starts_with(' '));
            if !wanted {
                continue;
            }
            let Some(sample) = Sample::parse(line) else {
                continue;
            };
            if sample.name == TABLE_AGE {
                view.table_age_seconds = Some(sample.value);
                continue;
            }
            let (Some(service), Some(class)) = (sample.label("service"), sample.label("code"))
            else {
                continue;
            };
            let class = match class {
                "1xx" => 0,
                "2xx" => 1,
                "3xx" => 2,
                "4xx" => 3,
                "5xx" => 4,
                _ => continue,
            };
            if service != "unknown" && !table.services.contains_key(service) {
                continue;
            }
            let counts = view.requests.entry(service.to_owned()).or_default();
            counts[class] += sample.value;
        }
        view
    }
}

/// One sample line of Prometheus text.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    /// Label names and their values, unescaped.
    labels: Vec<(&'a str, String)>,
    value: f64,
}

impl<'a> Sample<'a> {
    /// Parses `name{label="value",...} value [timestamp]`; `None` for comments and
    /// malformed lines.
    fn parse(line: &'a str) -> Option<Self> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            rest = inner;
            loop {
                rest = rest.trim_start();
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let eq = rest.find('=')?;
                let key = rest[..eq].trim();
                rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
                let mut value = String::new();
                let mut chars = rest.char_indices();
                let end = loop {
                    let (i, c) = chars.next()?;
                    match c {
                        '"' => break i,
                        '\\' => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        c => value.push(c),
                    }
                };
                labels.push((key, value));
                rest = rest[end + 1..].trim_start();
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
        }
        let value = rest.split_whitespace().next()?.parse().ok()?;
        Some(Sample {
            name,
            labels,
            value,
        })
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic YWJj"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearerabc"), None);
    }

    #[test]
    fn same_compares_whole_values() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3creT"));
        assert!(!same(b"s3cret", b"s3cre"));
        assert!(!same(b"", b"x"));
    }

    #[test]
    fn samples_parse_with_escapes_and_any_label_order() {
        let s = Sample::parse(r#"consul_router_requests_total{code="2xx",service="a\"b\\c"} 12"#)
            .unwrap();
        assert_eq!(s.name, REQUESTS);
        assert_eq!(s.label("service"), Some("a\"b\\c"));
        assert_eq!(s.label("code"), Some("2xx"));
        assert_eq!(s.value, 12.0);
        let s = Sample::parse("consul_router_routing_table_age_seconds 0.25").unwrap();
        assert_eq!((s.name, s.value), (TABLE_AGE, 0.25));
        assert!(s.labels.is_empty());
        let s = Sample::parse("m{a=\"x\"} 3 1700000000000").unwrap();
        assert_eq!(s.value, 3.0);
        assert_eq!(Sample::parse("# TYPE m counter"), None);
        assert_eq!(Sample::parse("m{a=\"x} 3"), None);
        assert_eq!(Sample::parse("m{a=\"x\"}"), None);
        assert_eq!(Sample::parse(""), None);
    }

    #[test]
    fn stats_keep_table_services_and_unknown() {
        let table = RoutingTable::empty();
        let text = "\
# TYPE consul_router_requests_total counter
consul_router_requests_total{service=\"unknown\",code=\"4xx\"} 7
consul_router_requests_total{service=\"gone\",code=\"2xx\"} 5
consul_router_requests_total_other{service=\"unknown\",code=\"2xx\"} 5
consul_router_routing_table_age_seconds 1.5
consul_router_routing_table_age_seconds_other 9
";
        let v = StatsView::read(text, &table, 3.0);
        assert_eq!(v.table_age_seconds, Some(1.5));
        assert_eq!(v.at_seconds, 3.0);
        assert_eq!(v.requests.len(), 1);
        assert_eq!(v.requests["unknown"], [0.0, 0.0, 0.0, 7.0, 0.0]);
    }
}
