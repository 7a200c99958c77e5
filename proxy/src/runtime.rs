//! Starting, reloading and draining a tollgate process.
//!
//! [`start`] loads the config, binds every listener, and spawns the worker
//! threads and a control thread (admin server, config watcher). It returns a
//! [`Handle`] that the binary drives from signals (SIGHUP reloads,
//! SIGTERM/SIGINT drain) and that tests drive directly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, ConfigError, Env, ProcessEnv};
use crate::limit::redis::RedisStore;
use crate::metrics;
use crate::server::{self, TlsState};
use crate::state::{self, Active, Shared};

/// Why tollgate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file is unusable.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The config is valid but could not be put to work (TLS files, …).
    #[error("{path}: {message}")]
    Setup {
        /// The config file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({what}): {cause}; free the port or change {what}")]
    Bind {
        /// The address.
        addr: String,
        /// `listener.address` or `admin.address`.
        what: &'static str,
        /// The OS error.
        cause: std::io::Error,
    },
}

/// A running tollgate.
pub struct Handle {
    /// Where gRPC clients connect.
    pub listen_addr: SocketAddr,
    /// Where the admin endpoints are.
    pub admin_addr: SocketAddr,
    /// Where Envoy's rate limit service listens, when `rls` is set.
    pub rls_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    drain: watch::Sender<bool>,
    /// Stops the control thread (admin server) once the workers are done,
    /// so `/ready` keeps answering 503 while draining.
    stop: watch::Sender<bool>,
    reload: mpsc::UnboundedSender<()>,
    workers: Vec<JoinHandle<()>>,
    control: Option<JoinHandle<()>>,
}

/// A single-threaded runtime with I/O and timers: each worker, the control
/// thread, and the command line's signal and health loops run on one.
pub fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// What `tollgate check` found in a usable file.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Routes.
    pub routes: usize,
    /// Upstreams.
    pub upstreams: usize,
    /// Domains of the rate limit service's config files (`rls`).
    pub rls_domains: Option<usize>,
    /// Upstreams whose reflection did not answer, and why: their field
    /// names were not resolved.
    pub unresolved: Vec<(String, String)>,
}

/// Checks a config file as a start would read it: the file itself, the
/// listener's certificate and key, the upstreams' CA bundles and the Redis
/// settings. Nothing is bound, connected or kept.
pub fn check(path: &Path, env: &dyn Env) -> Result<Checked, StartError> {
    let config = Config::load(path, env)?;
    let base = path.parent();
    let setup = |message: String| StartError::Setup {
        path: path.to_owned(),
        message,
    };
    if let Some(t) = &config.listener.tls {
        crate::tls::server_config(t, base).map_err(|m| setup(format!("listener.tls: {m}")))?;
    }
    let upstreams = crate::routes::upstream_specs(&config, base, None).map_err(setup)?;
    if config.limiter.backend != crate::config::Backend::Memory {
        RedisStore::check(&config.limiter, base).map_err(setup)?;
    }
    // Field paths are resolved as a load would (reflection is asked; an
    // upstream that does not answer leaves its names unchecked).
    let schemas = crate::schema::load(&config, base, None).map_err(setup)?;
    let stores = crate::limit::step::Stores {
        memory: Arc::new(crate::limit::memory::MemoryStore::new(1)),
        redis: None,
    };
    crate::routes::RouteTable::build(&config, &upstreams, &stores, &schemas, true)
        .map_err(setup)?;
    let rls_domains = match &config.rls {
        Some(r) => Some(
            crate::rls::Rls::build(r, &config.limiter, base)
                .map_err(setup)?
                .domains(),
        ),
        None => None,
    };
    let mut unresolved: Vec<(String, String)> = schemas
        .into_iter()
        .filter_map(|(name, s)| s.err().map(|why| (name, why)))
        .collect();
    unresolved.sort();
    Ok(Checked {
        routes: config.routes.len(),
        upstreams: config.upstreams.len(),
        rls_domains,
        unresolved,
    })
}

