//! The `consul-router` binary: flags, logging, runtime, signals; the router by default,
//! `announce` as a subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use consul_router::access_log::{self, AccessLog};
use consul_router::announce::{self, AnnounceArgs};
use consul_router::config::{Config, LogFormat, Overrides};
use consul_router::StartError;
use tokio::signal::unix::{signal, SignalKind};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Reverse proxy routing Host headers to Consul services.
#[derive(Debug, Parser)]
#[command(
    name = "consul-router",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Without a subcommand, consul-router runs the router.
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
    /// Consul agent URL [default: $CONSUL_HTTP_ADDR, else http://127.0.0.1:8500].
    #[arg(long, value_name = "URL")]
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

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Register this instance in Consul, keep its check passing and report its load in
    /// Service Meta; with `-- COMMAND`, run the app as a child (a container's entrypoint).
    Announce(AnnounceArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Announce(args)) = cli.command {
        return run_announce(args);
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
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // An access log file that cannot be opened is a configuration error.
            if let Some(e @ StartError::AccessLog { .. }) = e.downcast_ref::<StartError>() {
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
fn run_announce(args: AnnounceArgs) -> ExitCode {
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

fn run(config: Config) -> anyhow::Result<()> {
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
        let running = consul_router::start(config).await?;
        let banner = format!(
            "consul-router: proxy on http://{}, admin on http://{}",
            running.proxy_addr, running.admin_addr
        );
        if to_stderr {
            eprintln!("{banner}");
        } else {
            println!("{banner}");
        }
        signals.wait_for_stop(running.access_log()).await;
        tracing::info!("shutting down: draining in-flight requests");
        consul_router::notify::stopping("draining in-flight requests");
        running.shutdown().await;
        Ok(())
    })
}

/// The signals the binary handles: SIGTERM and SIGINT stop it, SIGUSR1 reopens the access
/// log file (for logrotate).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        let listen = |kind| signal(kind).context("cannot listen for signals");
        Ok(Signals {
            term: listen(SignalKind::terminate())?,
            int: listen(SignalKind::interrupt())?,
            usr1: listen(SignalKind::user_defined1())?,
        })
    }

    /// Waits for SIGTERM or SIGINT, reopening the access log on each SIGUSR1 meanwhile.
    async fn wait_for_stop(&mut self, log: &AccessLog) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                // The writer logs the reopen (or why it failed).
                _ = self.usr1.recv() => log.reopen(),
            }
        }
    }
}
