//! Forward auth (`router.auth=`) and IP allow-lists (`router.allow=`): one table of cases,
//! each run over HTTP/1.1 and HTTP/2, against a real Consul agent, a real echo backend and a
//! real auth service (a hyper server) that answers by the `Authorization` it gets: 2xx with
//! identity fields, 401 with `WWW-Authenticate`, 302 to a login page, 403, 500, slowness,
//! and one that answers with the question it received. Then the allow cache and metrics.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpListener;

use common::backend::{serve_h2c, serve_http, Backend};
use common::certs::{cert_dir, make_cert};
use common::client::{get_admin, request, Got, Proto};
use common::consul::ConsulAgent;
use common::metrics::{metrics, sample};
use common::net::free_port;
use common::router::{start_router, wait_routable};
use common::tls_client::tls_connect;

/// What the backend must (not) have received: `(field, Some(value))`, `(field, None)`.
type Fields = &'static [(&'static str, Option<&'static str>)];

struct Case {
    name: &'static str,
    /// The router that trusts 127.0.0.1 as a proxy, or the one that trusts nobody.
    trusted: bool,
    method: &'static str,
    host: &'static str,
    target: &'static str,
    send: &'static [(&'static str, &'static str)],
    body: &'static str,
    status: u16,
    /// Fields of the request the backend got (its echo), checked when the status is 200.
    backend: Fields,
    response: Fields,
    /// Texts the response body must contain, and must not.
    body_has: &'static [&'static str],
    body_lacks: &'static [&'static str],
}

const GOOD: (&str, &str) = ("authorization", "Bearer good");

