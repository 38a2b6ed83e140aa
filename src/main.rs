//! The `consul-router` binary: flags, logging, runtime, signals.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use consul_router::config::{Config, Overrides};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Reverse proxy routing Host headers to Consul services.
#[derive(Debug, Parser)]
#[command(name = "consul-router", version, about)]
struct Cli {
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
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = |k: &str| std::env::var(k).ok();
    let overrides = Overrides {
        listen: cli.listen,
        admin_listen: cli.admin_listen,
        consul: cli.consul,
        domains: cli.domains,
        strategy: cli.strategy,
        workers: cli.workers,
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
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("consul-router: {e:#}");
            ExitCode::FAILURE
        }
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
    rt.block_on(async {
        let running = consul_router::start(config).await?;
        println!(
            "consul-router: proxy on http://{}, admin on http://{}",
            running.proxy_addr, running.admin_addr
        );
        wait_for_signal().await?;
        tracing::info!("shutting down: draining in-flight requests");
        running.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r?,
    }
    Ok(())
}
