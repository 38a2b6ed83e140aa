//! Prometheus metrics: the recorder, shared by every router in the process, and its upkeep.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::upstream::ErrorKind;

/// Latency buckets (seconds) for the duration histograms: 1 ms to 60 s.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// A service's request metrics, registered once when the service enters the routing table so
/// that a request does no lookup by label.
#[derive(Debug)]
pub struct ServiceMetrics {
    /// `consul_router_requests_total{service,code}` by status class 1xx..5xx.
    requests: [Counter; 5],
    /// `consul_router_request_duration_seconds{service}`: head received to response ended.
    pub duration: Histogram,
    /// `consul_router_upstream_duration_seconds{service}`: sent to the backend's response head.
    pub upstream_duration: Histogram,
    /// `consul_router_upstream_errors_total{service,kind}`, in [`ErrorKind::ALL`] order.
    upstream_errors: [Counter; 5],
    /// `consul_router_retries_total{service}`.
    pub retries: Counter,
}

impl ServiceMetrics {
    /// Registers the metrics of service `name` (`unknown` for requests no service took).
    pub fn new(name: &str) -> Self {
        let service = name.to_owned();
        let code = |c: &'static str| metrics::counter!("consul_router_requests_total", "service" => service.clone(), "code" => c);
        let kind = |k: ErrorKind| metrics::counter!("consul_router_upstream_errors_total", "service" => service.clone(), "kind" => k.as_str());
        ServiceMetrics {
            requests: [
                code("1xx"),
                code("2xx"),
                code("3xx"),
                code("4xx"),
                code("5xx"),
            ],
            duration: metrics::histogram!("consul_router_request_duration_seconds", "service" => service.clone()),
            upstream_duration: metrics::histogram!("consul_router_upstream_duration_seconds", "service" => service.clone()),
            upstream_errors: ErrorKind::ALL.map(kind),
            retries: metrics::counter!("consul_router_retries_total", "service" => service.clone()),
        }
    }

    /// Counts a request answered with `status`.
    pub fn count(&self, status: u16) {
        let i = usize::from((status / 100).clamp(1, 5) - 1);
        self.requests[i].increment(1);
    }

    /// Counts a failed exchange with a backend.
    pub fn upstream_error(&self, kind: ErrorKind) {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.upstream_errors[i].increment(1);
    }
}

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
        "consul_router_requests_total",
        "Requests by service and status class, local answers included (service \"unknown\" when no service took the request)."
    );
    metrics::describe_histogram!(
        "consul_router_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from a request's head to the end of its response."
    );
    metrics::describe_histogram!(
        "consul_router_upstream_duration_seconds",
        metrics::Unit::Seconds,
        "Time from sending a request to a backend to its response head."
    );
    metrics::describe_counter!(
        "consul_router_upstream_errors_total",
        "Failed exchanges with backends by kind."
    );
    metrics::describe_counter!(
        "consul_router_retries_total",
        "Requests sent again to another instance or connection."
    );
    metrics::describe_gauge!("consul_router_services", "Services in the routing table.");
    metrics::describe_counter!(
        "consul_router_consul_requests_total",
        "Requests to Consul's HTTP API by endpoint and outcome."
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
    metrics::describe_histogram!(
        "consul_router_table_build_seconds",
        metrics::Unit::Seconds,
        "Time to build one routing table."
    );
    metrics::describe_gauge!(
        "consul_router_routing_table_age_seconds",
        metrics::Unit::Seconds,
        "Time since Consul last answered one of discovery's queries (since the start, if it never did)."
    );
    metrics::describe_counter!(
        "consul_router_routing_table_updates_total",
        "Routing tables published."
    );
    metrics::describe_gauge!(
        "consul_router_instances",
        "Instances per routed service by state: passing, warning, critical, and not_routable (weight 0, warning while warnings are not routed, or critical). 0 once the service leaves the table."
    );
}

/// Runs the recorder's periodic upkeep (histogram buckets) forever.
pub async fn upkeep(handle: PrometheusHandle) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        handle.run_upkeep();
    }
}
