//! nginx in front of the router: `config/nginx-site.conf`, run by a real nginx (Debian's
//! `nginx`, or $NGINX_BIN) in front of a real router, Consul agent and backends. Only the
//! listen address, the router's address and nginx's own files (pid, logs, temp paths) are
//! changed for the test. Checks the fields the backend gets (client address, proto, Host,
//! nginx's request ID end to end), keep-alive to the router, streaming both ways (chunks
//! passed on as they come, backpressure to the app, uploads unbuffered) and WebSocket
//! upgrades. A machine without nginx fails these tests, saying how to install it.

mod common;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// The file under test.
const SITE: &str = include_str!("../config/nginx-site.conf");
/// Every test's whole run, startup of Consul, router and nginx included.
const LIMIT: Duration = Duration::from_secs(120);
/// One step: a response, a chunk, an echo.
const STEP: Duration = Duration::from_secs(10);
/// More than loopback sockets and the router hold between an app and a client that reads
/// nothing, and less than nginx would buffer.
const AHEAD_CAP: usize = 256 << 20;

// ---- nginx ----

fn find_nginx() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NGINX_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "NGINX_BIN={} is not a file", p.display());
        return Some(p);
    }
    find_program(
        &["nginx"],
        &["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"],
    )
}

/// The nginx binary: found, or installed with apt-get when running as root (once per
/// process); otherwise the test fails and says how to get one.
fn nginx_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = find_nginx() {
            return p;
        }
        let root = is_root();
        if root {
            apt_install(&["nginx-light"]);
            if let Some(p) = find_nginx() {
                return p;
            }
        }
        panic!(
            "tests/nginx_front.rs runs config/nginx-site.conf in a real nginx, and no `nginx` \
             binary was found (PATH, /usr/sbin, /usr/local/sbin){}.\n\
             Install one: `sudo apt-get install nginx-light` on Debian or Ubuntu (any nginx \
             1.19.5 or later will do), or set NGINX_BIN=/path/to/nginx.",
            if root {
                "; `apt-get install -y nginx-light` did not provide one"
            } else {
                ""
            }
        )
    })
    .clone()
}

