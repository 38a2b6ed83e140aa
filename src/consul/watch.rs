//! Discovery's I/O: the loops that query Consul, feed the [`Model`] and act on what it
//! decides, and the rebuilder that publishes tables.
//!
//! Connections to Consul stay bounded whatever the number of services:
//! - one long-poll on `/v1/catalog/services` (the set of services and their tags);
//! - one long-poll on `/v1/health/service/<name>` per *watched* service, at most
//!   `consul.max_watches`: every service while there are no more than that, else the ones that
//!   carried traffic most recently;
//! - while some services are not watched ("cold"): one long-poll on `/v1/health/state/any`,
//!   whose diff names the cold services whose checks changed (membership included), plus a
//!   slow sweep for Meta-only changes; both re-read just those services, four at a time;
//! - when many cold services are queued (the start, the sweep, a node's check): one bulk
//!   read instead, `/v1/health/state/any`, `/v1/catalog/nodes` and each node's services,
//!   four nodes at a time: requests per node, not per service.
//!
//! The rules (what to keep, watch, read, and when to query or publish) live in `model.rs` and
//! `schedule.rs`; this file only performs them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::ConsulConfig;
use crate::routing::{
    build, BuildOptions, CatalogTags, InstanceSpec, Routes, RoutingTable, StateRegistry,
};

use super::client::{ConsulClient, ConsulError};
use super::model::{BulkRead, FeedStart, Model, Outcome, Reads};
use super::schedule::{CatalogPoll, CatalogStep, Poll, Publish, Rebuilds};
use super::supervise::{supervise, AbortOnDrop, Backoff};
use super::table_metrics::TableMetrics;
use super::types::{node_instances, Check, CheckIndex, HealthEntry};

/// Cold services (or, in a bulk read, nodes) read at once.
const READ_CONCURRENCY: usize = 4;
/// How often the watched set is re-chosen by traffic.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);
/// How often the table's age is reported between answers.
const AGE_EVERY: Duration = Duration::from_secs(1);
/// How often the first agent is asked whether it is back, while another one serves.
pub const PROBE_FIRST_EVERY: Duration = Duration::from_secs(10);

type LoopFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The discovery model and its loops. Create with [`Discovery::new`], start with
/// [`Discovery::spawn`].
#[derive(Debug)]
pub struct Discovery {
    client: ConsulClient,
    cfg: ConsulConfig,
    /// Swapped by a reload; read at each catalog answer and each build.
    build: arc_swap::ArcSwap<BuildOptions>,
    routes: Arc<Routes>,
    me: Weak<Discovery>,
    state: Mutex<Shared>,
    /// Wakes the rebuilder.
    changed: Notify,
    /// Wakes the reader of cold services.
    reads: Notify,
    /// Set on shutdown: no new watch may start.
    stopped: AtomicBool,
}

/// What the loops share, under one lock.
#[derive(Debug)]
struct Shared {
    model: Model,
    /// The long-poll of each service in `model.watched()`.
    watches: HashMap<String, AbortOnDrop>,
}

/// Keeps discovery running; dropping it stops every task and watch.
#[derive(Debug)]
pub struct DiscoveryHandle {
    discovery: Arc<Discovery>,
    tasks: Vec<AbortOnDrop>,
}

impl DiscoveryHandle {
    /// The discovery behind this handle.
    pub fn discovery(&self) -> &Arc<Discovery> {
        &self.discovery
    }

    /// Applies new build options (a reload): the table is rebuilt from the answers already
    /// held, with no query to Consul. When `exclude_services` changed, the service list is
    /// read again at once, since names excluded before were never kept.
    pub fn reconfigure(&mut self, build: BuildOptions) {
        let d = &self.discovery;
        let refetch = d.build.load().exclude_services != build.exclude_services;
        d.build.store(Arc::new(build));
        if refetch && d.cfg.enabled {
            // The catalog loop is the first task; a fresh one starts at index 0.
            self.tasks[0] = d.supervised("catalog-watch", |d| Box::pin(d.catalog_loop()));
        }
        d.changed.notify_one();
    }
}

