//! Circuit breaking: how much of one upstream this process may use at
//! once, across every worker and endpoint.
//!
//! Four resources are counted: calls in flight (`max_requests`), calls
//! waiting for a connection or a stream slot (`max_pending`), connections
//! (`max_connections`) and safe retries under way (the retry budget). A
//! call that would go over a threshold fails at once, naming it, instead
//! of queueing without bound behind a slow upstream. The counts live as
//! long as the upstream's name is in the config: a reload that changes the
//! thresholds applies them to the calls already counted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntCounter;

use crate::config;
use crate::metrics;

/// What a breaker counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resource {
    /// Calls in flight.
    Requests = 0,
    /// Calls waiting for a connection or a stream slot.
    Pending = 1,
    /// Open connections.
    Connections = 2,
    /// Safe retries under way.
    Retries = 3,
}

impl Resource {
    /// Every resource, in label order.
    pub(crate) const ALL: [Resource; 4] = [
        Resource::Requests,
        Resource::Pending,
        Resource::Connections,
        Resource::Retries,
    ];

    /// Its threshold's name in the config (and the `breaker` label).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Resource::Requests => "max_requests",
            Resource::Pending => "max_pending",
            Resource::Connections => "max_connections",
            Resource::Retries => "retry_budget",
        }
    }

    /// What going over it means, for a client.
    pub(crate) fn text(self) -> &'static str {
        match self {
            Resource::Requests => {
                "circuit_breaker.max_requests reached (too many calls in flight); the call was not sent"
            }
            Resource::Pending => {
                "circuit_breaker.max_pending reached (too many calls waiting for a connection); the call was not sent"
            }
            Resource::Connections => {
                "circuit_breaker.max_connections reached and no connection has room; the call was not sent"
            }
            Resource::Retries => "retry_budget spent",
        }
    }
}

/// One upstream's counts and thresholds, shared by every worker.
pub(crate) struct Breakers {
    upstream: Arc<str>,
    in_use: [AtomicUsize; 4],
    max: [AtomicUsize; 4],
    /// The retry budget's share of active calls, in percent.
    retry_percent: AtomicUsize,
    overflow: [IntCounter; 4],
    retried: [IntCounter; 3],
}

/// Why a call was sent once more: the upstream provably never processed
/// it (see `replay`).
pub(crate) const RETRY_REASONS: [&str; 3] = ["refused_stream", "goaway", "connection_closed"];

/// One unit of a resource, given back when dropped.
pub(crate) struct Held {
    breakers: Arc<Breakers>,
    resource: Resource,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.breakers.in_use[self.resource as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held({})", self.resource.name())
    }
}

// === impl Breakers ===

impl Breakers {
    /// Counts for `upstream`, at the thresholds of `u`; seen by the
    /// metrics while it lives.
    pub(crate) fn new(upstream: &Arc<str>, u: &config::Upstream) -> Arc<Self> {
        let m = metrics::get();
        let b = Arc::new(Breakers {
            upstream: upstream.clone(),
            in_use: Default::default(),
            max: Default::default(),
            retry_percent: AtomicUsize::new(0),
            overflow: Resource::ALL.map(|r| m.upstream_overflow(upstream, r.name())),
            retried: RETRY_REASONS.map(|why| m.upstream_retries(upstream, why)),
        });
        b.configure(u);
        m.watch_breakers(&b);
        b
    }

    /// Applies the thresholds of a (re)loaded config.
    pub(crate) fn configure(&self, u: &config::Upstream) {
        let c = &u.circuit_breaker;
        for (r, max) in [
            (Resource::Requests, c.max_requests),
            (Resource::Pending, c.max_pending),
            (Resource::Connections, c.max_connections),
            (Resource::Retries, u.retry_budget.min_concurrent),
        ] {
            self.max[r as usize].store(max, Ordering::Relaxed);
        }
        self.retry_percent
            .store(u.retry_budget.percent as usize, Ordering::Relaxed);
    }

    /// The upstream's name.
    pub(crate) fn upstream(&self) -> &Arc<str> {
        &self.upstream
    }

    /// How many of `r` are in use now.
    pub(crate) fn in_use(&self, r: Resource) -> usize {
        self.in_use[r as usize].load(Ordering::Relaxed)
    }

