//! What the request core reports: Prometheus counts after a known mix of requests, access
//! log lines in both formats, request IDs, and the same on HTTP/1 and HTTP/2. Service names
//! are unique to each test because the metrics recorder is process-wide.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

/// The `unknown` service's counters are shared by every router in the process: tests that
/// make or count unknown-host answers take turns.
static UNKNOWN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn metrics(router: &consul_router::Running) -> String {
    common::metrics(router.admin_addr).await
}

/// Waits until `service` has counted `want` 2xx requests: a request is counted once its
/// response has gone out (on HTTP/2, once its body ended), so the last may still be closing.
async fn wait_counted(admin: SocketAddr, service: &'static str, want: f64) {
    wait_until(Duration::from_secs(5), "requests counted", || async move {
        let t = get_admin(admin, "/metrics").await.1;
        sample(
            &t,
            "consul_router_requests_total",
            &[("service", service), ("code", "2xx")],
        ) >= want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_mix_exactly() {
    let _turn = UNKNOWN.lock().await;
    let consul = ConsulAgent::start().await;
    let ok = Backend::start("ok").await;
    consul.register("obs-ok", "obs-ok-1", ok.port(), &[]).await;
    consul
        .register_ttl("obs-down", "obs-down-1", ok.port(), "critical")
        .await;
    consul
        .register("obs-dead", "obs-dead-1", free_port(), &[])
        .await;
    // One dead and one live instance: requests that pick the dead one first are retried.
    consul
        .register("obs-retry", "obs-retry-dead", free_port(), &[])
        .await;
    consul
        .register("obs-retry", "obs-retry-live", ok.port(), &[])
        .await;
    consul
        .register("obs-slow", "obs-slow-1", ok.port(), &[])
        .await;
    let router = start_router(
        &consul.addr(),
        "[proxy]\nresponse_timeout = \"500ms\"\nretries = 1",
    )
    .await;
    let a = router.proxy_addr;
    wait_status(router.proxy_addr, "obs-ok.app.test", StatusCode::OK).await;
    wait_status(router.proxy_addr, "obs-retry.app.test", StatusCode::OK).await;

    let before = metrics(&router).await;
    let unknown_4xx = |t: &str| {
        sample(
            t,
            "consul_router_requests_total",
            &[("service", "unknown"), ("code", "4xx")],
        )
    };
    let count = |t: &str, s: &str, code: &str| {
        sample(
            t,
            "consul_router_requests_total",
            &[("service", s), ("code", code)],
        )
    };
    let ok_before = count(&before, "obs-ok", "2xx");
    let retry_before = count(&before, "obs-retry", "2xx");
    let retries_before = sample(
        &before,
        "consul_router_retries_total",
        &[("service", "obs-retry")],
    );
    let refused_before = sample(
        &before,
        "consul_router_upstream_errors_total",
        &[("service", "obs-retry"), ("kind", "connect_refused")],
    );

    for _ in 0..3 {
        assert_eq!(get(a, "obs-ok.app.test", "/").await.status, StatusCode::OK);
    }
    assert_eq!(
        get(a, "nobody.app.test", "/").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(a, "obs-down.app.test", "/").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(a, "obs-dead.app.test", "/").await.status,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        get(a, "obs-slow.app.test", "/slow/2000").await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
    for _ in 0..20 {
        assert_eq!(
            get(a, "obs-retry.app.test", "/").await.status,
            StatusCode::OK
        );
    }

    // A request is counted once its response has gone out: the last one may still be
    // closing as the client reads it.
    wait_counted(router.admin_addr, "obs-retry", retry_before + 20.0).await;
    let after = metrics(&router).await;
    assert_eq!(count(&after, "obs-ok", "2xx") - ok_before, 3.0);
    assert_eq!(unknown_4xx(&after) - unknown_4xx(&before), 1.0);
    assert_eq!(count(&after, "obs-down", "5xx"), 1.0);
    assert_eq!(count(&after, "obs-dead", "5xx"), 1.0);
    assert_eq!(
        sample(
            &after,
            "consul_router_upstream_errors_total",
            &[("service", "obs-dead"), ("kind", "connect_refused")],
        ),
        1.0
    );
    assert_eq!(count(&after, "obs-slow", "5xx"), 1.0);
    assert_eq!(
        sample(
            &after,
            "consul_router_upstream_errors_total",
            &[("service", "obs-slow"), ("kind", "response_timeout")],
        ),
        1.0
    );
    assert_eq!(count(&after, "obs-retry", "2xx") - retry_before, 20.0);
    let retries = sample(
        &after,
        "consul_router_retries_total",
        &[("service", "obs-retry")],
    ) - retries_before;
    let refused = sample(
        &after,
        "consul_router_upstream_errors_total",
        &[("service", "obs-retry"), ("kind", "connect_refused")],
    ) - refused_before;
    // Each request that met the dead instance first was retried once, and only those.
    assert_eq!(retries, refused, "{after}");
    assert!(retries > 0.0, "20 random picks never met the dead instance");
    // Histograms: one observation per request, with buckets.
    assert_eq!(
        sample(
            &after,
            "consul_router_request_duration_seconds_count",
            &[("service", "obs-slow")],
        ),
        1.0
    );
    assert!(after.contains("consul_router_request_duration_seconds_bucket{"));
    assert!(after.contains("consul_router_upstream_duration_seconds_bucket{"));
    assert!(after.contains("consul_router_build_info{"), "{after}");
    assert!(after.contains("consul_router_open_connections{"), "{after}");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_and_request_ids_on_both_paths() {
    let _turn = UNKNOWN.lock().await;
    let consul = ConsulAgent::start().await;
    let b = Backend::start("logged").await;
    consul.register("obs-log", "obs-log-1", b.port(), &[]).await;
    let dir = TempDir::new("obs");
    let file = dir.join("access.json");
    let toml = format!(
        "access_log = \"json\"\naccess_log_file = \"{}\"",
        file.display()
    );
    let router = start_router(&consul.addr(), &toml).await;
    let a = router.proxy_addr;
    wait_status(router.proxy_addr, "obs-log.app.test", StatusCode::OK).await;
    let before = metrics(&router).await;

    // HTTP/1.1: an ID is made, sent to the backend and returned.
    let req = Request::get("/h1?x=1")
        .header("host", "obs-log.app.test")
        .header("user-agent", "obs-test/1")
        .header("referer", "http://ref.test/")
        .body(Full::default())
        .unwrap();
    let g = send(a, req).await;
    assert_eq!(g.status, StatusCode::OK);
    let id1 = g.headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        g.body.contains(&format!("x-request-id: {id1}\n")),
        "{}",
        g.body
    );

    // A trusted peer's (loopback's) ID is kept.
    let req = Request::get("/kept")
        .header("host", "obs-log.app.test")
        .header("x-request-id", "from-nginx-42")
        .body(Full::default())
        .unwrap();
    let g = send(a, req).await;
    assert_eq!(g.headers["x-request-id"], "from-nginx-42");
    assert!(
        g.body.contains("x-request-id: from-nginx-42\n"),
        "{}",
        g.body
    );

    // HTTP/2: the same request gets the same treatment.
    let mut s = h2(a).await;
    let req = Request::get("http://obs-log.app.test/h2?x=1")
        .header("user-agent", "obs-test/1")
        .body(Full::default())
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let id2 = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(body.contains(&format!("x-request-id: {id2}\n")), "{body}");
    assert_ne!(id1, id2);
    let h2_bytes = body.len();
    // A request body counts as bytes_in on both paths.
    // The backend reads the body before it answers (`/collect`).
    let req = Request::post("http://obs-log.app.test/collect?h2")
        .body(Full::new(Bytes::from_static(b"hello world")))
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    let req = Request::post("/collect?h1")
        .header("host", "obs-log.app.test")
        .body(Full::new(Bytes::from_static(b"hello world")))
        .unwrap();
    assert_eq!(send(a, req).await.status, StatusCode::OK);
    // A local answer on each path.
    assert_eq!(
        get(a, "nobody.app.test", "/nope").await.status,
        StatusCode::NOT_FOUND
    );
    drop(s);

    // Both paths count alike: five 2xx for the service.
    let after = metrics(&router).await;
    let ok = |t: &str| {
        sample(
            t,
            "consul_router_requests_total",
            &[("service", "obs-log"), ("code", "2xx")],
        )
    };
    // The HTTP/2 request is counted when its body has ended; give it a moment.
    let base = ok(&before);
    wait_counted(router.admin_addr, "obs-log", base + 5.0).await;
    assert_eq!(ok(&metrics(&router).await) - base, 5.0, "five, no more");
    assert!(ok(&after) - base >= 3.0);

    router.shutdown().await;
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let find = |path: &str| {
        lines
            .iter()
            .find(|l| l["path"] == path)
            .unwrap_or_else(|| panic!("no line for {path}: {text}"))
    };
    let h1 = find("/h1?x=1");
    assert_eq!(h1["service"], "obs-log");
    assert_eq!(h1["instance"], "obs-log-1");
    assert_eq!(h1["method"], "GET");
    assert_eq!(h1["status"], 200);
    assert_eq!(h1["protocol"], "HTTP/1.1");
    assert_eq!(h1["host"], "obs-log.app.test");
    assert_eq!(h1["client"], "127.0.0.1");
    assert_eq!(h1["request_id"], id1.as_str());
    assert_eq!(h1["user_agent"], "obs-test/1");
    assert_eq!(h1["referer"], "http://ref.test/");
    assert_eq!(h1["retries"], 0);
    assert!(h1["bytes_out"].as_u64().unwrap() > 0, "{h1}");
    let h2 = find("/h2?x=1");
    assert_eq!(h2["protocol"], "HTTP/2.0");
    assert_eq!(h2["service"], "obs-log");
    assert_eq!(h2["instance"], "obs-log-1");
    assert_eq!(h2["status"], 200);
    assert_eq!(h2["request_id"], id2.as_str());
    assert_eq!(h2["bytes_out"].as_u64().unwrap(), h2_bytes as u64, "{h2}");
    assert_eq!(h2["bytes_in"], 0, "{h2}");
    for path in ["/collect?h1", "/collect?h2"] {
        assert_eq!(find(path)["bytes_in"], 11, "{path}: {text}");
    }
    assert_eq!(find("/kept")["request_id"], "from-nginx-42");
    let nope = find("/nope");
    assert_eq!(nope["status"], 404);
    assert_eq!(nope["service"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_request_ids_are_replaced_and_text_lines_parse() {
    let consul = ConsulAgent::start().await;
    let b = Backend::start("plain").await;
    consul
        .register("obs-text", "obs-text-1", b.port(), &[])
        .await;
    let dir = TempDir::new("obs-text");
    let file = dir.join("access.log");
    let toml = format!(
        "trusted_proxies = [\"10.9.9.9/32\"]\naccess_log = \"text\"\naccess_log_file = \"{}\"",
        file.display()
    );
    let router = start_router(&consul.addr(), &toml).await;
    let a = router.proxy_addr;
    wait_status(router.proxy_addr, "obs-text.app.test", StatusCode::OK).await;
    let req = Request::post("/spoof")
        .header("host", "obs-text.app.test")
        .header("x-request-id", "chosen-by-client")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let g = send(a, req).await;
    let id = g.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(id, "chosen-by-client");
    assert!(!g.body.contains("chosen-by-client"), "{}", g.body);
    assert_eq!(g.body.matches("x-request-id:").count(), 1, "{}", g.body);
    router.shutdown().await;
    let text = std::fs::read_to_string(&file).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("\"POST /spoof HTTP/1.1\""))
        .unwrap_or_else(|| panic!("{text}"));
    // nginx's combined format first, then our fields.
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.contains("\"POST /spoof HTTP/1.1\" 200 "), "{line}");
    assert!(line.contains("service=\"obs-text\""), "{line}");
    assert!(line.contains(&format!("rid=\"{id}\"")), "{line}");
    assert!(
        line.contains("in=5") || line.contains("bytes_in=5"),
        "{line}"
    );
}
