//! Test harness: a real `consul agent -dev` on free loopback ports, real HTTP backends on
//! 127.0.0.1:0, an in-process router, and a small HTTP client.
#![allow(dead_code)]

pub mod fake_consul;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use consul_router::config::{Config, Overrides};
use consul_router::consul::types::{Registration, TtlCheck, Weights};
use consul_router::consul::ConsulClient;
use consul_router::Running;

/// Where the `consul` binary is: $CONSUL_BIN, the cache scripts/get-consul.sh fills, or PATH.
pub fn consul_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CONSUL_BIN") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("CONSUL_ROUTER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/consul-router")
        });
    let version = std::env::var("CONSUL_VERSION").unwrap_or_else(|_| "v1.22.3".into());
    let cached = cache.join(format!("consul-{version}")).join("consul");
    if cached.exists() {
        return cached;
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("consul");
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "these tests need a real Consul agent and no `consul` binary was found.\n\
         Build one from the Go module proxy with `scripts/get-consul.sh` (cached in \
         ~/.cache/consul-router), or set CONSUL_BIN=/path/to/consul. `scripts/test.sh` does this for you."
    );
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A `consul agent -dev` of our own; killed on drop.
pub struct ConsulAgent {
    child: Option<Child>,
    pub http_port: u16,
    ports: [u16; 3],
    node: String,
    pub client: ConsulClient,
}

impl ConsulAgent {
    /// A dev agent on free ports. Ports are found free and then released, so a test
    /// running beside may take one first: an agent that exits, or has no leader in time,
    /// is tried again on other ports.
    pub async fn start() -> ConsulAgent {
        for limit in [30, 30, 60] {
            let ports = [free_port(), free_port(), free_port()];
            let limit = Duration::from_secs(limit);
            if let Some(agent) = Self::try_start_on(free_port(), ports, limit).await {
                return agent;
            }
        }
        panic!("no consul dev agent got a leader in 3 tries");
    }

    async fn start_on(http_port: u16, ports: [u16; 3]) -> ConsulAgent {
        Self::try_start_on(http_port, ports, Duration::from_secs(60))
            .await
            .expect("timed out waiting for consul leader")
    }

    /// Starts an agent and waits up to `limit` for its leader (generous: a loaded 2-core
    /// machine starting several dev agents at once is slow); `None` if it exited first or
    /// had none by then (it is killed).
    async fn try_start_on(http_port: u16, ports: [u16; 3], limit: Duration) -> Option<ConsulAgent> {
        let node = format!("t{http_port}");
        let child = Command::new(consul_bin())
            .args([
                "agent",
                "-dev",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
            ])
            .args(["-http-port", &http_port.to_string()])
            .args(["-server-port", &ports[0].to_string()])
            .args(["-serf-lan-port", &ports[1].to_string()])
            .args(["-serf-wan-port", &ports[2].to_string()])
            .args([
                "-dns-port",
                "-1",
                "-grpc-port",
                "-1",
                "-hcl",
                "ports { grpc_tls = -1 }",
            ])
            .args(["-node", &node, "-log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start consul agent");
        let client = ConsulClient::new(&consul_config(http_port)).expect("consul client");
        let mut agent = ConsulAgent {
            child: Some(child),
            http_port,
            ports,
            node,
            client,
        };
        let deadline = Instant::now() + limit;
        loop {
            let up = agent.client.leader().await.is_ok_and(|l| !l.is_empty())
                && agent
                    .client
                    .health_service("consul", 0, Duration::ZERO)
                    .await
                    .is_ok();
            if up {
                return Some(agent);
            }
            let exited = agent
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                eprintln!("consul dev agent on port {http_port}: no leader (exited: {exited})");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Kills the agent (all its state is in memory, so it is gone).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a fresh agent on the same ports.
    pub async fn restart(&mut self) {
        self.kill();
        let fresh = Self::start_on(self.http_port, self.ports).await;
        *self = fresh;
    }

    /// Registers `id` of service `name` at 127.0.0.1:`port`.
    pub async fn register(&self, name: &str, id: &str, port: u16, tags: &[&str]) {
        self.register_with(Registration {
            id: id.into(),
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            address: "127.0.0.1".into(),
            port,
            ..Default::default()
        })
        .await;
    }

    /// Registers with a TTL check (initially `status`) named `<id>-ttl`.
    pub async fn register_ttl(&self, name: &str, id: &str, port: u16, status: &str) {
        self.register_with(Registration {
            id: id.into(),
            name: name.into(),
            address: "127.0.0.1".into(),
            port,
            check: Some(TtlCheck {
                check_id: format!("{id}-ttl"),
                ttl: "10m".into(),
                status: status.into(),
                deregister_after: None,
            }),
            ..Default::default()
        })
        .await;
    }

    pub async fn register_meta(
        &self,
        name: &str,
        id: &str,
        port: u16,
        meta: &[(&str, &str)],
        weights: Option<(u32, u32)>,
    ) {
        self.register_with(Registration {
            id: id.into(),
            name: name.into(),
            address: "127.0.0.1".into(),
            port,
            meta: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            weights: weights.map(|(passing, warning)| Weights { passing, warning }),
            ..Default::default()
        })
        .await;
    }

    pub async fn register_with(&self, reg: Registration) {
        self.client.register(&reg).await.expect("register");
    }

    /// Registers through the catalog API (`PUT /v1/catalog/register`), as a host's agent
    /// would for its node: each body names a node (any name and address, with no agent
    /// behind it) and a service and checks, or node checks. Sent in order on one keep-alive
    /// connection.
    pub async fn catalog_register(&self, bodies: &[serde_json::Value]) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.http_port));
        let mut sender = open(addr).await;
        for body in bodies {
            let req = Request::put("/v1/catalog/register")
                .header("host", "consul")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            sender.ready().await.expect("consul connection");
            let got = send_on(&mut sender, req, Duration::from_secs(30)).await;
            assert_eq!(got.status, StatusCode::OK, "catalog register: {}", got.body);
        }
    }

