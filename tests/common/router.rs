//! The router under test: in this process ([`start_router`], a [`Running`]), or the real
//! binary as a child process ([`RouterProcess`]).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hyper::StatusCode;

use consul_router::config::{Config, Overrides};
use consul_router::Running;

use super::client::get_admin;
use super::process::Process;
use super::temp::TempDir;
use super::wait::wait_until;

/// Router config on free ports for the Consul at `consul_url`.
pub fn router_config(consul_url: &str, toml: &str) -> Config {
    let file = Config::parse_file(toml, Path::new("test.toml")).expect("test toml");
    let o = Overrides {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        consul: Some(consul_url.into()),
        ..Default::default()
    };
    Config::from_file(file, &o).expect("test config")
}

/// Starts a router in this process with `toml` (domains default to app.test) and waits
/// until it is live.
pub async fn start_router(consul_url: &str, toml: &str) -> Running {
    let toml = if toml.contains("domains") {
        toml.to_owned()
    } else {
        format!("domains = [\"app.test\"]\n{toml}")
    };
    let r = consul_router::start(router_config(consul_url, &toml))
        .await
        .expect("router start");
    wait_healthy(r.admin_addr, Duration::from_secs(20)).await;
    r
}

/// Waits until `/healthz` on `admin` says 200 (the first routing table is live).
pub async fn wait_healthy(admin: SocketAddr, limit: Duration) {
    wait_until(limit, "router live", || async move {
        get_admin(admin, "/healthz").await.0 == StatusCode::OK
    })
    .await;
}

/// Waits (10 s at most) until `host` is in `router`'s live table with a routable instance.
pub async fn wait_routable(router: &Running, host: &str) {
    wait_until(Duration::from_secs(10), host, || async {
        router
            .routes
            .load()
            .lookup(host)
            .is_some_and(|s| s.routable > 0)
    })
    .await;
}

/// The consul-router binary cargo built for these tests, with the environment that would
/// change its behaviour removed (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, RUST_LOG).
pub fn router_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_consul-router"));
    c.env_remove("CONSUL_HTTP_ADDR")
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("RUST_LOG");
    c
}

/// How to run the router binary; see [`RouterProcess::builder`].
#[derive(Debug)]
pub struct RouterBuilder {
    cmd: Command,
    consul: Option<String>,
    config: ConfigSource,
    args: Vec<OsString>,
    keep: Vec<Box<dyn std::fmt::Debug + Send + Sync>>,
}

#[derive(Debug)]
enum ConfigSource {
    /// Flags only: `--listen` and `--admin-listen` on 127.0.0.1:0.
    Flags,
    /// A file written from this text (with defaults), passed with `--config`.
    Toml(String),
    /// A file of the test's own, passed with `--config` as it is.
    File(PathBuf),
}

impl RouterBuilder {
    /// Runs `cmd` instead of the cargo-built binary (another build, or a wrapper such as
    /// `chroot ... /consul-router`); the builder's flags follow its arguments.
    pub fn command(mut self, cmd: Command) -> Self {
        self.cmd = cmd;
        self
    }

    /// `--consul url`. Without it, a router with flags only is given `http://127.0.0.1:1`
    /// (nothing listens there: discovery retries, the router runs); one with a
    /// configuration file is given no `--consul`.
    pub fn consul(mut self, url: &str) -> Self {
        self.consul = Some(url.to_owned());
        self
    }

    /// A configuration file with `toml` in it, written to a temporary directory (kept as long
    /// as the process) and passed with `--config`. Unless the text sets them, it starts with
    /// `listen` and `admin_listen` on 127.0.0.1:0 and `domains = ["app.test"]`. The text may
    /// have tables (`[proxy]`, `[consul]`, ...): the defaults go before it.
    pub fn toml(mut self, toml: &str) -> Self {
        self.config = ConfigSource::Toml(toml.to_owned());
        self
    }

    /// `--config path`, a file the test wrote (and may rewrite before a SIGHUP).
    pub fn config_file(mut self, path: &Path) -> Self {
        self.config = ConfigSource::File(path.to_owned());
        self
    }

    /// One more argument after the builder's own flags.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Keeps `thing` (a directory it runs in, say) until the process is gone.
    pub fn keep(mut self, thing: impl std::fmt::Debug + Send + Sync + 'static) -> Self {
        self.keep.push(Box::new(thing));
        self
    }

    /// An environment variable for the process (e.g. NOTIFY_SOCKET, RUST_LOG).
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    /// Starts it without waiting for anything (e.g. for a start that must fail). Its
    /// configuration file, if written here, lives as long as the [`Process`].
    pub fn spawn(self) -> Process {
        let (process, _) = self.spawn_with_config();
        process
    }

