//! Many cold services on a few nodes: the first table and the sweep read them in bulk, with
//! requests per node rather than per service. The only test in its binary, so the process's
//! request counters are this router's alone.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use serde_json::{json, Value};

/// Nodes registered through the catalog API; the dev agent's own node makes one more.
const NODES: usize = 3;
const SERVICES: usize = 300;

/// Instance `k` (0 or 1) of service `i`, on node `(i + k) % NODES`, with a passing check.
fn instance(i: usize, k: usize, port: u16, load: &str) -> Value {
    let node = (i + k) % NODES;
    let id = format!("svc{i:03}-{k}");
    json!({
        "Node": format!("host{node}"), "Address": format!("127.0.1.{node}"), "SkipNodeUpdate": true,
        "Service": {"ID": id, "Service": format!("svc{i:03}"), "Address": "127.0.0.1",
                    "Port": port, "Meta": {"load": load}},
        "Checks": [{"CheckID": format!("{id}-alive"), "Name": "alive", "Status": "passing",
                    "ServiceID": id}],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_services_are_read_per_node_at_start_and_by_the_sweep() {
    let consul = ConsulAgent::start().await;
    let backend = Backend::start("any").await;
    // A node check on each node; host2's is critical, so its instances are too.
    let nodes: Vec<Value> = (0..NODES)
        .map(|n| {
            let status = if n == 2 { "critical" } else { "passing" };
            json!({"Node": format!("host{n}"), "Address": format!("127.0.1.{n}"),
                   "Check": {"CheckID": "host-alive", "Name": "host", "Status": status}})
        })
        .collect();
    consul.catalog_register(&nodes).await;
    let bodies: Vec<Value> = (0..SERVICES)
        .flat_map(|i| (0..2).map(move |k| (i, k)))
        .map(|(i, k)| instance(i, k, backend.port(), "1"))
        .collect();
    consul.catalog_register(&bodies).await;

    let toml = "[consul]\nmax_watches = 4\nsweep_interval = \"8s\"";
    let t0 = Instant::now();
    let router = start_router(&consul.addr(), toml).await;
    let live = t0.elapsed();

    // Every service is in the first table, with both instances; those on host2 are critical
    // by their node's check, the others passing.
    let table = routes(router.admin_addr).await;
    assert_eq!(table.len(), SERVICES, "every service is routed");
    for route in &table {
        let instances = route["instances"].as_array().expect("instances");
        assert_eq!(instances.len(), 2, "{route}");
        for inst in instances {
            let want = if inst["node"] == "host2" {
                "critical"
            } else {
                "passing"
            };
            assert_eq!(inst["health"], want, "{inst}");
        }
        assert!(instances.iter().any(|i| i["routable"] == true), "{route}");
    }
    for i in [0, 150, SERVICES - 1] {
        let g = get(router.proxy_addr, &format!("svc{i:03}.app.test"), "/").await;
        assert_eq!(g.status, StatusCode::OK, "svc{i:03}");
    }

    // The cold services were read once, per node: no second bulk read, no single reads but
    // the watches'. The health feed blocks from the bulk read's checks answer rather than
    // downloading it again, so it has no answer of its own while nothing changes. That is
    // an absence, with no event to wait on: a second's window lets any request that would
    // follow the first table (a second bulk read, the feed's own download) be counted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = metrics(router.admin_addr).await;
    let count = |endpoint| consul_requests(&text, endpoint);
    let start = [
        count("catalog_nodes"),
        count("node_services"),
        count("health_state"),
        count("health_service"),
    ];
    eprintln!(
        "first table live after {live:?} for {SERVICES} services x 2 on {NODES}+1 nodes; \
         requests: catalog_nodes {}, node_services {}, health_state {}, health_service {}",
        start[0], start[1], start[2], start[3]
    );
    assert_eq!(start[0], 1, "one bulk read");
    assert_eq!(start[2], 1, "the checks, read once");
    assert_eq!(start[1], NODES as u64 + 1, "one read per node");
    assert!(start[3] < 30, "{} single reads", start[3]);
    assert!(
        live < Duration::from_secs(8),
        "live by its reads, not the deadline"
    );

    // A Meta-only change on a cold service shows in no feed: the sweep's bulk read finds it.
    let watched = router.watched_services();
    let cold = (1..SERVICES)
        .find(|i| !watched.contains(&format!("svc{i:03}")) && *i != 150)
        .expect("a cold service");
    consul
        .catalog_register(&[instance(cold, 0, backend.port(), "42")])
        .await;
    let changed = Instant::now();
    let id = format!("svc{cold:03}-0");
    wait_until(Duration::from_secs(15), "meta via the sweep", || async {
        routes(router.admin_addr).await.iter().any(|r| {
            r["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["id"] == id.as_str() && i["load"] == 42.0)
        })
    })
    .await;
    let text = metrics(router.admin_addr).await;
    let count = |endpoint| consul_requests(&text, endpoint);
    eprintln!(
        "meta change seen after {:?}; requests: catalog_nodes {}, node_services {}, \
         health_state {}, health_service {}",
        changed.elapsed(),
        count("catalog_nodes"),
        count("node_services"),
        count("health_state"),
        count("health_service")
    );
    assert!(count("catalog_nodes") >= 2, "the sweep read in bulk");
    assert_eq!(
        count("node_services"),
        count("catalog_nodes") * (NODES as u64 + 1)
    );
    // The sweep read 296 cold services; single reads stay those of a few watches.
    assert!(
        count("health_service") < start[3] + 30,
        "{} single reads",
        count("health_service")
    );
    router.shutdown().await;
}
