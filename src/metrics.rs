//! Prometheus metrics: the recorder, shared by every router in the process, and its upkeep.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The process-wide Prometheus handle. The `metrics` facade has a single global recorder, so
/// the first call installs it and later calls share it.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        "consul_router_requests_total",
        "Requests received by the proxy."
    );
    metrics::describe_counter!(
        "consul_router_responses_total",
        "Responses per service and status class, local answers included."
    );
    metrics::describe_counter!(
        "consul_router_no_route_total",
        "Requests for a host no service serves (404)."
    );
    metrics::describe_counter!(
        "consul_router_upstream_retries_total",
        "Requests retried on another instance after a connect failure."
    );
    metrics::describe_gauge!("consul_router_services", "Services in the routing table.");
    metrics::describe_counter!(
        "consul_router_consul_requests_total",
        "Requests to Consul's HTTP API by endpoint and outcome."
    );
    metrics::describe_gauge!(
        "consul_router_upgraded_connections",
        "Open upgraded (WebSocket) tunnels."
    );
    metrics::describe_histogram!(
        "consul_router_table_build_seconds",
        metrics::Unit::Seconds,
        "Time to build one routing table."
    );
}

/// Runs the recorder's periodic upkeep (histogram buckets) forever.
pub async fn upkeep(handle: PrometheusHandle) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        handle.run_upkeep();
    }
}
