//! consul-router: a reverse proxy that routes by Host header to services found in Consul.
//!
//! [`start`] binds the listeners, starts discovery and returns a [`Running`] router; the
//! binary (`main.rs`) adds the command line, logging and signals around it.

pub mod access_log;
pub mod admin;
pub mod announce;
pub mod balance;
pub mod config;
pub mod consul;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod proxy;
mod reload;
pub mod routing;
pub mod server;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::consul::{AbortOnDrop, ConsulClient, ConsulError, Discovery, DiscoveryHandle};
use crate::listener::activation::Role;
use crate::routing::{BuildOptions, Routes};

pub use crate::reload::Reloaded;

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The Consul client could not be set up.
    #[error(transparent)]
    Consul(#[from] ConsulError),
    /// A TLS certificate or key could not be loaded (a configuration error: exit status 2).
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The access log file could not be opened (a configuration error: exit status 2).
    #[error("access_log_file: cannot open {}: {source}", path.display())]
    AccessLog {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A started router. Dropping it stops discovery; call [`Running::shutdown`] to drain.
#[derive(Debug)]
pub struct Running {
    /// Where the proxy listens (useful when the config said port 0).
    pub proxy_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// Where the TLS listener listens, when `[tls]` is set.
    pub tls_addr: Option<SocketAddr>,
    /// The live routing table.
    pub routes: Arc<Routes>,
    config: Config,
    /// The proxy new connections take; a reload swaps it.
    proxy: Arc<ArcSwap<proxy::Proxy>>,
    admin: Arc<admin::Admin>,
    proxy_listener: Listener,
    admin_listener: Listener,
    /// The TLS listener, its certificates, and the task that watches their files.
    tls: Option<TlsSide>,
    /// Listeners a reload replaced, still draining their connections.
    retired: Vec<JoinHandle<()>>,
    /// `proxy.max_connections`, shared by the proxy's listeners (old and new).
    limit: Arc<listener::ConnLimit>,
    /// Sockets from socket activation no listener took yet (a reload may).
    inherited: listener::Inherited,
    discovery: DiscoveryHandle,
    access_log: AccessLog,
    _upkeep: AbortOnDrop,
    reaper: AbortOnDrop,
    notify_ready: AbortOnDrop,
}

/// One accept loop and the switch that stops it.
#[derive(Debug)]
struct Listener {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Stops accepting; open connections finish their current request (within the grace
    /// period) and close.
    fn retire(self) -> JoinHandle<()> {
        let _ = self.stop.send(true);
        self.task
    }
}

/// The TLS listener of a running router.
#[derive(Debug)]
struct TlsSide {
    listener: Listener,
    tls: Arc<listener::Tls>,
    _poll: AbortOnDrop,
}

/// Loads `[tls]`'s certificates (every file checked now: a bad one stops the start), binds
/// its listener and serves it; certificate files are polled for changes.
async fn start_tls(
    cfg: &config::TlsConfig,
    proxy: Arc<ArcSwap<proxy::Proxy>>,
    limit: Arc<listener::ConnLimit>,
    inherited: &mut listener::Inherited,
    routes: &Arc<Routes>,
) -> Result<(TlsSide, SocketAddr), StartError> {
    let store = tls::CertStore::load(&cfg.certs)?;
    let tls = Arc::new(listener::Tls::new(store)?);
    let held = inherited
        .holds(Role::Https, cfg.listen)
        .then(|| routes.clone());
    let (socket, addr) = bind(inherited, Role::Https, cfg.listen).await?;
    let (stop, stopped) = watch::channel(false);
    let layers = listener::Layers {
        proxy_protocol: cfg.proxy_protocol,
        tls: Some(tls.clone()),
        limit,
        hold_until_ready: held,
    };
    let task = tokio::spawn(listener::serve(socket, proxy, layers, stopped));
    let poll = tokio::spawn(poll_certs(tls.clone()));
    let side = TlsSide {
        listener: Listener { stop, task },
        tls,
        _poll: AbortOnDrop(poll.abort_handle()),
    };
    Ok((side, addr))
}

/// Reloads certificates whose files changed, every [`listener::CERT_POLL`].
async fn poll_certs(tls: Arc<listener::Tls>) {
    loop {
        tokio::time::sleep(listener::CERT_POLL).await;
        if let Some(report) = tls.store.reload_if_changed() {
            log_reload(&report);
        }
    }
}

pub(crate) fn log_reload(report: &tls::ReloadReport) {
    if !report.reloaded.is_empty() {
        tracing::info!(entries = ?report.reloaded, "TLS certificates reloaded");
    }
    // Each refusal was logged with its file by the store; the old certificate stays.
}

impl Running {
    /// Drains: `/healthz` answers 503 from this call on (before the future is first
    /// polled); the proxy's listeners keep accepting for `proxy.shutdown_delay` (so a load
    /// balancer in front sees the 503 and stops sending), then stop, and in-flight requests
    /// finish (bounded by `proxy.shutdown_grace`). The admin listener closes last, so
    /// `/healthz` says 503 throughout. Then discovery stops.
    pub fn shutdown(self) -> impl std::future::Future<Output = ()> + Send {
        self.admin.drain();
        self.drain()
    }

    /// [`Running::shutdown`] once `/healthz` says 503.
    async fn drain(self) {
        // A router that stops before its first table never says READY=1.
        drop(self.notify_ready);
        let delay = self.config.proxy.shutdown_delay;
        if !delay.is_zero() {
            tracing::info!(?delay, "draining: /healthz says 503; still accepting");
            tokio::time::sleep(delay).await;
        }
        let tls = self.tls.map(|t| t.listener.retire());
        let tasks = [self.proxy_listener.retire()];
        for task in tasks.into_iter().chain(tls).chain(self.retired) {
            let _ = task.await;
        }
        let _ = self.admin_listener.retire().await;
        drop(self.discovery);
        // Write out the access log's queue; bounded, in case its output is stuck.
        let log = self.access_log.clone();
        let _ = tokio::task::spawn_blocking(move || log.close(Duration::from_secs(5))).await;
    }

    /// The access log; clone it to log from elsewhere, or call `reopen` on SIGUSR1.
    pub fn access_log(&self) -> &AccessLog {
        &self.access_log
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Long-polls currently open to Consul for single services.
    pub fn watch_count(&self) -> usize {
        self.discovery.discovery().watch_count()
    }

    /// Services that have their own long-poll now.
    pub fn watched_services(&self) -> Vec<String> {
        self.discovery.discovery().watched()
    }
}

/// The listener for `role`: the inherited socket that matches it, else a new one bound at
/// `addr`.
async fn bind(
    inherited: &mut listener::Inherited,
    role: Role,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind { addr, source };
    let listener = match inherited.take(role, addr) {
        Some(socket) => {
            socket.set_nonblocking(true).map_err(err)?;
            TcpListener::from_std(socket).map_err(err)?
        }
        None => TcpListener::bind(addr).await.map_err(err)?,
    };
    let local = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok((listener, local))
}

fn open_access_log(cfg: &Config) -> Result<AccessLog, StartError> {
    AccessLog::open(cfg.access_log, cfg.access_log_file.as_deref()).map_err(|source| {
        StartError::AccessLog {
            path: cfg.access_log_file.clone().unwrap_or_default(),
            source,
        }
    })
}

fn build_options(cfg: &Config) -> BuildOptions {
    BuildOptions {
        domains: cfg.domains.clone(),
        default_strategy: cfg.strategy,
        include_warning: cfg.include_warning,
        max_idle_per_instance: cfg.proxy.max_idle_per_instance,
        exclude_services: cfg.exclude_services.clone(),
        expose: cfg.expose,
        static_services: cfg.static_services.clone(),
        dns_ttl: cfg.consul.dns_ttl,
    }
}

fn spawn_proxy(
    listener: TcpListener,
    proxy: Arc<ArcSwap<proxy::Proxy>>,
    proxy_protocol: config::ProxyProtocol,
    limit: Arc<listener::ConnLimit>,
    hold_until_ready: Option<Arc<Routes>>,
) -> Listener {
    let (stop, stopped) = watch::channel(false);
    let layers = listener::Layers {
        proxy_protocol,
        tls: None,
        limit,
        hold_until_ready,
    };
    let task = tokio::spawn(listener::serve(listener, proxy, layers, stopped));
    Listener { stop, task }
}

fn spawn_admin(
    listener: TcpListener,
    admin: Arc<admin::Admin>,
    proxy: Arc<ArcSwap<proxy::Proxy>>,
) -> Listener {
    let (stop, stopped) = watch::channel(false);
    // The admin's idle limit is the proxy's, as it is now.
    let idle = move || proxy.load().header_timeout;
    let task = tokio::spawn(server::serve(
        listener,
        admin,
        stopped,
        Duration::from_secs(1),
        idle,
    ));
    Listener { stop, task }
}

/// Binds the listeners and starts discovery, the proxy and the admin API.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    start_inherited(cfg, listener::Inherited::none()).await
}

/// [`start`], with the listening sockets of socket activation: each listener takes the one
/// that matches it (by name, else by address) and binds its own otherwise.
pub async fn start_inherited(
    cfg: Config,
    mut inherited: listener::Inherited,
) -> Result<Running, StartError> {
    let proxy_held = inherited.holds(Role::Http, cfg.listen);
    let (proxy_listener, proxy_addr) = bind(&mut inherited, Role::Http, cfg.listen).await?;
    let (admin_listener, admin_addr) = bind(&mut inherited, Role::Admin, cfg.admin_listen).await?;

    // After the recorder is installed, so the access log's drop counter is a live one.
    let prometheus = metrics::handle();
    let access_log = open_access_log(&cfg)?;
    let routes = Arc::new(Routes::new());
    let client = ConsulClient::new(&cfg.consul)?;
    let discovery = Discovery::new(
        client,
        cfg.consul.clone(),
        build_options(&cfg),
        routes.clone(),
    )
    .spawn();

    let proxy = Arc::new(ArcSwap::from_pointee(proxy::Proxy::new(
        &cfg,
        routes.clone(),
        access_log.clone(),
    )));
    let limit = listener::ConnLimit::new(cfg.proxy.max_connections);
    let proxy_listener = spawn_proxy(
        proxy_listener,
        proxy.clone(),
        cfg.proxy_protocol,
        limit.clone(),
        proxy_held.then(|| routes.clone()),
    );
    let (tls, tls_addr) = match &cfg.tls {
        Some(t) => {
            let (side, addr) =
                start_tls(t, proxy.clone(), limit.clone(), &mut inherited, &routes).await?;
            (Some(side), Some(addr))
        }
        None => (None, None),
    };
    let admin = Arc::new(
        admin::Admin::new(routes.clone(), prometheus.clone()).with_token(cfg.admin_token.clone()),
    );
    let admin_listener = spawn_admin(admin_listener, admin.clone(), proxy.clone());
    inherited.report_unused();
    let upkeep = tokio::spawn(metrics::upkeep(prometheus));
    let reaper = tokio::spawn(reap_idle(routes.clone(), cfg.proxy.idle_timeout));
    let notify_ready = tokio::spawn(notify_ready(routes.clone(), proxy_addr, admin_addr));
    let consul: Vec<String> = cfg.consul.addresses().map(|a| a.to_string()).collect();
    tracing::info!(%proxy_addr, %admin_addr, ?consul, consul_enabled = cfg.consul.enabled, "consul-router started");

    Ok(Running {
        proxy_addr,
        admin_addr,
        tls_addr,
        tls,
        routes,
        config: cfg,
        proxy,
        admin,
        proxy_listener,
        admin_listener,
        retired: Vec::new(),
        limit,
        inherited,
        discovery,
        access_log,
        _upkeep: AbortOnDrop(upkeep.abort_handle()),
        reaper: AbortOnDrop(reaper.abort_handle()),
        notify_ready: AbortOnDrop(notify_ready.abort_handle()),
    })
}

/// Under systemd (`$NOTIFY_SOCKET` set), sends `READY=1` once the first routing table is
/// live: when `/healthz` turns 200, not before.
async fn notify_ready(routes: Arc<Routes>, proxy_addr: SocketAddr, admin_addr: SocketAddr) {
    if !notify::enabled() {
        return;
    }
    notify::status("waiting for the first routing table from Consul");
    loop {
        {
            let table = routes.load();
            if table.ready {
                notify::ready(&format!(
                    "routing table live ({} services at start); proxy on http://{proxy_addr}, admin on http://{admin_addr}",
                    table.services.len()
                ));
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Closes idle backend connections past `idle_timeout`, even for instances no request uses.
async fn reap_idle(routes: Arc<Routes>, idle_timeout: Duration) {
    let every = (idle_timeout / 2).max(Duration::from_millis(500));
    loop {
        tokio::time::sleep(every).await;
        let table = routes.load_full();
        for svc in table.services.values() {
            for inst in svc.instances.iter() {
                inst.state.idle.evict_expired(idle_timeout);
                inst.state.idle_hyper.evict_expired(idle_timeout);
                inst.state.h2.evict_idle();
            }
        }
    }
}
