//! The parts of Consul's JSON we read and write.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::routing::{Health, InstanceSpec};

/// One entry of `/v1/health/service/<name>`.
#[derive(Debug, Clone, Deserialize)]
pub struct HealthEntry {
    /// The node the instance runs on.
    #[serde(rename = "Node")]
    pub node: Node,
    /// The registration.
    #[serde(rename = "Service")]
    pub service: AgentService,
    /// Node and service checks.
    #[serde(rename = "Checks", default)]
    pub checks: Vec<Check>,
}

/// A Consul node, as `/v1/health/service/<name>`, `/v1/catalog/nodes` and
/// `/v1/catalog/node-services/<node>` return it.
#[derive(Debug, Clone, Deserialize)]
pub struct Node {
    /// Node name.
    #[serde(rename = "Node")]
    pub name: String,
    /// Node address.
    #[serde(rename = "Address")]
    pub address: String,
}

/// `/v1/catalog/node-services/<node>`: a node and every service instance registered on it.
/// Both are null when the node is gone.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeServices {
    /// The node; `None` when it is not (or no longer) in the catalog.
    #[serde(rename = "Node", default)]
    pub node: Option<Node>,
    /// Its service instances.
    #[serde(rename = "Services", default)]
    pub services: Option<Vec<AgentService>>,
}

/// A service registration as the catalog returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct AgentService {
    /// Service ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    #[serde(rename = "Service")]
    pub service: String,
    /// Tags.
    #[serde(rename = "Tags", default)]
    pub tags: Option<Vec<String>>,
    /// Address; empty means the node's.
    #[serde(rename = "Address", default)]
    pub address: String,
    /// Port.
    #[serde(rename = "Port", default)]
    pub port: u16,
    /// Meta; `load` is read from here.
    #[serde(rename = "Meta", default)]
    pub meta: Option<HashMap<String, String>>,
    /// Weights (default 1/1).
    #[serde(rename = "Weights", default)]
    pub weights: Option<Weights>,
}

/// Consul's weights per health state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Weights {
    /// Weight while passing.
    #[serde(rename = "Passing")]
    pub passing: u32,
    /// Weight while warning.
    #[serde(rename = "Warning")]
    pub warning: u32,
}

/// A health check.
#[derive(Debug, Clone, Deserialize)]
pub struct Check {
    /// Node name.
    #[serde(rename = "Node", default)]
    pub node: String,
    /// Check ID.
    #[serde(rename = "CheckID", default)]
    pub check_id: String,
    /// passing, warning, critical (maintenance is critical).
    #[serde(rename = "Status", default)]
    pub status: String,
    /// Service ID; empty for node checks.
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    /// Service name; empty for node checks.
    #[serde(rename = "ServiceName", default)]
    pub service_name: String,
}

/// `PUT /v1/agent/service/register` body (for `announce` and tests).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Registration {
    /// Service ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    #[serde(rename = "Name")]
    pub name: String,
    /// Tags.
    #[serde(rename = "Tags")]
    pub tags: Vec<String>,
    /// Address.
    #[serde(rename = "Address")]
    pub address: String,
    /// Port.
    #[serde(rename = "Port")]
    pub port: u16,
    /// Meta.
    #[serde(rename = "Meta")]
    pub meta: HashMap<String, String>,
    /// Weights, if not 1/1.
    #[serde(rename = "Weights", skip_serializing_if = "Option::is_none")]
    pub weights: Option<Weights>,
    /// A TTL check, if any.
    #[serde(rename = "Check", skip_serializing_if = "Option::is_none")]
    pub check: Option<TtlCheck>,
    /// Checks of any kind (TTL, HTTP, TCP), registered with the service.
    #[serde(rename = "Checks", skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<ServiceCheck>,
}

/// A TTL check definition.
#[derive(Debug, Clone, Serialize)]
pub struct TtlCheck {
    /// Check ID.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// TTL such as "30s".
    #[serde(rename = "TTL")]
    pub ttl: String,
    /// Initial status.
    #[serde(rename = "Status")]
    pub status: String,
    /// Remove the service after this long critical, e.g. "1m".
    #[serde(
        rename = "DeregisterCriticalServiceAfter",
        skip_serializing_if = "Option::is_none"
    )]
    pub deregister_after: Option<String>,
}

