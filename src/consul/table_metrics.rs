//! Metrics of the rebuilder: tables published and how long each took to build. What a table
//! holds (services, instances by state) is read from the live table at scrape time.

use std::time::Duration;

use metrics::{Counter, Histogram};

/// The rebuilder's metrics.
#[derive(Debug)]
pub(crate) struct TableMetrics {
    updates: Counter,
    build: Histogram,
}

impl TableMetrics {
    /// Registers the table-wide metrics.
    pub(crate) fn new() -> Self {
        TableMetrics {
            updates: metrics::counter!("consul_router_routing_table_updates_total"),
            build: metrics::histogram!("consul_router_table_build_seconds"),
        }
    }

    /// A table was published after `build_time` of building.
    pub(crate) fn published(&mut self, build_time: Duration) {
        self.updates.increment(1);
        self.build.record(build_time);
    }
}
