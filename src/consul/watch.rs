//! Discovery: watches Consul with blocking queries and rebuilds the routing table on change.
//!
//! Connections to Consul stay bounded whatever the number of services:
//! - one long-poll on `/v1/catalog/services` (the set of services and their tags);
//! - one long-poll on `/v1/health/service/<name>` per *watched* service, at most
//!   `consul.max_watches`: every service while there are no more than that, else the ones that
//!   carried traffic most recently;
//! - while some services are not watched ("cold"): one long-poll on `/v1/health/state/any`,
//!   whose diff names the cold services whose checks changed (membership included), plus a
//!   slow sweep for Meta-only changes; both re-read just those services, four at a time.
//!
//! Every change lands in one shared model; the rebuilder waits a short window so a burst
//! becomes one rebuild, builds the table and swaps it in. Errors never remove anything: the
//! model keeps the last good answer until Consul gives a new one.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::config::ConsulConfig;
use crate::routing::{build, BuildOptions, CatalogTags, InstanceSpec, Routes, StateRegistry};

use super::client::ConsulClient;
use super::supervise::{supervise, AbortOnDrop, Backoff};
use super::types::{Check, HealthEntry};

/// Least time between two queries of one loop, so a hot key cannot spin a watcher.
const MIN_QUERY_GAP: Duration = Duration::from_millis(50);
/// Cold services re-read at once.
const READ_CONCURRENCY: usize = 4;
/// How often the watched set is re-chosen by traffic.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);
/// Longest wait for every service's first read before the table goes live anyway.
const READY_DEADLINE: Duration = Duration::from_secs(10);

type LoopFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The discovery model and its loops. Create with [`Discovery::new`], start with
/// [`Discovery::spawn`].
#[derive(Debug)]
pub struct Discovery {
    client: ConsulClient,
    cfg: ConsulConfig,
    build: BuildOptions,
    routes: Arc<Routes>,
    me: Weak<Discovery>,
    state: Mutex<Model>,
    /// Wakes the rebuilder.
    changed: Notify,
    /// Wakes the reader of cold services.
    reads: Notify,
    /// Set on shutdown: no new watch may start.
    stopped: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct Model {
    /// `/v1/catalog/services` without excluded names; `None` until its first answer. Shared
    /// with the rebuilder, whose build reads its tags.
    catalog: Option<Arc<CatalogTags>>,
    /// Instances per service, as last read.
    instances: BTreeMap<Arc<str>, Arc<[InstanceSpec]>>,
    /// Services with their own long-poll.
    watches: HashMap<String, AbortOnDrop>,
    /// Cold services waiting to be re-read.
    pending: BTreeSet<String>,
    /// Fingerprints of each service's (and node's) checks from `/v1/health/state/any`.
    fingerprints: HashMap<String, u64>,
}

impl Model {
    /// The instances the build reads. Every listed service goes in: one not read yet is known,
    /// with no instance (503), never unknown (404), unless the catalog's tags hide it.
    fn build_input(&self, catalog: &CatalogTags) -> BTreeMap<Arc<str>, Arc<[InstanceSpec]>> {
        let mut snapshot = self.instances.clone();
        for name in catalog.keys() {
            if !snapshot.contains_key(name.as_str()) {
                snapshot.insert(Arc::from(name.as_str()), Arc::from(Vec::new()));
            }
        }
        snapshot
    }
}

/// Keeps discovery running; dropping it stops every task and watch.
#[derive(Debug)]
pub struct DiscoveryHandle {
    discovery: Arc<Discovery>,
    _tasks: Vec<AbortOnDrop>,
}

impl DiscoveryHandle {
    /// The discovery behind this handle.
    pub fn discovery(&self) -> &Arc<Discovery> {
        &self.discovery
    }
}

impl Drop for DiscoveryHandle {
    fn drop(&mut self) {
        self._tasks.clear();
        // Under the lock, so a reconcile running now cannot start new watches after this.
        let mut st = self.discovery.lock();
        self.discovery
            .stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        st.watches.clear();
    }
}

impl Discovery {
    /// A discovery that publishes into `routes`.
    pub fn new(
        client: ConsulClient,
        cfg: ConsulConfig,
        build: BuildOptions,
        routes: Arc<Routes>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Discovery {
            me: me.clone(),
            client,
            cfg,
            build,
            routes,
            state: Mutex::new(Model::default()),
            changed: Notify::new(),
            reads: Notify::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Starts the supervised loops.
    pub fn spawn(self: &Arc<Self>) -> DiscoveryHandle {
        let tasks = vec![
            self.supervised("catalog-watch", |d| Box::pin(d.catalog_loop())),
            self.supervised("health-state-watch", |d| Box::pin(d.health_loop())),
            self.supervised("cold-reader", |d| Box::pin(d.reader_loop())),
            self.supervised("sweep", |d| Box::pin(d.sweep_loop())),
            self.supervised("reconcile", |d| Box::pin(d.reconcile_loop())),
            self.supervised("rebuild", |d| Box::pin(d.rebuild_loop())),
        ];
        DiscoveryHandle {
            discovery: self.clone(),
            _tasks: tasks,
        }
    }

    fn supervised(
        self: &Arc<Self>,
        name: &str,
        run: fn(Arc<Discovery>) -> LoopFuture,
    ) -> AbortOnDrop {
        let me = self.clone();
        supervise(name.to_owned(), move || run(me.clone()))
    }

    /// Number of long-polls open now (for tests and the admin API).
    pub fn watch_count(&self) -> usize {
        self.lock().watches.len()
    }

    /// Names of the services with their own long-poll, sorted.
    pub fn watched(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().watches.keys().cloned().collect();
        v.sort();
        v
    }

    fn lock(&self) -> MutexGuard<'_, Model> {
        // A panic while holding the lock leaves a consistent-enough model: keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn catalog_loop(self: Arc<Self>) {
        let mut index = 0;
        // The index of the catalog last applied; kept apart from the blocking index, which
        // resets to 0, so a rewind is always noticed.
        let mut applied = 0;
        let mut backoff = Backoff::default();
        let mut last = Instant::now() - MIN_QUERY_GAP;
        loop {
            pace(&mut last).await;
            match self.client.catalog_services(index, self.cfg.wait).await {
                Ok(r) if r.index == 0 => {
                    tracing::warn!("catalog answer without X-Consul-Index; retrying later");
                    backoff.wait().await;
                }
                Ok(mut r) => {
                    backoff.reset();
                    if r.index < applied {
                        // A rewound index: a restarted cluster, or a stale server far behind.
                        // Only the leader's answer may replace what we have.
                        match self.client.catalog_services_consistent().await {
                            Ok(confirmed) => r = confirmed,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot confirm a rewound catalog; keeping the last table");
                                backoff.wait().await;
                                continue;
                            }
                        }
                    }
                    index = next_index(index, r.index);
                    applied = r.index;
                    self.apply_catalog(r.value);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "catalog watch failed; keeping the last routing table");
                    backoff.wait().await;
                }
            }
        }
    }

    fn apply_catalog(&self, mut new: CatalogTags) {
        // Excluded services are never routed: never watched or read either.
        new.retain(|name, _| !self.build.is_excluded(name));
        let mut removed = false;
        let mut queued = false;
        {
            let mut st = self.lock();
            let before = st.instances.len();
            st.instances.retain(|name, _| new.contains_key(&**name));
            removed = removed || st.instances.len() != before;
            st.watches.retain(|name, _| new.contains_key(name));
            st.pending.retain(|name| new.contains_key(name));
            for (name, tags) in &new {
                let changed = st.catalog.as_ref().and_then(|c| c.get(name)) != Some(tags);
                if changed && !st.watches.contains_key(name) {
                    queued |= st.pending.insert(name.clone());
                }
            }
            st.catalog = Some(Arc::new(new));
        }
        self.reconcile();
        if removed {
            self.changed.notify_one();
        }
        if queued {
            self.reads.notify_one();
        }
        // The first answer must reach the rebuilder even for an empty catalog.
        self.changed.notify_one();
    }

