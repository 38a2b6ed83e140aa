//! The Prometheus and Grafana files against Debian's real `prometheus` and `promtool`:
//! `config/prometheus/alerts.yml` passes `promtool check rules` and its unit tests
//! (`alerts_test.yml`); a live router's `/metrics`, after a mix of 200, 404, 503, 502,
//! retries and a 504, passes `promtool check metrics` with nothing to say; and a real
//! Prometheus scraping that router every second answers every PromQL expression of
//! `config/grafana/consul-router.json` and of the README's ```promql blocks with data.
//! A machine without the tools fails these tests, saying how to install them.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::time::timeout;

const DASHBOARD: &str = include_str!("../config/grafana/consul-router.json");
const README: &str = include_str!("../README.md");
/// Every test's whole run, Consul, router and Prometheus included.
const LIMIT: Duration = Duration::from_secs(150);
/// How long Prometheus may take to have data for every expression.
const DATA_LIMIT: Duration = Duration::from_secs(30);
/// The router's `proxy.response_timeout` in these tests, and a backend slower than it.
const ROUTER_TOML: &str = "[proxy]\nresponse_timeout = \"300ms\"\nretries = 1\n";
const SLOW_PATH: &str = "/slow/1500";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

// ---- the tools ----

/// `promtool` or `prometheus`: $PROMTOOL_BIN / $PROMETHEUS_BIN, PATH, or /usr/bin (Debian's
/// `prometheus` package); otherwise the test fails and says how to get them.
fn tool(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase());
    if let Some(p) = std::env::var_os(&var) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{var}={} is not a file", p.display());
        return p;
    }
    find_program(&[name], &["/usr/bin", "/usr/local/bin"]).unwrap_or_else(|| {
        panic!(
            "tests/prometheus.rs runs the alert rules, the dashboard's queries and /metrics \
                 through a real `{name}`, and none was found (PATH, /usr/bin, /usr/local/bin).\n\
                 `scripts/test.sh` installs it when running as root (Debian's `prometheus` \
                 package: `sudo apt-get install prometheus`), or set {var}=/path/to/{name}."
        )
    })
}

/// Runs `cmd` with `input` on its standard input: exit status and stdout + stderr.
fn run_with_input(mut cmd: Command, input: &str) -> (i32, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_owned();
    // Written from another thread so that a command which answers before reading it all
    // cannot block us on a full pipe.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().expect("wait for the command");
    let _ = writer.join();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

// ---- the router and its traffic ----

/// Services named `<p>-ok`, `<p>-down` (no healthy instance), `<p>-dead` (a closed port),
/// `<p>-retry` (a closed port next to a live instance) and `<p>-slow`, all but the closed
/// ports on `backend`.
async fn register_mix(consul: &ConsulAgent, backend: &Backend, p: &str) {
    let live = backend.port();
    consul
        .register(&format!("{p}-ok"), &format!("{p}-ok-1"), live, &[])
        .await;
    consul
        .register_ttl(
            &format!("{p}-down"),
            &format!("{p}-down-1"),
            live,
            "critical",
        )
        .await;
    let dead = free_port();
    consul
        .register(&format!("{p}-dead"), &format!("{p}-dead-1"), dead, &[])
        .await;
    let dead = free_port();
    consul
        .register(&format!("{p}-retry"), &format!("{p}-retry-dead"), dead, &[])
        .await;
    consul
        .register(&format!("{p}-retry"), &format!("{p}-retry-live"), live, &[])
        .await;
    consul
        .register(&format!("{p}-slow"), &format!("{p}-slow-1"), live, &[])
        .await;
}

/// One round of the mix: 200s, a 404 (unknown host), a 503 (no healthy instance), a 502
/// (connect refused), a 504 (response timeout), and requests to the service with a dead
/// instance, some of which are retried.
async fn mix(addr: SocketAddr, p: &str) {
    let host = |s: &str| format!("{p}-{s}.app.test");
    for _ in 0..3 {
        assert_eq!(get(addr, &host("ok"), "/").await.status, StatusCode::OK);
    }
    let unknown = format!("{p}-nobody.app.test");
    assert_eq!(get(addr, &unknown, "/").await.status, StatusCode::NOT_FOUND);
    let down = get(addr, &host("down"), "/").await.status;
    assert_eq!(down, StatusCode::SERVICE_UNAVAILABLE);
    let dead = get(addr, &host("dead"), "/").await.status;
    assert_eq!(dead, StatusCode::BAD_GATEWAY);
    let slow = get(addr, &host("slow"), SLOW_PATH).await.status;
    assert_eq!(slow, StatusCode::GATEWAY_TIMEOUT);
    for _ in 0..5 {
        assert_eq!(get(addr, &host("retry"), "/").await.status, StatusCode::OK);
    }
}

/// Consul, a backend and a router with the mix registered, live and routing.
async fn router_with_mix(
    p: &str,
    extra_toml: &str,
) -> (ConsulAgent, Backend, consul_router::Running) {
    let consul = ConsulAgent::start().await;
    let backend = Backend::start(p).await;
    register_mix(&consul, &backend, p).await;
    let router = start_router(&consul.addr(), &format!("{extra_toml}{ROUTER_TOML}")).await;
    let a = router.proxy_addr;
    for (s, want) in [
        ("ok", StatusCode::OK),
        ("retry", StatusCode::OK),
        ("slow", StatusCode::OK),
        ("down", StatusCode::SERVICE_UNAVAILABLE),
        ("dead", StatusCode::BAD_GATEWAY),
    ] {
        wait_status(a, &format!("{p}-{s}.app.test"), want).await;
    }
    (consul, backend, router)
}

/// Mixes until the retry service has been retried at least once (each of its requests
/// meets the dead instance first half of the time).
async fn mix_until_retried(router: &consul_router::Running, p: &str) {
    let service = format!("{p}-retry");
    for _ in 0..20 {
        mix(router.proxy_addr, p).await;
        let text = get_admin(router.admin_addr, "/metrics").await.1;
        if sample(
            &text,
            "consul_router_retries_total",
            &[("service", &service)],
        ) > 0.0
        {
            return;
        }
    }
    panic!("100 requests to {service} were never retried");
}

// ---- a) the alert rules ----

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = tool("promtool");
    for (what, file) in [
        ("check", "config/prometheus/alerts.yml"),
        ("test", "config/prometheus/alerts_test.yml"),
    ] {
        let out = Command::new(&promtool)
            .args([what, "rules"])
            .arg(repo(file))
            .output()
            .expect("run promtool");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "`promtool {what} rules {file}` failed ({}):\n{text}",
            out.status
        );
    }
}

