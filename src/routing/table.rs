//! The snapshot types: [`RoutingTable`], [`Service`], [`Instance`].

use std::collections::{BTreeMap, HashMap};

/// Host and service-name maps. foldhash is several times faster than SipHash on short keys
/// and still seeded per process, so host names cannot be chosen to collide.
pub type NameMap<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::balance::{Candidate, Exclude, Picker, Strategy};
use crate::upstream::RetryBudget;
pub use crate::upstream::{FailureStatuses, InstanceState, Proto};

/// The `state` labels of instance counts, in [`Service::instance_counts`] order.
pub const INSTANCE_STATES: [&str; 5] =
    ["passing", "warning", "critical", "not_routable", "routable"];

/// An instance's health as Consul reports it (worst of its checks and its node's checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// All checks pass.
    Passing = 0,
    /// Some check warns, none fails.
    Warning,
    /// Some check fails (maintenance mode included).
    Critical,
}

impl Health {
    /// Parses Consul's status word; anything unknown counts as critical.
    pub fn from_consul(status: &str) -> Health {
        match status {
            "passing" => Health::Passing,
            "warning" => Health::Warning,
            _ => Health::Critical,
        }
    }
}

/// One instance as discovered, before it is placed in a table.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    /// Consul service ID.
    pub id: String,
    /// Consul node name.
    pub node: String,
    /// Address to connect to (the node's when the service gives none).
    pub address: String,
    /// Port.
    pub port: u16,
    /// Service tags.
    pub tags: Vec<String>,
    /// Reported load from Service Meta `load`.
    pub load: Option<f64>,
    /// Weight when passing.
    pub weight_passing: u32,
    /// Weight when warning.
    pub weight_warning: u32,
    /// Aggregated health.
    pub health: Health,
}

/// Per-service state that outlives rebuilds: when it last carried traffic, and its counters.
#[derive(Debug)]
pub struct ServiceStats {
    /// Seconds since `epoch` at the last request; 0 means never.
    last_used: AtomicU64,
    epoch: Instant,
    /// Request metrics, created on the first request and kept with the service, so a
    /// request does no lookup.
    pub metrics: crate::metrics::LazyMetrics,
    /// What its retries may still add.
    pub retry_budget: RetryBudget,
    /// Whether the last table gave it a routable instance (slow start's reference).
    routable: AtomicBool,
    /// Whether a request is ejecting one of its instances (see [`ServiceStats::ejecting`]).
    ejecting: AtomicBool,
}

impl ServiceStats {
    /// A service's stats, with no request yet.
    pub fn new(epoch: Instant) -> Self {
        ServiceStats {
            last_used: AtomicU64::new(0),
            epoch,
            metrics: crate::metrics::LazyMetrics::default(),
            retry_budget: RetryBudget::default(),
            routable: AtomicBool::new(false),
            ejecting: AtomicBool::new(false),
        }
    }

    /// Runs `eject` (count the ejected instances, then eject one) unless another request
    /// of the service is running one: `None` then, and the instance's next failure tries
    /// again. Two requests ejecting at once could otherwise both find room under
    /// `max_ejection_percent`. Ejections are rare: a failure at the threshold pays for it.
    pub fn ejecting<T>(&self, eject: impl FnOnce() -> Option<T>) -> Option<T> {
        self.ejecting
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        let done = eject();
        self.ejecting.store(false, Ordering::Release);
        done
    }

    /// Notes whether the new table gives it a routable instance; whether the last one did.
    pub fn was_routable(&self, now: bool) -> bool {
        self.routable.swap(now, Ordering::Relaxed)
    }