const CASES: &[Case] = &[
    Case {
        name:
            "a 2xx lets the request through with the granted fields, the client's copies replaced",
        trusted: false,
        method: "GET",
        host: "app.app.test",
        target: "/private",
        send: &[GOOD, ("x-user", "mallory"), ("x-scopes", "admin")],
        body: "",
        status: 200,
        backend: &[
            ("x-user", Some("alice")),
            ("x-scopes", Some("read")),
            ("x-not-copied", None),
            ("authorization", Some("Bearer good")),
            ("x-forwarded-method", None),
        ],
        response: &[("x-request-id", Some("{any}"))],
        body_has: &[],
        body_lacks: &["mallory"],
    },
    Case {
        name: "a 401 goes back as the auth service gave it, WWW-Authenticate and body",
        trusted: false,
        method: "GET",
        host: "app.app.test",
        target: "/private",
        send: &[("authorization", "Bearer bad")],
        body: "",
        status: 401,
        backend: &[],
        response: &[("www-authenticate", Some("Bearer realm=\"app\""))],
        body_has: &["bad token"],
        body_lacks: &[],
    },
    Case {
        name: "a 302 to the login page goes back with its body",
        trusted: false,
        method: "GET",
        host: "app.app.test",
        target: "/private?x=1",
        send: &[],
        body: "",
        status: 302,
        backend: &[],
        response: &[(
            "location",
            Some("https://login.example/?rd=app.app.test/private?x=1"),
        )],
        body_has: &["please log in"],
        body_lacks: &[],
    },
    Case {
        name: "a 403 goes back",
        trusted: false,
        method: "GET",
        host: "app.app.test",
        target: "/",
        send: &[("authorization", "Bearer forbid")],
        body: "",
        status: 403,
        backend: &[],
        response: &[],
        body_has: &["not yours"],
        body_lacks: &[],
    },
    Case {
        name: "a 500 from the auth service goes back; the request never passes",
        trusted: false,
        method: "GET",
        host: "app.app.test",
        target: "/",
        send: &[("authorization", "Bearer crash")],
        body: "",
        status: 500,
        backend: &[],
        response: &[],
        body_has: &["auth broke"],
        body_lacks: &[],
    },
    Case {
        name: "an auth service slower than auth_timeout: 503",
        trusted: false,
        method: "GET",
        host: "app.app.test",
        target: "/",
        send: &[("authorization", "Bearer slow")],
        body: "",
        status: 503,
        backend: &[],
        response: &[("retry-after", Some("5"))],
        body_has: &["authorization service unavailable"],
        body_lacks: &[],
    },
    Case {
        name: "an auth service Consul does not know: 503",
        trusted: false,
        method: "GET",
        host: "noauth.app.test",
        target: "/",
        send: &[GOOD],
        body: "",
        status: 503,
        backend: &[],
        response: &[],
        body_has: &["authorization service unavailable"],
        body_lacks: &[],
    },
    Case {
        name: "an auth service whose instances refuse connections: 503",
        trusted: false,
        method: "GET",
        host: "deadauth.app.test",
        target: "/",
        send: &[GOOD],
        body: "",
        status: 503,
        backend: &[],
        response: &[],
        body_has: &["authorization service unavailable"],
        body_lacks: &[],
    },
    Case {
        name: "the question: method, URI and fields, no body, no client copies of granted fields",
        trusted: false,
        method: "POST",
        host: "app.app.test",
        target: "/q?x=1",
        send: &[
            ("authorization", "Bearer echo"),
            ("x-user", "mallory"),
            ("x-forwarded-method", "GET"),
            ("content-type", "text/plain"),
        ],
        body: "secret-body",
        status: 403,
        backend: &[],
        response: &[],
        body_has: &[
            "POST /q?x=1\n",
            "x-forwarded-method: POST\n",
            "x-forwarded-uri: /q?x=1\n",
            "x-forwarded-host: app.app.test\n",
            "x-forwarded-for: 127.0.0.1\n",
            "x-forwarded-proto: http\n",
            "content-type: text/plain\n",
            "body: 0 bytes",
        ],
        body_lacks: &[
            "secret-body",
            "mallory",
            "content-length",
            "transfer-encoding",
            "x-forwarded-method: GET",
        ],
    },
    Case {
        name: "an allowed POST's body reaches the backend",
        trusted: false,
        method: "POST",
        host: "app.app.test",
        target: "/collect",
        send: &[GOOD],
        body: "hello-body",
        status: 200,
        backend: &[],
        response: &[],
        body_has: &["hello-body"],
        body_lacks: &[],
    },
    Case {
        name: "an allow-list refuses other clients with 403",
        trusted: false,
        method: "GET",
        host: "walled.app.test",
        target: "/",
        send: &[],
        body: "",
        status: 403,
        backend: &[],
        response: &[],
        body_has: &["forbidden"],
        body_lacks: &[],
    },
    Case {
        name: "an allow-list takes the client a trusted proxy names",
        trusted: true,
        method: "GET",
        host: "walled.app.test",
        target: "/",
        send: &[("x-forwarded-for", "10.1.2.3")],
        body: "",
        status: 200,
        backend: &[("x-real-ip", Some("10.1.2.3"))],
        response: &[],
        body_has: &[],
        body_lacks: &[],
    },
    Case {
        name: "an allow-list does not believe an untrusted peer's X-Forwarded-For",
        trusted: false,
        method: "GET",
        host: "walled.app.test",
        target: "/",
        send: &[("x-forwarded-for", "10.1.2.3")],
        body: "",
        status: 403,
        backend: &[],
        response: &[],
        body_has: &[],
        body_lacks: &[],
    },
    Case {
        name: "an allow-list is checked before auth",
        trusted: false,
        method: "GET",
        host: "both.app.test",
        target: "/",
        send: &[("authorization", "Bearer echo")],
        body: "",
        status: 403,
        backend: &[],
        response: &[],
        body_has: &["forbidden"],
        body_lacks: &[],
    },
    Case {
        name: "an allow-list lets listed clients in",
        trusted: false,
        method: "GET",
        host: "local.app.test",
        target: "/",
        send: &[],
        body: "",
        status: 200,
        backend: &[],
        response: &[],
        body_has: &[],
        body_lacks: &[],
    },
    Case {
        name: "an auth service over h2c: a 2xx grants its fields",
        trusted: false,
        method: "GET",
        host: "h2auth.app.test",
        target: "/private",
        send: &[GOOD, ("x-user", "mallory")],
        body: "",
        status: 200,
        backend: &[("x-user", Some("alice")), ("x-scopes", Some("read"))],
        response: &[],
        body_has: &[],
        body_lacks: &["mallory"],
    },
    Case {
        name: "an auth service over h2c: a 401 goes back with its body",
        trusted: false,
        method: "POST",
        host: "h2auth.app.test",
        target: "/",
        send: &[("authorization", "Bearer bad")],
        body: "a body never asked about",
        status: 401,
        backend: &[],
        response: &[("www-authenticate", Some("Bearer realm=\"app\""))],
        body_has: &["bad token"],
        body_lacks: &[],
    },
    Case {
        name: "an auth service over h2c: no answer in time is 503",
        trusted: false,
        method: "GET",
        host: "h2auth.app.test",
        target: "/",
        send: &[("authorization", "Bearer slow")],
        body: "",
        status: 503,
        backend: &[],
        response: &[],
        body_has: &["authorization service unavailable"],
        body_lacks: &[],
    },
    Case {
        name: "an auth service that is not exposed is not routed",
        trusted: false,
        method: "GET",
        host: "sso.app.test",
        target: "/",
        send: &[GOOD],
        body: "",
        status: 404,
        backend: &[],
        response: &[],
        body_has: &[],
        body_lacks: &[],
    },
];