// ---- b) /metrics through promtool check metrics ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check_metrics() {
    let promtool = tool("promtool");
    bounded(LIMIT, async {
        let dir = TempDir::new("prom-lint");
        // With an access log, so that its dropped-lines counter is exposed too.
        let log = format!(
            "access_log = \"json\"\naccess_log_file = \"{}\"\n",
            dir.join("access.log").display()
        );
        let (_consul, _backend, router) = router_with_mix("lint", &log).await;
        mix_until_retried(&router, "lint").await;
        let (status, text) = get_admin(router.admin_addr, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        for name in [
            "consul_router_requests_total",
            "consul_router_request_duration_seconds_bucket",
            "consul_router_upstream_errors_total",
            "consul_router_retries_total",
            "consul_router_open_connections",
            "consul_router_access_log_dropped_total",
            "consul_router_routing_table_age_seconds",
            "consul_router_instances",
        ] {
            let series = text.lines().any(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            });
            assert!(series, "no {name} series in /metrics:\n{text}");
        }
        let mut cmd = Command::new(&promtool);
        cmd.args(["check", "metrics"]);
        let (code, said) = tokio::task::spawn_blocking(move || run_with_input(cmd, &text))
            .await
            .expect("promtool task");
        assert!(
            code == 0 && said.trim().is_empty(),
            "`promtool check metrics` on the router's /metrics exited {code} and said:\n{said}"
        );
        router.shutdown().await;
    })
    .await;
}

// ---- c) the dashboard's and the README's queries on a real Prometheus ----

/// A Prometheus server of our own; killed on drop, before its directory goes (fields drop
/// in order).
struct Prometheus {
    process: Process,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    /// Scrapes `target`'s `/metrics` every second and loads the alert rules.
    fn start(target: SocketAddr) -> Prometheus {
        let bin = tool("prometheus");
        let dir = TempDir::new("prom-server");
        let addr = free_addr();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: consul-router\n    scrape_interval: 1s\n    \
             metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n",
            repo("config/prometheus/alerts.yml").display()
        );
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).expect("write prometheus.yml");
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"));
        Prometheus {
            process: Process::spawn("prometheus", &mut cmd),
            addr,
            _dir: dir,
        }
    }

    /// The last lines of the server's log.
    fn log(&self) -> String {
        let log = self.process.stdout.text() + &self.process.stderr.text();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn api(&self, path: &str) -> (StatusCode, serde_json::Value) {
        let got = get(self.addr, &self.addr.to_string(), path).await;
        let json = serde_json::from_str(&got.body).unwrap_or(serde_json::Value::Null);
        (got.status, json)
    }

    /// An instant query: `Ok(number of series)` or `Err(why)`.
    async fn query(&self, expr: &str) -> Result<usize, String> {
        let (status, json) = self
            .api(&format!("/api/v1/query?query={}", encode(expr)))
            .await;
        if json["status"] != "success" {
            return Err(format!("{status}: {json}"));
        }
        Ok(json["data"]["result"].as_array().map_or(0, Vec::len))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `targets[].expr` of the dashboard, as Grafana would send it with every template
/// variable at "All" (`.*`) and `$__rate_interval` at 1m.
fn dashboard_queries() -> Vec<(String, String)> {
    let dash: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let names: Vec<&str> = vars
        .iter()
        .filter(|v| v["type"] != "datasource")
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(names.contains(&"service"), "no `service` variable");
    let service = vars
        .iter()
        .find(|v| v["name"] == "service")
        .expect("service");
    assert_eq!(
        service["query"]["query"], "label_values(consul_router_requests_total, service)",
        "the `service` variable's query"
    );
    assert!(
        vars.iter().any(|v| v["type"] == "datasource") || dash["__inputs"].is_array(),
        "no datasource variable or input"
    );
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else {
                continue;
            };
            let mut e = expr.to_owned();
            for name in &names {
                for form in [
                    format!("${{{name}}}"),
                    format!("${name}"),
                    format!("[[{name}]]"),
                ] {
                    e = e.replace(&form, ".*");
                }
            }
            for (from, to) in [
                ("${__rate_interval}", "1m"),
                ("$__rate_interval", "1m"),
                ("${__interval}", "1s"),
                ("$__interval", "1s"),
                ("${__range}", "1m"),
                ("$__range", "1m"),
            ] {
                e = e.replace(from, to);
            }
            assert!(!e.contains('$'), "a variable left in panel {title:?}: {e}");
            out.push((format!("dashboard panel {title:?}"), e));
        }
    }
    out
}

