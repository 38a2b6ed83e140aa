//! One table of request-path cases, each run over HTTP/1.1 and over HTTP/2 (h2c, prior
//! knowledge) against the same router, a real Consul agent and a real backend that echoes
//! the fields it got: forwarding fields (trusted and untrusted peers), request IDs,
//! retries, 404/503/`Retry-After`, target validation, hop-by-hop fields. Both paths must
//! give the same answer by construction (one core); this proves it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::Full;

use common::backend::Backend;
use common::client::{request, send_on, Got, Proto};
use common::consul::ConsulAgent;
use common::net::free_port;
use common::router::{start_router, wait_routable};

/// What the backend must (not) have received: `(field, Some(value))` present with that
/// value (`{port}` is the router's port), `(field, None)` absent.
type Fields = &'static [(&'static str, Option<&'static str>)];

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    /// The router whose peer (127.0.0.1) is trusted, or the one that trusts nobody.
    trusted: bool,
    method: &'static str,
    host: &'static str,
    target: &'static str,
    send: &'static [(&'static str, &'static str)],
    status: u16,
    backend: Fields,
    response: Fields,
}

const FAMILY: &[(&str, &str)] = &[
    ("x-forwarded-for", "6.6.6.6"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-port", "1"),
    ("x-forwarded-ssl", "on"),
    ("x-real-ip", "6.6.6.6"),
    ("x-client-ip", "6.6.6.6"),
    ("forwarded", "for=6.6.6.6"),
];

const CASES: &[Case] = &[
    Case {
        name: "an untrusted peer's forwarding family is dropped whole, ours set",
        trusted: false,
        method: "GET",
        host: "tbl.app.test",
        target: "/a?b=1",
        send: FAMILY,
        status: 200,
        backend: &[
            ("x-forwarded-for", Some("127.0.0.1")),
            ("x-forwarded-host", Some("tbl.app.test")),
            ("x-forwarded-proto", Some("http")),
            ("x-forwarded-port", Some("{port}")),
            ("x-real-ip", Some("127.0.0.1")),
            ("x-forwarded-ssl", None),
            ("x-client-ip", None),
            ("forwarded", None),
        ],
        response: &[],
    },
    Case {
        name: "a trusted peer's forwarding fields are kept, the chain extended",
        trusted: true,
        method: "GET",
        host: "tbl.app.test",
        target: "/",
        send: FAMILY,
        status: 200,
        backend: &[
            ("x-forwarded-for", Some("6.6.6.6, 127.0.0.1")),
            ("x-forwarded-host", Some("evil.example")),
            ("x-forwarded-proto", Some("https")),
            ("x-forwarded-port", Some("1")),
            ("x-forwarded-ssl", Some("on")),
            ("x-client-ip", Some("6.6.6.6")),
            ("forwarded", Some("for=6.6.6.6")),
            ("x-real-ip", Some("6.6.6.6")),
        ],
        response: &[],
    },
    Case {
        name: "lookalikes and hop-by-hop fields never reach the backend",
        trusted: true,
        method: "GET",
        host: "tbl.app.test",
        target: "/",
        send: &[
            ("x_forwarded_for", "6.6.6.6"),
            ("x_forwarded_port", "1"),
            ("proxy", "http://evil"),
            ("te", "trailers"),
        ],
        status: 200,
        backend: &[
            ("x_forwarded_for", None),
            ("x_forwarded_port", None),
            ("proxy", None),
            ("te", None),
            ("x-forwarded-for", Some("127.0.0.1")),
        ],
        response: &[
            ("x-hop", None),
            ("keep-alive", None),
            ("x-backend", Some("b1")),
        ],
    },
    Case {
        name: "a trusted peer's request ID is passed on and returned",
        trusted: true,
        method: "GET",
        host: "tbl.app.test",
        target: "/",
        send: &[("x-request-id", "abc-123")],
        status: 200,
        backend: &[("x-request-id", Some("abc-123"))],
        response: &[("x-request-id", Some("abc-123"))],
    },
    Case {
        name: "an untrusted peer's request ID is replaced",
        trusted: false,
        method: "GET",
        host: "tbl.app.test",
        target: "/",
        send: &[("x-request-id", "abc-123")],
        status: 200,
        backend: &[],
        response: &[("x-request-id", Some("{generated}"))],
    },
    Case {
        name: "a refused connect is retried on another instance",
        trusted: true,
        method: "GET",
        host: "retry.app.test",
        target: "/",
        send: &[],
        status: 200,
        backend: &[("x-forwarded-for", Some("127.0.0.1"))],
        response: &[],
    },
    Case {
        name: "an unknown host gets 404",
        trusted: true,
        method: "GET",
        host: "nobody.app.test",
        target: "/",
        send: &[],
        status: 404,
        backend: &[],
        response: &[("retry-after", None), ("x-request-id", Some("{generated}"))],
    },
    Case {
        name: "a known service with no healthy instance gets 503 and Retry-After",
        trusted: true,
        method: "GET",
        host: "down.app.test",
        target: "/",
        send: &[],
        status: 503,
        backend: &[],
        response: &[("retry-after", Some("5"))],
    },
    Case {
        name: "every instance refusing gets 502",
        trusted: true,
        method: "GET",
        host: "dead.app.test",
        target: "/",
        send: &[],
        status: 502,
        backend: &[],
        response: &[],
    },
    Case {
        name: "OPTIONS * is forwarded",
        trusted: true,
        method: "OPTIONS",
        host: "tbl.app.test",
        target: "*",
        send: &[],
        status: 200,
        backend: &[],
        response: &[],
    },
    Case {
        name: "* with any method but OPTIONS is refused",
        trusted: true,
        method: "GET",
        host: "tbl.app.test",
        target: "*",
        send: &[],
        status: 400,
        backend: &[],
        response: &[],
    },
    Case {
        name: "Upgrade: h2c is never forwarded",
        trusted: true,
        method: "GET",
        host: "tbl.app.test",
        target: "/",
        send: &[("upgrade", "h2c"), ("connection", "upgrade")],
        status: 200,
        backend: &[("upgrade", None)],
        response: &[],
    },
];

/// A `tbl` case again, for the same backend behind `router.proto=h2c`: the same answer,
/// for its own host, except that the router says `te: trailers` to an HTTP/2 backend
/// itself (gRPC requires it; connection-specific fields are otherwise never sent).
fn on_h2c(c: &Case) -> Option<Case> {
    let backend: Vec<(&str, Option<&str>)> = c
        .backend
        .iter()
        .map(|&(name, want)| match (name, want) {
            ("te", None) => (name, Some("trailers")),
            (_, Some("tbl.app.test")) => (name, Some("tblh2.app.test")),
            other => other,
        })
        .collect();
    (c.host == "tbl.app.test").then(|| Case {
        host: "tblh2.app.test",
        backend: Vec::leak(backend),
        ..*c
    })
}

async fn run(proto: Proto, addr: SocketAddr, c: &Case) -> Got {
    request(proto, addr, (c.method, c.host, c.target), c.send, "").await
}

fn check(c: &Case, proto: Proto, port: u16, got: &Got) -> Result<(), String> {
    if got.status.as_u16() != c.status {
        return Err(format!(
            "status {} (want {}): {}",
            got.status, c.status, got.body
        ));
    }
    let port = port.to_string();
    let sent: Vec<(String, String)> = got
        .body
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    for (name, want) in c.backend {
        let values: Vec<&str> = sent
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect();
        match want {
            None if !values.is_empty() => {
                return Err(format!("backend got {name}: {values:?}; want none"))
            }
            Some(w) => {
                let w = w.replace("{port}", &port);
                if values != [w.as_str()] {
                    return Err(format!("backend got {name}: {values:?}; want [{w:?}]"));
                }
            }
            None => {}
        }
    }
    for (name, want) in c.response {
        let got_v = got.headers.get(*name).and_then(|v| v.to_str().ok());
        match (*want, got_v) {
            (None, Some(v)) => return Err(format!("response has {name}: {v}")),
            (Some("{generated}"), Some(v)) if v != "abc-123" && !v.is_empty() => {}
            (Some(w), Some(v)) if w == v => {}
            (Some(w), v) => return Err(format!("response {name}: {v:?}, want {w:?}")),
            (None, None) => {}
        }
    }
    let _ = proto;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_table_over_http1_and_http2() {
    let consul = ConsulAgent::start().await;
    let b1 = Backend::start("b1").await;
    // The same backend over HTTP/2 (h2c): every `tbl` case runs against it too.
    let b1h2 = Backend::start_h2c("b1").await;
    let dead = free_port();
    consul.register("tbl", "tbl-1", b1.port(), &[]).await;
    consul
        .register("tblh2", "tblh2-1", b1h2.port(), &["router.proto=h2c"])
        .await;
    consul.register("retry", "retry-dead", dead, &[]).await;
    consul.register("retry", "retry-live", b1.port(), &[]).await;
    consul.register("dead", "dead-1", dead, &[]).await;
    consul
        .register_ttl("down", "down-1", b1.port(), "critical")
        .await;
    let trusted = start_router(&consul.addr(), "").await;
    let untrusted = start_router(&consul.addr(), "trusted_proxies = [\"10.9.9.9/32\"]\n").await;
    for host in [
        "tbl.app.test",
        "tblh2.app.test",
        "retry.app.test",
        "dead.app.test",
    ] {
        wait_routable(&trusted, host).await;
        wait_routable(&untrusted, host).await;
    }
    let mut failed = Vec::new();
    let mut ran = 0;
    let h2c: Vec<Case> = CASES.iter().filter_map(on_h2c).collect();
    for c in CASES.iter().chain(&h2c) {
        let router = if c.trusted { &trusted } else { &untrusted };
        for proto in [Proto::H1, Proto::H2] {
            // The retry case: every pick order must end at the live instance.
            let rounds = if c.host == "retry.app.test" { 6 } else { 1 };
            for _ in 0..rounds {
                ran += 1;
                let got = run(proto, router.proxy_addr, c).await;
                if let Err(e) = check(c, proto, router.proxy_addr.port(), &got) {
                    failed.push(format!("[{:?}] {}: {e}", proto, c.name));
                    break;
                }
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {ran} runs failed:\n  {}",
        failed.len(),
        failed.join("\n  ")
    );
    // Bodies both ways of the same size: streamed (chunked from the backend), and HEAD.
    for (proto, host) in [Proto::H1, Proto::H2]
        .into_iter()
        .flat_map(|p| [(p, "tbl.app.test"), (p, "tblh2.app.test")])
    {
        for (method, target, len) in [("GET", "/bytes/300000", 300_000), ("HEAD", "/", 0)] {
            let c = Case {
                name: "body",
                trusted: true,
                method,
                host,
                target,
                send: &[],
                status: 200,
                backend: &[],
                response: &[],
            };
            for _ in 0..3 {
                let got = run(proto, trusted.proxy_addr, &c).await;
                assert_eq!(
                    got.status,
                    StatusCode::OK,
                    "{proto:?} {host} {method} {target}: {}",
                    got.body
                );
                assert_eq!(got.body.len(), len, "{proto:?} {host} {method} {target}");
            }
        }
    }
    // One HTTP/1 connection keeps working after a local answer (keep-alive).
    let mut s = common::client::open(trusted.proxy_addr).await;
    for host in ["nobody.app.test", "tbl.app.test"] {
        let req = Request::get("/")
            .header("host", host)
            .body(Full::default())
            .unwrap();
        // The previous response must be read whole before hyper sends the next.
        s.ready()
            .await
            .expect("connection kept after a local answer");
        let got = send_on(&mut s, req, Duration::from_secs(10)).await;
        assert_ne!(got.status, StatusCode::BAD_REQUEST);
    }
}
