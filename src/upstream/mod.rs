//! The backends' side, below routing: per-instance state that outlives routing tables
//! (in-flight count, idle connections), connecting, and what can go wrong talking to an
//! instance. Routing builds on this; the proxy uses both.

mod conn;
mod pool;
mod stall;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use conn::{connect_tcp, BackendConn, ConnectError, Sender};
pub use pool::{IdlePool, Pooled};
pub use stall::{BoxError, RequestBody, Stall, Stalled};

/// Per-instance state that outlives table rebuilds: in-flight count and idle connections.
#[derive(Debug)]
pub struct InstanceState {
    /// Requests in flight to this instance from this router.
    pub in_flight: AtomicU64,
    /// Idle keep-alive connections of the HTTP/1 fast path.
    pub idle: IdlePool<BackendConn>,
    /// Idle hyper client connections, for requests that came over HTTP/2.
    pub idle_hyper: IdlePool<Sender>,
}

impl InstanceState {
    /// Fresh state keeping at most `max_idle` idle connections.
    pub fn new(max_idle: usize) -> Self {
        InstanceState {
            in_flight: AtomicU64::new(0),
            idle: IdlePool::new(max_idle),
            idle_hyper: IdlePool::new(max_idle),
        }
    }
}

/// Counts one request in flight to an instance until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<InstanceState>);

impl InFlight {
    /// Starts counting.
    pub fn new(state: Arc<InstanceState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(state)
    }

    /// The instance's state.
    pub fn state(&self) -> &Arc<InstanceState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why an exchange with a backend failed, as counted in
/// `consul_router_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The instance refused the connection (or it failed before it was made).
    ConnectRefused,
    /// The connection was not made within `proxy.connect_timeout`.
    ConnectTimeout,
    /// The connection broke before or while the response came.
    Reset,
    /// No response head within `proxy.response_timeout`, or a body that stalled.
    ResponseTimeout,
    /// The response could not be parsed or framed.
    BadResponse,
}

impl ErrorKind {
    /// Every kind, in label order.
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::ConnectRefused,
        ErrorKind::ConnectTimeout,
        ErrorKind::Reset,
        ErrorKind::ResponseTimeout,
        ErrorKind::BadResponse,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::ResponseTimeout => "response_timeout",
            ErrorKind::BadResponse => "bad_response",
        }
    }

    /// Whether nothing reached the backend, so the request may go to another instance.
    pub fn before_send(self) -> bool {
        matches!(self, ErrorKind::ConnectRefused | ErrorKind::ConnectTimeout)
    }
}
