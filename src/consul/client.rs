//! A small typed Consul HTTP client on hyper-util's pooled client (http or https).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::config::ConsulConfig;

use super::types::{Check, HealthEntry, Node, NodeServices, Registration};

/// Largest response body we accept from Consul (the full catalog at scale stays far below).
const MAX_BODY: usize = 256 * 1024 * 1024;

/// A failed Consul request.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// Could not connect or the connection broke.
    #[error("consul request failed: {0}")]
    Transport(String),
    /// No answer in time.
    #[error("consul request timed out")]
    Timeout,
    /// Consul answered with an error status (500 when it has no leader, 403 for ACLs...).
    #[error("consul returned {status}: {body}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// Start of the body.
        body: String,
    },
    /// The body was not the JSON we expect.
    #[error("consul returned unreadable JSON: {0}")]
    Decode(String),
    /// Bad client settings.
    #[error("consul client: {0}")]
    Setup(String),
}

/// A response to a (possibly blocking) query.
#[derive(Debug)]
pub struct Indexed<T> {
    /// The decoded body.
    pub value: T,
    /// `X-Consul-Index`, 0 if absent.
    pub index: u64,
}

/// The client. Cheap to clone; clones share the connection pool and the current agent.
#[derive(Clone, Debug)]
pub struct ConsulClient {
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Every agent's base URL, in the configured order.
    bases: Arc<[String]>,
    /// Which agent requests go to now: the first that did not fail.
    current: Arc<AtomicUsize>,
    /// An answer was filtered by ACLs and this was logged.
    acl_warned: Arc<AtomicBool>,
    token: Option<HeaderValue>,
    datacenter: Option<String>,
    stale: bool,
}

impl ConsulClient {
    /// Builds a client for `cfg` (https uses `cfg.ca_file` or the webpki roots).
    pub fn new(cfg: &ConsulConfig) -> Result<Self, ConsulError> {
        let tls = crate::tls::client_config(cfg.ca_file.as_deref())
            .map_err(|e| ConsulError::Setup(e.to_string()))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let token = cfg
            .token
            .as_deref()
            .map(HeaderValue::from_str)
            .transpose()
            .map_err(|_| ConsulError::Setup("token is not a valid header value".into()))?;
        let bases: Vec<String> = cfg
            .addresses()
            .map(|a| a.to_string().trim_end_matches('/').to_owned())
            .collect();
        Ok(ConsulClient {
            http,
            bases: bases.into(),
            current: Arc::new(AtomicUsize::new(0)),
            acl_warned: Arc::new(AtomicBool::new(false)),
            token,
            datacenter: cfg.datacenter.clone(),
            stale: cfg.stale,
        })
    }

