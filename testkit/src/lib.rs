//! Test harness that runs real PostgreSQL 15, Redis, Redis Cluster and
//! Kafka-protocol (tansu) servers on free loopback ports for integration
//! tests.
//!
//! Every server is started by the project's scripts in `scripts/`
//! (`postgres.sh`, `redis.sh`, `redis-cluster.sh`, `kafka.sh`), which install
//! what is missing (apt-get, pip; they run as root) and print `KEY=VALUE`
//! lines that this crate reads. Each instance lives in its own temporary
//! directory and is started with `--owner <this process id> --cleanup`: a
//! detached watchdog stops it and deletes its directory once the test process
//! has exited, even when the process was killed. Instances returned by
//! `start` are also stopped (and their directory deleted) on drop; the
//! `shared()` ones live as long as the test process.
//!
//! All functions block; call them from async code through
//! `tokio::task::spawn_blocking` or directly before the runtime work starts
//! (a start takes 0.1 to 3 seconds).
//!
//! Failures panic with the script's stderr and a hint on how to fix them:
//! this is a test harness, and a missing service should fail the test loudly.
//!
//! ```no_run
//! let pg = testkit::Postgres::start();
//! let db_url = pg.create_database("ledger");
//! let redis = testkit::Redis::shared();
//! let kafka = testkit::Kafka::start();
//! kafka.create_topic("payments.events", 3);
//! println!("{db_url} {} {}", redis.url(), kafka.brokers());
//! ```

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

/// Folder holding the service scripts.
fn scripts_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts"))
}

/// Returns a TCP port that is free on 127.0.0.1 right now (in 15000..32000,
/// below the kernel's ephemeral range).
pub fn free_port() -> u16 {
    let hasher_seed = RandomState::new();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    for attempt in 0u32..10_000 {
        let mut hasher = hasher_seed.build_hasher();
        hasher.write_u128(nanos);
        hasher.write_u32(attempt);
        hasher.write_u32(std::process::id());
        let port = 15_000 + (hasher.finish() % 17_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("testkit::free_port: no free port on 127.0.0.1 in 15000..32000 after 10000 tries");
}

/// Runs `scripts/<script> args...` and returns its stdout; panics with its
/// stderr when it fails.
fn run_script(script: &str, args: &[OsString]) -> String {
    let path = scripts_dir().join(script);
    let output = Command::new("bash")
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("testkit: could not run bash {}: {e}", path.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        panic!(
            "testkit: `{} {}` failed ({}).\n--- stderr ---\n{}\n--- \
             The scripts need root and reach apt/PyPI to install missing \
             packages; run scripts/install-test-deps.sh as root to install \
             everything up front.",
            path.display(),
            args.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" "),
            output.status,
            stderr.trim_end(),
        );
    }
    stdout
}

/// Parses the `KEY=VALUE` lines a script prints.
fn parse_env(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// One running service: its script, its directory and the values its `start`
/// printed.
#[derive(Debug)]
struct Instance {
    script: &'static str,
    dir: PathBuf,
    /// Some for instances removed on drop; None for shared ones (their
    /// watchdog deletes the directory when the process exits).
    tmp: Option<TempDir>,
    env: Vec<(String, String)>,
    start_args: Vec<OsString>,
}

impl Instance {
    fn start(script: &'static str, name: &str, extra: &[&str], shared: bool) -> Instance {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("testkit-{name}-"))
            .tempdir()
            .unwrap_or_else(|e| {
                panic!("testkit: could not create a temporary directory for {name}: {e}")
            });
        // The scripts own the whole directory; `stop --remove` (on drop) or the
        // watchdog (`--cleanup`, when the process exits) deletes it.
        let dir = tmp.path().to_path_buf();
        let tmp = if shared {
            // The watchdog (--cleanup) removes it once the process exits.
            let _kept = tmp.keep();
            None
        } else {
            Some(tmp)
        };
        let mut start_args: Vec<OsString> = vec![
            "--owner".into(),
            std::process::id().to_string().into(),
            "--cleanup".into(),
        ];
        start_args.extend(extra.iter().map(OsString::from));
        let mut instance = Instance {
            script,
            dir,
            tmp,
            env: Vec::new(),
            start_args,
        };
        instance.env = parse_env(&instance.run_start());
        instance
    }

    fn run_start(&self) -> String {
        let mut args: Vec<OsString> = vec!["start".into(), self.dir.clone().into()];
        args.extend(self.start_args.iter().cloned());
        run_script(self.script, &args)
    }

    fn get(&self, key: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| {
                panic!(
                    "testkit: scripts/{} start printed no {key}= line (got {:?})",
                    self.script, self.env
                )
            })
    }

    fn port(&self, key: &str) -> u16 {
        let value = self.get(key);
        value.parse().unwrap_or_else(|e| {
            panic!(
                "testkit: scripts/{} printed {key}={value}, not a port: {e}",
                self.script
            )
        })
    }

    fn stop(&self) {
        run_script(self.script, &["stop".into(), self.dir.clone().into()]);
    }

    fn start_again(&self) {
        let env = parse_env(&self.run_start());
        assert_eq!(
            env,
            self.env,
            "testkit: scripts/{} restarted {} with other settings",
            self.script,
            self.dir.display()
        );
    }

    /// Runs `script <command> <dir> args...` and returns its stdout.
    fn run(&self, command: &str, args: &[&str]) -> String {
        let mut all: Vec<OsString> = vec![command.into(), self.dir.clone().into()];
        all.extend(args.iter().map(OsString::from));
        run_script(self.script, &all)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.tmp.is_none() {
            return;
        }
        // No panic in drop: report and let the watchdog clean up.
        let path = scripts_dir().join(self.script);
        match Command::new("bash")
            .arg(&path)
            .arg("stop")
            .arg(&self.dir)
            .arg("--remove")
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "testkit: {} stop {} failed: {}",
                path.display(),
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("testkit: could not run {}: {e}", path.display()),
        }
    }
}

