//! Building a [`RoutingTable`] from discovered instances, off the request path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::balance::{hash_bytes, Picker, Strategy};

use super::table::{
    Health, Instance, InstanceSpec, InstanceState, NameMap, RoutingTable, Service, ServiceStats,
};

/// Tag that declares an extra host for the service.
pub const HOST_TAG: &str = "router.host=";
/// Tag that chooses the service's strategy.
pub const STRATEGY_TAG: &str = "router.strategy=";

/// What the build needs from the configuration.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Domain suffixes (already normalised).
    pub domains: Vec<String>,
    /// Strategy when the tags name none.
    pub default_strategy: Strategy,
    /// Whether warning instances are routable.
    pub include_warning: bool,
    /// Idle connections kept per instance.
    pub max_idle_per_instance: usize,
}

/// State kept across rebuilds, so counters, in-flight counts and idle connections survive a
/// change in Consul. Owned by the rebuilder alone.
#[derive(Debug)]
pub struct StateRegistry {
    instances: HashMap<(String, String, u16), Arc<InstanceState>>,
    services: HashMap<String, Arc<ServiceStats>>,
    warned: HashSet<String>,
    epoch: Instant,
    generation: u64,
}

impl Default for StateRegistry {
    fn default() -> Self {
        StateRegistry {
            instances: HashMap::new(),
            services: HashMap::new(),
            warned: HashSet::new(),
            epoch: Instant::now(),
            generation: 0,
        }
    }
}

impl StateRegistry {
    /// Usage stats of every known service (for choosing which to watch closely).
    pub fn service_stats(&self) -> impl Iterator<Item = (&str, &Arc<ServiceStats>)> {
        self.services.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// Whether `name` can be the single label before a domain: lowercase letters, digits, dashes.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Builds a table from `catalog` (service name → instances; an empty list is a known service
/// with no instance).
pub fn build(
    catalog: &BTreeMap<Arc<str>, Arc<[InstanceSpec]>>,
    opts: &BuildOptions,
    reg: &mut StateRegistry,
) -> RoutingTable {
    reg.generation += 1;
    let mut services = NameMap::with_capacity_and_hasher(catalog.len(), Default::default());
    let mut hosts: NameMap<Arc<Service>> = NameMap::default();
    let mut live_instances = HashSet::new();

    for (name, specs) in catalog {
        let strategy = choose_strategy(name, specs, opts.default_strategy, &mut reg.warned);
        let mut instances: Vec<Instance> = specs
            .iter()
            .map(|spec| {
                let key = (spec.id.clone(), spec.address.clone(), spec.port);
                let state = reg
                    .instances
                    .entry(key.clone())
                    .or_insert_with(|| Arc::new(InstanceState::new(opts.max_idle_per_instance)))
                    .clone();
                live_instances.insert(key);
                make_instance(spec, state)
            })
            .collect();
        let routable = |i: &Instance| {
            i.weight > 0
                && (i.health == Health::Passing
                    || (i.health == Health::Warning && opts.include_warning))
        };
        // Routable first, then by ID, so positions are stable between rebuilds.
        instances.sort_by(|a, b| {
            routable(b)
                .cmp(&routable(a))
                .then_with(|| a.id.cmp(&b.id))
                .then_with(|| a.node.cmp(&b.node))
        });
        let n_routable = instances.iter().filter(|i| routable(i)).count();
        let picker = Picker::new(strategy, &instances[..n_routable]);
        let stats = reg
            .services
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(ServiceStats::new(name, reg.epoch)))
            .clone();
        let mut own_hosts: Vec<Box<str>> = specs
            .iter()
            .flat_map(|s| s.tags.iter())
            .filter_map(|t| t.strip_prefix(HOST_TAG))
            .filter_map(normalize_host_tag)
            .collect();
        own_hosts.sort();
        own_hosts.dedup();
        let service = Arc::new(Service {
            name: name.as_ref().into(),
            hosts: own_hosts.clone().into_boxed_slice(),
            instances: instances.into_boxed_slice(),
            routable: n_routable,
            picker,
            stats,
        });
        for h in own_hosts {
            // Services are visited in name order, so the first claim wins deterministically.
            match hosts.get(&h) {
                Some(owner) => tracing::warn!(
                    host = %h, owner = %owner.name, ignored = %name,
                    "two services claim one host; the first by name keeps it"
                ),
                None => {
                    hosts.insert(h, service.clone());
                }
            }
        }
        services.insert(name.as_ref().into(), service);
    }

    reg.instances.retain(|k, _| live_instances.contains(k));
    reg.services.retain(|k, _| catalog.contains_key(k.as_str()));
    reg.warned.retain(|k| catalog.contains_key(k.as_str()));

    RoutingTable {
        services,
        hosts,
        domains: opts.domains.iter().map(|d| d.as_str().into()).collect(),
        ready: true,
        generation: reg.generation,
    }
}

fn make_instance(spec: &InstanceSpec, state: Arc<InstanceState>) -> Instance {
    let socket = spec
        .address
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, spec.port));
    let weight = match spec.health {
        Health::Passing => spec.weight_passing,
        Health::Warning => spec.weight_warning,
        Health::Critical => 0,
    };
    Instance {
        id: spec.id.as_str().into(),
        node: spec.node.as_str().into(),
        address: spec.address.as_str().into(),
        port: spec.port,
        socket,
        health: spec.health,
        weight,
        load: spec.load,
        // Service IDs are unique per agent only: the node makes the identity unique.
        id_hash: hash_bytes(spec.id.as_bytes()) ^ hash_bytes(spec.node.as_bytes()).rotate_left(17),
        state,
    }
}