/// A check registered with a service: its kind, and what Consul does with it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceCheck {
    /// Check ID, unique on the agent.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// Name shown in the UI.
    #[serde(rename = "Name")]
    pub name: String,
    /// Who runs the check and how.
    #[serde(flatten)]
    pub kind: CheckKind,
    /// Initial status; Consul's default is critical.
    #[serde(rename = "Status", skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Remove the service after this long critical, e.g. "1m" (Consul's minimum).
    #[serde(
        rename = "DeregisterCriticalServiceAfter",
        skip_serializing_if = "Option::is_none"
    )]
    pub deregister_after: Option<String>,
}

/// The kind of a [`ServiceCheck`]; durations are Go duration strings such as "10s".
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum CheckKind {
    /// Passed by the registrant through `/v1/agent/check/update`; critical after `TTL`.
    Ttl {
        /// How long a pass lasts.
        #[serde(rename = "TTL")]
        ttl: String,
    },
    /// The agent GETs the URL; 2xx passes, 429 warns, anything else fails.
    Http {
        /// The URL.
        #[serde(rename = "HTTP")]
        url: String,
        /// Time between two runs.
        #[serde(rename = "Interval")]
        interval: String,
        /// Time a run may take.
        #[serde(rename = "Timeout")]
        timeout: String,
    },
    /// The agent opens a TCP connection to `host:port`.
    Tcp {
        /// `host:port`.
        #[serde(rename = "TCP")]
        address: String,
        /// Time between two runs.
        #[serde(rename = "Interval")]
        interval: String,
        /// Time a run may take.
        #[serde(rename = "Timeout")]
        timeout: String,
    },
}

/// The health that one `/v1/health/state/any` answer gives each node (its own checks, empty
/// `ServiceID`) and each service instance on a node (its checks), the worst check winning.
#[derive(Debug, Default)]
pub struct CheckIndex<'a> {
    nodes: HashMap<&'a str, Health>,
    instances: HashMap<(&'a str, &'a str), Health>,
}

impl<'a> CheckIndex<'a> {
    /// Indexes `checks`.
    pub fn new(checks: &'a [Check]) -> Self {
        let mut index = CheckIndex::default();
        for c in checks {
            let health = Health::from_consul(&c.status);
            let worst = if c.service_id.is_empty() {
                index.nodes.entry(&c.node).or_insert(Health::Passing)
            } else {
                let key = (c.node.as_str(), c.service_id.as_str());
                index.instances.entry(key).or_insert(Health::Passing)
            };
            *worst = (*worst).max(health);
        }
        index
    }

    /// An instance's health: the worst of its node's checks and its own.
    fn health(&self, node: &str, service_id: &str) -> Health {
        let own = self.nodes.get(node).copied().unwrap_or(Health::Passing);
        let its = self.instances.get(&(node, service_id)).copied();
        own.max(its.unwrap_or(Health::Passing))
    }
}

/// Every instance of one `/v1/catalog/node-services/<node>` answer, with its service's name
/// and the health `checks` give it: the same spec `/v1/health/service/<name>` would give.
/// A node that is gone (`Node` null) has none. The answer is consumed, so a bulk read holds
/// one node's raw answer at a time.
pub fn node_instances(
    answer: NodeServices,
    checks: &CheckIndex<'_>,
) -> Vec<(String, InstanceSpec)> {
    let Some(node) = answer.node else {
        return Vec::new();
    };
    answer
        .services
        .unwrap_or_default()
        .into_iter()
        .map(|service| {
            let health = checks.health(&node.name, &service.id);
            let spec = spec(&node, &service, health);
            (service.service, spec)
        })
        .collect()
}

