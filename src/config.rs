//! Configuration: the TOML file, command-line overrides, and validation into [`Config`].
//!
//! The file is parsed into a raw [`FileConfig`] that refuses unknown keys; every value is then
//! checked and turned into typed settings, so a bad key or value stops the process at start
//! with the key's name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::access_log;
use crate::balance::Strategy;

/// Why a configuration was refused. Every variant names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the key.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("{key}: {message}")]
    Invalid {
        /// Dotted key name, as written in the file.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The raw file, as written. Unknown keys are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Proxy listen address.
    pub listen: Option<String>,
    /// Admin listen address.
    pub admin_listen: Option<String>,
    /// Bearer token the admin listener requires (all paths but `/healthz` and the page).
    pub admin_token: Option<String>,
    /// File holding the admin token, read at start.
    pub admin_token_file: Option<String>,
    /// Domain suffixes: `<service>.<domain>` routes to `service`.
    pub domains: Option<Vec<String>>,
    /// Default strategy name.
    pub strategy: Option<String>,
    /// Runtime worker threads; 0 means all cores.
    pub workers: Option<usize>,
    /// CIDRs whose X-Forwarded-* headers are trusted.
    pub trusted_proxies: Option<Vec<String>>,
    /// Route to instances whose checks warn, too.
    pub include_warning: Option<bool>,
    /// Whether url-hash hashes the query as well as the path.
    pub hash_query: Option<bool>,
    /// Services never routed, whatever their tags.
    pub exclude_services: Option<Vec<String>>,
    /// Which services are routed: `all` or `tagged`.
    pub expose: Option<String>,
    /// Which header names with underscores are dropped: `lookalikes` or `all`.
    pub underscore_headers: Option<String>,
    /// Access log format: `off`, `text` or `json`.
    pub access_log: Option<String>,
    /// Access log file; empty means standard output.
    pub access_log_file: Option<String>,
    /// Format of the router's own logs: `text` or `json`.
    pub log_format: Option<String>,
    /// Consul settings.
    #[serde(default)]
    pub consul: FileConsul,
    /// Proxy settings.
    #[serde(default)]
    pub proxy: FileProxy,
}

/// The raw `[consul]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConsul {
    /// Agent URL, http or https.
    pub address: Option<String>,
    /// ACL token.
    pub token: Option<String>,
    /// Datacenter to query; empty means the agent's own.
    pub datacenter: Option<String>,
    /// PEM file of CA certificates for https.
    pub ca_file: Option<String>,
    /// Allow stale reads from any server.
    pub stale: Option<bool>,
    /// Blocking query wait.
    pub wait: Option<String>,
    /// Most per-service long-polls held at once.
    pub max_watches: Option<usize>,
    /// Window in which changes are coalesced into one table rebuild.
    pub coalesce: Option<String>,
    /// Period of the background re-read of services without a long-poll.
    pub sweep_interval: Option<String>,
}

/// The raw `[proxy]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileProxy {
    /// TCP connect timeout to a backend.
    pub connect_timeout: Option<String>,
    /// Time to wait for a backend's response headers.
    pub response_timeout: Option<String>,
    /// Extra instances tried after a connect failure.
    pub retries: Option<u32>,
    /// How long an idle backend connection is kept.
    pub idle_timeout: Option<String>,
    /// Most idle connections kept per instance.
    pub max_idle_per_instance: Option<usize>,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Option<String>,
    /// Time a client has to send a request head, and may stay idle between requests.
    pub header_timeout: Option<String>,
    /// Most concurrent streams on one HTTP/2 client connection.
    pub h2_max_concurrent_streams: Option<u32>,
    /// Response header a backend reports its load in; `""` turns it off.
    pub load_header: Option<String>,
}

/// Command-line values that override the file. `None` leaves the file's value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<String>,
    /// `--admin-listen`
    pub admin_listen: Option<String>,
    /// `--consul`
    pub consul: Option<String>,
    /// `--domain` (repeatable; replaces the file's list when given)
    pub domains: Vec<String>,
    /// `--strategy`
    pub strategy: Option<String>,
    /// `--workers`
    pub workers: Option<usize>,
    /// `--access-log`
    pub access_log: Option<String>,
    /// `--access-log-file` (empty means standard output)
    pub access_log_file: Option<String>,
    /// `--log-format`
    pub log_format: Option<String>,
    /// `CONSUL_HTTP_ADDR`, used when neither flag nor file sets the address.
    pub env_consul_addr: Option<String>,
    /// `CONSUL_HTTP_TOKEN`, used when the file sets no token.
    pub env_consul_token: Option<String>,
}

/// Validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Proxy listen address.
    pub listen: SocketAddr,
    /// Admin listen address.
    pub admin_listen: SocketAddr,
    /// Bearer token the admin API requires, from `admin_token` or `admin_token_file`.
    pub admin_token: Option<AdminToken>,
    /// Lowercase domain suffixes without leading or trailing dots.
    pub domains: Vec<String>,
    /// Strategy for services whose instances name none.
    pub strategy: Strategy,
    /// Runtime worker threads; 0 means all cores.
    pub workers: usize,
    /// Peers whose X-Forwarded-* headers are trusted.
    pub trusted_proxies: Vec<IpNet>,
    /// Route to warning instances too.
    pub include_warning: bool,
    /// url-hash includes the query.
    pub hash_query: bool,
    /// Services never routed (lowercase names).
    pub exclude_services: Vec<String>,
    /// Which services are routed.
    pub expose: Expose,
    /// Which header names with underscores are dropped.
    pub underscore_headers: UnderscoreHeaders,
    /// Access log format (`Off`: none).
    pub access_log: access_log::Format,
    /// Access log file; `None` is standard output.
    pub access_log_file: Option<PathBuf>,
    /// Format of the router's own (`tracing`) logs.
    pub log_format: LogFormat,
    /// Consul settings.
    pub consul: ConsulConfig,
    /// Proxy settings.
    pub proxy: ProxyConfig,
}

/// The admin listener's bearer token. Its `Debug` form hides the value, so it never lands
/// in a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Checks a token as written in the file (`key` names it in the error): surrounding
    /// whitespace is dropped, and what is left must be 1 to 4096 visible ASCII characters,
    /// so it fits an `Authorization: Bearer` header as is.
    pub fn new(key: &'static str, text: &str) -> Result<Self, ConfigError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(invalid(key, "the token is empty"));
        }
        if t.len() > 4096 {
            return Err(invalid(key, "the token is longer than 4096 characters"));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                key,
                "the token must be visible ASCII characters (no spaces or control bytes)",
            ));
        }
        Ok(AdminToken(t.to_owned()))
    }

    /// The token's bytes, to compare a request's credentials with.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Validated Consul settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsulConfig {
    /// Agent base URL, without a trailing slash.
    pub address: http::Uri,
    /// ACL token, if any.
    pub token: Option<String>,
    /// Datacenter, if not the agent's own.
    pub datacenter: Option<String>,
    /// CA bundle for https.
    pub ca_file: Option<PathBuf>,
    /// Allow stale reads.
    pub stale: bool,
    /// Blocking query wait.
    pub wait: Duration,
    /// Most per-service long-polls at once.
    pub max_watches: usize,
    /// Change-coalescing window.
    pub coalesce: Duration,
    /// Background re-read period for services without a long-poll.
    pub sweep_interval: Duration,
}

/// Validated proxy settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Response header timeout.
    pub response_timeout: Duration,
    /// Extra instances tried after a connect failure.
    pub retries: u32,
    /// Idle backend connection lifetime.
    pub idle_timeout: Duration,
    /// Idle connections kept per instance.
    pub max_idle_per_instance: usize,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
    /// Time allowed for a request head (and idle time before it); for HTTP/2, for the
    /// handshake and for idle time with no open stream.
    pub header_timeout: Duration,
    /// Most concurrent streams per HTTP/2 client connection.
    pub h2_max_concurrent_streams: u32,
    /// Response header read as the instance's load and removed (lowercase); `None`: off.
    pub load_header: Option<http::HeaderName>,
}

/// Which services in Consul are routed (`expose`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expose {
    /// Every registered service, unless excluded or tagged `router.expose=false`.
    All,
    /// Only services tagged `router.expose=true` or with a `router.host=` tag.
    Tagged,
}

/// Which request header names containing `_` are dropped (`underscore_headers`). Frameworks
/// that map names to variables (PHP, WSGI, CGI) read `X_Forwarded_For` as `X-Forwarded-For`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnderscoreHeaders {
    /// Those that read as a client-address header (`X_Forwarded_For`, `X_Real_IP`, ...).
    Lookalikes,
    /// Every name with an underscore, as nginx's `underscores_in_headers off`.
    All,
}

