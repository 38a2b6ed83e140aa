//! The registration and its upkeep with the local Consul agent: register (again, whenever
//! the agent lost it), pass the TTL check, write the load as the policy allows, deregister.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::load::{WritePolicy, Written};
use super::measure::Reading;
use super::settings::{CheckSpec, Settings};
use crate::consul::types::{CheckKind, Registration, ServiceCheck};
use crate::consul::{Backoff, ConsulClient, ConsulError};

/// The longest wait between two attempts to reach Consul.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Each call to the agent: the local agent answers in milliseconds when it is well.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Deregistration on the way out may not hold up the app's stop for longer.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(3);
/// The TTL check's output: always the same, so a pass costs Consul nothing.
const TTL_OUTPUT: &str = "the app is running (consul-router announce)";

/// A load to report, with the reading it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// The load, 0–100.
    pub load: u8,
    /// The reading.
    pub reading: Reading,
}

impl Report {
    /// The Meta pairs: `load`, and the raw `cpu`, `mem` (percentages) and `procs`.
    fn meta(&self) -> [(&'static str, String); 4] {
        [
            ("load", self.load.to_string()),
            ("cpu", format!("{:.1}", self.reading.cpu)),
            ("mem", format!("{:.1}", self.reading.mem)),
            ("procs", self.reading.procs.to_string()),
        ]
    }
}

/// Keeps one service instance registered.
#[derive(Debug)]
pub struct Registrar {
    client: ConsulClient,
    settings: Settings,
    /// The service ID.
    id: String,
    policy: Option<WritePolicy>,
    started: Instant,
    last: Option<Written>,
    /// A register call was under way when the upkeep was cancelled: it may still land.
    registering: bool,
}

impl Registrar {
    /// A registrar for `settings`, whose service ID is `id`.
    pub fn new(client: ConsulClient, settings: Settings, id: String) -> Registrar {
        let policy = settings.load.as_ref().map(|l| l.policy);
        Registrar {
            client,
            settings,
            id,
            policy,
            started: Instant::now(),
            last: None,
            registering: false,
        }
    }

    /// The check's ID: Consul's own name for a service's single check.
    fn check_id(&self) -> String {
        format!("service:{}", self.id)
    }

    /// Registers, then keeps the registration: passes the TTL check (or, with an HTTP or
    /// TCP check, makes sure the agent still has the service) every TTL/3, writes the load
    /// when the policy allows, and registers again after any failure. Runs until cancelled.
    pub async fn keep(&mut self, reports: &mut watch::Receiver<Option<Report>>) {
        let mut backoff = Backoff::with_max(MAX_BACKOFF);
        loop {
            self.register_until_done(reports, &mut backoff).await;
            self.upkeep(reports).await;
        }
    }

    /// Registers with the latest report, retrying with capped exponential backoff.
    async fn register_until_done(
        &mut self,
        reports: &mut watch::Receiver<Option<Report>>,
        backoff: &mut Backoff,
    ) {
        let mut failures = 0u32;
        loop {
            let report = *reports.borrow_and_update();
            match self.register(report).await {
                Ok(()) if failures == 0 => tracing::info!("registered {}", self.id),
                Ok(()) => {
                    tracing::info!("registered {} after {failures} failed attempts", self.id)
                }
                Err(e) => {
                    failures += 1;
                    // The first failure and then every tenth, so a long outage does not flood.
                    if failures % 10 == 1 {
                        tracing::warn!(attempts = failures, "cannot register {}: {e}", self.id);
                    }
                    backoff.wait().await;
                    continue;
                }
            }
            backoff.reset();
            return;
        }
    }