    /// The agent requests go to now.
    pub fn current_address(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed);
        &self.bases[i.min(self.bases.len() - 1)]
    }

    /// Whether requests go to an agent other than the first.
    pub fn on_fallback(&self) -> bool {
        self.current.load(Ordering::Relaxed) != 0
    }

    /// Asks the first agent for its leader directly; when it has one, requests go back to
    /// it. Returns whether they do.
    pub async fn probe_first(&self) -> bool {
        if !self.on_fallback() {
            return true;
        }
        let r = self
            .get_at::<String>(0, "/v1/status/leader", 0, Duration::ZERO, false)
            .await;
        count("/v1/status/leader", &r);
        match r {
            Ok(leader) if !leader.value.is_empty() => {
                self.switch_to(0, "the first agent answers again");
                true
            }
            _ => false,
        }
    }

    /// After a failure on agent `failed`: the next one, if `failed` is still current (the
    /// loops fail together when an agent goes away; only the first moves on).
    fn failed_over(&self, failed: usize, why: &ConsulError) {
        let n = self.bases.len();
        let agent_down = match why {
            ConsulError::Transport(_) | ConsulError::Timeout => true,
            ConsulError::Status { status, .. } => status.is_server_error(),
            ConsulError::Decode(_) | ConsulError::Setup(_) => false,
        };
        if n < 2 || !agent_down {
            return;
        }
        let next = (failed + 1) % n;
        if self
            .current
            .compare_exchange(failed, next, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(from = %self.bases[failed], to = %self.bases[next], error = %why, "consul agent failed; switching");
            metrics::counter!("consul_router_consul_server_switches_total").increment(1);
            set_current_gauge(&self.bases, next);
        }
    }

    fn switch_to(&self, to: usize, why: &str) {
        let from = self.current.swap(to, Ordering::AcqRel);
        if from != to {
            tracing::info!(from = %self.bases[from], to = %self.bases[to], "{why}; switching back");
            metrics::counter!("consul_router_consul_server_switches_total").increment(1);
            set_current_gauge(&self.bases, to);
        }
    }

    /// `GET /v1/catalog/services`: every service name with the union of its tags.
    pub async fn catalog_services(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<Indexed<HashMap<String, Vec<String>>>, ConsulError> {
        self.query("/v1/catalog/services", index, wait).await
    }

    /// `GET /v1/catalog/services?consistent`: the leader's own answer, to confirm a suspicious
    /// stale one before it is applied.
    pub async fn catalog_services_consistent(
        &self,
    ) -> Result<Indexed<HashMap<String, Vec<String>>>, ConsulError> {
        self.query_with("/v1/catalog/services?consistent", 0, Duration::ZERO, false)
            .await
    }

    /// `GET /v1/health/service/<name>`: the service's instances with node and checks.
    pub async fn health_service(
        &self,
        name: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Indexed<Vec<HealthEntry>>, ConsulError> {
        let mut path = String::from("/v1/health/service/");
        encode_segment(name, &mut path);
        self.query(&path, index, wait).await
    }

    /// `GET /v1/catalog/nodes`: every node in the datacenter (a plain read).
    pub async fn catalog_nodes(&self) -> Result<Indexed<Vec<Node>>, ConsulError> {
        self.query("/v1/catalog/nodes", 0, Duration::ZERO).await
    }

    /// `GET /v1/catalog/node-services/<node>`: the node and its service instances (a plain
    /// read). A node that is gone gives `Node: None`, whether Consul says so with null or 404.
    pub async fn node_services(&self, node: &str) -> Result<Indexed<NodeServices>, ConsulError> {
        let mut path = String::from("/v1/catalog/node-services/");
        encode_segment(node, &mut path);
        match self.query(&path, 0, Duration::ZERO).await {
            Err(ConsulError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                Ok(Indexed {
                    value: NodeServices::default(),
                    index: 0,
                })
            }
            r => r,
        }
    }

    /// `GET /v1/health/state/any`: every check in the datacenter.
    pub async fn health_state_any(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<Indexed<Vec<Check>>, ConsulError> {
        self.query("/v1/health/state/any", index, wait).await
    }

    /// `GET /v1/status/leader`: the leader's address, empty while there is none.
    pub async fn leader(&self) -> Result<String, ConsulError> {
        Ok(self
            .query("/v1/status/leader", 0, Duration::ZERO)
            .await?
            .value)
    }

    /// `PUT /v1/agent/service/register`.
    pub async fn register(&self, reg: &Registration) -> Result<(), ConsulError> {
        let body = serde_json::to_vec(reg).map_err(|e| ConsulError::Decode(e.to_string()))?;
        self.send(Method::PUT, "/v1/agent/service/register", body)
            .await
    }

    /// `GET /v1/agent/service/<id>`: whether the local agent has the service (false on 404).
    pub async fn has_agent_service(&self, id: &str) -> Result<bool, ConsulError> {
        let mut path = String::from("/v1/agent/service/");
        encode_segment(id, &mut path);
        // An agent endpoint: the local agent answers, never a stale server.
        match self
            .query_with::<serde::de::IgnoredAny>(&path, 0, Duration::ZERO, false)
            .await
        {
            Ok(_) => Ok(true),
            Err(ConsulError::Status { status, .. }) if status == StatusCode::NOT_FOUND => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `PUT /v1/agent/service/deregister/<id>`.
    pub async fn deregister(&self, id: &str) -> Result<(), ConsulError> {
        let mut path = String::from("/v1/agent/service/deregister/");
        encode_segment(id, &mut path);
        self.send(Method::PUT, &path, Vec::new()).await
    }

    /// `PUT /v1/agent/check/update/<id>` with a status (passing, warning, critical).
    pub async fn update_check(
        &self,
        id: &str,
        status: &str,
        output: &str,
    ) -> Result<(), ConsulError> {
        let mut path = String::from("/v1/agent/check/update/");
        encode_segment(id, &mut path);
        let body = serde_json::json!({ "Status": status, "Output": output });
        self.send(Method::PUT, &path, body.to_string().into_bytes())
            .await
    }

    /// A GET, blocking when `index > 0` (never block on 0: Consul would answer at once).
    async fn query<T: DeserializeOwned>(
        &self,
        path: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Indexed<T>, ConsulError> {
        self.query_with(path, index, wait, self.stale).await
    }

    async fn query_with<T: DeserializeOwned>(
        &self,
        path: &str,
        index: u64,
        wait: Duration,
        stale: bool,
    ) -> Result<Indexed<T>, ConsulError> {
        let r = self.get(path, index, wait, stale).await;
        count(path, &r);
        r
    }

    /// A GET to the current agent; a transport failure, a timeout or a 5xx moves on to the
    /// next agent for the requests that follow.
    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        index: u64,
        wait: Duration,
        stale: bool,
    ) -> Result<Indexed<T>, ConsulError> {
        let at = self
            .current
            .load(Ordering::Relaxed)
            .min(self.bases.len() - 1);
        let r = self.get_at(at, path, index, wait, stale).await;
        if let Err(e) = &r {
            self.failed_over(at, e);
        }
        r
    }

    async fn get_at<T: DeserializeOwned>(
        &self,
        at: usize,
        path: &str,
        index: u64,
        wait: Duration,
        stale: bool,
    ) -> Result<Indexed<T>, ConsulError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut url = format!("{}{}{}", self.bases[at], path, sep);
        if index > 0 {
            let _ = write!(url, "index={index}&wait={}ms&", wait.as_millis());
        }
        if stale {
            url.push_str("stale&");
        }
        if let Some(dc) = &self.datacenter {
            url.push_str("dc=");
            encode_segment(dc, &mut url);
        }
        let url = url.trim_end_matches(['&', '?']);
        // Consul adds up to wait/16 of jitter; leave room beyond that before giving up.
        let limit = if index > 0 {
            wait + wait / 16 + Duration::from_secs(10)
        } else {
            Duration::from_secs(30)
        };
        let (status, headers, body) =
            tokio::time::timeout(limit, self.exchange(Method::GET, url, Vec::new()))
                .await
                .map_err(|_| ConsulError::Timeout)??;
        check_status(status, &body)?;
        if headers
            .get("x-consul-results-filtered-by-acls")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
            && !self.acl_warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                endpoint = endpoint(path),
                "Consul left out results the token may not read (X-Consul-Results-Filtered-By-ACLs); \
                 give the router's token service:read and node:read, or some services stay unrouted"
            );
            metrics::counter!("consul_router_consul_acl_filtered_total").increment(1);
        }
        let index = headers
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let value =
            serde_json::from_slice(&body).map_err(|e| ConsulError::Decode(e.to_string()))?;
        Ok(Indexed { value, index })
    }

    /// Writes go to the current agent and never move on: they are the announcer's, which
    /// registers with its own local agent.
    async fn send(&self, method: Method, path: &str, body: Vec<u8>) -> Result<(), ConsulError> {
        let url = format!("{}{}", self.current_address(), path);
        let r =
            match tokio::time::timeout(Duration::from_secs(30), self.exchange(method, &url, body))
                .await
            {
                Err(_) => Err(ConsulError::Timeout),
                Ok(Err(e)) => Err(e),
                Ok(Ok((status, _, body))) => check_status(status, &body),
            };
        count(path, &r);
        r
    }

    async fn exchange(
        &self,
        method: Method,
        url: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), ConsulError> {
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .header(header::ACCEPT, "application/json");
        if let Some(t) = &self.token {
            req = req.header("x-consul-token", t.clone());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ConsulError::Setup(e.to_string()))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| ConsulError::Transport(error_chain(&e)))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| ConsulError::Transport(e.to_string()))?
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    }
}

