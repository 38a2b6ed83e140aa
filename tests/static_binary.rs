//! The deployable artifacts: the static binary from scripts/build-static.sh (static ELF, under
//! 20 MB; alone in an empty root as 65532, as in the image, it routes for real on a real
//! Consul and `health` answers), and the Dockerfile's final stage, checked statically since
//! no Docker engine may be at hand.
//!
//! scripts/test.sh builds the static binary once and passes its path in
//! $CONSUL_ROUTER_STATIC_BIN; without it, the test runs the script (a fat-LTO release build:
//! minutes when it is not fresh).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{get, is_root, wait_status, wait_until, Backend, ConsulAgent, RouterProcess, TempDir};
use rustix::process::Signal;

/// The static binary, built at most once per test process.
fn static_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("CONSUL_ROUTER_STATIC_BIN") {
            return PathBuf::from(p);
        }
        let out = Command::new("scripts/build-static.sh")
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/build-static.sh");
        assert!(out.status.success(), "scripts/build-static.sh failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// How an ELF file is linked: whether it names a program interpreter (PT_INTERP), and the
/// number of shared libraries its dynamic section needs (DT_NEEDED). A static-pie binary
/// keeps a dynamic section for its own relocations but needs nothing.
fn elf_linking(elf: &[u8]) -> (bool, usize) {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!((elf[4], elf[5]), (2, 1), "not 64-bit little-endian");
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    let (mut interp, mut needed) = (false, 0);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        match u32_at(ph) {
            // PT_INTERP
            3 => interp = true,
            // PT_DYNAMIC: (tag, value) pairs of 8 bytes each up to DT_NULL; DT_NEEDED is 1.
            2 => {
                let (off, size) = (u64_at(ph + 8), u64_at(ph + 32));
                for entry in (off..off + size).step_by(16) {
                    match u64_at(entry) {
                        0 => break,
                        1 => needed += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (interp, needed)
}

#[test]
fn static_binary_is_static_small_and_runs() {
    let bin = static_bin();
    let elf = std::fs::read(bin).expect("read the static binary");
    assert_eq!(
        elf_linking(&elf),
        (false, 0),
        "{} is not static",
        bin.display()
    );
    assert!(
        elf.len() < 20_000_000,
        "{} is {} bytes, over 20 MB",
        bin.display(),
        elf.len()
    );
    let out = Command::new(bin).arg("--version").output().expect("run it");
    assert!(out.status.success());
    let version = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        version.trim(),
        concat!("consul-router ", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn elf_check_tells_a_dynamic_binary() {
    // The debug build links glibc dynamically: an interpreter and needed libraries.
    let elf = std::fs::read(env!("CARGO_BIN_EXE_consul-router")).unwrap();
    let (interp, needed) = elf_linking(&elf);
    assert!(interp && needed > 0, "{interp} {needed}");
}

/// `consul-router health --admin http://ADMIN` with the static binary.
async fn health(admin: SocketAddr) -> (i32, String) {
    let mut cmd = Command::new(static_bin());
    cmd.args([
        "health",
        "--admin",
        &format!("http://{admin}"),
        "--timeout",
        "2s",
    ]);
    common::output(cmd).await
}

/// Starts the static binary as a router on free ports, as the image runs it: alone in an
/// empty root with the sample configuration, as 65532:65532, finding Consul by a name in
/// /etc/hosts (which Docker writes). Without root (no chroot), it runs in place instead.
/// Its addresses come from its start line; the root goes with the process.
async fn start_static_router(consul_port: u16) -> RouterProcess {
    let root = TempDir::new("static-root");
    std::fs::create_dir_all(root.join("etc/consul-router")).unwrap();
    std::fs::copy(static_bin(), root.join("consul-router")).unwrap();
    let config = root.join("etc/consul-router/consul-router.toml");
    std::fs::copy("config/consul-router.toml", &config).unwrap();
    std::fs::write(root.join("etc/hosts"), "127.0.0.1 localhost consul.test\n").unwrap();
    let (mut cmd, config, consul_host) = if is_root() {
        let mut c = Command::new("chroot");
        c.arg("--userspec=65532:65532")
            .arg(root.path())
            .arg("/consul-router");
        (
            c,
            "/etc/consul-router/consul-router.toml".into(),
            "consul.test",
        )
    } else {
        let c = Command::new(root.join("consul-router"));
        (c, config.display().to_string(), "127.0.0.1")
    };
    cmd.args(["--config", &config, "--domain", "app.test"])
        .args(["--workers", "2"])
        .env_remove("CONSUL_HTTP_ADDR")
        .env_remove("CONSUL_HTTP_TOKEN");
    RouterProcess::builder()
        .command(cmd)
        .consul(&format!("http://{consul_host}:{consul_port}"))
        .keep(root)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_binary_routes_on_real_consul_and_answers_health() {
    let consul = ConsulAgent::start().await;
    let backend = Backend::start("static-backend").await;
    consul
        .register("hello", "hello-1", backend.port(), &[])
        .await;
    let router = start_static_router(consul.http_port).await;
    let (proxy, admin) = (router.proxy_addr, router.admin_addr);

    // `health` turns 0 once the first table is live; 1 until then.
    wait_until(Duration::from_secs(60), "health to say healthy", || async {
        let (code, out) = health(admin).await;
        assert!(code == 0 || code == 1, "{code}: {out}");
        if code == 0 {
            assert!(out.contains("healthy: 200"), "{out}");
        }
        code == 0
    })
    .await;

    // Real traffic through the musl build (and its allocator) on several connections.
    wait_status(proxy, "hello.app.test", http::StatusCode::OK).await;
    let requests = (0..8).map(|_| {
        tokio::spawn(async move {
            for _ in 0..25 {
                let g = get(proxy, "hello.app.test", "/bytes/100000").await;
                assert_eq!((g.status.as_u16(), g.body.len()), (200, 100_000));
            }
        })
    });
    for r in requests.collect::<Vec<_>>() {
        r.await.unwrap();
    }
    let g = get(proxy, "hello.app.test", "/").await;
    assert_eq!(common::who(&g), "static-backend");

    // SIGTERM drains and exits 0; then the admin port is closed and `health` says 1.
    router.signal(Signal::TERM);
    let status = router.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
    let (code, out) = health(admin).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("connection refused"), "{out}");
}

// The Dockerfile, read as Docker reads it: continuation lines joined, comments dropped.

/// (instruction, arguments) in order.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("Dockerfile").expect("Dockerfile");
    let mut out = Vec::new();
    let mut line = String::new();
    for raw in text.lines() {
        let raw = raw.trim();
        if raw.starts_with('#') || (raw.is_empty() && line.is_empty()) {
            continue;
        }
        if let Some(head) = raw.strip_suffix('\\') {
            line.push_str(head);
            line.push(' ');
            continue;
        }
        line.push_str(raw);
        let (cmd, args) = line.split_once(' ').unwrap_or((&line, ""));
        out.push((cmd.to_ascii_uppercase(), args.trim().to_owned()));
        line.clear();
    }
    out
}

fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("not exec form: {args}: {e}"))
}

#[test]
fn dockerfile_final_stage_is_static_nonroot_and_healthchecked() {
    let all = dockerfile();
    let last_from = all.iter().rposition(|(c, _)| c == "FROM").unwrap();
    let (build, fin) = all.split_at(last_from);
    let arg = |stage: &[(String, String)], cmd: &str| {
        stage
            .iter()
            .filter(|(c, _)| c == cmd)
            .map(|(_, a)| a.clone())
            .collect::<Vec<_>>()
    };

    // The build stage makes the binary with the script; the final stage copies its output.
    assert!(
        arg(build, "RUN")
            .iter()
            .any(|r| r.contains("scripts/build-static.sh")),
        "the build stage does not run scripts/build-static.sh"
    );
    let image = &fin[0].1;
    assert!(
        image == "scratch" || image.starts_with("gcr.io/distroless/static"),
        "final stage FROM {image}"
    );
    let workdir = arg(build, "WORKDIR").pop().expect("build WORKDIR");
    let copies = arg(fin, "COPY");
    let binary = copies
        .iter()
        .find_map(|c| {
            let rest = c.strip_prefix("--from=")?;
            let mut words = rest.split_whitespace().skip(1);
            let (src, dst) = (words.next()?, words.next()?);
            assert_eq!(
                src,
                format!("{workdir}/target/static/consul-router"),
                "not the script's output"
            );
            Some(dst.to_owned())
        })
        .expect("COPY --from=<build stage> of the binary");

    let user = arg(fin, "USER").pop().expect("USER in the final stage");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER {user}: scratch has no passwd, so a numeric non-root uid"
    );

    let exposed: Vec<String> = arg(fin, "EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert!(exposed.contains(&"8080".into()) && exposed.contains(&"9090".into()));

    let check = arg(fin, "HEALTHCHECK").pop().expect("HEALTHCHECK");
    let cmd = exec_form(&check[check.find("CMD [").expect("HEALTHCHECK CMD [...]") + 4..]);
    assert_eq!(
        cmd[..4],
        [&binary, "health", "--admin", "http://127.0.0.1:9090"]
    );

    // ENTRYPOINT and CMD: the router on 0.0.0.0, the admin port where the check looks, and
    // the sample config where COPY put it. The debug binary checks the arguments as given.
    let entry = exec_form(&arg(fin, "ENTRYPOINT").pop().expect("ENTRYPOINT"));
    let cmd = exec_form(&arg(fin, "CMD").pop().expect("CMD"));
    assert_eq!(entry[0], binary);
    let args: Vec<String> = entry[1..].iter().chain(&cmd).cloned().collect();
    let after = |flag: &str| {
        let i = args.iter().position(|a| a == flag).expect(flag);
        args[i + 1].clone()
    };
    assert_eq!(after("--listen"), "0.0.0.0:8080");
    assert_eq!(after("--admin-listen"), "0.0.0.0:9090");
    let config = after("--config");
    let sample = copies
        .iter()
        .find_map(|c| {
            let (src, dst) = c.split_once(' ')?;
            (dst.trim() == config).then(|| src.to_owned())
        })
        .expect("COPY of the config the CMD names");
    let local: Vec<String> = args
        .iter()
        .map(|a| {
            if *a == config {
                sample.clone()
            } else {
                a.clone()
            }
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_consul-router"))
        .args(&local)
        .arg("--check-config")
        .env_remove("CONSUL_HTTP_ADDR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{local:?}: {out:?}");

    // The build context keeps out the target directory and .git, not what the build uses.
    let ignore = std::fs::read_to_string(".dockerignore").expect(".dockerignore");
    let ignored: Vec<&str> = ignore.lines().map(|l| l.trim().trim_matches('/')).collect();
    assert!(
        ignored.contains(&"target") && ignored.contains(&".git"),
        "{ignore}"
    );
    for needed in ["src", "scripts", "config", "Cargo.toml", "Cargo.lock"] {
        assert!(!ignored.contains(&needed), "{needed} is ignored");
    }
}
