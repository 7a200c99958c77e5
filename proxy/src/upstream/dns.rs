//! An upstream's endpoints: each of its `addresses`, and for a host name,
//! each address the name resolves to.
//!
//! Names are looked up again every `dns_refresh` on a thread of the
//! upstream's own (the system resolver: `/etc/hosts`, `resolv.conf`, search
//! domains), so that the pods behind a headless Service, or a name moved to
//! other machines, are followed without a reload. A lookup that fails or
//! finds nothing keeps the name's last answer (a resolver outage leaves
//! calls going where they went); until a name has had an answer, it is one
//! endpoint that each new connection looks up on its own. Workers see a
//! new set at their next call and build their connection pools on it,
//! keeping the connections to addresses that stayed; connections to
//! addresses that left take no new calls and close once their calls end.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntCounter;

use crate::metrics;

/// The most endpoints one upstream's names may give; beyond it the rest of
/// an answer is left out (and logged).
const MAX_ENDPOINTS: usize = 512;

/// One endpoint of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// How logs and the access log name it: the address it resolved to,
    /// or the configured `host:port` while the name has had no answer.
    pub(crate) name: Arc<str>,
    /// The configured host (the TLS server name, unless set).
    pub(crate) host: Arc<str>,
    pub(crate) port: u16,
    /// Where to connect; `None` while the name has had no answer (each
    /// connect looks it up).
    pub(crate) addr: Option<SocketAddr>,
}

/// An upstream's endpoints at one time.
#[derive(Debug)]
pub(crate) struct Endpoints {
    pub(crate) list: Vec<Endpoint>,
    /// Which set this is: another set of any upstream has another number.
    pub(crate) generation: u64,
}

/// Numbers of the sets made so far.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// How a name is looked up (the system resolver, but in unit tests).
type Lookup = dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync;

/// The names of one upstream, looked up again and again.
pub(crate) struct Dns {
    upstream: Arc<str>,
    addresses: Vec<(Arc<str>, u16)>,
    refresh: Duration,
    current: ArcSwap<Endpoints>,
    /// The generation of `current`: what a call looks at.
    generation: AtomicU64,
    /// Per address, its last answer (`None`: none yet, or an IP address).
    answers: Mutex<Vec<Option<Vec<SocketAddr>>>>,
    /// Per address, whether its last lookup failed (logged once a run).
    failing: Vec<AtomicBool>,
    started: AtomicBool,
    lookup: Box<Lookup>,
    lookups: [IntCounter; 2],
}

// === impl Endpoints ===

impl Endpoints {
    /// `addresses` as they are: IP addresses at once, names unresolved.
    pub(crate) fn fixed(addresses: &[(String, u16)]) -> Self {
        let addresses: Vec<_> = addresses
            .iter()
            .map(|(h, p)| (Arc::<str>::from(h.as_str()), *p))
            .collect();
        Self::of(&addresses, &vec![None; addresses.len()])
    }

    /// Whether some address is a name (not an IP address).
    pub(crate) fn has_names(addresses: &[(String, u16)]) -> bool {
        addresses.iter().any(|(h, _)| h.parse::<IpAddr>().is_err())
    }

    fn of(addresses: &[(Arc<str>, u16)], answers: &[Option<Vec<SocketAddr>>]) -> Self {
        let mut list = Vec::new();
        for ((host, port), answer) in addresses.iter().zip(answers) {
            let named = |addr: Option<SocketAddr>| Endpoint {
                name: match addr {
                    Some(a) => a.to_string().into(),
                    None => format!("{host}:{port}").into(),
                },
                host: host.clone(),
                port: *port,
                addr,
            };
            match (host.parse::<IpAddr>(), answer) {
                (Ok(ip), _) => list.push(named(Some(SocketAddr::new(ip, *port)))),
                (Err(_), Some(addrs)) => list.extend(addrs.iter().map(|a| named(Some(*a)))),
                (Err(_), None) => list.push(named(None)),
            }
        }
        // An address given twice (or a name and an IP it resolves to) is
        // one endpoint.
        let mut seen = std::collections::HashSet::new();
        list.retain(|e| seen.insert(e.name.clone()));
        list.truncate(MAX_ENDPOINTS);
        Endpoints {
            list,
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
        }
    }
}