/// Replaces the one uncommented line of `site` that reads `from` (trimmed) with `to`.
fn replace_line(site: &str, from: &str, to: &str) -> String {
    let mut found = 0;
    let out: Vec<String> = site
        .lines()
        .map(|line| {
            if line.trim() == from {
                found += 1;
                to.to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert_eq!(
        found, 1,
        "config/nginx-site.conf should hold the line `{from}` exactly once (the test swaps it)"
    );
    out.join("\n")
}

/// A whole nginx.conf: the site file in an http block, with test ports and every file nginx
/// writes inside `dir`.
fn nginx_conf(dir: &Path, listen: SocketAddr, router: SocketAddr) -> String {
    let site = replace_line(SITE, "listen 80;", &format!("    listen {listen};"));
    // IPv6 may be missing in a container; the test client connects over IPv4.
    let site = replace_line(&site, "listen [::]:80;", "");
    let site = replace_line(
        &site,
        "server 127.0.0.1:8080;",
        &format!("    server {router};"),
    );
    let d = dir.display();
    // As root, nginx would otherwise give its temp directories to "nobody".
    let user = if is_root() { "user root;\n" } else { "" };
    format!(
        "{user}daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\n\n\
         events {{\n    worker_connections 256;\n}}\n\n\
         http {{\n\
         access_log {d}/access.log;\n\
         client_body_temp_path {d}/client_body;\n\
         proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n\
         scgi_temp_path {d}/scgi;\n\n\
         {site}\n}}\n"
    )
}

/// nginx in the foreground, one process, on its own directory; killed on drop (its error
/// log is printed if the test is failing).
struct Nginx {
    process: Process,
    dir: TempDir,
    addr: SocketAddr,
}

impl Nginx {
    async fn start(router: SocketAddr) -> Nginx {
        let bin = nginx_bin();
        let addr = free_addr();
        let dir = TempDir::new("nginx");
        let conf = dir.join("nginx.conf");
        let text = nginx_conf(dir.path(), addr, router);
        std::fs::write(&conf, &text).expect("write nginx.conf");
        let command = || {
            let mut c = Command::new(&bin);
            c.arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdin(Stdio::null());
            c
        };
        // `nginx -t` first: a refused config reads better than an exited process.
        let out = command()
            .arg("-t")
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
        assert!(
            out.status.success(),
            "nginx -t refused the config made from config/nginx-site.conf:\n{}\n\
             --- nginx.conf ---\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let process = Process::spawn("nginx", &mut command());
        let nginx = Nginx { process, dir, addr };
        // On a timeout, the drop prints the error log.
        wait_until(STEP, &format!("nginx listening on {addr}"), || async {
            if let Some(status) = nginx.process.try_exit() {
                panic!("nginx exited ({status}):\n{}", nginx.error_log());
            }
            TcpStream::connect(addr).await.is_ok()
        })
        .await;
        nginx
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.process.kill();
        if std::thread::panicking() {
            eprintln!("--- nginx error.log ---\n{}", self.error_log());
        }
    }
}

// ---- a backend that sends what the test gives it, when it gives it ----

type DripFrame = Result<Frame<Bytes>, Infallible>;

/// `/drip` responses send the frames the test puts on the sender `next` returns, and end
/// when it is dropped. Other paths answer "ready".
struct Drip {
    addr: SocketAddr,
    bodies: mpsc::UnboundedReceiver<mpsc::Sender<DripFrame>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drip {
    async fn start() -> Drip {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (to_test, bodies) = mpsc::unbounded_channel();
        let task = serve_http(listener, move |req: Request<Incoming>| {
            let to_test = to_test.clone();
            async move {
                let (tx, rx) = mpsc::channel::<DripFrame>(1);
                if req.uri().path() == "/drip" {
                    let _ = to_test.send(tx);
                } else {
                    let _ = tx.try_send(Ok(Frame::data(Bytes::from_static(b"ready\n"))));
                }
                Ok::<_, Infallible>(hyper::Response::new(StreamBody::new(ReceiverStream(rx))))
            }
        });
        Drip { addr, bodies, task }
    }

    /// The body of the next `/drip` response, once its request reached the backend.
    async fn next(&mut self) -> mpsc::Sender<DripFrame> {
        timeout(STEP, self.bodies.recv())
            .await
            .expect("the /drip request reaches the backend")
            .expect("drip backend running")
    }
}

impl Drop for Drip {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- the whole stack ----

/// Consul, backends `web` (tests/common's Backend) and `drip`, the router with `toml`
/// (domain app.example.net), and nginx in front.
struct Stack {
    nginx: Nginx,
    router: consul_router::Running,
    drip: Drip,
    _web: Backend,
    _consul: ConsulAgent,
}

impl Stack {
    async fn start(toml: &str) -> Stack {
        // Without nginx, fail before starting anything else.
        nginx_bin();
        let consul = ConsulAgent::start().await;
        let web = Backend::start("web").await;
        let drip = Drip::start().await;
        consul.register("web", "web-1", web.port(), &[]).await;
        consul
            .register("drip", "drip-1", drip.addr.port(), &[])
            .await;
        let toml = format!("domains = [\"app.example.net\"]\n{toml}");
        let router = start_router(&consul.addr(), &toml).await;
        let p = router.proxy_addr;
        wait_until(STEP, "web and drip routed", || async {
            get(p, "web.app.example.net", "/").await.status == StatusCode::OK
                && get(p, "drip.app.example.net", "/").await.status == StatusCode::OK
        })
        .await;
        let nginx = Nginx::start(p).await;
        Stack {
            nginx,
            router,
            drip,
            _web: web,
            _consul: consul,
        }
    }

    async fn stop(self) {
        let Stack { nginx, router, .. } = self;
        drop(nginx);
        router.shutdown().await;
    }
}

/// The values of field `name` in a `Backend`'s echo of the request head it got.
fn fields<'a>(echo: &'a str, name: &str) -> Vec<&'a str> {
    echo.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .collect()
}

/// Sends `req` to `to` from a socket bound to `from`.
async fn send_from(from: IpAddr, to: SocketAddr, req: Request<Full<Bytes>>) -> Got {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0))
        .unwrap_or_else(|e| panic!("bind a client socket to {from}: {e}"));
    let stream = sock.connect(to).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send_on(&mut sender, req, STEP).await
}

/// Reads `body` until it has given `n` bytes.
async fn read_exactly(body: &mut Incoming, n: usize, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        let frame = timeout(STEP, body.frame())
            .await
            .unwrap_or_else(|_| panic!("{what}"))
            .expect("body not ended")
            .expect("body frame");
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
    }
    got
}

// ---- the tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_gets_the_clients_facts_and_nginxs_request_id() {
    bounded(LIMIT, async {
        let s = Stack::start("").await;
        let n = s.nginx.addr;
        // Everything a client could forge about itself: nginx replaces or drops it all.
        let req = || {
            Request::get("/some/path?q=1&r=%2F")
                .header("host", "web.app.example.net")
                .header("x-request-id", "chosen-by-client")
                .header("x-forwarded-host", "evil.example")
                .header("x-forwarded-proto", "https")
                .header("x-real-ip", "6.6.6.6")
                .header("forwarded", "for=6.6.6.6")
                .header("x_forwarded_for", "6.6.6.6")
                .body(Full::<Bytes>::default())
                .unwrap()
        };
        let g = send(n, req()).await;
        assert_eq!(g.status, StatusCode::OK, "{}", g.body);
        assert_eq!(g.headers["x-backend"], "web");
        let echo = &g.body;
        // The target as the client sent it, not decoded.
        assert!(
            echo.starts_with("web\nGET /some/path?q=1&r=%2F\n"),
            "{echo}"
        );
        assert_eq!(fields(echo, "host"), ["web.app.example.net"], "{echo}");
        assert_eq!(fields(echo, "x-forwarded-host"), ["web.app.example.net"]);
        assert_eq!(fields(echo, "x-forwarded-proto"), ["http"], "{echo}");
        // nginx's chain (the client), then nginx as the router's peer.
        assert_eq!(fields(echo, "x-forwarded-for"), ["127.0.0.1, 127.0.0.1"]);
        assert_eq!(fields(echo, "x-real-ip"), ["127.0.0.1"], "{echo}");
        assert!(fields(echo, "forwarded").is_empty(), "{echo}");
        assert!(
            !echo.contains("6.6.6.6"),
            "a forged field got through:\n{echo}"
        );
        // nginx's $request_id (32 hex digits), kept by the router since nginx is trusted,
        // seen by the backend and returned to the client.
        let rid = fields(echo, "x-request-id");
        assert_eq!(rid.len(), 1, "{echo}");
        let rid = rid[0];
        assert!(
            rid.len() == 32 && rid.bytes().all(|b| b.is_ascii_hexdigit()),
            "not nginx's $request_id: {rid}"
        );
        assert_eq!(g.headers["x-request-id"], rid);
        let again = send(n, req()).await;
        let rid2 = fields(&again.body, "x-request-id");
        assert_eq!(rid2.len(), 1);
        assert_ne!(rid2[0], rid, "one ID per request");

        // A client on another address: the backend sees that address.
        let from = IpAddr::from([127, 0, 0, 2]);
        let req = Request::get("/")
            .header("host", "web.app.example.net")
            .body(Full::<Bytes>::default())
            .unwrap();
        let g = send_from(from, n, req).await;
        assert_eq!(g.status, StatusCode::OK, "{}", g.body);
        assert_eq!(fields(&g.body, "x-real-ip"), ["127.0.0.2"], "{}", g.body);
        assert_eq!(
            fields(&g.body, "x-forwarded-for"),
            ["127.0.0.2, 127.0.0.1"],
            "{}",
            g.body
        );

        // Keep-alive to the router: after requests one after another, nginx holds one
        // open connection to it (the Connection map sends no "close").
        for _ in 0..5 {
            assert_eq!(
                get(n, "web.app.example.net", "/").await.status,
                StatusCode::OK
            );
        }
        let port = s.router.proxy_addr.port();
        wait_until(STEP, "one kept-alive connection from nginx", || async {
            established_on(port) == 1
        })
        .await;
        s.stop().await;
    })
    .await;
}

