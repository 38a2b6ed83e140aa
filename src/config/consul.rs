//! The `[consul]` section: the agent, the token and discovery's pacing.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::parse::parse_duration;
use super::{invalid, ConfigError, Overrides};

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

/// Checks `[consul]`. The address is `--consul`, else the file's, else `CONSUL_HTTP_ADDR`;
/// the token is the file's, else `CONSUL_HTTP_TOKEN`.
pub(super) fn validate(c: FileConsul, o: &Overrides) -> Result<ConsulConfig, ConfigError> {
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
    Ok(consul)
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
