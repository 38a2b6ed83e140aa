//! What is routable, against a real Consul agent: excluded names, `router.expose=`, and
//! `expose = "tagged"`. A service that is not routed must look exactly like an unknown host.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// How long a tag change may take to show.
const FLIP: Duration = Duration::from_secs(2);

/// Asserts that `host` answers exactly as a host nothing serves: status, body and headers.
async fn like_unknown(p: SocketAddr, host: &str) {
    let unknown = get(p, "no-such-service.app.test", "/").await;
    let got = get(p, host, "/").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(got.status, unknown.status, "{host}: {}", got.body);
    assert_eq!(got.body, unknown.body, "{host}");
    let names = |g: &Got| {
        let mut v: Vec<(String, String)> = g
            .headers
            .iter()
            // Each answer has its own date and request ID.
            .filter(|(k, _)| *k != http::header::DATE && k.as_str() != "x-request-id")
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&got), names(&unknown), "{host}");
}

async fn status(p: SocketAddr, host: &str) -> StatusCode {
    get(p, host, "/").await.status
}

/// Services in the live table, as the admin API lists them.
async fn listed(admin: SocketAddr) -> Vec<String> {
    let mut names: Vec<String> = routes(admin)
        .await
        .iter()
        .filter_map(|r| r["service"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_itself_is_not_routed_by_default() {
    let consul = ConsulAgent::start().await;
    let chat = Backend::start("chat-1").await;
    consul.register("chat", "chat-1", chat.port(), &[]).await;
    let router = start_router(&consul.addr(), "").await;
    let p = router.proxy_addr;
    // From the first table on: the dev agent registers `consul` before the router starts.
    like_unknown(p, "consul.app.test").await;
    wait_until(Duration::from_secs(5), "chat routed", || async {
        status(p, "chat.app.test").await == StatusCode::OK
    })
    .await;
    like_unknown(p, "consul.app.test").await;
    like_unknown(p, "Consul.App.Test:8080").await;
    assert_eq!(listed(router.admin_addr).await, ["chat"]);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_exclusions_and_expose_false_hide_services_and_their_hosts() {
    let consul = ConsulAgent::start().await;
    let chat = Backend::start("chat-1").await;
    let secret = Backend::start("secret-1").await;
    let admin = Backend::start("admin-1").await;
    let www = Backend::start("www-1").await;
    consul.register("chat", "chat-1", chat.port(), &[]).await;
    // Excluded by name (listed in another case), even with a host and expose=true.
    consul
        .register(
            "secret-api",
            "secret-1",
            secret.port(),
            &["router.host=secret.example.test", "router.expose=true"],
        )
        .await;
    // Hidden by tag; by name order it would win admin.example.test over www.
    consul
        .register(
            "admin",
            "admin-1",
            admin.port(),
            &["router.expose=false", "router.host=admin.example.test"],
        )
        .await;
    consul
        .register(
            "www",
            "www-1",
            www.port(),
            &["router.host=admin.example.test"],
        )
        .await;
    let router = start_router(&consul.addr(), "exclude_services = [\"Secret-API\"]").await;
    let p = router.proxy_addr;
    wait_until(Duration::from_secs(5), "chat and www routed", || async {
        status(p, "chat.app.test").await == StatusCode::OK
            && status(p, "www.app.test").await == StatusCode::OK
    })
    .await;
    like_unknown(p, "secret-api.app.test").await;
    like_unknown(p, "secret.example.test").await;
    like_unknown(p, "admin.app.test").await;
    // The hidden service claims no host: its tag host goes to the next claimant.
    assert_eq!(who(&get(p, "admin.example.test", "/").await), "www-1");
    // A custom list replaces the default one, so `consul` is routed here.
    assert_eq!(listed(router.admin_addr).await, ["chat", "consul", "www"]);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_routes_only_services_that_ask() {
    let consul = ConsulAgent::start().await;
    let plain = Backend::start("plain-1").await;
    let shown = Backend::start("shown-1").await;
    let site = Backend::start("site-1").await;
    consul.register("plain", "plain-1", plain.port(), &[]).await;
    consul
        .register("shown", "shown-1", shown.port(), &["router.expose=true"])
        .await;
    consul
        .register(
            "site",
            "site-1",
            site.port(),
            &["router.host=site.example.test"],
        )
        .await;
    let router = start_router(&consul.addr(), "expose = \"tagged\"").await;
    let p = router.proxy_addr;
    // Untagged services are hidden from the first table on, never a 503.
    like_unknown(p, "plain.app.test").await;
    wait_until(Duration::from_secs(5), "tagged services routed", || async {
        status(p, "shown.app.test").await == StatusCode::OK
            && status(p, "site.example.test").await == StatusCode::OK
    })
    .await;
    assert_eq!(who(&get(p, "shown.app.test", "/").await), "shown-1");
    assert_eq!(who(&get(p, "site.example.test", "/").await), "site-1");
    assert_eq!(who(&get(p, "site.app.test", "/").await), "site-1");
    like_unknown(p, "plain.app.test").await;
    like_unknown(p, "consul.app.test").await;
    assert_eq!(listed(router.admin_addr).await, ["shown", "site"]);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipping_a_tag_takes_effect_within_seconds() {
    let consul = ConsulAgent::start().await;
    let flip = Backend::start("flip-1").await;
    consul.register("flip", "flip-1", flip.port(), &[]).await;
    let all = start_router(&consul.addr(), "").await;
    let tagged = start_router(&consul.addr(), "expose = \"tagged\"").await;
    let (pa, pt) = (all.proxy_addr, tagged.proxy_addr);
    wait_until(Duration::from_secs(5), "flip routed by `all`", || async {
        status(pa, "flip.app.test").await == StatusCode::OK
    })
    .await;
    like_unknown(pt, "flip.app.test").await;

    // (tags, routed under `all`, routed under `tagged`)
    let steps: [(&[&str], bool, bool); 4] = [
        (&["router.expose=true"], true, true),
        (&["router.expose=false"], false, false),
        (&[], true, false),
        (&["router.host=flip.example.test"], true, true),
    ];
    for (tags, in_all, in_tagged) in steps {
        consul.register("flip", "flip-1", flip.port(), tags).await;
        let t = Instant::now();
        let want = |on: bool| {
            if on {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            }
        };
        wait_until(FLIP, &format!("{tags:?} applied"), || async {
            status(pa, "flip.app.test").await == want(in_all)
                && status(pt, "flip.app.test").await == want(in_tagged)
        })
        .await;
        eprintln!("{tags:?} visible after {:?}", t.elapsed());
        for (p, on) in [(pa, in_all), (pt, in_tagged)] {
            if on {
                assert_eq!(who(&get(p, "flip.app.test", "/").await), "flip-1");
            } else {
                like_unknown(p, "flip.app.test").await;
            }
        }
    }
    assert_eq!(who(&get(pt, "flip.example.test", "/").await), "flip-1");
    all.shutdown().await;
    tagged.shutdown().await;
}
