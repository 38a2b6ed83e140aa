//! The binary's command line: bad configuration is refused with the key's name and exit 2.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_consul-router"))
        .args(args)
        .env_remove("CONSUL_HTTP_ADDR")
        .output()
        .expect("run consul-router");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cr-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
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
    for (file, text, key) in cases {
        let p = write(file, text);
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
