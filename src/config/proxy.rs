//! The `[proxy]` section: timeouts, retries and connections to backends.

use std::time::Duration;

use serde::Deserialize;

use super::parse::parse_duration;
use super::{invalid, ConfigError};
use crate::upstream::{BudgetRules, OutlierRules};

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
    /// Longest wait for a `router.auth=` service's answer, all tries together.
    pub auth_timeout: Option<String>,
    /// Most streams on one HTTP/2 backend connection (the server's limit applies if lower).
    pub h2_backend_max_streams: Option<usize>,
    /// Most HTTP/2 connections per `router.proto=h2c`/`h2` instance.
    pub h2_backend_max_connections: Option<usize>,
    /// PING period on HTTP/2 backend connections, and the longest wait for its answer.
    pub h2_backend_ping_interval: Option<String>,
    /// Consecutive failures (connect errors, broken exchanges, the service's 5xx) that
    /// eject an instance; 0 turns ejection off.
    pub outlier_consecutive_failures: Option<u32>,
    /// The first ejection's length; each further one adds as much.
    pub outlier_base_ejection: Option<String>,
    /// The longest ejection.
    pub outlier_max_ejection: Option<String>,
    /// Most of a service's routable instances ejected at once, in percent.
    pub max_ejection_percent: Option<u32>,
    /// Retries per 100 requests of a service, at most.
    pub retry_budget_percent: Option<u32>,
    /// Retries per second a service may make whatever its request rate.
    pub retry_budget_min_per_second: Option<u32>,
    /// Ramp of an instance's share after it became routable; `0s`: whole at once.
    pub slow_start: Option<String>,
    /// After SIGTERM, how long the listeners keep accepting while `/healthz` says 503.
    pub shutdown_delay: Option<String>,
    /// Idle time after which an upgraded (101) connection is closed; `0s` or absent: never.
    pub upgrade_idle_timeout: Option<String>,
    /// How long an HTTP/2 client may take no response bytes while some are waiting.
    pub send_timeout: Option<String>,
    /// Most open client connections over the proxy's listeners; 0: no limit.
    pub max_connections: Option<usize>,
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
    /// Longest wait for an auth service's answer head, all tries together.
    pub auth_timeout: Duration,
    /// Most streams per HTTP/2 backend connection.
    pub h2_backend_max_streams: usize,
    /// Most HTTP/2 connections per instance.
    pub h2_backend_max_connections: usize,
    /// PING period (and answer limit) on HTTP/2 backend connections.
    pub h2_backend_ping_interval: Duration,
    /// Outlier ejection and slow start.
    pub outlier: OutlierRules,
    /// The retry budget.
    pub retry_budget: BudgetRules,
    /// After SIGTERM: accept for this long while `/healthz` answers 503, then drain.
    pub shutdown_delay: Duration,
    /// Idle limit of an upgraded (101) connection; `None`: none.
    pub upgrade_idle_timeout: Option<Duration>,
    /// An HTTP/2 connection whose client takes no response bytes for this long, while
    /// some wait to be sent, is closed.
    pub send_timeout: Duration,
    /// Most open client connections over the proxy's listeners; 0: no limit.
    pub max_connections: usize,
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

/// Checks `[proxy]`.
pub(super) fn validate(p: FileProxy) -> Result<ProxyConfig, ConfigError> {
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
        shutdown_grace: parse_duration("proxy.shutdown_grace", p.shutdown_grace.as_deref(), "30s")?,
        header_timeout: parse_duration("proxy.header_timeout", p.header_timeout.as_deref(), "30s")?,
        h2_max_concurrent_streams: p.h2_max_concurrent_streams.unwrap_or(128),
        load_header: load_header(p.load_header.as_deref())?,
        auth_timeout: parse_duration("proxy.auth_timeout", p.auth_timeout.as_deref(), "2s")?,
        h2_backend_max_streams: p.h2_backend_max_streams.unwrap_or(100),
        h2_backend_max_connections: p.h2_backend_max_connections.unwrap_or(4),
        h2_backend_ping_interval: parse_duration(
            "proxy.h2_backend_ping_interval",
            p.h2_backend_ping_interval.as_deref(),
            "10s",
        )?,
        outlier: outlier(&p)?,
        retry_budget: BudgetRules {
            percent: p.retry_budget_percent.unwrap_or(20),
            min_per_second: p.retry_budget_min_per_second.unwrap_or(10),
        },
        shutdown_delay: parse_duration("proxy.shutdown_delay", p.shutdown_delay.as_deref(), "0s")?,
        upgrade_idle_timeout: Some(parse_duration(
            "proxy.upgrade_idle_timeout",
            p.upgrade_idle_timeout.as_deref(),
            "0s",
        )?)
        .filter(|d| !d.is_zero()),
        send_timeout: parse_duration("proxy.send_timeout", p.send_timeout.as_deref(), "60s")?,
        max_connections: p.max_connections.unwrap_or(0),
    };
    if proxy.send_timeout.is_zero() {
        return Err(invalid("proxy.send_timeout", "must be above zero"));
    }
    if proxy.retry_budget.percent > 100 {
        return Err(invalid(
            "proxy.retry_budget_percent",
            "must be between 0 and 100",
        ));
    }
    if proxy.retry_budget.min_per_second > 100_000 {
        return Err(invalid(
            "proxy.retry_budget_min_per_second",
            "must be at most 100000",
        ));
    }
    if !(1..=10_000).contains(&proxy.h2_backend_max_streams) {
        return Err(invalid(
            "proxy.h2_backend_max_streams",
            "must be between 1 and 10000",
        ));
    }
    if !(1..=64).contains(&proxy.h2_backend_max_connections) {
        return Err(invalid(
            "proxy.h2_backend_max_connections",
            "must be between 1 and 64",
        ));
    }
    if proxy.h2_backend_ping_interval < Duration::from_secs(1) {
        return Err(invalid(
            "proxy.h2_backend_ping_interval",
            "must be at least 1s",
        ));
    }
    if proxy.auth_timeout.is_zero() {
        return Err(invalid("proxy.auth_timeout", "must be above zero"));
    }
    if proxy.header_timeout.is_zero() {
        return Err(invalid("proxy.header_timeout", "must be above zero"));
    }
    if !(1..=10_000).contains(&proxy.h2_max_concurrent_streams) {
        return Err(invalid(
            "proxy.h2_max_concurrent_streams",
            "must be between 1 and 10000",
        ));
    }
    if proxy.connect_timeout.is_zero() {
        return Err(invalid("proxy.connect_timeout", "must be above zero"));
    }
    if proxy.response_timeout.is_zero() {
        return Err(invalid("proxy.response_timeout", "must be above zero"));
    }
    if proxy.retries > 10 {
        return Err(invalid("proxy.retries", "must be at most 10"));
    }
    Ok(proxy)
}

