//! Discovery's state and decisions, without I/O: the last good answers from Consul, which
//! services get their own long-poll, which cold services to re-read, and what the next table
//! is built from.
//!
//! The loops in `watch.rs` feed it answers and act on what it returns ([`Outcome`],
//! [`Reads`]). Errors never reach it: it keeps the last good answer until Consul gives a new
//! one.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::routing::{CatalogTags, InstanceSpec};

use super::types::{Check, HealthEntry};

/// What the loops must do after a change to the model.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) struct Outcome {
    /// Rebuild the table.
    pub(crate) rebuild: bool,
    /// Cold services were queued: wake the reader.
    pub(crate) read: bool,
    /// The watched set changed: start and stop long-polls to match [`Model::watched`].
    pub(crate) watches: bool,
}

impl Outcome {
    fn merge(self, other: Outcome) -> Outcome {
        Outcome {
            rebuild: self.rebuild || other.rebuild,
            read: self.read || other.read,
            watches: self.watches || other.watches,
        }
    }
}

/// Where the health feed's first query starts ([`Model::feed_start`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FeedStart {
    /// A bulk read is reading the checks now: wait for it.
    Wait,
    /// Block from this index: the bulk read's checks are the baseline.
    From(u64),
    /// Read at once.
    Now,
}

/// What the reader of cold services does next ([`Model::next_reads`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reads {
    /// Nothing is queued: wait to be woken.
    Idle,
    /// Read every instance and check at once (a [`BulkRead`]), then report it with
    /// [`Model::apply_bulk`] or [`Model::bulk_failed`].
    Bulk,
    /// Read these services one request each.
    Each(Vec<String>),
}

/// Every instance and check in the datacenter, read at once: `/v1/health/state/any`, then
/// `/v1/catalog/nodes`, then each node's services.
#[derive(Debug, Default, Clone)]
pub(crate) struct BulkRead {
    /// Per service name, its instances as `/v1/health/service/<name>` would have given them.
    pub(crate) services: HashMap<String, Vec<InstanceSpec>>,
    /// The checks answer it was assembled from, read before any node.
    pub(crate) checks: Vec<Check>,
    /// How many nodes were read.
    pub(crate) nodes: usize,
    /// The checks answer's `X-Consul-Index`.
    pub(crate) checks_index: u64,
}

/// A bulk read pays when it saves more than half the requests: it costs 2 + nodes requests
/// against one per queued service.
const BULK_PER_NODE: usize = 2;
/// ... and when at least 1/16 of the cold services are queued. A bulk read downloads every
/// instance once (its service and checks, about half of a per-service entry, which repeats
/// the node and its checks), so it moves at most about 8 times the bytes of the reads it
/// replaces, for far fewer requests. A few services named by the health feed on a large
/// catalog stay single reads.
const BULK_SHARE: usize = 16;

/// A bulk read in flight.
#[derive(Debug)]
struct InFlight {
    /// The catalog's index when it started: every registration up to it is in the read.
    catalog_index: u64,
    /// The queue it took: read again one by one if it fails.
    taken: BTreeSet<String>,
    /// The health feed's last answer while it was in flight, diffed against the bulk read's
    /// own checks when it ends.
    feed: Option<HashMap<String, u64>>,
}

/// What the build reads: each listed service's instances, and the service list's tags.
pub(crate) type BuildInput = (BTreeMap<Arc<str>, Arc<[InstanceSpec]>>, Arc<CatalogTags>);

/// Everything discovery knows, and the rules for changing it.
#[derive(Debug)]
pub(crate) struct Model {
    max_watches: usize,
    /// `/v1/catalog/services` without excluded names; `None` until its first answer. Shared
    /// with the rebuilder, whose build reads its tags.
    catalog: Option<Arc<CatalogTags>>,
    /// Instances per service, as last read.
    instances: BTreeMap<Arc<str>, Arc<[InstanceSpec]>>,
    /// Services that should have their own long-poll.
    watched: BTreeSet<String>,
    /// Cold services waiting to be re-read.
    pending: BTreeSet<String>,
    /// Fingerprints of each service's (and node's) checks from `/v1/health/state/any`.
    fingerprints: HashMap<String, u64>,
    /// Nodes at the last bulk read; `None` before one succeeded.
    nodes: Option<usize>,
    /// The service list's last index. It moves on any change to any registration, Meta
    /// included, though the list shows only names and tags.
    catalog_index: u64,
    /// The catalog index the last bulk read covered (0: none yet).
    read_index: u64,
    /// The index of the checks answer that became the health feed's baseline in a bulk
    /// read: the feed blocks from there instead of downloading the same answer again.
    feed_seed: Option<u64>,
    /// The bulk read in flight.
    bulk: Option<InFlight>,
    /// A bulk read failed: read the queue one service at a time until it is empty, or until a
    /// single read fails too (then Consul itself is failing, and a bulk read may be tried).
    per_service: bool,
    /// The last answer from Consul; the start until there is one.
    answered: Instant,
    /// The catalog's blocking query open now: when it started and by when Consul must have
    /// answered it. While it is open and on time the table is current: Consul answers a
    /// blocking query as soon as anything changes.
    blocking: Option<(Instant, Instant)>,
}