/// The expressions of README.md's ```promql blocks: `#` lines are comments, and a line
/// that starts with whitespace continues the expression before it.
fn readme_queries(readme: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut inside = false;
    for line in readme.lines() {
        if !inside {
            inside = line.trim_end() == "```promql";
            continue;
        }
        if line.trim_start().starts_with("```") {
            inside = false;
            continue;
        }
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        match out.last_mut() {
            Some((_, e)) if line.starts_with(char::is_whitespace) => {
                e.push(' ');
                e.push_str(text);
            }
            _ => out.push(("README".into(), text.to_owned())),
        }
    }
    out
}

#[test]
fn readme_blocks_parse_with_comments_and_continuations() {
    let md = "text\n```promql\n# a comment\nsum(a)\n  / sum(b)\n\nc\n```\n```\nnot(this)\n```\n";
    let got: Vec<String> = readme_queries(md).into_iter().map(|(_, e)| e).collect();
    assert_eq!(got, ["sum(a) / sum(b)", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_readme_queries_return_data_from_a_real_prometheus() {
    let bin = tool("prometheus");
    assert!(bin.is_file());
    let mut queries = dashboard_queries();
    assert!(
        queries.len() >= 9,
        "only {} dashboard queries",
        queries.len()
    );
    let readme = readme_queries(README);
    assert!(readme.len() >= 3, "README's ```promql blocks: {readme:?}");
    queries.extend(readme);
    bounded(LIMIT, async {
        let (_consul, _backend, router) = router_with_mix("promq", "").await;
        let prom = Prometheus::start(router.admin_addr);
        let started = Instant::now();
        let ready = prom.addr;
        prom.process
            .wait_listening(ready, Duration::from_secs(30))
            .await;
        wait_until(Duration::from_secs(30), "prometheus ready", || async move {
            get(ready, &ready.to_string(), "/-/ready").await.status == StatusCode::OK
        })
        .await;
        // Traffic all along, so that every rate has samples to work on.
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = {
            let stop = stop.clone();
            let addr = router.proxy_addr;
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    mix(addr, "promq").await;
                }
            })
        };
        mix_until_retried(&router, "promq").await;

        let deadline = Instant::now() + DATA_LIMIT;
        // Data may take a few scrapes to come; a refused query will not get better.
        let failures = loop {
            let mut failures = Vec::new();
            let mut refused = false;
            for (from, expr) in &queries {
                match prom.query(expr).await {
                    Ok(0) => failures.push(format!("{from}: no data: {expr}")),
                    Ok(_) => {}
                    Err(e) => {
                        refused = true;
                        failures.push(format!("{from}: {e}: {expr}"));
                    }
                }
            }
            if failures.is_empty() || refused || Instant::now() > deadline {
                break failures;
            }
            // Polling (a scrape a second): the failures are reported whole at the deadline.
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        stop.store(true, Ordering::Relaxed);
        assert!(
            failures.is_empty(),
            "after {:?}, {} of {} queries failed:\n{}\n--- prometheus log:\n{}",
            started.elapsed(),
            failures.len(),
            queries.len(),
            failures.join("\n"),
            prom.log()
        );
        // The server loaded the alert rules as well.
        let (_, rules) = prom.api("/api/v1/rules").await;
        let groups = rules["data"]["groups"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ours = groups.iter().find(|g| g["name"] == "consul-router");
        let n = ours.and_then(|g| g["rules"].as_array()).map_or(0, Vec::len);
        assert_eq!(n, 5, "the consul-router rule group as loaded: {rules}");
        timeout(Duration::from_secs(10), traffic)
            .await
            .expect("traffic stops")
            .expect("traffic task");
        drop(prom);
        router.shutdown().await;
    })
    .await;
}
