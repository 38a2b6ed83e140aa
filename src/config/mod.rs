//! Configuration: the TOML file, command-line overrides, and validation into [`Config`].
//!
//! The file is parsed into a raw [`FileConfig`] that refuses unknown keys; every value is then
//! checked and turned into typed settings, so a bad key or value stops the process at start
//! with the key's name. Each group of keys has its own module with one `validate`: the
//! `[consul]`, `[proxy]` and `[tls]` sections, and the top-level keys by concern (the plain
//! listener, the admin listener, routing, logs).

mod admin;
mod consul;
mod listener;
mod logs;
mod parse;
mod proxy;
mod routing;
mod static_services;
mod tls;
mod upstream_tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use crate::access_log;
use crate::balance::Strategy;

pub use admin::AdminToken;
pub use consul::{Addresses, ConsulConfig, FileConsul};
pub use listener::{ProxyProtocol, UnderscoreHeaders};
pub use logs::LogFormat;
pub use proxy::{FileProxy, ProxyConfig, DEFAULT_LOAD_HEADER};
pub use routing::{Expose, DEFAULT_EXCLUDED};
pub use static_services::{
    FileStaticInstance, FileStaticService, StaticInstance, StaticService, MAX_STATIC_WEIGHT,
};
pub use tls::{CertPaths, FileCert, FileTls, TlsConfig};
pub use upstream_tls::{FileUpstreamTls, UpstreamTlsConfig};

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
    /// PROXY protocol on the proxy listener: `off`, `v1`, `v2` or `optional`.
    pub proxy_protocol: Option<String>,
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
    /// TLS listener settings; absent means no TLS listener.
    pub tls: Option<FileTls>,
    /// TLS to `router.proto=h2` backends.
    pub upstream_tls: Option<FileUpstreamTls>,
    /// Services with fixed instances, merged with Consul's.
    pub static_services: Option<Vec<FileStaticService>>,
}

