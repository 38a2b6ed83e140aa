//! The listener's layers against a real Consul agent and a real backend: TLS termination
//! (certificates by SNI, wildcards, the default certificate, ALPN h2 and http/1.1, reload,
//! a bad file, redirect to https) and the PROXY protocol (v1 and v2 bytes, refusals, and a
//! real HAProxy in front with send-proxy and send-proxy-v2), and `proxy.max_connections = 1`
//! over the HTTP and TLS listeners.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::backend::Backend;
use common::certs::{cert_dir, make_cert};
use common::client::Got;
use common::consul::ConsulAgent;
use common::net::free_port;
use common::process::Process;
use common::router::{router_config, start_router, wait_routable};
use common::tls_client::{tls_connect, Tls};
use common::wait::wait_until;

fn served(tls: &Tls) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

/// GET `path` for `host` on an HTTP/1.1 connection over `io`.
async fn h1_get<T>(io: T, host: &str, path: &str) -> Got
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .body(Full::<Bytes>::default())
        .unwrap();
    got(s.send_request(req).await.unwrap()).await
}

async fn got(resp: http::Response<hyper::body::Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// The value of `name` among the fields the echoing backend lists in its body.
fn sent<'a>(g: &'a Got, name: &str) -> Option<&'a str> {
    g.body
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(": "))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn tls_toml(port: u16, certs: &[(PathBuf, PathBuf)], extra: &str) -> String {
    let mut t = format!("[tls]\nlisten = \"127.0.0.1:{port}\"\n{extra}");
    for (c, k) in certs {
        t.push_str(&format!(
            "[[tls.certs]]\ncert = \"{}\"\nkey = \"{}\"\n",
            c.display(),
            k.display()
        ));
    }
    t
}

/// A Consul agent with service `tbl` on one backend (keep the backend alive).
async fn tbl_on_consul() -> (ConsulAgent, Backend) {
    let consul = ConsulAgent::start().await;
    let b = Backend::start("b1").await;
    consul.register("tbl", "tbl-1", b.port(), &[]).await;
    (consul, b)
}

