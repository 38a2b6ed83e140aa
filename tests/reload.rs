//! `Running::reload` (what SIGHUP does) on a live router: exposure, the admin token, the
//! access log and the Consul address change in place; a reload that cannot bind is
//! refused whole. The binary's SIGHUP, its notifications and listener moves are in
//! tests/systemd.rs.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_exposure_token_access_log_and_consul() {
    let consul = ConsulAgent::start().await;
    let web = Backend::start("web-1").await;
    let vault = Backend::start("vault-1").await;
    consul.register("web", "web-1", web.port(), &[]).await;
    consul.register("vault", "vault-1", vault.port(), &[]).await;
    let mut router = start_router(&consul.addr(), "").await;
    let p = router.proxy_addr;
    assert_eq!(get(p, "web.app.test", "/").await.status, StatusCode::OK);
    assert_eq!(
        get(p, "vault.app.test", "/").await.status,
        StatusCode::NOT_FOUND
    );

    // vault is no longer excluded (it was never read: the service list is read again) and
    // web now is; an admin token and an access log file appear.
    let dir = TempDir::new("reload");
    let log = dir.join("access.log");
    let toml = format!(
        "domains = [\"app.test\"]\nexclude_services = [\"web\"]\nadmin_token = \"s3cret\"\n\
         access_log = \"json\"\naccess_log_file = \"{}\"",
        log.display()
    );
    let done = router
        .reload(router_config(&consul.addr(), &toml))
        .await
        .expect("reload");
    for key in [
        "exclude_services",
        "admin_token",
        "access_log",
        "access_log_file",
    ] {
        assert!(done.applied.contains(&key), "{key}: {done:?}");
    }
    assert!(done.need_restart.is_empty(), "{done:?}");
    wait_until(Duration::from_secs(5), "vault routed", || async {
        get(p, "vault.app.test", "/").await.status == StatusCode::OK
    })
    .await;
    assert_eq!(
        get(p, "web.app.test", "/").await.status,
        StatusCode::NOT_FOUND
    );
    let admin = router.admin_addr;
    assert_eq!(
        get_admin(admin, "/metrics").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(get_admin(admin, "/healthz").await.0, StatusCode::OK);
    wait_until(Duration::from_secs(5), "the access line", || async {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"service\":\"vault\""))
    })
    .await;

    // A reload that cannot bind its new listener changes nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut bad = router_config(&consul.addr(), "domains = [\"app.test\"]");
    bad.listen = taken.local_addr().unwrap();
    let err = router.reload(bad).await.expect_err("the port is taken");
    assert!(err.to_string().contains("cannot listen"), "{err}");
    assert_eq!(router.config().exclude_services, ["web"]);
    assert_eq!(
        get_admin(admin, "/metrics").await.0,
        StatusCode::UNAUTHORIZED
    );

    // Another Consul: discovery starts over there; the old table serves until the new one.
    let consul2 = ConsulAgent::start().await;
    let other = Backend::start("other-1").await;
    consul2
        .register("other", "other-1", other.port(), &[])
        .await;
    let done = router
        .reload(router_config(&consul2.addr(), "domains = [\"app.test\"]"))
        .await
        .expect("reload");
    assert!(done.applied.contains(&"consul"), "{done:?}");
    wait_until(
        Duration::from_secs(10),
        "the other Consul's service",
        || async { get(p, "other.app.test", "/").await.status == StatusCode::OK },
    )
    .await;
    assert_eq!(
        get(p, "vault.app.test", "/").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get_admin(admin, "/metrics").await.0,
        StatusCode::OK,
        "token gone"
    );
    router.shutdown().await;
}
