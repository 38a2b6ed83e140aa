//! The `[consul]` section: the agents, the token, discovery's pacing and how long a host
//! name's addresses are kept.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::parse::parse_duration;
use super::{invalid, ConfigError, Overrides};

/// The raw `[consul]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConsul {
    /// Agent URL, http or https, or a list of them tried in order.
    pub address: Option<Addresses>,
    /// `false`: no Consul at all, only `[[static_services]]`.
    pub enabled: Option<bool>,
    /// How long an instance's host name stays resolved.
    pub dns_ttl: Option<String>,
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

/// `address`: one URL, or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Addresses {
    /// `address = "http://a:8500"`
    One(String),
    /// `address = ["http://a:8500", "http://b:8500"]`
    Many(Vec<String>),
}

/// Validated Consul settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsulConfig {
    /// The first agent's base URL: the one discovery uses whenever it answers.
    pub address: http::Uri,
    /// Further agents, tried in order while the ones before them fail.
    pub fallback: Vec<http::Uri>,
    /// Whether discovery runs at all (`false`: static services only, ready at once).
    pub enabled: bool,
    /// How long a host-name instance address stays resolved.
    pub dns_ttl: Duration,
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

impl ConsulConfig {
    /// Every agent, in the order they are tried.
    pub fn addresses(&self) -> impl Iterator<Item = &http::Uri> {
        std::iter::once(&self.address).chain(&self.fallback)
    }
}

/// Checks `[consul]`. The addresses are `--consul` (a comma-separated list), else the file's,
/// else `CONSUL_HTTP_ADDR` (a list too); the token is the file's, else `CONSUL_HTTP_TOKEN`.
pub(super) fn validate(c: FileConsul, o: &Overrides) -> Result<ConsulConfig, ConfigError> {
    let split = |s: &str| -> Vec<String> { s.split(',').map(|a| a.trim().to_owned()).collect() };
    let list = match (&o.consul, c.address) {
        (Some(flag), _) => split(flag),
        (None, Some(Addresses::One(a))) => vec![a],
        (None, Some(Addresses::Many(v))) => v,
        (None, None) => o
            .env_consul_addr
            .as_deref()
            .filter(|s| !s.is_empty())
            .map_or_else(|| vec!["http://127.0.0.1:8500".to_owned()], split),
    };
    let mut urls = Vec::with_capacity(list.len());
    for a in &list {
        let url = parse_consul_url(a)?;
        if urls.contains(&url) {
            return Err(invalid("consul.address", format!("{a:?} is listed twice")));
        }
        urls.push(url);
    }
    let mut urls = urls.into_iter();
    let Some(address) = urls.next() else {
        return Err(invalid("consul.address", "the list is empty"));
    };
    let consul = ConsulConfig {
        address,
        fallback: urls.collect(),
        enabled: c.enabled.unwrap_or(true),
        dns_ttl: parse_duration("consul.dns_ttl", c.dns_ttl.as_deref(), "30s")?,
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
    if consul.dns_ttl < Duration::from_secs(1) || consul.dns_ttl > Duration::from_secs(3600) {
        return Err(invalid("consul.dns_ttl", "must be between 1s and 1h"));
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
