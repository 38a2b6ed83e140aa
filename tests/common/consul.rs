//! A real `consul agent -dev` of the test's own, on free loopback ports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};

use consul_router::config::{Config, Overrides};
use consul_router::consul::types::{Registration, TtlCheck, Weights};
use consul_router::consul::ConsulClient;

use super::client::{open, send_on};
use super::net::free_port;

/// Where the `consul` binary is: $CONSUL_BIN, the cache scripts/get-consul.sh fills, or PATH.
pub fn consul_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CONSUL_BIN") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("CONSUL_ROUTER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/consul-router")
        });
    let version = std::env::var("CONSUL_VERSION").unwrap_or_else(|_| "v1.22.3".into());
    let cached = cache.join(format!("consul-{version}")).join("consul");
    if cached.exists() {
        return cached;
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("consul");
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "these tests need a real Consul agent and no `consul` binary was found.\n\
         Build one from the Go module proxy with `scripts/get-consul.sh` (cached in \
         ~/.cache/consul-router), or set CONSUL_BIN=/path/to/consul. `scripts/test.sh` does this for you."
    );
}

/// A `consul agent -dev` of our own; killed on drop.
pub struct ConsulAgent {
    child: Option<Child>,
    pub http_port: u16,
    ports: [u16; 3],
    node: String,
    pub client: ConsulClient,
}

impl ConsulAgent {
    /// A dev agent on free ports. Ports are found free and then released, so a test
    /// running beside may take one first: an agent that exits, or has no leader in time,
    /// is tried again on other ports.
    pub async fn start() -> ConsulAgent {
        for limit in [30, 30, 60] {
            let ports = [free_port(), free_port(), free_port()];
            let limit = Duration::from_secs(limit);
            if let Some(agent) = Self::try_start_on(free_port(), ports, limit).await {
                return agent;
            }
        }
        panic!("no consul dev agent got a leader in 3 tries");
    }

    /// A dev agent whose HTTP API is on `http_port` (a port the test chose, say one a router
    /// already points at), its other ports free.
    pub async fn start_at(http_port: u16) -> ConsulAgent {
        Self::start_on(http_port, [free_port(), free_port(), free_port()]).await
    }

    async fn start_on(http_port: u16, ports: [u16; 3]) -> ConsulAgent {
        Self::try_start_on(http_port, ports, Duration::from_secs(60))
            .await
            .expect("timed out waiting for consul leader")
    }

    /// Starts an agent and waits up to `limit` for its leader (generous: a loaded 2-core
    /// machine starting several dev agents at once is slow); `None` if it exited first or
    /// had none by then (it is killed).
    async fn try_start_on(http_port: u16, ports: [u16; 3], limit: Duration) -> Option<ConsulAgent> {
        let node = format!("t{http_port}");
        let child = Command::new(consul_bin())
            .args([
                "agent",
                "-dev",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
            ])
            .args(["-http-port", &http_port.to_string()])
            .args(["-server-port", &ports[0].to_string()])
            .args(["-serf-lan-port", &ports[1].to_string()])
            .args(["-serf-wan-port", &ports[2].to_string()])
            .args([
                "-dns-port",
                "-1",
                "-grpc-port",
                "-1",
                "-hcl",
                "ports { grpc_tls = -1 }",
            ])
            .args(["-node", &node, "-log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start consul agent");
        let client = ConsulClient::new(&consul_config(http_port)).expect("consul client");
        let mut agent = ConsulAgent {
            child: Some(child),
            http_port,
            ports,
            node,
            client,
        };
        let deadline = Instant::now() + limit;
        loop {
            let up = agent.client.leader().await.is_ok_and(|l| !l.is_empty())
                && agent
                    .client
                    .health_service("consul", 0, Duration::ZERO)
                    .await
                    .is_ok();
            if up {
                return Some(agent);
            }
            let exited = agent
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                eprintln!("consul dev agent on port {http_port}: no leader (exited: {exited})");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Kills the agent (all its state is in memory, so it is gone).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a fresh agent on the same ports.
    pub async fn restart(&mut self) {
        self.kill();
        let fresh = Self::start_on(self.http_port, self.ports).await;
        *self = fresh;
    }

    /// Registers `id` of service `name` at 127.0.0.1:`port`.
    pub async fn register(&self, name: &str, id: &str, port: u16, tags: &[&str]) {
        self.register_with(Registration {
            id: id.into(),
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            address: "127.0.0.1".into(),
            port,
            ..Default::default()
        })
        .await;
    }

    /// Registers with a TTL check (initially `status`) named `<id>-ttl`.
    pub async fn register_ttl(&self, name: &str, id: &str, port: u16, status: &str) {
        self.register_with(Registration {
            id: id.into(),
            name: name.into(),
            address: "127.0.0.1".into(),
            port,
            check: Some(TtlCheck {
                check_id: format!("{id}-ttl"),
                ttl: "10m".into(),
                status: status.into(),
                deregister_after: None,
            }),
            ..Default::default()
        })
        .await;
    }

    pub async fn register_meta(
        &self,
        name: &str,
        id: &str,
        port: u16,
        meta: &[(&str, &str)],
        weights: Option<(u32, u32)>,
    ) {
        self.register_with(Registration {
            id: id.into(),
            name: name.into(),
            address: "127.0.0.1".into(),
            port,
            meta: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            weights: weights.map(|(passing, warning)| Weights { passing, warning }),
            ..Default::default()
        })
        .await;
    }

    pub async fn register_with(&self, reg: Registration) {
        self.client.register(&reg).await.expect("register");
    }

    /// Registers through the catalog API (`PUT /v1/catalog/register`), as a host's agent
    /// would for its node: each body names a node (any name and address, with no agent
    /// behind it) and a service and checks, or node checks. Sent in order on one keep-alive
    /// connection.
    pub async fn catalog_register(&self, bodies: &[serde_json::Value]) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.http_port));
        let mut sender = open(addr).await;
        for body in bodies {
            let req = Request::put("/v1/catalog/register")
                .header("host", "consul")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            sender.ready().await.expect("consul connection");
            let got = send_on(&mut sender, req, Duration::from_secs(30)).await;
            assert_eq!(got.status, StatusCode::OK, "catalog register: {}", got.body);
        }
    }

    pub async fn set_check(&self, id: &str, status: &str) {
        self.client
            .update_check(&format!("{id}-ttl"), status, "set by test")
            .await
            .expect("update check");
    }

    pub async fn deregister(&self, id: &str) {
        self.client.deregister(id).await.expect("deregister");
    }
}

impl Drop for ConsulAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn consul_config(http_port: u16) -> consul_router::config::ConsulConfig {
    let o = Overrides {
        consul: Some(format!("http://127.0.0.1:{http_port}")),
        ..Default::default()
    };
    Config::from_file(Default::default(), &o).unwrap().consul
}