    /// Chooses the watched set: all services up to `max_watches`, else the most recently used.
    fn reconcile(&self) {
        let table = self.routes.load();
        let mut st = self.lock();
        // Checked under the lock: shutdown sets it under the same lock.
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let Some(catalog) = &st.catalog else {
            return;
        };
        let desired: HashSet<String> = if catalog.len() <= self.cfg.max_watches {
            catalog.keys().cloned().collect()
        } else {
            let mut by_use: Vec<(u64, &String)> = catalog
                .keys()
                .map(|n| {
                    let used = table
                        .services
                        .get(n.as_str())
                        .map_or(0, |s| s.stats.last_used());
                    (used, n)
                })
                .collect();
            by_use.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
            by_use
                .into_iter()
                .take(self.cfg.max_watches)
                .map(|(_, n)| n.clone())
                .collect()
        };
        let demoted: Vec<String> = st
            .watches
            .keys()
            .filter(|n| !desired.contains(*n))
            .cloned()
            .collect();
        let requeued = !demoted.is_empty();
        for name in demoted {
            // It may have missed a change while its watch backed off: read it once more.
            st.watches.remove(&name);
            st.pending.insert(name);
        }
        for name in desired {
            if st.watches.contains_key(&name) {
                continue;
            }
            st.pending.remove(&name);
            // Watches hold the discovery weakly: the handle owns it.
            let me = self.me.clone();
            let n = name.clone();
            let guard = supervise(format!("watch:{name}"), move || {
                let me = me.clone();
                let n = n.clone();
                async move {
                    if let Some(me) = me.upgrade() {
                        me.service_loop(n).await;
                    }
                }
            });
            st.watches.insert(name, guard);
        }
        drop(st);
        if requeued {
            self.reads.notify_one();
        }
    }

