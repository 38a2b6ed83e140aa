//! `consul-router announce`: the real binary against a real Consul dev agent, with real
//! child processes (sh scripts that sleep, trap signals or burn CPU), and a real router
//! reading the load it writes. The systemd template unit goes through
//! `systemd-analyze verify`.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use consul_router::consul::types::HealthEntry;
use consul_router::consul::ConsulClient;
use rustix::process::Signal;

/// Runs `consul-router announce --consul CONSUL ARGS` (logging at info on its standard
/// error); SIGTERM on drop, so that announce stops its app too (SIGKILL would leave the app
/// running), then SIGKILL if it lingers.
fn start_announce(consul: &str, args: &[&str]) -> Process {
    let mut cmd = router_command();
    cmd.arg("announce")
        .args(["--consul", consul])
        .args(args)
        .env("RUST_LOG", "info");
    Process::spawn("consul-router announce", &mut cmd)
        .on_drop(OnDrop::Term(Duration::from_secs(10)))
}

/// Its log so far.
fn log_text(a: &Process) -> String {
    a.stderr.text()
}

/// Writes to Consul so far: registrations and load writes (each a full re-register).
fn writes(a: &Process) -> usize {
    log_text(a)
        .lines()
        .filter(|l| l.contains(" registered ") || l.contains(" written "))
        .count()
}

/// The instances of `name`, from Consul's health endpoint.
async fn instances(client: &ConsulClient, name: &str) -> Vec<HealthEntry> {
    client
        .health_service(name, 0, Duration::ZERO)
        .await
        .map(|r| r.value)
        .unwrap_or_default()
}

/// The instance `id` of `name`, if registered.
async fn instance(client: &ConsulClient, name: &str, id: &str) -> Option<HealthEntry> {
    instances(client, name)
        .await
        .into_iter()
        .find(|e| e.service.id == id)
}

/// The reported load of instance `id` of `name`, once it has one.
async fn load_of(client: &ConsulClient, name: &str, id: &str) -> Option<f64> {
    let e = instance(client, name, id).await?;
    e.service.meta?.get("load")?.parse().ok()
}

/// Health of the instance's own check (`service:<id>`).
async fn check_status(client: &ConsulClient, name: &str, id: &str) -> Option<String> {
    let e = instance(client, name, id).await?;
    let check = e
        .checks
        .iter()
        .find(|c| c.check_id == format!("service:{id}"))?;
    Some(check.status.clone())
}

/// The agent's own view of a check, as JSON (`/v1/agent/checks`).
async fn agent_check(agent: &ConsulAgent, id: &str) -> serde_json::Value {
    let addr: SocketAddr = ([127, 0, 0, 1], agent.http_port).into();
    let (_, body) = get_admin(addr, "/v1/agent/checks").await;
    let checks: HashMap<String, serde_json::Value> = serde_json::from_str(&body).unwrap();
    checks
        .get(&format!("service:{id}"))
        .cloned()
        .unwrap_or_default()
}

fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry: look at its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
        .unwrap_or(false)
}