    /// `t` as milliseconds since the epoch, the clock of instances' outlier state.
    pub fn millis(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Marks the service as used now. A load first, so a busy service does not bounce the
    /// cache line between cores on every request.
    pub fn touch(&self) {
        self.touch_at(Instant::now());
    }

    /// [`ServiceStats::touch`] with the caller's clock reading.
    pub fn touch_at(&self, now: Instant) {
        let now = now.saturating_duration_since(self.epoch).as_secs() + 1;
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// Seconds-since-epoch stamp of the last request (0: never).
    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }
}

/// One instance in a snapshot.
#[derive(Debug)]
pub struct Instance {
    /// Consul service ID.
    pub id: Box<str>,
    /// Consul node.
    pub node: Box<str>,
    /// Address as registered.
    pub address: Box<str>,
    /// Port.
    pub port: u16,
    /// Parsed socket address when the address is an IP (the usual case); else resolved at connect.
    pub socket: Option<SocketAddr>,
    /// Health.
    pub health: Health,
    /// Effective weight for its health (0 when its protocol is not the service's).
    pub weight: u32,
    /// The protocol it is spoken to in (`router.proto=`).
    pub proto: Proto,
    pub(crate) id_hash: u64,
    /// Shared runtime state.
    pub state: Arc<InstanceState>,
}

impl Candidate for Instance {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn id_hash(&self) -> u64 {
        self.id_hash
    }
    fn reported_load(&self) -> Option<f64> {
        self.state.load.get()
    }
    fn in_flight(&self) -> u64 {
        self.state.in_flight.load(Ordering::Relaxed)
    }
}

impl Instance {
    /// The load it last reported, in Consul or in a response's load header.
    pub fn load(&self) -> Option<f64> {
        self.state.load.get()
    }
}

/// One service in a snapshot.
#[derive(Debug)]
pub struct Service {
    /// Consul service name.
    pub name: Box<str>,
    /// Explicit hosts from `router.host=` tags.
    pub hosts: Box<[Box<str>]>,
    /// All known instances, the routable ones first.
    pub instances: Box<[Instance]>,
    /// How many of `instances` are routable.
    pub routable: usize,
    /// The protocol of its routable instances (one per service: see `routing::build`).
    pub proto: Proto,
    pub(crate) picker: Picker,
    /// Counters and usage that outlive the snapshot.
    pub stats: Arc<ServiceStats>,
    /// Who may call it (`router.allow=`, `router.auth=`); `None`: anyone.
    pub access: Option<Box<super::Access>>,
    /// Response statuses that count as an instance's failure (`router.outlier-5xx=`).
    pub outlier_5xx: FailureStatuses,
}

impl Service {
    /// The strategy in force.
    pub fn strategy(&self) -> Strategy {
        self.picker.strategy()
    }

    /// The routable instances.
    pub fn routable(&self) -> &[Instance] {
        &self.instances[..self.routable]
    }

    /// How many instances are passing, warning and critical, then how many are not routable
    /// (weight 0, warning while warnings are not routed, or critical) and routable.
    pub fn instance_counts(&self) -> [usize; 5] {
        let mut counts = [0; 5];
        for i in self.instances.iter() {
            counts[i.health as usize] += 1;
        }
        counts[3] = self.instances.len() - self.routable;
        counts[4] = self.routable;
        counts
    }

    /// The bounded-load factor of its hashing, in percent (`router.hash-balance-factor=`).
    pub fn hash_balance_factor(&self) -> Option<u32> {
        self.picker.balance_factor()
    }

    /// How many routable instances are ejected at `now` (a scan: only when one may be).
    pub fn ejected(&self, now: u64) -> usize {
        self.routable()
            .iter()
            .filter(|i| i.state.outlier.is_ejected(now))
            .count()
    }

    /// Picks a routable instance for `key`, skipping `exclude`d positions.
    pub fn pick(&self, key: u64, exclude: Exclude) -> Option<(usize, &Instance)> {
        let candidates = self.routable();
        let i = self.picker.pick(candidates, key, exclude)?;
        Some((i, &candidates[i]))
    }
}

/// One immutable routing snapshot.
#[derive(Debug)]
pub struct RoutingTable {
    /// Services by name.
    pub services: NameMap<Arc<Service>>,
    /// Explicit hosts (from tags) to their service.
    pub hosts: NameMap<Arc<Service>>,
    /// Services not exposed but named by a `router.auth=` tag: asked, never routed to.
    pub internal: NameMap<Arc<Service>>,
    /// Domain suffixes, lowercase, without dots at either end.
    pub domains: Box<[Box<str>]>,
    /// False until the first table built from Consul.
    pub ready: bool,
    /// Increases with every rebuild.
    pub generation: u64,
}

impl RoutingTable {
    /// The table before Consul has answered.
    pub fn empty() -> Self {
        RoutingTable {
            services: NameMap::default(),
            hosts: NameMap::default(),
            internal: NameMap::default(),
            domains: Box::new([]),
            ready: false,
            generation: 0,
        }
    }

    /// Finds the service for a normalised host: explicit hosts first, then
    /// `<service>.<domain>` with exactly one label before the domain.
    pub fn lookup(&self, host: &str) -> Option<&Arc<Service>> {
        if let Some(s) = self.hosts.get(host) {
            return Some(s);
        }
        for domain in self.domains.iter() {
            let Some(prefix) = host.strip_suffix(&**domain) else {
                continue;
            };
            let Some(label) = prefix.strip_suffix('.') else {
                continue;
            };
            if super::host::is_dns_label(label) {
                if let Some(s) = self.services.get(label) {
                    return Some(s);
                }
            }
        }
        None
    }

    /// The service named `name`, exposed or only asked for auth.
    pub fn service_named(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name).or_else(|| self.internal.get(name))
    }

    /// Every host this table answers, with its service, sorted by host (for the admin API).
    pub fn host_map(&self) -> BTreeMap<String, &Arc<Service>> {
        let mut out = BTreeMap::new();
        for (name, svc) in &self.services {
            if super::host::is_dns_label(name) {
                for d in self.domains.iter() {
                    out.insert(format!("{name}.{d}"), svc);
                }
            }
        }
        for (host, svc) in &self.hosts {
            out.insert(host.to_string(), svc);
        }
        out
    }
}
