//! The router's `/metrics` text.

use std::net::SocketAddr;

use hyper::StatusCode;

use super::client::get_admin;

/// The admin listener's `/metrics` text (no admin token).
pub async fn metrics(admin: SocketAddr) -> String {
    let (status, text) = get_admin(admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK, "/metrics: {text}");
    text
}

/// The value of the sample `name{labels}` in Prometheus text, summed over the series that
/// have every label given (0 when none does). `labels` are (name, value) pairs, in any
/// order, e.g. `[("service", "a"), ("code", "2xx")]`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (metric, rest) = key.split_once('{').unwrap_or((key, ""));
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The sum over outcomes of `consul_router_consul_requests_total{endpoint}` in a `/metrics`
/// text: the router's requests to Consul on that endpoint.
pub fn consul_requests(metrics: &str, endpoint: &str) -> u64 {
    sample(
        metrics,
        "consul_router_consul_requests_total",
        &[("endpoint", endpoint)],
    ) as u64
}
