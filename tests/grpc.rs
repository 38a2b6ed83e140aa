//! gRPC end to end through the router: a real tonic server (hand-written service, no
//! codegen) registered in a real Consul agent with `router.proto=h2c`, and a real tonic
//! client over HTTP/2 to the router. Unary, server stream, bidirectional stream, error
//! statuses and trailers, deadlines (`grpc-timeout`) the router enforces itself (the
//! backend here does not), a backend killed mid-stream, quiet streams longer than
//! `proxy.response_timeout`, and 10,000 messages each way with the router's memory flat.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use http::Uri;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt};
use tonic::body::BoxBody;
use tonic::codec::{ProstCodec, Streaming};
use tonic::{Code, Request, Response, Status};

use common::consul::ConsulAgent;
use common::metrics::{metrics, sample};
use common::router::{start_router, wait_routable, RouterProcess};
use common::wait::wait_until;

/// The one message type, both ways.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(uint64, tag = "1")]
    pub n: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
}

fn msg(n: u64, size: usize) -> Msg {
    Msg {
        n,
        data: vec![b'x'; size],
    }
}

const HOST: &str = "grpc.app.test";
const LIMIT: Duration = Duration::from_secs(20);

type BoxStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;
type BoxFut<T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send>>;

// ---- the server: one hand-written service, paths dispatched by hand ----

/// `/t.Echo/Unary`: the message back, plus its request's `te` and `:authority` as
/// response metadata. `/t.Echo/Fail`: PERMISSION_DENIED with a message and a trailer.
/// `/t.Echo/Slow`: answers after 30 s.
#[derive(Clone)]
struct Unary(&'static str);

impl tonic::server::UnaryService<Msg> for Unary {
    type Response = Msg;
    type Future = BoxFut<Msg>;
    fn call(&mut self, req: Request<Msg>) -> Self::Future {
        let which = self.0;
        Box::pin(async move {
            match which {
                "fail" => {
                    let mut s = Status::new(Code::PermissionDenied, "not you, ünïcode");
                    s.metadata_mut()
                        .insert("x-why", "policy".parse().expect("metadata"));
                    Err(s)
                }
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(Response::new(req.into_inner()))
                }
                _ => {
                    let te = req
                        .metadata()
                        .get("te")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let conn = req.metadata().get("connection").is_some();
                    let mut r = Response::new(req.into_inner());
                    r.metadata_mut().insert("x-te", te.parse().expect("te"));
                    r.metadata_mut().insert(
                        "x-conn",
                        if conn { "yes" } else { "no" }.parse().expect("c"),
                    );
                    Ok(r)
                }
            }
        })
    }
}

/// `/t.Echo/Count`: `n` messages of the request's size (`n` from the request), `gap`
/// apart, then OK; for `/t.Echo/Hang`, then a wait that never ends; for
/// `/t.Echo/CountFail`, then RESOURCE_EXHAUSTED in the trailers.
#[derive(Clone)]
struct Count {
    gap: Duration,
    end: End,
}

#[derive(Clone, Copy, PartialEq)]
enum End {
    Ok,
    Hang,
    Fail,
}

impl tonic::server::ServerStreamingService<Msg> for Count {
    type Response = Msg;
    type ResponseStream = BoxStream;
    type Future = BoxFut<BoxStream>;
    fn call(&mut self, req: Request<Msg>) -> Self::Future {
        let Count { gap, end } = self.clone();
        let m = req.into_inner();
        let size = m.data.len();
        Box::pin(async move {
            let s = async_stream(m.n, size, gap, end);
            Ok(Response::new(s))
        })
    }
}

