//! The binary's command line: bad configuration is refused with the key's name and exit 2; the
//! access log and log format flags.

mod common;

use std::time::Duration;

use common::*;
use consul_router::access_log::{Format, Protocol, Record};
use consul_router::config::{Config, Overrides};
use rustix::process::Signal;

/// Runs `consul-router ARGS` to its end: (exit status, all output).
fn run(args: &[&str]) -> (i32, String) {
    common::run(router_command().args(args))
}

#[test]
fn example_config_checks_ok() {
    let (code, out) = run(&["--config", "config/consul-router.toml", "--check-config"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("configuration OK"));
}

#[test]
fn bad_config_names_the_key_and_exits_2() {
    let cases = [
        (
            "unknown.toml",
            "listen = \"127.0.0.1:1\"\nlisen = 1\n",
            "lisen",
        ),
        ("addr.toml", "listen = \"localhost\"\n", "listen"),
        ("strategy.toml", "strategy = \"fastest\"\n", "strategy"),
        ("wait.toml", "[consul]\nwait = \"1h\"\n", "consul.wait"),
        ("type.toml", "workers = \"four\"\n", "workers"),
    ];
    let dir = TempDir::new("cli");
    for (file, text, key) in cases {
        let p = dir.write(file, text);
        let (code, out) = run(&["--config", p.to_str().unwrap(), "--check-config"]);
        assert_eq!(code, 2, "{file}: {out}");
        assert!(out.contains(key), "{file}: {out}");
    }
    let (code, out) = run(&["--config", "/nonexistent.toml"]);
    assert_eq!(code, 2);
    assert!(out.contains("/nonexistent.toml"), "{out}");
}

#[test]
fn flags_are_validated_too() {
    let (code, out) = run(&["--strategy", "round-robin", "--check-config"]);
    assert_eq!(code, 2);
    assert!(out.contains("strategy"), "{out}");
    let (code, out) = run(&["--domain", "bad..domain", "--check-config"]);
    assert_eq!(code, 2);
    assert!(out.contains("domains"), "{out}");
    let (code, out) = run(&["--consul", "ftp://x", "--check-config"]);
    assert_eq!(code, 2);
    assert!(out.contains("consul.address"), "{out}");
    let (code, _) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--domain",
        "app.example.net",
        "--strategy",
        "ip-hash",
        "--check-config",
    ]);
    assert_eq!(code, 0);
}

#[test]
fn busy_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, out) = run(&["--listen", &addr, "--admin-listen", "127.0.0.1:0"]);
    assert_ne!(code, 0);
    assert!(
        out.contains("cannot listen on") && out.contains(&addr),
        "{out}"
    );
}

// The access log and log format from the command line: bad values exit 2 naming the key,
// SIGUSR1 reopens the file, JSON logs parse, and `start`/`Running` own the writer.