/// Path of a PostgreSQL client binary (`PGBIN`, else Debian's folder, else
/// `PATH`).
fn pg_binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("PGBIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
    let path = dir.join(name);
    if path.exists() {
        path
    } else {
        PathBuf::from(name)
    }
}

/// A PostgreSQL 15 server (superuser `app`, password auth) in its own
/// temporary directory.
#[derive(Debug)]
pub struct Postgres {
    inner: Instance,
    port: u16,
}

impl Postgres {
    fn start_with(mode: &str, shared: bool) -> Postgres {
        let inner = Instance::start("postgres.sh", "pg", &[mode], shared);
        let port = inner.port("PORT");
        Postgres { inner, port }
    }

    /// Starts a server tuned for tests: fsync, synchronous_commit and
    /// full_page_writes off.
    pub fn start() -> Postgres {
        Postgres::start_with("--fast", false)
    }

    /// Starts a server with PostgreSQL's default durability, for benchmarks.
    pub fn start_durable() -> Postgres {
        Postgres::start_with("--durable", false)
    }

    /// One fast-mode server for the whole test process, started on first use
    /// and stopped by the watchdog when the process exits.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(|| Postgres::start_with("--fast", true))
    }

    /// `postgres://app:<password>@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> &str {
        self.inner.get("URL")
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` on this server (which need not exist).
    pub fn database_url(&self, name: &str) -> String {
        let url = self.url();
        let base = url
            .strip_suffix("/postgres")
            .unwrap_or_else(|| panic!("testkit: unexpected PostgreSQL URL {url} (no /postgres)"));
        format!("{base}/{name}")
    }

    /// Runs `psql -c sql` against database `database` and returns its
    /// unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let psql = pg_binary("psql");
        let output = Command::new(&psql)
            .arg(self.database_url(database))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "testkit: could not run {}: {e}; install postgresql-client-15",
                    psql.display()
                )
            });
        if !output.status.success() {
            panic!(
                "testkit: psql {sql:?} on {} failed: {}",
                self.database_url(database),
                String::from_utf8_lossy(&output.stderr).trim_end()
            );
        }
        String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_owned()
    }

    /// Creates database `name` (letters, digits, `_`) and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "testkit: database name {name:?} must be letters, digits and _ only"
        );
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.database_url(name)
    }

    /// Stops the server (`pg_ctl stop -m fast`); the data stays.
    pub fn stop(&self) {
        self.inner.stop();
    }

    /// Starts the stopped server again: same directory, data, port and URL.
    pub fn start_again(&self) {
        self.inner.start_again();
    }

    /// The instance's directory (data in `data/`, log in `postgres.log`).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

/// A single redis-server (no persistence) in its own temporary directory.
#[derive(Debug)]
pub struct Redis {
    inner: Instance,
    port: u16,
}

impl Redis {
    fn start_with(shared: bool) -> Redis {
        let inner = Instance::start("redis.sh", "redis", &[], shared);
        let port = inner.port("PORT");
        Redis { inner, port }
    }

    /// Starts a redis-server on a free port.
    pub fn start() -> Redis {
        Redis::start_with(false)
    }

    /// One server for the whole test process, started on first use and
    /// stopped by the watchdog when the process exits.
    pub fn shared() -> &'static Redis {
        static SHARED: OnceLock<Redis> = OnceLock::new();
        SHARED.get_or_init(|| Redis::start_with(true))
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        self.inner.get("URL")
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (`shutdown nosave`: its keys are gone).
    pub fn stop(&self) {
        self.inner.stop();
    }

    /// Starts the stopped server again on the same port (empty).
    pub fn start_again(&self) {
        self.inner.start_again();
    }

    /// The instance's directory (log in `redis.log`).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Freezes the server (SIGSTOP): connected, silent, as a stalled host.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = std::fs::read_to_string(self.dir().join("redis.pid"))
            .unwrap_or_else(|e| panic!("redis.pid in {}: {e}", self.dir().display()));
        let ok = std::process::Command::new("kill")
            .args([sig, pid.trim()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {}", pid.trim());
    }
}

/// A Redis Cluster of three masters (no replicas) in its own temporary
/// directory.
#[derive(Debug)]
pub struct RedisCluster {
    inner: Instance,
    urls: Vec<String>,
    ports: Vec<u16>,
}

impl RedisCluster {
    fn start_with(shared: bool) -> RedisCluster {
        let inner = Instance::start("redis-cluster.sh", "cluster", &[], shared);
        let urls = inner.get("URLS").split(',').map(str::to_owned).collect();
        let ports = inner
            .get("PORTS")
            .split(',')
            .map(|p| {
                p.parse()
                    .unwrap_or_else(|e| panic!("testkit: redis-cluster.sh printed port {p:?}: {e}"))
            })
            .collect();
        RedisCluster { inner, urls, ports }
    }

    /// Starts three nodes and waits for `cluster_state:ok` on each.
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(false)
    }

    /// One cluster for the whole test process, started on first use and
    /// stopped by the watchdog when the process exits.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(|| RedisCluster::start_with(true))
    }

    /// `redis://127.0.0.1:<port>` of each node.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Each node's TCP port on 127.0.0.1.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Stops all nodes (keys are gone; the cluster layout is kept).
    pub fn stop(&self) {
        self.inner.stop();
    }

    /// Starts the stopped nodes again on the same ports and waits until the
    /// cluster is ok.
    pub fn start_again(&self) {
        self.inner.start_again();
    }

    /// The instance's directory (one `nodeN/` folder per node).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