fn check(c: &Case, got: &Got) -> Result<(), String> {
    if got.status.as_u16() != c.status {
        return Err(format!(
            "status {} (want {}): {}",
            got.status, c.status, got.body
        ));
    }
    let echoed: Vec<(&str, &str)> = got
        .body
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(": "))
        .collect();
    for (name, want) in c.backend {
        let values: Vec<&str> = echoed
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| *v)
            .collect();
        match want {
            None if !values.is_empty() => {
                return Err(format!("backend got {name}: {values:?}; want none"))
            }
            Some(w) if values != [*w] => {
                return Err(format!("backend got {name}: {values:?}; want [{w:?}]"))
            }
            _ => {}
        }
    }
    for (name, want) in c.response {
        let v = got.headers.get(*name).and_then(|v| v.to_str().ok());
        match (*want, v) {
            (None, Some(v)) => return Err(format!("response has {name}: {v}")),
            (Some("{any}"), Some(_)) | (None, None) => {}
            (Some(w), Some(v)) if w == v => {}
            (Some(w), v) => return Err(format!("response {name}: {v:?}, want {w:?}")),
        }
    }
    for text in c.body_has {
        if !got.body.contains(text) {
            return Err(format!("body lacks {text:?}: {}", got.body));
        }
    }
    for text in c.body_lacks {
        if got.body.contains(text) {
            return Err(format!("body has {text:?}: {}", got.body));
        }
    }
    Ok(())
}

/// The auth service: answers by the `Authorization` it gets, and records each question's
/// `Authorization` value.
async fn start_sso() -> (u16, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    start_sso_as(false).await
}

/// The auth service over HTTP/1.1, or over HTTP/2 with prior knowledge (`h2c`).
async fn start_sso_as(h2c: bool) -> (u16, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = asked.clone();
    let handler = move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move { Ok::<_, Infallible>(sso(req, &seen).await) }
    };
    let task = if h2c {
        serve_h2c(listener, handler)
    } else {
        serve_http(listener, handler)
    };
    (port, asked, task)
}