/// Loads and builds a config file: everything a reload or a start needs.
/// `previous` is the config in force (a reload keeps its Redis store when
/// the Redis settings did not change).
pub(crate) fn load(
    path: &Path,
    env: &dyn Env,
    memory: &Arc<crate::limit::memory::MemoryStore>,
    previous: Option<&Active>,
) -> Result<(Active, Option<Arc<rustls::ServerConfig>>), StartError> {
    let config = Config::load(path, env)?;
    let base = path.parent();
    let setup = |message: String| StartError::Setup {
        path: path.to_owned(),
        message,
    };
    let tls = match &config.listener.tls {
        Some(t) => Some(
            crate::tls::server_config(t, base).map_err(|m| setup(format!("listener.tls: {m}")))?,
        ),
        None => None,
    };
    let redis = match (&config.limiter.redis, config.limiter.backend) {
        (_, crate::config::Backend::Memory) | (None, _) => None,
        (Some(_), _) => {
            let settings = RedisStore::settings_of(&config.limiter, base);
            let same = previous
                .and_then(|p| p.stores.redis.as_ref())
                .filter(|old| Some(&old.settings) == settings.as_ref());
            match same {
                Some(old) => Some(old.clone()),
                None => Some(Arc::new(
                    RedisStore::new(&config.limiter, workers(&config), base).map_err(setup)?,
                )),
            }
        }
    };
    let stores = crate::limit::step::Stores {
        memory: memory.clone(),
        redis,
    };
    let max_keys = config.limiter.max_keys;
    let schemas =
        crate::schema::load(&config, base, previous.map(|p| &p.schemas)).map_err(setup)?;
    let access_log = match &config.access_log {
        Some(a) => Some(Arc::new(
            crate::access::AccessLog::build(a, base).map_err(setup)?,
        )),
        None => None,
    };
    let tracing = match &config.tracing {
        Some(t) => Some(crate::trace::Tracing::build(t).map_err(setup)?),
        None => None,
    };
    let mut active = Active::build(config, base, stores, schemas, previous).map_err(setup)?;
    active.access_log = access_log;
    active.tracing = tracing;
    // Only a config that will serve changes the live stores' bound.
    memory.set_max_keys(max_keys);
    if let Some(r) = &active.stores.redis {
        r.set_max_keys(max_keys);
    }
    Ok((active, tls))
}

