//! The routing table: host → service → instances, one immutable snapshot per change.
//!
//! [`build`] turns what Consul knows ([`InstanceSpec`]s per service) into a [`RoutingTable`];
//! [`Routes`] publishes it through `arc_swap`, so the request path reads it without a lock.

mod access;
mod build;
mod host;
mod table;

pub use access::{Access, AuthSpec, CacheKey, MAX_AUTH_CACHE};
#[cfg(test)]
pub(crate) use build::testing;
pub use build::{build, BuildOptions, CatalogTags, StateRegistry};
pub use host::{normalize, HostError, MAX_HOST};
pub use table::{
    Health, Instance, InstanceSpec, InstanceState, RoutingTable, Service, ServiceStats,
    INSTANCE_STATES,
};

use std::sync::Arc;

use arc_swap::ArcSwap;

/// The live routing table. Readers call [`Routes::load`]; the rebuilder calls [`Routes::store`].
#[derive(Debug)]
pub struct Routes {
    current: ArcSwap<RoutingTable>,
    /// Metrics of requests no service took (`service="unknown"`), kept as tables change.
    pub unrouted: crate::metrics::ServiceMetrics,
    /// Why the table is not live yet, as `/healthz` tells it (discovery sets it).
    waiting: arc_swap::ArcSwapOption<String>,
}

impl Routes {
    /// Starts with an empty, not-yet-ready table.
    pub fn new() -> Self {
        Routes {
            current: ArcSwap::from_pointee(RoutingTable::empty()),
            unrouted: crate::metrics::ServiceMetrics::default(),
            waiting: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Says why the table is not live yet (`None`: no particular reason).
    pub fn set_waiting(&self, reason: Option<String>) {
        self.waiting.store(reason.map(Arc::new));
    }

    /// Why the table is not live yet, if discovery said.
    pub fn waiting(&self) -> Option<Arc<String>> {
        self.waiting.load_full()
    }

    /// The current snapshot (lock-free; cheap enough for every request).
    pub fn load(&self) -> arc_swap::Guard<Arc<RoutingTable>> {
        self.current.load()
    }

    /// The current snapshot as an owned `Arc`, for long-lived readers.
    pub fn load_full(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }

    /// Publishes a new snapshot.
    pub fn store(&self, table: RoutingTable) {
        self.current.store(Arc::new(table));
    }
}

impl Default for Routes {
    fn default() -> Self {
        Self::new()
    }
}
