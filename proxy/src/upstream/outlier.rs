//! Outlier detection: endpoints of an upstream whose calls keep failing
//! are ejected, left out of balancing, for a while.
//!
//! A failure is what a gateway sees of an endpoint that is down or broken:
//! a connect that fails, a stream it resets, a connection lost under a
//! call, a call answered UNAVAILABLE. Any other answer, errors of the
//! application included, is a success. An endpoint is ejected after
//! `consecutive_failures` in a row, or when `failure_percent` of its calls
//! in an `interval` (with at least `min_calls`) failed. The n-th ejection
//! in a row lasts n × `base_ejection_time` (at most `max_ejection_time`);
//! each `base_ejection_time` in service takes one off that count. At most
//! `max_ejection_percent` of the endpoints are out at once: at least one
//! may be, never all. Ejected endpoints come back on their own when their
//! time is up (the next call that looks finds it so). The counts are the
//! process's, shared by every worker, kept by endpoint address (an address
//! that stays when its name resolves anew keeps its count), and kept across
//! reloads that leave the upstream's addresses as they were.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::IntCounter;

use super::dns::Endpoints;
use crate::config;
use crate::metrics;

/// Why an endpoint was ejected (the `reason` label).
const REASONS: [&str; 2] = ["consecutive_failures", "failure_percent"];

/// One upstream's endpoints, as outlier detection sees them.
pub(crate) struct Outliers {
    upstream: Arc<str>,
    settings: Mutex<config::OutlierDetection>,
    /// Whether failure shares are counted (`failure_percent` > 0).
    by_share: std::sync::atomic::AtomicBool,
    /// The endpoints now (the newest set a pool was built on), by name:
    /// what the share of those out is counted over.
    members: Mutex<Members>,
    /// When the last ejection under way ends (ms on `clock`); 0 when none
    /// is: the only thing a call looks at while every endpoint is in.
    until: AtomicU64,
    /// Ejections are decided one at a time.
    deciding: Mutex<()>,
    epoch: Instant,
    ejected: [IntCounter; 2],
    refused: IntCounter,
}

#[derive(Default)]
struct Members {
    generation: u64,
    list: Vec<Arc<Health>>,
}

/// One endpoint, as outlier detection sees it.
#[derive(Default)]
pub(crate) struct Health {
    /// Its name (an address), for logs.
    name: Arc<str>,
    consecutive: AtomicU32,
    /// When its ejection ends (ms); 0: in service.
    until: AtomicU64,
    /// Ejections in a row, and when the last one ended.
    ejections: AtomicU32,
    back_at: AtomicU64,
    /// The share's window: when it began (ms), calls and failures in it.
    window: AtomicU64,
    calls: AtomicU32,
    failures: AtomicU32,
}

// === impl Health ===

impl Health {
    fn new(name: &Arc<str>) -> Arc<Self> {
        Arc::new(Health {
            name: name.clone(),
            ..Health::default()
        })
    }
}

// === impl Outliers ===

impl Outliers {
    /// State for the endpoints of `upstream`.
    pub(crate) fn new(upstream: &Arc<str>, u: &config::Upstream) -> Arc<Self> {
        let m = metrics::get();
        let o = Arc::new(Outliers {
            upstream: upstream.clone(),
            settings: Mutex::new(u.outlier_detection),
            by_share: Default::default(),
            members: Mutex::new(Members::default()),
            until: AtomicU64::new(0),
            deciding: Mutex::new(()),
            epoch: Instant::now(),
            ejected: REASONS.map(|r| m.upstream_ejections(upstream, r)),
            refused: m.upstream_ejections_refused(upstream),
        });
        o.configure(u);
        m.watch_outliers(&o);
        o
    }

    /// Applies the settings of a (re)loaded config.
    pub(crate) fn configure(&self, u: &config::Upstream) {
        if let Ok(mut s) = self.settings.lock() {
            *s = u.outlier_detection;
        }
        self.by_share
            .store(u.outlier_detection.failure_percent > 0, Ordering::Relaxed);
    }

    /// The upstream's name.
    pub(crate) fn upstream(&self) -> &Arc<str> {
        &self.upstream
    }

