//! `consul-router health` (the real binary) against real admin listeners: 0 once the router
//! is live on a real Consul, 1 for a 503 before the first table, a refused connection or
//! silence, 2 for a bad URL.

mod common;

use std::net::SocketAddr;

use common::{free_addr, router_command, router_config, start_router, ConsulAgent};

/// Runs `consul-router health ARGS`: (exit status, all output).
async fn health(args: &[&str]) -> (i32, String) {
    let mut cmd = router_command();
    cmd.arg("health").args(args);
    common::output(cmd).await
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_router_exits_0() {
    let consul = ConsulAgent::start().await;
    let router = start_router(&consul.addr(), "").await;
    let (code, out) = health(&["--admin", &url(router.admin_addr)]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("healthy: 200"), "{out}");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_without_a_table_exits_1_with_the_reason() {
    // Consul never answers, so the first table never goes live and /healthz stays 503.
    let consul = url(free_addr());
    let router = consul_router::start(router_config(&consul, "domains = [\"app.test\"]"))
        .await
        .expect("router start");
    let (code, out) = health(&["--admin", &url(router.admin_addr)]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("503 Service Unavailable")
            && (out.contains("routing table not loaded yet")
                || out.contains(&format!("not ready: consul unreachable at {consul}"))),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    router.shutdown().await;
}

#[tokio::test]
async fn refused_or_silent_admin_exits_1() {
    let (code, out) = health(&["--admin", &url(free_addr())]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("connection refused"), "{out}");

    // Accepted by the kernel's backlog, never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let (code, out) = health(&["--admin", &url(addr), "--timeout", "300ms"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no answer") && out.contains("300ms"), "{out}");
}

#[tokio::test]
async fn bad_url_exits_2() {
    for bad in [
        "127.0.0.1:9090",
        "https://127.0.0.1:9090",
        "http://",
        "not a url",
    ] {
        let (code, out) = health(&["--admin", bad]).await;
        assert_eq!(code, 2, "{bad}: {out}");
        assert!(out.contains("bad admin URL"), "{bad}: {out}");
    }
    // The router's own flags are refused with the subcommand rather than ignored.
    let out = router_command()
        .args(["--listen", "127.0.0.1:1", "health"])
        .output()
        .expect("run consul-router");
    assert_eq!(out.status.code(), Some(2));
}