/// A Kafka-protocol broker (tansu, in-memory storage) in its own temporary
/// directory.
#[derive(Debug)]
pub struct Kafka {
    inner: Instance,
    port: u16,
}

impl Kafka {
    fn start_with(shared: bool) -> Kafka {
        let inner = Instance::start("kafka.sh", "kafka", &[], shared);
        let port = inner.port("PORT");
        Kafka { inner, port }
    }

    /// Starts a broker on a free port.
    pub fn start() -> Kafka {
        Kafka::start_with(false)
    }

    /// One broker for the whole test process, started on first use and
    /// stopped by the watchdog when the process exits.
    pub fn shared() -> &'static Kafka {
        static SHARED: OnceLock<Kafka> = OnceLock::new();
        SHARED.get_or_init(|| Kafka::start_with(true))
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub fn brokers(&self) -> &str {
        self.inner.get("BROKERS")
    }

    /// The broker's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a topic (tansu does not auto-create); an existing one is fine.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        self.inner.run("topic", &[name, &partitions.to_string()]);
    }

    /// Names of the broker's topics.
    pub fn topics(&self) -> Vec<String> {
        self.inner
            .run("list", &[])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Stops the broker; its topics and messages are lost (memory storage).
    pub fn stop(&self) {
        self.inner.stop();
    }

    /// Starts the broker again on the same port and re-creates the topics
    /// made with [`Kafka::create_topic`] (empty).
    pub fn start_again(&self) {
        self.inner.start_again();
    }

    /// The instance's directory (log in `broker.log`).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

/// Runs `promtool check metrics` on exposition text; `Err` carries
/// promtool's complaint. promtool comes with Prometheus
/// (`scripts/install-test-deps.sh` installs it).
pub fn promtool_check_metrics(text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool ({e}); run scripts/install-test-deps.sh"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("writing to promtool: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for promtool: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Polls `f` every 25 ms until it returns `Some`, and returns that value;
/// panics with `what` once `timeout` has passed.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// A plain HTTP/1.1 `GET path` to `addr`; returns the status code (0 if
/// the answer has none) and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("cannot send to {addr}: {e}"));
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .await
        .unwrap_or_else(|e| panic!("cannot read from {addr}: {e}"));
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
