//! What a running tollgate holds: the config in force with its routes and
//! stores ([`Active`], swapped whole on reload), what every worker shares
//! ([`Shared`]), one worker's own upstream connections ([`Worker`]) and
//! what a call knows of its connection ([`Conn`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::HeaderValue;

use crate::config::Config;
use crate::routes::{self, RouteTable};
use crate::upstream::{Pool, UpstreamSpec};

/// A loaded config, ready to serve; swapped whole on reload.
pub(crate) struct Active {
    /// The config as loaded (for `/config`).
    pub(crate) config: Config,
    /// Routes.
    pub(crate) routes: RouteTable,
    /// Largest message, either direction.
    pub(crate) max_message_bytes: u32,
    /// Where limits are decided; a reload with the same Redis settings
    /// keeps the Redis store (and its connections).
    pub(crate) stores: crate::limit::step::Stores,
    /// The upstreams' request schemas (a reload keeps one reflection does
    /// not answer for).
    pub(crate) schemas: crate::schema::Schemas,
    /// The listener's request header policy.
    pub(crate) request_headers: Option<crate::headers::HeaderPolicy>,
    /// Who may name the client in `x-forwarded-for`.
    pub(crate) client_ip: Option<crate::headers::ClientIp>,
    /// Envoy's rate limit service, when `rls` is set.
    pub(crate) rls: Option<crate::rls::Rls>,
    /// The upstreams, by name (a reload keeps their circuit breakers).
    pub(crate) upstreams: routes::Upstreams,
    /// The access log, when `access_log` is set (opened by a start or a
    /// reload, not by the tools).
    pub(crate) access_log: Option<Arc<crate::access::AccessLog>>,
    /// OpenTelemetry tracing, when `tracing` is set (started by a start or
    /// a reload, not by the tools).
    pub(crate) tracing: Option<crate::trace::Tracing>,
}

// === impl Active ===

impl Active {
    /// Puts the settings of its upstreams in force in the state they share
    /// with the config before (circuit breakers, outlier detection):
    /// called once it serves.
    pub(crate) fn install(&self) {
        for u in self.upstreams.values() {
            u.install();
        }
        crate::trace::Tracing::install(self.tracing.as_ref());
    }

    /// Whether an upstream's schema is still to be fetched by reflection.
    pub(crate) fn schema_pending(&self) -> bool {
        self.schemas.values().any(Result::is_err)
    }

    /// Builds the serving state of a validated config; `previous` is the
    /// one in force before a reload.
    pub(crate) fn build(
        config: Config,
        base: Option<&std::path::Path>,
        stores: crate::limit::step::Stores,
        schemas: crate::schema::Schemas,
        previous: Option<&Active>,
    ) -> Result<Active, String> {
        let upstreams = routes::upstream_specs(&config, base, previous.map(|p| &p.upstreams))?;
        let routes = RouteTable::build(&config, &upstreams, &stores, &schemas, false)?;
        let rls = match &config.rls {
            Some(r) => Some(crate::rls::Rls::build(r, &config.limiter, base)?),
            None => None,
        };
        Ok(Active {
            rls,
            request_headers: crate::headers::HeaderPolicy::build(
                config.listener.request_headers.as_ref(),
            )
            .map_err(|e| format!("listener.request_headers: {e}"))?,
            client_ip: crate::headers::ClientIp::build(
                config.listener.trust_forwarded_for.as_ref(),
            ),
            stores,
            schemas,
            max_message_bytes: u32::try_from(config.listener.max_message_bytes).unwrap_or(u32::MAX),
            routes,
            upstreams,
            access_log: None,
            tracing: None,
            config,
        })
    }
}

/// State shared by every worker.
pub(crate) struct Shared {
    /// The config in force; calls load it once at their start, so a reload
    /// never changes a call in flight.
    pub(crate) active: ArcSwap<Active>,
    /// Where the config came from (reloads read it again).
    pub(crate) config_path: PathBuf,
    /// Set on SIGTERM: `/ready` fails (listeners stop accepting when the
    /// workers are told to drain, `drain_delay` later).
    pub(crate) draining: AtomicBool,
    /// Client connections open now (`listener.max_connections`).
    pub(crate) connections: std::sync::atomic::AtomicUsize,
    /// Client connections in their TLS handshake or preface now
    /// (`listener.max_handshaking`).
    pub(crate) handshaking: std::sync::atomic::AtomicUsize,
    /// Set once every listener is bound.
    pub(crate) listening: AtomicBool,
    /// Reloads attempted (valid or not) since start.
    pub(crate) reload_attempts: std::sync::atomic::AtomicU64,
    /// In-process limit state; kept across reloads, so limits that did not
    /// change keep counting where they were.
    pub(crate) limit_store: Arc<crate::limit::memory::MemoryStore>,
}

/// One worker thread's state: its own upstream connections.
pub(crate) struct Worker {
    /// This worker's number (0..workers): picks its own Redis connection.
    pub(crate) index: usize,
    /// What all workers share.
    pub(crate) shared: Arc<Shared>,
    pools: Mutex<HashMap<Arc<str>, Arc<Pool>>>,
}

// === impl Worker ===

impl Worker {
    /// A worker with no connections yet.
    pub(crate) fn new(index: usize, shared: Arc<Shared>) -> Self {
        Worker {
            index,
            shared,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// This worker's pool for `spec`, rebuilt when a reload changed it or
    /// its names resolved to other addresses.
    pub(crate) fn pool(&self, spec: &Arc<UpstreamSpec>) -> Arc<Pool> {
        let Ok(mut pools) = self.pools.lock() else {
            return Arc::new(Pool::new(spec.clone(), None));
        };
        let mut before = None;
        if let Some(p) = pools.get(&spec.name) {
            if Arc::ptr_eq(p.spec(), spec)
                || (p.spec().config == spec.config && p.spec().files == spec.files)
            {
                if p.generation() == spec.generation() {
                    return p.clone();
                }
                // Its names resolved anew: a pool on the new set, with the
                // connections to the addresses that stayed.
                before = Some(p.clone());
            }
        }
        let p = Arc::new(Pool::new(spec.clone(), before.as_deref()));
        pools.insert(spec.name.clone(), p.clone());
        p
    }
}

/// What a call knows of its connection; made once per connection.
pub(crate) struct Conn {
    /// The client's address.
    pub(crate) peer: SocketAddr,
    /// The client's IP as an `x-forwarded-for` value.
    pub(crate) forwarded_for: Option<HeaderValue>,
    /// The identity of the client's verified TLS certificate, if any.
    pub(crate) tls_identity: Option<String>,
    /// What its calls are doing (its lifecycle task reads it).
    pub(crate) activity: Arc<crate::call::Activity>,
}

impl Conn {
    /// Facts of a new connection from `peer`, with the identity of its
    /// client certificate (mTLS).
    pub(crate) fn new(peer: SocketAddr, tls_identity: Option<String>) -> Self {
        Conn {
            peer,
            forwarded_for: HeaderValue::from_str(&peer.ip().to_string()).ok(),
            tls_identity,
            activity: Arc::new(crate::call::Activity::default()),
        }
    }
}

/// Marks the process as draining.
pub(crate) fn start_draining(shared: &Shared) {
    shared.draining.store(true, Ordering::SeqCst);
}

/// How long to wait for in-flight calls when draining.
pub(crate) fn drain_timeout(shared: &Shared) -> Duration {
    shared.active.load().config.listener.drain_timeout.0
}