    async fn service_loop(self: Arc<Self>, name: String) {
        let mut index = 0;
        let mut backoff = Backoff::default();
        let mut last = Instant::now() - MIN_QUERY_GAP;
        while !self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            pace(&mut last).await;
            match self
                .client
                .health_service(&name, index, self.cfg.wait)
                .await
            {
                Ok(r) if r.index == 0 => {
                    tracing::warn!(service = %name, "answer without X-Consul-Index; retrying later");
                    backoff.wait().await;
                }
                Ok(r) => {
                    backoff.reset();
                    index = next_index(index, r.index);
                    self.apply_service(&name, &r.value, true);
                }
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "service watch failed; keeping its last instances");
                    backoff.wait().await;
                }
            }
        }
        // Stopped: wait to be aborted rather than return (a return means "restart me").
        std::future::pending::<()>().await;
    }

    /// Stores a service's instances. `from_watch` is false for plain reads, which must not
    /// overwrite what a watch (always newer) has stored.
    fn apply_service(&self, name: &str, entries: &[HealthEntry], from_watch: bool) {
        let mut specs: Vec<InstanceSpec> = entries
            .iter()
            .filter(|e| e.service.service == name)
            .map(HealthEntry::to_spec)
            .collect();
        specs.sort_by(|a, b| a.id.cmp(&b.id));
        let mut st = self.lock();
        // A late answer for a service that has left the catalog must not bring it back.
        if !st.catalog.as_ref().is_some_and(|c| c.contains_key(name)) {
            return;
        }
        if !from_watch && st.watches.contains_key(name) {
            return;
        }
        if st.instances.get(name).is_some_and(|old| **old == *specs) {
            return;
        }
        st.instances.insert(Arc::from(name), Arc::from(specs));
        drop(st);
        self.changed.notify_one();
    }

    /// Re-reads queued cold services, a few at a time.
    async fn reader_loop(self: Arc<Self>) {
        let mut backoff = Backoff::default();
        loop {
            let batch: Vec<String> = {
                let mut st = self.lock();
                let mut batch = Vec::new();
                while batch.len() < READ_CONCURRENCY {
                    let Some(name) = st.pending.pop_first() else {
                        break;
                    };
                    if !st.watches.contains_key(&name) {
                        batch.push(name);
                    }
                }
                batch
            };
            if batch.is_empty() {
                self.reads.notified().await;
                continue;
            }
            let mut set = JoinSet::new();
            for name in batch {
                let client = self.client.clone();
                set.spawn(async move {
                    let r = client.health_service(&name, 0, Duration::ZERO).await;
                    (name, r)
                });
            }
            let mut failed = false;
            while let Some(joined) = set.join_next().await {
                let Ok((name, result)) = joined else { continue };
                match result {
                    Ok(r) => self.apply_service(&name, &r.value, false),
                    Err(e) => {
                        tracing::warn!(service = %name, error = %e, "service read failed; will retry");
                        self.lock().pending.insert(name);
                        failed = true;
                    }
                }
            }
            if failed {
                backoff.wait().await;
            } else {
                backoff.reset();
            }
        }
    }

    /// Watches every check while some services are cold; queues those whose checks changed.
    async fn health_loop(self: Arc<Self>) {
        let mut index = 0;
        let mut backoff = Backoff::default();
        let mut last = Instant::now() - MIN_QUERY_GAP;
        loop {
            if !self.has_cold() {
                index = 0;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            pace(&mut last).await;
            match self.client.health_state_any(index, self.cfg.wait).await {
                Ok(r) if r.index == 0 => {
                    tracing::warn!("health answer without X-Consul-Index; retrying later");
                    backoff.wait().await;
                }
                Ok(r) => {
                    backoff.reset();
                    index = next_index(index, r.index);
                    self.apply_checks(&r.value);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "health watch failed; keeping the last routing table");
                    backoff.wait().await;
                }
            }
        }
    }

    fn has_cold(&self) -> bool {
        let st = self.lock();
        st.catalog
            .as_ref()
            .is_some_and(|c| c.len() > st.watches.len())
    }

    fn apply_checks(&self, checks: &[Check]) {
        let fresh = fingerprints(checks);
        let mut queued = false;
        let mut st = self.lock();
        let changed: Vec<&String> = fresh
            .iter()
            .filter(|(k, v)| st.fingerprints.get(*k) != Some(v))
            .map(|(k, _)| k)
            .chain(st.fingerprints.keys().filter(|k| !fresh.contains_key(*k)))
            .collect();
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        for key in changed {
            if let Some(node) = key.strip_prefix("node:") {
                // A node check changes the health of every service on that node.
                for (svc, specs) in &st.instances {
                    if specs.iter().any(|s| s.node == node) {
                        wanted.insert(svc.to_string());
                    }
                }
            } else if let Some(svc) = key.strip_prefix("service:") {
                wanted.insert(svc.to_owned());
            }
        }
        for svc in wanted {
            let known = st.catalog.as_ref().is_some_and(|c| c.contains_key(&svc));
            if known && !st.watches.contains_key(&svc) {
                queued |= st.pending.insert(svc);
            }
        }
        st.fingerprints = fresh;
        drop(st);
        if queued {
            self.reads.notify_one();
        }
    }

    /// Meta-only changes do not show in any global feed: re-read cold services now and then.
    async fn sweep_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.cfg.sweep_interval).await;
            let queued = {
                let mut st = self.lock();
                let cold: Vec<String> = st
                    .catalog
                    .iter()
                    .flat_map(|c| c.keys())
                    .filter(|n| !st.watches.contains_key(*n))
                    .cloned()
                    .collect();
                let any = !cold.is_empty();
                st.pending.extend(cold);
                any
            };
            if queued {
                self.reads.notify_one();
            }
        }
    }

    async fn reconcile_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RECONCILE_EVERY).await;
            self.reconcile();
        }
    }

    /// Coalesces changes and publishes tables.
    async fn rebuild_loop(self: Arc<Self>) {
        let mut reg = StateRegistry::default();
        let mut first_catalog: Option<Instant> = None;
        let mut live = false;
        loop {
            if live {
                self.changed.notified().await;
            } else {
                // Until the first table is live, look again every 200 ms for completeness.
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), self.changed.notified()).await;
            }
            tokio::time::sleep(self.cfg.coalesce).await;
            let (snapshot, catalog_tags) = {
                let st = self.lock();
                let Some(catalog) = st.catalog.clone() else {
                    continue;
                };
                let since = *first_catalog.get_or_insert_with(Instant::now);
                let complete = catalog
                    .keys()
                    .all(|k| st.instances.contains_key(k.as_str()));
                if !live && !complete {
                    if since.elapsed() < READY_DEADLINE {
                        continue;
                    }
                    tracing::warn!(
                        "some services could not be read yet; they answer 503 until they are"
                    );
                }
                (st.build_input(&catalog), catalog)
            };
            let t0 = Instant::now();
            let table = build(&snapshot, &catalog_tags, &self.build, &mut reg);
            let generation = table.generation;
            let routed = table.services.len();
            self.routes.store(table);
            metrics::histogram!("consul_router_table_build_seconds").record(t0.elapsed());
            metrics::gauge!("consul_router_services").set(routed as f64);
            if !live {
                tracing::info!(services = snapshot.len(), routed, "routing table is live");
            }
            tracing::debug!(
                generation,
                services = snapshot.len(),
                routed,
                "routing table rebuilt"
            );
            live = true;
        }
    }
}