/// `consul_router_consul_server{address}` is 1 for the agent in use, 0 for the others.
fn set_current_gauge(bases: &[String], current: usize) {
    for (i, b) in bases.iter().enumerate() {
        metrics::gauge!("consul_router_consul_server", "address" => b.clone())
            .set(if i == current { 1.0 } else { 0.0 });
    }
}

/// The endpoint label for a request path: its API route without the parts that name a
/// service or an ID, so the label set stays bounded.
fn endpoint(path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or(path);
    match path {
        "/v1/catalog/services" => "catalog_services",
        "/v1/catalog/nodes" => "catalog_nodes",
        "/v1/health/state/any" => "health_state",
        "/v1/status/leader" => "status_leader",
        "/v1/agent/service/register" => "agent_register",
        p if p.starts_with("/v1/health/service/") => "health_service",
        p if p.starts_with("/v1/catalog/node-services/") => "node_services",
        p if p.starts_with("/v1/agent/service/deregister/") => "agent_deregister",
        p if p.starts_with("/v1/agent/check/update/") => "agent_check_update",
        p if p.starts_with("/v1/agent/service/") => "agent_service",
        _ => "other",
    }
}

/// Counts one Consul request by endpoint and outcome.
fn count<T>(path: &str, r: &Result<T, ConsulError>) {
    let outcome = match r {
        Ok(_) => "ok",
        Err(ConsulError::Timeout) => "timeout",
        Err(ConsulError::Transport(_)) => "transport_error",
        Err(ConsulError::Status { .. }) => "status_error",
        Err(ConsulError::Decode(_)) => "decode_error",
        Err(ConsulError::Setup(_)) => "setup_error",
    };
    metrics::counter!(
        "consul_router_consul_requests_total",
        "endpoint" => endpoint(path),
        "outcome" => outcome
    )
    .increment(1);
}