/// The `outlier_*`, `max_ejection_percent` and `slow_start` keys.
fn outlier(p: &FileProxy) -> Result<OutlierRules, ConfigError> {
    let base = parse_duration(
        "proxy.outlier_base_ejection",
        p.outlier_base_ejection.as_deref(),
        "30s",
    )?;
    let max = parse_duration(
        "proxy.outlier_max_ejection",
        p.outlier_max_ejection.as_deref(),
        "5m",
    )?;
    let slow_start = parse_duration("proxy.slow_start", p.slow_start.as_deref(), "0s")?;
    let failures = p.outlier_consecutive_failures.unwrap_or(5);
    let percent = p.max_ejection_percent.unwrap_or(50);
    if failures > 1_000 {
        return Err(invalid(
            "proxy.outlier_consecutive_failures",
            "must be at most 1000 (0 turns ejection off)",
        ));
    }
    if base < Duration::from_millis(10) {
        return Err(invalid(
            "proxy.outlier_base_ejection",
            "must be at least 10ms",
        ));
    }
    if max < base {
        return Err(invalid(
            "proxy.outlier_max_ejection",
            "must be at least proxy.outlier_base_ejection",
        ));
    }
    if percent > 100 {
        return Err(invalid(
            "proxy.max_ejection_percent",
            "must be between 0 and 100",
        ));
    }
    if slow_start > Duration::from_secs(3_600) {
        return Err(invalid("proxy.slow_start", "must be at most 1h"));
    }
    Ok(OutlierRules::new(failures, base, max, percent, slow_start))
}

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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::super::{Config, Overrides};
    use crate::upstream::{BudgetRules, OutlierRules};

    fn parse(text: &str) -> Result<Config, super::ConfigError> {
        let file = Config::parse_file(text, Path::new("t.toml"))?;
        Config::from_file(file, &Overrides::default())
    }

    #[test]
    fn outlier_and_budget_keys() {
        let c = Config::default();
        assert_eq!(c.proxy.outlier, OutlierRules::default());
        assert_eq!(c.proxy.retry_budget, BudgetRules::default());
        let c = parse(
            "[proxy]\noutlier_consecutive_failures = 3\noutlier_base_ejection = \"1s\"\n\
             outlier_max_ejection = \"10s\"\nmax_ejection_percent = 30\nslow_start = \"20s\"\n\
             retry_budget_percent = 10\nretry_budget_min_per_second = 0\n",
        )
        .unwrap();
        assert_eq!(
            c.proxy.outlier,
            OutlierRules::new(
                3,
                Duration::from_secs(1),
                Duration::from_secs(10),
                30,
                Duration::from_secs(20)
            )
        );
        assert_eq!(c.proxy.retry_budget.percent, 10);
        assert_eq!(c.proxy.retry_budget.min_per_second, 0);
        for (text, key) in [
            (
                "outlier_consecutive_failures = 1001",
                "proxy.outlier_consecutive_failures",
            ),
            (
                "outlier_base_ejection = \"1ms\"",
                "proxy.outlier_base_ejection",
            ),
            (
                "outlier_base_ejection = \"soon\"",
                "proxy.outlier_base_ejection",
            ),
            (
                "outlier_max_ejection = \"1s\"",
                "proxy.outlier_max_ejection",
            ),
            ("max_ejection_percent = 101", "proxy.max_ejection_percent"),
            ("slow_start = \"2h\"", "proxy.slow_start"),
            ("retry_budget_percent = 150", "proxy.retry_budget_percent"),
            (
                "retry_budget_min_per_second = 1000000",
                "proxy.retry_budget_min_per_second",
            ),
        ] {
            let e = parse(&format!("[proxy]\n{text}")).unwrap_err().to_string();
            assert!(e.starts_with(key), "{text}: {e}");
        }
    }
}
