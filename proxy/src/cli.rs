//! The command line: `tollgate run --config FILE` and
//! `tollgate check --config FILE`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::ProcessEnv;
use crate::runtime::{self, StartError};

/// Exit code for an unusable config (also `check` finding problems).
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for any other failure to start.
pub const EXIT_FAILURE: u8 = 1;

/// tollgate: a gRPC-aware HTTP/2 sidecar proxy with global rate limits.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve: proxy gRPC calls per the config; SIGHUP reloads it, SIGTERM drains.
    Run {
        /// The YAML config file (see config/dev.yaml).
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        /// Log format.
        #[arg(long, env = "TOLLGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a config without binding ports: print every problem with its
    /// path and exit 2, or print a summary and exit 0.
    Check {
        /// The YAML config file.
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

fn exit_for(e: &StartError) -> u8 {
    match e {
        StartError::Config(_) | StartError::Setup { .. } => EXIT_CONFIG,
        StartError::Bind { .. } => EXIT_FAILURE,
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { config } => match runtime::load(
            &config,
            &ProcessEnv,
            &std::sync::Arc::new(crate::limit::memory::MemoryStore::new(1)),
            None,
        ) {
            Ok((active, _)) => {
                println!(
                    "{}: OK ({} routes, {} upstreams)",
                    config.display(),
                    active.routes.routes().len(),
                    active.upstreams.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tollgate: {e}");
                ExitCode::from(exit_for(&e))
            }
        },
        Command::Run { config, log_format } => {
            init_logging(log_format);
            let handle = match runtime::start(&config, &ProcessEnv) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("tollgate: {e}");
                    return ExitCode::from(exit_for(&e));
                }
            };
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tollgate: cannot start the signal runtime: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            rt.block_on(async {
                let mut signals = wait_for_signals(&handle).await;
                handle.mark_not_ready();
                let delay = handle.drain_delay();
                if !delay.is_zero() {
                    tracing::info!(drain_delay = ?delay, "stopping: /ready fails; still accepting for drain_delay (a second signal skips it)");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = signals.next() => tracing::info!("second signal: draining now"),
                    }
                }
            });
            tracing::info!("draining: /ready fails, GOAWAY sent, waiting for in-flight calls");
            handle.drain();
            tracing::info!("tollgate stopped");
            ExitCode::SUCCESS
        }
    }
}

/// The stop signals (SIGTERM, SIGINT), once installed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Returns on the next SIGTERM or SIGINT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Returns on SIGTERM or SIGINT (with the signals, to wait for another);
/// SIGHUP asks for a reload.
async fn wait_for_signals(handle: &runtime::Handle) -> Signals {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(term), Ok(int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    let mut signals = Signals { term, int };
    loop {
        tokio::select! {
            _ = signals.next() => return signals,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                handle.reload();
            }
        }
    }
}
