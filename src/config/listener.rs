//! The plain proxy listener and how it treats clients: `listen`, `proxy_protocol`,
//! `trusted_proxies`, `underscore_headers` (top-level keys).

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::parse::{cidr, parse_addr, parse_choice, parse_cidr};
use super::{ConfigError, Overrides};

/// Whether a listener expects a PROXY protocol header (HAProxy's) before each connection's
/// first byte (`proxy_protocol`, `tls.proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// No header: the peer is the client.
    #[default]
    Off,
    /// The text header (version 1) is required.
    V1,
    /// The binary header (version 2) is required.
    V2,
    /// Either version if present; a connection without one is taken as is.
    Optional,
}

/// The names `proxy_protocol` takes, the default first.
pub(super) const PROXY_PROTOCOL: [(&str, ProxyProtocol); 4] = [
    ("off", ProxyProtocol::Off),
    ("v1", ProxyProtocol::V1),
    ("v2", ProxyProtocol::V2),
    ("optional", ProxyProtocol::Optional),
];

/// Which request header names containing `_` are dropped (`underscore_headers`). Frameworks
/// that map names to variables (PHP, WSGI, CGI) read `X_Forwarded_For` as `X-Forwarded-For`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnderscoreHeaders {
    /// Those that read as a client-address header (`X_Forwarded_For`, `X_Real_IP`, ...).
    Lookalikes,
    /// Every name with an underscore, as nginx's `underscores_in_headers off`.
    All,
}

/// This group's keys as written (taken from the top level of the file).
#[derive(Debug, Default)]
pub(super) struct FileListener {
    /// `listen`
    pub listen: Option<String>,
    /// `proxy_protocol`
    pub proxy_protocol: Option<String>,
    /// `trusted_proxies`
    pub trusted_proxies: Option<Vec<String>>,
    /// `underscore_headers`
    pub underscore_headers: Option<String>,
}

/// This group, validated.
#[derive(Debug)]
pub(super) struct ListenerConfig {
    /// Proxy listen address.
    pub listen: SocketAddr,
    /// PROXY protocol on the plain listener.
    pub proxy_protocol: ProxyProtocol,
    /// Peers whose X-Forwarded-* headers are trusted.
    pub trusted_proxies: Vec<IpNet>,
    /// Which header names with underscores are dropped.
    pub underscore_headers: UnderscoreHeaders,
}

/// Checks the plain listener's keys; `--listen` wins over the file.
pub(super) fn validate(file: FileListener, o: &Overrides) -> Result<ListenerConfig, ConfigError> {
    let listen = parse_addr(
        "listen",
        o.listen.as_deref().or(file.listen.as_deref()),
        "127.0.0.1:8080",
    )?;
    let proxy_protocol = parse_choice(
        "proxy_protocol",
        file.proxy_protocol.as_deref(),
        &PROXY_PROTOCOL,
    )?;
    let trusted_proxies = match file.trusted_proxies {
        None => vec![cidr("127.0.0.0/8"), cidr("::1/128")],
        Some(list) => list
            .iter()
            .map(|s| parse_cidr("trusted_proxies", s))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let underscore_headers = parse_choice(
        "underscore_headers",
        file.underscore_headers.as_deref(),
        &[
            ("lookalikes", UnderscoreHeaders::Lookalikes),
            ("all", UnderscoreHeaders::All),
        ],
    )?;
    Ok(ListenerConfig {
        listen,
        proxy_protocol,
        trusted_proxies,
        underscore_headers,
    })
}
