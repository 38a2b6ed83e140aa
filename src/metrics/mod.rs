//! Prometheus metrics: the recorder for process-wide series, shared by every router in the
//! process, and its upkeep; per-service request series live in [`series`], on atomics of
//! their own, created on a service's first request.

mod series;

pub use series::{escape_label, write_services, Histogram, LazyMetrics, ServiceMetrics};

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets (seconds) for the duration histograms: 1 ms to 60 s.
pub const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// The process-wide Prometheus handle. The `metrics` facade has a single global recorder, so
/// the first call installs it and later calls share it.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            metrics::gauge!("consul_router_build_info", "version" => env!("CARGO_PKG_VERSION"))
                .set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        "consul_router_h2_backend_connections_opened_total",
        "HTTP/2 connections opened to router.proto=h2c/h2 instances."
    );
    metrics::describe_gauge!(
        "consul_router_h2_backend_connections",
        "Open HTTP/2 connections to router.proto=h2c/h2 instances."
    );
    metrics::describe_counter!(
        "consul_router_h2_backend_streams_queued_total",
        "Streams put on an HTTP/2 backend connection already at its stream limit, because the instance had proxy.h2_backend_max_connections open."
    );
    metrics::describe_counter!(
        "consul_router_consul_requests_total",
        "Requests to Consul's HTTP API by endpoint and outcome."
    );
    metrics::describe_counter!(
        "consul_router_consul_server_switches_total",
        "Moves of discovery's requests from one Consul agent to another (consul.address with several)."
    );
    metrics::describe_gauge!(
        "consul_router_consul_server",
        "1 for the Consul agent discovery uses now, 0 for the others; set at the first switch."
    );
    metrics::describe_counter!(
        "consul_router_consul_acl_filtered_total",
        "Consul answers filtered by ACLs (X-Consul-Results-Filtered-By-ACLs), counted once per client like the warning."
    );
    metrics::describe_gauge!(
        "consul_router_build_info",
        "Always 1; the version in a label."
    );
    metrics::describe_gauge!(
        "consul_router_open_connections",
        "Open client connections by protocol (http1, http2)."
    );
    metrics::describe_gauge!(
        "consul_router_upgraded_connections",
        "Open upgraded (WebSocket) tunnels."
    );
    metrics::describe_counter!(
        "consul_router_connections_limited_total",
        "Times an accept loop paused at proxy.max_connections (new connections wait in the backlog)."
    );
    metrics::describe_counter!(
        "consul_router_accept_errors_total",
        "Failed accepts by reason (process_fd_limit, system_fd_limit, other); each backs off."
    );
    metrics::describe_counter!(
        "consul_router_send_timeouts_total",
        "HTTP/2 client connections closed for taking no response bytes for proxy.send_timeout."
    );
    metrics::describe_histogram!(
        "consul_router_table_build_seconds",
        metrics::Unit::Seconds,
        "Time to build one routing table."
    );
    metrics::describe_gauge!(
        "consul_router_routing_table_age_seconds",
        metrics::Unit::Seconds,
        "How long the routing table may have been behind Consul: 0 while the catalog's blocking query is open and on time, else the time since Consul last answered (since the start, if it never did)."
    );
    metrics::describe_counter!(
        "consul_router_routing_table_updates_total",
        "Routing tables published."
    );
}

/// Runs the recorder's periodic upkeep (histogram buckets) forever.
pub async fn upkeep(handle: PrometheusHandle) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        handle.run_upkeep();
    }
}
