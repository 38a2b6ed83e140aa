//! `consul-router announce`'s flags (clap) and their validation into [`Settings`].
//! Malformed values are refused by clap; what needs several flags at once is checked in
//! [`AnnounceArgs::settings`]. Both end in exit status 2.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{Config, ConfigError, ConsulConfig, FileConfig, Overrides};

use super::load::WritePolicy;

/// Register this instance in Consul, keep its check passing, report its load, and
/// deregister on the way out. With `-- COMMAND`, run the app as a child (the container's
/// entrypoint): signals are passed on, and announce exits with the app's status.
#[derive(Debug, Clone, clap::Args)]
pub struct AnnounceArgs {
    /// Service name.
    #[arg(long, value_parser = parse_name)]
    pub name: String,
    /// Port the app listens on.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Address routers reach the app at [default: this host's address on the route to the
    /// Consul agent].
    #[arg(long, value_name = "IP")]
    pub address: Option<IpAddr>,
    /// Service ID, unique on the agent [default: <name>-<hostname>-<port>].
    #[arg(long, value_parser = parse_name)]
    pub id: Option<String>,
    /// Tag (repeatable), e.g. router.strategy=least-load.
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Service Meta pair (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,
    /// Consul runs an HTTP check on PATH (http://<address>:<port>PATH) or on a full URL,
    /// instead of the TTL check announce passes itself.
    #[arg(long, value_name = "PATH|URL", value_parser = parse_check_http, conflicts_with = "check_tcp")]
    pub check_http: Option<String>,
    /// Consul runs a TCP check on <address>:<port> instead of the TTL check.
    #[arg(long)]
    pub check_tcp: bool,
    /// Interval of the HTTP or TCP check.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub check_interval: Duration,
    /// TTL of announce's own check, passed every TTL/3 (with an HTTP or TCP check, announce
    /// makes sure the agent still has the service as often).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Consul removes the service after its check has been critical this long (a crashed
    /// container is cleaned up). 1m at least.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
    pub deregister_after: Duration,
    /// Consul agent URL.
    #[arg(
        long,
        value_name = "URL",
        env = "CONSUL_HTTP_ADDR",
        default_value = "http://127.0.0.1:8500"
    )]
    pub consul: String,
    /// ACL token.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CONSUL_HTTP_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// CA bundle for an https Consul URL.
    #[arg(long, value_name = "FILE", env = "CONSUL_CACERT")]
    pub ca_file: Option<PathBuf>,
    /// How often the load is measured.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// A load change of this many points (1-100) is written once --min-gap has passed.
    #[arg(long, value_name = "POINTS", default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub step: u8,
    /// Least time between two load writes.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub min_gap: Duration,
    /// A smaller change (2 points or more) is written once this long has passed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub refresh: Duration,
    /// The task count (processes and threads) at which the app counts as full [default: the
    /// cgroup's pids.max, else 1000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_procs: Option<u64>,
    /// Report no load: register and keep the check only.
    #[arg(long)]
    pub no_load: bool,
    /// The app and its arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Validated settings for a run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Service name.
    pub name: String,
    /// Service ID, if given.
    pub id: Option<String>,
    /// The app's port.
    pub port: u16,
    /// The app's address, if given.
    pub address: Option<IpAddr>,
    /// Tags.
    pub tags: Vec<String>,
    /// The user's Meta pairs.
    pub meta: Vec<(String, String)>,
    /// The check.
    pub check: CheckSpec,
    /// The TTL check's TTL; a third of it paces the upkeep.
    pub ttl: Duration,
    /// DeregisterCriticalServiceAfter.
    pub deregister_after: Duration,
    /// The agent.
    pub consul: ConsulConfig,
    /// Load reporting; `None` with `--no-load`.
    pub load: Option<LoadSettings>,
    /// The app's command line; empty when announce runs alone.
    pub command: Vec<String>,
}

/// Which check Consul keeps on the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckSpec {
    /// A TTL check announce passes while it (and the app) runs.
    Ttl,
    /// An HTTP check run by the agent on a path of the instance, or on a URL.
    Http {
        /// A path starting with `/`, or an http(s) URL.
        target: String,
        /// Time between runs.
        interval: Duration,
    },
    /// A TCP check run by the agent on the instance's address and port.
    Tcp {
        /// Time between runs.
        interval: Duration,
    },
}

