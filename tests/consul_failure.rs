//! Consul going away, erroring, hanging or rewinding its index: the last good table keeps
//! serving, and the router recovers by itself.

mod common;

use std::time::Duration;

use common::fake_consul::{FakeConsul, Mode};
use common::*;
use http::StatusCode;

/// Asserts that `host` is served by `want` on every request for `dur`: proving that nothing
/// breaks during a window, so it polls for the whole of it rather than wait for an event.
async fn serves_for(p: std::net::SocketAddr, host: &str, want: &str, dur: Duration) {
    let end = std::time::Instant::now() + dur;
    while std::time::Instant::now() < end {
        let g = get(p, host, "/").await;
        assert_eq!(
            g.status,
            StatusCode::OK,
            "{host} stopped being served: {}",
            g.body
        );
        assert_eq!(who(&g), want);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_consul_killed_and_restarted() {
    let mut consul = ConsulAgent::start().await;
    let a = Backend::start("a").await;
    consul.register("chat", "a", a.port(), &[]).await;
    let router = start_router(&consul.addr(), "[consul]\nwait = \"2s\"").await;
    let p = router.proxy_addr;
    wait_status(p, "chat.app.test", StatusCode::OK).await;

    // Consul disappears mid-test: routing goes on from the last good table.
    consul.kill();
    serves_for(p, "chat.app.test", "a", Duration::from_secs(3)).await;
    assert_eq!(
        get_admin(router.admin_addr, "/healthz").await.0,
        StatusCode::OK
    );

    // A fresh agent on the same address (its index starts over, lower than before): the
    // router notices, resets its indexes and follows the new catalog.
    consul.restart().await;
    let b = Backend::start("b").await;
    consul.register("chat", "b", b.port(), &[]).await;
    wait_until(
        Duration::from_secs(15),
        "recovered onto the new agent",
        || async { who(&get(p, "chat.app.test", "/").await) == "b" },
    )
    .await;
    serves_for(p, "chat.app.test", "b", Duration::from_millis(500)).await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_consul_errors_hangs_and_rewinds() {
    let fake = FakeConsul::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    fake.set(|m| {
        m.services
            .insert("chat".into(), vec![("a".into(), a.port())]);
    });
    let router = start_router(&fake.url(), "[consul]\nwait = \"1s\"").await;
    let p = router.proxy_addr;
    wait_until(Duration::from_secs(5), "routed", || async {
        who(&get(p, "chat.app.test", "/").await) == "a"
    })
    .await;

    // 500s ("No cluster leader"): keep the table.
    fake.set(|m| m.mode = Mode::Error500);
    serves_for(p, "chat.app.test", "a", Duration::from_secs(2)).await;
    let during = fake.model.lock().unwrap().requests;

    // A hanging Consul: still serving.
    fake.set(|m| m.mode = Mode::Hang);
    serves_for(p, "chat.app.test", "a", Duration::from_secs(2)).await;

    // Back to normal, with a change and an index that went backwards (a restored snapshot):
    // the router resets its index and applies the change.
    fake.set(|m| {
        m.mode = Mode::Normal;
        m.index = 3;
        m.services
            .insert("chat".into(), vec![("b".into(), b.port())]);
    });
    wait_until(Duration::from_secs(15), "change after rewind", || async {
        who(&get(p, "chat.app.test", "/").await) == "b"
    })
    .await;
    // Errors were backed off, not hammered: a couple of loops over 2 s stay well under 100.
    assert!(during < 100, "{during} requests during the error phase");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_bulk_read_falls_back_to_single_reads() {
    let fake = FakeConsul::start().await;
    let a = Backend::start("a").await;
    let n = 20;
    fake.set(|m| {
        for i in 0..n {
            m.services
                .insert(format!("svc{i}"), vec![(format!("svc{i}-a"), a.port())]);
        }
    });
    // 18 cold services at the start: a bulk read, which fails on /v1/catalog/nodes.
    let t0 = std::time::Instant::now();
    let router = start_router(&fake.url(), "[consul]\nmax_watches = 2\nwait = \"1s\"").await;
    let live = t0.elapsed();
    for i in 0..n {
        let g = get(router.proxy_addr, &format!("svc{i}.app.test"), "/").await;
        assert_eq!(g.status, StatusCode::OK, "svc{i}");
    }
    assert!(
        live < Duration::from_secs(8),
        "live by its reads, not the deadline"
    );
    let paths = fake.model.lock().unwrap().paths.clone();
    assert!(
        paths.get("/v1/catalog/nodes").is_some_and(|&c| c >= 1),
        "{paths:?}"
    );
    // Every cold service was read on its own.
    for i in 0..n {
        assert!(
            paths.contains_key(&format!("/v1/health/service/svc{i}")),
            "{paths:?}"
        );
    }
    router.shutdown().await;
}