async fn sso(req: Request<Incoming>, seen: &Mutex<Vec<String>>) -> Response<Full<Bytes>> {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    seen.lock().unwrap().push(auth.clone());
    let answer = |status: u16, fields: &[(&str, &str)], body: String| {
        let mut b = Response::builder().status(status);
        for (k, v) in fields {
            b = b.header(*k, *v);
        }
        b.body(Full::new(Bytes::from(body))).unwrap()
    };
    match auth.as_str() {
        "Bearer good" => answer(
            200,
            &[
                ("x-user", "alice"),
                ("x-scopes", "read"),
                ("x-not-copied", "1"),
            ],
            "ok".into(),
        ),
        "Bearer bad" => answer(
            401,
            &[("www-authenticate", "Bearer realm=\"app\"")],
            "bad token\n".into(),
        ),
        "Bearer forbid" => answer(403, &[], "not yours\n".into()),
        "Bearer crash" => answer(500, &[], "auth broke\n".into()),
        "Bearer slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            answer(200, &[], String::new())
        }
        "Bearer echo" => {
            let mut text = format!("{} {}\n", req.method(), req.uri());
            for (k, v) in req.headers() {
                text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
            }
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(usize::MAX);
            text.push_str(&format!("body: {body} bytes\n"));
            answer(403, &[], text)
        }
        _ => {
            let host = req
                .headers()
                .get("x-forwarded-host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let uri = req
                .headers()
                .get("x-forwarded-uri")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let to = format!("https://login.example/?rd={host}{uri}");
            answer(302, &[("location", &to)], "please log in\n".into())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_and_allow_lists_over_http1_and_http2() {
    let consul = ConsulAgent::start().await;
    let app = Backend::start("app").await;
    let (sso_port, asked, _sso) = start_sso().await;
    let dead = free_port();
    let expose = "router.expose=true";
    let auth = "router.auth=sso";
    let copy = "router.auth-headers=X-User, X-Scopes";
    consul.register("sso", "sso-1", sso_port, &[]).await;
    let (sso2_port, _, _sso2) = start_sso_as(true).await;
    consul
        .register("sso2", "sso2-1", sso2_port, &["router.proto=h2c"])
        .await;
    let h2auth = &[expose, "router.auth=sso2", copy];
    consul
        .register("h2auth", "h2auth-1", app.port(), h2auth)
        .await;
    consul.register("deadsso", "deadsso-1", dead, &[]).await;
    consul
        .register("app", "app-1", app.port(), &[expose, auth, copy])
        .await;
    let cache = "router.auth-cache=30s";
    consul
        .register("cached", "cached-1", app.port(), &[expose, auth, cache])
        .await;
    let noauth = &[expose, "router.auth=nosuch"];
    consul
        .register("noauth", "noauth-1", app.port(), noauth)
        .await;
    let deadauth = &[expose, "router.auth=deadsso"];
    consul
        .register("deadauth", "deadauth-1", app.port(), deadauth)
        .await;
    let walled = &[expose, "router.allow=10.0.0.0/8"];
    consul
        .register("walled", "walled-1", app.port(), walled)
        .await;
    let both = &[expose, "router.allow=10.0.0.0/8", auth];
    consul.register("both", "both-1", app.port(), both).await;
    let local = &[expose, "router.allow=192.0.2.1, 127.0.0.1"];
    consul.register("local", "local-1", app.port(), local).await;

    let common = "expose = \"tagged\"\n[proxy]\nauth_timeout = \"500ms\"\nretries = 1\n";
    let trusted = start_router(&consul.addr(), common).await;
    let untrusted = start_router(
        &consul.addr(),
        &format!("trusted_proxies = [\"10.9.9.9/32\"]\n{common}"),
    )
    .await;
    for host in [
        "app.app.test",
        "cached.app.test",
        "walled.app.test",
        "local.app.test",
        "deadauth.app.test",
        "h2auth.app.test",
    ] {
        wait_routable(&trusted, host).await;
        wait_routable(&untrusted, host).await;
    }
    let mut failed = Vec::new();
    for c in CASES {
        let router = if c.trusted { &trusted } else { &untrusted };
        for proto in [Proto::H1, Proto::H2] {
            let req = (c.method, c.host, c.target);
            let got = request(proto, router.proxy_addr, req, c.send, c.body).await;
            if let Err(e) = check(c, &got) {
                failed.push(format!("[{proto:?}] {}: {e}", c.name));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} runs failed:\n  {}",
        failed.len(),
        CASES.len() * 2,
        failed.join("\n  ")
    );

    // A gRPC call: the router's own 503 takes gRPC's form (UNAVAILABLE), while the auth
    // service's answer goes back as it gave it.
    let grpc = [("content-type", "application/grpc"), GOOD];
    let call = ("POST", "noauth.app.test", "/pkg.Svc/Call");
    let got = request(Proto::H2, untrusted.proxy_addr, call, &grpc, "").await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.headers["grpc-status"], "14");
    let denied = [
        ("content-type", "application/grpc"),
        ("authorization", "Bearer bad"),
    ];
    let call = ("POST", "app.app.test", "/pkg.Svc/Call");
    let got = request(Proto::H2, untrusted.proxy_addr, call, &denied, "").await;
    assert_eq!(got.status, 401, "{}", got.body);
    assert!(got.headers.get("grpc-status").is_none());

    // Allow decisions are cached by Authorization for `router.auth-cache`; denials never.
    let asked_with = |token: &str| asked.lock().unwrap().iter().filter(|a| *a == token).count();
    let before = asked_with("Bearer good");
    for proto in [Proto::H1, Proto::H2, Proto::H1] {
        let req = ("GET", "cached.app.test", "/");
        let got = request(proto, untrusted.proxy_addr, req, &[GOOD], "").await;
        assert_eq!(got.status, 200, "{}", got.body);
    }
    assert_eq!(
        asked_with("Bearer good") - before,
        1,
        "asked once, then cached"
    );
    let before = asked_with("Bearer bad");
    for _ in 0..2 {
        let req = ("GET", "cached.app.test", "/");
        let got = request(
            Proto::H1,
            untrusted.proxy_addr,
            req,
            &[("authorization", "Bearer bad")],
            "",
        )
        .await;
        assert_eq!(got.status, 401);
    }
    assert_eq!(
        asked_with("Bearer bad") - before,
        2,
        "denials are not cached"
    );

    // `/api/routes` shows each service's policy.
    let (_, routes) = get_admin(untrusted.admin_addr, "/api/routes").await;
    let v: serde_json::Value = serde_json::from_str(&routes).unwrap();
    let route = |host: &str| {
        v["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["host"] == host)
            .cloned()
            .unwrap_or_default()
    };
    let app_access = &route("app.app.test")["access"];
    assert_eq!(app_access["auth"], "sso", "{routes}");
    assert_eq!(
        app_access["auth_headers"],
        serde_json::json!(["x-user", "x-scopes"])
    );
    assert_eq!(
        route("cached.app.test")["access"]["auth_cache_seconds"],
        30.0
    );
    assert_eq!(
        route("walled.app.test")["access"]["allow"],
        serde_json::json!([["10.0.0.0/8"]])
    );
    assert!(
        route("sso.app.test").is_null(),
        "an auth service has no host"
    );

    let text = metrics(untrusted.admin_addr).await;
    let decisions = "consul_router_auth_decisions_total";
    for (service, outcome) in [
        ("app", "allowed"),
        ("app", "denied"),
        ("app", "error"),
        ("cached", "cached"),
        ("noauth", "error"),
    ] {
        let n = sample(
            &text,
            decisions,
            &[("service", service), ("outcome", outcome)],
        );
        assert!(n > 0.0, "{service} {outcome}: {text}");
    }
    let n = sample(
        &text,
        "consul_router_auth_duration_seconds_count",
        &[("service", "app")],
    );
    assert!(n >= 2.0 * 8.0, "eight app cases over two protocols: {n}");
    assert_eq!(
        sample(&text, decisions, &[("service", "walled")]),
        0.0,
        "a service without auth has no decisions"
    );
}

/// The same step behind TLS: the question says `https` and the TLS port, on both ALPN
/// protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_over_tls() {
    let consul = ConsulAgent::start().await;
    let app = Backend::start("app").await;
    let (sso_port, _, _sso) = start_sso().await;
    consul.register("sso", "sso-1", sso_port, &[]).await;
    consul
        .register("app", "app-1", app.port(), &["router.auth=sso"])
        .await;
    let dir = cert_dir("auth-tls");
    let (cert, key) = make_cert(&dir, "wild", &["*.app.test"]);
    let port = free_port();
    let toml = format!(
        "[tls]\nlisten = \"127.0.0.1:{port}\"\n[[tls.certs]]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let router = start_router(&consul.addr(), &toml).await;
    wait_routable(&router, "app.app.test").await;
    let addr = router.tls_addr.expect("a TLS listener");
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let tls = tls_connect(addr, Some("app.app.test"), &[alpn]).await;
        let io = hyper_util::rt::TokioIo::new(tls);
        let req = Request::get("https://app.app.test/in?tls=1")
            .header("authorization", "Bearer echo")
            .body(Full::<Bytes>::default())
            .unwrap();
        let resp = if alpn == b"h2" {
            let exec = hyper_util::rt::TokioExecutor::new();
            let (mut s, conn) = hyper::client::conn::http2::handshake(exec, io)
                .await
                .unwrap();
            tokio::spawn(conn);
            s.send_request(req).await.unwrap()
        } else {
            let (mut s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            let (mut parts, body) = req.into_parts();
            parts.uri = "/in?tls=1".parse().unwrap();
            parts
                .headers
                .insert("host", "app.app.test".parse().unwrap());
            s.send_request(Request::from_parts(parts, body))
                .await
                .unwrap()
        };
        assert_eq!(resp.status(), 403, "{alpn:?}");
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        for want in [
            "GET /in?tls=1\n".to_owned(),
            "x-forwarded-proto: https\n".to_owned(),
            format!("x-forwarded-port: {port}\n"),
            "x-forwarded-uri: /in?tls=1\n".to_owned(),
        ] {
            assert!(text.contains(&want), "{alpn:?}: {want:?} not in {text}");
        }
    }
}
