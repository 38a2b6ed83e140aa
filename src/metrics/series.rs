//! A service's request series on plain atomics, and their Prometheus text.
//!
//! These are kept out of the `metrics` facade's exporter: its series can never be removed, and
//! a handle cached with a service would outlive an idle timeout. Here a service's series exist
//! from its first request until it leaves the routing table, and a request touches only
//! atomics of its own service.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;

use crate::upstream::ErrorKind;

use super::BUCKETS;

/// Status classes, in `requests` order.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upper bounds of [`BUCKETS`] in nanoseconds, for a comparison without floats.
const BOUNDS_NANOS: [u64; BUCKETS.len()] = {
    let mut out = [0; BUCKETS.len()];
    let mut i = 0;
    while i < BUCKETS.len() {
        // Whole microseconds: every bucket is a multiple of 1 ms.
        out[i] = (BUCKETS[i] * 1e6) as u64 * 1_000;
        i += 1;
    }
    out
};

/// A histogram with the fixed [`BUCKETS`]: one bucket count and the sum per value, no
/// allocation and no clock read.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Counts per bucket, not cumulative; the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn record(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NANOS.partition_point(|b| *b < nanos);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// Values recorded so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// Writes `<name>_bucket`, `_sum` and `_count` lines for `service`.
    fn write(&self, out: &mut String, name: &str, service: &str) {
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Relaxed);
            let le = BUCKETS.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{service=\"{service}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{service=\"{service}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{service=\"{service}\"}} {cumulative}");
    }
}

/// A service's request metrics: `consul_router_requests_total`, the two duration histograms,
/// `consul_router_upstream_errors_total` and `consul_router_retries_total`.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    /// Requests by status class 1xx..5xx.
    requests: [AtomicU64; 5],
    /// Head received to response ended.
    pub duration: Histogram,
    /// Sent to the backend's response head.
    pub upstream_duration: Histogram,
    /// Failed exchanges, in [`ErrorKind::ALL`] order.
    upstream_errors: [AtomicU64; ErrorKind::ALL.len()],
    retries: AtomicU64,
    /// Retries the retry budget refused.
    retry_budget_exhausted: AtomicU64,
    /// Forward auth decisions, in [`AUTH_OUTCOMES`] order.
    auth: [AtomicU64; AUTH_OUTCOMES.len()],
    /// Time to an auth decision (cache hits included).
    pub auth_duration: Histogram,
}

/// Forward auth outcomes, the `outcome` label of `consul_router_auth_decisions_total`.
pub const AUTH_OUTCOMES: [&str; 4] = ["allowed", "cached", "denied", "error"];

impl ServiceMetrics {
    /// Counts a request answered with `status`.
    pub fn count(&self, status: u16) {
        let i = usize::from((status / 100).clamp(1, 5) - 1);
        self.requests[i].fetch_add(1, Relaxed);
    }

    /// Counts a failed exchange with a backend.
    pub fn upstream_error(&self, kind: ErrorKind) {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.upstream_errors[i].fetch_add(1, Relaxed);
    }

    /// Counts a forward auth decision (one of [`AUTH_OUTCOMES`]) that took `took`.
    pub fn auth(&self, outcome: &str, took: Duration) {
        let i = AUTH_OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(3);
        self.auth[i].fetch_add(1, Relaxed);
        self.auth_duration.record(took);
    }

    /// Counts a request sent again.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    /// Counts a retry the service's retry budget refused.
    pub fn retry_budget_exhausted(&self) {
        self.retry_budget_exhausted.fetch_add(1, Relaxed);
    }

    /// Requests so far by status class 1xx..5xx.
    pub fn requests(&self) -> [u64; 5] {
        self.requests.each_ref().map(|c| c.load(Relaxed))
    }
}

/// A service's metrics, allocated on its first request: a service that carries no traffic
/// costs one pointer and exports nothing.
#[derive(Debug, Default)]
pub struct LazyMetrics(OnceLock<Box<ServiceMetrics>>);

impl LazyMetrics {
    /// The metrics, created on first use (one atomic load after that).
    pub fn get(&self) -> &ServiceMetrics {
        self.0.get_or_init(Box::default)
    }

    /// The metrics if the service has had a request.
    pub fn used(&self) -> Option<&ServiceMetrics> {
        self.0.get().map(|b| &**b)
    }
}

/// One family of the per-service exposition.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
}

const REQUESTS: Family = Family {
    name: "consul_router_requests_total",
    kind: "counter",
    help: "Requests by service and status class, local answers included (service \"unknown\" when no service took the request).",
};
const DURATION: Family = Family {
    name: "consul_router_request_duration_seconds",
    kind: "histogram",
    help: "Time from a request's head to the end of its response.",
};
const UPSTREAM_DURATION: Family = Family {
    name: "consul_router_upstream_duration_seconds",
    kind: "histogram",
    help: "Time from sending a request to a backend to its response head.",
};
const UPSTREAM_ERRORS: Family = Family {
    name: "consul_router_upstream_errors_total",
    kind: "counter",
    help: "Failed exchanges with backends by kind.",
};
const AUTH_DECISIONS: Family = Family {
    name: "consul_router_auth_decisions_total",
    kind: "counter",
    help:
        "Forward auth decisions by protected service and outcome (allowed, cached, denied, error).",
};
const AUTH_DURATION: Family = Family {
    name: "consul_router_auth_duration_seconds",
    kind: "histogram",
    help: "Time to a forward auth decision, by protected service.",
};
const RETRIES: Family = Family {
    name: "consul_router_retries_total",
    kind: "counter",
    help: "Requests sent again to another instance or connection.",
};