/// The routing layer's instance: empty address means the node's, `Meta.load` parsed when it
/// is a finite, non-negative number.
fn spec(node: &Node, service: &AgentService, health: Health) -> InstanceSpec {
    let address = if service.address.is_empty() {
        node.address.clone()
    } else {
        service.address.clone()
    };
    let load = service
        .meta
        .as_ref()
        .and_then(|m| m.get("load"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0);
    let w = service.weights.unwrap_or(Weights {
        passing: 1,
        warning: 1,
    });
    InstanceSpec {
        id: service.id.clone(),
        node: node.name.clone(),
        address,
        port: service.port,
        tags: service.tags.clone().unwrap_or_default(),
        load,
        weight_passing: w.passing,
        weight_warning: w.warning,
        health,
    }
}

impl HealthEntry {
    /// Converts to the routing layer's instance; the worst check wins.
    pub fn to_spec(&self) -> InstanceSpec {
        let health = self
            .checks
            .iter()
            .map(|c| Health::from_consul(&c.status))
            .max()
            .unwrap_or(Health::Passing);
        spec(&self.node, &self.service, health)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: &str = r#"[{
      "Node": {"ID": "x", "Node": "n1", "Address": "10.0.0.5", "Datacenter": "dc1"},
      "Service": {"ID": "chat-1", "Service": "chat", "Tags": ["router.strategy=ip-hash"],
                  "Address": "", "Port": 8081, "Meta": {"load": "0.75"},
                  "Weights": {"Passing": 3, "Warning": 1}},
      "Checks": [
        {"Node": "n1", "CheckID": "serfHealth", "Status": "passing", "ServiceID": "", "ServiceName": ""},
        {"Node": "n1", "CheckID": "service:chat-1", "Status": "warning", "ServiceID": "chat-1", "ServiceName": "chat"}
      ]
    }]"#;

    #[test]
    fn parses_health_entries() {
        let entries: Vec<HealthEntry> = serde_json::from_str(ENTRY).unwrap();
        let s = entries[0].to_spec();
        assert_eq!(
            s.address, "10.0.0.5",
            "empty Service.Address means the node's"
        );
        assert_eq!(s.port, 8081);
        assert_eq!(s.health, Health::Warning);
        assert_eq!(s.load, Some(0.75));
        assert_eq!((s.weight_passing, s.weight_warning), (3, 1));
        assert_eq!(s.tags, vec!["router.strategy=ip-hash"]);
    }

    fn check(node: &str, id: &str, status: &str, service: (&str, &str)) -> serde_json::Value {
        serde_json::json!({"Node": node, "CheckID": id, "Status": status,
                           "ServiceID": service.0, "ServiceName": service.1})
    }

    fn node(name: &str, services: serde_json::Value) -> NodeServices {
        let v = serde_json::json!({
            "Node": {"Node": name, "Address": "10.0.0.2"},
            "Services": services
        });
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn node_answers_and_checks_make_what_health_service_returns() {
        let svc = |id: &str, name: &str| serde_json::json!({"ID": id, "Service": name, "Port": 80, "Meta": {"load": "2"}});
        // Given in reverse name order: Consul lists a service's entries by node name.
        let nodes = vec![
            node("n2", serde_json::json!([svc("chat-1", "chat")])),
            node(
                "n1",
                serde_json::json!([svc("chat-1", "chat"), svc("mail-1", "mail")]),
            ),
            // A node gone between the node list and its own read.
            serde_json::from_str(r#"{"Node": null, "Services": null}"#).unwrap(),
        ];
        let checks: Vec<Check> = serde_json::from_value(serde_json::json!([
            check("n1", "serfHealth", "passing", ("", "")),
            check("n2", "serfHealth", "passing", ("", "")),
            check("n2", "maintenance", "critical", ("", "")),
            check("n1", "c1", "warning", ("chat-1", "chat")),
            // Same service ID on another node: n2's own, not n1's.
            check("n2", "c1", "passing", ("chat-1", "chat")),
            check("n1", "m1", "passing", ("mail-1", "mail")),
            // A check whose instance no node answer has (it left in between): ignored.
            check("n3", "x", "critical", ("chat-9", "chat")),
        ]))
        .unwrap();
        let index = CheckIndex::new(&checks);
        let got: Vec<(String, InstanceSpec)> = nodes
            .into_iter()
            .flat_map(|n| node_instances(n, &index))
            .collect();
        let of = |svc: &str, node: &str| {
            got.iter()
                .find(|(s, i)| s == svc && i.node == node)
                .map(|(_, i)| i.clone())
                .expect("instance")
        };
        assert_eq!(got.len(), 3, "a gone node has none");
        // A node check counts for every instance on its node.
        assert_eq!(of("chat", "n1").health, Health::Warning);
        assert_eq!(of("chat", "n2").health, Health::Critical);
        assert_eq!(of("mail", "n1").health, Health::Passing);

        // The same instance read through /v1/health/service gives the same spec.
        let direct: Vec<HealthEntry> = serde_json::from_value(serde_json::json!([{
            "Node": {"Node": "n1", "Address": "10.0.0.2"},
            "Service": svc("chat-1", "chat"),
            "Checks": [check("n1", "serfHealth", "passing", ("", "")),
                       check("n1", "c1", "warning", ("chat-1", "chat"))]
        }]))
        .unwrap();
        assert_eq!(direct[0].to_spec(), of("chat", "n1"));
    }

    #[test]
    fn bad_load_is_ignored() {
        let text = ENTRY.replace("0.75", "NaN");
        let entries: Vec<HealthEntry> = serde_json::from_str(&text).unwrap();
        assert_eq!(entries[0].to_spec().load, None);
    }
}