fn check_status(status: StatusCode, body: &[u8]) -> Result<(), ConsulError> {
    if status.is_success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(200)])
        .trim()
        .to_owned();
    Err(ConsulError::Status { status, body: text })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let _ = write!(s, ": {cause}");
        src = cause.source();
    }
    s
}

/// Percent-encodes one path segment or query value.
fn encode_segment(raw: &str, out: &mut String) {
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_labels_are_bounded() {
        assert_eq!(endpoint("/v1/health/service/web%20app"), "health_service");
        assert_eq!(
            endpoint("/v1/catalog/services?consistent"),
            "catalog_services"
        );
        assert_eq!(
            endpoint("/v1/agent/service/deregister/x-1"),
            "agent_deregister"
        );
        assert_eq!(endpoint("/v1/agent/service/x-1"), "agent_service");
        assert_eq!(endpoint("/v1/catalog/nodes"), "catalog_nodes");
        assert_eq!(
            endpoint("/v1/catalog/node-services/host%201"),
            "node_services"
        );
        assert_eq!(endpoint("/v1/kv/x"), "other");
    }

    #[test]
    fn agent_failures_move_on_once_and_others_do_not() {
        let o = crate::config::Overrides {
            consul: Some("http://a:1,http://b:2,http://c:3".into()),
            ..Default::default()
        };
        let cfg = crate::config::Config::from_file(Default::default(), &o).unwrap();
        let c = ConsulClient::new(&cfg.consul).unwrap();
        let other = c.clone();
        assert_eq!(c.current_address(), "http://a:1");
        let status = |code: u16| ConsulError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            body: String::new(),
        };
        c.failed_over(0, &ConsulError::Decode("x".into()));
        c.failed_over(0, &status(403));
        assert_eq!(c.current_address(), "http://a:1", "the agent answered");
        c.failed_over(0, &ConsulError::Transport("refused".into()));
        // A second loop that failed on the same agent does not skip the next one.
        c.failed_over(0, &ConsulError::Timeout);
        assert_eq!(other.current_address(), "http://b:2", "clones share it");
        c.failed_over(1, &status(500));
        c.failed_over(2, &ConsulError::Timeout);
        assert_eq!(c.current_address(), "http://a:1", "round again");
        assert!(!c.on_fallback());
    }

    #[test]
    fn encodes_segments() {
        let mut s = String::new();
        encode_segment("web app/1", &mut s);
        assert_eq!(s, "web%20app%2F1");
    }
}
