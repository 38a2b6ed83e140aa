//! More services than long-polls: connections stay bounded, and cold services still follow
//! health, membership and (through the sweep) Meta changes.

mod common;

use std::time::Duration;

use common::*;
use consul_router::consul::types::{Registration, TtlCheck};
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_watches_still_follow_every_service() {
    let consul = ConsulAgent::start().await;
    let backend = Backend::start("any").await;
    let n = 30;
    for i in 0..n {
        consul
            .register_ttl(
                &format!("svc{i}"),
                &format!("svc{i}-a"),
                backend.port(),
                "passing",
            )
            .await;
    }
    let toml = "[consul]\nmax_watches = 4\nsweep_interval = \"1s\"";
    let router = start_router(&consul.addr(), toml).await;
    let p = router.proxy_addr;
    for i in 0..n {
        let g = get(p, &format!("svc{i}.app.test"), "/").await;
        assert_eq!(g.status, StatusCode::OK, "svc{i}");
    }
    // Long-polls: at most 4 per-service, whatever the number of services.
    assert!(
        router.watch_count() <= 4,
        "{} watches",
        router.watch_count()
    );

    // A service that is not watched ("cold"): a health change on it is seen through the
    // global health feed within a second or so.
    let watched = router.watched_services();
    let cold_i = (0..n)
        .find(|i| !watched.contains(&format!("svc{i}")))
        .unwrap();
    let cold = format!("svc{cold_i}");
    consul.set_check(&format!("{cold}-a"), "critical").await;
    wait_until(
        Duration::from_millis(1500),
        "cold service health change",
        || async {
            get(p, &format!("{cold}.app.test"), "/").await.status == StatusCode::SERVICE_UNAVAILABLE
        },
    )
    .await;
    consul.set_check(&format!("{cold}-a"), "passing").await;
    wait_until(
        Duration::from_millis(1500),
        "cold service healthy again",
        || async { get(p, &format!("{cold}.app.test"), "/").await.status == StatusCode::OK },
    )
    .await;

    // A new service and a removed one.
    consul
        .register_ttl("fresh", "fresh-a", backend.port(), "passing")
        .await;
    let cold2 = (0..n)
        .filter(|i| !watched.contains(&format!("svc{i}")))
        .nth(1)
        .unwrap();
    consul.deregister(&format!("svc{cold2}-a")).await;
    wait_until(Duration::from_millis(1500), "membership", || async {
        get(p, "fresh.app.test", "/").await.status == StatusCode::OK
            && get(p, &format!("svc{cold2}.app.test"), "/").await.status == StatusCode::NOT_FOUND
    })
    .await;

    // A Meta-only change on a cold service arrives with the sweep.
    let cold3 = (0..n)
        .filter(|i| !watched.contains(&format!("svc{i}")))
        .nth(2)
        .unwrap();
    let (name, id) = (format!("svc{cold3}"), format!("svc{cold3}-a"));
    // Same TTL check, same status: nothing changes in the health feed, only Meta.
    consul
        .register_with(Registration {
            id: id.clone(),
            name,
            address: "127.0.0.1".into(),
            port: backend.port(),
            meta: [("load".to_string(), "42".to_string())].into(),
            check: Some(TtlCheck {
                check_id: format!("{id}-ttl"),
                ttl: "10m".into(),
                status: "passing".into(),
                deregister_after: None,
            }),
            ..Default::default()
        })
        .await;
    wait_until(Duration::from_secs(4), "meta via sweep", || async {
        get_admin(router.admin_addr, "/api/routes")
            .await
            .1
            .contains("\"load\": 42.0")
    })
    .await;
    assert!(router.watch_count() <= 4);
    router.shutdown().await;
}

/// `/metrics` grows with the services that carry traffic or are in trouble, not with the
/// catalog, and a service's series leave with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_traffic_not_the_catalog() {
    let consul = ConsulAgent::start().await;
    let backend = Backend::start("any").await;
    let n = 40;
    for i in 0..n {
        let status = if i == 5 { "critical" } else { "passing" };
        consul
            .register_ttl(&format!("m{i}"), &format!("m{i}-a"), backend.port(), status)
            .await;
    }
    let toml = "[consul]\nmax_watches = 4\nsweep_interval = \"1s\"";
    let router = start_router(&consul.addr(), toml).await;
    let (p, admin) = (router.proxy_addr, router.admin_addr);
    let services = |text: &str| -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split("service=\"").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_owned)
            .collect()
    };
    let idle = get_admin(admin, "/metrics").await.1;
    // Only the service in trouble shows, with its instances; nothing counted yet.
    assert_eq!(services(&idle), ["m5".to_owned()].into(), "{idle}");
    assert!(idle.contains("consul_router_instances{service=\"m5\",state=\"routable\"} 0"));
    assert!(
        idle.contains(&format!("consul_router_services {n}\n")),
        "{idle}"
    );
    assert!(
        idle.contains("consul_router_services_unroutable 1\n"),
        "{idle}"
    );
    assert!(!idle.contains("consul_router_requests_total"), "{idle}");

    for _ in 0..3 {
        assert_eq!(get(p, "m1.app.test", "/").await.status, StatusCode::OK);
        assert_eq!(get(p, "m2.app.test", "/").await.status, StatusCode::OK);
    }
    let used = get_admin(admin, "/metrics").await.1;
    let want: std::collections::BTreeSet<String> = ["m1", "m2", "m5"].map(str::to_owned).into();
    assert_eq!(services(&used), want, "{used}");
    assert!(used.contains("consul_router_requests_total{service=\"m1\",code=\"2xx\"} 3\n"));
    assert!(
        !used.contains("code=\"5xx\""),
        "a class appears once it happens: {used}"
    );
    // Per used service: requests, two histograms, retries and instances; far from 53 series
    // for each of the 41 services.
    let lines = used.lines().count();
    assert!(lines < 300, "{lines} lines:\n{used}");

    // m2 leaves Consul: its series leave /metrics with it.
    consul.deregister("m2-a").await;
    wait_until(Duration::from_secs(10), "m2's series gone", || async {
        !services(&get_admin(admin, "/metrics").await.1).contains("m2")
    })
    .await;
    router.shutdown().await;
}
