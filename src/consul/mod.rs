//! Consul: a typed HTTP client, and the discovery that keeps the routing table current.
//!
//! See ARCHITECTURE.md for the watch design and its cost at 2,000 services.

mod client;
mod model;
mod schedule;
mod supervise;
mod table_metrics;
pub mod types;
mod watch;

pub use client::{ConsulClient, ConsulError, Indexed};
pub use supervise::{supervise, AbortOnDrop, Backoff};
pub use watch::{Discovery, DiscoveryHandle};
