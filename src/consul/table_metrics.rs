//! Metrics of the published routing table, registered once and set per table.

use std::collections::HashMap;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

use crate::routing::{Health, RoutingTable, Service};

/// The `state` labels of `consul_router_instances`, in [`instance_counts`] order.
pub(crate) const STATES: [&str; 4] = ["passing", "warning", "critical", "not_routable"];

/// How many of a service's instances are passing, warning, critical, and not routable
/// (weight 0, warning while warnings are not routed, or critical).
pub(crate) fn instance_counts(service: &Service) -> [usize; 4] {
    let mut counts = [0; 4];
    for i in service.instances.iter() {
        let state = match i.health {
            Health::Passing => 0,
            Health::Warning => 1,
            Health::Critical => 2,
        };
        counts[state] += 1;
    }
    counts[3] = service.instances.len() - service.routable;
    counts
}

/// The rebuilder's metrics.
#[derive(Debug)]
pub(crate) struct TableMetrics {
    updates: Counter,
    services: Gauge,
    build: Histogram,
    /// `consul_router_instances{service,state}` of each service in the last table.
    instances: HashMap<Box<str>, [Gauge; 4]>,
}

impl TableMetrics {
    /// Registers the table-wide metrics.
    pub(crate) fn new() -> Self {
        TableMetrics {
            updates: metrics::counter!("consul_router_routing_table_updates_total"),
            services: metrics::gauge!("consul_router_services"),
            build: metrics::histogram!("consul_router_table_build_seconds"),
            instances: HashMap::new(),
        }
    }

    /// A table was published after `build_time` of building.
    pub(crate) fn published(&mut self, table: &RoutingTable, build_time: Duration) {
        self.updates.increment(1);
        self.build.record(build_time);
        self.services.set(table.services.len() as f64);
        for (name, service) in &table.services {
            let gauges = self.instances.entry(name.clone()).or_insert_with(|| {
                STATES.map(|state| {
                    metrics::gauge!("consul_router_instances", "service" => name.to_string(), "state" => state)
                })
            });
            for (gauge, n) in gauges.iter().zip(instance_counts(service)) {
                gauge.set(n as f64);
            }
        }
        // A service that left the table reads 0 rather than its last counts. The exporter
        // cannot drop a series, and names come from Consul, so the label set stays bounded.
        self.instances.retain(|name, gauges| {
            let kept = table.services.contains_key(name);
            if !kept {
                gauges.iter().for_each(|g| g.set(0.0));
            }
            kept
        });
    }
}
