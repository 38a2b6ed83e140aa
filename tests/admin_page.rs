//! The admin page in a real browser: a real Consul agent, a router, and headless Chromium
//! loading `/` and dumping the DOM it rendered (and a screenshot). Also the admin token: the
//! API refuses requests without it, `/healthz` never does, and the page asks for it.
//!
//! Needs Debian's `chromium`: installed with `apt-get install -y chromium` when missing and
//! running as root; otherwise the tests fail and say so (set `CHROMIUM=/path` to use another).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use consul_router::consul::types::{Registration, TtlCheck, Weights};
use http::{Request, StatusCode};
use http_body_util::Full;

const TOKEN: &str = "s3cret-Admin.token";

/// The Chromium binary: $CHROMIUM, else `chromium` on PATH, else installed with apt-get
/// when running as root. Panics with what to do otherwise.
fn chromium() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("CHROMIUM") {
            return PathBuf::from(p);
        }
        if let Some(p) = on_path() {
            return p;
        }
        if !is_root() {
            panic!(
                "tests/admin_page.rs drives headless Chromium and none was found: run \
                 `apt-get install -y chromium` as root (the test does it itself when run as \
                 root), or set CHROMIUM=/path/to/chromium"
            );
        }
        assert!(
            apt_install(&["chromium"]),
            "`apt-get install -y chromium` failed; install Chromium or set CHROMIUM=/path"
        );
        on_path().expect("chromium installed but not on PATH")
    })
}

fn on_path() -> Option<PathBuf> {
    find_program(&["chromium", "chromium-browser"], &[])
}

/// Runs headless Chromium on `url` with `args`, at most 90 s; returns its standard output.
/// One browser at a time: the machine running the suite may be small.
async fn run_chromium(args: Vec<String>, url: String) -> String {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let bin = chromium().to_owned();
    tokio::task::spawn_blocking(move || {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = TempDir::new("admin-page");
        let out = dir.join("stdout");
        let err = dir.join("stderr");
        let mut child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .args(&args)
            .arg(&url)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let Some(status) = wait_child(&mut child, Duration::from_secs(90)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium on {url} still running after 90 s; stderr:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        };
        let stdout = std::fs::read_to_string(&out).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err).unwrap_or_default();
        assert!(
            status.success(),
            "chromium on {url} exited with {status}; stderr:\n{stderr}"
        );
        stdout
    })
    .await
    .unwrap()
}

/// The DOM Chromium rendered for `url`, after the page's scripts ran for 5 s of virtual time.
async fn dump_dom(url: String) -> String {
    let dom = run_chromium(
        vec!["--virtual-time-budget=5000".into(), "--dump-dom".into()],
        url,
    )
    .await;
    assert!(dom.contains("<html"), "no DOM dumped: {dom:?}");
    dom
}

/// The rendered part of the page (its `<main>`), for assertions and failure messages. The
/// script is left out, so text found here is what the page drew.
fn main_of(dom: &str) -> &str {
    let start = dom.find("<main id=\"list\">").expect("<main> in the page");
    let end = dom[start..]
        .find("</main>")
        .map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

/// The `<section>` the page drew for `service`.
fn section<'a>(dom: &'a str, service: &str) -> &'a str {
    let main = main_of(dom);
    let start = main
        .find(&format!("data-service=\"{service}\""))
        .unwrap_or_else(|| panic!("no section for {service} in the page:\n{}", cut(main)));
    let end = main[start..]
        .find("</section>")
        .map_or(main.len(), |e| start + e);
    &main[start..end]
}

