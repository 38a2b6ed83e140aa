//! A Consul that misbehaves, or none at all: the router started with Consul down (listening at
//! once, static services served, `/healthz` saying why, live when Consul answers), static
//! services with Consul disabled (and changed by a reload), failover between agents and back
//! to the first, tag hosts answering 503 rather than 404 while instances are read after a
//! restart (a FAKE Consul that reads slowly), and the warning for answers filtered by ACLs.
//! Each routing check is one table of cases run over HTTP/1.1 and HTTP/2.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::fake_consul::FakeConsul;
use common::*;
use http::StatusCode;

/// One request and what it must get.
struct Case {
    host: &'static str,
    status: u16,
    /// The backend that must answer a 200.
    who: Option<&'static str>,
}

const fn case(host: &'static str, status: u16, who: Option<&'static str>) -> Case {
    Case { host, status, who }
}

/// Runs every case over both protocols; a 503 must carry `Retry-After`.
async fn check(proxy: std::net::SocketAddr, cases: &[Case]) {
    for proto in [Proto::H1, Proto::H2] {
        for c in cases {
            let g = request(proto, proxy, ("GET", c.host, "/"), &[], "").await;
            assert_eq!(
                g.status.as_u16(),
                c.status,
                "{proto:?} {}: {}",
                c.host,
                g.body
            );
            if let Some(want) = c.who {
                assert_eq!(who(&g), want, "{proto:?} {}", c.host);
            }
            if c.status == 503 {
                assert!(
                    g.headers.contains_key("retry-after"),
                    "{proto:?} {}",
                    c.host
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_with_consul_down_serves_static_services_then_goes_live() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let legacy = Backend::start("legacy").await;
    let chat = Backend::start("chat").await;
    let toml = format!(
        "domains = [\"app.test\"]\n[consul]\nwait = \"2s\"\n\
         [[static_services]]\nname = \"legacy\"\nhosts = [\"legacy.example.com\"]\n\
         instances = [\"127.0.0.1:{}\"]",
        legacy.port()
    );
    let router = consul_router::start(router_config(&url, &toml))
        .await
        .expect("starts with Consul down");
    let (admin, p) = (router.admin_addr, router.proxy_addr);
    let why = wait_for(Duration::from_secs(5), "a reason", || async {
        let (status, body) = get_admin(admin, "/healthz").await;
        (status == StatusCode::SERVICE_UNAVAILABLE && body.contains("unreachable")).then_some(body)
    })
    .await;
    assert!(
        why.starts_with(&format!("not ready: consul unreachable at {url} (")),
        "{why}"
    );
    check(
        p,
        &[
            case("legacy.app.test", 200, Some("legacy")),
            case("legacy.example.com", 200, Some("legacy")),
            // Unknown before the first table is live: "not ready", not "no such host".
            case("chat.app.test", 503, None),
        ],
    )
    .await;

    // Consul appears where the router looks: live within a few seconds.
    let consul = ConsulAgent::start_at(port).await;
    consul.register("chat", "chat-1", chat.port(), &[]).await;
    wait_healthy(admin, Duration::from_secs(15)).await;
    check(
        p,
        &[
            case("chat.app.test", 200, Some("chat")),
            case("legacy.app.test", 200, Some("legacy")),
            case("legacy.example.com", 200, Some("legacy")),
        ],
    )
    .await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_consul_static_services_are_ready_at_once_and_reloaded() {
    let a1 = Backend::start("a1").await;
    let a2 = Backend::start("a2").await;
    let toml =
        |statics: &str| format!("domains = [\"app.test\"]\n[consul]\nenabled = false\n{statics}");
    // A host-name address (localhost) is resolved by the router's DNS cache.
    let first = toml(&format!(
        "[[static_services]]\nname = \"legacy\"\n\
         instances = [\"127.0.0.1:{}\", {{ address = \"localhost:{}\", weight = 3 }}]",
        a1.port(),
        a2.port()
    ));
    // Consul is never asked: nothing connects to this address.
    let never = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = format!("http://{}", never.local_addr().unwrap());
    let mut router = consul_router::start(router_config(&nowhere, &first))
        .await
        .expect("start");
    let (admin, p) = (router.admin_addr, router.proxy_addr);
    wait_healthy(admin, Duration::from_secs(5)).await;
    check(
        p,
        &[
            case("legacy.app.test", 200, None),
            case("x.app.test", 404, None),
        ],
    )
    .await;
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        seen.insert(who(&get(p, "legacy.app.test", "/").await));
    }
    assert_eq!(seen, BTreeSet::from(["a1".to_owned(), "a2".to_owned()]));

    // A reload changes them: legacy keeps a1 only, extra appears with a2.
    let second = toml(&format!(
        "[[static_services]]\nname = \"legacy\"\ninstances = [\"127.0.0.1:{}\"]\n\
         [[static_services]]\nname = \"extra\"\nstrategy = \"least-load\"\n\
         instances = [\"localhost:{}\"]",
        a1.port(),
        a2.port()
    ));
    let done = router
        .reload(router_config(&nowhere, &second))
        .await
        .expect("reload");
    assert_eq!(done.applied, ["static_services"]);
    wait_status(p, "extra.app.test", StatusCode::OK).await;
    check(
        p,
        &[
            case("extra.app.test", 200, Some("a2")),
            case("legacy.app.test", 200, Some("a1")),
        ],
    )
    .await;
    assert_eq!(get_admin(admin, "/healthz").await.0, StatusCode::OK);
    let asked = tokio::time::timeout(Duration::from_millis(10), never.accept()).await;
    assert!(asked.is_err(), "nothing connected to the Consul address");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_the_next_agent_and_returns_to_the_first() {
    let dead = free_port();
    let first = format!("http://127.0.0.1:{dead}");
    let second = ConsulAgent::start().await;
    let alpha = Backend::start("alpha").await;
    let beta = Backend::start("beta").await;
    second.register("alpha", "alpha-1", alpha.port(), &[]).await;
    // Both agents, the first one down; `--consul` takes the same comma-separated list.
    let router = start_router(
        &format!("{first},{}", second.addr()),
        "[consul]\nwait = \"2s\"",
    )
    .await;
    let (admin, p) = (router.admin_addr, router.proxy_addr);
    check(p, &[case("alpha.app.test", 200, Some("alpha"))]).await;
    let text = metrics(admin).await;
    assert!(sample(&text, "consul_router_consul_server_switches_total", &[]) >= 1.0);
    let on =
        |text: &str, url: &str| sample(text, "consul_router_consul_server", &[("address", url)]);
    assert_eq!(on(&text, &second.addr()), 1.0, "{text}");
    assert_eq!(on(&text, &first), 0.0, "{text}");

    // The first agent comes back (a cluster of its own here, so its catalog shows where
    // the router reads): within a probe period, the router is on it again.
    let back = ConsulAgent::start_at(dead).await;
    back.register("beta", "beta-1", beta.port(), &[]).await;
    wait_until(
        Duration::from_secs(30),
        "back on the first agent",
        || async {
            get(p, "beta.app.test", "/").await.status == StatusCode::OK
                && get(p, "alpha.app.test", "/").await.status == StatusCode::NOT_FOUND
        },
    )
    .await;
    check(
        p,
        &[
            case("beta.app.test", 200, Some("beta")),
            case("alpha.app.test", 404, None),
        ],
    )
    .await;
    assert_eq!(on(&metrics(admin).await, &first), 1.0);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_hosts_answer_503_while_instances_are_read_and_acl_filtering_is_told() {
    // FAKE Consul: a real agent answers reads too fast to see the window after a restart,
    // and marks answers as ACL-filtered only with ACLs set up.
    let fake = FakeConsul::start().await;
    let chat = Backend::start("chat").await;
    fake.set(|m| {
        m.services
            .insert("chat".into(), vec![("chat-1".into(), chat.port())]);
        m.tags
            .insert("chat".into(), vec!["router.host=chat.example.com".into()]);
        m.health_delay = Duration::from_secs(3);
        m.acl_filtered = true;
    });
    let router = consul_router::start(router_config(
        &fake.url(),
        "domains = [\"app.test\"]\n[consul]\nwait = \"1s\"",
    ))
    .await
    .expect("start");
    let (admin, p) = (router.admin_addr, router.proxy_addr);
    wait_status(p, "chat.example.com", StatusCode::SERVICE_UNAVAILABLE).await;
    check(
        p,
        &[
            case("chat.example.com", 503, None),
            case("chat.app.test", 503, None),
            case("other.app.test", 503, None),
        ],
    )
    .await;
    let (status, why) = get_admin(admin, "/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(why, "not ready: reading the services listed in consul\n");

    wait_healthy(admin, Duration::from_secs(15)).await;
    check(
        p,
        &[
            case("chat.example.com", 200, Some("chat")),
            case("chat.app.test", 200, Some("chat")),
        ],
    )
    .await;
    // Every answer was filtered; the warning (and its count) came once.
    let text = metrics(admin).await;
    assert_eq!(
        sample(&text, "consul_router_consul_acl_filtered_total", &[]),
        1.0,
        "{text}"
    );
    router.shutdown().await;
}
