//! Building a [`RoutingTable`] from discovered instances, off the request path.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::balance::{hash_bytes, Picker, Strategy};
use crate::config::{Expose, StaticService};

use super::access::Access;
use super::table::{
    FailureStatuses, Health, Instance, InstanceSpec, InstanceState, NameMap, Proto, RoutingTable,
    Service, ServiceStats,
};

/// Tag that declares an extra host for the service.
pub const HOST_TAG: &str = "router.host=";
/// Tag that chooses the service's strategy.
pub const STRATEGY_TAG: &str = "router.strategy=";
/// Tag that exposes (`true`) or hides (any other value) the service.
pub const EXPOSE_TAG: &str = "router.expose=";
/// Tag prefix naming the protocol an instance is spoken to in: `h2c`, `h2` (`http1` is the
/// default).
pub const PROTO_TAG: &str = "router.proto=";

/// Tag naming the response statuses that count as an instance's failure: `all`, `none`,
/// or 5xx codes (`502,503,504` without it).
pub const OUTLIER_5XX_TAG: &str = "router.outlier-5xx=";
/// Tag bounding the hash strategies' load: an instance over this percent of the average
/// in-flight count passes keys on (at least 100; off without it).
pub const BALANCE_FACTOR_TAG: &str = "router.hash-balance-factor=";

/// Each service's tags as `/v1/catalog/services` lists them (the union over its instances).
pub type CatalogTags = HashMap<String, Vec<String>>;

/// Service name → instances, as `build` takes them.
type Catalog = BTreeMap<Arc<str>, Arc<[InstanceSpec]>>;

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
    /// Services never routed, whatever their tags (lowercase; compared case-insensitively).
    pub exclude_services: Vec<String>,
    /// Whether untagged services are routed.
    pub expose: Expose,
    /// `[[static_services]]`, merged into every table.
    pub static_services: Arc<[StaticService]>,
    /// How long a host-name instance address stays resolved.
    pub dns_ttl: Duration,
}

impl BuildOptions {
    /// Whether `service` is in `exclude_services`.
    pub fn is_excluded(&self, service: &str) -> bool {
        self.exclude_services
            .iter()
            .any(|x| x.eq_ignore_ascii_case(service))
    }
}

