//! Backends that misbehave, against a real Consul agent and real backends: outlier ejection
//! of an instance that answers 502 or refuses connections (one table over HTTP/1.1 and
//! HTTP/2), its return after the ejection, `max_ejection_percent` when every instance
//! fails, the retry budget when every instance refuses, and slow start for an instance that
//! joins.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpListener;

use common::backend::{serve_http, Backend};
use common::client::{request, routes, who, Got, Proto};
use common::consul::ConsulAgent;
use common::metrics::{metrics, sample};
use common::net::free_port;
use common::router::start_router;
use common::wait::wait_until;

/// How the bad instance of a case misbehaves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Answers 502 to everything.
    Answers502,
    /// Nothing listens on its port.
    Refuses,
}

/// A backend that answers 502 to everything and counts the requests it got.
async fn bad_backend() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    let task = serve_http(listener, move |_req: Request<Incoming>| {
        seen.fetch_add(1, Ordering::Relaxed);
        async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(502)
                    .body(Full::new(Bytes::from_static(b"bad\n")))
                    .unwrap(),
            )
        }
    });
    (port, hits, task)
}

/// One case's service: three good instances and a bad one.
struct Setup {
    service: String,
    proto: Proto,
    fault: Fault,
    _good: Vec<Backend>,
    bad_id: String,
    /// Requests the bad instance got (502 case only).
    bad_hits: Option<Arc<AtomicUsize>>,
    _bad_task: Option<tokio::task::JoinHandle<()>>,
}

impl Setup {
    async fn register(consul: &ConsulAgent, proto: Proto, fault: Fault) -> Setup {
        let service = format!(
            "{}-{}",
            if proto == Proto::H1 { "h1" } else { "h2" },
            if fault == Fault::Answers502 {
                "bad"
            } else {
                "refuse"
            }
        );
        let mut good = Vec::new();
        for i in 1..=3 {
            let id = format!("{service}-good-{i}");
            let b = Backend::start(&id).await;
            consul.register(&service, &id, b.port(), &[]).await;
            good.push(b);
        }
        let bad_id = format!("{service}-bad");
        let (port, hits, task) = match fault {
            Fault::Answers502 => {
                let (p, h, t) = bad_backend().await;
                (p, Some(h), Some(t))
            }
            Fault::Refuses => (free_port(), None, None),
        };
        consul.register(&service, &bad_id, port, &[]).await;
        Setup {
            service,
            proto,
            fault,
            _good: good,
            bad_id,
            bad_hits: hits,
            _bad_task: task,
        }
    }

    fn host(&self) -> String {
        format!("{}.app.test", self.service)
    }

    /// Sends `n` GETs; the statuses that were not 200, and the requests per instance.
    async fn run(&self, proxy: SocketAddr, n: usize) -> (usize, HashMap<String, usize>) {
        let host = self.host();
        let mut failed = 0;
        let mut by = HashMap::new();
        for i in 0..n {
            let target = format!("/r/{i}");
            let got = request(self.proto, proxy, ("GET", &host, &target), &[], "").await;
            if got.status != 200 {
                failed += 1;
            } else {
                *by.entry(who(&got)).or_default() += 1;
            }
        }
        (failed, by)
    }

    fn bad_hits(&self) -> usize {
        self.bad_hits
            .as_ref()
            .map_or(0, |h| h.load(Ordering::Relaxed))
    }
}

/// The instance `id` of `service` in `/api/routes`.
async fn listed(admin: SocketAddr, service: &str, id: &str) -> serde_json::Value {
    let all = routes(admin).await;
    all.iter()
        .filter(|r| r["service"] == service)
        .flat_map(|r| r["instances"].as_array().cloned().unwrap_or_default())
        .find(|i| i["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in /api/routes"))
}

/// Waits (10 s at most) until `host` has `n` routable instances in `router`'s table.
async fn wait_instances(router: &consul_router::Running, host: &str, n: usize) {
    wait_until(Duration::from_secs(10), "instances routed", || async {
        router
            .routes
            .load()
            .lookup(host)
            .is_some_and(|s| s.routable == n)
    })
    .await;
}

