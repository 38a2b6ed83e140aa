//! `/metrics`: the recorder's process-wide series, then what is read from the live routing
//! table at scrape time: table totals, the instances of services that are not fully routable
//! or carry traffic, and the request series of services that had a request. A service that
//! leaves the table leaves `/metrics` with it, and an idle, healthy one costs no line.

use std::fmt::Write as _;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::metrics::{escape_label, write_services, ServiceMetrics};
use crate::routing::{Routes, RoutingTable, Service, INSTANCE_STATES};

/// The `service` label of requests no service took.
const UNROUTED: &str = "unknown";

/// The whole `/metrics` text.
pub(super) fn render(prometheus: &PrometheusHandle, routes: &Routes) -> String {
    let mut out = prometheus.render();
    let now = std::time::Instant::now();
    write_table(&mut out, &routes.load(), &routes.unrouted, |s| {
        s.stats.millis(now)
    });
    out
}

/// The series read from `table`, and the request series of `unrouted` once it has any.
fn write_table(
    out: &mut String,
    table: &RoutingTable,
    unrouted: &ServiceMetrics,
    now_ms: impl Fn(&Service) -> u64,
) {
    let mut totals = [0usize; INSTANCE_STATES.len()];
    let mut unroutable = 0;
    // (name, instance counts, request metrics) of the services that export series.
    let mut shown = Vec::new();
    for (name, service) in &table.services {
        let counts = service.instance_counts();
        totals.iter_mut().zip(counts).for_each(|(t, n)| *t += n);
        unroutable += usize::from(service.routable == 0);
        let used = service.stats.metrics.used();
        let whole = service.routable > 0 && service.routable == service.instances.len();
        if used.is_some() || !whole {
            shown.push((escape_label(name), counts, used));
        }
    }
    shown.sort_unstable_by(|a, b| a.0.cmp(&b.0));

    gauge(
        out,
        "consul_router_services",
        "Services in the routing table.",
    );
    let _ = writeln!(out, "consul_router_services {}", table.services.len());
    gauge(
        out,
        "consul_router_services_unroutable",
        "Services in the routing table with no routable instance (they answer 503).",
    );
    let _ = writeln!(out, "consul_router_services_unroutable {unroutable}");
    gauge(
        out,
        "consul_router_table_instances",
        "Instances in the routing table by state: passing, warning, critical; not_routable (weight 0, warning while warnings are not routed, or critical) and routable.",
    );
    for (state, n) in INSTANCE_STATES.iter().zip(totals) {
        let _ = writeln!(
            out,
            "consul_router_table_instances{{state=\"{state}\"}} {n}"
        );
    }
    if !shown.is_empty() {
        gauge(
            out,
            "consul_router_instances",
            "Instances of a routed service by state, for services that are not fully routable or that carried traffic.",
        );
        for (service, counts, _) in &shown {
            for (state, n) in INSTANCE_STATES.iter().zip(counts) {
                let _ = writeln!(
                    out,
                    "consul_router_instances{{service=\"{service}\",state=\"{state}\"}} {n}"
                );
            }
        }
    }
    let mut requests: Vec<(String, &ServiceMetrics)> = shown
        .iter()
        .filter_map(|(name, _, used)| used.map(|m| (name.clone(), m)))
        .collect();
    // A Consul service named "unknown" keeps the label: two series of one name and labels
    // would make the whole text invalid.
    let clash = table.services.contains_key(UNROUTED);
    if !clash && unrouted.requests().iter().any(|n| *n > 0) {
        requests.push((UNROUTED.to_owned(), unrouted));
    }
    write_services(out, &requests);
    write_outliers(out, table, now_ms);
}

/// A service's outlier series: its label, its instances ejected now, and the ejections of
/// each instance ejected at least once.
type OutlierRow = (String, usize, Vec<(String, u64)>);

/// Outlier ejections, for the services (auth services included) with an instance ejected
/// at least once: the instances ejected now, and each such instance's ejections so far.
fn write_outliers(out: &mut String, table: &RoutingTable, now_ms: impl Fn(&Service) -> u64) {
    let mut rows: Vec<OutlierRow> = Vec::new();
    for (name, service) in table.services.iter().chain(&table.internal) {
        let counts: Vec<(String, u64)> = service
            .instances
            .iter()
            .filter(|i| i.state.outlier.ejections() > 0)
            .map(|i| (escape_label(&i.id), i.state.outlier.ejections()))
            .collect();
        if !counts.is_empty() {
            rows.push((escape_label(name), service.ejected(now_ms(service)), counts));
        }
    }
    if rows.is_empty() {
        return;
    }
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    gauge(
        out,
        "consul_router_outlier_ejected_instances",
        "Routable instances ejected now by outlier detection, for services that had an ejection.",
    );
    for (service, ejected, _) in &rows {
        let _ = writeln!(
            out,
            "consul_router_outlier_ejected_instances{{service=\"{service}\"}} {ejected}"
        );
    }
    let name = "consul_router_outlier_ejections_total";
    let _ = writeln!(
        out,
        "# HELP {name} Outlier ejections of an instance since the router first saw it.\n# TYPE {name} counter"
    );
    for (service, _, counts) in &rows {
        for (instance, n) in counts {
            let _ = writeln!(
                out,
                "{name}{{service=\"{service}\",instance=\"{instance}\"}} {n}"
            );
        }
    }
}