    /// While registered: writes reports the policy lets through and keeps the check,
    /// every TTL/3. Returns when either fails (Consul away, or the agent lost the service).
    async fn upkeep(&mut self, reports: &mut watch::Receiver<Option<Report>>) {
        let beat = self.settings.ttl / 3;
        let mut next_beat = Instant::now() + beat;
        let mut open = true;
        loop {
            tokio::select! {
                changed = reports.changed(), if open => {
                    // Closed: no more reports, only the check is left to keep.
                    open = changed.is_ok();
                    let report = *reports.borrow_and_update();
                    if open && self.due(report) {
                        if let Err(e) = self.register(report).await {
                            tracing::warn!("cannot write the load of {}: {e}", self.id);
                            return;
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_beat) => {
                    next_beat += beat;
                    match self.still_registered().await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!("the agent lost {}: registering again", self.id);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!("cannot reach Consul for {}: {e}", self.id);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Whether `report` is worth a write now.
    fn due(&self, report: Option<Report>) -> bool {
        match (self.policy, report) {
            (Some(policy), Some(r)) => policy.should_write(self.last, r.load, self.now()),
            _ => false,
        }
    }

    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.started)
    }

    /// Registers the service with `report`'s Meta (a full re-register: that is how Consul
    /// takes new Meta).
    async fn register(&mut self, report: Option<Report>) -> Result<(), ConsulError> {
        let address = match self.settings.address {
            Some(a) => a,
            None => local_address(&self.settings.consul.address).await?,
        };
        let reg = self.registration(address, report);
        self.registering = true;
        let r = timed(self.client.register(&reg)).await;
        self.registering = false;
        r?;
        if let Some(r) = report.filter(|_| self.policy.is_some()) {
            tracing::info!(
                "load {} written for {} (cpu {:.1}%, mem {:.1}%, procs {})",
                r.load,
                self.id,
                r.reading.cpu,
                r.reading.mem,
                r.reading.procs
            );
            self.last = Some(Written {
                load: r.load,
                at: self.now(),
            });
        }
        Ok(())
    }

    /// The registration body for the instance at `address`.
    fn registration(&self, address: IpAddr, report: Option<Report>) -> Registration {
        let s = &self.settings;
        let mut meta: HashMap<String, String> = s.meta.iter().cloned().collect();
        if let Some(r) = report.filter(|_| self.policy.is_some()) {
            meta.extend(r.meta().map(|(k, v)| (k.to_owned(), v)));
        }
        let deregister_after = Some(go_duration(s.deregister_after));
        let here = SocketAddr::new(address, s.port);
        let (kind, status) = match &s.check {
            // Passing from the start: announce runs while the app does.
            CheckSpec::Ttl => (
                CheckKind::Ttl {
                    ttl: go_duration(s.ttl),
                },
                Some("passing".to_owned()),
            ),
            CheckSpec::Http { target, interval } => (
                CheckKind::Http {
                    url: if target.starts_with('/') {
                        format!("http://{here}{target}")
                    } else {
                        target.clone()
                    },
                    interval: go_duration(*interval),
                    timeout: go_duration(check_timeout(*interval)),
                },
                None,
            ),
            CheckSpec::Tcp { interval } => (
                CheckKind::Tcp {
                    address: here.to_string(),
                    interval: go_duration(*interval),
                    timeout: go_duration(check_timeout(*interval)),
                },
                None,
            ),
        };
        Registration {
            id: self.id.clone(),
            name: s.name.clone(),
            tags: s.tags.clone(),
            address: address.to_string(),
            port: s.port,
            meta,
            checks: vec![ServiceCheck {
                check_id: self.check_id(),
                name: format!("{} ({})", s.name, kind_name(&s.check)),
                kind,
                status,
                deregister_after,
            }],
            ..Default::default()
        }
    }

    /// Passes the TTL check, or asks the agent for the service: false when the agent no
    /// longer has it (a restarted agent, or removed after being critical too long).
    async fn still_registered(&self) -> Result<bool, ConsulError> {
        match self.settings.check {
            CheckSpec::Ttl => {
                let check_id = self.check_id();
                let pass = self.client.update_check(&check_id, "passing", TTL_OUTPUT);
                match timed(pass).await {
                    Ok(()) => Ok(true),
                    // 404 "Unknown check ID" (older agents answer 500).
                    Err(ConsulError::Status { status, .. })
                        if status.as_u16() == 404 || status.as_u16() == 500 =>
                    {
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            }
            CheckSpec::Http { .. } | CheckSpec::Tcp { .. } => {
                timed(self.client.has_agent_service(&self.id)).await
            }
        }
    }

    /// Removes the service, within a few seconds at most. If a register call was cut off
    /// on its way, it may reach the agent after this, so the deregistration is sent again.
    pub async fn deregister(&mut self) {
        let once = || async {
            match tokio::time::timeout(DEREGISTER_TIMEOUT, self.client.deregister(&self.id)).await {
                Ok(Ok(())) => tracing::info!("deregistered {}", self.id),
                Ok(Err(ConsulError::Status { status, .. })) if status.as_u16() == 404 => {
                    tracing::info!("{} was not registered", self.id)
                }
                Ok(Err(e)) => tracing::warn!("cannot deregister {}: {e}", self.id),
                Err(_) => tracing::warn!("cannot deregister {}: Consul did not answer", self.id),
            }
        };
        once().await;
        if self.registering {
            tokio::time::sleep(Duration::from_millis(200)).await;
            once().await;
        }
    }
}

/// A call to the agent, bounded by [`CALL_TIMEOUT`].
async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, ConsulError>>,
) -> Result<T, ConsulError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| ConsulError::Timeout)?
}

/// A check run's timeout: within its interval, 5 s at most.
fn check_timeout(interval: Duration) -> Duration {
    interval.min(Duration::from_secs(5))
}

fn kind_name(check: &CheckSpec) -> &'static str {
    match check {
        CheckSpec::Ttl => "TTL",
        CheckSpec::Http { .. } => "HTTP",
        CheckSpec::Tcp { .. } => "TCP",
    }
}

/// A duration as Go writes it for Consul, in milliseconds ("1500ms").
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The address this host has on the route to the Consul agent: the one the agent (and the
/// routers, which read it from Consul) reach the app at by default. No packet is sent.
pub async fn local_address(consul: &http::Uri) -> Result<IpAddr, ConsulError> {
    let host = consul.host().unwrap_or("127.0.0.1");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = consul.port_u16().unwrap_or(8500);
    let unresolved = |e: std::io::Error| ConsulError::Transport(format!("{host}: {e}"));
    let target = tokio::net::lookup_host((host, port))
        .await
        .map_err(unresolved)?
        .next()
        .ok_or_else(|| ConsulError::Transport(format!("{host}: no address")))?;
    let any: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(any).await.map_err(unresolved)?;
    socket.connect(target).await.map_err(unresolved)?;
    Ok(socket.local_addr().map_err(unresolved)?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::announce::settings::LoadSettings;

    fn settings(check: CheckSpec) -> Settings {
        Settings {
            name: "chat".into(),
            id: None,
            port: 3000,
            address: None,
            tags: vec!["router.strategy=least-load".into()],
            meta: vec![("version".into(), "7".into())],
            check,
            ttl: Duration::from_secs(15),
            deregister_after: Duration::from_secs(60),
            consul: crate::config::Config::default().consul,
            load: Some(LoadSettings {
                interval: Duration::from_secs(1),
                policy: WritePolicy::default(),
                max_procs: None,
            }),
            command: Vec::new(),
        }
    }

    fn registrar(check: CheckSpec) -> Registrar {
        let s = settings(check);
        let client = ConsulClient::new(&s.consul).unwrap();
        Registrar::new(client, s, "chat-h-3000".into())
    }

    #[tokio::test]
    async fn registration_carries_meta_and_the_check() {
        let r = registrar(CheckSpec::Ttl);
        let report = Report {
            load: 41,
            reading: Reading {
                cpu: 50.04,
                mem: 25.0,
                procs: 3,
                procs_limit: None,
            },
        };
        let reg = r.registration("10.0.0.5".parse().unwrap(), Some(report));
        let json = serde_json::to_value(&reg).unwrap();
        assert_eq!(json["ID"], "chat-h-3000");
        assert_eq!(json["Address"], "10.0.0.5");
        assert_eq!(json["Meta"]["load"], "41");
        assert_eq!(json["Meta"]["cpu"], "50.0");
        assert_eq!(json["Meta"]["mem"], "25.0");
        assert_eq!(json["Meta"]["procs"], "3");
        assert_eq!(json["Meta"]["version"], "7");
        let check = &json["Checks"][0];
        assert_eq!(check["CheckID"], "service:chat-h-3000");
        assert_eq!(check["TTL"], "15000ms");
        assert_eq!(check["Status"], "passing");
        assert_eq!(check["DeregisterCriticalServiceAfter"], "60000ms");
        assert!(json.get("Check").is_none());
        // Before the first reading: the user's Meta only.
        let reg = r.registration("10.0.0.5".parse().unwrap(), None);
        assert_eq!(reg.meta.len(), 1);
    }

    #[tokio::test]
    async fn http_and_tcp_checks_target_the_instance() {
        let http = registrar(CheckSpec::Http {
            target: "/health".into(),
            interval: Duration::from_secs(10),
        });
        let json = serde_json::to_value(http.registration("::1".parse().unwrap(), None)).unwrap();
        let check = &json["Checks"][0];
        assert_eq!(check["HTTP"], "http://[::1]:3000/health");
        assert_eq!(check["Interval"], "10000ms");
        assert_eq!(check["Timeout"], "5000ms");
        assert!(check.get("Status").is_none());
        let tcp = registrar(CheckSpec::Tcp {
            interval: Duration::from_secs(2),
        });
        let json =
            serde_json::to_value(tcp.registration("10.1.2.3".parse().unwrap(), None)).unwrap();
        assert_eq!(json["Checks"][0]["TCP"], "10.1.2.3:3000");
        assert_eq!(json["Checks"][0]["Timeout"], "2000ms");
    }

    #[tokio::test]
    async fn local_address_towards_loopback_is_loopback() {
        let uri: http::Uri = "http://127.0.0.1:8500".parse().unwrap();
        assert_eq!(
            local_address(&uri).await.unwrap(),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