/// `n` GETs for `host` over HTTP/1.1, then `n` over HTTP/2, each on a fresh connection.
async fn over_both(proxy: SocketAddr, host: &str, n: usize) -> Vec<Got> {
    let mut answers = Vec::new();
    for proto in [Proto::H1, Proto::H2] {
        for i in 0..n {
            let target = format!("/{i}");
            answers.push(request(proto, proxy, ("GET", host, &target), &[], "").await);
        }
    }
    answers
}

const FAILURES: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_instance_is_ejected_and_comes_back() {
    let consul = ConsulAgent::start().await;
    let mut cases = Vec::new();
    for proto in [Proto::H1, Proto::H2] {
        for fault in [Fault::Answers502, Fault::Refuses] {
            cases.push(Setup::register(&consul, proto, fault).await);
        }
    }
    let router = start_router(
        &consul.addr(),
        "[proxy]\noutlier_consecutive_failures = 3\noutlier_base_ejection = \"3s\"\n\
         outlier_max_ejection = \"3s\"\n",
    )
    .await;
    let (proxy, admin) = (router.proxy_addr, router.admin_addr);
    for c in &cases {
        wait_instances(&router, &c.host(), 4).await;
    }

    // 200 requests each: the bad instance fails `FAILURES` times in a row, then it is
    // passed over. A 502 reaches the client (a response is never retried); a refused
    // connection is retried on another instance, so the client sees none.
    let mut report = Vec::new();
    for c in &cases {
        let (failed, by) = c.run(proxy, 200).await;
        let errors = sample(
            &metrics(admin).await,
            "consul_router_upstream_errors_total",
            &[("service", &c.service)],
        );
        report.push(format!(
            "{:?} {:?}: {failed} of 200 failed, bad instance hit {}, connect errors {}",
            c.proto,
            c.fault,
            c.bad_hits(),
            errors.abs(),
        ));
        match c.fault {
            Fault::Answers502 => {
                assert!(failed <= FAILURES, "{}", report.join("\n"));
                assert_eq!(c.bad_hits(), failed, "{}", report.join("\n"));
            }
            Fault::Refuses => {
                assert_eq!(failed, 0, "{}", report.join("\n"));
                assert!(errors <= FAILURES as f64, "{}", report.join("\n"));
            }
        }
        assert_eq!(by.len(), 3, "the good ones share the load: {by:?}");
        let inst = listed(admin, &c.service, &c.bad_id).await;
        assert!(
            inst["ejected_for_seconds"].as_f64().unwrap_or(0.0) > 0.0,
            "{inst}"
        );
        assert_eq!(inst["ejections"], 1, "{inst}");
    }
    eprintln!("{}", report.join("\n"));
    let text = metrics(admin).await;
    for c in &cases {
        let labels = [
            ("service", c.service.as_str()),
            ("instance", c.bad_id.as_str()),
        ];
        assert_eq!(
            sample(&text, "consul_router_outlier_ejections_total", &labels),
            1.0,
            "{text}"
        );
        let ejected = [("service", c.service.as_str())];
        assert_eq!(
            sample(&text, "consul_router_outlier_ejected_instances", &ejected),
            1.0
        );
    }

    // The ejection ends by itself: the instance gets requests again (and, still bad, is
    // ejected again).
    wait_until(Duration::from_secs(6), "ejections over", || async {
        let mut over = true;
        for c in &cases {
            let inst = listed(admin, &c.service, &c.bad_id).await;
            over &= inst["ejected_for_seconds"].is_null();
        }
        over
    })
    .await;
    for c in cases.iter().filter(|c| c.fault == Fault::Answers502) {
        let before = c.bad_hits();
        let (failed, _) = c.run(proxy, 40).await;
        assert!(
            c.bad_hits() > before,
            "{:?}: no request after the ejection",
            c.proto
        );
        assert!(failed <= FAILURES, "{failed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_the_instances_stay_routable_when_all_fail() {
    let consul = ConsulAgent::start().await;
    let mut bad = Vec::new();
    for i in 1..=4 {
        let (port, hits, task) = bad_backend().await;
        consul
            .register("all-bad", &format!("all-bad-{i}"), port, &[])
            .await;
        bad.push((hits, task));
    }
    let router = start_router(
        &consul.addr(),
        "[proxy]\noutlier_consecutive_failures = 2\noutlier_base_ejection = \"60s\"\n",
    )
    .await;
    let (proxy, admin) = (router.proxy_addr, router.admin_addr);
    wait_instances(&router, "all-bad.app.test", 4).await;
    for got in over_both(proxy, "all-bad.app.test", 40).await {
        assert_eq!(got.status, 502, "the backends' own answer, never a 503");
    }
    let text = metrics(admin).await;
    let ejected = sample(
        &text,
        "consul_router_outlier_ejected_instances",
        &[("service", "all-bad")],
    );
    assert_eq!(ejected, 2.0, "max_ejection_percent = 50: {text}");
    let hit = bad
        .iter()
        .filter(|(h, _)| h.load(Ordering::Relaxed) > 0)
        .count();
    assert_eq!(hit, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_stops_retries_when_everything_refuses() {
    let consul = ConsulAgent::start().await;
    for i in 1..=4 {
        consul
            .register("refusing", &format!("refusing-{i}"), free_port(), &[])
            .await;
    }
    // Ejection off, so only the budget limits the retries.
    let router = start_router(
        &consul.addr(),
        "[proxy]\nretries = 3\noutlier_consecutive_failures = 0\n\
         retry_budget_percent = 20\nretry_budget_min_per_second = 2\n",
    )
    .await;
    let (proxy, admin) = (router.proxy_addr, router.admin_addr);
    wait_instances(&router, "refusing.app.test", 4).await;
    let start = Instant::now();
    let answers = over_both(proxy, "refusing.app.test", 100).await;
    assert!(answers.iter().all(|g| g.status == 502));
    let n = answers.len();
    let elapsed = start.elapsed().as_secs_f64();
    let text = metrics(admin).await;
    let labels = [("service", "refusing")];
    let tries = sample(&text, "consul_router_upstream_errors_total", &labels);
    let retries = sample(&text, "consul_router_retries_total", &labels);
    let denied = sample(&text, "consul_router_retry_budget_exhausted_total", &labels);
    eprintln!(
        "{n} requests in {elapsed:.1} s: {tries} connection attempts, {retries} retries, {denied} denied"
    );
    // Without a budget: 4 attempts per request (800). With it: 20 % of the requests,
    // plus 2 a second, and the bucket starts with 10 seconds of those.
    let allowed = 0.2 * n as f64 + 2.0 * (elapsed + 10.0);
    assert!(retries <= allowed, "{retries} > {allowed}");
    assert_eq!(tries, n as f64 + retries);
    assert!(denied > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_ramps_up() {
    let consul = ConsulAgent::start().await;
    let mut backends = Vec::new();
    for i in 1..=3 {
        let b = Backend::start(&format!("ramp-{i}")).await;
        consul
            .register("ramp", &format!("ramp-{i}"), b.port(), &[])
            .await;
        backends.push(b);
    }
    let router = start_router(&consul.addr(), "[proxy]\nslow_start = \"60s\"\n").await;
    let proxy = router.proxy_addr;
    wait_instances(&router, "ramp.app.test", 3).await;
    // Present in the first table: whole shares at once.
    let mut first: HashMap<String, usize> = HashMap::new();
    for i in 0..150 {
        let got = request(
            Proto::H1,
            proxy,
            ("GET", "ramp.app.test", &format!("/{i}")),
            &[],
            "",
        )
        .await;
        *first.entry(who(&got)).or_default() += 1;
    }
    assert!(first.values().all(|&n| n > 25), "{first:?}");

    let newcomer = Backend::start("ramp-new").await;
    consul
        .register("ramp", "ramp-new", newcomer.port(), &[])
        .await;
    wait_instances(&router, "ramp.app.test", 4).await;
    // Its fair share would be a quarter (100 of 400); early in a 60 s ramp it gets about
    // a tenth of a share.
    let answers = over_both(proxy, "ramp.app.test", 200).await;
    let got_new = answers.iter().filter(|g| who(g) == "ramp-new").count();
    eprintln!("the newcomer got {got_new} of 400");
    assert!((1..60).contains(&got_new), "{got_new}");
}

/// Forward auth's calls go through the same attempts: an auth service instance that
/// refuses connections is ejected like any other, so auth calls stop trying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_calls_count_for_the_auth_services_instances() {
    let consul = ConsulAgent::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sso_port = listener.local_addr().unwrap().port();
    let _sso = serve_http(listener, |_req: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    consul.register("sso", "sso-up", sso_port, &[]).await;
    consul.register("sso", "sso-down", free_port(), &[]).await;
    let app = Backend::start("app").await;
    consul
        .register("app", "app-1", app.port(), &["router.auth=sso"])
        .await;
    let router = start_router(
        &consul.addr(),
        "[proxy]
outlier_consecutive_failures = 3
",
    )
    .await;
    let (proxy, admin) = (router.proxy_addr, router.admin_addr);
    wait_instances(&router, "sso.app.test", 2).await;
    wait_instances(&router, "app.app.test", 1).await;
    for got in over_both(proxy, "app.app.test", 30).await {
        assert_eq!(got.status, 200, "{}", got.body);
        assert_eq!(who(&got), "app");
    }
    let text = metrics(admin).await;
    let sso = [("service", "sso")];
    let errors = sample(&text, "consul_router_upstream_errors_total", &sso);
    assert_eq!(errors, FAILURES as f64, "{text}");
    let down = [("service", "sso"), ("instance", "sso-down")];
    assert_eq!(
        sample(&text, "consul_router_outlier_ejections_total", &down),
        1.0,
        "{text}"
    );
}

/// Bounded loads: eight slow requests for one URL, each sent while the earlier ones are in
/// flight. Plain url-hash sends them all to the key's instance; under
/// `router.hash-balance-factor=125` no instance holds more than ⌈1.25 × 8 / 4⌉ = 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_spills_under_bounded_loads() {
    let consul = ConsulAgent::start().await;
    let mut backends = Vec::new();
    for (service, tags) in [
        (
            "hot",
            &["router.strategy=url-hash", "router.hash-balance-factor=125"][..],
        ),
        ("plain", &["router.strategy=url-hash"][..]),
    ] {
        for i in 1..=4 {
            let id = format!("{service}-{i}");
            let b = Backend::start(&id).await;
            consul.register(service, &id, b.port(), tags).await;
            backends.push(b);
        }
    }
    let router = start_router(&consul.addr(), "").await;
    let proxy = router.proxy_addr;
    wait_instances(&router, "hot.app.test", 4).await;
    wait_instances(&router, "plain.app.test", 4).await;
    for (host, proto, bounded) in [
        ("hot.app.test", Proto::H1, true),
        ("hot.app.test", Proto::H2, true),
        ("plain.app.test", Proto::H1, false),
    ] {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let host = host.to_owned();
            tasks.push(tokio::spawn(async move {
                let got = request(proto, proxy, ("GET", &host, "/slow/500"), &[], "").await;
                who(&got)
            }));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let mut by: HashMap<String, usize> = HashMap::new();
        for t in tasks {
            *by.entry(t.await.unwrap()).or_default() += 1;
        }
        let most = by.values().copied().max().unwrap_or(0);
        if bounded {
            assert!(most <= 3 && by.len() >= 3, "{host} {proto:?}: {by:?}");
        } else {
            assert_eq!(by.len(), 1, "plain url-hash keeps the key: {by:?}");
        }
    }
}