fn normalize_host_tag(raw: &str) -> Option<Box<str>> {
    let mut buf = [0u8; super::MAX_HOST + 2];
    match super::normalize(raw.as_bytes(), &mut buf) {
        Ok(h) => Some(h.into()),
        Err(_) => {
            tracing::warn!(tag = raw, "ignoring malformed router.host tag");
            None
        }
    }
}

/// The strategy the instances' tags ask for. When they disagree, the most named wins (ties by
/// name order), and the disagreement is logged once until it changes.
fn choose_strategy(
    service: &str,
    specs: &[InstanceSpec],
    default: Strategy,
    warned: &mut HashSet<String>,
) -> Strategy {
    let mut votes: BTreeMap<Strategy, usize> = BTreeMap::new();
    for tag in specs.iter().flat_map(|s| s.tags.iter()) {
        if let Some(v) = tag.strip_prefix(STRATEGY_TAG) {
            match v.parse::<Strategy>() {
                Ok(s) => *votes.entry(s).or_default() += 1,
                Err(e) => tracing::warn!(service, tag = %tag, "ignoring tag: {e}"),
            }
        }
    }
    let chosen = votes
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(s, _)| *s)
        .unwrap_or(default);
    if votes.len() > 1 {
        if warned.insert(service.to_owned()) {
            tracing::warn!(service, chosen = %chosen, ?votes, "instances disagree on router.strategy");
        }
    } else {
        warned.remove(service);
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Exclude;

    pub(crate) fn spec(id: &str, port: u16, health: Health, tags: &[&str]) -> InstanceSpec {
        InstanceSpec {
            id: id.into(),
            node: "n1".into(),
            address: "127.0.0.1".into(),
            port,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            load: None,
            weight_passing: 1,
            weight_warning: 1,
            health,
        }
    }

    fn opts() -> BuildOptions {
        BuildOptions {
            domains: vec!["app.example.net".into()],
            default_strategy: Strategy::Random,
            include_warning: false,
            max_idle_per_instance: 4,
        }
    }

    fn catalog(entries: Vec<(&str, Vec<InstanceSpec>)>) -> BTreeMap<Arc<str>, Arc<[InstanceSpec]>> {
        entries
            .into_iter()
            .map(|(k, v)| (Arc::from(k), Arc::from(v)))
            .collect()
    }

    #[test]
    fn maps_domains_and_tag_hosts() {
        let c = catalog(vec![
            (
                "chat",
                vec![spec(
                    "chat-1",
                    1,
                    Health::Passing,
                    &["router.host=Chat.Example.COM"],
                )],
            ),
            ("Upper", vec![spec("u-1", 2, Health::Passing, &[])]),
        ]);
        let t = build(&c, &opts(), &mut StateRegistry::default());
        assert_eq!(&*t.lookup("chat.app.example.net").unwrap().name, "chat");
        assert_eq!(&*t.lookup("chat.example.com").unwrap().name, "chat");
        assert!(t.lookup("x.chat.app.example.net").is_none());
        assert!(t.lookup("app.example.net").is_none());
        assert!(t.lookup(".app.example.net").is_none());
        assert!(t.lookup("chatapp.example.net").is_none());
        // Only lowercase DNS labels map by domain.
        assert!(t.lookup("upper.app.example.net").is_none());
    }

    #[test]
    fn health_policy_and_order() {
        let c = catalog(vec![(
            "chat",
            vec![
                spec("c", 3, Health::Passing, &[]),
                spec("a", 1, Health::Critical, &[]),
                spec("b", 2, Health::Warning, &[]),
            ],
        )]);
        let mut reg = StateRegistry::default();
        let t = build(&c, &opts(), &mut reg);
        let s = t.lookup("chat.app.example.net").unwrap();
        assert_eq!(s.routable, 1);
        assert_eq!(&*s.routable()[0].id, "c");
        let mut o = opts();
        o.include_warning = true;
        let t = build(&c, &o, &mut reg);
        let s = t.lookup("chat.app.example.net").unwrap();
        let ids: Vec<_> = s.routable().iter().map(|i| &*i.id).collect();
        assert_eq!(ids, ["b", "c"]);
    }

    #[test]
    fn strategy_from_tags_deterministic() {
        let c = catalog(vec![(
            "chat",
            vec![
                spec("a", 1, Health::Passing, &["router.strategy=url-hash"]),
                spec("b", 2, Health::Passing, &["router.strategy=ip-hash"]),
            ],
        )]);
        let t = build(&c, &opts(), &mut StateRegistry::default());
        // A tie goes to the first in name order: ip-hash < url-hash.
        assert_eq!(t.services["chat"].strategy(), Strategy::IpHash);
    }

    #[test]
    fn state_survives_rebuilds_and_is_dropped_with_the_instance() {
        let mut reg = StateRegistry::default();
        let c1 = catalog(vec![("chat", vec![spec("a", 1, Health::Passing, &[])])]);
        let t1 = build(&c1, &opts(), &mut reg);
        let s1 = t1.services["chat"].routable()[0].state.clone();
        let t2 = build(&c1, &opts(), &mut reg);
        assert!(Arc::ptr_eq(&s1, &t2.services["chat"].routable()[0].state));
        assert!(t2.generation > t1.generation);
        build(&catalog(vec![]), &opts(), &mut reg);
        assert!(reg.instances.is_empty());
    }

    #[test]
    fn same_service_id_on_two_nodes_are_two_instances() {
        let mut a = spec("web", 1, Health::Passing, &["router.strategy=url-hash"]);
        let mut b = a.clone();
        a.node = "n1".into();
        b.node = "n2".into();
        b.port = 2;
        let t = build(
            &catalog(vec![("web", vec![a, b])]),
            &opts(),
            &mut StateRegistry::default(),
        );
        let s = &t.services["web"];
        assert_ne!(s.routable()[0].id_hash, s.routable()[1].id_hash);
        let hits = (0..200u64)
            .filter(|k| {
                s.pick(
                    crate::balance::hash_bytes(&k.to_le_bytes()),
                    Exclude::default(),
                )
                .unwrap()
                .0 == 0
            })
            .count();
        assert!(
            (50..150).contains(&hits),
            "url-hash should use both: {hits}"
        );
    }

    #[test]
    fn known_service_without_instances_is_kept() {
        let c = catalog(vec![("chat", vec![])]);
        let t = build(&c, &opts(), &mut StateRegistry::default());
        let s = t.lookup("chat.app.example.net").unwrap();
        assert!(s.pick(0, Exclude::default()).is_none());
    }
}