impl Model {
    /// An empty model that gives at most `max_watches` services their own long-poll.
    pub(crate) fn new(max_watches: usize, now: Instant) -> Self {
        Model {
            max_watches,
            catalog: None,
            instances: BTreeMap::new(),
            watched: BTreeSet::new(),
            pending: BTreeSet::new(),
            fingerprints: HashMap::new(),
            nodes: None,
            catalog_index: 0,
            read_index: 0,
            feed_seed: None,
            bulk: None,
            per_service: false,
            answered: now,
            blocking: None,
        }
    }

    /// Services that should have their own long-poll, sorted.
    pub(crate) fn watched(&self) -> &BTreeSet<String> {
        &self.watched
    }

    /// Consul answered (any endpoint): the table is current as of `now`.
    pub(crate) fn answered(&mut self, now: Instant) {
        self.answered = self.answered.max(now);
    }

    /// The catalog's blocking query started at `now`; Consul answers it by `due` at the latest
    /// (its wait and jitter) if all is well.
    pub(crate) fn blocking(&mut self, now: Instant, due: Instant) {
        self.blocking = Some((now, due));
    }

    /// The catalog's query ended, answered or not. Only an applied answer (which calls
    /// [`Model::answered`]) says the table is current: a query that fails at once, again
    /// and again while Consul refuses connections, must not keep the age at 0.
    pub(crate) fn blocking_ended(&mut self) {
        self.blocking = None;
    }

    /// How long the table may have been behind Consul: since the last answer, or 0 while the
    /// catalog's blocking query is open and not overdue (a quiet cluster answers only when
    /// its wait ends); since the start, if Consul never answered.
    pub(crate) fn answer_age(&self, now: Instant) -> Duration {
        let current = match self.blocking {
            Some((_, due)) => self.answered.max(now.min(due)),
            None => self.answered,
        };
        now.saturating_duration_since(current)
    }

    /// A new answer from `/v1/catalog/services`. Services it no longer lists leave; listed
    /// ones whose tags changed are queued for a read unless watched; `excluded` names are
    /// dropped as they arrive, so they are never watched or read. Then the watched set is
    /// chosen again with `last_used` (see [`Model::choose_watched`]).
    pub(crate) fn apply_catalog(
        &mut self,
        mut new: CatalogTags,
        excluded: impl Fn(&str) -> bool,
        last_used: impl Fn(&str) -> u64,
    ) -> Outcome {
        new.retain(|name, _| !excluded(name));
        self.instances.retain(|name, _| new.contains_key(&**name));
        let before = self.watched.len();
        self.watched.retain(|name| new.contains_key(name));
        self.pending.retain(|name| new.contains_key(name));
        let mut out = Outcome {
            // The first answer must reach the rebuilder even for an empty catalog.
            rebuild: true,
            read: false,
            watches: self.watched.len() != before,
        };
        for (name, tags) in &new {
            let changed = self.catalog.as_ref().and_then(|c| c.get(name)) != Some(tags);
            if changed && !self.watched.contains(name) {
                out.read |= self.pending.insert(name.clone());
            }
        }
        self.catalog = Some(Arc::new(new));
        let mut out = out.merge(self.choose_watched(last_used));
        // Queued services that just got a watch need no read.
        out.read &= !self.pending.is_empty();
        out
    }

    /// Chooses the watched set: every service up to `max_watches`, else those with the
    /// highest `last_used` (ties by name). A service that loses its watch is queued for one
    /// more read: it may have missed a change while its watch backed off.
    pub(crate) fn choose_watched(&mut self, last_used: impl Fn(&str) -> u64) -> Outcome {
        let Some(catalog) = &self.catalog else {
            return Outcome::default();
        };
        let desired: BTreeSet<&String> = if catalog.len() <= self.max_watches {
            catalog.keys().collect()
        } else {
            let mut by_use: Vec<(u64, &String)> =
                catalog.keys().map(|n| (last_used(n), n)).collect();
            by_use.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
            by_use
                .into_iter()
                .take(self.max_watches)
                .map(|(_, n)| n)
                .collect()
        };
        let mut out = Outcome::default();
        let demoted: Vec<String> = self
            .watched
            .iter()
            .filter(|n| !desired.contains(n))
            .cloned()
            .collect();
        for name in demoted {
            self.watched.remove(&name);
            self.pending.insert(name);
            out.read = true;
            out.watches = true;
        }
        for name in desired {
            if self.watched.insert(name.clone()) {
                self.pending.remove(name);
                out.watches = true;
            }
        }
        out
    }

    /// A service's instances as `/v1/health/service/<name>` returned them. `from_watch` is
    /// false for plain reads, which must not overwrite what a watch (always newer) stored.
    pub(crate) fn apply_service(
        &mut self,
        name: &str,
        entries: &[HealthEntry],
        from_watch: bool,
    ) -> Outcome {
        Outcome {
            rebuild: self.store(name, entries, from_watch),
            ..Outcome::default()
        }
    }

    /// Stores a service's entries; true if its instances changed.
    fn store(&mut self, name: &str, entries: &[HealthEntry], from_watch: bool) -> bool {
        let specs = entries
            .iter()
            .filter(|e| e.service.service == name)
            .map(HealthEntry::to_spec)
            .collect();
        self.store_specs(name, specs, from_watch)
    }