/// The format of the router's own logs (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// The response header backends report their load in, unless `proxy.load_header` says.
pub const DEFAULT_LOAD_HEADER: &str = "x-backend-load";

/// Fields the proxy reads or writes itself: a load header by one of these names would take
/// them from the client.
const NOT_A_LOAD_HEADER: [&str; 13] = [
    "connection",
    "content-length",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "te",
    "trailer",
    "proxy-connection",
    "host",
    "x-request-id",
    "content-type",
    "set-cookie",
    "location",
];

fn load_header(name: Option<&str>) -> Result<Option<http::HeaderName>, ConfigError> {
    let name = name.unwrap_or(DEFAULT_LOAD_HEADER).trim();
    if name.is_empty() {
        return Ok(None);
    }
    let header = http::HeaderName::from_bytes(name.as_bytes())
        .ok()
        .filter(|h| !h.as_str().contains('_'))
        .ok_or_else(|| {
            invalid(
                "proxy.load_header",
                format!("{name:?} is not a header name (letters, digits and dashes)"),
            )
        })?;
    if NOT_A_LOAD_HEADER.contains(&header.as_str()) {
        return Err(invalid(
            "proxy.load_header",
            format!("{name:?} is a field the proxy handles itself"),
        ));
    }
    Ok(Some(header))
}

/// Services excluded when the file names none: Consul itself and the usual internal tools.
pub const DEFAULT_EXCLUDED: [&str; 4] = ["consul", "nomad", "nomad-client", "vault"];

impl Default for Config {
    fn default() -> Self {
        // The defaults are the empty file's; that parse cannot fail.
        Self::from_file(FileConfig::default(), &Overrides::default())
            .unwrap_or_else(|e| unreachable!("default config is valid: {e}"))
    }
}