/// How the load is measured and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSettings {
    /// Time between two measurements.
    pub interval: Duration,
    /// When a new load is written.
    pub policy: WritePolicy,
    /// `--max-procs`.
    pub max_procs: Option<u64>,
}

/// Meta keys announce writes itself.
pub const LOAD_KEYS: [&str; 4] = ["load", "cpu", "mem", "procs"];

/// Flags that contradict each other.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A user Meta key announce writes itself.
    #[error("--meta {0}=...: announce writes {0} itself (add --no-load to set it yourself)")]
    ReservedMeta(String),
    /// More Meta pairs than Consul takes.
    #[error("--meta: {0} pairs, Consul takes 64 at most (announce adds 4 for the load)")]
    TooMuchMeta(usize),
    /// A TTL too short to pass in time.
    #[error("--ttl: {0:?} is too short, 1s at least")]
    ShortTtl(Duration),
    /// Consul's own minimum.
    #[error("--deregister-after: {0:?} is below Consul's minimum of 1m")]
    ShortDeregister(Duration),
    /// The measurement interval.
    #[error("--interval: {0:?} is too short, 100ms at least")]
    ShortInterval(Duration),
    /// The Consul URL or token.
    #[error("--consul: {0}")]
    Consul(String),
}

impl AnnounceArgs {
    /// Checks the flags together and builds the run's settings.
    pub fn settings(self) -> Result<Settings, SettingsError> {
        if !self.no_load {
            if let Some((k, _)) = self
                .meta
                .iter()
                .find(|(k, _)| LOAD_KEYS.contains(&k.as_str()))
            {
                return Err(SettingsError::ReservedMeta(k.clone()));
            }
        }
        let ours = if self.no_load { 0 } else { LOAD_KEYS.len() };
        if self.meta.len() + ours > 64 {
            return Err(SettingsError::TooMuchMeta(self.meta.len()));
        }
        if self.ttl < Duration::from_secs(1) {
            return Err(SettingsError::ShortTtl(self.ttl));
        }
        if self.deregister_after < Duration::from_secs(60) {
            return Err(SettingsError::ShortDeregister(self.deregister_after));
        }
        if self.interval < Duration::from_millis(100) {
            return Err(SettingsError::ShortInterval(self.interval));
        }
        let check = match (self.check_http, self.check_tcp) {
            (Some(target), _) => CheckSpec::Http {
                target,
                interval: self.check_interval,
            },
            (None, true) => CheckSpec::Tcp {
                interval: self.check_interval,
            },
            (None, false) => CheckSpec::Ttl,
        };
        let mut consul = consul_config(&self.consul, self.token)?;
        consul.ca_file = self.ca_file;
        Ok(Settings {
            name: self.name,
            id: self.id,
            port: self.port,
            address: self.address,
            tags: self.tags,
            meta: self.meta,
            check,
            ttl: self.ttl,
            deregister_after: self.deregister_after,
            consul,
            load: (!self.no_load).then_some(LoadSettings {
                interval: self.interval,
                policy: WritePolicy {
                    step: self.step,
                    min_gap: self.min_gap,
                    refresh: self.refresh,
                },
                max_procs: self.max_procs,
            }),
            command: self.command,
        })
    }
}

impl Settings {
    /// The service ID: `--id`, else `<name>-<hostname>-<port>`, unique per container (its
    /// hostname) or per host and port.
    pub fn service_id(&self) -> String {
        if let Some(id) = &self.id {
            return id.clone();
        }
        let uname = rustix::system::uname();
        let host = uname.nodename().to_string_lossy();
        let host = if host.is_empty() { "host".into() } else { host };
        format!("{}-{}-{}", self.name, host, self.port)
    }
}

/// The router's own Consul settings, for the URL and token given.
fn consul_config(url: &str, token: Option<String>) -> Result<ConsulConfig, SettingsError> {
    let overrides = Overrides {
        consul: Some(url.to_owned()),
        env_consul_token: token,
        ..Default::default()
    };
    match Config::from_file(FileConfig::default(), &overrides) {
        Ok(c) => Ok(c.consul),
        Err(ConfigError::Invalid { message, .. }) => Err(SettingsError::Consul(message)),
        Err(e) => Err(SettingsError::Consul(e.to_string())),
    }
}

/// A service name or ID: non-empty, no `/` (it goes into agent URL paths as one segment
/// either way, but Consul refuses it), no whitespace.
fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err("must not contain '/', spaces or control characters".into());
    }
    Ok(s.to_owned())
}