fn gauge(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::testing::{spec, table};
    use crate::routing::Health;

    /// `idle` (healthy, no traffic), `busy` (healthy, traffic), `half` (one critical),
    /// `down` (none routable) and `unread` (no instance read yet).
    fn services() -> RoutingTable {
        let p = |id| spec(id, 1, Health::Passing, &[]);
        table(vec![
            ("idle", vec![p("i1"), p("i2")]),
            ("busy", vec![p("b1")]),
            ("half", vec![p("h1"), spec("h2", 1, Health::Critical, &[])]),
            ("down", vec![spec("d1", 1, Health::Warning, &[])]),
            ("unread", vec![]),
        ])
    }

    fn lines_of<'a>(out: &'a str, service: &str) -> Vec<&'a str> {
        let label = format!("service=\"{service}\"");
        out.lines().filter(|l| l.contains(&label)).collect()
    }

    #[test]
    fn series_follow_traffic_and_trouble_not_the_catalog() {
        let table = services();
        let unrouted = ServiceMetrics::default();
        let mut out = String::new();
        write_table(&mut out, &table, &unrouted, |_| 0);
        assert!(lines_of(&out, "idle").is_empty(), "{out}");
        assert!(lines_of(&out, "busy").is_empty(), "{out}");
        assert!(lines_of(&out, "unknown").is_empty(), "{out}");
        for (svc, want) in [
            ("half", [1, 0, 1, 1, 1]),
            ("down", [0, 1, 0, 1, 0]),
            ("unread", [0, 0, 0, 0, 0]),
        ] {
            for (state, n) in INSTANCE_STATES.iter().zip(want) {
                let line =
                    format!("consul_router_instances{{service=\"{svc}\",state=\"{state}\"}} {n}\n");
                assert!(out.contains(&line), "{line}{out}");
            }
        }
        for line in [
            "consul_router_services 5\n",
            "consul_router_services_unroutable 2\n",
            "consul_router_table_instances{state=\"passing\"} 4\n",
            "consul_router_table_instances{state=\"critical\"} 1\n",
            "consul_router_table_instances{state=\"not_routable\"} 2\n",
            "consul_router_table_instances{state=\"routable\"} 4\n",
        ] {
            assert!(out.contains(line), "{line}{out}");
        }
        assert!(!out.contains("consul_router_requests_total"), "{out}");

        // A request makes a service's series appear, with its instances.
        let busy = table.services["busy"].stats.metrics.get();
        busy.count(200);
        busy.duration.record(std::time::Duration::from_millis(2));
        unrouted.count(404);
        let mut out = String::new();
        write_table(&mut out, &table, &unrouted, |_| 0);
        let busy = lines_of(&out, "busy");
        assert!(busy.contains(&"consul_router_instances{service=\"busy\",state=\"routable\"} 1"));
        assert!(busy.contains(&"consul_router_requests_total{service=\"busy\",code=\"2xx\"} 1"));
        assert!(busy.contains(&"consul_router_retries_total{service=\"busy\"} 0"));
        assert!(out.contains("consul_router_requests_total{service=\"unknown\",code=\"4xx\"} 1\n"));
        assert!(lines_of(&out, "idle").is_empty(), "{out}");
        // Every family once.
        let mut types: Vec<&str> = out.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let n = types.len();
        types.dedup();
        assert_eq!(types.len(), n, "{out}");
    }

    #[test]
    fn a_service_named_unknown_keeps_the_label() {
        let table = table(vec![("unknown", vec![spec("u1", 1, Health::Passing, &[])])]);
        table.services["unknown"].stats.metrics.get().count(200);
        let unrouted = ServiceMetrics::default();
        unrouted.count(404);
        let mut out = String::new();
        write_table(&mut out, &table, &unrouted, |_| 0);
        let samples: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        let mut names: Vec<&str> = samples
            .iter()
            .filter_map(|l| l.rsplit_once(' ').map(|(k, _)| k))
            .collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "no series twice: {out}");
        assert!(out.contains("consul_router_requests_total{service=\"unknown\",code=\"2xx\"} 1"));
        assert!(!out.contains("code=\"4xx\""), "{out}");
    }

    #[test]
    fn ejections_show_for_the_services_that_had_one() {
        let table = services();
        let unrouted = ServiceMetrics::default();
        let mut out = String::new();
        write_table(&mut out, &table, &unrouted, |_| 0);
        assert!(!out.contains("outlier"), "{out}");
        let i2 = &table.services["idle"].instances[1];
        i2.state
            .outlier
            .eject(0, &crate::upstream::OutlierRules::default());
        let mut out = String::new();
        write_table(&mut out, &table, &unrouted, |_| 1_000);
        assert!(
            out.contains("consul_router_outlier_ejected_instances{service=\"idle\"} 1\n"),
            "{out}"
        );
        assert!(out.contains(
            "consul_router_outlier_ejections_total{service=\"idle\",instance=\"i2\"} 1\n"
        ));
        assert_eq!(out.matches("outlier_ejections_total{").count(), 1, "{out}");
        // Back: the gauge says 0, the counter stays.
        let mut out = String::new();
        write_table(&mut out, &table, &unrouted, |_| 10_000_000);
        assert!(
            out.contains("consul_router_outlier_ejected_instances{service=\"idle\"} 0\n"),
            "{out}"
        );
    }
}