/// Waits so that query starts are at least [`MIN_QUERY_GAP`] apart.
async fn pace(last: &mut Instant) {
    let next = *last + MIN_QUERY_GAP;
    tokio::time::sleep_until(next.into()).await;
    *last = Instant::now();
}

/// Consul's rules for the next blocking index: reset to 0 when it goes backwards (a new
/// leader or a restored snapshot), and never block on 0.
pub(crate) fn next_index(prev: u64, got: u64) -> u64 {
    let got = got.max(1);
    if got < prev {
        0
    } else {
        got
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

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, 0), 1, "never block on 0");
        assert_eq!(next_index(10, 12), 12);
        assert_eq!(next_index(10, 10), 10);
        assert_eq!(next_index(10, 3), 0, "backwards resets");
    }

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

    fn discovery(expose: crate::config::Expose) -> Arc<Discovery> {
        let cfg = crate::config::Config::default();
        let mut consul = cfg.consul.clone();
        // No watch: every service stays queued for a read, none is started.
        consul.max_watches = 0;
        let opts = BuildOptions {
            domains: vec!["app.test".into()],
            default_strategy: cfg.strategy,
            include_warning: false,
            max_idle_per_instance: 1,
            exclude_services: cfg.exclude_services.clone(),
            expose,
        };
        let client = ConsulClient::new(&consul).expect("client");
        Discovery::new(client, consul, opts, Arc::new(Routes::new()))
    }

    fn listing() -> CatalogTags {
        [
            ("consul", vec![]),
            ("Vault", vec!["router.expose=true".to_owned()]),
            ("plain", vec![]),
            ("shown", vec!["router.expose=true".to_owned()]),
            ("hidden", vec!["router.expose=false".to_owned()]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    #[tokio::test]
    async fn excluded_services_are_not_read_and_unread_ones_follow_catalog_tags() {
        use crate::config::Expose;
        for (expose, want) in [
            (Expose::All, vec!["plain", "shown"]),
            (Expose::Tagged, vec!["shown"]),
        ] {
            let d = discovery(expose);
            d.apply_catalog(listing());
            let st = d.lock();
            let pending: Vec<&str> = st.pending.iter().map(String::as_str).collect();
            assert_eq!(
                pending,
                ["hidden", "plain", "shown"],
                "excluded names are not read"
            );
            let catalog = st.catalog.clone().expect("catalog");
            // The first table, before any service was read.
            let snapshot = st.build_input(&catalog);
            drop(st);
            let table = build(&snapshot, &catalog, &d.build, &mut StateRegistry::default());
            let mut routed: Vec<&str> = table.services.keys().map(|k| &**k).collect();
            routed.sort();
            assert_eq!(routed, want, "{expose:?}");
            // Exposed but not read yet: known, with no instance (503).
            assert_eq!(table.services["shown"].routable, 0);
        }
    }
}