const BUDGET_EXHAUSTED: Family = Family {
    name: "consul_router_retry_budget_exhausted_total",
    kind: "counter",
    help: "Retries not made because the service's retry budget was spent.",
};

impl Family {
    fn header(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
    }
}

/// Writes the request families for `services` (name, escaped for a label value, and its
/// metrics), each family once. A status class or an error kind appears once it happened.
pub fn write_services(out: &mut String, services: &[(String, &ServiceMetrics)]) {
    if services.is_empty() {
        return;
    }
    REQUESTS.header(out);
    for (service, m) in services {
        for (class, n) in CLASSES.iter().zip(m.requests()) {
            if n > 0 {
                let _ = writeln!(
                    out,
                    "{}{{service=\"{service}\",code=\"{class}\"}} {n}",
                    REQUESTS.name
                );
            }
        }
    }
    for (family, pick) in [
        (
            &DURATION,
            (|m| &m.duration) as fn(&ServiceMetrics) -> &Histogram,
        ),
        (&UPSTREAM_DURATION, |m| &m.upstream_duration),
        (&AUTH_DURATION, |m| &m.auth_duration),
    ] {
        let used: Vec<_> = services
            .iter()
            .filter(|(_, m)| pick(m).count() > 0)
            .collect();
        if used.is_empty() {
            continue;
        }
        family.header(out);
        for (service, m) in used {
            pick(m).write(out, family.name, service);
        }
    }
    let errors = |m: &ServiceMetrics| {
        ErrorKind::ALL
            .iter()
            .zip(m.upstream_errors.each_ref().map(|c| c.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| (k.as_str(), n))
            .collect::<Vec<_>>()
    };
    if services.iter().any(|(_, m)| !errors(m).is_empty()) {
        UPSTREAM_ERRORS.header(out);
        for (service, m) in services {
            for (kind, n) in errors(m) {
                let _ = writeln!(
                    out,
                    "{}{{service=\"{service}\",kind=\"{kind}\"}} {n}",
                    UPSTREAM_ERRORS.name
                );
            }
        }
    }
    let decisions = |m: &ServiceMetrics| {
        AUTH_OUTCOMES
            .iter()
            .zip(m.auth.each_ref().map(|c| c.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .map(|(o, n)| (*o, n))
            .collect::<Vec<_>>()
    };
    if services.iter().any(|(_, m)| !decisions(m).is_empty()) {
        AUTH_DECISIONS.header(out);
        for (service, m) in services {
            for (outcome, n) in decisions(m) {
                let _ = writeln!(
                    out,
                    "{}{{service=\"{service}\",outcome=\"{outcome}\"}} {n}",
                    AUTH_DECISIONS.name
                );
            }
        }
    }
    RETRIES.header(out);
    for (service, m) in services {
        let n = m.retries.load(Relaxed);
        let _ = writeln!(out, "{}{{service=\"{service}\"}} {n}", RETRIES.name);
    }
    let denied = |m: &ServiceMetrics| m.retry_budget_exhausted.load(Relaxed);
    if services.iter().any(|(_, m)| denied(m) > 0) {
        BUDGET_EXHAUSTED.header(out);
        for (service, m) in services.iter().filter(|(_, m)| denied(m) > 0) {
            let n = denied(m);
            let _ = writeln!(
                out,
                "{}{{service=\"{service}\"}} {n}",
                BUDGET_EXHAUSTED.name
            );
        }
    }
}

/// `value` escaped for a label value in Prometheus text (backslash, quote, newline).
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_upper_bounds_and_cumulative() {
        let h = Histogram::default();
        h.record(Duration::from_millis(1)); // le 0.001
        h.record(Duration::from_micros(1001)); // le 0.0025
        h.record(Duration::from_secs(61)); // +Inf
        let mut out = String::new();
        h.write(&mut out, "x", "s");
        assert!(
            out.contains("x_bucket{service=\"s\",le=\"0.001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{service=\"s\",le=\"0.0025\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{service=\"s\",le=\"60\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{service=\"s\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_count{service=\"s\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{service=\"s\"} 61.002001\n"), "{out}");
    }

    #[test]
    fn series_appear_as_they_happen() {
        let m = ServiceMetrics::default();
        let mut out = String::new();
        write_services(&mut out, &[("a".into(), &m)]);
        assert!(!out.contains("code="), "{out}");
        assert!(!out.contains("duration"), "{out}");
        assert!(
            out.contains("consul_router_retries_total{service=\"a\"} 0\n"),
            "{out}"
        );
        m.count(502);
        m.upstream_error(ErrorKind::Reset);
        m.duration.record(Duration::from_millis(3));
        let mut out = String::new();
        write_services(&mut out, &[("a".into(), &m)]);
        assert!(out.contains("consul_router_requests_total{service=\"a\",code=\"5xx\"} 1\n"));
        assert!(!out.contains("code=\"2xx\""), "{out}");
        assert!(out.contains("{service=\"a\",kind=\"reset\"} 1\n"), "{out}");
        assert!(out.contains("consul_router_request_duration_seconds_count{service=\"a\"} 1"));
        assert!(!out.contains("upstream_duration"), "{out}");
        assert_eq!(out.matches("# TYPE").count(), 4, "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