impl Config {
    /// Reads and validates `path`, then applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse_file(&text, path)?
            }
            None => FileConfig::default(),
        };
        Self::from_file(file, overrides)
    }

    /// Parses TOML text (unknown keys refused).
    pub fn parse_file(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    /// Validates a raw file plus overrides.
    pub fn from_file(file: FileConfig, o: &Overrides) -> Result<Self, ConfigError> {
        let listen = parse_addr(
            "listen",
            o.listen.as_deref().or(file.listen.as_deref()),
            "127.0.0.1:8080",
        )?;
        let admin_listen = parse_addr(
            "admin_listen",
            o.admin_listen.as_deref().or(file.admin_listen.as_deref()),
            "127.0.0.1:9090",
        )?;
        let admin_token = admin_token(
            file.admin_token.as_deref().filter(|t| !t.is_empty()),
            file.admin_token_file.as_deref().filter(|f| !f.is_empty()),
        )?;
        let domains = if o.domains.is_empty() {
            file.domains.unwrap_or_default()
        } else {
            o.domains.clone()
        };
        let domains = domains
            .iter()
            .map(|d| parse_domain(d))
            .collect::<Result<Vec<_>, _>>()?;
        let strategy = match o.strategy.as_deref().or(file.strategy.as_deref()) {
            None => Strategy::Random,
            Some(s) => s.parse().map_err(|e: String| invalid("strategy", e))?,
        };
        let workers = o.workers.or(file.workers).unwrap_or(0);
        if workers > 1024 {
            return Err(invalid("workers", "must be between 0 (all cores) and 1024"));
        }
        let trusted_proxies = match file.trusted_proxies {
            None => vec![cidr("127.0.0.0/8"), cidr("::1/128")],
            Some(list) => list
                .iter()
                .map(|s| parse_cidr(s))
                .collect::<Result<Vec<_>, _>>()?,
        };

        let c = file.consul;
        let address = o
            .consul
            .clone()
            .or(c.address)
            .or_else(|| o.env_consul_addr.clone().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "http://127.0.0.1:8500".to_owned());
        let consul = ConsulConfig {
            address: parse_consul_url(&address)?,
            token: c
                .token
                .or_else(|| o.env_consul_token.clone())
                .filter(|t| !t.is_empty()),
            datacenter: c.datacenter.filter(|d| !d.is_empty()),
            ca_file: c.ca_file.filter(|f| !f.is_empty()).map(PathBuf::from),
            stale: c.stale.unwrap_or(true),
            wait: parse_duration("consul.wait", c.wait.as_deref(), "5m")?,
            max_watches: c.max_watches.unwrap_or(64),
            coalesce: parse_duration("consul.coalesce", c.coalesce.as_deref(), "100ms")?,
            sweep_interval: parse_duration(
                "consul.sweep_interval",
                c.sweep_interval.as_deref(),
                "60s",
            )?,
        };
        if consul.wait < Duration::from_secs(1) || consul.wait > Duration::from_secs(600) {
            return Err(invalid("consul.wait", "must be between 1s and 10m"));
        }
        if consul.max_watches > 150 {
            // Consul allows 200 HTTP connections per client address; keep room for the rest.
            return Err(invalid(
                "consul.max_watches",
                "must be at most 150 (Consul allows 200 connections per client)",
            ));
        }
        if consul.coalesce > Duration::from_millis(900) {
            return Err(invalid(
                "consul.coalesce",
                "must be under 900ms so changes land within a second",
            ));
        }
        if consul.sweep_interval < Duration::from_secs(1) {
            return Err(invalid("consul.sweep_interval", "must be at least 1s"));
        }

        let p = file.proxy;
        let proxy = ProxyConfig {
            connect_timeout: parse_duration(
                "proxy.connect_timeout",
                p.connect_timeout.as_deref(),
                "2s",
            )?,
            response_timeout: parse_duration(
                "proxy.response_timeout",
                p.response_timeout.as_deref(),
                "60s",
            )?,
            retries: p.retries.unwrap_or(2),
            idle_timeout: parse_duration("proxy.idle_timeout", p.idle_timeout.as_deref(), "4s")?,
            max_idle_per_instance: p.max_idle_per_instance.unwrap_or(1024),
            shutdown_grace: parse_duration(
                "proxy.shutdown_grace",
                p.shutdown_grace.as_deref(),
                "30s",
            )?,
            header_timeout: parse_duration(
                "proxy.header_timeout",
                p.header_timeout.as_deref(),
                "30s",
            )?,
            h2_max_concurrent_streams: p.h2_max_concurrent_streams.unwrap_or(128),
            load_header: load_header(p.load_header.as_deref())?,
        };
        if proxy.header_timeout.is_zero() {
            return Err(invalid("proxy.header_timeout", "must be above zero"));
        }
        if !(1..=10_000).contains(&proxy.h2_max_concurrent_streams) {
            return Err(invalid(
                "proxy.h2_max_concurrent_streams",
                "must be between 1 and 10000",
            ));
        }
        let exclude_services = match file.exclude_services {
            None => DEFAULT_EXCLUDED.iter().map(|s| s.to_string()).collect(),
            Some(list) => list
                .iter()
                .map(|s| {
                    let s = s.trim().to_ascii_lowercase();
                    if s.is_empty() {
                        Err(invalid("exclude_services", "names must not be empty"))
                    } else {
                        Ok(s)
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let expose = match file.expose.as_deref() {
            None | Some("all") => Expose::All,
            Some("tagged") => Expose::Tagged,
            Some(other) => {
                return Err(invalid(
                    "expose",
                    format!("{other:?} is not \"all\" or \"tagged\""),
                ))
            }
        };
        let underscore_headers = match file.underscore_headers.as_deref() {
            None | Some("lookalikes") => UnderscoreHeaders::Lookalikes,
            Some("all") => UnderscoreHeaders::All,
            Some(other) => {
                return Err(invalid(
                    "underscore_headers",
                    format!("{other:?} is not \"lookalikes\" or \"all\""),
                ))
            }
        };
        let access_log = match o.access_log.as_deref().or(file.access_log.as_deref()) {
            None => access_log::Format::Off,
            Some(s) => s.parse().map_err(|e: String| invalid("access_log", e))?,
        };
        let access_log_file = o
            .access_log_file
            .as_deref()
            .or(file.access_log_file.as_deref())
            .filter(|f| !f.is_empty())
            .map(PathBuf::from);
        let log_format = match o.log_format.as_deref().or(file.log_format.as_deref()) {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?} is not \"text\" or \"json\""),
                ))
            }
        };
        if proxy.connect_timeout.is_zero() {
            return Err(invalid("proxy.connect_timeout", "must be above zero"));
        }
        if proxy.response_timeout.is_zero() {
            return Err(invalid("proxy.response_timeout", "must be above zero"));
        }
        if proxy.retries > 10 {
            return Err(invalid("proxy.retries", "must be at most 10"));
        }

        Ok(Config {
            listen,
            admin_listen,
            admin_token,
            domains,
            strategy,
            workers,
            trusted_proxies,
            include_warning: file.include_warning.unwrap_or(false),
            hash_query: file.hash_query.unwrap_or(true),
            exclude_services,
            expose,
            underscore_headers,
            access_log,
            access_log_file,
            log_format,
            consul,
            proxy,
        })
    }
}