    pub async fn set_check(&self, id: &str, status: &str) {
        self.client
            .update_check(&format!("{id}-ttl"), status, "set by test")
            .await
            .expect("update check");
    }

    pub async fn deregister(&self, id: &str) {
        self.client.deregister(id).await.expect("deregister");
    }
}

impl Drop for ConsulAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn consul_config(http_port: u16) -> consul_router::config::ConsulConfig {
    let o = Overrides {
        consul: Some(format!("http://127.0.0.1:{http_port}")),
        ..Default::default()
    };
    Config::from_file(Default::default(), &o).unwrap().consul
}

/// Router config on free ports for the Consul at `consul_url`.
pub fn router_config(consul_url: &str, toml: &str) -> Config {
    let file = Config::parse_file(toml, std::path::Path::new("test.toml")).expect("test toml");
    let o = Overrides {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        consul: Some(consul_url.into()),
        ..Default::default()
    };
    Config::from_file(file, &o).expect("test config")
}

/// Starts a router with `toml` (domains default to app.test) and waits until it is live.
pub async fn start_router(consul_url: &str, toml: &str) -> Running {
    let toml = if toml.contains("domains") {
        toml.to_owned()
    } else {
        format!("domains = [\"app.test\"]\n{toml}")
    };
    let r = consul_router::start(router_config(consul_url, &toml))
        .await
        .expect("router start");
    let admin = r.admin_addr;
    wait_until(Duration::from_secs(20), "router live", || async move {
        get_admin(admin, "/healthz").await.0 == StatusCode::OK
    })
    .await;
    r
}

/// Runs `cmd` to its end off the runtime's threads: its exit status (-1 if killed by a
/// signal) and its standard output followed by its standard error.
pub async fn output(mut cmd: Command) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let out = cmd.output().expect("run the command");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    })
    .await
    .expect("command task")
}

/// Polls `cond` every 20 ms until true; panics after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// The sum over outcomes of `consul_router_consul_requests_total{endpoint}` in a `/metrics`
/// text: the router's requests to Consul on that endpoint.
pub fn consul_requests(metrics: &str, endpoint: &str) -> u64 {
    let label = format!("endpoint=\"{endpoint}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("consul_router_consul_requests_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
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

/// Serves HTTP/1.1 (upgrades allowed) on `listener`, one task per connection, until aborted.
pub fn serve_http<F, Fut, B>(listener: TcpListener, handler: F) -> tokio::task::JoinHandle<()>
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
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(h))
                    .with_upgrades()
                    .await;
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
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let n = name.to_owned();
        let task = serve_http(listener, move |req| backend_answer(n.clone(), req));
        Backend {
            name: name.into(),
            addr,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
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

/// `systemd-analyze`: on PATH, else installed from Debian's `systemd` package when running
/// as root; otherwise the test fails saying how to get it.
pub fn systemd_analyze() -> PathBuf {
    let found = |name: &str| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    };
    if let Some(p) = found("systemd-analyze") {
        return p;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let how = "install it (Debian/Ubuntu: `apt-get install systemd`)";
    assert!(
        root,
        "systemd-analyze is not installed and this test is not root: {how}"
    );
    assert!(
        found("apt-get").is_some(),
        "systemd-analyze is not installed and there is no apt-get: {how}"
    );
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let install = ["install", "-y", "--no-install-recommends", "systemd"];
    let installed = apt(&install) || (apt(&["update"]) && apt(&install));
    assert!(
        installed,
        "systemd-analyze is not installed and `apt-get install systemd` failed: {how}"
    );
    found("systemd-analyze").expect("systemd-analyze after installing systemd")
}

/// `systemd-analyze verify` on `unit` (a unit file named `consul-router*`): the exit
/// status, and the output lines that name it (its warnings, e.g. an unknown key,
/// leave the exit status 0).
pub fn verify(analyze: &std::path::Path, unit: &std::path::Path) -> (bool, Vec<String>) {
    let out = Command::new(analyze)
        .arg("verify")
        .arg(unit)
        .current_dir(unit.parent().unwrap())
        .output()
        .expect("run systemd-analyze");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let about_ours = text
        .lines()
        .filter(|l| l.contains("consul-router"))
        .map(str::to_owned)
        .collect();
    (out.status.success(), about_ours)
}
