//! The four strategies end to end, with instances registered in a real Consul.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

async fn three(consul: &ConsulAgent, name: &str, tags: &[&str]) -> Vec<Backend> {
    let mut v = Vec::new();
    for i in 1..=3 {
        let b = Backend::start(&format!("{name}-{i}")).await;
        consul
            .register(name, &format!("{name}-{i}"), b.port(), tags)
            .await;
        v.push(b);
    }
    v
}

async fn settle(p: std::net::SocketAddr, host: &str, n: usize) {
    wait_until(Duration::from_secs(5), "all instances routed", || async {
        let mut seen = std::collections::HashSet::new();
        for i in 0..60 {
            seen.insert(who(&get(p, host, &format!("/settle/{i}")).await));
        }
        seen.len() == n
    })
    .await;
}

async fn get_xff(p: std::net::SocketAddr, host: &str, xff: &str) -> String {
    let req = Request::get("/")
        .header("host", host)
        .header("x-forwarded-for", xff)
        .body(Full::<Bytes>::default())
        .unwrap();
    who(&send(p, req).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_spreads_and_hashes_stick() {
    let consul = ConsulAgent::start().await;
    let _r = three(&consul, "rnd", &[]).await;
    let _i = three(&consul, "sticky", &["router.strategy=ip-hash"]).await;
    let _u = three(&consul, "pages", &["router.strategy=url-hash"]).await;
    let router = start_router(&consul.addr(), "").await;
    let p = router.proxy_addr;
    settle(p, "rnd.app.test", 3).await;

    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..300 {
        *counts
            .entry(who(&get(p, "rnd.app.test", "/").await))
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|&c| c > 60),
        "random is lopsided: {counts:?}"
    );

    // ip-hash: the client is the right-most untrusted X-Forwarded-For address (the peer is
    // loopback, trusted by default). One client always lands on one instance.
    let mut owners = std::collections::HashSet::new();
    for c in 0..40 {
        let client = format!("203.0.113.{c}");
        let first = get_xff(p, "sticky.app.test", &client).await;
        for _ in 0..3 {
            // A spoofed left-most entry does not change the client.
            assert_eq!(
                get_xff(p, "sticky.app.test", &format!("6.6.6.{c}, {client}")).await,
                first
            );
        }
        owners.insert(first);
    }
    assert_eq!(owners.len(), 3, "ip-hash should use every instance");

    // url-hash: one URL, one instance; many URLs, all instances.
    let mut owners = std::collections::HashSet::new();
    for i in 0..40 {
        let path = format!("/page/{i}?v=1");
        let first = who(&get(p, "pages.app.test", &path).await);
        for _ in 0..3 {
            assert_eq!(who(&get(p, "pages.app.test", &path).await), first);
        }
        owners.insert(first);
    }
    assert_eq!(owners.len(), 3);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_only_move_the_leavers_keys() {
    let consul = ConsulAgent::start().await;
    let _u = three(&consul, "pages", &["router.strategy=url-hash"]).await;
    let router = start_router(&consul.addr(), "").await;
    let p = router.proxy_addr;
    settle(p, "pages.app.test", 3).await;
    let mut before = HashMap::new();
    for i in 0..90 {
        before.insert(i, who(&get(p, "pages.app.test", &format!("/k/{i}")).await));
    }
    consul.deregister("pages-2").await;
    wait_until(Duration::from_secs(2), "pages-2 gone", || async {
        let mut all = true;
        for i in 0..30 {
            all &= who(&get(p, "pages.app.test", &format!("/k/{i}")).await) != "pages-2";
        }
        all
    })
    .await;
    for (i, owner) in before {
        let now = who(&get(p, "pages.app.test", &format!("/k/{i}")).await);
        if owner != "pages-2" {
            assert_eq!(now, owner, "key {i} moved although its instance stayed");
        }
    }
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_load_prefers_the_least_loaded() {
    let consul = ConsulAgent::start().await;
    let busy = Backend::start("busy").await;
    let idle = Backend::start("idle").await;
    consul
        .register_meta("calc", "busy", busy.port(), &[("load", "90")], None)
        .await;
    consul
        .register_meta("calc", "idle", idle.port(), &[("load", "1")], None)
        .await;
    let router = start_router(&consul.addr(), "strategy = \"least-load\"").await;
    let p = router.proxy_addr;
    wait_until(Duration::from_secs(5), "both known", || async {
        let b = get_admin(router.admin_addr, "/api/routes").await.1;
        b.contains("\"load\": 90.0") && b.contains("\"load\": 1.0")
    })
    .await;
    let mut idle_hits = 0;
    for _ in 0..100 {
        if who(&get(p, "calc.app.test", "/").await) == "idle" {
            idle_hits += 1;
        }
    }
    // Power of two choices over two instances compares both every time.
    assert_eq!(idle_hits, 100);

    // The reports flip: traffic follows within a second.
    consul
        .register_meta("calc", "busy", busy.port(), &[("load", "0")], None)
        .await;
    consul
        .register_meta("calc", "idle", idle.port(), &[("load", "80")], None)
        .await;
    wait_until(
        Duration::from_secs(1),
        "traffic follows the load",
        || async { who(&get(p, "calc.app.test", "/").await) == "busy" },
    )
    .await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_header_moves_traffic_at_once_and_is_never_relayed() {
    let consul = ConsulAgent::start().await;
    let a = Backend::start("inband-a").await;
    let b = Backend::start("inband-b").await;
    for x in [&a, &b] {
        consul
            .register_meta("inband", &x.name, x.port(), &[("load", "5")], None)
            .await;
    }
    let router = start_router(&consul.addr(), "strategy = \"least-load\"").await;
    let p = router.proxy_addr;
    settle(p, "inband.app.test", 2).await;

    // HTTP/1: the instance that answers `/load/40` reports 40; the client never sees the
    // field, and every following request goes to the other instance. (The loads are far
    // enough apart that the previous request, still counted in flight for an instant after
    // its answer, cannot tip a pick.)
    let got = get(p, "inband.app.test", "/load/40").await;
    assert!(
        !got.headers.contains_key("x-backend-load"),
        "{:?}",
        got.headers
    );
    let busy = who(&got);
    let routes = get_admin(router.admin_addr, "/api/routes").await.1;
    assert!(routes.contains("\"load\": 40.0"), "{routes}");
    for _ in 0..50 {
        assert_ne!(who(&get(p, "inband.app.test", "/").await), busy);
    }

    // An unrelated change in Consul rebuilds the table without undoing the report.
    consul
        .register("inband-other", "inband-other-1", 1, &[])
        .await;
    wait_until(Duration::from_secs(5), "the rebuild", || async {
        get_admin(router.admin_addr, "/api/routes")
            .await
            .1
            .contains("inband-other")
    })
    .await;
    assert_ne!(who(&get(p, "inband.app.test", "/").await), busy);

    // HTTP/2: the same, the other way round.
    let mut h2 = h2(p).await;
    let req = Request::get("http://inband.app.test/load/99")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert!(!resp.headers().contains_key("x-backend-load"));
    let other = resp.headers()["x-backend"].to_str().unwrap().to_owned();
    assert_ne!(other, busy);
    // Now both report more than Consul's 5; the less loaded (40) takes the traffic.
    for _ in 0..20 {
        assert_eq!(who(&get(p, "inband.app.test", "/").await), busy);
    }
    // A value that is not a number is dropped and changes nothing.
    let got = get(p, "inband.app.test", "/load/lots").await;
    assert!(!got.headers.contains_key("x-backend-load"));
    assert_eq!(who(&got), busy);
    router.shutdown().await;
}
