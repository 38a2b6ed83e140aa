//! Host routing against a real Consul agent: hosts, health, membership, Meta, admin API.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_hosts_and_answers_bad_requests() {
    let consul = ConsulAgent::start().await;
    let chat = Backend::start("chat-1").await;
    let legacy = Backend::start("legacy-1").await;
    consul.register("chat", "chat-1", chat.port(), &[]).await;
    consul
        .register(
            "Legacy_App",
            "legacy-1",
            legacy.port(),
            &["router.host=www.legacy.example"],
        )
        .await;
    let router = start_router(&consul.addr(), "").await;
    let p = router.proxy_addr;
    wait_status(p, "chat.app.test", StatusCode::OK).await;

    // Case, port and trailing dot do not matter.
    for host in [
        "chat.app.test",
        "CHAT.App.Test",
        "chat.app.test:8080",
        "chat.app.test.",
    ] {
        let g = get(p, host, "/hello?x=1").await;
        assert_eq!(g.status, StatusCode::OK, "{host}");
        assert_eq!(who(&g), "chat-1");
        assert!(g.body.contains("GET /hello?x=1"), "{}", g.body);
        // Host is kept as the client sent it.
        assert!(g.body.contains(&format!("host: {host}\n")), "{}", g.body);
    }
    // A host declared by tag, for a name that is no DNS label.
    let g = get(p, "www.legacy.example", "/").await;
    assert_eq!(who(&g), "legacy-1");

    // Absolute-form: the target's authority is the host, and the backend sees origin-form.
    let req = Request::get("http://chat.app.test/abs?q=2")
        .header("host", "other.example")
        .body(Full::<Bytes>::default())
        .unwrap();
    let g = send(p, req).await;
    assert_eq!(who(&g), "chat-1");
    assert!(g.body.contains("GET /abs?q=2\n"), "{}", g.body);
    assert!(g.body.contains("host: chat.app.test\n"), "{}", g.body);

    // Unknown host: 404 with a short body.
    let g = get(p, "nope.app.test", "/").await;
    assert_eq!(g.status, StatusCode::NOT_FOUND);
    assert_eq!(g.body, "no service for this host\n");
    let g = get(p, "x.chat.app.test", "/").await;
    assert_eq!(g.status, StatusCode::NOT_FOUND);
    // Invalid Host: 400.
    let g = get(p, "bad host!", "/").await;
    assert_eq!(g.status, StatusCode::BAD_REQUEST);
    // CONNECT is refused, not tunnelled.
    let req = Request::connect("chat.app.test:443")
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(send(p, req).await.status, StatusCode::METHOD_NOT_ALLOWED);
    // Two Host headers: 400.
    let req = Request::get("/")
        .header("host", "chat.app.test")
        .header("host", "other.app.test")
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(send(p, req).await.status, StatusCode::BAD_REQUEST);

    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_membership_changes_land_within_a_second() {
    let consul = ConsulAgent::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    consul.register_ttl("web", "a", a.port(), "passing").await;
    let router = start_router(&consul.addr(), "").await;
    let p = router.proxy_addr;
    let only = |want: &'static str| async move {
        for _ in 0..10 {
            if who(&get(p, "web.app.test", "/").await) != want {
                return false;
            }
        }
        true
    };
    wait_until(Duration::from_secs(5), "a serves", || only("a")).await;

    // A new instance joins (critical at first: no traffic), then passes.
    consul.register_ttl("web", "b", b.port(), "critical").await;
    let admin = router.admin_addr;
    wait_until(
        Duration::from_secs(5),
        "b in the table, critical",
        || async {
            listed_instance(admin, "b")
                .await
                .is_some_and(|i| i["health"] == "critical")
        },
    )
    .await;
    assert!(only("a").await, "a critical instance got traffic");
    consul.set_check("b", "passing").await;
    consul.set_check("a", "critical").await;
    let t = std::time::Instant::now();
    wait_until(Duration::from_secs(1), "b alone within a second", || {
        only("b")
    })
    .await;
    eprintln!("health change visible after {:?}", t.elapsed());

    // Warning is not routable by default.
    consul.set_check("b", "warning").await;
    wait_until(
        Duration::from_secs(1),
        "503 with all critical/warning",
        || async { get(p, "web.app.test", "/").await.status == StatusCode::SERVICE_UNAVAILABLE },
    )
    .await;
    let g = get(p, "web.app.test", "/").await;
    assert_eq!(g.headers["retry-after"], "5");
    assert_eq!(g.body, "no healthy instance\n");

    // Deregistering every instance removes the service: then it is unknown.
    consul.deregister("a").await;
    consul.deregister("b").await;
    wait_until(Duration::from_secs(1), "404 once gone", || async {
        get(p, "web.app.test", "/").await.status == StatusCode::NOT_FOUND
    })
    .await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_warning_and_weights_and_meta() {
    let consul = ConsulAgent::start().await;
    let a = Backend::start("a").await;
    consul.register_ttl("web", "a", a.port(), "warning").await;
    let router = start_router(&consul.addr(), "include_warning = true").await;
    let p = router.proxy_addr;
    wait_until(
        Duration::from_secs(5),
        "warning instance routable",
        || async { who(&get(p, "web.app.test", "/").await) == "a" },
    )
    .await;

    // Meta and weights reach /api/routes.
    consul
        .register_meta("api", "api-1", a.port(), &[("load", "3.5")], Some((7, 2)))
        .await;
    let admin = router.admin_addr;
    wait_until(Duration::from_secs(2), "meta visible", || async {
        get_admin(admin, "/api/routes")
            .await
            .1
            .contains("\"load\": 3.5")
    })
    .await;
    let (status, body) = get_admin(admin, "/api/routes").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let api = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["host"] == "api.app.test")
        .unwrap();
    assert_eq!(api["service"], "api");
    assert_eq!(api["strategy"], "random");
    let inst = &api["instances"][0];
    assert_eq!(inst["id"], "api-1");
    assert_eq!(inst["address"], "127.0.0.1");
    assert_eq!(inst["port"], a.port());
    assert_eq!(inst["health"], "passing");
    assert_eq!(inst["weight"], 7);

    // A Meta-only change (a load report) is seen within a second.
    consul
        .register_meta("api", "api-1", a.port(), &[("load", "9")], Some((7, 2)))
        .await;
    wait_until(Duration::from_secs(1), "meta change", || async {
        get_admin(admin, "/api/routes")
            .await
            .1
            .contains("\"load\": 9.0")
    })
    .await;

    let (status, metrics) = get_admin(admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains("consul_router_requests_total"),
        "{metrics}"
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_waits_for_the_first_table() {
    // No Consul at all (a port that takes connections and drops them at once): the router
    // starts, /healthz says 503, requests get 503 (not 404).
    let dead = RawBackend::start_with(Script::answer(RAW_OK).answer_first(0)).await;
    let r = consul_router::start(router_config(
        &format!("http://{}", dead.addr),
        "domains = [\"app.test\"]",
    ))
    .await
    .unwrap();
    // Discovery has asked Consul for the catalog, failed, and asked again (after its
    // backoff): the failure is behind it.
    wait_until(
        Duration::from_secs(10),
        "a second try at the catalog",
        || async {
            let seen = dead.received();
            let tries = seen
                .conns
                .iter()
                .filter(|c| c.bytes.starts_with(b"GET /v1/catalog/services"))
                .count();
            tries >= 2
        },
    )
    .await;
    assert_eq!(
        get_admin(r.admin_addr, "/healthz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let g = get(r.proxy_addr, "chat.app.test", "/").await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(g.headers.contains_key("retry-after"));
    r.shutdown().await;
}