// === impl Dns ===

impl Dns {
    /// The names of `addresses` (which has some), looked up every
    /// `refresh` once [`start`](Self::start)ed.
    pub(crate) fn new(
        upstream: &Arc<str>,
        addresses: &[(String, u16)],
        refresh: Duration,
    ) -> Arc<Self> {
        Self::with_lookup(upstream, addresses, refresh, Box::new(system_lookup))
    }

    fn with_lookup(
        upstream: &Arc<str>,
        addresses: &[(String, u16)],
        refresh: Duration,
        lookup: Box<Lookup>,
    ) -> Arc<Self> {
        let fixed = Endpoints::fixed(addresses);
        let m = metrics::get();
        Arc::new(Dns {
            upstream: upstream.clone(),
            addresses: addresses
                .iter()
                .map(|(h, p)| (Arc::<str>::from(h.as_str()), *p))
                .collect(),
            refresh,
            generation: AtomicU64::new(fixed.generation),
            current: ArcSwap::from_pointee(fixed),
            answers: Mutex::new(vec![None; addresses.len()]),
            failing: addresses.iter().map(|_| AtomicBool::new(false)).collect(),
            started: AtomicBool::new(false),
            lookup,
            lookups: ["ok", "failed"].map(|r| m.upstream_dns_lookups(upstream, r)),
        })
    }

    /// The endpoints now.
    pub(crate) fn endpoints(&self) -> Arc<Endpoints> {
        self.current.load_full()
    }

    /// The generation of [`endpoints`](Self::endpoints): one atomic load.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// How often the names are looked up.
    pub(crate) fn refresh(&self) -> Duration {
        self.refresh
    }

    /// The upstream's name.
    pub(crate) fn upstream(&self) -> &Arc<str> {
        &self.upstream
    }

    /// Starts looking the names up (at once, then every `refresh`) on a
    /// thread that ends once this is dropped; a second call does nothing.
    pub(crate) fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::Relaxed) {
            return;
        }
        metrics::get().watch_dns(self);
        let weak: Weak<Dns> = Arc::downgrade(self);
        let refresh = self.refresh;
        let spawned = std::thread::Builder::new()
            .name("tollgate-dns".into())
            .spawn(move || loop {
                match weak.upgrade() {
                    Some(dns) => dns.resolve(),
                    None => return,
                }
                std::thread::sleep(refresh);
            });
        if let Err(e) = spawned {
            tracing::error!(upstream = %self.upstream, error = %e, "cannot start the thread that looks up the upstream's names: they are looked up at each connect");
        }
    }

    /// Looks every name up once and publishes the set if it changed.
    fn resolve(&self) {
        let mut fresh = Vec::with_capacity(self.addresses.len());
        for (i, (host, port)) in self.addresses.iter().enumerate() {
            if host.parse::<IpAddr>().is_ok() {
                fresh.push(None);
                continue;
            }
            let answer = (self.lookup)(host, *port).and_then(|mut addrs| {
                addrs.sort();
                addrs.dedup();
                if addrs.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::NotFound, "no addresses"));
                }
                Ok(addrs)
            });
            let was_failing = self.failing[i].load(Ordering::Relaxed);
            match answer {
                Ok(addrs) => {
                    self.lookups[0].inc();
                    if was_failing {
                        self.failing[i].store(false, Ordering::Relaxed);
                        tracing::info!(upstream = %self.upstream, host = %host, addresses = addrs.len(), "upstream name resolves again");
                    }
                    fresh.push(Some(addrs));
                }
                Err(e) => {
                    self.lookups[1].inc();
                    if !was_failing {
                        self.failing[i].store(true, Ordering::Relaxed);
                        tracing::warn!(upstream = %self.upstream, host = %host, error = %e, "cannot look up an upstream name: calls keep going to its last addresses; looked up again every dns_refresh");
                    }
                    // The last answer stays.
                    let kept = self.answers.lock().ok().and_then(|a| a[i].clone());
                    fresh.push(kept);
                }
            }
        }
        let Ok(mut answers) = self.answers.lock() else {
            return;
        };
        if *answers == fresh {
            return;
        }
        *answers = fresh;
        let set = Endpoints::of(&self.addresses, &answers);
        if set.list.len() == MAX_ENDPOINTS {
            tracing::warn!(upstream = %self.upstream, most = MAX_ENDPOINTS, "an upstream's names resolve to more addresses than it takes: the rest are left out");
        }
        tracing::info!(upstream = %self.upstream, endpoints = set.list.len(), "upstream endpoints changed");
        let generation = set.generation;
        self.current.store(Arc::new(set));
        self.generation.store(generation, Ordering::Release);
    }
}