/// Reads the pid a child script wrote to `file`.
async fn read_pid(file: &Path) -> i32 {
    wait_for(Duration::from_secs(10), "the app's pid file", || async {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_tags_meta_address_and_a_passing_ttl_check() {
    let consul = ConsulAgent::start().await;
    let announce = start_announce(
        &consul.addr(),
        &[
            "--name",
            "chat",
            "--port",
            "3000",
            "--address",
            "127.0.0.9",
            "--id",
            "chat-1",
            "--tag",
            "router.strategy=least-load",
            "--tag",
            "v2",
            "--meta",
            "version=7",
            // Short, to see the check stay passing past its TTL.
            "--ttl",
            "1s",
            "--",
            "sleep",
            "60",
        ],
    );
    let client = &consul.client;
    wait_until(Duration::from_secs(15), "chat-1 with a load", || async {
        load_of(client, "chat", "chat-1").await.is_some()
    })
    .await;
    let e = instance(client, "chat", "chat-1").await.unwrap();
    assert_eq!(e.service.address, "127.0.0.9");
    assert_eq!(e.service.port, 3000);
    assert_eq!(
        e.service.tags.clone().unwrap_or_default(),
        ["router.strategy=least-load", "v2"]
    );
    let meta = e.service.meta.clone().unwrap();
    assert_eq!(meta["version"], "7");
    for key in ["load", "cpu", "mem", "procs"] {
        assert!(meta.contains_key(key), "{key} missing from {meta:?}");
    }
    // A sleeping app: (almost) no load, one task.
    assert!(meta["load"].parse::<u32>().unwrap() <= 10, "{meta:?}");
    assert_eq!(meta["procs"], "1", "{meta:?}");
    // Passing from the start, and still passing after three TTLs.
    assert_eq!(
        check_status(client, "chat", "chat-1").await.as_deref(),
        Some("passing")
    );
    let check = agent_check(&consul, "chat-1").await;
    assert_eq!(check["Type"], "ttl", "{check}");
    // Three TTLs go by: there is no event to wait for, only a check that must not lapse.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        check_status(client, "chat", "chat-1").await.as_deref(),
        Some("passing"),
        "{}",
        log_text(&announce)
    );
    // An idle app: the registration and the first load, nothing since.
    assert_eq!(writes(&announce), 2, "{}", log_text(&announce));
    announce.signal(Signal::TERM);
    // sleep dies of SIGTERM: 128 + 15.
    assert_eq!(
        announce.wait_exit(Duration::from_secs(10)).await.code(),
        Some(143)
    );
    assert!(instance(client, "chat", "chat-1").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_tcp_checks_are_run_by_consul() {
    let consul = ConsulAgent::start().await;
    let web = Backend::start("web").await;
    let web_port = web.port().to_string();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp.local_addr().unwrap().port().to_string();
    let common = ["--address", "127.0.0.1", "--check-interval", "1s"];
    let _http = start_announce(
        &consul.addr(),
        &[
            &["--name", "web", "--id", "web-1", "--port", &web_port][..],
            &common,
            &["--check-http", "/health", "--", "sleep", "60"],
        ]
        .concat(),
    );
    let _tcp = start_announce(
        &consul.addr(),
        &[
            &["--name", "db", "--id", "db-1", "--port", &tcp_port][..],
            &common,
            &["--check-tcp", "--no-load", "--", "sleep", "60"],
        ]
        .concat(),
    );
    let client = &consul.client;
    wait_until(Duration::from_secs(20), "both checks passing", || async {
        check_status(client, "web", "web-1").await.as_deref() == Some("passing")
            && check_status(client, "db", "db-1").await.as_deref() == Some("passing")
    })
    .await;
    let http = agent_check(&consul, "web-1").await;
    assert_eq!(http["Type"], "http", "{http}");
    assert!(
        http["Output"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("http://127.0.0.1:{web_port}/health")),
        "{http}"
    );
    assert_eq!(agent_check(&consul, "db-1").await["Type"], "tcp");
    // --no-load: the registration carries no load.
    let db = instance(client, "db", "db-1").await.unwrap();
    assert!(!db.service.meta.unwrap_or_default().contains_key("load"));
    // Consul runs the check, not announce: with the web server gone, it fails.
    drop(web);
    wait_until(
        Duration::from_secs(15),
        "the HTTP check failing",
        || async { check_status(client, "web", "web-1").await.as_deref() == Some("critical") },
    )
    .await;
    drop(tcp);
}

#[tokio::test]
async fn exits_with_the_apps_status() {
    // No Consul at all (a refused port): the app runs and its status comes back anyway.
    let nowhere = "http://127.0.0.1:1";
    let args = |script: &'static str| -> Vec<&'static str> {
        vec!["--name", "x", "--port", "1", "--", "sh", "-c", script]
    };
    for (script, code) in [
        ("exit 3", 3),
        ("exit 0", 0),
        ("kill -TERM $$", 128 + 15),
        ("kill -KILL $$", 128 + 9),
    ] {
        let a = start_announce(nowhere, &args(script));
        let status = a.wait_exit(Duration::from_secs(15)).await;
        assert_eq!(status.code(), Some(code), "{script}: {}", log_text(&a));
    }
    let missing = start_announce(
        nowhere,
        &["--name", "x", "--port", "1", "--", "/nonexistent/app"],
    );
    assert_eq!(
        missing.wait_exit(Duration::from_secs(15)).await.code(),
        Some(127)
    );
    // Bad arguments: status 2 and a message naming the flag.
    for (args, says) in [
        (&["--name", "x", "--port", "0"][..], "--port"),
        (&["--name", "x", "--port", "1", "--meta", "novalue"], "'='"),
        (
            &[
                "--name",
                "x",
                "--port",
                "1",
                "--check-http",
                "/",
                "--check-tcp",
            ],
            "--check-tcp",
        ),
        (
            &["--name", "x", "--port", "1", "--meta", "load=1"],
            "--no-load",
        ),
    ] {
        let out = router_command()
            .arg("announce")
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_first_then_stops_the_app() {
    let consul = ConsulAgent::start().await;
    let dir = TempDir::new("announce-sigterm");
    let seen = dir.join("seen");
    // On SIGTERM, the app asks Consul whether it is still registered (it must not be), and
    // exits with 7. HUP and USR1 are passed on too.
    let script = format!(
        "trap 'echo hup >> {seen}' HUP; trap 'echo usr1 >> {seen}' USR1; \
         trap 'curl -s -o /dev/null -w \"term %{{http_code}}\" {consul}/v1/agent/service/app-1 >> {seen}; exit 7' TERM; \
         while :; do sleep 0.1; done",
        seen = seen.display(),
        consul = consul.addr(),
    );
    let announce = start_announce(
        &consul.addr(),
        &[
            "--name", "app", "--id", "app-1", "--port", "3000", "--", "sh", "-c", &script,
        ],
    );
    let client = &consul.client;
    wait_until(Duration::from_secs(15), "app-1 registered", || async {
        instance(client, "app", "app-1").await.is_some()
    })
    .await;
    announce.signal(Signal::HUP);
    announce.signal(Signal::USR1);
    wait_until(
        Duration::from_secs(5),
        "HUP and USR1 at the app",
        || async {
            let s = std::fs::read_to_string(&seen).unwrap_or_default();
            s.contains("hup") && s.contains("usr1")
        },
    )
    .await;
    // Still registered: only TERM and INT stop announce.
    assert!(instance(client, "app", "app-1").await.is_some());
    announce.signal(Signal::TERM);
    assert_eq!(
        announce.wait_exit(Duration::from_secs(15)).await.code(),
        Some(7)
    );
    let seen = std::fs::read_to_string(&seen).unwrap();
    assert!(seen.ends_with("term 404"), "{seen:?}");
    assert!(instance(client, "app", "app-1").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_once_consul_comes_up_and_again_after_the_agent_lost_it() {
    let mut consul = ConsulAgent::start().await;
    consul.kill();
    let dir = TempDir::new("announce-consul-down");
    let pid_file = dir.join("pid");
    let script = format!("echo $$ > {}; exec sleep 120", pid_file.display());
    let announce = start_announce(
        &consul.addr(),
        &[
            "--name", "late", "--id", "late-1", "--port", "3000", "--ttl", "3s", "--", "sh", "-c",
            &script,
        ],
    );
    // The app starts at once, Consul or not.
    let app = read_pid(&pid_file).await;
    assert!(alive(app));
    // Consul comes up only after announce has found it missing.
    announce
        .stderr
        .wait_line(Duration::from_secs(15), "a failed registration", |l| {
            l.contains("cannot register late-1")
        })
        .await;
    consul.restart().await;
    let client = consul.client.clone();
    wait_until(Duration::from_secs(20), "late-1 registered", || async {
        check_status(&client, "late", "late-1").await.as_deref() == Some("passing")
    })
    .await;
    assert!(alive(app), "the app ran the whole time");
    // A fresh agent (all state lost): the next TTL pass finds the check gone (every 1 s).
    consul.restart().await;
    let client = consul.client.clone();
    wait_until(
        Duration::from_secs(20),
        "late-1 registered again",
        || async { check_status(&client, "late", "late-1").await.as_deref() == Some("passing") },
    )
    .await;
    assert!(alive(app), "the app ran the whole time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_follows_the_apps_cpu_and_writes_stay_few() {
    let consul = ConsulAgent::start().await;
    // Idle for 2 s, a busy loop in a subshell (a descendant) for 5 s, then idle again.
    let script = "sleep 2; (while :; do :; done) & busy=$!; sleep 5; kill $busy; exec sleep 60";
    let started = Instant::now();
    let announce = start_announce(
        &consul.addr(),
        &[
            "--name",
            "burn",
            "--id",
            "burn-1",
            "--port",
            "3000",
            "--min-gap",
            "1s",
            "--step",
            "5",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let client = &consul.client;
    wait_until(Duration::from_secs(20), "a load of 15 or more", || async {
        load_of(client, "burn", "burn-1")
            .await
            .is_some_and(|l| l >= 15.0)
    })
    .await;
    wait_until(Duration::from_secs(20), "the load back under 5", || async {
        load_of(client, "burn", "burn-1")
            .await
            .is_some_and(|l| l < 5.0)
    })
    .await;
    let meta = instance(client, "burn", "burn-1")
        .await
        .unwrap()
        .service
        .meta
        .unwrap();
    assert!(meta["cpu"].parse::<f64>().unwrap() < 10.0, "{meta:?}");
    // Never more than one write per --min-gap (1 s), plus the registration.
    let elapsed = started.elapsed().as_secs_f64();
    let writes = writes(&announce);
    assert!(
        (writes as f64) <= 2.0 + elapsed,
        "{writes} writes in {elapsed:.1} s:\n{}",
        log_text(&announce)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_load_router_avoids_the_instance_whose_app_is_busy() {
    let consul = ConsulAgent::start().await;
    let router = start_router(&consul.addr(), "").await;
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let instance_args = |id: &'static str, port: String, script: &'static str| {
        vec![
            "--name".to_owned(),
            "work".into(),
            "--id".into(),
            id.into(),
            "--port".into(),
            port,
            "--address".into(),
            "127.0.0.1".into(),
            "--tag".into(),
            "router.strategy=least-load".into(),
            "--min-gap".into(),
            "1s".into(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            script.into(),
        ]
    };
    // Backend a's app is busy, b's sleeps.
    let busy = instance_args("work-a", a.port().to_string(), "while :; do :; done");
    let idle = instance_args("work-b", b.port().to_string(), "exec sleep 60");
    let _busy = start_announce(&consul.addr(), &refs(&busy));
    let _idle = start_announce(&consul.addr(), &refs(&idle));
    // The router's table shows both loads.
    let admin = router.admin_addr;
    wait_until(
        Duration::from_secs(20),
        "loads in the routing table",
        || async {
            let (_, body) = get_admin(admin, "/api/routes").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let loads: HashMap<String, f64> = v["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|r| r["instances"].as_array().cloned().unwrap_or_default())
                .filter_map(|i| Some((i["id"].as_str()?.to_owned(), i["load"].as_f64()?)))
                .collect();
            loads.get("work-a").is_some_and(|l| *l >= 15.0)
                && loads.get("work-b").is_some_and(|l| *l <= 5.0)
        },
    )
    .await;
    for _ in 0..20 {
        let g = get(router.proxy_addr, "work.app.test", "/").await;
        assert_eq!(who(&g), "b", "{}", g.body);
    }
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn template_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/consul-router-announce@.service"),
    )
    .unwrap();
    for line in [
        "EnvironmentFile=/etc/consul-router/announce-%i.env",
        "ExecStart=/usr/local/bin/consul-router announce --name %i --port ${PORT} $ANNOUNCE_FLAGS -- $COMMAND",
        "KillSignal=SIGTERM",
        // SIGTERM to announce only: it deregisters, then passes it on.
        "KillMode=mixed",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line:?}");
    }
    let analyze = systemd_analyze();
    // verify checks that ExecStart's binary exists: point it at the one cargo built. An
    // instance name stands for %i.
    let dir = TempDir::new("announce-unit");
    let bin = dir.join("consul-router");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_consul-router"), &bin).unwrap();
    let local = unit.replace("/usr/local/bin/consul-router", bin.to_str().unwrap());
    let path = dir.join("consul-router-announce@chat.service");
    let verify = |text: &str| {
        std::fs::write(&path, text).unwrap();
        common::verify(&analyze, &path)
    };
    let (ok, lines) = verify(&local);
    assert!(ok && lines.is_empty(), "systemd-analyze verify: {lines:#?}");
    // The check can fail: an unknown key is reported.
    let (_, lines) = verify(&local.replace("KillMode=mixed", "KillMode=mixed\nTypo=1"));
    assert!(lines.iter().any(|l| l.contains("Typo")), "{lines:#?}");
}