    fn spawn_with_config(mut self) -> (Process, Option<PathBuf>) {
        let mut dir = None;
        let config = match &self.config {
            ConfigSource::Flags => {
                self.cmd
                    .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
                let consul = self.consul.as_deref().unwrap_or("http://127.0.0.1:1");
                self.cmd.args(["--consul", consul]);
                None
            }
            ConfigSource::Toml(toml) => {
                let d = TempDir::new("router-process");
                let path = d.write("consul-router.toml", &with_defaults(toml));
                dir = Some(d);
                Some(path)
            }
            ConfigSource::File(path) => Some(path.clone()),
        };
        if let Some(path) = &config {
            self.cmd.arg("--config").arg(path);
            if let Some(consul) = &self.consul {
                self.cmd.args(["--consul", consul]);
            }
        }
        self.cmd.args(&self.args);
        let mut process = Process::spawn("consul-router", &mut self.cmd);
        if let Some(dir) = dir {
            process = process.keep(dir);
        }
        for thing in self.keep {
            process = process.keep(thing);
        }
        (process, config)
    }

    /// Starts it and waits (30 s at most) for its start line, which names the proxy and
    /// admin addresses; panics, showing its output, if it exits first.
    pub async fn start(self) -> RouterProcess {
        let (process, config_path) = self.spawn_with_config();
        let line = process
            .wait_line(Duration::from_secs(30), "the start line", |l| {
                l.starts_with(START_LINE)
            })
            .await;
        let (proxy, admin) = line[START_LINE.len()..]
            .split_once(", admin on http://")
            .unwrap_or_else(|| panic!("start line {line:?}"));
        RouterProcess {
            proxy_addr: proxy.trim().parse().expect("proxy address"),
            admin_addr: admin.trim().parse().expect("admin address"),
            config_path,
            process,
        }
    }

    /// [`RouterBuilder::start`], then waits (30 s at most) until `/healthz` says 200.
    pub async fn start_healthy(self) -> RouterProcess {
        let r = self.start().await;
        r.wait_healthy().await;
        r
    }
}

/// What the router prints once it listens, before the addresses.
const START_LINE: &str = "consul-router: proxy on http://";

/// The configuration file [`RouterBuilder::toml`] writes: `toml` after `listen`,
/// `admin_listen` and `domains` defaults for the keys it leaves out.
pub fn with_defaults(toml: &str) -> String {
    // Top-level keys come before the first table.
    let top: Vec<&str> = toml
        .lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .collect();
    let sets = |key: &str| {
        top.iter().any(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
    };
    let mut out = String::new();
    for (key, default) in [
        ("listen", "\"127.0.0.1:0\""),
        ("admin_listen", "\"127.0.0.1:0\""),
        ("domains", "[\"app.test\"]"),
    ] {
        if !sets(key) {
            out.push_str(&format!("{key} = {default}\n"));
        }
    }
    out + toml + "\n"
}

/// The router binary as a child process: both outputs captured (see [`Process`], which it
/// derefs to, for signals, waits and output), its addresses from its start line. Killed on
/// drop; its output is printed if the test is failing.
#[derive(Debug)]
pub struct RouterProcess {
    pub process: Process,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The configuration file it was started with, if any.
    pub config_path: Option<PathBuf>,
}

impl RouterProcess {
    /// A router process with flags only (see [`RouterBuilder`] for the rest):
    /// `RouterProcess::builder().consul(&consul.addr()).toml("...").start_healthy().await`.
    pub fn builder() -> RouterBuilder {
        RouterBuilder {
            cmd: router_command(),
            consul: None,
            config: ConfigSource::Flags,
            args: Vec::new(),
            keep: Vec::new(),
        }
    }

    /// Waits (30 s at most) until `/healthz` says 200; panics, showing its output, if it
    /// exits first.
    pub async fn wait_healthy(&self) {
        let admin = self.admin_addr;
        let process = &self.process;
        wait_until(Duration::from_secs(30), "router live", || async move {
            if let Some(s) = process.try_exit() {
                panic!("the router exited ({s})\n{}", process.output());
            }
            get_admin(admin, "/healthz").await.0 == StatusCode::OK
        })
        .await;
    }
}

impl RouterProcess {
    /// SIGTERM, then its exit status and both outputs in full (see [`Process::stop`]).
    pub async fn stop(self, limit: Duration) -> (i32, String, String) {
        self.process.stop(limit).await
    }
}

impl Deref for RouterProcess {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}