/// `proxy.max_connections = 1` over the HTTP and TLS listeners: both serve, in turn (a loop
/// idle in `accept` holds no slot, and a close wakes every paused loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_of_one_serves_on_both_listeners() {
    let (consul, _b) = tbl_on_consul().await;
    let dir = cert_dir("listener-limit");
    let cert = make_cert(&dir, "wild", &["*.app.test"]);
    let toml = format!(
        "[proxy]\nmax_connections = 1\n{}",
        tls_toml(free_port(), &[cert], "")
    );
    let router = start_router(&consul.addr(), &toml).await;
    wait_routable(&router, "tbl.app.test").await;
    let tls_addr = router.tls_addr.expect("TLS listener");
    let limit = Duration::from_secs(10);
    // Twice in a row on each: strict turns could pass by luck of the wake-up order.
    for tls in [true, true, false, false, true] {
        // Each answer's connection closes when its client is dropped, freeing the slot.
        let g = tokio::time::timeout(limit, async {
            if tls {
                let io = tls_connect(tls_addr, Some("tbl.app.test"), &[b"http/1.1"]).await;
                h1_get(io, "tbl.app.test", "/").await
            } else {
                common::client::get(router.proxy_addr, "tbl.app.test", "/").await
            }
        })
        .await
        .unwrap_or_else(|_| panic!("served (TLS: {tls})"));
        assert_eq!(g.status, StatusCode::OK, "{}", g.body);
    }
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination() {
    let (consul, _b) = tbl_on_consul().await;
    let dir = cert_dir("listener-tls");
    let default = make_cert(&dir, "default", &["fallback.test"]);
    let wild = make_cert(&dir, "wild", &["*.app.test"]);
    let exact = make_cert(&dir, "exact", &["tbl.app.test"]);
    let port = free_port();
    let certs = [default.clone(), wild.clone(), exact.clone()];
    // The redirect is for clients, not for a trusted proxy (loopback is one by default).
    let log = dir.join("access.log");
    let toml = format!(
        "trusted_proxies = [\"10.9.9.9/32\"]\naccess_log = \"text\"\naccess_log_file = \"{}\"\n{}",
        log.display(),
        tls_toml(port, &certs, "redirect_http = true\n")
    );
    let mut router = start_router(&consul.addr(), &toml).await;
    wait_routable(&router, "tbl.app.test").await;
    let addr = router.tls_addr.expect("TLS listener");
    assert_eq!(addr.port(), port);

    // By SNI: the exact name first, then the wildcard (one label only), else the default.
    for (sni, want) in [
        (Some("tbl.app.test"), &exact.0),
        (Some("Other.App.Test"), &wild.0),
        (Some("a.b.app.test"), &default.0),
        (Some("unknown.example"), &default.0),
        (None, &default.0),
    ] {
        let tls = tls_connect(addr, sni, &[b"http/1.1"]).await;
        assert_eq!(served(&tls), der(want), "SNI {sni:?}");
    }

    // HTTP/1.1 over TLS takes the fast path; the scheme and port come from the connection.
    let tls = tls_connect(addr, Some("tbl.app.test"), &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://tbl.app.test/two")
        .body(Full::<Bytes>::default())
        .unwrap();
    let g = got(h2.send_request(req).await.unwrap()).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.body);
    assert_eq!(sent(&g, "x-forwarded-proto"), Some("https"));
    assert_eq!(
        sent(&g, "x-forwarded-port"),
        Some(port.to_string().as_str())
    );

    let tls = tls_connect(addr, Some("tbl.app.test"), &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let g = h1_get(tls, "tbl.app.test", "/one").await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.body);
    assert_eq!(sent(&g, "x-forwarded-proto"), Some("https"));
    assert_eq!(
        sent(&g, "x-forwarded-port"),
        Some(port.to_string().as_str())
    );
    // The access log has the TLS version and ALPN of each request.
    wait_until(Duration::from_secs(10), "TLS fields logged", || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("GET /two HTTP/2.0")
                && text.contains("tls=\"TLSv1.3\" alpn=\"h2\"")
                && text.contains("tls=\"TLSv1.3\" alpn=\"http/1.1\"")
        }
    })
    .await;
    // No ALPN at all: HTTP/1.1.
    let tls = tls_connect(addr, Some("tbl.app.test"), &[]).await;
    assert_eq!(
        h1_get(tls, "tbl.app.test", "/").await.status,
        StatusCode::OK
    );

    // Plain HTTP to a routed host: a 308 to the same target on https.
    let plain = TcpStream::connect(router.proxy_addr).await.unwrap();
    let g = h1_get(plain, "tbl.app.test", "/x?y=1").await;
    assert_eq!(g.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        g.headers["location"],
        format!("https://tbl.app.test:{port}/x?y=1").as_str()
    );

    // A changed file is picked up (polled), and a broken one is refused at reload with the
    // old certificate kept.
    let new_exact = make_cert(&dir, "exact-new", &["tbl.app.test"]);
    std::fs::copy(&new_exact.0, &exact.0).unwrap();
    std::fs::copy(&new_exact.1, &exact.1).unwrap();
    wait_until(
        Duration::from_secs(15),
        "new certificate served",
        || async {
            served(&tls_connect(addr, Some("tbl.app.test"), &[]).await) == der(&new_exact.0)
        },
    )
    .await;
    std::fs::write(&exact.0, "not a certificate").unwrap();
    let cfg = router_config(&consul.addr(), &format!("domains = [\"app.test\"]\n{toml}"));
    router.reload(cfg).await.expect("reload keeps going");
    let tls = tls_connect(addr, Some("tbl.app.test"), &[]).await;
    assert_eq!(served(&tls), der(&new_exact.0), "the old certificate stays");
    assert_eq!(
        h1_get(tls, "tbl.app.test", "/").await.status,
        StatusCode::OK
    );

    // A bad file at start is refused, naming it.
    let broken = dir.join("broken.pem");
    std::fs::write(&broken, "junk").unwrap();
    let bad = tls_toml(free_port(), &[(broken.clone(), default.1.clone())], "");
    let cfg = router_config(&consul.addr(), &bad);
    let err = consul_router::start(cfg).await.expect_err("refused");
    assert!(
        err.to_string().contains(&broken.display().to_string()),
        "{err}"
    );
}