impl Drop for DiscoveryHandle {
    fn drop(&mut self) {
        self.tasks.clear();
        // Under the lock, so a reconcile running now cannot start new watches after this.
        let mut st = self.discovery.lock();
        self.discovery.stopped.store(true, Ordering::SeqCst);
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
            state: Mutex::new(Shared {
                model: Model::new(cfg.max_watches, Instant::now()),
                watches: HashMap::new(),
            }),
            cfg,
            build: arc_swap::ArcSwap::from_pointee(build),
            routes,
            changed: Notify::new(),
            reads: Notify::new(),
            stopped: AtomicBool::new(false),
        })
    }

    /// Starts the supervised loops; with `consul.enabled = false`, only the rebuilder, which
    /// publishes the static services.
    pub fn spawn(self: &Arc<Self>) -> DiscoveryHandle {
        if !self.cfg.enabled {
            let tasks = vec![self.supervised("rebuild", |d| Box::pin(d.rebuild_loop()))];
            return DiscoveryHandle {
                discovery: self.clone(),
                tasks,
            };
        }
        let mut tasks = vec![
            self.supervised("catalog-watch", |d| Box::pin(d.catalog_loop())),
            self.supervised("health-state-watch", |d| Box::pin(d.health_loop())),
            self.supervised("cold-reader", |d| Box::pin(d.reader_loop())),
            self.supervised("sweep", |d| Box::pin(d.sweep_loop())),
            self.supervised("reconcile", |d| Box::pin(d.reconcile_loop())),
            self.supervised("rebuild", |d| Box::pin(d.rebuild_loop())),
            self.supervised("table-age", |d| Box::pin(d.age_loop())),
        ];
        if !self.cfg.fallback.is_empty() {
            tasks.push(self.supervised("probe-first-agent", |d| Box::pin(d.probe_loop())));
        }
        DiscoveryHandle {
            discovery: self.clone(),
            tasks,
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

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves a consistent-enough model: keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Performs what the model decided, then releases the lock before waking anyone.
    fn act(&self, mut st: MutexGuard<'_, Shared>, out: Outcome) {
        if out.watches {
            self.sync_watches(&mut st);
        }
        drop(st);
        if out.rebuild {
            self.changed.notify_one();
        }
        if out.read {
            self.reads.notify_one();
        }
    }

    /// Starts and stops long-polls to match the model's watched set.
    fn sync_watches(&self, st: &mut Shared) {
        // Checked under the lock: shutdown sets it under the same lock.
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Shared { model, watches } = st;
        watches.retain(|name, _| model.watched().contains(name));
        for name in model.watched() {
            if watches.contains_key(name) {
                continue;
            }
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
            watches.insert(name.clone(), guard);
        }
    }

    fn apply_catalog(&self, new: CatalogTags, index: u64) {
        let table = self.routes.load();
        let build = self.build.load();
        let mut st = self.lock();
        st.model.answered(Instant::now());
        st.model.catalog_index(index);
        let out = st.model.apply_catalog(
            new,
            |name| build.is_excluded(name),
            |name| last_used(&table, name),
        );
        self.act(st, out);
    }

    fn apply_service(&self, name: &str, entries: &[HealthEntry], from_watch: bool) {
        let mut st = self.lock();
        st.model.answered(Instant::now());
        let out = st.model.apply_service(name, entries, from_watch);
        self.act(st, out);
    }

    fn apply_bulk(&self, bulk: BulkRead) {
        let mut st = self.lock();
        st.model.answered(Instant::now());
        let out = st.model.apply_bulk(bulk);
        self.act(st, out);
    }

    fn apply_checks(&self, checks: &[Check]) {
        let mut st = self.lock();
        st.model.answered(Instant::now());
        let out = st.model.apply_checks(checks);
        self.act(st, out);
    }

    /// Chooses the watched set again by recent traffic.
    fn reconcile(&self) {
        let table = self.routes.load();
        let mut st = self.lock();
        let out = st.model.choose_watched(|name| last_used(&table, name));
        self.act(st, out);
    }

    /// Until the first table is live, `/healthz` says why: Consul's last failure, or that
    /// its services are being read.
    fn waiting(&self, agent: &str, error: Option<&ConsulError>) {
        if self.routes.load().ready {
            return;
        }
        let reason = match error {
            None => "reading the services listed in consul".to_owned(),
            Some(ConsulError::Transport(e)) => format!("consul unreachable at {agent} ({e})"),
            Some(ConsulError::Timeout) => format!("consul unreachable at {agent} (timed out)"),
            Some(e) => format!("consul at {agent}: {e}"),
        };
        self.routes.set_waiting(Some(reason));
    }

    /// While another agent serves, asks the first one now and then whether it is back.
    async fn probe_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(PROBE_FIRST_EVERY).await;
            self.client.probe_first().await;
        }
    }

    async fn catalog_loop(self: Arc<Self>) {
        let mut cat = CatalogPoll::default();
        let mut current = false;
        loop {
            start_at(&mut cat.poll).await;
            let index = cat.poll.index();
            // A blocking query counts as current only right after an applied answer: after a
            // failure, a retry that hangs or fails at once must not read as fresh.
            if index > 0 && current {
                let now = Instant::now();
                self.lock()
                    .model
                    .blocking(now, now + blocking_due(self.cfg.wait));
            }
            let agent = self.client.current_address();
            let r = self.client.catalog_services(index, self.cfg.wait).await;
            self.lock().model.blocking_ended();
            current = false;
            self.waiting(agent, r.as_ref().err());
            match r {
                Ok(r) => match cat.judge(Instant::now(), r.index) {
                    CatalogStep::Apply => {
                        self.apply_catalog(r.value, r.index);
                        current = true;
                    }
                    CatalogStep::NoIndex => {
                        tracing::warn!("catalog answer without X-Consul-Index; retrying later");
                    }
                    // A rewound index: a restarted cluster, or a stale server far behind.
                    CatalogStep::Confirm => match self.client.catalog_services_consistent().await {
                        Ok(confirmed) => {
                            cat.confirmed(confirmed.index);
                            self.apply_catalog(confirmed.value, confirmed.index);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot confirm a rewound catalog; keeping the last table");
                            cat.poll.failed(Instant::now());
                        }
                    },
                },
                Err(e) => {
                    tracing::warn!(error = %e, "catalog watch failed; keeping the last routing table");
                    cat.poll.failed(Instant::now());
                }
            }
        }
    }

    async fn service_loop(self: Arc<Self>, name: String) {
        let mut poll = Poll::default();
        while !self.stopped.load(Ordering::SeqCst) {
            start_at(&mut poll).await;
            let r = self
                .client
                .health_service(&name, poll.index(), self.cfg.wait)
                .await;
            match r {
                Ok(r) if poll.answered(Instant::now(), r.index) => {
                    self.apply_service(&name, &r.value, true);
                }
                Ok(_) => {
                    tracing::warn!(service = %name, "answer without X-Consul-Index; retrying later");
                }
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "service watch failed; keeping its last instances");
                    poll.failed(Instant::now());
                }
            }
        }
        // Stopped: wait to be aborted rather than return (a return means "restart me").
        std::future::pending::<()>().await;
    }

    /// Re-reads queued cold services: all at once in a bulk read when the model says it pays,
    /// else a few at a time.
    async fn reader_loop(self: Arc<Self>) {
        let mut backoff = Backoff::default();
        loop {
            let next = self.lock().model.next_reads(READ_CONCURRENCY);
            let batch = match next {
                Reads::Idle => {
                    self.reads.notified().await;
                    continue;
                }
                Reads::Bulk => {
                    match self.bulk_read().await {
                        Ok(bulk) => self.apply_bulk(bulk),
                        Err(e) => {
                            tracing::warn!(error = %e, "bulk read failed; reading the queued services one by one");
                            let mut st = self.lock();
                            let out = st.model.bulk_failed();
                            self.act(st, out);
                        }
                    }
                    continue;
                }
                Reads::Each(batch) => batch,
            };
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
                        self.lock().model.read_failed(name);
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

    /// Reads every instance and check: the checks first, so that whatever changes after them
    /// shows in the health feed's next diff; then the nodes, then each node's services.
    async fn bulk_read(&self) -> Result<BulkRead, ConsulError> {
        let checks = self.client.health_state_any(0, Duration::ZERO).await?;
        let (checks_index, checks) = (checks.index, checks.value);
        let nodes = self.client.catalog_nodes().await?.value;
        let count = nodes.len();
        let mut names = nodes.into_iter().map(|n| n.name);
        let index = CheckIndex::new(&checks);
        let mut services: HashMap<String, Vec<InstanceSpec>> = HashMap::new();
        let mut set = JoinSet::new();
        loop {
            while set.len() < READ_CONCURRENCY {
                let Some(name) = names.next() else { break };
                let client = self.client.clone();
                set.spawn(async move { client.node_services(&name).await });
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            // Any failure fails the whole read (dropping the set aborts the rest); a read
            // that panicked counts as one.
            let answer = joined.map_err(|e| ConsulError::Transport(e.to_string()))??;
            // Made into specs at once: one node's raw answer is held at a time.
            for (name, spec) in node_instances(answer.value, &index) {
                services.entry(name).or_default().push(spec);
            }
        }
        drop(index);
        Ok(BulkRead {
            services,
            checks,
            nodes: count,
            checks_index,
        })
    }

    /// Watches every check while some services are cold; queues those whose checks changed.
    async fn health_loop(self: Arc<Self>) {
        let mut poll = Poll::default();
        loop {
            if !self.lock().model.has_cold() {
                poll.forget_index();
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            if poll.index() == 0 {
                let start = self.lock().model.feed_start();
                match start {
                    FeedStart::Wait => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    // The bulk read's checks are the baseline: no second download of them.
                    FeedStart::From(index) => {
                        poll.answered(Instant::now(), index);
                    }
                    FeedStart::Now => {}
                }
            }
            start_at(&mut poll).await;
            match self
                .client
                .health_state_any(poll.index(), self.cfg.wait)
                .await
            {
                Ok(r) if poll.answered(Instant::now(), r.index) => self.apply_checks(&r.value),
                Ok(_) => tracing::warn!("health answer without X-Consul-Index; retrying later"),
                Err(e) => {
                    tracing::warn!(error = %e, "health watch failed; keeping the last routing table");
                    poll.failed(Instant::now());
                }
            }
        }
    }

    /// Meta-only changes do not show in any global feed: re-read cold services now and then.
    async fn sweep_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.cfg.sweep_interval).await;
            let mut st = self.lock();
            let out = st.model.sweep();
            self.act(st, out);
        }
    }

    async fn reconcile_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RECONCILE_EVERY).await;
            self.reconcile();
        }
    }

    /// Keeps `consul_router_routing_table_age_seconds` current: the time since Consul last
    /// answered any of discovery's queries, to within [`AGE_EVERY`].
    async fn age_loop(self: Arc<Self>) {
        let gauge = metrics::gauge!("consul_router_routing_table_age_seconds");
        loop {
            let age = self.lock().model.answer_age(Instant::now());
            gauge.set(age.as_secs_f64());
            tokio::time::sleep(AGE_EVERY).await;
        }
    }

    /// The table before Consul's first answer, or with Consul off: the static services
    /// alone, live at once only when there is no Consul to wait for. A live table from an
    /// earlier discovery (a reload) stays until Consul answers this one.
    fn publish_without_consul(&self, reg: &mut StateRegistry) {
        let opts = self.build.load();
        let enabled = self.cfg.enabled;
        if enabled && (opts.static_services.is_empty() || self.routes.load().ready) {
            return;
        }
        let mut table = build(&BTreeMap::new(), &CatalogTags::new(), &opts, reg);
        table.ready = !enabled;
        let routed = table.services.len();
        self.routes.store(table);
        tracing::debug!(routed, "static services published");
    }

    /// Coalesces changes and publishes tables.
    async fn rebuild_loop(self: Arc<Self>) {
        let mut reg = StateRegistry::default();
        let mut schedule = Rebuilds::new(self.cfg.coalesce);
        let mut metrics = TableMetrics::new();
        let mut provisional = false;
        self.publish_without_consul(&mut reg);
        loop {
            let change = self.changed.notified();
            match schedule.wake_at() {
                Some(at) => tokio::select! {
                    () = change => {
                        schedule.changed(Instant::now());
                        continue;
                    }
                    () = tokio::time::sleep_until(at) => {}
                },
                None => {
                    change.await;
                    schedule.changed(Instant::now());
                    continue;
                }
            }
            let (snapshot, catalog_tags, first) = {
                let st = self.lock();
                let complete = st.model.complete();
                match schedule.decide(Instant::now(), complete) {
                    Publish::Wait => {
                        // Listed but not all read: once, a table not yet live in which the
                        // listed services (and their tag hosts) answer 503, not 404.
                        let early = match complete {
                            Some(_) if !provisional => st.model.build_input(),
                            _ => None,
                        };
                        drop(st);
                        if complete.is_none() {
                            self.publish_without_consul(&mut reg);
                        }
                        if let Some((snapshot, tags)) = early {
                            provisional = true;
                            let mut table = build(&snapshot, &tags, &self.build.load(), &mut reg);
                            table.ready = false;
                            if !self.routes.load().ready {
                                self.routes.store(table);
                            }
                        }
                        continue;
                    }
                    Publish::Now { first, incomplete } => {
                        if incomplete && first {
                            tracing::warn!(
                                "some services could not be read yet; they answer 503 until they are"
                            );
                        }
                        let Some((snapshot, tags)) = st.model.build_input() else {
                            continue;
                        };
                        (snapshot, tags, first)
                    }
                }
            };
            let t0 = std::time::Instant::now();
            let table = build(&snapshot, &catalog_tags, &self.build.load(), &mut reg);
            let built = t0.elapsed();
            let (generation, routed) = (table.generation, table.services.len());
            metrics.published(built);
            self.routes.store(table);
            if first {
                tracing::info!(services = snapshot.len(), routed, "routing table is live");
            }
            tracing::debug!(
                generation,
                services = snapshot.len(),
                routed,
                "routing table rebuilt"
            );
        }
    }
}