fn async_stream(n: u64, size: usize, gap: Duration, end: End) -> BoxStream {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for i in 0..n {
            if i > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            if tx.send(Ok(msg(i, size))).await.is_err() {
                return;
            }
        }
        match end {
            End::Ok => {}
            End::Hang => tokio::time::sleep(Duration::from_secs(3600)).await,
            End::Fail => {
                let _ = tx.send(Err(Status::resource_exhausted("quota gone"))).await;
            }
        }
        drop(tx);
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// `/t.Echo/Bidi`: every message back as it comes, `n` plus one.
#[derive(Clone)]
struct Bidi;

impl tonic::server::StreamingService<Msg> for Bidi {
    type Response = Msg;
    type ResponseStream = BoxStream;
    type Future = BoxFut<BoxStream>;
    fn call(&mut self, req: Request<Streaming<Msg>>) -> Self::Future {
        let mut inbound = req.into_inner();
        Box::pin(async move {
            let out = async_stream_map(move |tx| async move {
                while let Some(m) = inbound.next().await {
                    let reply = m.map(|mut m| {
                        m.n += 1;
                        m
                    });
                    if tx.send(reply).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(out))
        })
    }
}

fn async_stream_map<F, Fut>(f: F) -> BoxStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Msg, Status>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A gRPC backend on 127.0.0.1:0 (HTTP/2 prior knowledge) whose connections can all be
/// killed at once, like a process that died.
struct GrpcBackend {
    addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl GrpcBackend {
    async fn start(gap: Duration) -> GrpcBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conns = Arc::new(Mutex::new(Vec::new()));
        let kept = conns.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let task = tokio::spawn(async move {
                    let svc = service_fn(move |req| route(req, gap));
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                kept.lock().expect("conns").push(task.abort_handle());
            }
        });
        GrpcBackend {
            addr,
            accept,
            conns,
        }
    }

    /// Drops every connection and stops listening.
    fn kill(&self) {
        self.accept.abort();
        for c in self.conns.lock().expect("conns").drain(..) {
            c.abort();
        }
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn route(
    req: http::Request<Incoming>,
    gap: Duration,
) -> Result<http::Response<BoxBody>, Infallible> {
    let codec = ProstCodec::<Msg, Msg>::default();
    let mut g = tonic::server::Grpc::new(codec);
    let path = req.uri().path().to_owned();
    Ok(match path.as_str() {
        "/t.Echo/Unary" => g.unary(Unary("echo"), req).await,
        "/t.Echo/Fail" => g.unary(Unary("fail"), req).await,
        "/t.Echo/Slow" => g.unary(Unary("slow"), req).await,
        "/t.Echo/Count" => g.server_streaming(Count { gap, end: End::Ok }, req).await,
        "/t.Echo/Hang" => {
            g.server_streaming(
                Count {
                    gap,
                    end: End::Hang,
                },
                req,
            )
            .await
        }
        "/t.Echo/CountFail" => {
            g.server_streaming(
                Count {
                    gap,
                    end: End::Fail,
                },
                req,
            )
            .await
        }
        "/t.Echo/Bidi" => g.streaming(Bidi, req).await,
        _ => Status::unimplemented(path).into_http(),
    })
}

// ---- the client: tonic's Grpc over one hyper HTTP/2 connection to the router ----

#[derive(Clone)]
struct Chan(hyper::client::conn::http2::SendRequest<BoxBody>);

impl tower_service::Service<http::Request<BoxBody>> for Chan {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<BoxBody>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

type Client = tonic::client::Grpc<Chan>;

/// A gRPC client to the router at `router`, with `:authority` grpc.app.test.
async fn client(router: SocketAddr) -> Client {
    client_for(router, "http://grpc.app.test").await
}

/// A gRPC client to the router at `router` for `origin`'s host.
async fn client_for(router: SocketAddr, origin: &'static str) -> Client {
    let stream = TcpStream::connect(router).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let origin = Uri::from_static(origin);
    tonic::client::Grpc::with_origin(Chan(sender), origin)
}

fn codec() -> ProstCodec<Msg, Msg> {
    ProstCodec::default()
}

async fn unary(
    c: &mut Client,
    path: &'static str,
    req: Request<Msg>,
) -> Result<Response<Msg>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    c.unary(req, PathAndQuery::from_static(path), codec()).await
}

async fn server_stream(
    c: &mut Client,
    path: &'static str,
    req: Request<Msg>,
) -> Result<Streaming<Msg>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    Ok(
        c.server_streaming(req, PathAndQuery::from_static(path), codec())
            .await?
            .into_inner(),
    )
}

/// `/t.Echo/Count` read to its clean end, each message in order: how many came.
async fn count_all(c: &mut Client, req: Request<Msg>) -> u64 {
    let mut stream = bounded("count", server_stream(c, "/t.Echo/Count", req))
        .await
        .expect("server stream");
    let mut n = 0;
    while let Some(m) = bounded("count message", stream.message())
        .await
        .expect("message")
    {
        assert_eq!(m.n, n);
        n += 1;
    }
    n
}

/// A `/t.Echo/Bidi` call: where to send (a channel of `room` messages) and the replies.
async fn bidi(c: &mut Client, room: usize) -> (tokio::sync::mpsc::Sender<Msg>, Streaming<Msg>) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(room);
    c.ready().await.expect("ready");
    let replies = c
        .streaming(
            Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            PathAndQuery::from_static("/t.Echo/Bidi"),
            codec(),
        )
        .await
        .expect("bidi call")
        .into_inner();
    (tx, replies)
}

/// A `/t.Echo/Hang` call with its two messages read: the backend holds it open after them.
async fn hanging_stream(c: &mut Client) -> Streaming<Msg> {
    let mut stream = bounded(
        "hang",
        server_stream(c, "/t.Echo/Hang", Request::new(msg(2, 8))),
    )
    .await
    .expect("stream");
    for _ in 0..2 {
        bounded("first messages", stream.message())
            .await
            .expect("message")
            .expect("some");
    }
    stream
}

/// Bounded: a call that hangs fails the test instead.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {LIMIT:?}"))
}

struct Setup {
    _consul: ConsulAgent,
    backend: GrpcBackend,
    router: consul_router::Running,
}

async fn setup(toml: &str, gap: Duration) -> Setup {
    let consul = ConsulAgent::start().await;
    let backend = GrpcBackend::start(gap).await;
    consul
        .register("grpc", "grpc-1", backend.addr.port(), &["router.proto=h2c"])
        .await;
    let router = start_router(&consul.addr(), toml).await;
    wait_routable(&router, HOST).await;
    Setup {
        _consul: consul,
        backend,
        router,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_streams_and_error_trailers() {
    let s = setup("", Duration::ZERO).await;
    let mut c = client(s.router.proxy_addr).await;

    // Unary: the message back; the backend got `te: trailers` and no connection field.
    let got = bounded(
        "unary",
        unary(&mut c, "/t.Echo/Unary", Request::new(msg(7, 100))),
    )
    .await
    .expect("unary call");
    assert_eq!(got.get_ref(), &msg(7, 100));
    assert_eq!(got.metadata().get("x-te").unwrap(), "trailers");
    assert_eq!(got.metadata().get("x-conn").unwrap(), "no");
    assert!(
        got.metadata().get("x-request-id").is_some(),
        "the router's request ID"
    );

    // An error status: code, message (percent-encoded on the wire) and trailer metadata.
    let e = bounded(
        "fail",
        unary(&mut c, "/t.Echo/Fail", Request::new(msg(1, 1))),
    )
    .await
    .expect_err("an error status");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(e.message(), "not you, ünïcode");
    assert_eq!(e.metadata().get("x-why").unwrap(), "policy");

    // Server stream: 200 messages, then OK.
    assert_eq!(count_all(&mut c, Request::new(msg(200, 64))).await, 200);

    // An error after messages: its status comes in real trailers, after the data.
    let mut stream = bounded(
        "count then fail",
        server_stream(&mut c, "/t.Echo/CountFail", Request::new(msg(3, 16))),
    )
    .await
    .expect("server stream");
    for i in 0..3 {
        let m = bounded("message", stream.message()).await.expect("message");
        assert_eq!(m.map(|m| m.n), Some(i));
    }
    let e = bounded("trailers", stream.message())
        .await
        .expect_err("the status in the trailers");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(e.message(), "quota gone");

    // Bidirectional: each message answered before the next is sent.
    let (tx, mut replies) = bounded("bidi", bidi(&mut c, 1)).await;
    for i in 0..50u64 {
        tx.send(msg(i * 10, 32)).await.expect("send");
        let r = bounded("bidi reply", replies.message())
            .await
            .expect("reply")
            .expect("a reply");
        assert_eq!(r.n, i * 10 + 1);
    }
    drop(tx);
    assert!(bounded("bidi end", replies.message())
        .await
        .expect("clean end")
        .is_none());

    // The router's own refusals in gRPC form: an unknown host, a service with no healthy
    // instance.
    let mut nobody = client_for(s.router.proxy_addr, "http://nobody.app.test").await;
    let e = bounded(
        "unknown host",
        unary(&mut nobody, "/t.Echo/Unary", Request::new(msg(1, 1))),
    )
    .await
    .expect_err("refused");
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert_eq!(e.message(), "no service for this host");
    s._consul
        .register_ttl("grpcdown", "grpcdown-1", s.backend.addr.port(), "critical")
        .await;
    wait_until(Duration::from_secs(10), "grpcdown in the table", || async {
        s.router.routes.load().lookup("grpcdown.app.test").is_some()
    })
    .await;
    let mut down = client_for(s.router.proxy_addr, "http://grpcdown.app.test").await;
    let e = bounded(
        "down",
        unary(&mut down, "/t.Echo/Unary", Request::new(msg(1, 1))),
    )
    .await
    .expect_err("refused");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // One pooled connection carried it all, and no stream is leased now.
    let table = s.router.routes.load();
    let inst = &table.lookup(HOST).expect("service").instances[0];
    wait_until(Duration::from_secs(5), "streams released", || async {
        inst.state.h2.usage() == (1, 0)
    })
    .await;
    // Process-wide (other tests' routers share the recorder): at least ours.
    let text = metrics(s.router.admin_addr).await;
    assert!(
        sample(
            &text,
            "consul_router_h2_backend_connections_opened_total",
            &[]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_are_the_routers_and_quiet_streams_live() {
    // response_timeout 1 s: a stream quiet for longer than that between messages lives on.
    let s = setup(
        "[proxy]\nresponse_timeout = \"1s\"\n",
        Duration::from_millis(1500),
    )
    .await;
    let mut c = client(s.router.proxy_addr).await;

    // The backend never answers in time and ignores grpc-timeout: the router ends the call.
    let mut req = Request::new(msg(1, 1));
    req.set_timeout(Duration::from_millis(300));
    let t = Instant::now();
    let e = bounded("slow", unary(&mut c, "/t.Echo/Slow", req))
        .await
        .expect_err("deadline");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A deadline longer than response_timeout: the head may take longer than 1 s, and a
    // stream that passes its deadline mid-way ends with DEADLINE_EXCEEDED.
    let mut req = Request::new(msg(10, 8));
    req.set_timeout(Duration::from_millis(2500));
    let t = Instant::now();
    let mut stream = bounded("count", server_stream(&mut c, "/t.Echo/Count", req))
        .await
        .expect("stream");
    let mut got = 0;
    let end = loop {
        match bounded("count message", stream.message()).await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("ended without the deadline"),
            Err(e) => break e,
        }
    };
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
    assert_eq!(
        got, 2,
        "messages at 0 s and 1.5 s, then the deadline at 2.5 s"
    );
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());

    // No deadline: three messages 1.5 s apart (gaps over response_timeout) all arrive.
    assert_eq!(count_all(&mut c, Request::new(msg(3, 8))).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_stream_fails_the_call_promptly() {
    let s = setup("", Duration::ZERO).await;
    let mut c = client(s.router.proxy_addr).await;
    let mut stream = hanging_stream(&mut c).await;
    s.backend.kill();
    let t = Instant::now();
    let e = bounded("after the kill", stream.message())
        .await
        .expect_err("an error, not a clean end");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_ne!(e.code(), Code::Ok, "{e:?}");

    // The dead connection left the pool; a new call is refused as unavailable, no hang.
    let e = bounded(
        "after the kill, unary",
        unary(&mut c, "/t.Echo/Unary", Request::new(msg(1, 1))),
    )
    .await
    .expect_err("backend gone");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
}

/// A TCP relay to `to` on 127.0.0.1:0 that can be frozen: from then on it passes no byte
/// either way and closes nothing, like a backend host that stopped answering.
struct Freezer {
    addr: SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Freezer {
    async fn start(to: SocketAddr) -> Freezer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (frozen, watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(to).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pass(cr, sw, watch.clone()));
                tokio::spawn(pass(sr, cw, watch.clone()));
            }
        });
        Freezer { addr, frozen, task }
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(n) if n > 0 => n,
                _ => return,
            },
            _ = frozen.wait_for(|f| *f) => 0,
        };
        if n == 0 {
            // Hold both sockets open, silent, until the test ends.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        let now_frozen = *frozen.borrow();
        if now_frozen || to.write_all(&buf[..n]).await.is_err() {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_answering_is_found_by_pings() {
    let consul = ConsulAgent::start().await;
    let backend = GrpcBackend::start(Duration::ZERO).await;
    let relay = Freezer::start(backend.addr).await;
    consul
        .register("grpc", "grpc-1", relay.addr.port(), &["router.proto=h2c"])
        .await;
    let toml = "[proxy]\nh2_backend_ping_interval = \"1s\"\n";
    let router = start_router(&consul.addr(), toml).await;
    wait_routable(&router, HOST).await;
    let mut c = client(router.proxy_addr).await;
    let mut stream = hanging_stream(&mut c).await;
    // The host goes silent: no FIN, no reset. Only the PINGs can tell.
    relay.frozen.send_replace(true);
    let t = Instant::now();
    let e = bounded("after the freeze", stream.message())
        .await
        .expect_err("an error, not a hang");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert_ne!(e.code(), Code::Ok, "{e:?}");
    drop(backend);
}

/// The router process's resident set, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_each_way_with_flat_memory() {
    let consul = ConsulAgent::start().await;
    let backend = GrpcBackend::start(Duration::ZERO).await;
    consul
        .register("grpc", "grpc-1", backend.addr.port(), &["router.proto=h2c"])
        .await;
    let router = RouterProcess::builder()
        .consul(&consul.addr())
        .toml("")
        .start_healthy()
        .await;
    let mut c = client(router.proxy_addr).await;
    wait_until(Duration::from_secs(20), "grpc routable", || {
        let mut c = c.clone();
        async move {
            unary(&mut c, "/t.Echo/Unary", Request::new(msg(0, 1)))
                .await
                .is_ok()
        }
    })
    .await;

    let run = |c: &mut Client, count: u64| {
        let mut c = c.clone();
        async move {
            let (tx, mut replies) = bidi(&mut c, 64).await;
            let sender = tokio::spawn(async move {
                for i in 0..count {
                    if tx.send(msg(i, 1024)).await.is_err() {
                        break;
                    }
                }
            });
            let mut n = 0;
            while let Some(r) = replies.message().await.expect("reply") {
                assert_eq!(r.n, n + 1);
                n += 1;
            }
            sender.await.expect("sender");
            n
        }
    };
    // A first stream warms the allocator and the pools.
    assert_eq!(bounded("warm-up", run(&mut c, 1_000)).await, 1_000);
    let before = rss_bytes(router.process.id());
    assert_eq!(
        bounded("10,000 each way", run(&mut c, 10_000)).await,
        10_000
    );
    let after = rss_bytes(router.process.id());
    let growth = after.saturating_sub(before);
    eprintln!("router RSS {before} → {after} bytes over 10,000 messages each way");
    assert!(
        growth < 20 * 1024 * 1024,
        "router RSS grew {growth} bytes ({before} → {after}) over 10,000 messages each way"
    );
    drop(backend);
}