/// Command-line values that override the file. `None` leaves the file's value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<String>,
    /// `--admin-listen`
    pub admin_listen: Option<String>,
    /// `--consul` (a comma-separated list of agents)
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
    /// PROXY protocol on the proxy listener.
    pub proxy_protocol: ProxyProtocol,
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
    /// The TLS listener, if `[tls]` is present.
    pub tls: Option<TlsConfig>,
    /// TLS to `router.proto=h2` backends.
    pub upstream_tls: UpstreamTlsConfig,
    /// Services with fixed instances, merged with Consul's.
    pub static_services: std::sync::Arc<[StaticService]>,
}

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
        // Taken apart whole, so that a key added to the file cannot go unvalidated.
        let FileConfig {
            listen,
            proxy_protocol,
            admin_listen,
            admin_token,
            admin_token_file,
            domains,
            strategy,
            workers,
            trusted_proxies,
            include_warning,
            hash_query,
            exclude_services,
            expose,
            underscore_headers,
            access_log,
            access_log_file,
            log_format,
            consul,
            proxy,
            tls,
            upstream_tls,
            static_services,
        } = file;
        let listener = listener::validate(
            listener::FileListener {
                listen,
                proxy_protocol,
                trusted_proxies,
                underscore_headers,
            },
            o,
        )?;
        let admin = admin::validate(
            admin::FileAdmin {
                admin_listen,
                admin_token,
                admin_token_file,
            },
            o,
        )?;
        let routing = routing::validate(
            routing::FileRouting {
                domains,
                strategy,
                include_warning,
                hash_query,
                exclude_services,
                expose,
            },
            o,
        )?;
        let workers = o.workers.or(workers).unwrap_or(0);
        if workers > 1024 {
            return Err(invalid("workers", "must be between 0 (all cores) and 1024"));
        }
        let consul = consul::validate(consul, o)?;
        let proxy = proxy::validate(proxy)?;
        let logs = logs::validate(
            logs::FileLogs {
                access_log,
                access_log_file,
                log_format,
            },
            o,
        )?;
        let tls = tls::validate(
            tls,
            &[("listen", listener.listen), ("admin_listen", admin.listen)],
        )?;
        let upstream_tls = upstream_tls::validate(upstream_tls)?;
        let static_services = static_services::validate(static_services)?;

        Ok(Config {
            listen: listener.listen,
            proxy_protocol: listener.proxy_protocol,
            admin_listen: admin.listen,
            admin_token: admin.token,
            domains: routing.domains,
            strategy: routing.strategy,
            workers,
            trusted_proxies: listener.trusted_proxies,
            include_warning: routing.include_warning,
            hash_query: routing.hash_query,
            exclude_services: routing.exclude_services,
            expose: routing.expose,
            underscore_headers: listener.underscore_headers,
            access_log: logs.access_log,
            access_log_file: logs.access_log_file,
            log_format: logs.log_format,
            consul,
            proxy,
            tls,
            upstream_tls,
            static_services,
        })
    }
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
            (
                "[proxy]\nh2_backend_max_streams = 0",
                "proxy.h2_backend_max_streams",
            ),
            (
                "[proxy]\nh2_backend_max_connections = 65",
                "proxy.h2_backend_max_connections",
            ),
            (
                "[proxy]\nh2_backend_ping_interval = \"10ms\"",
                "proxy.h2_backend_ping_interval",
            ),
            (
                "[upstream_tls]\nca_file = \"/nonexistent.pem\"",
                "upstream_tls.ca_file",
            ),
            ("[proxy]\nload_header = \"x load\"", "proxy.load_header"),
            ("[proxy]\nsend_timeout = \"0s\"", "proxy.send_timeout"),
            ("[proxy]\nshutdown_delay = \"soon\"", "proxy.shutdown_delay"),
            (
                "[proxy]\nupgrade_idle_timeout = \"1 fortnight\"",
                "proxy.upgrade_idle_timeout",
            ),
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
            ("proxy_protocol = \"v3\"", "proxy_protocol"),
            ("[tls]\nlisten = \"x\"", "tls.listen"),
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
    fn consul_address_lists() {
        let urls = |c: &Config| {
            c.consul
                .addresses()
                .map(|u| u.to_string())
                .collect::<Vec<_>>()
        };
        let c = parse("[consul]\naddress = \"http://a:8500\"").unwrap();
        assert_eq!(urls(&c), ["http://a:8500/"]);
        let c = parse("[consul]\naddress = [\"http://a:8500\", \"https://b:8501\"]").unwrap();
        assert_eq!(urls(&c), ["http://a:8500/", "https://b:8501/"]);
        assert!(c.consul.enabled);
        assert_eq!(c.consul.dns_ttl, std::time::Duration::from_secs(30));
        // The flag and CONSUL_HTTP_ADDR take a comma-separated list.
        let o = Overrides {
            consul: Some("http://x:1, y:2".into()),
            ..Default::default()
        };
        let c = Config::from_file(FileConfig::default(), &o).unwrap();
        assert_eq!(urls(&c), ["http://x:1/", "http://y:2/"]);
        for (text, want) in [
            (
                "[consul]\naddress = []",
                "consul.address: the list is empty",
            ),
            (
                "[consul]\naddress = [\"http://a:1\", \"ftp://b\"]",
                "consul.address: scheme must be http or https",
            ),
            (
                "[consul]\naddress = [\"http://a:1\", \"http://a:1/\"]",
                "consul.address: \"http://a:1/\" is listed twice",
            ),
            (
                "[consul]\ndns_ttl = \"0s\"",
                "consul.dns_ttl: must be between 1s and 1h",
            ),
        ] {
            assert_eq!(parse(text).unwrap_err().to_string(), want, "{text}");
        }
        let c = parse("[consul]\nenabled = false\ndns_ttl = \"5s\"").unwrap();
        assert!(!c.consul.enabled);
        assert_eq!(c.consul.dns_ttl, std::time::Duration::from_secs(5));
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
    fn proxy_protocol_key() {
        assert_eq!(Config::default().proxy_protocol, ProxyProtocol::Off);
        for (name, want) in [
            ("off", ProxyProtocol::Off),
            ("v1", ProxyProtocol::V1),
            ("v2", ProxyProtocol::V2),
            ("optional", ProxyProtocol::Optional),
        ] {
            let c = parse(&format!("proxy_protocol = {name:?}")).unwrap();
            assert_eq!(c.proxy_protocol, want, "{name}");
        }
        let e = parse("proxy_protocol = \"V1\"").unwrap_err().to_string();
        assert_eq!(
            e,
            "proxy_protocol: \"V1\" is not \"off\", \"v1\", \"v2\" or \"optional\""
        );
    }

    #[test]
    fn tls_section() {
        assert_eq!(Config::default().tls, None);
        let c = parse(
            "[tls]\nlisten = \"0.0.0.0:8443\"\n\
             [[tls.certs]]\ncert = \"/etc/cr/a.pem\"\nkey = \"/etc/cr/a.key\"\n\
             [[tls.certs]]\ncert = \"b.pem\"\nkey = \"b.key\"",
        )
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(tls.proxy_protocol, ProxyProtocol::Off);
        assert!(!tls.redirect_http);
        assert_eq!(
            tls.certs,
            [
                CertPaths {
                    cert: PathBuf::from("/etc/cr/a.pem"),
                    key: PathBuf::from("/etc/cr/a.key"),
                },
                // Relative paths are kept as written, like access_log_file's.
                CertPaths {
                    cert: PathBuf::from("b.pem"),
                    key: PathBuf::from("b.key"),
                },
            ]
        );

        let c = parse(
            "proxy_protocol = \"v1\"\n[tls]\nlisten = \"127.0.0.1:8443\"\n\
             proxy_protocol = \"optional\"\nredirect_http = true\n\
             certs = [{ cert = \"a.pem\", key = \"a.key\" }]",
        )
        .unwrap();
        assert_eq!(c.proxy_protocol, ProxyProtocol::V1);
        let tls = c.tls.unwrap();
        assert_eq!(tls.proxy_protocol, ProxyProtocol::Optional);
        assert!(tls.redirect_http);
        assert_eq!(tls.certs.len(), 1);
    }

    #[test]
    fn tls_errors_are_named() {
        let cert = "\n[[tls.certs]]\ncert = \"a.pem\"\nkey = \"a.key\"";
        let err = |text: &str| parse(text).unwrap_err().to_string();
        assert_eq!(
            err(&format!("[tls]{cert}")),
            "tls.listen: required in [tls]: the TLS listener's IP:port address"
        );
        assert_eq!(
            err("[tls]\nlisten = \"127.0.0.1:8443\""),
            "tls.certs: at least one certificate is required"
        );
        assert_eq!(
            err("[tls]\nlisten = \"127.0.0.1:8443\"\ncerts = []"),
            "tls.certs: at least one certificate is required"
        );
        assert_eq!(
            err(&format!(
                "[tls]\nlisten = \"127.0.0.1:8443\"{cert}\n[[tls.certs]]\ncert = \"b.pem\""
            )),
            "tls.certs: entry 2 has no key path"
        );
        assert_eq!(
            err(&format!(
                "[tls]\nlisten = \"127.0.0.1:8443\"\nproxy_protocol = \"on\"{cert}"
            )),
            "tls.proxy_protocol: \"on\" is not \"off\", \"v1\", \"v2\" or \"optional\""
        );
        // The other listeners' addresses are taken, whether set in the file or by default.
        assert_eq!(
            err(&format!(
                "listen = \"127.0.0.1:8443\"\n[tls]\nlisten = \"127.0.0.1:8443\"{cert}"
            )),
            "tls.listen: 127.0.0.1:8443 is already the address of listen"
        );
        assert_eq!(
            err(&format!("[tls]\nlisten = \"127.0.0.1:9090\"{cert}")),
            "tls.listen: 127.0.0.1:9090 is already the address of admin_listen"
        );
        // Port 0 binds a port of its own each time (the tests' listeners).
        let c = parse(&format!(
            "listen = \"127.0.0.1:0\"\n[tls]\nlisten = \"127.0.0.1:0\"{cert}"
        ))
        .unwrap();
        assert!(c.tls.is_some());
        // Unknown keys, in the section and in an entry, are refused with their name.
        let e = err(&format!(
            "[tls]\nlisten = \"127.0.0.1:8443\"\nredirect = true{cert}"
        ));
        assert!(e.contains("redirect"), "{e}");
        let e = err("[tls]\nlisten = \"127.0.0.1:8443\"\n[[tls.certs]]\ncrt = \"a\"");
        assert!(e.contains("crt"), "{e}");
    }

    #[test]
    fn example_file_is_valid() {
        let text = include_str!("../../config/consul-router.toml");
        parse(text).unwrap();
    }
}
