//! The shared test harness itself (tests/common): the router binary as a child process with
//! extra configuration, a raw backend's exact bytes through it, and child processes' output.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use http::StatusCode;
use rustix::process::Signal;

#[test]
fn configuration_defaults_fill_only_what_the_text_leaves_out() {
    let text = with_defaults("strategy = \"least-load\"\n[proxy]\nlisten = 1\n");
    assert!(text.starts_with(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndomains = [\"app.test\"]\n"
    ));
    assert!(text.ends_with("strategy = \"least-load\"\n[proxy]\nlisten = 1\n\n"));
    let own = "listen = \"127.0.0.1:9\"\ndomains = [\"x.test\"]\n";
    assert_eq!(
        with_defaults(own),
        format!("admin_listen = \"127.0.0.1:0\"\n{own}\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_process_output_is_captured_and_its_status_kept() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo one; echo two >&2; read x; echo after; exit 3"]);
    let p = Process::spawn("sh", &mut cmd);
    // stdin is /dev/null: `read` fails at once and the script goes on.
    let line = p
        .wait_line(Duration::from_secs(10), "after", |l| l == "after")
        .await;
    assert_eq!(line, "after");
    assert_eq!(p.wait_exit(Duration::from_secs(10)).await.code(), Some(3));
    assert_eq!(p.stdout_in_full().await, "one\nafter\n");
    assert_eq!(p.stderr_in_full().await, "two\n");

    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let p = Process::spawn("sleep", &mut cmd);
    p.signal(Signal::TERM);
    let status = p.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), None, "killed by a signal: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_process_with_extra_toml_relays_exact_bytes_to_a_raw_backend() {
    let consul = ConsulAgent::start().await;
    let backend = RawBackend::start_with(Script::answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    ))
    .await;
    consul.register("raw", "raw-1", backend.port(), &[]).await;
    // 127.0.0.1 untrusted: the router writes the forwarding fields itself.
    let router = RouterProcess::builder()
        .consul(&consul.addr())
        .toml("trusted_proxies = [\"10.9.9.9/32\"]\n[proxy]\nresponse_timeout = \"3s\"\n")
        .env("RUST_LOG", "info")
        .start_healthy()
        .await;
    let config = std::fs::read_to_string(router.config_path.as_ref().unwrap()).unwrap();
    assert!(
        config.contains("[proxy]\nresponse_timeout = \"3s\""),
        "{config}"
    );
    wait_status(router.proxy_addr, "raw.app.test", StatusCode::OK).await;

    let mark = backend.mark();
    let req = b"GET /x?y=1 HTTP/1.1\r\nHost: raw.app.test\r\nX-A: 1\r\n\r\n";
    let a = talk(router.proxy_addr, &[&req[..]], Duration::ZERO, 1, Wait::No).await;
    let r = a.first().unwrap();
    assert_eq!((r.status, &r.body[..]), (200, &b"hello"[..]));
    let seen = backend.since(mark);
    assert_eq!(
        esc(&seen.bytes),
        esc(b"GET /x?y=1 HTTP/1.1\r\nHost: raw.app.test\r\nX-A: 1\r\n\
              X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Host: raw.app.test\r\n\
              X-Forwarded-Proto: http\r\nX-Forwarded-Port: *\r\nX-Real-IP: 127.0.0.1\r\n\
              X-Request-Id: *\r\n\r\n")
    );
    let port = format!("\r\nX-Forwarded-Port: {}\r\n", router.proxy_addr.port());
    assert!(
        find(&seen.raw, port.as_bytes()).is_some(),
        "{}",
        esc(&seen.raw)
    );
    assert_eq!(seen.conns.len(), 1, "{seen:?}");
    assert_eq!(seen.conns[0].bytes, seen.raw);
    assert_eq!(
        r.header("x-request-id").unwrap().as_bytes(),
        &seen.raw[find(&seen.raw, b"X-Request-Id: ").unwrap() + 14..seen.raw.len() - 4]
    );

    let (code, stdout, stderr) = router.stop(Duration::from_secs(30)).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("consul-router: proxy on http://"),
        "{stdout}"
    );
    assert!(stdout.contains("shutting down"), "{stdout}");
}
