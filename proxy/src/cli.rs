//! The command line: `tollgate run --config FILE`, `tollgate check
//! --config FILE`, `tollgate health`, and the policy tools `explain`,
//! `test` and `inspect`.

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
    /// Explain a call without sending it: the route it matches and why
    /// (and the routes it beat), and each of the route's limits: its key as
    /// the store holds it, rate, algorithm, cost, failure mode and shadow
    /// state. Reads the config only; asks no store, upstream or network.
    Explain {
        /// The YAML config file.
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        /// The call's method: /package.Service/Method.
        method: String,
        /// A request header (gRPC metadata), 'name: value'; repeatable.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// The client's IP, as the listener sees it.
        #[arg(long, default_value = "127.0.0.1")]
        peer: std::net::IpAddr,
        /// The identity of the client's TLS certificate (mTLS).
        #[arg(long)]
        tls_identity: Option<String>,
        /// A field of the first request message, path=value (names need
        /// the upstream's schema.descriptor_set; numbers such as 4.1 do
        /// not); repeatable.
        #[arg(long = "field")]
        fields: Vec<String>,
        /// An upstream's request schema from a FileDescriptorSet file,
        /// UPSTREAM=FILE, instead of its reflection (not asked); repeatable.
        #[arg(long = "schema")]
        schemas: Vec<String>,
    },
    /// Run policy tests: each test of TESTS is a timeline of calls and the
    /// outcome each must have (allowed, limited with its retry delay,
    /// skipped…), run against the config's routes and limits on a virtual
    /// clock. Exit 0 when all pass, 1 with a diff of each that fails, 2 when
    /// a file cannot be used.
    Test {
        /// The YAML config file.
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        /// The tests file (YAML).
        tests: PathBuf,
        /// An upstream's request schema from a FileDescriptorSet file,
        /// UPSTREAM=FILE, instead of its reflection (not asked); repeatable.
        #[arg(long = "schema")]
        schemas: Vec<String>,
    },
    /// Convert another rate limiter's config into tollgate's.
    Convert {
        #[command(subcommand)]
        from: ConvertFrom,
    },
    /// Show a key's state in the store a running tollgate uses (its admin
    /// `/limits`, which changes nothing): what is used and left of the limit,
    /// and when it is whole again. Without --limit and --key, the routes
    /// with limits (or --route's limits).
    Inspect {
        /// A route's name (as in the metrics), or a call's
        /// /package.Service/Method (the route it takes).
        #[arg(long)]
        route: Option<String>,
        /// A limit's name.
        #[arg(long, requires = "key", requires = "route")]
        limit: Option<String>,
        /// The key's values as the limit reads them from a call, joined by
        /// '/' (as `tollgate explain` prints them), e.g. merchant-7 or
        /// acct-1/EUR.
        #[arg(long, requires = "limit")]
        key: Option<String>,
        /// Print the admin server's JSON answer as it is.
        #[arg(long)]
        json: bool,
        /// The admin server's address (a wildcard bind is asked on
        /// loopback). Default: the config's admin.address, else
        /// 127.0.0.1:9901.
        #[arg(long, env = "TOLLGATE_ADMIN_LISTEN")]
        admin: Option<String>,
        /// The config file to read admin.address from.
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Ask a running tollgate whether it is ready (its admin `/ready`): exit
    /// 0 when it is, 1 otherwise. For a container HEALTHCHECK or an exec
    /// probe; needs no curl.
    Health {
        /// The admin server's address (a wildcard bind such as 0.0.0.0:9901
        /// is asked on loopback). Default: the config's admin.address, else
        /// 127.0.0.1:9901.
        #[arg(long, env = "TOLLGATE_ADMIN_LISTEN")]
        admin: Option<String>,
        /// The config file to read admin.address from.
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum ConvertFrom {
    /// Print the tollgate config (routes and limits) that does what
    /// envoyproxy/ratelimit config files did behind Envoy's ratelimit
    /// filter. Exit 0 when every rule is converted; 1 when some are not
    /// (each listed, with why); 2 when a file cannot be used.
    EnvoyRatelimit {
        /// envoyproxy/ratelimit config files, or folders of them.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The calls a generic_key value was sent with, VALUE=MATCH
        /// (MATCH: /package.Service/Method, package.Service or package.*);
        /// repeatable, one per generic_key value.
        #[arg(long = "route")]
        routes: Vec<String>,
        /// The request header a descriptor key was read from (Envoy's
        /// request_headers action), KEY=HEADER; default: the header of
        /// the key's own name.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// The address of the service behind tollgate.
        #[arg(long, default_value = "127.0.0.1:8080")]
        upstream: String,
        /// Count in this Redis (redis://HOST:PORT), shared by every
        /// replica as behind the rate limit service; default: in memory.
        #[arg(long)]
        redis: Option<String>,
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
        Command::Health {
            admin,
            config,
            timeout,
        } => match admin_address(admin, config) {
            Ok(dial) => health(dial, timeout),
            Err(code) => code,
        },
        Command::Convert {
            from:
                ConvertFrom::EnvoyRatelimit {
                    files,
                    routes,
                    headers,
                    upstream,
                    redis,
                },
        } => {
            let options = crate::tools::convert::Options {
                files,
                routes,
                headers,
                upstream,
                redis,
            };
            finish(crate::tools::convert::convert(&options).map(|c| {
                for l in &c.left {
                    eprintln!("tollgate: not converted: {l}");
                }
                let whole = c.left.is_empty();
                (c.yaml, whole)
            }))
        }
        Command::Inspect {
            route,
            limit,
            key,
            json,
            admin,
            config,
            timeout,
        } => match admin_address(admin, config) {
            Ok(dial) => inspect(
                dial,
                &crate::tools::inspect::Query { route, limit, key },
                json,
                timeout,
            ),
            Err(code) => code,
        },
        Command::Explain {
            config,
            method,
            headers,
            peer,
            tls_identity,
            fields,
            schemas,
        } => {
            let call = crate::tools::explain::Call {
                path: method,
                headers,
                peer,
                tls_identity,
                fields,
            };
            let explained = crate::tools::explain::schema_args(&schemas)
                .and_then(|s| crate::tools::explain::explain(&config, &ProcessEnv, &s, &call));
            match explained {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tollgate: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Test {
            config,
            tests,
            schemas,
        } => {
            let ran = crate::tools::explain::schema_args(&schemas)
                .and_then(|s| crate::tools::test::run(&config, &tests, &s, &ProcessEnv));
            finish(ran)
        }
        Command::Check { config } => match runtime::check(&config, &ProcessEnv) {
            Ok(checked) => {
                let rls = checked
                    .rls_domains
                    .map(|n| format!(", {n} rate limit service domains"))
                    .unwrap_or_default();
                println!(
                    "{}: OK ({} routes, {} upstreams{rls})",
                    config.display(),
                    checked.routes,
                    checked.upstreams
                );
                for (upstream, why) in &checked.unresolved {
                    eprintln!(
                        "tollgate: note: field names of upstream {upstream:?} are not checked: its reflection did not answer ({why}); check them with the upstream running, or name a schema.descriptor_set"
                    );
                }
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
            let rt = match runtime::current_thread() {
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

/// A tool's end: its output printed, and exit 0 when it found all well,
/// 1 when not; its error and exit 2 when a file or flag was unusable.
fn finish(out: Result<(String, bool), String>) -> ExitCode {
    match out {
        Ok((text, well)) => {
            print!("{text}");
            if well {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// The admin server to dial: `admin`, else the config's admin.address,
/// else the default; `Err`: the exit for an unusable address or config.
fn admin_address(
    admin: Option<String>,
    config: Option<PathBuf>,
) -> Result<std::net::SocketAddr, ExitCode> {
    let address = match (admin.filter(|a| !a.is_empty()), config) {
        (Some(a), _) => a,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                eprintln!("tollgate: cannot read {}: {e}", path.display());
                ExitCode::from(EXIT_FAILURE)
            })?;
            match crate::config::Config::parse(&text) {
                Ok(c) => c.admin.address,
                Err(e) => {
                    eprintln!("tollgate: {}: {e}", path.display());
                    return Err(ExitCode::from(EXIT_CONFIG));
                }
            }
        }
        (None, None) => crate::health::DEFAULT_ADMIN.to_owned(),
    };
    let Ok(listen) = address.parse::<std::net::SocketAddr>() else {
        eprintln!(
            "tollgate: the admin address {} is not an address like 127.0.0.1:9901",
            crate::config::shown(&address)
        );
        return Err(ExitCode::from(EXIT_CONFIG));
    };
    Ok(crate::health::dial_address(listen))
}

/// `tollgate health`: 0 when `/ready` answers 200, else 1 with the reason.
fn health(dial: std::net::SocketAddr, timeout: std::time::Duration) -> ExitCode {
    let answer = runtime::current_thread()
        .map_err(|e| format!("cannot start a runtime: {e}"))
        .and_then(|rt| rt.block_on(crate::health::check_ready(dial, timeout)));
    match answer {
        Ok(line) => {
            println!("tollgate at {dial}: {line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `tollgate inspect`: `/limits`'s answer, for a person (or as JSON); 1
/// with the server's reason when it cannot answer.
fn inspect(
    dial: std::net::SocketAddr,
    query: &crate::tools::inspect::Query,
    json: bool,
    timeout: std::time::Duration,
) -> ExitCode {
    let answer = runtime::current_thread()
        .map_err(|e| format!("cannot start a runtime: {e}"))
        .and_then(|rt| rt.block_on(crate::health::get(dial, &query.path(), timeout)));
    let (status, body) = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    if status != http::StatusCode::OK {
        let text = String::from_utf8_lossy(&body[..body.len().min(1024)]);
        eprintln!("tollgate: /limits answered {status}: {}", text.trim_end());
        return ExitCode::from(EXIT_FAILURE);
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(_) if json => print!("{}", String::from_utf8_lossy(&body)),
        Ok(v) => print!("{}", crate::tools::inspect::render(&v)),
        Err(e) => {
            eprintln!("tollgate: /limits answered something that is not JSON ({e}): is {dial} tollgate's admin server?");
            return ExitCode::from(EXIT_FAILURE);
        }
    }
    ExitCode::SUCCESS
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
