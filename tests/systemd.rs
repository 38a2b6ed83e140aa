//! systemd integration: the real binary under a `$NOTIFY_SOCKET` the test binds (READY=1 no
//! sooner than `/healthz` says 200, STOPPING=1 on SIGTERM, exit 0), and the unit file
//! through `systemd-analyze verify`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use rustix::process::Signal;
use tokio::net::UnixDatagram;

/// How long the router may take to exit after SIGTERM.
const STOP_WITHIN: Duration = Duration::from_secs(15);

/// The next notification, or `None` after `limit`.
async fn next(sock: &UnixDatagram, limit: Duration) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(limit, sock.recv(&mut buf))
        .await
        .ok()?
        .expect("recv on the notify socket");
    Some(String::from_utf8(buf[..n].to_vec()).expect("UTF-8 notification"))
}

/// Notifications until one has the assignment `line`; panics after `limit`.
async fn until(sock: &UnixDatagram, line: &str, limit: Duration) -> (String, Vec<String>) {
    let end = Instant::now() + limit;
    let mut before = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let Some(msg) = next(sock, left).await else {
            panic!("no {line} within {limit:?}; got {before:?}");
        };
        if msg.lines().any(|l| l == line) {
            return (msg, before);
        }
        before.push(msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_ready_after_the_first_table_and_stopping_on_sigterm() {
    // Consul is down when the router starts, so there is a stretch where it is not ready.
    let mut consul = ConsulAgent::start().await;
    consul.kill();

    let dir = TempDir::new("systemd-notify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    // The start line names the admin address.
    let router = RouterProcess::builder()
        .consul(&consul.addr())
        .args(["--domain", "app.test"])
        .env("NOTIFY_SOCKET", &sock_path)
        .start()
        .await;
    let admin = router.admin_addr;

    // Not ready while Consul is away: a status, no READY=1, and /healthz says 503.
    let first = next(&sock, Duration::from_secs(10))
        .await
        .expect("a first notification");
    assert!(first.starts_with("STATUS=waiting"), "{first:?}");
    assert_eq!(
        get_admin(admin, "/healthz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    if let Some(msg) = next(&sock, Duration::from_secs(1)).await {
        panic!("nothing more before Consul is back, got {msg:?}");
    }
    assert_eq!(
        get_admin(admin, "/healthz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // Consul comes back: READY=1 once the table is live, and by then /healthz is 200.
    consul.restart().await;
    let (ready, before) = until(&sock, "READY=1", Duration::from_secs(45)).await;
    assert_eq!(get_admin(admin, "/healthz").await.0, StatusCode::OK);
    assert!(before.is_empty(), "{before:?}");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=routing table live")),
        "{ready:?}"
    );

    // SIGTERM: STOPPING=1 as the drain starts, then exit status 0.
    router.signal(Signal::TERM);
    let (stopping, before) = until(&sock, "STOPPING=1", Duration::from_secs(15)).await;
    assert!(before.is_empty(), "{before:?}");
    assert!(stopping.contains("STATUS=draining"), "{stopping:?}");
    let status = router.wait_exit(STOP_WITHIN).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    // Nothing after STOPPING=1 (no late READY=1): a window, as absence has no event.
    assert_eq!(next(&sock, Duration::from_millis(200)).await, None);
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let analyze = systemd_analyze();
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/consul-router.service"),
    )
    .unwrap();
    for line in [
        "Type=notify",
        "ExecStartPre=/usr/local/bin/consul-router --config /etc/consul-router/consul-router.toml --check-config",
        "ExecStart=/usr/local/bin/consul-router --config /etc/consul-router/consul-router.toml",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "LimitNOFILE=65536",
        "LogsDirectory=consul-router",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line:?}");
    }
    assert!(
        unit.lines()
            .any(|l| l == "ExecReload=/bin/kill -HUP $MAINPID"),
        "ExecReload sends SIGHUP"
    );
    // Stopping outlasts the drain: proxy.shutdown_grace (30 s) plus the access log (5 s).
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(stop > 35, "TimeoutStopSec={stop}");

    // verify checks that the Exec binaries exist: point them at the one cargo built.
    let dir = TempDir::new("systemd-verify");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_consul-router"),
        bin.join("consul-router"),
    )
    .unwrap();
    let local = unit.replace(
        "/usr/local/bin/consul-router",
        bin.join("consul-router").to_str().unwrap(),
    );
    let path = dir.join("consul-router.service");
    std::fs::write(&path, &local).unwrap();
    let (ok, lines) = verify(&analyze, &path);
    assert!(ok && lines.is_empty(), "systemd-analyze verify: {lines:#?}");

    // The check can fail: an unknown key is reported (exit status 0, a line naming the
    // file), and so is a missing binary.
    std::fs::write(&path, local.replace("Type=notify", "Type=notify\nTypo=1")).unwrap();
    let (_, lines) = verify(&analyze, &path);
    assert!(lines.iter().any(|l| l.contains("Typo")), "{lines:#?}");
    std::fs::write(&path, &unit).unwrap();
    let (ok, _) = verify(&analyze, &path);
    if Path::new("/usr/local/bin/consul-router").exists() {
        eprintln!("/usr/local/bin/consul-router exists: the missing-binary check is skipped");
    } else {
        assert!(!ok, "verify must refuse a unit whose binary is missing");
    }
}

#[test]
fn socket_unit_passes_systemd_analyze_verify() {
    let analyze = systemd_analyze();
    let read = |name: &str| {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("systemd")
                .join(name),
        )
        .unwrap()
    };
    let socket = read("consul-router.socket");
    // The configuration's default addresses, the service it starts, and held across restarts.
    for line in [
        "ListenStream=127.0.0.1:8080",
        "ListenStream=127.0.0.1:9090",
        "Service=consul-router.service",
        "WantedBy=sockets.target",
    ] {
        assert!(socket.lines().any(|l| l == line), "missing {line:?}");
    }
    let dir = TempDir::new("systemd-verify-socket");
    let service = read("consul-router.service").replace(
        "/usr/local/bin/consul-router",
        env!("CARGO_BIN_EXE_consul-router"),
    );
    std::fs::write(dir.join("consul-router.service"), service).unwrap();
    let path = dir.join("consul-router.socket");
    std::fs::write(&path, &socket).unwrap();
    let (ok, lines) = verify(&analyze, &path);
    assert!(ok && lines.is_empty(), "systemd-analyze verify: {lines:#?}");
}

/// GET with `Host: host` on an open keep-alive connection.
async fn get_on(
    conn: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    host: &str,
) -> StatusCode {
    let req = http::Request::get("/")
        .header("host", host)
        .body(http_body_util::Full::default())
        .unwrap();
    // hyper's client takes the next request only once it has finished with the last one.
    conn.ready()
        .await
        .expect("the kept connection is still open");
    let resp = tokio::time::timeout(Duration::from_secs(10), conn.send_request(req))
        .await
        .expect("answer in time")
        .expect("answer on the kept connection");
    let status = resp.status();
    // Read to the end, so the connection is ready for the next request.
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body");
    status
}

/// The MONOTONIC_USEC= of a notification.
fn monotonic_usec(msg: &str) -> u64 {
    msg.lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {msg:?}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_keeps_connections_and_refuses_a_bad_file() {
    let mut consul = ConsulAgent::start().await;
    let backend = Backend::start("hup-1").await;
    consul.register("hup", "hup-1", backend.port(), &[]).await;

    let dir = TempDir::new("systemd-reload");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let conf = dir.join("consul-router.toml");
    let consul_addr = consul.addr();
    let write_conf = |listen: u16, admin: u16, domain: &str, extra: &str| {
        let text = format!(
            "listen = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             domains = [\"{domain}\"]\n{extra}\n[consul]\naddress = \"{consul_addr}\"\n"
        );
        std::fs::write(&conf, text).unwrap();
    };
    let (listen, admin) = (free_port(), free_port());
    write_conf(listen, admin, "app.test", "");
    // Every log line (RUST_LOG=info), to find the refusal's.
    let router = RouterProcess::builder()
        .config_file(&conf)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("RUST_LOG", "info")
        .start()
        .await;
    until(&sock, "READY=1", Duration::from_secs(45)).await;
    let proxy: std::net::SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let mut kept = open(proxy).await;
    assert_eq!(get_on(&mut kept, "hup.app.test").await, StatusCode::OK);
    let hup = || router.signal(Signal::HUP);

    // A new domain and a moved admin listener, with Consul gone: the table is rebuilt from
    // what the router holds, and the connection on the unchanged proxy listener stays.
    consul.kill();
    let admin2 = free_port();
    write_conf(listen, admin2, "new.test", "strategy = \"least-load\"");
    hup();
    let (reloading, _) = until(&sock, "RELOADING=1", Duration::from_secs(10)).await;
    let first_usec = monotonic_usec(&reloading);
    let (ready, _) = until(&sock, "READY=1", Duration::from_secs(10)).await;
    assert!(ready.contains("STATUS=configuration reloaded"), "{ready:?}");
    wait_until(Duration::from_secs(5), "the new domain", || async {
        get(proxy, "hup.new.test", "/").await.status == StatusCode::OK
    })
    .await;
    assert_eq!(get_on(&mut kept, "hup.new.test").await, StatusCode::OK);
    assert_eq!(
        get_on(&mut kept, "hup.app.test").await,
        StatusCode::NOT_FOUND
    );
    let admin2: std::net::SocketAddr = format!("127.0.0.1:{admin2}").parse().unwrap();
    let routes = get_admin(admin2, "/api/routes").await.1;
    assert!(routes.contains("\"strategy\": \"least-load\""), "{routes}");
    let old_admin: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    assert!(
        tokio::net::TcpStream::connect(old_admin).await.is_err(),
        "the old admin listener is closed"
    );

    // A bad file: refused with the key named, and the running configuration stays.
    let mark = router.stdout.len();
    std::fs::write(&conf, "strategy = \"round-robin\"\n").unwrap();
    hup();
    let (reloading, _) = until(&sock, "RELOADING=1", Duration::from_secs(10)).await;
    assert!(monotonic_usec(&reloading) > first_usec);
    let (ready, _) = until(&sock, "READY=1", Duration::from_secs(10)).await;
    assert!(ready.contains("STATUS=reload refused"), "{ready:?}");
    let refusal = router
        .stdout
        .wait_line_since(mark, Duration::from_secs(5), "the refusal logged", |l| {
            l.contains("reload refused")
        })
        .await;
    assert!(refusal.contains("strategy: "), "{refusal}");
    assert_eq!(get_on(&mut kept, "hup.new.test").await, StatusCode::OK);
    assert_eq!(get_admin(admin2, "/healthz").await.0, StatusCode::OK);

    // A moved proxy listener: the new port serves, the old one takes no new connection.
    let listen2 = free_port();
    write_conf(listen2, admin2.port(), "new.test", "");
    hup();
    until(&sock, "READY=1", Duration::from_secs(10)).await;
    let proxy2: std::net::SocketAddr = format!("127.0.0.1:{listen2}").parse().unwrap();
    assert_eq!(
        get(proxy2, "hup.new.test", "/").await.status,
        StatusCode::OK
    );
    assert!(tokio::net::TcpStream::connect(proxy).await.is_err());

    router.signal(Signal::TERM);
    let status = router.wait_exit(STOP_WITHIN).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}
