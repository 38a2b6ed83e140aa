//! The backends' side, below routing: per-instance state that outlives routing tables
//! (in-flight count, idle connections), connecting, and what can go wrong talking to an
//! instance. Routing builds on this; the proxy uses both.

mod budget;
mod conn;
mod dns;
pub mod h2pool;
mod outlier;
mod pool;
mod stall;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use budget::{BudgetRules, RetryBudget};
pub use conn::{connect_tcp, BackendConn, ConnectError, Sender};
pub use dns::{DnsCache, Resolved};
pub use h2pool::{H2Body, H2Lease, H2Pool, H2Settings, Proto};
pub use outlier::{FailureStatuses, Outlier, OutlierRules};
pub use pool::{IdlePool, Pooled};
pub use stall::{BoxError, RequestBody, Stall, Stalled};

/// Per-instance state that outlives table rebuilds: in-flight count, reported load, passive
/// health and idle connections.
#[derive(Debug)]
pub struct InstanceState {
    /// Requests in flight to this instance from this router.
    pub in_flight: AtomicU64,
    /// The load the instance last reported, in Consul or in a response.
    pub load: ReportedLoad,
    /// Idle keep-alive connections of the HTTP/1 fast path.
    pub idle: IdlePool<BackendConn>,
    /// Idle hyper client connections, for requests that came over HTTP/2.
    pub idle_hyper: IdlePool<Sender>,
    /// Multiplexed connections, for `router.proto=h2c`/`h2` instances.
    pub h2: H2Pool,
    /// Consecutive failures, ejection and slow-start ramp.
    pub outlier: Outlier,
    /// The addresses of a host-name instance address, kept for `consul.dns_ttl`.
    pub dns: DnsCache,
}

impl InstanceState {
    /// Fresh state keeping at most `max_idle` idle connections.
    pub fn new(max_idle: usize) -> Self {
        InstanceState {
            in_flight: AtomicU64::new(0),
            load: ReportedLoad::default(),
            idle: IdlePool::new(max_idle),
            idle_hyper: IdlePool::new(max_idle),
            h2: H2Pool::default(),
            outlier: Outlier::default(),
            dns: DnsCache::default(),
        }
    }
}

/// Bits that mean "no report" (a NaN no report can produce: reports are finite).
const NO_LOAD: u64 = u64::MAX;

/// An instance's reported load, whichever report came last: Consul's `Meta.load` (read at
/// each table build, applied only when it changed, so a rebuild for another reason does
/// not undo a fresher report) or the load header of a response (applied at once). Atomics
/// only: the request path writes it without a lock.
#[derive(Debug)]
pub struct ReportedLoad {
    current: AtomicU64,
    /// Consul's value at the last build, to tell a change from a repeat.
    consul: AtomicU64,
}

impl Default for ReportedLoad {
    fn default() -> Self {
        ReportedLoad {
            current: AtomicU64::new(NO_LOAD),
            consul: AtomicU64::new(NO_LOAD),
        }
    }
}

impl ReportedLoad {
    /// The last report, if any.
    pub fn get(&self) -> Option<f64> {
        let bits = self.current.load(Ordering::Relaxed);
        (bits != NO_LOAD).then(|| f64::from_bits(bits))
    }

    /// A report from a response: applies now. The caller passes a finite, non-negative value.
    pub fn report(&self, load: f64) {
        let bits = load.to_bits();
        // A load first, so an unchanged report does not take the cache line.
        if self.current.load(Ordering::Relaxed) != bits {
            self.current.store(bits, Ordering::Relaxed);
        }
    }

    /// Consul's value at a table build: applies only when it differs from the last build's.
    pub fn from_consul(&self, load: Option<f64>) {
        let bits = load.map_or(NO_LOAD, f64::to_bits);
        if self.consul.swap(bits, Ordering::Relaxed) != bits {
            self.current.store(bits, Ordering::Relaxed);
        }
    }
}

/// Parses a load header's value: a finite, non-negative decimal number (`37`, `12.5`).
pub fn parse_load(value: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(value).ok()?.trim_ascii();
    // Digits and at most one dot: no signs, exponents, `inf` or `NaN`, which `f64`'s parser
    // would take.
    if text.is_empty() || text.len() > 16 || !text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return None;
    }
    text.parse::<f64>().ok().filter(|v| v.is_finite())
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
    /// The TLS handshake with the backend failed (certificate not trusted, no ALPN `h2`).
    Tls,
}

impl ErrorKind {
    /// Every kind, in label order.
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::ConnectRefused,
        ErrorKind::ConnectTimeout,
        ErrorKind::Reset,
        ErrorKind::ResponseTimeout,
        ErrorKind::BadResponse,
        ErrorKind::Tls,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::ResponseTimeout => "response_timeout",
            ErrorKind::BadResponse => "bad_response",
            ErrorKind::Tls => "tls",
        }
    }

    /// Whether nothing reached the backend, so the request may go to another instance.
    pub fn before_send(self) -> bool {
        matches!(
            self,
            ErrorKind::ConnectRefused | ErrorKind::ConnectTimeout | ErrorKind::Tls
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_values() {
        assert_eq!(parse_load(b"37"), Some(37.0));
        assert_eq!(parse_load(b" 12.5 "), Some(12.5));
        assert_eq!(parse_load(b"0"), Some(0.0));
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b"1e3",
            b"inf",
            b"NaN",
            b"1.2.3",
            b"x",
            b"12345678901234567",
        ] {
            assert_eq!(parse_load(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_last_report_wins() {
        let l = ReportedLoad::default();
        assert_eq!(l.get(), None);
        l.from_consul(Some(10.0));
        assert_eq!(l.get(), Some(10.0));
        l.report(80.0);
        assert_eq!(l.get(), Some(80.0));
        // A rebuild that brings the same Consul value keeps the fresher report.
        l.from_consul(Some(10.0));
        assert_eq!(l.get(), Some(80.0));
        // A new Consul value is newer than the report.
        l.from_consul(Some(20.0));
        assert_eq!(l.get(), Some(20.0));
        l.from_consul(None);
        assert_eq!(l.get(), None);
    }
}