fn workers(config: &Config) -> usize {
    config
        .listener
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

/// Starts tollgate from the config file at `path`.
pub fn start(path: &Path, env: &dyn Env) -> Result<Handle, StartError> {
    // The limit store outlives reloads; its size is read once, at start.
    let max_keys = Config::load(path, env)
        .map(|c| c.limiter.max_keys)
        .unwrap_or(1);
    let limit_store = Arc::new(crate::limit::memory::MemoryStore::new(max_keys));
    let (active, tls_config) = load(path, env, &limit_store, None)?;
    metrics::get().reload(true);
    metrics::get().config_last_success.set(unix_now());
    let listen: SocketAddr =
        active
            .config
            .listener
            .address
            .parse()
            .map_err(|_| StartError::Setup {
                path: path.to_owned(),
                message: "listener.address is not an address".into(),
            })?;
    let admin: SocketAddr = active
        .config
        .admin
        .address
        .parse()
        .map_err(|_| StartError::Setup {
            path: path.to_owned(),
            message: "admin.address is not an address".into(),
        })?;
    let n = workers(&active.config);
    let bind_err = |what, addr: SocketAddr| {
        move |cause| StartError::Bind {
            addr: addr.to_string(),
            what,
            cause,
        }
    };
    let first = server::bind_reuseport(listen).map_err(bind_err("listener.address", listen))?;
    let listen_addr = first
        .local_addr()
        .map_err(bind_err("listener.address", listen))?;
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(
            server::bind_reuseport(listen_addr)
                .map_err(bind_err("listener.address", listen_addr))?,
        );
    }
    let mut rls_listeners = Vec::new();
    let mut rls_addr = None;
    if let Some(r) = &active.config.rls {
        let addr: SocketAddr = r.address.parse().map_err(|_| StartError::Setup {
            path: path.to_owned(),
            message: "rls.address is not an address".into(),
        })?;
        let first = server::bind_reuseport(addr).map_err(bind_err("rls.address", addr))?;
        let bound = first.local_addr().map_err(bind_err("rls.address", addr))?;
        rls_listeners.push(first);
        for _ in 1..n {
            rls_listeners
                .push(server::bind_reuseport(bound).map_err(bind_err("rls.address", bound))?);
        }
        rls_addr = Some(bound);
    }
    let rls_tls = active.config.rls.as_ref().is_some_and(|r| r.tls.is_some());
    let admin_listener =
        std::net::TcpListener::bind(admin).map_err(bind_err("admin.address", admin))?;
    admin_listener
        .set_nonblocking(true)
        .map_err(bind_err("admin.address", admin))?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(bind_err("admin.address", admin))?;

    active.install();
    let shared = Arc::new(Shared {
        active: ArcSwap::from_pointee(active),
        config_path: path.to_owned(),
        draining: AtomicBool::new(false),
        connections: Default::default(),
        handshaking: Default::default(),
        listening: AtomicBool::new(false),
        reload_attempts: Default::default(),
        limit_store,
    });
    let tls: TlsState = Arc::new(ArcSwapOption::from(
        tls_config.map(|c| Arc::new(tokio_rustls::TlsAcceptor::from(c))),
    ));
    let (drain_tx, drain_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (reload_tx, reload_rx) = mpsc::unbounded_channel();

    let mut threads = Vec::new();
    let mut rls_listeners = rls_listeners.into_iter();
    for (i, l) in listeners.into_iter().enumerate() {
        let (shared, tls, drain) = (shared.clone(), tls.clone(), drain_rx.clone());
        let rls = rls_listeners.next();
        threads.push(
            std::thread::Builder::new()
                .name(format!("tollgate-worker-{i}"))
                .spawn(move || match current_thread() {
                    Ok(rt) => rt.block_on(async move {
                        if let Some(r) = rls {
                            tokio::spawn(crate::rls::serve(
                                i,
                                r,
                                shared.clone(),
                                rls_tls,
                                drain.clone(),
                            ));
                        }
                        server::run_worker(i, l, shared, tls, drain).await
                    }),
                    Err(e) => tracing::error!(error = %e, "cannot start a worker runtime"),
                })
                .map_err(|e| StartError::Setup {
                    path: path.to_owned(),
                    message: format!("cannot start a worker thread: {e}"),
                })?,
        );
    }
    // Watching starts before `start` returns, so that a change made the
    // moment tollgate is up (a ConfigMap updated as the pod starts) is seen.
    let watcher = watch_files(&shared, reload_tx.clone());
    let control = {
        let (shared, tls, drain, reload_tx) =
            (shared.clone(), tls.clone(), stop_rx, reload_tx.clone());
        Some(
            std::thread::Builder::new()
                .name("tollgate-control".into())
                .spawn(move || {
                    let rt = match current_thread() {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start the control runtime");
                            return;
                        }
                    };
                    rt.block_on(control(
                        admin_listener,
                        shared,
                        tls,
                        drain,
                        watcher,
                        reload_tx,
                        reload_rx,
                    ));
                })
                .map_err(|e| StartError::Setup {
                    path: path.to_owned(),
                    message: format!("cannot start the control thread: {e}"),
                })?,
        )
    };
    shared.listening.store(true, Ordering::SeqCst);
    tracing::info!(%listen_addr, %admin_addr, rls = ?rls_addr, workers = n, config = %path.display(), "tollgate listening");
    Ok(Handle {
        listen_addr,
        admin_addr,
        rls_addr,
        shared,
        drain: drain_tx,
        stop: stop_tx,
        reload: reload_tx,
        workers: threads,
        control,
    })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// How often an upstream's schema is asked for again while reflection has
/// not answered.
const SCHEMA_RETRY: Duration = Duration::from_secs(2);

/// The control thread: admin server, reloads (asked for by `watcher`'s
/// events, SIGHUP or the tests), until `stop`.
async fn control(
    admin: std::net::TcpListener,
    shared: Arc<Shared>,
    tls: TlsState,
    drain: watch::Receiver<bool>,
    mut watcher: Option<notify::RecommendedWatcher>,
    reload_tx: mpsc::UnboundedSender<()>,
    mut reload_rx: mpsc::UnboundedReceiver<()>,
) {
    match tokio::net::TcpListener::from_std(admin) {
        Ok(l) => {
            tokio::spawn(crate::admin::serve(l, shared.clone(), drain.clone()));
        }
        Err(e) => tracing::error!(error = %e, "cannot serve the admin endpoints"),
    }
    let mut drain = drain;
    loop {
        // An upstream whose schema reflection has not given yet (it may
        // start after tollgate) is asked again every few seconds.
        let pending = shared.active.load().schema_pending();
        tokio::select! {
            _ = drain.wait_for(|d| *d) => return,
            _ = tokio::time::sleep(SCHEMA_RETRY), if pending => {
                // The same file: the watcher stays as it is.
                reload_off_thread(&shared, &tls).await;
            }
            r = reload_rx.recv() => {
                if r.is_none() { return; }
                // Editors and ConfigMap updates write in several steps:
                // wait for them to settle, then reload once.
                tokio::time::sleep(Duration::from_millis(150)).await;
                while reload_rx.try_recv().is_ok() {}
                if reload_off_thread(&shared, &tls).await {
                    // The new config may name other files: watch those. The
                    // old watcher goes only once the new one watches, so a
                    // write in between is not missed.
                    let fresh = watch_files(&shared, reload_tx.clone());
                    drop(std::mem::replace(&mut watcher, fresh));
                }
            }
        }
    }
}

/// [`reload`] on a blocking thread: reading files and asking upstreams for
/// their schemas never holds up the admin server on this thread.
async fn reload_off_thread(shared: &Arc<Shared>, tls: &TlsState) -> bool {
    let (shared, tls) = (shared.clone(), tls.clone());
    tokio::task::spawn_blocking(move || reload(&shared, &tls))
        .await
        .unwrap_or(false)
}

/// Loads the config file again; a valid one replaces the running config for
/// new calls, an invalid one is logged and counted and the old one stays.
pub(crate) fn reload(shared: &Shared, tls: &TlsState) -> bool {
    shared.reload_attempts.fetch_add(1, Ordering::SeqCst);
    let path = &shared.config_path;
    match load(
        path,
        &ProcessEnv,
        &shared.limit_store,
        Some(&shared.active.load()),
    ) {
        Ok((active, tls_config)) => {
            let old = shared.active.load();
            let stays = restart_only(&old.config, &active.config);
            if !stays.is_empty() {
                tracing::warn!(
                    settings = %stays.join(", "),
                    "changed settings that apply at the next restart; every other change applies now (listener settings to new connections)"
                );
            }
            if let Some(c) = tls_config {
                tls.store(Some(Arc::new(tokio_rustls::TlsAcceptor::from(c))));
            }
            active.install();
            shared.active.store(Arc::new(active));
            metrics::get().reload(true);
            metrics::get().config_last_success.set(unix_now());
            tracing::info!(config = %path.display(), "config reloaded");
            true
        }
        Err(e) => {
            metrics::get().reload(false);
            tracing::error!(config = %path.display(), "config reload rejected, the previous config keeps serving: {e}");
            false
        }
    }
}

/// The settings that differ between `old` and `new` and take a restart:
/// the sockets, threads and listener mode set up at start.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.listener, &new.listener);
    [
        ("listener.address", o.address != n.address),
        ("listener.workers", o.workers != n.workers),
        (
            "listener.tls (on or off)",
            o.tls.is_some() != n.tls.is_some(),
        ),
        ("admin.address", old.admin.address != new.admin.address),
        (
            "rls (on or off), rls.address",
            old.rls.as_ref().map(|r| &r.address) != new.rls.as_ref().map(|r| &r.address),
        ),
        (
            "rls.tls (on or off)",
            old.rls.as_ref().is_some_and(|r| r.tls.is_some())
                != new.rls.as_ref().is_some_and(|r| r.tls.is_some()),
        ),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

/// Watches the config file and the files it names (TLS certificates, keys
/// and CA bundles) through their folders, since editors and Kubernetes
/// replace files rather than write them in place.
/// Only events on those files — or on `..data`, the symlink Kubernetes swaps
/// when a ConfigMap or Secret changes — ask for a reload; other files in the
/// same folders are ignored.
fn watch_files(
    shared: &Shared,
    reload: mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let config = &shared.active.load().config;
    let base = shared.config_path.parent();
    let mut files = vec![shared.config_path.clone()];
    if let Some(t) = &config.listener.tls {
        files.push(crate::config::resolve(&t.cert, base));
        files.push(crate::config::resolve(&t.key, base));
        if let Some(ca) = &t.client_ca {
            files.push(crate::config::resolve(ca, base));
        }
    }
    for u in config.upstreams.values() {
        if let Some(t) = &u.tls {
            files.push(crate::config::resolve(&t.ca, base));
        }
    }
    if let Some(ca) = config.limiter.redis.as_ref().and_then(|r| r.ca.as_ref()) {
        files.push(crate::config::resolve(ca, base));
    }
    // The rate limit service's files; in a folder of them, any change
    // counts (a file added or removed too).
    let mut folders = Vec::new();
    if let Some(r) = &config.rls {
        if let Some(t) = &r.tls {
            files.push(crate::config::resolve(&t.cert, base));
            files.push(crate::config::resolve(&t.key, base));
            if let Some(ca) = &t.client_ca {
                files.push(crate::config::resolve(ca, base));
            }
        }
        for c in &r.configs {
            let full = crate::config::resolve(c, base);
            if full.is_dir() {
                folders.push(full);
            } else {
                files.push(full);
            }
        }
    }
    if let Some(rls) = &shared.active.load().rls {
        files.extend(rls.files().iter().cloned());
    }
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_owned()))
        .chain(std::iter::once(std::ffi::OsString::from("..data")))
        .collect();
    let watched = folders.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        if ev.kind.is_access() {
            return;
        }
        let relevant = ev.paths.iter().any(|p| {
            p.file_name().is_some_and(|n| names.iter().any(|w| w == n))
                || p.parent().is_some_and(|d| watched.iter().any(|f| f == d))
        });
        if relevant {
            let _ = reload.send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch files; reload with SIGHUP"))
    .ok()?;
    let mut dirs: Vec<PathBuf> = files.iter().map(|f| folder(f)).chain(folders).collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        if let Err(e) = watcher.watch(&d, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %d.display(), error = %e, "cannot watch; reload with SIGHUP");
        }
    }
    Some(watcher)
}