    /// Stores a service's instances, in one order however they were read (by ID, then node,
    /// as Consul lists them); true if they changed.
    fn store_specs(&mut self, name: &str, mut specs: Vec<InstanceSpec>, from_watch: bool) -> bool {
        specs.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| a.node.cmp(&b.node)));
        // A late answer for a service that has left the catalog must not bring it back.
        if !self.catalog.as_ref().is_some_and(|c| c.contains_key(name)) {
            return false;
        }
        if !from_watch && self.watched.contains(name) {
            return false;
        }
        if self.instances.get(name).is_some_and(|old| **old == *specs) {
            return false;
        }
        self.instances.insert(Arc::from(name), Arc::from(specs));
        true
    }

    /// What the reader does next with the queue: one bulk read when it costs less than
    /// reading the queued services one by one (see [`BULK_PER_NODE`] and [`BULK_SHARE`];
    /// before the node count is known, when more than `max_watches` are queued, as at the
    /// start of a large catalog), else up to `max` single reads.
    pub(crate) fn next_reads(&mut self, max: usize) -> Reads {
        // The reader does one bulk read at a time and reports how it ended: one still open
        // here was abandoned by a reader that panicked.
        if let Some(flight) = self.bulk.take() {
            let _ = self.reopen(flight);
        }
        if self.pending.is_empty() {
            self.per_service = false;
            return Reads::Idle;
        }
        if !self.per_service && self.bulk_pays(self.pending.len()) {
            self.bulk = Some(InFlight {
                catalog_index: self.catalog_index,
                taken: std::mem::take(&mut self.pending),
                feed: None,
            });
            return Reads::Bulk;
        }
        Reads::Each(self.take_reads(max))
    }

    /// Whether one bulk read costs less than `queued` single reads.
    fn bulk_pays(&self, queued: usize) -> bool {
        match self.nodes {
            None => queued > self.max_watches,
            Some(nodes) => {
                let listed = self.catalog.as_ref().map_or(0, |c| c.len());
                let cold = listed.saturating_sub(self.watched.len());
                queued > BULK_PER_NODE * (nodes + 2) && queued * BULK_SHARE >= cold
            }
        }
    }

    /// A bulk read succeeded: every listed cold service gets what it found, as a plain read
    /// (none in any node: no instance), in one outcome. Its checks become the health feed's
    /// baseline, so the feed's next answer names only what changed since; if the feed
    /// answered while it was in flight, what differs between the two is queued and the
    /// feed's answer stays the baseline, as its blocking index is that answer's.
    pub(crate) fn apply_bulk(&mut self, mut bulk: BulkRead) -> Outcome {
        let flight = self.bulk.take();
        self.nodes = Some(bulk.nodes);
        // Every registration up to the catalog index it started at is in it. (A node answer
        // carries that node's own index, lower when the node changed less recently, so it
        // cannot tell a lagging server; with stale reads, the next registration anywhere
        // makes the sweep read again.)
        if let Some(f) = &flight {
            self.read_index = f.catalog_index;
        }
        let mut out = Outcome::default();
        if let Some(catalog) = self.catalog.clone() {
            // A plain read: watched services keep what their long-poll stored.
            for name in catalog.keys() {
                let specs = bulk.services.remove(name).unwrap_or_default();
                out.rebuild |= self.store_specs(name, specs, false);
            }
        }
        let seed = fingerprints(&bulk.checks);
        match flight.and_then(|f| f.feed) {
            Some(feed) => {
                out = out.merge(self.queue_changed(&seed, &feed));
                self.fingerprints = feed;
            }
            None => {
                self.fingerprints = seed;
                self.feed_seed = (bulk.checks_index > 0).then_some(bulk.checks_index);
            }
        }
        out
    }

    /// A bulk read failed: its queue is read one service at a time instead, and a feed answer
    /// that came meanwhile is applied as usual.
    pub(crate) fn bulk_failed(&mut self) -> Outcome {
        self.per_service = true;
        match self.bulk.take() {
            Some(flight) => self.reopen(flight),
            None => Outcome::default(),
        }
    }

    /// Puts an unfinished bulk read's queue back, and applies the feed answer it held back.
    fn reopen(&mut self, flight: InFlight) -> Outcome {
        let mut out = Outcome::default();
        for name in flight.taken {
            let listed = self.catalog.as_ref().is_some_and(|c| c.contains_key(&name));
            if listed && !self.watched.contains(&name) {
                out.read |= self.pending.insert(name);
            }
        }
        if let Some(feed) = flight.feed {
            let old = std::mem::take(&mut self.fingerprints);
            out = out.merge(self.queue_changed(&old, &feed));
            self.fingerprints = feed;
        }
        out
    }

    /// Takes up to `max` queued cold services to read now.
    pub(crate) fn take_reads(&mut self, max: usize) -> Vec<String> {
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(name) = self.pending.pop_first() else {
                break;
            };
            if !self.watched.contains(&name) {
                batch.push(name);
            }
        }
        batch
    }

    /// A read failed: queue it again. Single reads fail too, so Consul itself is failing:
    /// the next round may try a bulk read again.
    pub(crate) fn read_failed(&mut self, name: String) {
        self.pending.insert(name);
        self.per_service = false;
    }

    /// Whether some listed service has no long-poll (then the health feed runs).
    pub(crate) fn has_cold(&self) -> bool {
        self.catalog
            .as_ref()
            .is_some_and(|c| c.len() > self.watched.len())
    }

    /// A new answer from `/v1/health/state/any`. Its diff against the last one queues the
    /// cold services whose checks changed, and for a node check, the cold services with an
    /// instance on that node. While a bulk read is in flight it is held for that read's end:
    /// the bulk read covers every cold service up to its own checks answer.
    pub(crate) fn apply_checks(&mut self, checks: &[Check]) -> Outcome {
        let fresh = fingerprints(checks);
        if let Some(flight) = &mut self.bulk {
            flight.feed = Some(fresh);
            return Outcome::default();
        }
        let old = std::mem::take(&mut self.fingerprints);
        let out = self.queue_changed(&old, &fresh);
        self.fingerprints = fresh;
        out
    }

    /// Queues the cold services whose checks differ between two sets of fingerprints.
    fn queue_changed(
        &mut self,
        old: &HashMap<String, u64>,
        fresh: &HashMap<String, u64>,
    ) -> Outcome {
        let changed = fresh
            .iter()
            .filter(|(k, v)| old.get(*k) != Some(v))
            .map(|(k, _)| k)
            .chain(old.keys().filter(|k| !fresh.contains_key(*k)));
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        for key in changed {
            if let Some(node) = key.strip_prefix("node:") {
                // A node check changes the health of every service on that node.
                for (svc, specs) in &self.instances {
                    if specs.iter().any(|s| s.node == node) {
                        wanted.insert(svc.to_string());
                    }
                }
            } else if let Some(svc) = key.strip_prefix("service:") {
                wanted.insert(svc.to_owned());
            }
        }
        let mut out = Outcome::default();
        for svc in wanted {
            let known = self.catalog.as_ref().is_some_and(|c| c.contains_key(&svc));
            if known && !self.watched.contains(&svc) {
                out.read |= self.pending.insert(svc);
            }
        }
        out
    }

    /// Where the health feed starts when it has no index yet: `Wait` while a bulk read is
    /// in flight (it reads the same checks), `From(index)` of the last bulk read's checks
    /// (its fingerprints are the baseline), else `Now`.
    pub(crate) fn feed_start(&mut self) -> FeedStart {
        if self.bulk.is_some() {
            return FeedStart::Wait;
        }
        match self.feed_seed.take() {
            Some(index) => FeedStart::From(index),
            None => FeedStart::Now,
        }
    }

    /// The index of the service list's latest answer.
    pub(crate) fn catalog_index(&mut self, index: u64) {
        self.catalog_index = index;
    }

    /// The sweep: queues every cold service, since Meta-only changes show in no global feed.
    /// The reader then reads them in one bulk read when that costs less. Nothing to do when
    /// no registration changed since the last bulk read (the service list's index has not
    /// moved): a quiet cluster costs no reads.
    pub(crate) fn sweep(&mut self) -> Outcome {
        if self.read_index != 0 && self.read_index == self.catalog_index {
            return Outcome::default();
        }
        let cold: Vec<String> = self
            .catalog
            .iter()
            .flat_map(|c| c.keys())
            .filter(|n| !self.watched.contains(*n))
            .cloned()
            .collect();
        let read = !cold.is_empty();
        self.pending.extend(cold);
        Outcome {
            read,
            ..Outcome::default()
        }
    }

    /// `None` before the first catalog; else whether every listed service has been read.
    pub(crate) fn complete(&self) -> Option<bool> {
        let catalog = self.catalog.as_ref()?;
        Some(
            catalog
                .keys()
                .all(|k| self.instances.contains_key(k.as_str())),
        )
    }

    /// What the next table is built from; `None` before the first catalog. Every listed
    /// service goes in: one not read yet is known, with no instance (503), never unknown
    /// (404), unless the catalog's tags hide it.
    pub(crate) fn build_input(&self) -> Option<BuildInput> {
        let catalog = self.catalog.clone()?;
        let mut snapshot = self.instances.clone();
        for name in catalog.keys() {
            if !snapshot.contains_key(name.as_str()) {
                snapshot.insert(Arc::from(name.as_str()), Arc::from(Vec::new()));
            }
        }
        Some((snapshot, catalog))
    }

    /// Cold services queued for a read, in order (for tests).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> Vec<&str> {
        self.pending.iter().map(String::as_str).collect()
    }
}