/// The system resolver's addresses for `host:port`.
fn system_lookup(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    (host, port).to_socket_addrs().map(Iterator::collect)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn names(e: &Endpoints) -> Vec<String> {
        e.list.iter().map(|e| e.name.to_string()).collect()
    }

    #[test]
    fn each_address_a_name_resolves_to_is_an_endpoint_and_failures_keep_the_last() {
        let answers = Arc::new(Mutex::new(Ok(addrs(&["10.0.0.2:7", "10.0.0.1:7"]))));
        let script = answers.clone();
        let dns = Dns::with_lookup(
            &Arc::from("u"),
            &[("svc.test".into(), 7), ("10.0.0.9".into(), 7)],
            Duration::from_secs(1),
            Box::new(move |host, _| {
                assert_eq!(host, "svc.test");
                match &*script.lock().unwrap() {
                    Ok(a) => Ok(a.clone()),
                    Err(()) => Err(io::Error::other("SERVFAIL")),
                }
            }),
        );
        // Before any answer: the name as configured, connected by name.
        let before = dns.endpoints();
        assert_eq!(names(&before), ["svc.test:7", "10.0.0.9:7"]);
        assert_eq!(before.list[0].addr, None);

        dns.resolve();
        let first = dns.endpoints();
        assert_eq!(names(&first), ["10.0.0.1:7", "10.0.0.2:7", "10.0.0.9:7"]);
        assert_eq!(&*first.list[0].host, "svc.test");
        assert_ne!(first.generation, before.generation);
        assert_eq!(dns.generation(), first.generation);

        // The same answer in another order: nothing changes.
        *answers.lock().unwrap() = Ok(addrs(&["10.0.0.1:7", "10.0.0.2:7", "10.0.0.1:7"]));
        dns.resolve();
        assert_eq!(dns.generation(), first.generation);

        // A failed lookup, or an empty answer, keeps the last one.
        *answers.lock().unwrap() = Err(());
        dns.resolve();
        *answers.lock().unwrap() = Ok(vec![]);
        dns.resolve();
        assert_eq!(dns.generation(), first.generation);
        assert_eq!(names(&dns.endpoints()), names(&first));

        // A new answer is a new set; an IP given as a name's answer too is
        // one endpoint.
        *answers.lock().unwrap() = Ok(addrs(&["10.0.0.3:7", "10.0.0.9:7"]));
        dns.resolve();
        assert_eq!(names(&dns.endpoints()), ["10.0.0.3:7", "10.0.0.9:7"]);
        assert_ne!(dns.generation(), first.generation);
    }

    #[test]
    fn ip_addresses_are_endpoints_at_once() {
        let e = Endpoints::fixed(&[
            ("::1".into(), 80),
            ("10.1.1.1".into(), 81),
            ("h".into(), 82),
        ]);
        assert_eq!(names(&e), ["[::1]:80", "10.1.1.1:81", "h:82"]);
        assert_eq!(e.list[0].addr, Some("[::1]:80".parse().unwrap()));
        assert!(Endpoints::has_names(&[("h".into(), 1)]));
        assert!(!Endpoints::has_names(&[
            ("::1".into(), 1),
            ("10.0.0.1".into(), 1)
        ]));
    }
}