/// `KEY=VALUE`, with Consul's rules for Meta: a key of 1 to 128 letters, digits, `_` or
/// `-`, not starting with `consul-`; a value of at most 512 characters.
fn parse_meta(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} has no '=': write KEY=VALUE"))?;
    if k.is_empty() || k.len() > 128 {
        return Err(format!("the key {k:?} must be 1 to 128 characters"));
    }
    if !k
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "the key {k:?} may hold only letters, digits, '_' and '-'"
        ));
    }
    if k.starts_with("consul-") {
        return Err(format!("the key {k:?}: the consul- prefix is Consul's own"));
    }
    if v.chars().count() > 512 {
        return Err(format!("the value of {k:?} is longer than 512 characters"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// A path (`/health`) or an http(s) URL.
fn parse_check_http(s: &str) -> Result<String, String> {
    if s.starts_with('/') || s.starts_with("http://") || s.starts_with("https://") {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?}: give a path starting with '/' or an http:// or https:// URL"
        ))
    }
}

/// A positive duration such as 500ms, 10s or 1m.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 500ms, 10s, 1m ({e})"))?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: AnnounceArgs,
    }

    fn parse(args: &[&str]) -> Result<AnnounceArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("announce").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn parses_a_full_command_line() {
        let a = parse(&[
            "--name",
            "chat",
            "--port",
            "3000",
            "--address",
            "10.0.0.5",
            "--tag",
            "a",
            "--tag",
            "b",
            "--meta",
            "v=1=2",
            "--check-http",
            "/health",
            "--",
            "app",
            "--flag",
        ])
        .unwrap();
        assert_eq!(a.meta, [("v".to_owned(), "1=2".to_owned())]);
        assert_eq!(a.command, ["app", "--flag"]);
        let s = a.settings().unwrap();
        assert_eq!(
            s.check,
            CheckSpec::Http {
                target: "/health".into(),
                interval: Duration::from_secs(5)
            }
        );
        assert_eq!(s.tags, ["a", "b"]);
        assert_eq!(s.load.unwrap().policy, WritePolicy::default());
        assert_eq!(s.service_id().split('-').next(), Some("chat"));
        assert!(s.service_id().ends_with("-3000"));
    }

    #[test]
    fn refuses_bad_values_with_exit_status_2() {
        for bad in [
            &["--name", "x", "--port", "0"][..],
            &["--name", "x", "--port", "1", "--meta", "novalue"],
            &["--name", "x", "--port", "1", "--meta", "=v"],
            &["--name", "x", "--port", "1", "--meta", "a b=v"],
            &[
                "--name",
                "x",
                "--port",
                "1",
                "--check-http",
                "/h",
                "--check-tcp",
            ],
            &["--name", "x", "--port", "1", "--check-http", "health"],
            &["--name", "x", "--port", "1", "--interval", "soon"],
            &["--name", "", "--port", "1"],
            &["--name", "x", "--port", "1", "--address", "host.example"],
            &["--name", "x", "--port", "1", "--step", "0"],
            &["--port", "1"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
        let e = parse(&["--name", "x", "--port", "1", "--meta", "novalue"]).unwrap_err();
        assert!(e.to_string().contains("has no '='"), "{e}");
    }

    #[test]
    fn refuses_contradictions() {
        let settings = |extra: &[&str]| {
            let mut args = vec!["--name", "x", "--port", "1"];
            args.extend_from_slice(extra);
            parse(&args).unwrap().settings()
        };
        let e = settings(&["--meta", "load=5"]).unwrap_err();
        assert!(e.to_string().contains("--no-load"), "{e}");
        assert!(settings(&["--meta", "load=5", "--no-load"]).is_ok());
        assert!(settings(&["--ttl", "500ms"]).is_err());
        assert!(settings(&["--deregister-after", "30s"]).is_err());
        assert!(settings(&["--interval", "10ms"]).is_err());
        let e = settings(&["--consul", "ftp://x"]).unwrap_err();
        assert!(e.to_string().starts_with("--consul: "), "{e}");
        let many: Vec<String> = (0..61).map(|i| format!("k{i}=v")).collect();
        let mut args = vec!["--name", "x", "--port", "1"];
        for m in &many {
            args.extend_from_slice(&["--meta", m]);
        }
        assert!(parse(&args).unwrap().settings().is_err());
    }
}
