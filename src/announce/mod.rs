//! `consul-router announce`: the backends' side of least-load. It registers an instance in
//! Consul with a check, measures the instance's load and writes it into the service's Meta
//! when it moved enough, and deregisters on the way out. With a command, it runs the app as
//! its child (a container's entrypoint): it passes signals on and exits with the app's
//! status.
//!
//! - `settings.rs`: the flags and their validation;
//! - `measure.rs`: readings from the app's process tree, the container's cgroup or /proc;
//! - `load.rs`: the load formula and the write policy, pure functions;
//! - `agent.rs`: the registration and its upkeep with the Consul agent;
//! - `child.rs`: the app process, signals and exit status.

mod agent;
mod child;
pub mod load;
pub mod measure;
mod settings;

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

pub use agent::Report;
pub use child::{Ended, SpawnError};
pub use settings::{AnnounceArgs, CheckSpec, LoadSettings, Settings, SettingsError};

use crate::consul::{ConsulClient, ConsulError};
use agent::Registrar;
use child::{App, Received, Signals};
use measure::{Roots, Sampler, Source};

/// Why announce could not run.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// Signal handlers could not be installed.
    #[error("cannot listen for signals: {0}")]
    Signals(std::io::Error),
    /// The Consul client could not be set up (e.g. an unreadable CA file).
    #[error(transparent)]
    Consul(#[from] ConsulError),
    /// The app could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}

impl AnnounceError {
    /// The exit status for this error: 127/126 for a command not found / not executable,
    /// 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            AnnounceError::Spawn(e) => e.exit_code(),
            _ => 1,
        }
    }
}

/// Runs announce until SIGTERM/SIGINT or, with a command, until the app ends; returns the
/// exit status: the app's (128 + signal if a signal ended it), 0 without an app.
///
/// The app starts first, before anything waits on Consul. Registration follows and is
/// retried with capped backoff while Consul is away. On SIGTERM/SIGINT the service is
/// deregistered first (a few seconds at most), so routers stop sending new requests, then
/// the signal goes to the app and announce waits for it.
pub async fn run(settings: Settings) -> Result<u8, AnnounceError> {
    let client = ConsulClient::new(&settings.consul)?;
    let mut signals = Signals::new().map_err(AnnounceError::Signals)?;
    let mut app = if settings.command.is_empty() {
        None
    } else {
        let app = App::spawn(&settings.command)?;
        tracing::info!(pid = app.pid(), "started {}", settings.command.join(" "));
        Some(app)
    };
    let id = settings.service_id();
    let load = settings.load;
    let roots = Roots::default();
    let mut sampler = load.map(|_| {
        let own = rustix::process::getpid().as_raw_nonzero().get();
        let source = Source::detect(&roots, app.as_ref().map(|_| own));
        tracing::info!("measuring load from {}", describe(&source));
        Sampler::new(source, roots.clone())
    });
    let (reports, mut reports_rx) = watch::channel(None);
    let mut registrar = Registrar::new(client, settings, id);
    let mut upkeep = Box::pin(async {
        registrar.keep(&mut reports_rx).await;
    });
    // Measures every interval; reaps as a fallback when there is no load to measure.
    let mut tick = tokio::time::interval(load.map_or(Duration::from_secs(1), |l| l.interval));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let stop = loop {
        tokio::select! {
            _ = &mut upkeep => {}
            r = signals.recv() => match r {
                Received::Stop(sig) => break Stop::Signal(sig),
                Received::Forward(sig) => match &app {
                    Some(app) => app.signal(sig),
                    None => tracing::debug!("signal {} ignored: no app", sig.as_raw()),
                },
                Received::Child => {}
            },
            _ = tick.tick() => {
                if let (Some(sampler), Some(load)) = (&mut sampler, load) {
                    if let Some(report) = measure(sampler, load.max_procs) {
                        reports.send_replace(Some(report));
                    }
                }
            }
        }
        if let Some(ended) = app.as_mut().and_then(App::reap) {
            break Stop::AppEnded(ended);
        }
    };
    drop(upkeep);
    registrar.deregister().await;
    let ended = match (stop, app.as_mut()) {
        (Stop::AppEnded(ended), _) => ended,
        (Stop::Signal(sig), Some(app)) => {
            app.signal(sig);
            app.wait(&mut signals).await
        }
        (Stop::Signal(_), None) => return Ok(0),
    };
    match ended {
        Ended::Exited(code) => tracing::info!("the app exited with status {code}"),
        Ended::Killed(sig) => tracing::info!("the app was killed by signal {sig}"),
    }
    Ok(ended.exit_code())
}

/// Why the main loop ended.
enum Stop {
    /// SIGTERM or SIGINT.
    Signal(rustix::process::Signal),
    /// The app ended by itself.
    AppEnded(Ended),
}

/// One reading turned into a report; a failed read is logged and skipped.
fn measure(sampler: &mut Sampler, max_procs: Option<u64>) -> Option<Report> {
    match sampler.sample(Instant::now().into_std()) {
        Ok(reading) => reading.map(|reading| Report {
            load: load::load(&reading, max_procs),
            reading,
        }),
        Err(e) => {
            tracing::warn!("cannot measure the load: {e}");
            None
        }
    }
}

fn describe(source: &Source) -> String {
    match source {
        Source::Tree(_) => "the app's process tree (/proc)".into(),
        Source::Cgroup(dir) => format!("the cgroup {}", dir.display()),
        Source::Host => "the whole machine (/proc)".into(),
    }
}