/// With only nginx trusted, a client that forges X-Forwarded-For gets its own address
/// (the right-most one that is not a trusted proxy), not the one it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_forwarded_for_does_not_choose_the_client_address() {
    bounded(LIMIT, async {
        // In production clients are not on loopback; here 127.0.0.2 plays one, so only
        // nginx's address is trusted.
        let s = Stack::start("trusted_proxies = [\"127.0.0.1/32\"]").await;
        let req = Request::get("/")
            .header("host", "web.app.example.net")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-real-ip", "203.0.113.9")
            .body(Full::<Bytes>::default())
            .unwrap();
        let g = send_from(IpAddr::from([127, 0, 0, 2]), s.nginx.addr, req).await;
        assert_eq!(g.status, StatusCode::OK, "{}", g.body);
        assert_eq!(fields(&g.body, "x-real-ip"), ["127.0.0.2"], "{}", g.body);
        assert_eq!(
            fields(&g.body, "x-forwarded-for"),
            ["203.0.113.9, 127.0.0.2, 127.0.0.1"],
            "{}",
            g.body
        );
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_and_uploads_stream_through_nginx() {
    bounded(LIMIT, async {
        let mut s = Stack::start("").await;
        let n = s.nginx.addr;

        // A response's first chunk reaches the client before its last is even sent (as
        // server-sent events need).
        let mut sender = open::<Full<Bytes>>(n).await;
        let req = Request::get("/drip")
            .header("host", "drip.app.example.net")
            .body(Full::default())
            .unwrap();
        let resp = sender.send_request(req);
        let drip = s.drip.next().await;
        drip.send(Ok(Frame::data(Bytes::from_static(b"first\n"))))
            .await
            .unwrap();
        let resp = timeout(STEP, resp)
            .await
            .expect("the response head comes while its body is open")
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = read_exactly(
            &mut body,
            6,
            "the first chunk did not come before the last was sent",
        )
        .await;
        assert_eq!(first, b"first\n");
        drip.send(Ok(Frame::data(Bytes::from_static(b"last\n"))))
            .await
            .unwrap();
        drop(drip);
        let rest = timeout(STEP, body.collect())
            .await
            .expect("the body ends")
            .unwrap()
            .to_bytes();
        assert_eq!(&rest[..], b"last\n");

        // Backpressure: while the client reads nothing, nginx reads no further ahead than
        // one buffer (proxy_buffering off), so the app's writes soon wait. A buffering nginx
        // would take in up to proxy_max_temp_file_size (1 GiB), spooled to disk.
        let mut sender = open::<Full<Bytes>>(n).await;
        let req = Request::get("/drip")
            .header("host", "drip.app.example.net")
            .body(Full::default())
            .unwrap();
        let resp = sender.send_request(req);
        let drip = s.drip.next().await;
        let chunk = Bytes::from(vec![b'z'; 1 << 20]);
        let mut pushed = 0usize;
        while pushed < AHEAD_CAP {
            let send = drip.send(Ok(Frame::data(chunk.clone())));
            match timeout(Duration::from_secs(1), send).await {
                Ok(sent) => {
                    sent.unwrap();
                    pushed += chunk.len();
                }
                // The app's write waits: backpressure reached it.
                Err(_) => break,
            }
        }
        assert!(
            pushed < AHEAD_CAP,
            "the app wrote {pushed} bytes the client did not read: nginx buffers responses"
        );
        drop(drip);
        let resp = timeout(STEP, resp)
            .await
            .expect("the response head")
            .expect("response");
        let mut body = resp.into_body();
        let mut got = 0;
        while let Some(frame) = timeout(STEP, body.frame()).await.expect("the body flows") {
            got += frame.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
        }
        assert_eq!(got, pushed);

        // A large download arrives whole.
        let total = 16 * 1024 * 1024;
        let g = timeout(
            LIMIT,
            get(n, "web.app.example.net", &format!("/bytes/{total}")),
        )
        .await
        .expect("download in time");
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(g.body.len(), total);

        // An upload streams to the app: each chunk comes back echoed before the next is
        // sent, so a buffered request (or response) would stall here.
        let mut sender = open(n).await;
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let req = Request::post("/echo")
            .header("host", "web.app.example.net")
            .body(StreamBody::new(ReceiverStream(rx)))
            .unwrap();
        let resp = sender.send_request(req);
        let chunk = Bytes::from(vec![b'y'; 16 * 1024]);
        tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
        let resp = timeout(STEP, resp)
            .await
            .expect("the response head comes before the upload ends")
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        for round in 0..8 {
            let back = read_exactly(
                &mut body,
                chunk.len(),
                &format!("round {round}: the upload's chunk did not come back before the next"),
            )
            .await;
            assert_eq!(back, chunk);
            tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
        }
        drop(tx);
        let rest = timeout(STEP, body.collect())
            .await
            .expect("the echo ends")
            .unwrap()
            .to_bytes();
        assert_eq!(rest, chunk);
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_through_nginx() {
    bounded(LIMIT, async {
        let s = Stack::start("").await;
        let mut ws = TcpStream::connect(s.nginx.addr).await.unwrap();
        ws.write_all(
            b"GET /chat HTTP/1.1\r\nHost: web.app.example.net\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            timeout(STEP, ws.read_exact(&mut byte))
                .await
                .expect("the 101 in time")
                .expect("the 101");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
        for msg in [
            &b"hello"[..],
            b"through nginx and the router",
            &[0u8, 1, 2, 255],
        ] {
            ws.write_all(msg).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            timeout(STEP, ws.read_exact(&mut back))
                .await
                .expect("echo in time")
                .expect("echo");
            assert_eq!(back, msg);
        }
        drop(ws);
        s.stop().await;
    })
    .await;
}