/// One fingerprint per service (`service:<name>`) and per node's own checks (`node:<name>`).
fn fingerprints(checks: &[Check]) -> HashMap<String, u64> {
    let mut groups: HashMap<String, Vec<(&str, &str, &str)>> = HashMap::new();
    for c in checks {
        let key = if c.service_name.is_empty() {
            format!("node:{}", c.node)
        } else {
            format!("service:{}", c.service_name)
        };
        groups
            .entry(key)
            .or_default()
            .push((&c.service_id, &c.check_id, &c.status));
    }
    groups
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_unstable();
            let mut h = DefaultHasher::new();
            v.hash(&mut h);
            (k, h.finish())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::routing::Health;

    fn check(node: &str, svc: &str, id: &str, status: &str) -> Check {
        Check {
            node: node.into(),
            check_id: id.into(),
            status: status.into(),
            service_id: if svc.is_empty() {
                String::new()
            } else {
                format!("{svc}-1")
            },
            service_name: svc.into(),
        }
    }

    /// `/v1/health/service/<svc>` entries: one instance per `(id, node, status)`.
    fn entries(svc: &str, instances: &[(&str, &str, &str)]) -> Vec<HealthEntry> {
        let v: Vec<serde_json::Value> = instances
            .iter()
            .map(|(id, node, status)| {
                serde_json::json!({
                    "Node": {"Node": node, "Address": "10.0.0.1"},
                    "Service": {"ID": id, "Service": svc, "Port": 80},
                    "Checks": [{"Node": node, "CheckID": format!("c-{id}"), "Status": status,
                                "ServiceID": id, "ServiceName": svc}]
                })
            })
            .collect();
        serde_json::from_value(serde_json::Value::Array(v)).expect("entries")
    }

    fn catalog(names: &[&str]) -> CatalogTags {
        names.iter().map(|n| (n.to_string(), Vec::new())).collect()
    }

    fn never(_: &str) -> u64 {
        0
    }

    fn nothing_excluded(_: &str) -> bool {
        false
    }

    fn model(max_watches: usize) -> Model {
        Model::new(max_watches, Instant::now())
    }

    fn watched(m: &Model) -> Vec<&str> {
        m.watched().iter().map(String::as_str).collect()
    }

    #[test]
    fn fingerprints_move_only_for_the_changed_service() {
        let a = fingerprints(&[
            check("n1", "", "serfHealth", "passing"),
            check("n1", "chat", "c1", "passing"),
            check("n1", "mail", "m1", "passing"),
        ]);
        let b = fingerprints(&[
            check("n1", "", "serfHealth", "passing"),
            check("n1", "chat", "c1", "critical"),
            check("n1", "mail", "m1", "passing"),
        ]);
        assert_ne!(a["service:chat"], b["service:chat"]);
        assert_eq!(a["service:mail"], b["service:mail"]);
        assert_eq!(a["node:n1"], b["node:n1"]);
    }

    #[test]
    fn every_service_is_watched_while_there_are_few() {
        let mut m = model(4);
        let out = m.apply_catalog(catalog(&["a", "b", "c"]), nothing_excluded, never);
        assert!(out.rebuild && out.watches);
        assert!(!out.read, "watched services need no plain read");
        assert_eq!(watched(&m), ["a", "b", "c"]);
        assert!(!m.has_cold());
        assert_eq!(m.complete(), Some(false), "listed, not read yet");
        // The first table before any read: every listed service, with no instance.
        let (input, _) = m.build_input().expect("catalog");
        assert!(input.values().all(|specs| specs.is_empty()));
        assert_eq!(input.len(), 3);
    }

    #[test]
    fn nothing_to_build_before_the_catalog() {
        let mut m = model(4);
        assert_eq!(m.complete(), None);
        assert!(m.build_input().is_none());
        // A service answer racing the first catalog is not kept.
        assert_eq!(
            m.apply_service("a", &entries("a", &[("a1", "n1", "passing")]), true),
            Outcome::default()
        );
        // An empty catalog still makes a (ready, empty) table.
        let out = m.apply_catalog(CatalogTags::new(), nothing_excluded, never);
        assert!(out.rebuild);
        assert_eq!(m.complete(), Some(true));
    }

    #[test]
    fn beyond_max_watches_the_most_recently_used_are_watched() {
        let mut m = model(2);
        let used: HashMap<&str, u64> = [("a", 5), ("b", 0), ("c", 9), ("d", 5)].into();
        let last_used = |n: &str| used.get(n).copied().unwrap_or(0);
        let out = m.apply_catalog(catalog(&["a", "b", "c", "d"]), nothing_excluded, last_used);
        assert!(out.read && out.watches);
        // c, then a before d by name.
        assert_eq!(watched(&m), ["a", "c"]);
        assert_eq!(m.pending(), ["b", "d"], "cold services are read once");
        assert!(m.has_cold());

        // Traffic moves to b: at the next choice it takes a's watch, and a is read once more.
        let used: HashMap<&str, u64> = [("a", 5), ("b", 12), ("c", 9)].into();
        m.take_reads(4);
        let out = m.choose_watched(|n| used.get(n).copied().unwrap_or(0));
        assert!(out.watches && out.read);
        assert_eq!(watched(&m), ["b", "c"]);
        assert_eq!(m.pending(), ["a"]);
        // Nothing moved: nothing to do.
        assert_eq!(
            m.choose_watched(|n| used.get(n).copied().unwrap_or(0)),
            Outcome::default()
        );
    }

    #[test]
    fn the_catalog_decides_membership_and_exclusions() {
        let mut m = model(0);
        let excluded = |n: &str| n.eq_ignore_ascii_case("consul");
        let out = m.apply_catalog(catalog(&["Consul", "a", "b"]), excluded, never);
        assert!(out.read && !out.watches);
        assert_eq!(m.pending(), ["a", "b"], "excluded names are never read");
        assert_eq!(m.take_reads(4), ["a", "b"]);
        assert_eq!(m.complete(), Some(false));
        for svc in ["a", "b"] {
            let got = m.apply_service(svc, &entries(svc, &[("x", "n1", "passing")]), false);
            assert!(got.rebuild);
        }
        assert_eq!(m.complete(), Some(true));

        // Same tags again: nothing to read.
        let out = m.apply_catalog(catalog(&["Consul", "a", "b"]), excluded, never);
        assert!(!out.read);
        // b leaves: its instances go, and a late answer for it does not bring it back.
        let mut tags = catalog(&["a"]);
        tags.insert("a".into(), vec!["router.expose=true".into()]);
        let out = m.apply_catalog(tags, excluded, never);
        assert!(out.rebuild && out.read, "a's tags changed: read it");
        assert_eq!(m.pending(), ["a"]);
        let late = m.apply_service("b", &entries("b", &[("y", "n1", "passing")]), false);
        assert_eq!(late, Outcome::default());
        let (input, tags) = m.build_input().expect("catalog");
        assert_eq!(input.keys().map(|k| &**k).collect::<Vec<_>>(), ["a"]);
        assert_eq!(tags["a"], ["router.expose=true"]);
    }

    #[test]
    fn plain_reads_never_overwrite_a_watch_and_equal_answers_change_nothing() {
        let mut m = model(1);
        let _ = m.apply_catalog(catalog(&["a"]), nothing_excluded, never);
        let fresh = entries("a", &[("a1", "n1", "critical")]);
        assert!(m.apply_service("a", &fresh, true).rebuild);
        let old = entries("a", &[("a1", "n1", "passing")]);
        assert_eq!(m.apply_service("a", &old, false), Outcome::default());
        assert_eq!(m.apply_service("a", &fresh, true), Outcome::default());
        let (input, _) = m.build_input().expect("catalog");
        assert_eq!(input["a"][0].health, Health::Critical);
        // Entries for another service (a prefix match, say) are not this one's.
        let other = entries("ab", &[("ab1", "n1", "passing")]);
        assert!(m.apply_service("a", &other, true).rebuild);
        assert!(m.build_input().expect("catalog").0["a"].is_empty());
    }

    #[test]
    fn reads_go_in_batches_and_failures_are_queued_again() {
        let mut m = model(0);
        let names: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let _ = m.apply_catalog(catalog(&names), nothing_excluded, never);
        assert_eq!(m.take_reads(4), ["s0", "s1", "s2", "s3"]);
        m.read_failed("s1".into());
        assert_eq!(m.take_reads(4), ["s1", "s4", "s5"]);
        assert!(m.take_reads(4).is_empty());
    }

    #[test]
    fn the_health_feed_queues_only_changed_cold_services() {
        let mut m = model(1);
        let used = |n: &str| u64::from(n == "w");
        let _ = m.apply_catalog(catalog(&["w", "x", "y", "z"]), nothing_excluded, used);
        assert_eq!(watched(&m), ["w"]);
        m.take_reads(4);
        let _ = m.apply_service("y", &entries("y", &[("y1", "n2", "passing")]), false);
        let base = vec![
            check("n1", "", "serfHealth", "passing"),
            check("n2", "", "serfHealth", "passing"),
            check("n1", "w", "w1", "passing"),
            check("n1", "x", "x1", "passing"),
            check("n2", "y", "y1", "passing"),
        ];
        // The first feed: everything is new, and every cold service it names is read.
        assert!(m.apply_checks(&base).read);
        assert_eq!(m.pending(), ["x", "y"], "w is watched; z has no check");
        m.take_reads(4);
        assert_eq!(m.apply_checks(&base), Outcome::default(), "no change");

        // x's check flips; w's too, but w has its own watch.
        let mut flipped = base.clone();
        flipped[2].status = "critical".into();
        flipped[3].status = "critical".into();
        assert!(m.apply_checks(&flipped).read);
        assert_eq!(m.pending(), ["x"]);
        m.take_reads(4);

        // z gets an instance with a check (membership); x's check leaves.
        let mut joined = flipped.clone();
        joined.remove(3);
        joined.push(check("n1", "z", "z1", "passing"));
        assert!(m.apply_checks(&joined).read);
        assert_eq!(m.pending(), ["x", "z"]);
        m.take_reads(4);

        // Node n2 fails: y has an instance there.
        let mut node = joined.clone();
        node[1].status = "critical".into();
        assert!(m.apply_checks(&node).read);
        assert_eq!(m.pending(), ["y"]);
    }

    #[test]
    fn the_sweep_queues_every_cold_service() {
        let mut m = model(1);
        assert_eq!(m.sweep(), Outcome::default(), "nothing before the catalog");
        let used = |n: &str| u64::from(n == "b");
        let _ = m.apply_catalog(catalog(&["a", "b", "c"]), nothing_excluded, used);
        m.take_reads(4);
        assert!(m.sweep().read);
        assert_eq!(m.pending(), ["a", "c"]);
        let mut all = model(3);
        let _ = all.apply_catalog(catalog(&["a", "b", "c"]), nothing_excluded, never);
        assert_eq!(all.sweep(), Outcome::default(), "nothing is cold");
    }

    /// A bulk read over `nodes` nodes: `(service, id, node, status)` instances, whose checks
    /// (plus `extra`) are its checks answer.
    fn bulk(nodes: usize, instances: &[(&str, &str, &str, &str)], extra: &[Check]) -> BulkRead {
        let mut read = BulkRead {
            nodes,
            checks: extra.to_vec(),
            ..BulkRead::default()
        };
        for (svc, id, node, status) in instances {
            read.services.entry(svc.to_string()).or_default().extend(
                entries(svc, &[(id, node, status)])
                    .iter()
                    .map(HealthEntry::to_spec),
            );
            read.checks.push(Check {
                service_id: id.to_string(),
                ..check(node, svc, &format!("c-{id}"), status)
            });
        }
        read
    }

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i:03}")).collect()
    }

    #[test]
    fn a_large_start_is_one_bulk_read_that_counts_as_read() {
        let mut m = model(2);
        let all = names("s", 10);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let used = |n: &str| u64::from(n == "s000" || n == "s001");
        let _ = m.apply_catalog(catalog(&all), nothing_excluded, used);
        assert_eq!(watched(&m), ["s000", "s001"]);
        // 8 queued, more than max_watches while the node count is unknown.
        assert_eq!(m.next_reads(4), Reads::Bulk);
        assert!(m.pending().is_empty(), "the bulk read took the queue");
        assert_eq!(m.complete(), Some(false));

        // The health feed's first answer comes while the bulk read is in flight: held back.
        let read = bulk(
            1,
            &[
                ("s000", "s000-1", "n1", "critical"),
                ("s002", "s002-1", "n1", "passing"),
                ("s003", "s003-1", "n2", "warning"),
            ],
            &[check("n1", "", "serfHealth", "passing")],
        );
        assert_eq!(m.apply_checks(&read.checks), Outcome::default());
        // A watch answered first: the bulk read, a plain read, does not overwrite it.
        let _ = m.apply_service(
            "s000",
            &entries("s000", &[("s000-1", "n1", "passing")]),
            true,
        );
        let out = m.apply_bulk(read.clone());
        assert!(out.rebuild);
        assert!(
            !out.read,
            "the feed saw what the bulk read saw: nothing to re-read"
        );
        assert!(m.pending().is_empty());
        let (input, _) = m.build_input().expect("catalog");
        assert_eq!(
            input["s000"][0].health,
            Health::Passing,
            "the watch's answer"
        );
        assert_eq!(input["s003"][0].health, Health::Warning);
        assert!(input["s009"].is_empty(), "in no node answer: no instance");
        // Every cold service was read; the first table waits only for s001's watch.
        assert_eq!(m.complete(), Some(false));
        let _ = m.apply_service("s001", &[], true);
        assert_eq!(m.complete(), Some(true));

        // The sweep: 8 cold services on one node, one bulk read; the same again changes
        // nothing.
        let _ = m.sweep();
        assert_eq!(m.next_reads(4), Reads::Bulk);
        assert_eq!(m.apply_bulk(read.clone()), Outcome::default());
        // The feed's next answer names only real changes since the bulk read.
        assert_eq!(m.apply_checks(&read.checks), Outcome::default());
        let mut moved = read.checks.clone();
        moved[2].status = "critical".into();
        assert!(m.apply_checks(&moved).read);
        assert_eq!(m.pending(), ["s002"]);
    }

    #[test]
    fn the_health_feed_starts_from_the_bulk_reads_checks() {
        let mut m = model(0);
        let all = names("s", 10);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let _ = m.apply_catalog(catalog(&all), nothing_excluded, never);
        assert_eq!(m.feed_start(), FeedStart::Now, "no bulk read yet");
        assert_eq!(m.next_reads(4), Reads::Bulk);
        assert_eq!(
            m.feed_start(),
            FeedStart::Wait,
            "the bulk read reads the checks"
        );
        let read = BulkRead {
            checks_index: 42,
            ..bulk(1, &[("s000", "a1", "n1", "passing")], &[])
        };
        let _ = m.apply_bulk(read);
        assert_eq!(m.feed_start(), FeedStart::From(42));
        assert_eq!(m.feed_start(), FeedStart::Now, "taken once");
    }

    #[test]
    fn the_sweep_waits_for_the_catalog_index_to_move() {
        let mut m = model(0);
        let all = names("s", 10);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        m.catalog_index(7);
        let _ = m.apply_catalog(catalog(&all), nothing_excluded, never);
        assert_eq!(m.next_reads(4), Reads::Bulk);
        let _ = m.apply_bulk(bulk(1, &[("s000", "a1", "n1", "passing")], &[]));
        // Nothing registered since the bulk read: the sweep has nothing to find.
        assert_eq!(m.sweep(), Outcome::default());
        assert!(m.pending().is_empty());
        // A Meta change somewhere moves the index: the next sweep reads every cold service.
        m.catalog_index(8);
        assert!(m.sweep().read);
        assert_eq!(m.pending(), all);
    }

    #[test]
    fn changes_the_feed_saw_during_a_bulk_read_are_read_again() {
        let mut m = model(0);
        let _ = m.apply_catalog(catalog(&["a", "b", "c"]), nothing_excluded, never);
        assert_eq!(m.next_reads(4), Reads::Bulk);
        let read = bulk(
            1,
            &[("a", "a1", "n1", "passing"), ("b", "b1", "n1", "passing")],
            &[],
        );
        // Meanwhile b's check flipped and c got an instance with a check.
        let mut feed = read.checks.clone();
        feed[1].status = "critical".into();
        feed.push(check("n1", "c", "c-c1", "passing"));
        assert_eq!(m.apply_checks(&feed), Outcome::default(), "held back");
        assert!(m.apply_bulk(read).read);
        assert_eq!(m.pending(), ["b", "c"]);
        // The feed's answer is the baseline now: repeating it names nothing.
        let _ = m.take_reads(4);
        assert_eq!(m.apply_checks(&feed), Outcome::default());
    }

    #[test]
    fn bulk_reads_when_they_save_requests_and_single_reads_for_a_few() {
        let mut m = model(0);
        let all = names("s", 200);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let _ = m.apply_catalog(catalog(&all), nothing_excluded, never);
        assert_eq!(m.next_reads(4), Reads::Bulk);
        let _ = m.apply_bulk(bulk(3, &[], &[]));
        let queue = |m: &mut Model, n: usize| {
            for name in &all[..n] {
                m.read_failed(name.to_string());
            }
        };
        // 3 nodes: a bulk read costs 5 requests; it must save half of them, and the queue
        // must be at least 1/16 of the 200 cold services.
        queue(&mut m, 10);
        assert!(matches!(m.next_reads(4), Reads::Each(b) if b.len() == 4));
        queue(&mut m, 12);
        assert!(
            matches!(m.next_reads(4), Reads::Each(_)),
            "12 of 200: too few"
        );
        queue(&mut m, 13);
        assert_eq!(m.next_reads(4), Reads::Bulk);
        let _ = m.apply_bulk(bulk(3, &[], &[]));
        assert_eq!(m.next_reads(4), Reads::Idle);
        // The sweep reads every cold service: one bulk read.
        assert!(m.sweep().read);
        assert_eq!(m.next_reads(4), Reads::Bulk);
        // With as many nodes as services, single reads are cheaper, even for the sweep.
        let _ = m.apply_bulk(bulk(200, &[], &[]));
        let _ = m.sweep();
        assert!(matches!(m.next_reads(4), Reads::Each(_)));
    }

    #[test]
    fn a_failed_bulk_read_falls_back_to_single_reads() {
        let mut m = model(0);
        let all = names("s", 20);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let _ = m.apply_catalog(catalog(&all), nothing_excluded, never);
        let base = vec![check("n1", "", "serfHealth", "passing")];
        let _ = m.apply_checks(&base);
        assert_eq!(m.next_reads(4), Reads::Bulk);
        // The feed answers meanwhile (a node check flipped), then the bulk read fails.
        let mut flipped = base.clone();
        flipped[0].status = "critical".into();
        let _ = m.apply_checks(&flipped);
        assert!(m.bulk_failed().read);
        assert_eq!(m.pending().len(), 20, "the queue is back");
        assert_eq!(
            m.apply_checks(&flipped),
            Outcome::default(),
            "the feed was applied"
        );
        // Single reads now, though the queue is large.
        let first: Vec<String> = all[..4].iter().map(|s| s.to_string()).collect();
        assert_eq!(m.next_reads(4), Reads::Each(first.clone()));
        for name in &first[1..] {
            let _ = m.apply_service(name, &[], false);
        }
        // A single read fails too: Consul itself failed; a bulk read may be tried again.
        m.read_failed(first[0].clone());
        assert_eq!(m.next_reads(4), Reads::Bulk);
        // A reader that panicked mid-read left it open: the next call puts the queue back.
        assert_eq!(m.next_reads(4), Reads::Bulk);
        assert!(m.bulk_failed().read);
        while let Reads::Each(batch) = m.next_reads(4) {
            for name in batch {
                let _ = m.apply_service(&name, &[], false);
            }
        }
        assert_eq!(m.complete(), Some(true));
        // Drained: the next large queue is read in bulk again.
        let _ = m.sweep();
        assert_eq!(m.next_reads(4), Reads::Bulk);
    }

    #[tokio::test(start_paused = true)]
    async fn the_answer_age_counts_from_the_last_answer() {
        let mut m = model(1);
        let s = Duration::from_secs;
        tokio::time::advance(s(3)).await;
        assert_eq!(m.answer_age(Instant::now()), s(3), "no answer yet");
        m.answered(Instant::now());
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(m.answer_age(Instant::now()), Duration::from_millis(1500));

        // A quiet cluster: the blocking query stays open for its whole wait, and is fresh.
        m.answered(Instant::now());
        m.blocking(Instant::now(), Instant::now() + s(100));
        tokio::time::advance(s(90)).await;
        assert_eq!(
            m.answer_age(Instant::now()),
            Duration::ZERO,
            "open and on time"
        );
        // Overdue: Consul should have answered by now.
        tokio::time::advance(s(30)).await;
        assert_eq!(m.answer_age(Instant::now()), s(20), "past its due time");
        // It fails: the age counts from the last answer.
        m.blocking_ended();
        assert_eq!(m.answer_age(Instant::now()), s(120));
        // Queries that fail at once (Consul refuses connections) never look current.
        for _ in 0..5 {
            m.blocking(Instant::now(), Instant::now() + s(100));
            tokio::time::advance(Duration::from_millis(250)).await;
            m.blocking_ended();
        }
        assert_eq!(
            m.answer_age(Instant::now()),
            s(120) + Duration::from_millis(1250)
        );
    }
}
