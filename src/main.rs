//! The `courier` binary: `serve` runs the broker; `pub` and `sub` talk to
//! one; `bench` measures one; `admin` inspects and operates one.

mod cli;

/// sled 0.34 copies a tree node on every insert: the broker's hottest path
/// is allocation, where mimalloc beats the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use courier::config::{Config, Overrides};

/// Courier: a reliable real-time message broker.
#[derive(Debug, Parser)]
#[command(name = "courier", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Publish a message (or each line of stdin).
    Pub(cli::pubsub::PubArgs),
    /// Subscribe and print one line per message.
    Sub(cli::pubsub::SubArgs),
    /// Measure a broker (a local one unless --url is given).
    Bench(cli::bench::BenchArgs),
    /// Inspect and operate a running broker through its admin API.
    Admin(cli::admin::AdminArgs),
    /// Mint a development token (JWT) from the configured secret.
    Token(cli::token::TokenArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Config file (TOML).
    #[arg(long, env = "COURIER_CONFIG")]
    config: Option<PathBuf>,
    /// Public listener address (WebSocket, health).
    #[arg(long, env = "COURIER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin listener address.
    #[arg(long, env = "COURIER_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Where messages and consumer state are stored.
    #[arg(long, env = "COURIER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log format: `text` or `json` (default: `[log] format`, else `text`).
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
}

fn init_logging(format: &str, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        admin_listen: args.admin_listen,
        data_dir: args.data_dir,
        // From the environment only: a flag would show the token in `ps`.
        admin_token: std::env::var("COURIER_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    tracing_subscriber::EnvFilter::try_new(&config.log.level).with_context(|| {
        format!(
            "[log] level {:?} is not a log filter (e.g. \"info\" or \"courier=debug,info\")",
            config.log.level
        )
    })?;
    // RUST_LOG beats `[log] level`; the flag beats `[log] format`.
    let format = args.log_format.as_deref().unwrap_or(&config.log.format);
    init_logging(format, &config.log.level);
    let signal =
        courier::server::shutdown_signal().context("cannot listen for SIGTERM and Ctrl-C")?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; pick another address with --listen or COURIER_LISTEN",
                config.server.listen
            )
        })?;
    courier::server::run(config, listener, signal).await?;
    Ok(())
}

/// Turns transparent huge pages off for this process, before the runtime
/// allocates. mimalloc asks for them on its arenas (`MADV_HUGEPAGE`), so
/// the first touch of each new 2 MiB region faults in and zeroes a whole
/// huge page at once: 5 ms on the channel writer thread on our 2-vCPU
/// benchmark VM, during which no publish is confirmed (docs/benchmarks.md).
/// With 4 KiB pages the same growth costs a few microseconds a fault,
/// spread out. Redis turns them off for the same reason.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("courier: cannot turn transparent huge pages off ({e}); latency may spike");
    }
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("courier: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Pub(args) => {
            init_logging("text", "warn");
            runtime.block_on(cli::pubsub::publish(args))
        }
        Command::Sub(args) => {
            init_logging("text", "warn");
            runtime.block_on(cli::pubsub::subscribe(args))
        }
        Command::Bench(args) => {
            init_logging("text", "warn");
            match args.client_threads() {
                None => runtime.block_on(cli::bench::run(args)),
                Some(threads) => {
                    let mut builder = if threads == 1 {
                        tokio::runtime::Builder::new_current_thread()
                    } else {
                        let mut builder = tokio::runtime::Builder::new_multi_thread();
                        builder.worker_threads(threads);
                        builder
                    };
                    match builder.enable_all().build() {
                        Ok(own) => own.block_on(cli::bench::run(args)),
                        Err(e) => Err(anyhow::anyhow!("cannot start the bench runtime: {e}")),
                    }
                }
            }
        }
        Command::Admin(args) => {
            init_logging("text", "warn");
            runtime.block_on(cli::admin::run(args))
        }
        Command::Token(args) => cli::token::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("courier: {e:#}");
            ExitCode::FAILURE
        }
    }
}
