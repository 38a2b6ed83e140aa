//! Restarts, drains and slow clients: `/healthz` 503 the moment a drain begins while
//! in-flight requests finish; upgraded connections' idle timeout and their close at the end
//! of the grace period; HTTP/2 clients that never open their window; the admin listener's
//! h2c idle close; `proxy.max_connections` and running out of file descriptors; and
//! systemd socket activation, with a restart and a reload of the real binary that refuse
//! no connection.

mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::client::{get_admin, request, Proto};
use common::*;

/// A router in this process with one backend, `svc.app.test`, and `toml`.
async fn one_backend(toml: &str) -> (ConsulAgent, Backend, consul_router::Running) {
    let consul = ConsulAgent::start().await;
    let b = Backend::start("svc").await;
    consul.register("svc", "svc-1", b.port(), &[]).await;
    let router = start_router(&consul.addr(), toml).await;
    wait_status(router.proxy_addr, "svc.app.test", StatusCode::OK).await;
    (consul, b, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_says_503_at_once_and_lets_in_flight_requests_finish() {
    let (_c, backend, router) = one_backend("[proxy]\nshutdown_delay = \"700ms\"").await;
    let (proxy, admin) = (router.proxy_addr, router.admin_addr);
    // One slow request in flight on each protocol.
    let slow = [Proto::H1, Proto::H2].map(|proto| {
        tokio::spawn(async move {
            request(proto, proxy, ("GET", "svc.app.test", "/slow/1500"), &[], "").await
        })
    });
    wait_until(
        Duration::from_secs(10),
        "both slow requests at the backend",
        || {
            let n = backend
                .requests()
                .iter()
                .filter(|r| *r == "GET /slow/1500")
                .count();
            async move { n == 2 }
        },
    )
    .await;
    // Two kept-alive connections, idle when the drain begins.
    let mut late = served(proxy).await;
    let mut quiet = served(proxy).await;
    let drain = tokio::spawn(router.shutdown());
    // At once: no wait for the delay or the requests.
    let (status, body) =
        tokio::time::timeout(Duration::from_millis(500), get_admin(admin, "/healthz"))
            .await
            .expect("/healthz answers during the drain");
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    );
    // Within shutdown_delay, new connections are still served.
    let during = get(proxy, "svc.app.test", "/").await;
    assert_eq!(during.status, StatusCode::OK);
    // Once the listener is closed, a request that arrives on an idle kept-alive connection
    // right then is answered, with Connection: close, and the connection closes.
    wait_until(Duration::from_secs(5), "the listener closed", || async {
        TcpStream::connect(proxy).await.is_err()
    })
    .await;
    let head = get_on(&mut late).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(closed_cleanly(&mut late, Duration::from_secs(5)).await);
    // One that sends nothing is closed with a FIN.
    assert!(closed_cleanly(&mut quiet, Duration::from_secs(5)).await);
    for (proto, r) in [Proto::H1, Proto::H2].into_iter().zip(slow) {
        let got = r.await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{proto:?}: {}", got.body);
    }
    tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("drained")
        .unwrap();
    assert!(
        TcpStream::connect(proxy).await.is_err(),
        "the listener is closed"
    );
    assert!(
        TcpStream::connect(admin).await.is_err(),
        "the admin listener too"
    );
}

/// Sends an upgrade request on a fresh connection and reads the 101's head.
async fn upgraded(proxy: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: svc.app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(rest.is_empty());
    s
}

/// Whether the peer closed `s` cleanly (end of stream, not a reset) within `limit`.
async fn closed_cleanly(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, s.read(&mut buf)).await,
        Ok(Ok(0))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_close_when_idle_and_at_the_end_of_the_grace_period() {
    let (_c, _b, router) =
        one_backend("[proxy]\nupgrade_idle_timeout = \"1s\"\nshutdown_grace = \"1500ms\"").await;
    let mut idle = upgraded(router.proxy_addr).await;
    let mut active = upgraded(router.proxy_addr).await;
    // The active one echoes every 200 ms for 2.4 s, past the idle one's close.
    let chatter = tokio::spawn(async move {
        for _ in 0..12 {
            active.write_all(b"ping").await.unwrap();
            let mut back = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(2), active.read_exact(&mut back))
                .await
                .expect("echo in time")
                .expect("open while active");
            assert_eq!(&back, b"ping");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        active
    });
    assert!(
        closed_cleanly(&mut idle, Duration::from_secs(5)).await,
        "the idle tunnel is closed with a FIN"
    );
    let mut active = chatter.await.unwrap();
    // The drain: still relayed within the grace period, closed cleanly at its end.
    let drain = tokio::spawn(router.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    active.write_all(b"late").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(2), active.read_exact(&mut back))
        .await
        .expect("echo during the grace period")
        .unwrap();
    let keepalive = tokio::spawn(async move {
        // Keeps it busy, so only the grace period can end it.
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if active.write_all(b"x").await.is_err() {
                return;
            }
            let mut b = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(3), active.read(&mut b)).await {
                Ok(Ok(1)) => {}
                Ok(Ok(0)) => return,
                other => panic!("not a clean close at the end of the grace period: {other:?}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), keepalive)
        .await
        .expect("closed at the end of the grace period")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("drained")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_client_that_never_reads_is_closed_after_send_timeout() {
    let (_c, _b, router) = one_backend("[proxy]\nsend_timeout = \"1s\"").await;
    let proxy = router.proxy_addr;
    // Window 0: the response head comes, no body byte can.
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut stuck, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get("http://svc.app.test/bytes/200000")
        .body(Full::default())
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), stuck.send_request(req))
        .await
        .expect("head in time")
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    // A reading client's connection, with answers whose bodies are never asked for (HEAD,
    // empty), stays open past send_timeout.
    let (mut kept, kept_conn) = h2_client::<Full<Bytes>>(proxy).await;
    let mut on_kept = |method: &str, path: &str| {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://svc.app.test{path}"))
            .body(Full::default())
            .unwrap();
        let sent = kept.send_request(req);
        async move {
            let resp = sent.await.expect("answered on the kept connection");
            let status = resp.status();
            resp.into_body().collect().await.expect("whole body");
            status
        }
    };
    assert_eq!(on_kept("HEAD", "/").await, StatusCode::OK);
    assert_eq!(on_kept("GET", "/bytes/1000").await, StatusCode::OK);
    // Meanwhile, a response that waits longer than send_timeout for its backend is not a
    // stalled client, and other connections are served.
    let slow = request(
        Proto::H2,
        proxy,
        ("GET", "svc.app.test", "/slow/2500"),
        &[],
        "",
    )
    .await;
    assert_eq!(slow.status, StatusCode::OK, "{}", slow.body);
    let fine = request(
        Proto::H2,
        proxy,
        ("GET", "svc.app.test", "/bytes/200000"),
        &[],
        "",
    )
    .await;
    assert_eq!((fine.status, fine.body.len()), (StatusCode::OK, 200000));
    assert!(
        !kept_conn.is_finished(),
        "a reading client's connection was closed"
    );
    assert_eq!(on_kept("GET", "/").await, StatusCode::OK);
    // The stalled one is gone within 1.5 × send_timeout plus the close wait.
    tokio::time::timeout(Duration::from_secs(8), conn)
        .await
        .expect("the stalled client's connection is closed")
        .unwrap()
        .ok();
    let body = tokio::time::timeout(Duration::from_secs(2), head.into_body().collect()).await;
    assert!(
        matches!(body, Ok(Err(_))),
        "the stalled body fails: {body:?}"
    );
    let m = metrics(router.admin_addr).await;
    assert!(
        sample(&m, "consul_router_send_timeouts_total", &[]) >= 1.0,
        "{m}"
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_h2c_connection_is_closed_when_idle() {
    let consul = ConsulAgent::start().await;
    let router = start_router(&consul.addr(), "[proxy]\nheader_timeout = \"1s\"").await;
    let (mut admin, conn) = h2_client::<Full<Bytes>>(router.admin_addr).await;
    let req = Request::get(format!("http://{}/healthz", router.admin_addr))
        .body(Full::default())
        .unwrap();
    let resp = admin.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    // No stream for header_timeout: GOAWAY, then closed.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the idle h2c admin connection is closed")
        .unwrap();
    router.shutdown().await;
}

/// A new connection to `proxy` that has been answered one GET with 200.
async fn served(proxy: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), get_on(&mut s))
        .await
        .expect("served in time");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Sends one GET on `s` and reads the answer's head.
async fn get_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: svc.app.test\r\n\r\n")
        .await
        .unwrap();
    read_head(s).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_keeps_new_connections_waiting_until_one_closes() {
    let (_c, _b, router) = one_backend("[proxy]\nmax_connections = 2").await;
    let proxy = router.proxy_addr;
    // wait_status's connections are closed: both slots are free again soon.
    let a = served(proxy).await;
    let b = served(proxy).await;
    // The third waits in the backlog: connected, not served.
    let mut c = TcpStream::connect(proxy).await.unwrap();
    let third = tokio::spawn(async move { get_on(&mut c).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "served past max_connections");
    drop(a);
    let head = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let m = metrics(router.admin_addr).await;
    assert!(
        sample(&m, "consul_router_connections_limited_total", &[]) >= 1.0,
        "{m}"
    );
    drop(b);
    router.shutdown().await;
}

/// The router binary started through bash, which gives it `listener` as fd 3 with
/// `LISTEN_PID` (the shell's pid, which `exec` keeps), `LISTEN_FDS=1` and
/// `LISTEN_FDNAMES=http`, as systemd would.
fn activated(listener: &std::net::TcpListener) -> Command {
    // Inherited only by the children spawned while this flag is off (the shell).
    rustix::io::fcntl_setfd(listener, rustix::io::FdFlags::empty()).unwrap();
    let fd = listener.as_raw_fd();
    let script = format!(
        "export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http; exec \"$0\" \"$@\" 3<&{fd} {fd}<&-"
    );
    // bash: dash takes single-digit descriptors only.
    wrapped("bash", &["-c", &script])
}

/// `program args...` followed by the router binary (and then the builder's flags), with
/// the environment [`router_command`] gives the binary.
fn wrapped(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
    let plain = router_command();
    let mut cmd = Command::new(program);
    cmd.args(args).arg(plain.get_program());
    for (k, v) in plain.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd
}

/// GET on a fresh connection: the status, or why there was none.
async fn try_get(addr: SocketAddr) -> Result<StatusCode, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "svc.app.test")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), s.send_request(req))
        .await
        .map_err(|_| "no answer in 20 s".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(resp.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_restart_refuses_no_connection() {
    let consul = ConsulAgent::start().await;
    let b = Backend::start("svc").await;
    consul.register("svc", "svc-1", b.port(), &[]).await;
    // The socket systemd would hold: this test keeps it open across the restart.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let start = || {
        RouterProcess::builder()
            .command(activated(&listener))
            .consul(&consul.addr())
            .toml("")
            .start_healthy()
    };
    let first = start().await;
    assert_eq!(
        first.proxy_addr, addr,
        "the inherited socket is the proxy's"
    );
    assert_eq!(try_get(addr).await, Ok(StatusCode::OK));

    // Clients keep coming, each on a new connection, through the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok) = (stop.clone(), ok.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match try_get(addr).await {
                        Ok(StatusCode::OK) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failures.push(format!("{other:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                failures
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.signal(Signal::TERM);
    let status = first.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}: {}", first.output());
    let before = ok.load(Ordering::Relaxed);
    // Nothing accepts now: connections wait in the backlog for the next process.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = start().await;
    assert_eq!(second.proxy_addr, addr);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A reload keeps the inherited socket: still served, still nothing refused.
    second.signal(Signal::HUP);
    second
        .wait_line(Duration::from_secs(10), "the reload", |l| {
            l.contains("configuration reloaded")
        })
        .await;
    let served = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        ok.load(Ordering::Relaxed) > served,
        "served after the reload"
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let failures = c.await.unwrap();
        assert!(
            failures.is_empty(),
            "refused or failed during the restart: {failures:?}"
        );
    }
    assert!(
        ok.load(Ordering::Relaxed) > before,
        "requests served by the new process"
    );
    let (code, _, err) = second.stop(Duration::from_secs(20)).await;
    assert_eq!(code, 0, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_for_another_process_is_left_alone() {
    // LISTEN_PID names another process: the router binds its own socket.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let r = RouterProcess::builder()
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .start()
        .await;
    assert_ne!(r.proxy_addr, listener.local_addr().unwrap());
    let (code, _, err) = r.stop(Duration::from_secs(20)).await;
    assert_eq!(code, 0, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_under_systemd_socket_activate() {
    let Some(activate) = find_program(&["systemd-socket-activate"], &[]) else {
        eprintln!("systemd-socket-activate is not installed (package systemd): skipped");
        return;
    };
    let consul = ConsulAgent::start().await;
    let b = Backend::start("svc").await;
    consul.register("svc", "svc-1", b.port(), &[]).await;
    let addr = free_addr();
    // It listens, and on the first connection execs the router with the socket as fd 3.
    let cmd = wrapped(activate, &[&format!("--listen={addr}"), "--fdname=http"]);
    let router = RouterProcess::builder()
        .command(cmd)
        .consul(&consul.addr())
        .args(["--domain", "app.test"])
        .spawn();
    router.wait_listening(addr, Duration::from_secs(10)).await;
    // The first connection starts it, and waits until the first table is live.
    assert_eq!(
        try_get(addr).await,
        Ok(StatusCode::OK),
        "{}",
        router.output()
    );
    let (code, _, err) = router.stop(Duration::from_secs(20)).await;
    assert_eq!(code, 0, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_accept_backs_off_and_recovers() {
    let b = Backend::start("svc").await;
    // The binary under `ulimit -n 64`, serving a static service (no Consul).
    let cmd = wrapped("bash", &["-c", "ulimit -n 64 && exec \"$0\" \"$@\""]);
    let router = RouterProcess::builder()
        .command(cmd)
        .toml(&format!(
            "[consul]\nenabled = false\n[[static_services]]\nname = \"svc\"\ninstances = [\"127.0.0.1:{}\"]",
            b.port()
        ))
        .start_healthy()
        .await;
    let proxy = router.proxy_addr;
    // More idle connections than descriptors: accept fails with EMFILE for the rest, which
    // wait in the backlog.
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(TcpStream::connect(proxy).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(router.try_exit().is_none(), "{}", router.output());
    drop(idle);
    // Served again once descriptors are free, and the failures were counted.
    wait_until(Duration::from_secs(10), "served after EMFILE", || async {
        try_get(proxy).await == Ok(StatusCode::OK)
    })
    .await;
    let m = metrics(router.admin_addr).await;
    let emfile = sample(
        &m,
        "consul_router_accept_errors_total",
        &[("reason", "process_fd_limit")],
    );
    assert!(emfile >= 1.0, "{m}");
    let (code, _, err) = router.stop(Duration::from_secs(20)).await;
    assert_eq!(code, 0, "{err}");
}