/// Sends `prefix` then a request for tbl.app.test, and reads the whole answer.
async fn raw_request(addr: SocketAddr, prefix: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // A refused connection may be closed before all of it is written.
    let _ = s.write_all(prefix).await;
    let _ = s
        .write_all(b"GET /p HTTP/1.1\r\nHost: tbl.app.test\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn v2_header(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // TCP over IPv4
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol() {
    let (consul, _b) = tbl_on_consul().await;
    let v1 = start_router(&consul.addr(), "proxy_protocol = \"v1\"\n").await;
    let v2 = start_router(&consul.addr(), "proxy_protocol = \"v2\"\n").await;
    let optional = start_router(&consul.addr(), "proxy_protocol = \"optional\"\n").await;
    let untrusted = start_router(
        &consul.addr(),
        "proxy_protocol = \"v1\"\ntrusted_proxies = [\"10.9.9.9/32\"]\n",
    )
    .await;
    for r in [&v1, &v2, &optional, &untrusted] {
        wait_routable(r, "tbl.app.test").await;
    }
    let line = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 8443\r\n";
    let v2h = v2_header([203, 0, 113, 7], 5555, [127, 0, 0, 1], 8443);

    // The client address and port come from the header; nothing of it reaches the backend.
    for (router, prefix) in [
        (&v1, &line[..]),
        (&v2, &v2h[..]),
        (&optional, &line[..]),
        (&optional, &v2h[..]),
    ] {
        let answer = raw_request(router.proxy_addr, prefix).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains("\nx-forwarded-for: 203.0.113.7\n"),
            "{answer}"
        );
        assert!(answer.contains("\nx-real-ip: 203.0.113.7\n"), "{answer}");
        assert!(answer.contains("\nx-forwarded-port: 8443\n"), "{answer}");
        assert!(!answer.contains("PROXY"), "{answer}");
    }
    // Optional: no header is fine.
    let answer = raw_request(optional.proxy_addr, b"").await;
    assert!(
        answer.contains("\nx-forwarded-for: 127.0.0.1\n"),
        "{answer}"
    );
    // Refused, and closed without an answer: a missing header, the other version, a
    // malformed one, and a header from a peer that is not a trusted proxy.
    for (router, prefix, why) in [
        (&v1, &b""[..], "missing"),
        (&v1, &v2h[..], "v2 where v1 is required"),
        (&v2, &line[..], "v1 where v2 is required"),
        (
            &v1,
            b"PROXY TCP4 203.0.113.7 127.0.0.1 5555\r\n",
            "malformed",
        ),
        (&untrusted, &line[..], "untrusted peer"),
    ] {
        let answer = raw_request(router.proxy_addr, prefix).await;
        assert!(!answer.contains("200 OK"), "{why}: {answer}");
        assert!(!answer.contains("x-forwarded-for: 203"), "{why}: {answer}");
    }
}

/// A real HAProxy in front, sending PROXY v1 and v2 to the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front() {
    let find = || common::tools::find_program(&["haproxy"], &["/usr/sbin"]);
    let haproxy = find()
        .or_else(|| {
            (common::tools::is_root() && common::tools::apt_install(&["haproxy"]))
                .then(find)
                .flatten()
        })
        .expect("haproxy is not installed and could not be (apt-get install haproxy)");
    let (consul, _b) = tbl_on_consul().await;
    let v1 = start_router(&consul.addr(), "proxy_protocol = \"v1\"\n").await;
    let v2 = start_router(&consul.addr(), "proxy_protocol = \"v2\"\n").await;
    wait_routable(&v1, "tbl.app.test").await;
    wait_routable(&v2, "tbl.app.test").await;
    let (f1, f2) = (free_port(), free_port());
    let dir = cert_dir("listener-haproxy");
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend f1\n  bind 127.0.0.1:{f1}\n  default_backend r1\n\
             frontend f2\n  bind 127.0.0.1:{f2}\n  default_backend r2\n\
             backend r1\n  server r 127.0.0.1:{} send-proxy\n\
             backend r2\n  server r 127.0.0.1:{} send-proxy-v2\n",
            v1.proxy_addr.port(),
            v2.proxy_addr.port()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(haproxy);
    cmd.arg("-f").arg(&cfg).arg("-db");
    let haproxy = Process::spawn("haproxy", &mut cmd);
    for front in [f1, f2] {
        let addr: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
        haproxy.wait_listening(addr, Duration::from_secs(10)).await;
        let answer = raw_request(addr, b"").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // The port the client connected to is HAProxy's, from the header.
        assert!(
            answer.contains(&format!("\nx-forwarded-port: {front}\n")),
            "{answer}"
        );
        assert!(
            answer.contains("\nx-forwarded-for: 127.0.0.1\n"),
            "{answer}"
        );
    }
}
