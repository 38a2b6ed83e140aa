//! The request path: host → service → instance → stream through.
//!
//! [`core`] holds the policy both protocol paths share (routing, request IDs, attempts,
//! field rules in [`fields`], target checks in [`target`], errors in [`error`], local
//! answers in [`answer`], `finish`). HTTP/1 connections take the fast path in [`h1`]:
//! heads parsed in place and rewritten as bytes, bodies relayed verbatim, backend
//! connections driven in the client's task. HTTP/2 requests go through hyper and [`h2`].
//! The listener (`crate::listener`) decides which, and builds each connection's facts.
//! Imports point down: this module uses `h1` and `h2`, which use the core and its parts,
//! which use neither.

pub mod answer;
pub mod attempts;
pub mod auth;
pub mod core;
pub mod error;
pub mod fields;
pub mod h1;
pub mod h2;
pub mod h2up;
pub mod target;

use std::sync::Arc;
use std::time::Duration;

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::routing::Routes;

pub use self::core::{ConnFacts, Core, TlsFacts};
pub use h2::{ProxyBody, UpstreamBody};

/// The proxy's request handler: the core and the connection-level settings.
#[derive(Debug)]
pub struct Proxy {
    /// The policy shared by both protocol paths.
    pub core: Arc<Core>,
    /// `consul_router_upgraded_connections`: HTTP/1 connections joined after a 101.
    pub(crate) upgraded: metrics::Gauge,
    /// `consul_router_open_connections{protocol}`: HTTP/1 and HTTP/2 client connections.
    pub(crate) open_connections: [metrics::Gauge; 2],
    /// `proxy.header_timeout`. On HTTP/2: how long a connection may have no open stream,
    /// the handshake included, before it is closed. Also bounds the PROXY header and the
    /// TLS handshake.
    pub(crate) header_timeout: Duration,
    /// `proxy.h2_max_concurrent_streams`, advertised in our HTTP/2 SETTINGS.
    pub(crate) h2_max_concurrent_streams: u32,
    /// `proxy.shutdown_grace`: how long connections may finish when their listener stops.
    pub(crate) shutdown_grace: Duration,
    /// `proxy.upgrade_idle_timeout`: idle limit of connections joined after a 101.
    pub(crate) upgrade_idle_timeout: Option<Duration>,
    /// `proxy.send_timeout`: an HTTP/2 client that takes no response bytes for this long,
    /// while some wait, loses its connection.
    pub(crate) send_timeout: Duration,
}

impl Proxy {
    /// What the HTTP/1 fast path needs of it.
    pub fn h1(&self) -> h1::Settings<'_> {
        h1::Settings {
            core: &self.core,
            header_timeout: self.header_timeout,
            upgraded: &self.upgraded,
            tunnel: h1::TunnelLimits {
                idle: self.upgrade_idle_timeout,
                grace: self.shutdown_grace,
            },
        }
    }

    /// A proxy reading `routes`, logging requests to `access_log`.
    pub fn new(cfg: &Config, routes: Arc<Routes>, access_log: AccessLog) -> Self {
        Proxy {
            core: Arc::new(Core::new(cfg, routes, access_log)),
            upgraded: metrics::gauge!("consul_router_upgraded_connections"),
            open_connections: [
                metrics::gauge!("consul_router_open_connections", "protocol" => "http1"),
                metrics::gauge!("consul_router_open_connections", "protocol" => "http2"),
            ],
            header_timeout: cfg.proxy.header_timeout,
            h2_max_concurrent_streams: cfg.proxy.h2_max_concurrent_streams,
            shutdown_grace: cfg.proxy.shutdown_grace,
            upgrade_idle_timeout: cfg.proxy.upgrade_idle_timeout,
            send_timeout: cfg.proxy.send_timeout,
        }
    }
}