    /// The threshold of `r` now: for retries, the budget given the calls
    /// active now.
    pub(crate) fn max(&self, r: Resource) -> usize {
        let floor = self.max[r as usize].load(Ordering::Relaxed);
        if r != Resource::Retries {
            return floor;
        }
        let active = self.in_use(Resource::Requests) + self.in_use(Resource::Pending);
        let share = active * self.retry_percent.load(Ordering::Relaxed) / 100;
        floor.max(share)
    }

    /// Counts a retry for `reason` (one of [`RETRY_REASONS`]).
    pub(crate) fn retried(&self, reason: &str) {
        if let Some(i) = RETRY_REASONS.iter().position(|r| *r == reason) {
            self.retried[i].inc();
        }
    }

    /// Whether safe retries are on (a budget above nothing).
    pub(crate) fn retries_on(&self) -> bool {
        self.max[Resource::Retries as usize].load(Ordering::Relaxed) > 0
            || self.retry_percent.load(Ordering::Relaxed) > 0
    }

    /// Whether one more of `r` would be admitted now.
    pub(crate) fn has_room(&self, r: Resource) -> bool {
        self.in_use(r) < self.max(r)
    }

    /// One unit of `r`, or `Err(r)` (counted) when it is at its threshold.
    pub(crate) fn take(self: &Arc<Self>, r: Resource) -> Result<Held, Resource> {
        let max = self.max(r);
        let admitted = self.in_use[r as usize]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.overflow[r as usize].inc();
            return Err(r);
        }
        Ok(Held {
            breakers: self.clone(),
            resource: r,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(yaml: &str) -> config::Upstream {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn each_threshold_admits_exactly_its_count_and_frees_on_drop() {
        let u = upstream(
            "addresses: ['127.0.0.1:1']\ncircuit_breaker: {max_requests: 2, max_pending: 1, max_connections: 3}",
        );
        let b = Breakers::new(&Arc::from("unit-breaker-counts"), &u);
        let r1 = b.take(Resource::Requests).unwrap();
        let _r2 = b.take(Resource::Requests).unwrap();
        assert_eq!(b.take(Resource::Requests).unwrap_err(), Resource::Requests);
        assert!(!b.has_room(Resource::Requests));
        drop(r1);
        assert!(b.has_room(Resource::Requests));
        let _r3 = b.take(Resource::Requests).unwrap();
        let _p = b.take(Resource::Pending).unwrap();
        assert!(b.take(Resource::Pending).is_err());
        assert_eq!(b.in_use(Resource::Connections), 0);
        assert_eq!(b.overflow[Resource::Requests as usize].get(), 1);
        assert_eq!(b.overflow[Resource::Pending as usize].get(), 1);
    }

    #[test]
    fn the_retry_budget_is_a_share_of_active_calls_with_a_floor() {
        let u =
            upstream("addresses: ['127.0.0.1:1']\nretry_budget: {percent: 25, min_concurrent: 1}");
        let b = Breakers::new(&Arc::from("unit-breaker-retries"), &u);
        assert_eq!(b.max(Resource::Retries), 1);
        let calls: Vec<_> = (0..12)
            .map(|_| b.take(Resource::Requests).unwrap())
            .collect();
        assert_eq!(b.max(Resource::Retries), 3);
        drop(calls);
        let off =
            upstream("addresses: ['127.0.0.1:1']\nretry_budget: {percent: 0, min_concurrent: 0}");
        b.configure(&off);
        assert!(b.take(Resource::Retries).is_err());
    }

    #[test]
    fn a_reload_applies_new_thresholds_to_what_is_already_counted() {
        let u = upstream("addresses: ['127.0.0.1:1']\ncircuit_breaker: {max_requests: 3}");
        let b = Breakers::new(&Arc::from("unit-breaker-reload"), &u);
        let held: Vec<_> = (0..3)
            .map(|_| b.take(Resource::Requests).unwrap())
            .collect();
        b.configure(&upstream(
            "addresses: ['127.0.0.1:1']\ncircuit_breaker: {max_requests: 2}",
        ));
        assert!(b.take(Resource::Requests).is_err());
        drop(held);
        assert!(b.take(Resource::Requests).is_ok());
    }
}