fn folder(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

// === impl Handle ===

impl Handle {
    /// Asks for a reload (what SIGHUP does).
    pub fn reload(&self) {
        let _ = self.reload.send(());
    }

    /// Reloads attempted since start (file changes, SIGHUP, [`Handle::reload`]).
    pub fn reload_attempts(&self) -> u64 {
        self.shared.reload_attempts.load(Ordering::SeqCst)
    }

    /// Whether `/ready` answers 200.
    pub fn is_ready(&self) -> bool {
        server::is_ready(&self.shared)
    }

    /// Fails `/ready` and keeps serving: the first step of a drain, held
    /// for [`Handle::drain_delay`] so that load balancers stop sending new
    /// connections before the listeners close.
    pub fn mark_not_ready(&self) {
        state::start_draining(&self.shared);
    }

    /// `listener.drain_delay` of the config in force.
    pub fn drain_delay(&self) -> Duration {
        self.shared.active.load().config.listener.drain_delay.0
    }

    /// Starts draining: `/ready` fails, listeners close, GOAWAY goes out.
    pub fn begin_drain(&self) {
        state::start_draining(&self.shared);
        let _ = self.drain.send(true);
    }

    /// Drains and waits until every worker is done (blocking).
    pub fn drain(mut self) {
        self.begin_drain();
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
        let _ = self.stop.send(true);
        if let Some(c) = self.control.take() {
            let _ = c.join();
        }
        // The spans of the last calls go out before the process ends.
        crate::trace::flush();
    }
}