/// The admin token from `admin_token`, or read from `admin_token_file`; never both.
fn admin_token(
    inline: Option<&str>,
    file: Option<&str>,
) -> Result<Option<AdminToken>, ConfigError> {
    match (inline, file) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(invalid(
            "admin_token_file",
            "set admin_token or admin_token_file, not both",
        )),
        (Some(t), None) => AdminToken::new("admin_token", t).map(Some),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("admin_token_file", format!("cannot read {path}: {e}")))?;
            AdminToken::new("admin_token_file", &text).map(Some)
        }
    }
}

fn cidr(s: &str) -> IpNet {
    s.parse()
        .unwrap_or_else(|_| unreachable!("static CIDR {s}"))
}

fn parse_addr(
    key: &'static str,
    value: Option<&str>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let v = value.unwrap_or(default);
    v.parse()
        .map_err(|_| invalid(key, format!("{v:?} is not an IP:port address")))
}

fn parse_cidr(s: &str) -> Result<IpNet, ConfigError> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    // A bare address means that one host.
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| invalid("trusted_proxies", format!("{s:?} is not an IP or CIDR")))
}

fn parse_domain(d: &str) -> Result<String, ConfigError> {
    let d = d.trim_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(d)
    } else {
        Err(invalid("domains", format!("{d:?} is not a domain name")))
    }
}

fn parse_duration(
    key: &'static str,
    value: Option<&str>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let v = value.unwrap_or(default);
    humantime::parse_duration(v).map_err(|e| {
        invalid(
            key,
            format!("{v:?} is not a duration like 500ms, 2s, 5m ({e})"),
        )
    })
}

