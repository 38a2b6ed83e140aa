//! The `consul-router` binary: flags, logging, runtime, signals.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use consul_router::access_log;
use consul_router::announce::{self, AnnounceArgs};
use consul_router::config::{Config, LogFormat, Overrides};
use consul_router::listener::Inherited;
use consul_router::StartError;
use tokio::signal::unix::{signal, SignalKind};

// Off with the `system-alloc` feature, so that heaptrack (which sees malloc) can profile.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Reverse proxy routing Host headers to Consul services.
#[derive(Debug, Parser)]
// The router's flags mean nothing to a subcommand: refuse them rather than ignore them.
#[command(
    name = "consul-router",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Without a command, run the router.
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (see config/consul-router.toml).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Proxy listen address [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Admin listen address [default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Consul agent URL, or several separated by commas, tried in order [default:
    /// $CONSUL_HTTP_ADDR, else http://127.0.0.1:8500].
    #[arg(long, value_name = "URL[,URL...]")]
    consul: Option<String>,
    /// Domain suffix: <service>.<SUFFIX> routes to <service>. Repeatable.
    #[arg(long = "domain", value_name = "SUFFIX")]
    domains: Vec<String>,
    /// Default strategy: random, ip-hash, url-hash or least-load [default: random].
    #[arg(long, value_name = "NAME")]
    strategy: Option<String>,
    /// Runtime worker threads [default: all cores].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Access log: off, text (nginx combined plus fields) or json [default: off].
    #[arg(long, value_name = "FORMAT")]
    access_log: Option<String>,
    /// Write the access log to FILE, reopened on SIGUSR1 [default: standard output].
    #[arg(long, value_name = "FILE")]
    access_log_file: Option<String>,
    /// Format of the router's own logs: text or json [default: text].
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

/// What to do instead of running the router.
#[derive(Debug, Subcommand)]
enum Command {
    /// Register this instance in Consul, keep its check passing and report its load in
    /// Service Meta; with `-- COMMAND`, run the app as a child (a container's entrypoint).
    Announce(Box<AnnounceArgs>),
    /// Probe a running router's /healthz: exit 0 on 200, 1 otherwise, 2 for a bad URL.
    Health(HealthArgs),
}

/// Flags of `consul-router health`.
#[derive(Debug, Args)]
struct HealthArgs {
    /// The router's admin listener.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9090")]
    admin: String,
    /// Give up after this long (resolving, connecting and the answer).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Announce(args)) => return run_announce(args),
        Some(Command::Health(args)) => return health(&args),
        None => {}
    }
    let env = |k: &str| std::env::var(k).ok();
    let overrides = Overrides {
        listen: cli.listen,
        admin_listen: cli.admin_listen,
        consul: cli.consul,
        domains: cli.domains,
        strategy: cli.strategy,
        workers: cli.workers,
        access_log: cli.access_log,
        access_log_file: cli.access_log_file,
        log_format: cli.log_format,
        env_consul_addr: env("CONSUL_HTTP_ADDR"),
        env_consul_token: env("CONSUL_HTTP_TOKEN"),
    };
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("consul-router: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        if let (access_log::Format::Text | access_log::Format::Json, Some(path)) =
            (config.access_log, &config.access_log_file)
        {
            if let Err(e) = access_log::check_file(path) {
                eprintln!(
                    "consul-router: configuration error: access_log_file: cannot open {}: {e}",
                    path.display()
                );
                return ExitCode::from(2);
            }
        }
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    init_tracing(&config);
    // While this is the only thread: taking them changes the environment.
    let inherited = match Inherited::from_env() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("consul-router: {e}");
            return ExitCode::FAILURE;
        }
    };
    let source = Source {
        path: cli.config,
        overrides,
    };
    match run(config, source, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // An access log file or certificate that cannot be read is a configuration error.
            if let Some(e @ (StartError::AccessLog { .. } | StartError::Tls(_))) =
                e.downcast_ref::<StartError>()
            {
                eprintln!("consul-router: configuration error: {e}");
                return ExitCode::from(2);
            }
            eprintln!("consul-router: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `consul-router announce`: flags that contradict each other exit with status 2, like
/// clap's own refusals; otherwise the app's status (or 0 without an app).
fn run_announce(args: Box<AnnounceArgs>) -> ExitCode {
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("consul-router announce: {e}");
            return ExitCode::from(2);
        }
    };
    // Standard output and error belong to the app: announce logs to standard error, with
    // colours only on a terminal.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("consul-router announce: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(announce::run(settings)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("consul-router announce: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `consul-router health`: one short line, on standard error when unhealthy.
fn health(args: &HealthArgs) -> ExitCode {
    use consul_router::health::{check, AdminUrl};
    let url = match AdminUrl::parse(&args.admin) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("consul-router health: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("consul-router health: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(check(&url, args.timeout)) {
        Ok(()) => {
            println!("healthy: 200 from {url}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the access log takes standard output: then the router's own logs and its start
/// line go to standard error, so that standard output holds access lines only.
fn access_log_on_stdout(config: &Config) -> bool {
    config.access_log != access_log::Format::Off && config.access_log_file.is_none()
}

/// The start line goes to standard error when standard output holds only access lines or
/// only JSON logs.
fn banner_on_stderr(config: &Config) -> bool {
    access_log_on_stdout(config) || config.log_format == LogFormat::Json
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = if access_log_on_stdout(config) {
        BoxMakeWriter::new(std::io::stderr)
    } else {
        BoxMakeWriter::new(std::io::stdout)
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match config.log_format {
        LogFormat::Text => fmt.init(),
        // One object per line: timestamp, level, target, the event's fields (message
        // included) at the top level, and the spans it is in.
        LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
}

/// Where the configuration comes from, to read it again on SIGHUP.
struct Source {
    path: Option<PathBuf>,
    overrides: Overrides,
}

fn run(config: Config, source: Source, inherited: Inherited) -> anyhow::Result<()> {
    // With the kernel's transparent huge pages "always", each 2 MiB region the allocator
    // touches is backed whole: measured at 10,000 services, 45 of the heap's 64 MB resident
    // were huge pages around 22 MB of live data. The heap is small and the request path
    // reuses its buffers, so huge pages buy nothing here. Only the router: `announce`'s app
    // would inherit the flag.
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!(error = %e, "cannot turn transparent huge pages off");
    }
    // One worker: a current-thread runtime skips the work-stealing scheduler's cross-thread
    // wakeups entirely (measured: see README, Performance).
    let mut rt = if config.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if config.workers > 1 {
        rt.worker_threads(config.workers);
    }
    let rt = rt
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let to_stderr = banner_on_stderr(&config);
    rt.block_on(async {
        // Before start: from the moment the log file exists, SIGUSR1 reopens it rather than
        // killing the process.
        let mut signals = Signals::new()?;
        let mut running = consul_router::start_inherited(config, inherited).await?;
        let banner = format!(
            "consul-router: proxy on http://{}, admin on http://{}",
            running.proxy_addr, running.admin_addr
        );
        if to_stderr {
            eprintln!("{banner}");
        } else {
            println!("{banner}");
        }
        loop {
            match signals.next().await {
                Event::Stop => break,
                // The writer logs the reopen (or why it failed).
                Event::Reopen => running.access_log().reopen(),
                Event::Reload => reload(&mut running, &source).await,
            }
        }
        tracing::info!("shutting down: draining in-flight requests");
        consul_router::notify::stopping("draining in-flight requests");
        running.shutdown().await;
        Ok(())
    })
}

/// SIGHUP: reads the configuration again and puts it in force; a file that is refused (the
/// log line names the key) or a listener that cannot be bound leaves the old one running.
async fn reload(running: &mut consul_router::Running, source: &Source) {
    let path = source.path.as_deref();
    tracing::info!(file = ?path, "SIGHUP: reloading the configuration");
    consul_router::notify::reloading("reloading the configuration");
    let outcome = match Config::load(path, &source.overrides) {
        Ok(config) => running.reload(config).await.map_err(|e| e.to_string()),
        Err(e) => Err(format!("configuration error: {e}")),
    };
    let status = match outcome {
        Ok(done) => {
            if !done.need_restart.is_empty() {
                tracing::warn!(keys = ?done.need_restart, "changed keys that take effect only after a restart");
            }
            tracing::info!(applied = ?done.applied, "configuration reloaded");
            format!(
                "configuration reloaded ({} keys changed)",
                done.applied.len()
            )
        }
        Err(e) => {
            tracing::error!("reload refused, the previous configuration stays in force: {e}");
            format!("reload refused, previous configuration in force: {e}")
        }
    };
    // Before the first table, READY=1 is still the startup's to send.
    if running.routes.load().ready {
        consul_router::notify::ready(&status);
    } else {
        consul_router::notify::status(&status);
    }
}

/// What a signal asks for.
enum Event {
    /// SIGTERM or SIGINT: drain and exit.
    Stop,
    /// SIGUSR1: reopen the access log file (for logrotate).
    Reopen,
    /// SIGHUP: reload the configuration.
    Reload,
}

/// The signals the binary handles.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        let listen = |kind| signal(kind).context("cannot listen for signals");
        Ok(Signals {
            term: listen(SignalKind::terminate())?,
            int: listen(SignalKind::interrupt())?,
            usr1: listen(SignalKind::user_defined1())?,
            hup: listen(SignalKind::hangup())?,
        })
    }

    /// The next signal's event.
    async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.term.recv() => Event::Stop,
            _ = self.int.recv() => Event::Stop,
            _ = self.usr1.recv() => Event::Reopen,
            _ = self.hup.recv() => Event::Reload,
        }
    }
}