/// How long Consul may hold a blocking query with `wait`: the wait, its jitter (up to
/// wait/16) and a second for the answer to arrive.
fn blocking_due(wait: Duration) -> Duration {
    wait + wait / 16 + Duration::from_secs(1)
}

/// When the service was last used, from the live table (0: never, or not in it).
fn last_used(table: &RoutingTable, name: &str) -> u64 {
    table.services.get(name).map_or(0, |s| s.stats.last_used())
}

/// Waits until `poll` may start its next query, and marks it started.
async fn start_at(poll: &mut Poll) {
    if let Some(at) = poll.next_start() {
        tokio::time::sleep_until(at).await;
    }
    poll.started(Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;

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
            static_services: Default::default(),
            dns_ttl: Duration::from_secs(30),
        };
        let client = ConsulClient::new(&consul).expect("client");
        Discovery::new(client, consul, opts, Arc::new(Routes::new()))
    }

    /// A discovery with one static service, `legacy`, and Consul on or off.
    fn with_static(enabled: bool) -> Arc<Discovery> {
        let d = discovery(crate::config::Expose::All);
        let mut opts = (**d.build.load()).clone();
        opts.static_services = vec![crate::config::StaticService {
            name: "legacy".into(),
            strategy: None,
            hosts: vec![],
            instances: vec![crate::config::StaticInstance {
                host: "10.0.0.5".into(),
                port: 8080,
                weight: 1,
            }],
        }]
        .into();
        let mut cfg = d.cfg.clone();
        cfg.enabled = enabled;
        Discovery::new(d.client.clone(), cfg, opts, Arc::new(Routes::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn static_services_are_served_before_consul_answers_and_without_it() {
        for enabled in [true, false] {
            let d = with_static(enabled);
            let _rebuild = AbortOnDrop(tokio::spawn(d.clone().rebuild_loop()).abort_handle());
            tokio::time::sleep(Duration::from_millis(10)).await;
            let t = d.routes.load_full();
            assert_eq!(t.ready, !enabled, "live at once only without Consul");
            assert_eq!(t.services["legacy"].routable, 1);
        }
        // The service list arrives, a service unread: once, a table not live yet where it
        // answers 503 beside the static one.
        let d = with_static(true);
        let _rebuild = AbortOnDrop(tokio::spawn(d.clone().rebuild_loop()).abort_handle());
        let tags = vec!["router.host=chat.example.com".to_owned()];
        d.apply_catalog([("chat".to_owned(), tags)].into(), 1);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let t = d.routes.load_full();
        assert!(!t.ready);
        assert_eq!(t.lookup("chat.example.com").map(|s| s.routable), Some(0));
        assert_eq!(t.services["legacy"].routable, 1);
        // Ten seconds on, the first table is live anyway.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(d.routes.load().ready);
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
            d.apply_catalog(listing(), 1);
            let st = d.lock();
            assert_eq!(
                st.model.pending(),
                ["hidden", "plain", "shown"],
                "excluded names are not read"
            );
            // The first table, before any service was read.
            let (snapshot, catalog) = st.model.build_input().expect("catalog");
            drop(st);
            let table = build(
                &snapshot,
                &catalog,
                &d.build.load(),
                &mut StateRegistry::default(),
            );
            let mut routed: Vec<&str> = table.services.keys().map(|k| &**k).collect();
            routed.sort();
            assert_eq!(routed, want, "{expose:?}");
            // Exposed but not read yet: known, with no instance (503).
            assert_eq!(table.services["shown"].routable, 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_bulk_read_makes_the_first_table_in_one_build() {
        let d = discovery(crate::config::Expose::All);
        let _rebuild = AbortOnDrop(tokio::spawn(d.clone().rebuild_loop()).abort_handle());
        let names: Vec<String> = (0..500).map(|i| format!("bulk-test-{i:03}")).collect();
        d.apply_catalog(names.iter().map(|n| (n.clone(), vec![])).collect(), 1);
        assert_eq!(d.lock().model.next_reads(READ_CONCURRENCY), Reads::Bulk);
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Every service but the last is on the one node.
        let mut bulk = BulkRead {
            nodes: 1,
            ..BulkRead::default()
        };
        for name in &names[..499] {
            let specs = entries(name, &[("i1", "passing", 1)])
                .iter()
                .map(HealthEntry::to_spec)
                .collect();
            bulk.services.insert(name.clone(), specs);
        }
        d.apply_bulk(bulk);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Live one coalescing window after the catalog, long before the deadline.
        let t = d.routes.load_full();
        assert!(t.ready);
        assert_eq!(
            t.generation, 1,
            "one build for the catalog and the bulk read"
        );
        assert_eq!(t.services.len(), 500);
        assert_eq!(t.services["bulk-test-000"].routable, 1);
        assert_eq!(t.services["bulk-test-499"].routable, 0, "no instance: 503");
        assert_eq!(d.lock().model.next_reads(READ_CONCURRENCY), Reads::Idle);
    }

    /// `/v1/health/service/<svc>` entries: `(id, status, passing weight)` on one node.
    fn entries(svc: &str, instances: &[(&str, &str, u32)]) -> Vec<HealthEntry> {
        let v: Vec<serde_json::Value> = instances
            .iter()
            .map(|(id, status, weight)| {
                serde_json::json!({
                    "Node": {"Node": "n1", "Address": "10.0.0.1"},
                    "Service": {"ID": id, "Service": svc, "Port": 80,
                                "Weights": {"Passing": weight, "Warning": 1}},
                    "Checks": [{"Node": "n1", "CheckID": format!("c-{id}"), "Status": status,
                                "ServiceID": id, "ServiceName": svc}]
                })
            })
            .collect();
        serde_json::from_value(serde_json::Value::Array(v)).expect("entries")
    }

    /// The value of the first series of `name` whose labels include every one of `labels`.
    fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with([' ', '{']))
            .find(|l| labels.iter().all(|want| l.contains(want)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    // The recorder is process-wide: the service names are this test's own.
    #[tokio::test(start_paused = true)]
    async fn changes_are_coalesced_into_tables_and_counted() {
        let prometheus = crate::metrics::handle();
        let updates = |text: &str| {
            sample(text, "consul_router_routing_table_updates_total", &[]).unwrap_or(0.0)
        };
        let before = updates(&prometheus.render());
        let d = discovery(crate::config::Expose::All);
        let _rebuild = AbortOnDrop(tokio::spawn(d.clone().rebuild_loop()).abort_handle());
        let _age = AbortOnDrop(tokio::spawn(d.clone().age_loop()).abort_handle());
        let ms = Duration::from_millis;
        let (a, b) = ("coalesce-test-a", "coalesce-test-b");

        let catalog: CatalogTags = [(a.to_owned(), vec![]), (b.to_owned(), vec![])].into();
        d.apply_catalog(catalog, 1);
        tokio::time::sleep(ms(60)).await;
        let a_entries = [
            ("a1", "passing", 1),
            ("a2", "passing", 0),
            ("a3", "warning", 1),
            ("a4", "critical", 1),
        ];
        d.apply_service(a, &entries(a, &a_entries), true);
        d.apply_service(b, &entries(b, &[("b1", "passing", 1)]), true);
        tokio::time::sleep(ms(30)).await;
        assert!(!d.routes.load().ready, "not before the window ends");
        // One table for the catalog and both reads, 100 ms after the first change.
        tokio::time::sleep(ms(20)).await;
        let t = d.routes.load_full();
        assert!(t.ready);
        assert_eq!(t.generation, 1);
        assert_eq!(t.services[a].routable, 1);

        // A flapping check: five changes in 80 ms become one table.
        for i in 0..5 {
            let status = if i % 2 == 0 { "critical" } else { "passing" };
            d.apply_service(b, &entries(b, &[("b1", status, 1)]), true);
            tokio::time::sleep(ms(20)).await;
        }
        tokio::time::sleep(ms(30)).await;
        assert_eq!(d.routes.load().generation, 2);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(d.routes.load().generation, 2, "nothing more to publish");
        assert_eq!(
            d.routes.load().services[b].routable,
            0,
            "the last state won"
        );

        let text = prometheus.render();
        assert!(updates(&text) >= before + 2.0, "{text}");
        assert_eq!(t.services[a].instance_counts(), [2, 1, 1, 3, 1]);

        // b leaves Consul.
        d.apply_catalog([(a.to_owned(), vec![])].into(), 2);
        tokio::time::sleep(ms(150)).await;
        assert_eq!(d.routes.load().generation, 3);
        assert!(!d.routes.load().services.contains_key(b));

        // Consul goes quiet: the table's age grows, and an answer brings it back to 0.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let age = |text: &str| sample(text, "consul_router_routing_table_age_seconds", &[]);
        let quiet = age(&prometheus.render()).expect("age");
        assert!((4.0..=5.2).contains(&quiet), "{quiet}");
        d.apply_service(a, &entries(a, &a_entries), true);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let fresh = age(&prometheus.render()).expect("age");
        assert!(fresh <= 1.1, "{fresh}");
    }
}