/// State kept across rebuilds, so counters, in-flight counts and idle connections survive a
/// change in Consul. Owned by the rebuilder alone.
#[derive(Debug)]
pub struct StateRegistry {
    instances: HashMap<(String, String, u16), Arc<InstanceState>>,
    services: HashMap<String, Arc<ServiceStats>>,
    warned: HashSet<String>,
    /// Services whose `router.expose=` value was neither true nor false, logged once.
    warned_expose: HashSet<String>,
    /// Instances with an unknown `router.proto=` or one that is not their service's,
    /// logged once.
    warned_proto: HashSet<(String, String, u16)>,
    /// (service, tag) pairs whose instances disagree, logged once until they agree.
    warned_tags: HashSet<(String, &'static str)>,
    epoch: Instant,
    generation: u64,
}

impl Default for StateRegistry {
    fn default() -> Self {
        StateRegistry {
            instances: HashMap::new(),
            services: HashMap::new(),
            warned: HashSet::new(),
            warned_expose: HashSet::new(),
            warned_proto: HashSet::new(),
            warned_tags: HashSet::new(),
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

/// Builds a table from `catalog` (service name → instances; an empty list is a known service
/// with no instance) and the static services. `catalog_tags` are the service list's tags,
/// which decide exposure and hosts before a service's instances have been read. Services not
/// exposed are left out entirely: their hosts are unknown (404) and they claim no
/// `router.host=` host.
pub fn build(
    catalog: &BTreeMap<Arc<str>, Arc<[InstanceSpec]>>,
    catalog_tags: &CatalogTags,
    opts: &BuildOptions,
    reg: &mut StateRegistry,
) -> RoutingTable {
    let consul = catalog;
    let mut odd_expose = HashSet::new();
    let merged;
    let (catalog, statics) = if opts.static_services.is_empty() {
        (catalog, HashMap::new())
    } else {
        let (m, statics) = with_static(catalog, catalog_tags, opts, &mut odd_expose);
        merged = m;
        (&merged, statics)
    };
    reg.generation += 1;
    let mut services = NameMap::with_capacity_and_hasher(catalog.len(), Default::default());
    let mut hosts: NameMap<Arc<Service>> = NameMap::default();
    let mut live_instances = HashSet::new();

    for (name, specs) in catalog {
        let joined = statics.get(name.as_ref()).copied();
        // Consul's tags say nothing of a static service whose Consul part was left out.
        let tags = catalog_tags
            .get(name.as_ref())
            .map(Vec::as_slice)
            .filter(|_| joined != Some(false));
        let exposed = match joined {
            Some(_) => !opts.is_excluded(name),
            None => is_exposed(name, tags, specs, opts, &mut odd_expose),
        };
        if !exposed {
            continue;
        }
        // Not read yet (a restart): the service list's tags give its hosts meanwhile, so
        // they answer 503 until the instances arrive, not 404.
        let unread = consul.get(name).is_none_or(|s| s.is_empty());
        let early_hosts = tags.filter(|_| unread).unwrap_or_default();
        let service = make_service(name, specs, early_hosts, opts, reg, &mut live_instances);
        for h in service.hosts.iter() {
            // Services are visited in name order, so the first claim wins deterministically.
            match hosts.get(h) {
                Some(owner) => tracing::warn!(
                    host = %h, owner = %owner.name, ignored = %name,
                    "two services claim one host; the first by name keeps it"
                ),
                None => {
                    hosts.insert(h.clone(), service.clone());
                }
            }
        }
        services.insert(name.as_ref().into(), service);
    }
    // Auth services need not be exposed: those named by a routed service are built too,
    // reachable by name only (never by a host).
    let mut internal: NameMap<Arc<Service>> = NameMap::default();
    let asked: BTreeSet<Box<str>> = services
        .values()
        .filter_map(|s| s.access.as_ref()?.auth.as_ref())
        .map(|a| a.service.clone())
        .filter(|n| !services.contains_key(n))
        .collect();
    for name in asked {
        if opts.is_excluded(&name) {
            continue;
        }
        if let Some((name, specs)) = catalog.get_key_value(&*name) {
            let service = make_service(name, specs, &[], opts, reg, &mut live_instances);
            internal.insert(name.as_ref().into(), service);
        }
    }

    reg.instances.retain(|k, _| live_instances.contains(k));
    reg.services
        .retain(|k, _| services.contains_key(k.as_str()) || internal.contains_key(k.as_str()));
    reg.warned.retain(|k| services.contains_key(k.as_str()));
    reg.warned_proto.retain(|k| live_instances.contains(k));
    reg.warned_tags
        .retain(|(k, _)| services.contains_key(k.as_str()) || internal.contains_key(k.as_str()));
    for name in odd_expose.difference(&reg.warned_expose) {
        tracing::warn!(service = %name, "router.expose= is neither true nor false; the service is not routed");
    }
    reg.warned_expose = odd_expose;

    RoutingTable {
        services,
        hosts,
        internal,
        domains: opts.domains.iter().map(|d| d.as_str().into()).collect(),
        ready: true,
        generation: reg.generation,
    }
}

/// Whether `name` is routed. Excluded names never are. Otherwise each source of tags that
/// knows the service (the catalog's union, and the instances once read) must agree: any
/// `router.expose=` other than true hides it, and under `expose = "tagged"` each source needs
/// `router.expose=true` or a `router.host=` tag. The sources can disagree for a moment while
/// a tag changes: the service is hidden as soon as either one hides it.
fn is_exposed(
    name: &str,
    catalog_tags: Option<&[String]>,
    specs: &[InstanceSpec],
    opts: &BuildOptions,
    odd: &mut HashSet<String>,
) -> bool {
    if opts.is_excluded(name) {
        return false;
    }
    let from_catalog = catalog_tags.map(|t| TagMarks::of(t.iter()));
    // No instance means not read yet (or leaving): the catalog's tags decide alone.
    let from_instances =
        (!specs.is_empty()).then(|| TagMarks::of(specs.iter().flat_map(|s| s.tags.iter())));
    let mut known = false;
    for marks in [from_catalog, from_instances].into_iter().flatten() {
        known = true;
        if marks.odd {
            odd.insert(name.to_owned());
        }
        if marks.deny || (opts.expose == Expose::Tagged && !marks.allow) {
            return false;
        }
    }
    // A service nothing is known of yet: routed only when every service is.
    known || opts.expose == Expose::All
}

/// What one set of tags says about exposure.
#[derive(Debug, Default)]
struct TagMarks {
    /// `router.expose=true` or a `router.host=` tag with a value.
    allow: bool,
    /// `router.expose=` with any value but true.
    deny: bool,
    /// `router.expose=` with a value neither true nor false (counted as false: fail closed).
    odd: bool,
}

impl TagMarks {
    fn of<'a>(tags: impl Iterator<Item = &'a String>) -> TagMarks {
        let mut m = TagMarks::default();
        for tag in tags {
            if let Some(v) = tag.strip_prefix(EXPOSE_TAG) {
                let v = v.trim();
                if v.eq_ignore_ascii_case("true") {
                    m.allow = true;
                } else {
                    m.deny = true;
                    m.odd |= !v.eq_ignore_ascii_case("false");
                }
            } else if tag.len() > HOST_TAG.len() && tag.starts_with(HOST_TAG) {
                m.allow = true;
            }
        }
        m
    }
}

/// `catalog` with each static service's instances added, and each static name mapped to
/// whether Consul's instances of that name joined it. Configured, a static service is
/// exposed (unless in `exclude_services`); Consul's instances of the same name join it only
/// when Consul's service would be exposed on its own (its tags under `expose = "tagged"`, no
/// `router.expose=false`).
fn with_static<'a>(
    catalog: &Catalog,
    catalog_tags: &CatalogTags,
    opts: &'a BuildOptions,
    odd: &mut HashSet<String>,
) -> (Catalog, HashMap<&'a str, bool>) {
    let mut out = catalog.clone();
    let mut statics = HashMap::with_capacity(opts.static_services.len());
    for s in opts.static_services.iter() {
        let name = s.name.as_str();
        let tags = catalog_tags.get(name).map(Vec::as_slice);
        let listed = catalog.get(name).map_or(&[][..], |v| &v[..]);
        let joins =
            (!listed.is_empty() || tags.is_some()) && is_exposed(name, tags, listed, opts, odd);
        let from_consul = if joins { listed } else { &[] };
        let specs: Vec<InstanceSpec> = from_consul.iter().cloned().chain(static_specs(s)).collect();
        statics.insert(name, joins);
        out.insert(Arc::from(name), specs.into());
    }
    (out, statics)
}

/// A static service's instances as Consul would give them: always passing, exposed, with
/// its hosts and strategy as tags.
fn static_specs(s: &StaticService) -> impl Iterator<Item = InstanceSpec> + '_ {
    let mut tags = vec![format!("{EXPOSE_TAG}true")];
    tags.extend(s.hosts.iter().map(|h| format!("{HOST_TAG}{h}")));
    tags.extend(s.strategy.map(|st| format!("{STRATEGY_TAG}{st}")));
    s.instances.iter().map(move |i| InstanceSpec {
        // The service named: two static services on one backend keep their own state.
        id: format!("static:{}:{}:{}", s.name, i.host, i.port),
        node: "static".into(),
        address: i.host.clone(),
        port: i.port,
        tags: tags.clone(),
        load: None,
        weight_passing: i.weight,
        weight_warning: i.weight,
        health: Health::Passing,
    })
}

/// One service's snapshot: its instances (state reused through `reg`), routable first,
/// its picker, hosts (its instances' `router.host=` tags, and `early_hosts`' while none is
/// read) and access policy.
fn make_service(
    name: &Arc<str>,
    specs: &[InstanceSpec],
    early_hosts: &[String],
    opts: &BuildOptions,
    reg: &mut StateRegistry,
    live_instances: &mut HashSet<(String, String, u16)>,
) -> Arc<Service> {
    let strategy = choose_strategy(name, specs, opts.default_strategy, &mut reg.warned);
    let protos: Vec<Option<Proto>> = specs.iter().map(instance_proto).collect();
    let proto = service_proto(&protos);
    let mut instances: Vec<Instance> = specs
        .iter()
        .zip(&protos)
        .map(|(spec, &own)| {
            let key = (spec.id.clone(), spec.address.clone(), spec.port);
            let state = reg
                .instances
                .entry(key.clone())
                .or_insert_with(|| Arc::new(InstanceState::new(opts.max_idle_per_instance)))
                .clone();
            state.dns.set_ttl(opts.dns_ttl);
            let mut inst = make_instance(spec, state, own.unwrap_or(proto));
            if own != Some(proto) {
                // Fail closed: an unknown value may be a typo of `h2` (TLS), and a
                // protocol other than the service's cannot take its requests.
                inst.weight = 0;
                if reg.warned_proto.insert(key.clone()) {
                    tracing::warn!(
                        service = %name, instance = %spec.id,
                        service_proto = proto.as_str(),
                        "router.proto= is unknown or not the service's; the instance is not routed"
                    );
                }
            }
            live_instances.insert(key);
            inst
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
    let stats = reg
        .services
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(ServiceStats::new(reg.epoch)))
        .clone();
    // Slow start: an instance that just became routable ramps, unless its service had no
    // routable instance before (the first tables, provisional ones included, or a service
    // back from none: there is no one to ramp against).
    let now = stats.millis(Instant::now());
    let whole = !stats.was_routable(n_routable > 0);
    for (i, inst) in instances.iter().enumerate() {
        inst.state.outlier.set_routable(i < n_routable, now, whole);
    }
    let factor = tag_vote(name, specs, BALANCE_FACTOR_TAG, parse_factor, reg);
    let picker = Picker::new(strategy, &instances[..n_routable]).with_balance_factor(factor);
    let outlier_5xx = tag_vote(name, specs, OUTLIER_5XX_TAG, FailureStatuses::parse, reg);
    let mut own_hosts: Vec<Box<str>> = specs
        .iter()
        .flat_map(|s| s.tags.iter())
        .chain(early_hosts)
        .filter_map(|t| t.strip_prefix(HOST_TAG))
        .filter_map(normalize_host_tag)
        .collect();
    own_hosts.sort();
    own_hosts.dedup();
    Arc::new(Service {
        name: name.as_ref().into(),
        hosts: own_hosts.into_boxed_slice(),
        instances: instances.into_boxed_slice(),
        routable: n_routable,
        proto,
        picker,
        stats,
        access: Access::from_specs(name, specs).map(Box::new),
        outlier_5xx: outlier_5xx.unwrap_or_default(),
    })
}

/// A `router.hash-balance-factor=` value: a whole percent, at least 100.
fn parse_factor(v: &str) -> Result<u32, String> {
    match v.trim().parse::<u32>() {
        Ok(n) if (100..=10_000).contains(&n) => Ok(n),
        _ => Err(format!("{v:?} is not a percent between 100 and 10000")),
    }
}

/// The value of tag `prefix` most of a service's instances give (ties: the least), `None`
/// when none gives one. Values that do not parse are ignored with a warning; instances
/// that disagree are logged once until they agree, as for `router.strategy=`.
fn tag_vote<T: Ord + Copy + std::fmt::Debug>(
    service: &str,
    specs: &[InstanceSpec],
    prefix: &'static str,
    parse: impl Fn(&str) -> Result<T, String>,
    reg: &mut StateRegistry,
) -> Option<T> {
    let mut votes: BTreeMap<T, usize> = BTreeMap::new();
    for tag in specs.iter().flat_map(|s| s.tags.iter()) {
        if let Some(v) = tag.strip_prefix(prefix) {
            match parse(v) {
                Ok(x) => *votes.entry(x).or_default() += 1,
                Err(e) => tracing::warn!(service, tag = %tag, "ignoring tag: {e}"),
            }
        }
    }
    let key = (service.to_owned(), prefix);
    if votes.len() > 1 {
        if reg.warned_tags.insert(key) {
            tracing::warn!(
                service,
                tag = prefix,
                ?votes,
                "instances disagree on a tag; the most named wins"
            );
        }
    } else {
        reg.warned_tags.remove(&key);
    }
    votes
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(x, _)| *x)
}

/// An instance's `router.proto=` protocol: HTTP/1 without the tag, `None` for a value the
/// router does not know.
fn instance_proto(spec: &InstanceSpec) -> Option<Proto> {
    spec.tags
        .iter()
        .find_map(|t| t.strip_prefix(PROTO_TAG))
        .map_or(Some(Proto::Http1), Proto::from_tag)
}

/// A service's protocol: the one most of its instances name (ties: the first in
/// `Proto` order). One per service, because the request is shaped for it before an
/// instance is picked.
fn service_proto(protos: &[Option<Proto>]) -> Proto {
    let mut votes = [0usize; 3];
    for p in protos.iter().flatten() {
        votes[*p as usize] += 1;
    }
    [Proto::Http1, Proto::H2c, Proto::H2]
        .into_iter()
        .rev()
        .max_by_key(|p| votes[*p as usize])
        .unwrap_or_default()
}

fn make_instance(spec: &InstanceSpec, state: Arc<InstanceState>, proto: Proto) -> Instance {
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
    state.load.from_consul(spec.load);
    Instance {
        id: spec.id.as_str().into(),
        node: spec.node.as_str().into(),
        address: spec.address.as_str().into(),
        port: spec.port,
        socket,
        health: spec.health,
        weight,
        proto,
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

/// Instances and tables for other modules' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A passing-weight-1 instance on node `n1` at 127.0.0.1.
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

    /// A table of `services` under the domain `app.test`, every service routed.
    pub(crate) fn table(services: Vec<(&str, Vec<InstanceSpec>)>) -> RoutingTable {
        let catalog: BTreeMap<Arc<str>, Arc<[InstanceSpec]>> = services
            .into_iter()
            .map(|(k, v)| (Arc::from(k), Arc::from(v)))
            .collect();
        let opts = BuildOptions {
            domains: vec!["app.test".into()],
            default_strategy: Strategy::Random,
            include_warning: false,
            max_idle_per_instance: 1,
            exclude_services: vec![],
            expose: Expose::All,
            static_services: Default::default(),
            dns_ttl: Duration::from_secs(30),
        };
        build(
            &catalog,
            &CatalogTags::new(),
            &opts,
            &mut StateRegistry::default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testing::spec;
    use super::*;
    use crate::balance::Exclude;

    fn opts() -> BuildOptions {
        BuildOptions {
            domains: vec!["app.example.net".into()],
            default_strategy: Strategy::Random,
            include_warning: false,
            max_idle_per_instance: 4,
            exclude_services: crate::config::DEFAULT_EXCLUDED
                .iter()
                .map(|s| s.to_string())
                .collect(),
            expose: Expose::All,
            static_services: Default::default(),
            dns_ttl: Duration::from_secs(30),
        }
    }

    fn catalog(entries: Vec<(&str, Vec<InstanceSpec>)>) -> BTreeMap<Arc<str>, Arc<[InstanceSpec]>> {
        entries
            .into_iter()
            .map(|(k, v)| (Arc::from(k), Arc::from(v)))
            .collect()
    }

    #[test]
    fn one_protocol_per_service_and_unknown_ones_fail_closed() {
        let c = catalog(vec![
            (
                "grpc",
                vec![
                    spec("g-1", 1, Health::Passing, &["router.proto=h2c"]),
                    spec("g-2", 2, Health::Passing, &["router.proto=h2c"]),
                    spec("g-3", 3, Health::Passing, &[]),
                    spec("g-4", 4, Health::Passing, &["router.proto=h2s"]),
                ],
            ),
            (
                "typo",
                vec![spec("t-1", 5, Health::Passing, &["router.proto=http2"])],
            ),
            ("plain", vec![spec("p-1", 6, Health::Passing, &[])]),
        ]);
        let mut reg = StateRegistry::default();
        let t = build(&c, &CatalogTags::new(), &opts(), &mut reg);
        let grpc = &t.services["grpc"];
        assert_eq!(grpc.proto, Proto::H2c, "most instances say h2c");
        let routable: Vec<&str> = grpc.routable().iter().map(|i| &*i.id).collect();
        assert_eq!(routable, ["g-1", "g-2"], "the others are not routed");
        let typo = &t.services["typo"];
        assert_eq!(typo.routable, 0, "an unknown value is never spoken to");
        assert_eq!(t.services["plain"].proto, Proto::Http1);
        assert_eq!(reg.warned_proto.len(), 3, "each warned once");
        build(&c, &CatalogTags::new(), &opts(), &mut reg);
        assert_eq!(reg.warned_proto.len(), 3);
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
        let t = build(
            &c,
            &CatalogTags::new(),
            &opts(),
            &mut StateRegistry::default(),
        );
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
        let t = build(&c, &CatalogTags::new(), &opts(), &mut reg);
        let s = t.lookup("chat.app.example.net").unwrap();
        assert_eq!(s.routable, 1);
        assert_eq!(&*s.routable()[0].id, "c");
        let mut o = opts();
        o.include_warning = true;
        let t = build(&c, &CatalogTags::new(), &o, &mut reg);
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
        let t = build(
            &c,
            &CatalogTags::new(),
            &opts(),
            &mut StateRegistry::default(),
        );
        // A tie goes to the first in name order: ip-hash < url-hash.
        assert_eq!(t.services["chat"].strategy(), Strategy::IpHash);
    }

    #[test]
    fn outlier_and_balance_tags_by_majority() {
        let c = catalog(vec![
            (
                "hot",
                vec![
                    spec(
                        "a",
                        1,
                        Health::Passing,
                        &[
                            "router.strategy=url-hash",
                            "router.hash-balance-factor=125",
                            "router.outlier-5xx=all",
                        ],
                    ),
                    spec(
                        "b",
                        2,
                        Health::Passing,
                        &["router.strategy=url-hash", "router.hash-balance-factor=125"],
                    ),
                    spec(
                        "c",
                        3,
                        Health::Passing,
                        &["router.strategy=url-hash", "router.hash-balance-factor=150"],
                    ),
                ],
            ),
            (
                "odd",
                vec![spec(
                    "d",
                    4,
                    Health::Passing,
                    &["router.hash-balance-factor=90", "router.outlier-5xx=404"],
                )],
            ),
            (
                "plain",
                vec![spec(
                    "e",
                    5,
                    Health::Passing,
                    &["router.hash-balance-factor=200"],
                )],
            ),
        ]);
        let mut reg = StateRegistry::default();
        let t = build(&c, &CatalogTags::new(), &opts(), &mut reg);
        let hot = &t.services["hot"];
        assert_eq!(hot.hash_balance_factor(), Some(125));
        assert_eq!(hot.outlier_5xx, FailureStatuses::ALL);
        assert!(reg
            .warned_tags
            .contains(&("hot".to_owned(), BALANCE_FACTOR_TAG)));
        // Values that do not parse are ignored: the defaults.
        let odd = &t.services["odd"];
        assert_eq!(odd.hash_balance_factor(), None);
        assert_eq!(odd.outlier_5xx, FailureStatuses::default());
        // A factor means nothing to a strategy without a key.
        assert_eq!(t.services["plain"].hash_balance_factor(), None);
    }

    #[test]
    fn only_instances_that_join_after_the_first_table_ramp() {
        let mut reg = StateRegistry::default();
        let c1 = catalog(vec![("web", vec![spec("a", 1, Health::Passing, &[])])]);
        let t1 = build(&c1, &CatalogTags::new(), &opts(), &mut reg);
        let a = t1.services["web"].routable()[0].state.clone();
        let c2 = catalog(vec![(
            "web",
            vec![
                spec("a", 1, Health::Passing, &[]),
                spec("b", 2, Health::Passing, &[]),
            ],
        )]);
        let t2 = build(&c2, &CatalogTags::new(), &opts(), &mut reg);
        let now = t2.services["web"].stats.millis(Instant::now());
        let ramp = |id: &str| {
            let i = t2.services["web"]
                .instances
                .iter()
                .find(|i| &*i.id == id)
                .unwrap();
            i.state.outlier.ramp(now, 60_000)
        };
        assert_eq!(ramp("a"), 1.0, "in the first table");
        // A service back from no routable instance: its instances start whole.
        let down = catalog(vec![("web", vec![spec("a", 1, Health::Critical, &[])])]);
        build(&down, &CatalogTags::new(), &opts(), &mut reg);
        let t4 = build(&c1, &CatalogTags::new(), &opts(), &mut reg);
        assert_eq!(
            t4.services["web"].instances[0]
                .state
                .outlier
                .ramp(now, 60_000),
            1.0
        );
        assert!(ramp("b") < 0.2, "joined later");
        assert!(Arc::ptr_eq(&a, &t2.services["web"].instances[0].state));
    }

    #[test]
    fn state_survives_rebuilds_and_is_dropped_with_the_instance() {
        let mut reg = StateRegistry::default();
        let c1 = catalog(vec![("chat", vec![spec("a", 1, Health::Passing, &[])])]);
        let t1 = build(&c1, &CatalogTags::new(), &opts(), &mut reg);
        let s1 = t1.services["chat"].routable()[0].state.clone();
        let t2 = build(&c1, &CatalogTags::new(), &opts(), &mut reg);
        assert!(Arc::ptr_eq(&s1, &t2.services["chat"].routable()[0].state));
        assert!(t2.generation > t1.generation);
        build(&catalog(vec![]), &CatalogTags::new(), &opts(), &mut reg);
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
            &CatalogTags::new(),
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
        let t = build(
            &c,
            &CatalogTags::new(),
            &opts(),
            &mut StateRegistry::default(),
        );
        let s = t.lookup("chat.app.example.net").unwrap();
        assert!(s.pick(0, Exclude::default()).is_none());
    }

    #[test]
    fn tag_hosts_answer_before_the_instances_are_read() {
        // After a restart the service list is read first: its tags map the host at once.
        let listed = tags(&[("chat", &["router.host=chat.example.com"])]);
        let mut reg = StateRegistry::default();
        let t = build(&catalog(vec![("chat", vec![])]), &listed, &opts(), &mut reg);
        let s = t.lookup("chat.example.com").expect("known: 503, not 404");
        assert_eq!(s.routable, 0);
        // Once read, the instances' own tags decide: a host they dropped is gone.
        let read = catalog(vec![("chat", vec![spec("c-1", 1, Health::Passing, &[])])]);
        let t = build(&read, &listed, &opts(), &mut reg);
        assert!(t.lookup("chat.example.com").is_none());
        assert!(t.lookup("chat.app.example.net").is_some());
    }

    #[test]
    fn static_services_are_routed_and_merged_with_consul() {
        use crate::config::{StaticInstance, StaticService};
        let statics: Arc<[StaticService]> = vec![
            StaticService {
                name: "legacy".into(),
                strategy: Some(Strategy::LeastLoad),
                hosts: vec!["Old.Example.com".into()],
                instances: vec![
                    StaticInstance {
                        host: "10.0.0.5".into(),
                        port: 8080,
                        weight: 1,
                    },
                    StaticInstance {
                        host: "db.local".into(),
                        port: 8080,
                        weight: 2,
                    },
                ],
            },
            StaticService {
                name: "web".into(),
                strategy: None,
                hosts: vec![],
                instances: vec![StaticInstance {
                    host: "10.0.0.9".into(),
                    port: 80,
                    weight: 1,
                }],
            },
        ]
        .into();
        let o = BuildOptions {
            static_services: statics,
            expose: Expose::Tagged,
            ..opts()
        };
        let c = catalog(vec![(
            "web",
            vec![spec("w-1", 1, Health::Passing, &["router.expose=true"])],
        )]);
        let t = build(&c, &CatalogTags::new(), &o, &mut StateRegistry::default());
        // Routed under expose = "tagged" too, by name and by its hosts.
        let legacy = t.lookup("legacy.app.example.net").expect("by name");
        assert!(Arc::ptr_eq(
            legacy,
            t.lookup("old.example.com").expect("host")
        ));
        assert_eq!(legacy.routable, 2);
        assert_eq!(legacy.picker.strategy(), Strategy::LeastLoad);
        let by_addr: Vec<(&str, Option<SocketAddr>, u32)> = legacy
            .routable()
            .iter()
            .map(|i| (&*i.address, i.socket, i.weight))
            .collect();
        assert_eq!(
            by_addr,
            [
                ("10.0.0.5", Some("10.0.0.5:8080".parse().unwrap()), 1),
                ("db.local", None, 2)
            ]
        );
        // A name Consul knows too: Consul's instances plus the static ones.
        let web: Vec<&str> = t.services["web"]
            .routable()
            .iter()
            .map(|i| &*i.id)
            .collect();
        assert_eq!(web, ["static:web:10.0.0.9:80", "w-1"]);
        // With an empty catalog (no Consul yet, or none at all) they are routed alone.
        let t = build(
            &catalog(vec![]),
            &CatalogTags::new(),
            &o,
            &mut StateRegistry::default(),
        );
        assert_eq!(routed(&t), ["legacy", "web"]);
    }

    fn one_static(name: &str, host: &str, port: u16) -> crate::config::StaticService {
        crate::config::StaticService {
            name: name.into(),
            strategy: None,
            hosts: vec![],
            instances: vec![crate::config::StaticInstance {
                host: host.into(),
                port,
                weight: 1,
            }],
        }
    }

    #[test]
    fn a_static_service_stays_routed_when_consul_lists_it_untagged() {
        let o = BuildOptions {
            static_services: vec![one_static("web", "10.0.0.9", 80)].into(),
            ..tagged()
        };
        let ids = |t: &RoutingTable| -> Vec<String> {
            let web = t.lookup("web.app.example.net").expect("static web routed");
            web.routable().iter().map(|i| i.id.to_string()).collect()
        };
        // Listed by Consul without router.expose=true: still routed, with the static
        // instance alone (Consul's would not be exposed on their own).
        let listed = tags(&[("web", &[])]);
        let unread = catalog(vec![("web", vec![])]);
        let t = build(&unread, &listed, &o, &mut StateRegistry::default());
        assert_eq!(ids(&t), ["static:web:10.0.0.9:80"]);
        let read = catalog(vec![("web", vec![spec("w-1", 1, Health::Passing, &[])])]);
        let t = build(&read, &listed, &o, &mut StateRegistry::default());
        assert_eq!(ids(&t), ["static:web:10.0.0.9:80"]);
        // Consul says false: the same.
        let denied = catalog(vec![(
            "web",
            vec![spec("w-1", 1, Health::Passing, &["router.expose=false"])],
        )]);
        let t = build(&denied, &listed, &o, &mut StateRegistry::default());
        assert_eq!(ids(&t), ["static:web:10.0.0.9:80"]);
        // Exposed by Consul: its instances join.
        let exposed = catalog(vec![(
            "web",
            vec![spec("w-1", 1, Health::Passing, &["router.expose=true"])],
        )]);
        let listed_exposed = tags(&[("web", &["router.expose=true"])]);
        let t = build(&exposed, &listed_exposed, &o, &mut StateRegistry::default());
        assert_eq!(ids(&t), ["static:web:10.0.0.9:80", "w-1"]);
        // exclude_services still wins.
        let mut excluded = o.clone();
        excluded.exclude_services.push("web".into());
        let t = build(&read, &listed, &excluded, &mut StateRegistry::default());
        assert!(t.lookup("web.app.example.net").is_none());
    }

    #[test]
    fn two_static_services_on_one_backend_keep_their_own_state() {
        let o = BuildOptions {
            static_services: vec![
                one_static("a", "10.0.0.9", 80),
                one_static("b", "10.0.0.9", 80),
            ]
            .into(),
            ..opts()
        };
        let mut reg = StateRegistry::default();
        let t = build(&catalog(vec![]), &CatalogTags::new(), &o, &mut reg);
        assert_eq!(reg.instances.len(), 2);
        let a = &t.services["a"].routable()[0];
        let b = &t.services["b"].routable()[0];
        assert!(!Arc::ptr_eq(&a.state, &b.state));
    }

    fn tags(entries: &[(&str, &[&str])]) -> CatalogTags {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|t| t.to_string()).collect()))
            .collect()
    }

    fn tagged() -> BuildOptions {
        BuildOptions {
            expose: Expose::Tagged,
            ..opts()
        }
    }

    fn routed(t: &RoutingTable) -> Vec<&str> {
        let mut v: Vec<&str> = t.services.keys().map(|k| &**k).collect();
        v.sort();
        v
    }

    #[test]
    fn excluded_names_are_never_routed_whatever_their_case_or_tags() {
        let c = catalog(vec![
            ("consul", vec![spec("c", 1, Health::Passing, &[])]),
            (
                "Vault",
                vec![spec("v", 2, Health::Passing, &["router.expose=true"])],
            ),
            (
                "nomad",
                vec![spec(
                    "n",
                    3,
                    Health::Passing,
                    &["router.host=nomad.example.com"],
                )],
            ),
            ("chat", vec![spec("a", 4, Health::Passing, &[])]),
        ]);
        for o in [opts(), tagged()] {
            let t = build(&c, &CatalogTags::new(), &o, &mut StateRegistry::default());
            let want: &[&str] = if o.expose == Expose::All {
                &["chat"]
            } else {
                &[]
            };
            assert_eq!(routed(&t), want);
            assert!(t.lookup("consul.app.example.net").is_none());
            assert!(t.lookup("nomad.example.com").is_none());
        }
        // A custom list replaces the default one.
        let mut o = opts();
        o.exclude_services = vec!["chat".into()];
        let t = build(&c, &CatalogTags::new(), &o, &mut StateRegistry::default());
        assert_eq!(routed(&t), ["Vault", "consul", "nomad"]);
        assert!(t.lookup("chat.app.example.net").is_none());
    }

    #[test]
    fn expose_false_on_any_instance_hides_the_service() {
        let c = catalog(vec![
            (
                "admin",
                vec![
                    spec("a", 1, Health::Passing, &["router.expose=true"]),
                    spec("b", 2, Health::Passing, &["router.expose=false"]),
                ],
            ),
            (
                "odd",
                vec![spec("o", 3, Health::Passing, &["router.expose=no"])],
            ),
            (
                "shouty",
                vec![spec("s", 4, Health::Passing, &["router.expose=FALSE"])],
            ),
            (
                "chat",
                vec![spec("c", 5, Health::Passing, &["router.expose=True"])],
            ),
        ]);
        for o in [opts(), tagged()] {
            let t = build(&c, &CatalogTags::new(), &o, &mut StateRegistry::default());
            // Deny wins over allow; a value other than true counts as false.
            assert_eq!(routed(&t), ["chat"], "{:?}", o.expose);
        }
    }

    #[test]
    fn tagged_routes_only_services_tagged_expose_or_host() {
        let c = catalog(vec![
            ("plain", vec![spec("p", 1, Health::Passing, &[])]),
            (
                "shown",
                vec![
                    spec("s1", 2, Health::Passing, &[]),
                    spec("s2", 3, Health::Passing, &["router.expose=true"]),
                ],
            ),
            (
                "site",
                vec![spec(
                    "w",
                    4,
                    Health::Passing,
                    &["router.host=www.example.com"],
                )],
            ),
            (
                "empty-host",
                vec![spec("e", 5, Health::Passing, &["router.host="])],
            ),
        ]);
        let t = build(
            &c,
            &CatalogTags::new(),
            &tagged(),
            &mut StateRegistry::default(),
        );
        assert_eq!(routed(&t), ["shown", "site"]);
        assert!(t.lookup("plain.app.example.net").is_none());
        assert_eq!(&*t.lookup("shown.app.example.net").unwrap().name, "shown");
        assert_eq!(&*t.lookup("www.example.com").unwrap().name, "site");
        assert_eq!(&*t.lookup("site.app.example.net").unwrap().name, "site");
        let t = build(
            &c,
            &CatalogTags::new(),
            &opts(),
            &mut StateRegistry::default(),
        );
        assert_eq!(routed(&t), ["empty-host", "plain", "shown", "site"]);
    }

    #[test]
    fn a_hidden_service_claims_no_host() {
        // "aaa" would win www.example.com by name order, but it is hidden.
        let c = catalog(vec![
            (
                "aaa",
                vec![spec(
                    "a",
                    1,
                    Health::Passing,
                    &["router.host=www.example.com", "router.expose=false"],
                )],
            ),
            (
                "bbb",
                vec![spec(
                    "b",
                    2,
                    Health::Passing,
                    &["router.host=www.example.com"],
                )],
            ),
            (
                "vault",
                vec![spec(
                    "v",
                    3,
                    Health::Passing,
                    &["router.host=vault.example.com"],
                )],
            ),
        ]);
        for o in [opts(), tagged()] {
            let t = build(&c, &CatalogTags::new(), &o, &mut StateRegistry::default());
            assert_eq!(&*t.lookup("www.example.com").unwrap().name, "bbb");
            assert!(t.lookup("aaa.app.example.net").is_none());
            assert!(t.lookup("vault.example.com").is_none());
            assert_eq!(t.hosts.len(), 1);
        }
    }

    #[test]
    fn catalog_tags_decide_before_instances_are_read() {
        // Listed, not read yet: no instances, only the catalog's tags.
        let c = catalog(vec![
            ("plain", vec![]),
            ("shown", vec![]),
            ("hidden", vec![]),
            ("unlisted", vec![]),
        ]);
        let ct = tags(&[
            ("plain", &[]),
            ("shown", &["router.expose=true"]),
            ("hidden", &["router.expose=false"]),
        ]);
        let t = build(&c, &ct, &tagged(), &mut StateRegistry::default());
        assert_eq!(routed(&t), ["shown"]);
        let t = build(&c, &ct, &opts(), &mut StateRegistry::default());
        assert_eq!(routed(&t), ["plain", "shown", "unlisted"]);
    }

    #[test]
    fn catalog_and_instances_must_both_allow() {
        // While a tag changes, the two sources can disagree for a moment: either one hiding
        // the service hides it.
        let c = catalog(vec![
            (
                "dropped",
                vec![spec("d", 1, Health::Passing, &["router.expose=true"])],
            ),
            ("added", vec![spec("a", 2, Health::Passing, &[])]),
            ("denied", vec![spec("x", 3, Health::Passing, &[])]),
        ]);
        let ct = tags(&[
            ("dropped", &[]),
            ("added", &["router.expose=true"]),
            ("denied", &["router.expose=false"]),
        ]);
        let t = build(&c, &ct, &tagged(), &mut StateRegistry::default());
        assert!(routed(&t).is_empty());
        let t = build(&c, &ct, &opts(), &mut StateRegistry::default());
        assert_eq!(routed(&t), ["added", "dropped"]);
    }

    #[test]
    fn state_of_a_hidden_service_is_dropped() {
        let mut reg = StateRegistry::default();
        let c = catalog(vec![("chat", vec![spec("a", 1, Health::Passing, &[])])]);
        build(&c, &CatalogTags::new(), &opts(), &mut reg);
        assert_eq!(reg.instances.len(), 1);
        let c = catalog(vec![(
            "chat",
            vec![spec("a", 1, Health::Passing, &["router.expose=false"])],
        )]);
        let t = build(&c, &CatalogTags::new(), &opts(), &mut reg);
        assert!(t.services.is_empty());
        assert!(reg.instances.is_empty() && reg.services.is_empty());
    }
}