fn parse_consul_url(s: &str) -> Result<http::Uri, ConfigError> {
    // CONSUL_HTTP_ADDR may be host:port without a scheme, as Consul's own CLI accepts.
    let full = if s.contains("://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    };
    let uri: http::Uri = full
        .trim_end_matches('/')
        .parse()
        .map_err(|_| invalid("consul.address", format!("{s:?} is not a URL")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(invalid("consul.address", "scheme must be http or https")),
    }
    if uri.host().is_none() {
        return Err(invalid("consul.address", format!("{s:?} has no host")));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let file = Config::parse_file(text, Path::new("t.toml"))?;
        Config::from_file(file, &Overrides::default())
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.strategy, Strategy::Random);
        assert_eq!(c.consul.address.to_string(), "http://127.0.0.1:8500/");
        assert_eq!(c.trusted_proxies.len(), 2);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("listn = \"1.2.3.4:1\"").unwrap_err().to_string();
        assert!(e.contains("listn"), "{e}");
        let e = parse("[consul]\nadress = \"x\"").unwrap_err().to_string();
        assert!(e.contains("adress"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("listen = \"nope\"", "listen"),
            ("strategy = \"round-robin\"", "strategy"),
            ("domains = [\"a..b\"]", "domains"),
            ("trusted_proxies = [\"10.0.0.0/99\"]", "trusted_proxies"),
            ("[consul]\nwait = \"forever\"", "consul.wait"),
            ("[consul]\naddress = \"ftp://x\"", "consul.address"),
            ("[consul]\nmax_watches = 500", "consul.max_watches"),
            ("[proxy]\nconnect_timeout = \"0s\"", "proxy.connect_timeout"),
            ("[proxy]\nheader_timeout = \"0s\"", "proxy.header_timeout"),
            (
                "[proxy]\nh2_max_concurrent_streams = 0",
                "proxy.h2_max_concurrent_streams",
            ),
            ("[proxy]\nload_header = \"x load\"", "proxy.load_header"),
            ("[proxy]\nload_header = \"X_Load\"", "proxy.load_header"),
            (
                "[proxy]\nload_header = \"Content-Length\"",
                "proxy.load_header",
            ),
            ("expose = \"some\"", "expose"),
            ("underscore_headers = \"keep\"", "underscore_headers"),
            ("exclude_services = [\"\"]", "exclude_services"),
            ("access_log = \"combined\"", "access_log"),
            ("log_format = \"logfmt\"", "log_format"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(key), "{text}: {e}");
        }
    }

    #[test]
    fn overrides_win_and_env_fills_in() {
        let o = Overrides {
            listen: Some("0.0.0.0:81".into()),
            domains: vec!["App.Example.NET.".into()],
            env_consul_addr: Some("consul.local:8500".into()),
            env_consul_token: Some("secret".into()),
            ..Default::default()
        };
        let file = Config::parse_file("listen = \"127.0.0.1:1\"", Path::new("t")).unwrap();
        let c = Config::from_file(file, &o).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:81");
        assert_eq!(c.domains, vec!["app.example.net"]);
        assert_eq!(c.consul.address.to_string(), "http://consul.local:8500/");
        assert_eq!(c.consul.token.as_deref(), Some("secret"));
    }

    #[test]
    fn load_header_key() {
        let name = |text| {
            parse(text)
                .unwrap()
                .proxy
                .load_header
                .map(|h| h.to_string())
        };
        assert_eq!(name("").as_deref(), Some("x-backend-load"));
        assert_eq!(
            name("[proxy]\nload_header = \"X-Load\"").as_deref(),
            Some("x-load")
        );
        assert_eq!(name("[proxy]\nload_header = \"\""), None);
    }

    #[test]
    fn access_log_keys() {
        let c = Config::default();
        assert_eq!(c.access_log, access_log::Format::Off);
        assert_eq!(c.access_log_file, None);
        assert_eq!(c.log_format, LogFormat::Text);
        let c = parse(
            "access_log = \"json\"\naccess_log_file = \"/var/log/cr.log\"\nlog_format = \"json\"",
        )
        .unwrap();
        assert_eq!(c.access_log, access_log::Format::Json);
        assert_eq!(c.access_log_file, Some(PathBuf::from("/var/log/cr.log")));
        assert_eq!(c.log_format, LogFormat::Json);
        // Flags win; an empty file flag means standard output.
        let file = Config::parse_file(
            "access_log = \"json\"\naccess_log_file = \"/var/log/cr.log\"",
            Path::new("t"),
        )
        .unwrap();
        let o = Overrides {
            access_log: Some("text".into()),
            access_log_file: Some(String::new()),
            log_format: Some("json".into()),
            ..Default::default()
        };
        let c = Config::from_file(file, &o).unwrap();
        assert_eq!(c.access_log, access_log::Format::Text);
        assert_eq!(c.access_log_file, None);
        assert_eq!(c.log_format, LogFormat::Json);
        let e = Config::from_file(
            FileConfig::default(),
            &Overrides {
                access_log: Some("yes".into()),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("access_log: \"yes\" is not"), "{e}");
    }

    #[test]
    fn admin_token_keys() {
        assert_eq!(Config::default().admin_token, None);
        assert_eq!(parse("admin_token = \"\"").unwrap().admin_token, None);
        let c = parse("admin_token = \" s3cret \"").unwrap();
        assert_eq!(
            c.admin_token.as_ref().map(AdminToken::as_bytes),
            Some(&b"s3cret"[..])
        );
        // Never printed.
        assert!(!format!("{c:?}").contains("s3cret"));

        let dir = std::env::temp_dir().join(format!("cr-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "from-file\n").unwrap();
        let c = parse(&format!(
            "admin_token_file = {:?}",
            path.display().to_string()
        ))
        .unwrap();
        assert_eq!(c.admin_token.unwrap().as_bytes(), b"from-file");

        let missing = dir.join("missing");
        let e = parse(&format!(
            "admin_token_file = {:?}",
            missing.display().to_string()
        ))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("admin_token_file: cannot read"), "{e}");
        std::fs::write(&path, "\n").unwrap();
        let e = parse(&format!(
            "admin_token_file = {:?}",
            path.display().to_string()
        ))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("admin_token_file: the token is empty"), "{e}");
        let e = parse(&format!(
            "admin_token = \"a\"\nadmin_token_file = {:?}",
            path.display().to_string()
        ))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("admin_token_file: set admin_token or"), "{e}");
        let e = parse("admin_token = \"two words\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("admin_token: the token must be visible ASCII"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn example_file_is_valid() {
        let text = include_str!("../config/consul-router.toml");
        parse(text).unwrap();
    }
}