    /// Milliseconds since this started (never 0).
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether any endpoint may be out now: one atomic load while none is.
    pub(crate) fn any_ejected(&self) -> bool {
        let until = self.until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if self.now() < until {
            return true;
        }
        let _ = self
            .until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    /// The state of each of `set`'s endpoints, in its order: an address
    /// seen before keeps its own. The newest set seen is the one the share
    /// of endpoints out is counted over.
    pub(crate) fn track(&self, set: &Endpoints) -> Vec<Arc<Health>> {
        let Ok(mut m) = self.members.lock() else {
            return set.list.iter().map(|e| Health::new(&e.name)).collect();
        };
        let states: Vec<Arc<Health>> = set
            .list
            .iter()
            .map(|e| {
                m.list
                    .iter()
                    .find(|h| h.name == e.name)
                    .cloned()
                    .unwrap_or_else(|| Health::new(&e.name))
            })
            .collect();
        if set.generation > m.generation {
            m.generation = set.generation;
            m.list = states.clone();
        }
        states
    }

    /// Whether endpoint `e` is out now.
    pub(crate) fn is_ejected(&self, e: &Health) -> bool {
        e.until.load(Ordering::Relaxed) > self.now()
    }

    /// Endpoints out now.
    pub(crate) fn ejected_now(&self) -> usize {
        let now = self.now();
        self.members.lock().map_or(0, |m| {
            m.list
                .iter()
                .filter(|e| e.until.load(Ordering::Relaxed) > now)
                .count()
        })
    }

    /// A call to endpoint `e` that did not fail at the gateway level.
    pub(crate) fn success(&self, e: &Health) {
        if e.consecutive.load(Ordering::Relaxed) != 0 {
            e.consecutive.store(0, Ordering::Relaxed);
        }
        if self.by_share.load(Ordering::Relaxed) {
            self.count(e, false);
        }
    }

    /// A call to (or a connect to) endpoint `e` that failed.
    pub(crate) fn failure(&self, e: &Health) {
        // Out already: calls it still had in flight do not count toward
        // the next ejection.
        if e.until.load(Ordering::Relaxed) > self.now() {
            return;
        }
        let Ok(s) = self.settings.lock().map(|s| *s) else {
            return;
        };
        let row = e.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if s.consecutive_failures > 0 && row >= s.consecutive_failures {
            self.eject(e, 0, &s);
            return;
        }
        if s.failure_percent > 0 {
            let (calls, failures) = self.count(e, true);
            if calls >= s.min_calls.max(1)
                && u64::from(failures) * 100 >= u64::from(s.failure_percent) * u64::from(calls)
            {
                self.eject(e, 1, &s);
            }
        }
    }

    /// Counts a call in endpoint `e`'s window (a new one once `interval`
    /// has passed): its calls and failures so far.
    fn count(&self, e: &Health, failed: bool) -> (u32, u32) {
        let now = self.now();
        let interval = self
            .settings
            .lock()
            .map(|s| s.interval.0.as_millis() as u64)
            .unwrap_or(u64::MAX);
        let began = e.window.load(Ordering::Relaxed);
        if now.saturating_sub(began) >= interval
            && e.window
                .compare_exchange(began, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            e.calls.store(0, Ordering::Relaxed);
            e.failures.store(0, Ordering::Relaxed);
        }
        let calls = e.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let failures = if failed {
            e.failures.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            e.failures.load(Ordering::Relaxed)
        };
        (calls, failures)
    }

    /// Ejects endpoint `e` for `REASONS[why]`, unless it is out already or
    /// that would put too many out.
    fn eject(&self, e: &Health, why: usize, s: &config::OutlierDetection) {
        let Ok(_one) = self.deciding.lock() else {
            return;
        };
        let now = self.now();
        if e.until.load(Ordering::Relaxed) > now {
            return;
        }
        let n = self.members.lock().map_or(0, |m| m.list.len());
        // One endpoint (a name that resolves to one address) stays in.
        if n <= 1 {
            return;
        }
        let most = (n * s.max_ejection_percent as usize / 100)
            .max(1)
            .min(n - 1);
        if self.ejected_now() >= most {
            self.refused.inc();
            tracing::warn!(upstream = %self.upstream, endpoint = %e.name, "outlier detection: an endpoint keeps failing, but outlier_detection.max_ejection_percent is reached: it stays in");
            return;
        }
        let base = s.base_ejection_time.0.as_millis() as u64;
        // Each base time in service since it was last out takes one off.
        let back = e.back_at.load(Ordering::Relaxed);
        let healed = if back == 0 {
            u64::MAX
        } else {
            now.saturating_sub(back) / base.max(1)
        };
        let before = u64::from(e.ejections.load(Ordering::Relaxed));
        let times = before.saturating_sub(healed) + 1;
        let length = base
            .saturating_mul(times)
            .min(s.max_ejection_time.0.as_millis() as u64);
        let until = now + length;
        e.until.store(until, Ordering::Relaxed);
        e.back_at.store(until, Ordering::Relaxed);
        e.ejections.store(times as u32, Ordering::Relaxed);
        e.consecutive.store(0, Ordering::Relaxed);
        e.calls.store(0, Ordering::Relaxed);
        e.failures.store(0, Ordering::Relaxed);
        self.until.fetch_max(until, Ordering::Relaxed);
        self.ejected[why].inc();
        tracing::warn!(
            upstream = %self.upstream,
            endpoint = %e.name,
            reason = REASONS[why],
            ejected_for_ms = length,
            "outlier detection: endpoint ejected; calls go to the others until its time is up"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `o` tracking four endpoints: their states.
    fn four(o: &Outliers) -> Vec<Arc<Health>> {
        let a: Vec<_> = (1..=4).map(|p| ("127.0.0.1".to_owned(), p)).collect();
        o.track(&Endpoints::fixed(&a))
    }

    fn upstream(extra: &str) -> config::Upstream {
        serde_yaml::from_str(&format!(
            "addresses: ['127.0.0.1:1', '127.0.0.1:2', '127.0.0.1:3', '127.0.0.1:4']\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn failures_in_a_row_eject_and_a_success_starts_the_count_again() {
        let u = upstream("outlier_detection: { consecutive_failures: 3 }");
        let o = Outliers::new(&Arc::from("unit-outlier-row"), &u);
        let h = four(&o);
        o.failure(&h[0]);
        o.failure(&h[0]);
        o.success(&h[0]);
        o.failure(&h[0]);
        o.failure(&h[0]);
        assert!(!o.is_ejected(&h[0]), "a success in between starts again");
        o.failure(&h[0]);
        assert!(o.is_ejected(&h[0]));
        assert!(o.any_ejected());
        assert_eq!(o.ejected_now(), 1);
        assert_eq!(o.ejected[0].get(), 1);
    }

    #[test]
    fn never_more_than_the_share_and_never_all() {
        let u =
            upstream("outlier_detection: { consecutive_failures: 1, max_ejection_percent: 50 }");
        let o = Outliers::new(&Arc::from("unit-outlier-share"), &u);
        let h = four(&o);
        for e in &h {
            o.failure(e);
        }
        assert_eq!(o.ejected_now(), 2, "half of four");
        assert_eq!(o.refused.get(), 2);
        let u =
            upstream("outlier_detection: { consecutive_failures: 1, max_ejection_percent: 100 }");
        let o = Outliers::new(&Arc::from("unit-outlier-all"), &u);
        let h = four(&o);
        for e in &h {
            o.failure(e);
        }
        assert_eq!(o.ejected_now(), 3, "one stays in");
        let u = upstream("outlier_detection: { consecutive_failures: 1, max_ejection_percent: 0 }");
        let o = Outliers::new(&Arc::from("unit-outlier-one"), &u);
        let h = four(&o);
        o.failure(&h[1]);
        assert_eq!(o.ejected_now(), 1, "at least one may be out");
    }

    #[test]
    fn an_address_keeps_its_state_when_its_name_resolves_anew() {
        let u =
            upstream("outlier_detection: { consecutive_failures: 1, max_ejection_percent: 50 }");
        let o = Outliers::new(&Arc::from("unit-outlier-track"), &u);
        let h = four(&o);
        o.failure(&h[2]);
        assert!(o.is_ejected(&h[2]));
        // A new set: 127.0.0.1:3 stays, the others left, one came.
        let a = [("127.0.0.1".to_owned(), 3), ("127.0.0.1".to_owned(), 9)];
        let now = o.track(&Endpoints::fixed(&a));
        assert!(
            o.is_ejected(&now[0]),
            "the address that stayed is still out"
        );
        assert!(!o.is_ejected(&now[1]));
        assert_eq!(o.ejected_now(), 1, "counted over the new set");
        // Half of two may be out, and one is.
        o.failure(&now[1]);
        assert!(!o.is_ejected(&now[1]));
        // An older set seen late changes nothing.
        o.track(&Endpoints {
            list: vec![],
            generation: 0,
        });
        assert_eq!(o.ejected_now(), 1);
    }

    #[test]
    fn a_failure_share_ejects_once_enough_calls_are_in_the_window() {
        let u = upstream(
            "outlier_detection: { consecutive_failures: 0, failure_percent: 50, min_calls: 10 }",
        );
        let o = Outliers::new(&Arc::from("unit-outlier-percent"), &u);
        let h = four(&o);
        for _ in 0..4 {
            o.success(&h[2]);
            o.failure(&h[2]);
        }
        assert!(!o.is_ejected(&h[2]), "8 calls: under min_calls");
        o.success(&h[2]);
        o.failure(&h[2]);
        assert!(o.is_ejected(&h[2]), "5 of 10 failed");
        assert_eq!(o.ejected[1].get(), 1);
    }

    #[test]
    fn repeated_ejections_last_longer_up_to_the_cap() {
        let u = upstream(
            "outlier_detection: { consecutive_failures: 1, base_ejection_time: 10s, max_ejection_time: 25s }",
        );
        let o = Outliers::new(&Arc::from("unit-outlier-grow"), &u);
        let h = four(&o);
        let e = &h[0];
        let length = |o: &Outliers| e.until.load(Ordering::Relaxed) - o.now();
        o.failure(&h[0]);
        assert!((9_000..=10_000).contains(&length(&o)));
        // Its time is up (moved back by hand) and it fails again at once.
        e.until.store(1, Ordering::Relaxed);
        e.back_at.store(o.now(), Ordering::Relaxed);
        o.failure(&h[0]);
        assert!((19_000..=20_000).contains(&length(&o)), "twice the base");
        e.until.store(1, Ordering::Relaxed);
        e.back_at.store(o.now(), Ordering::Relaxed);
        o.failure(&h[0]);
        assert!((24_000..=25_000).contains(&length(&o)), "capped");
        assert!(!o.is_ejected(&h[1]));
    }
}
