//! What is routed and how: `domains`, `strategy`, `include_warning`, `hash_query`,
//! `exclude_services`, `expose` (top-level keys).

use super::parse::parse_choice;
use super::{invalid, ConfigError, Overrides};
use crate::balance::Strategy;

/// Which services in Consul are routed (`expose`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expose {
    /// Every registered service, unless excluded or tagged `router.expose=false`.
    All,
    /// Only services tagged `router.expose=true` or with a `router.host=` tag.
    Tagged,
}

/// Services excluded when the file names none: Consul itself and the usual internal tools.
pub const DEFAULT_EXCLUDED: [&str; 4] = ["consul", "nomad", "nomad-client", "vault"];

/// This group's keys as written (taken from the top level of the file).
#[derive(Debug, Default)]
pub(super) struct FileRouting {
    /// `domains`
    pub domains: Option<Vec<String>>,
    /// `strategy`
    pub strategy: Option<String>,
    /// `include_warning`
    pub include_warning: Option<bool>,
    /// `hash_query`
    pub hash_query: Option<bool>,
    /// `exclude_services`
    pub exclude_services: Option<Vec<String>>,
    /// `expose`
    pub expose: Option<String>,
}

/// This group, validated.
#[derive(Debug)]
pub(super) struct RoutingConfig {
    /// Lowercase domain suffixes without leading or trailing dots.
    pub domains: Vec<String>,
    /// Strategy for services whose instances name none.
    pub strategy: Strategy,
    /// Route to warning instances too.
    pub include_warning: bool,
    /// url-hash includes the query.
    pub hash_query: bool,
    /// Services never routed (lowercase names).
    pub exclude_services: Vec<String>,
    /// Which services are routed.
    pub expose: Expose,
}

/// Checks the routing keys; `--domain` (replacing the file's list) and `--strategy` win.
pub(super) fn validate(file: FileRouting, o: &Overrides) -> Result<RoutingConfig, ConfigError> {
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
    let expose = parse_choice(
        "expose",
        file.expose.as_deref(),
        &[("all", Expose::All), ("tagged", Expose::Tagged)],
    )?;
    Ok(RoutingConfig {
        domains,
        strategy,
        include_warning: file.include_warning.unwrap_or(false),
        hash_query: file.hash_query.unwrap_or(true),
        exclude_services,
        expose,
    })
}

/// A domain suffix: lowercase, without leading or trailing dots, DNS labels only.
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