fn cut(s: &str) -> &str {
    let mut end = s.len().min(6000);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The text of the element with `id="<id>"` up to its closing tag `</tag>`.
fn element<'a>(dom: &'a str, id: &str, tag: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let end = dom[start..]
        .find(&format!("</{tag}>"))
        .map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

async fn admin(addr: SocketAddr, path: &str, token: Option<&str>) -> Got {
    let mut req = Request::get(path).header("host", "admin");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    send(addr, req.body(Full::<Bytes>::default()).unwrap()).await
}

/// Services in `/api/routes`, and the body.
async fn routed(addr: SocketAddr, token: Option<&str>) -> (BTreeSet<String>, serde_json::Value) {
    let g = admin(addr, "/api/routes", token).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.body);
    let v: serde_json::Value = serde_json::from_str(&g.body).expect("routes JSON");
    let names = v["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .filter_map(|r| r["service"].as_str().map(str::to_owned))
        .collect();
    (names, v)
}

fn ttl(id: &str, status: &str) -> Option<TtlCheck> {
    Some(TtlCheck {
        check_id: format!("{id}-ttl"),
        ttl: "10m".into(),
        status: status.into(),
        deregister_after: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_page_renders_hosts_services_and_instances_in_chromium() {
    chromium();
    let consul = ConsulAgent::start().await;
    let backend = Backend::start("b").await;
    let port = backend.port();
    // web: one instance passing, one critical (not routable).
    consul.register("web", "web-1", port, &[]).await;
    consul.register_ttl("web", "web-2", port, "critical").await;
    // api: least-load, a reported load and a weight.
    consul
        .register_with(Registration {
            id: "api-1".into(),
            name: "api".into(),
            tags: vec!["router.strategy=least-load".into()],
            address: "127.0.0.1".into(),
            port,
            meta: [("load".to_owned(), "3.5".to_owned())].into(),
            weights: Some(Weights {
                passing: 7,
                warning: 1,
            }),
            ..Default::default()
        })
        .await;
    // pay: its own host, one instance warning (not routed without include_warning).
    consul
        .register_with(Registration {
            id: "pay-1".into(),
            name: "pay".into(),
            tags: vec![
                "router.host=pay.example.com".into(),
                "router.strategy=ip-hash".into(),
            ],
            address: "127.0.0.1".into(),
            port,
            check: ttl("pay-1", "warning"),
            ..Default::default()
        })
        .await;
    // 27 more, 30 in all.
    for i in 0..27 {
        consul
            .register(&format!("svc-{i:02}"), &format!("svc-{i:02}-a"), port, &[])
            .await;
    }
    let router = start_router(&consul.addr(), "").await;
    let a = router.admin_addr;
    wait_until(
        Duration::from_secs(20),
        "30 services routed",
        || async move {
            let (names, v) = routed(a, None).await;
            let pay_warning = v["routes"].as_array().is_some_and(|rs| {
                rs.iter()
                    .any(|r| r["service"] == "pay" && r["instances"][0]["health"] == "warning")
            });
            names.len() == 30 && pay_warning
        },
    )
    .await;

    // Traffic, so the counters the page reads move.
    for _ in 0..5 {
        assert_eq!(
            get(router.proxy_addr, "web.app.test", "/").await.status,
            StatusCode::OK
        );
    }
    let stats = admin(a, "/api/stats", None).await;
    assert_eq!(stats.status, StatusCode::OK);
    let stats: serde_json::Value = serde_json::from_str(&stats.body).unwrap();
    assert!(stats["requests"]["web"][1].as_f64() >= Some(5.0), "{stats}");
    assert!(stats["table_age_seconds"].as_f64().is_some(), "{stats}");
    assert!(stats["at_seconds"].as_f64().is_some(), "{stats}");

    let base = format!("http://{a}/");
    let dom = dump_dom(base.clone()).await;
    let main = main_of(&dom);
    assert_eq!(
        main.matches("<section class=\"svc").count(),
        30,
        "one section per service:\n{}",
        cut(main)
    );

    let web = section(&dom, "web");
    assert!(web.contains("<h2>web</h2>"), "{web}");
    assert!(
        web.contains("<span class=\"host\">web.app.test</span>"),
        "{web}"
    );
    assert!(web.contains(">random</span>"), "{web}");
    assert!(web.contains("1/2 routable"), "{web}");
    assert!(web.contains("<td>web-1</td>"), "{web}");
    assert!(web.contains("<td>web-2</td>"), "{web}");
    assert!(
        web.contains("<span class=\"health passing\">passing</span>"),
        "{web}"
    );
    assert!(
        web.contains("<span class=\"health critical\">critical</span>"),
        "{web}"
    );
    assert!(web.contains(&format!("127.0.0.1:{port}")), "{web}");

    let api = section(&dom, "api");
    assert!(api.contains(">least-load</span>"), "{api}");
    assert!(api.contains("<td>api-1</td>"), "{api}");
    assert!(api.contains("<td class=\"num\">7</td>"), "weight 7: {api}");
    assert!(
        api.contains("<td class=\"num\">3.5</td>"),
        "load 3.5: {api}"
    );

    let pay = section(&dom, "pay");
    assert!(
        pay.contains("<span class=\"host\">pay.example.com</span>"),
        "{pay}"
    );
    assert!(pay.contains(">ip-hash</span>"), "{pay}");
    assert!(pay.contains("0/1 routable"), "{pay}");
    assert!(
        pay.contains("<span class=\"health warning\">warning</span>"),
        "{pay}"
    );
    let svc = section(&dom, "svc-07");
    assert!(
        svc.contains("<span class=\"host\">svc-07.app.test</span>"),
        "{svc}"
    );

    // The header: the table's generation and totals, and that it is live.
    let summary = element(&dom, "summary", "div");
    assert!(summary.contains("generation <b>"), "{summary}");
    assert!(summary.contains("services <b>30</b>"), "{summary}");
    assert!(summary.contains("instances <b>31</b>"), "{summary}");
    assert!(summary.contains("not routable <b>2</b>"), "{summary}");
    assert!(summary.contains("Consul answered <b>"), "{summary}");
    let status = element(&dom, "status", "span");
    assert!(status.contains("live · updated"), "{status}");
    let count = element(&dom, "count", "span");
    assert!(
        count.contains("showing 30 of 30 matching (30 services)"),
        "{count}"
    );

    // The filter, from the address: only matching services are drawn.
    let dom = dump_dom(format!("{base}?filter=svc-07")).await;
    let main = main_of(&dom);
    assert_eq!(main.matches("<section").count(), 1, "{}", cut(main));
    assert!(main.contains("data-service=\"svc-07\""));
    let dom = dump_dom(format!("{base}?filter=critical")).await;
    let main = main_of(&dom);
    assert_eq!(main.matches("<section").count(), 1, "{}", cut(main));
    assert!(main.contains("data-service=\"web\""));
    // Problems only: web (a critical instance) and pay (nothing routable).
    let dom = dump_dom(format!("{base}?problems=1")).await;
    let main = main_of(&dom);
    assert_eq!(main.matches("<section").count(), 2, "{}", cut(main));
    assert!(main.contains("<section class=\"svc down\" data-service=\"pay\""));
    assert!(main.contains("<section class=\"svc warn\" data-service=\"web\""));

    // A screenshot: a real PNG of the requested size.
    let shots = TempDir::new("admin-page-png");
    let png = shots.join("page.png");
    run_chromium(
        vec![
            "--virtual-time-budget=5000".into(),
            "--window-size=1280,900".into(),
            format!("--screenshot={}", png.display()),
        ],
        base,
    )
    .await;
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.len() > 10_000, "screenshot of {} bytes", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1280, 900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_the_api_and_the_page_asks_for_it() {
    chromium();
    let consul = ConsulAgent::start().await;
    let backend = Backend::start("b").await;
    consul
        .register("guarded", "guarded-1", backend.port(), &[])
        .await;
    let router = start_router(&consul.addr(), &format!("admin_token = \"{TOKEN}\"")).await;
    let a = router.admin_addr;

    for path in ["/api/routes", "/api/stats", "/metrics", "/nope"] {
        let g = admin(a, path, None).await;
        assert_eq!(g.status, StatusCode::UNAUTHORIZED, "{path} without a token");
        let challenge = g.headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Bearer "), "{path}: {challenge}");
        assert!(!challenge.contains("error="), "{path}: {challenge}");
        let g = admin(a, path, Some("wrong")).await;
        assert_eq!(
            g.status,
            StatusCode::UNAUTHORIZED,
            "{path} with a wrong token"
        );
        let challenge = g.headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    }
    let req = Request::get("/metrics")
        .header("host", "admin")
        .header("authorization", format!("Basic {TOKEN}"))
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(send(a, req).await.status, StatusCode::UNAUTHORIZED);
    for path in ["/api/routes", "/api/stats", "/metrics"] {
        let g = admin(a, path, Some(TOKEN)).await;
        assert_eq!(g.status, StatusCode::OK, "{path} with the token");
    }
    assert_eq!(
        admin(a, "/nope", Some(TOKEN)).await.status,
        StatusCode::NOT_FOUND
    );
    wait_until(Duration::from_secs(20), "guarded routed", || async move {
        routed(a, Some(TOKEN)).await.0.contains("guarded")
    })
    .await;
    // /healthz: always, whatever the credentials.
    for token in [None, Some("wrong"), Some(TOKEN)] {
        let g = admin(a, "/healthz", token).await;
        assert_eq!(g.status, StatusCode::OK, "/healthz with {token:?}");
    }
    // The page is a shell without data, so it loads without the token and asks for it.
    let page = admin(a, "/", None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.headers.contains_key("content-security-policy"));
    assert!(!page.body.contains("guarded"));

    let base = format!("http://{a}/");
    let dom = dump_dom(base.clone()).await;
    let auth = element(&dom, "auth", "form");
    assert!(
        auth.starts_with("id=\"auth\">"),
        "the token form shows: {auth}"
    );
    let status = element(&dom, "status", "span");
    assert!(status.contains("token required"), "{status}");
    assert!(
        !main_of(&dom).contains("data-service"),
        "no data without the token"
    );

    // With the token (in the fragment, never sent to the server): the routes.
    let dom = dump_dom(format!("{base}#token={TOKEN}")).await;
    let auth = element(&dom, "auth", "form");
    assert!(auth.starts_with("id=\"auth\" hidden"), "{auth}");
    let guarded = section(&dom, "guarded");
    assert!(guarded.contains("<td>guarded-1</td>"), "{guarded}");
    assert!(
        guarded.contains("<span class=\"health passing\">passing</span>"),
        "{guarded}"
    );
}

/// 2,000 services (from a fake Consul: a real agent takes too long to register them): the
/// page draws the first 100 and offers more, and the filter finds any one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_services_render_in_chunks() {
    chromium();
    let fake = fake_consul::FakeConsul::start().await;
    fake.set(|m| {
        for i in 0..2000u16 {
            let name = format!("s{i:04}");
            let instances = (0..3).map(|k| (format!("{name}-{k}"), 20000 + k)).collect();
            m.services.insert(name, instances);
        }
    });
    let router = start_router(&fake.url(), "").await;
    let a = router.admin_addr;
    wait_until(
        Duration::from_secs(30),
        "2,000 services routed",
        || async move { routed(a, None).await.0.len() == 2000 },
    )
    .await;

    let base = format!("http://{a}/");
    let start = Instant::now();
    let dom = dump_dom(base.clone()).await;
    let took = start.elapsed();
    let main = main_of(&dom);
    assert_eq!(main.matches("<section").count(), 100, "{}", cut(main));
    assert!(main.contains("data-service=\"s0000\""));
    assert!(main.contains("data-service=\"s0099\""));
    assert!(!main.contains("data-service=\"s0100\""));
    let count = element(&dom, "count", "span");
    assert!(
        count.contains("showing 100 of 2,000 matching (2,000 services)"),
        "{count}"
    );
    let more = element(&dom, "more", "button");
    assert!(!more.contains("hidden"), "Show more is offered: {more}");
    let summary = element(&dom, "summary", "div");
    assert!(summary.contains("services <b>2,000</b>"), "{summary}");
    assert!(took < Duration::from_secs(60), "page took {took:?}");

    let dom = dump_dom(format!("{base}?filter=s1234")).await;
    let main = main_of(&dom);
    assert_eq!(main.matches("<section").count(), 1, "{}", cut(main));
    let s = section(&dom, "s1234");
    assert!(s.contains("<td>s1234-2</td>"), "{s}");
    let more = element(&dom, "more", "button");
    assert!(more.contains("hidden"), "{more}");
}