#[test]
fn access_log_and_log_format_are_validated() {
    for (args, key) in [
        (&["--access-log", "verbose"][..], "access_log"),
        (&["--access-log", "JSON"][..], "access_log"),
        (&["--log-format", "xml"][..], "log_format"),
    ] {
        let (code, out) = run(&[args, &["--check-config"]].concat());
        assert_eq!(code, 2, "{args:?}: {out}");
        assert!(out.contains(key), "{args:?}: {out}");
    }
    let cases = [
        ("al.toml", "access_log = \"yes\"\n", "access_log"),
        ("al-type.toml", "access_log = true\n", "access_log"),
        ("alf-type.toml", "access_log_file = 5\n", "access_log_file"),
        ("lf.toml", "log_format = \"logfmt\"\n", "log_format"),
    ];
    let dir = TempDir::new("al-cli");
    for (file, text, key) in cases {
        let p = dir.write(file, text);
        let (code, out) = run(&["--config", p.to_str().unwrap(), "--check-config"]);
        assert_eq!(code, 2, "{file}: {out}");
        assert!(out.contains(key), "{file}: {out}");
    }
    let p = dir.write(
        "al-ok.toml",
        "access_log = \"json\"\naccess_log_file = \"\"\nlog_format = \"json\"\n",
    );
    let (code, out) = run(&["--config", p.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn access_log_file_that_cannot_be_opened_exits_2() {
    let bad = "/nonexistent-dir/access.log";
    let (code, out) = run(&[
        "--access-log",
        "json",
        "--access-log-file",
        bad,
        "--check-config",
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("access_log_file") && out.contains(bad),
        "{out}"
    );
    // Off: the file is not used, so not checked.
    let (code, out) = run(&[
        "--access-log",
        "off",
        "--access-log-file",
        bad,
        "--check-config",
    ]);
    assert_eq!(code, 0, "{out}");
    // A writable path checks OK and is not left behind.
    let dir = TempDir::new("al-cli-check");
    let ok = dir.join("check.log");
    let (code, out) = run(&[
        "--access-log",
        "text",
        "--access-log-file",
        ok.to_str().unwrap(),
        "--check-config",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(!ok.exists());
    // Without --check-config, start refuses it the same way.
    let (code, out) = run(&[
        "--access-log",
        "text",
        "--access-log-file",
        bad,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--consul",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("configuration error: access_log_file") && out.contains(bad),
        "{out}"
    );
}

/// How long a router process may take to drain and exit after SIGTERM.
const STOP_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log_file_and_json_logs_parse() {
    let dir = TempDir::new("al-cli-rotate");
    let path = dir.join("access.log");
    let rotated = dir.join("access.log.1");
    let router = RouterProcess::builder()
        .args(["--access-log", "json", "--access-log-file"])
        .arg(&path)
        .args(["--log-format", "json"])
        .start()
        .await;
    wait_until(Duration::from_secs(15), "the access log file", || async {
        path.exists()
    })
    .await;
    // logrotate's default: rename, then postrotate sends SIGUSR1.
    std::fs::rename(&path, &rotated).unwrap();
    router.signal(Signal::USR1);
    wait_until(Duration::from_secs(15), "the reopened file", || async {
        path.exists()
    })
    .await;
    let (code, stdout, stderr) = router.stop(STOP_WITHIN).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    // The router's own logs are JSON, one object per line; the start line went to stderr.
    assert!(stderr.contains("consul-router: proxy on"), "{stderr}");
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let messages: Vec<&str> = events
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(messages.contains(&"consul-router started"), "{stdout}");
    assert!(messages.contains(&"access log reopened"), "{stdout}");
    assert!(events.iter().all(|e| e["level"].is_string()), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_on_stdout_moves_the_other_output_to_stderr() {
    let router = RouterProcess::builder()
        .args(["--access-log", "text"])
        .start()
        .await;
    router
        .stderr
        .wait_line(Duration::from_secs(15), "the start line on stderr", |l| {
            l.starts_with("consul-router: proxy on")
        })
        .await;
    let (code, stdout, stderr) = router.stop(STOP_WITHIN).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "", "only access lines on stdout");
    assert!(stderr.contains("consul-router started"), "{stderr}");
}

fn record(status: u16) -> Record<'static> {
    Record {
        time: std::time::SystemTime::now(),
        client: "192.0.2.1".parse().unwrap(),
        host: "chat.app.test",
        service: "chat",
        instance: "chat-1",
        method: "GET",
        path: "/",
        protocol: Protocol::Http11,
        status,
        bytes_in: 0,
        bytes_out: 5,
        duration: Duration::from_millis(3),
        upstream: Some(Duration::from_millis(2)),
        retries: 0,
        request_id: b"r1",
        referer: b"",
        user_agent: b"test",
        tls_version: "",
        alpn: "",
        auth: "",
    }
}

#[tokio::test]
async fn start_opens_the_log_and_shutdown_writes_it_out() {
    let dir = TempDir::new("al-cli-start");
    let path = dir.join("access.log");
    let o = Overrides {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        consul: Some("http://127.0.0.1:1".into()),
        access_log: Some("text".into()),
        access_log_file: Some(path.to_str().unwrap().into()),
        ..Default::default()
    };
    let cfg = Config::from_file(Default::default(), &o).unwrap();
    let running = consul_router::start(cfg).await.unwrap();
    let log = running.access_log().clone();
    assert_eq!(log.format(), Format::Text);
    assert_eq!(log.file(), Some(path.as_path()));
    for status in [200, 404, 502] {
        log.log(&record(status));
    }
    running.shutdown().await;
    let text = std::fs::read_to_string(&path).unwrap();
    let statuses: Vec<&str> = text.lines().map(|l| l.split(' ').nth(8).unwrap()).collect();
    assert_eq!(statuses, ["200", "404", "502"], "{text}");
    // After shutdown the handle still works, and counts what it can no longer write.
    log.log(&record(200));
    assert_eq!(log.dropped(), 1);

    // Off by default: nothing is opened.
    let o = Overrides {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        consul: Some("http://127.0.0.1:1".into()),
        ..Default::default()
    };
    let running = consul_router::start(Config::from_file(Default::default(), &o).unwrap())
        .await
        .unwrap();
    assert!(!running.access_log().is_on());
    running.shutdown().await;
}
