//! Adaptive concurrency: a limit on an upstream's calls in flight that
//! follows its latency, so that a slowing upstream gets fewer calls at
//! once instead of a growing queue.
//!
//! The algorithm is Netflix's Gradient2 (concurrency-limits): calls sample
//! their latency (to the response headers); each `window` with at least
//! `min_samples` gives a short-run average `short`, folded into a long-run
//! average `long` (the first ten windows averaged, then an exponential
//! average over 600 windows; `long` drops 5 % a window while it is more
//! than twice `short`, so it recovers after a long overload). Then, unless
//! fewer than half the limit were in flight in the window and none was
//! shed (the clients, not the upstream, held calls back):
//!
//! ```text
//! gradient = clamp(tolerance × long / short, 0.5, 1.0)
//! new      = limit × gradient + √limit
//! limit    = clamp(limit × (1 − smoothing) + new × smoothing, min_limit, max_limit)
//! ```
//!
//! Calls are shed by route priority: `sheddable` ones once half the limit
//! is in flight, `normal` ones at the limit, `critical` ones never (they
//! count toward it). The state is the process's, shared by every worker,
//! and kept across reloads that leave the settings as they were.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::time::Instant;

use crate::config::{self, Priority};
use crate::metrics;

/// Windows the long-run average spans.
const LONG_WINDOW: f64 = 600.0;
/// Windows simply averaged before the long-run average is exponential.
const WARM_UP: u64 = 10;

/// One upstream's adaptive limit.
pub(crate) struct Adaptive {
    upstream: Arc<str>,
    settings: config::AdaptiveConcurrency,
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    /// A call was shed since the last window: demand was there, whatever
    /// was in flight.
    pressed: std::sync::atomic::AtomicBool,
    window: Mutex<Window>,
    limit_gauge: IntGauge,
    shed: [IntCounter; 3],
}

struct Window {
    began: Instant,
    samples: u64,
    total_us: u64,
    most_in_flight: usize,
    long_us: f64,
    windows: u64,
    /// The limit before rounding.
    limit: f64,
}

/// A call counted in flight until dropped.
pub(crate) struct Admitted {
    adaptive: Arc<Adaptive>,
    began: Instant,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.adaptive.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admitted {
    /// The call's response headers came: its latency is a sample.
    pub(crate) fn answered(&self) {
        self.adaptive.sample(self.began.elapsed());
    }
}

const PRIORITIES: [Priority; 3] = [Priority::Critical, Priority::Normal, Priority::Sheddable];

// === impl Adaptive ===

impl Adaptive {
    /// A limit for `upstream` at its initial value.
    pub(crate) fn new(upstream: &Arc<str>, settings: config::AdaptiveConcurrency) -> Arc<Self> {
        let m = metrics::get();
        let a = Adaptive {
            upstream: upstream.clone(),
            settings,
            limit: AtomicUsize::new(settings.initial_limit),
            in_flight: AtomicUsize::new(0),
            pressed: Default::default(),
            window: Mutex::new(Window {
                began: Instant::now(),
                samples: 0,
                total_us: 0,
                most_in_flight: 0,
                long_us: 0.0,
                windows: 0,
                limit: settings.initial_limit as f64,
            }),
            limit_gauge: m.upstream_concurrency_limit(upstream),
            shed: PRIORITIES.map(|p| m.upstream_shed(upstream, p.name())),
        };
        Arc::new(a)
    }

    /// Shows its limit (once the config it belongs to serves).
    pub(crate) fn install(&self) {
        self.limit_gauge.set(self.limit() as i64);
    }

    /// The settings it runs with.
    pub(crate) fn settings(&self) -> &config::AdaptiveConcurrency {
        &self.settings
    }

    /// The limit now.
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Counts a call of `priority` in flight, or sheds it (counted).
    pub(crate) fn admit(self: &Arc<Self>, priority: Priority) -> Option<Admitted> {
        let limit = self.limit();
        let room = match priority {
            Priority::Critical => usize::MAX,
            Priority::Normal => limit,
            Priority::Sheddable => (limit / 2).max(1),
        };
        let admitted = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < room).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            let i = PRIORITIES.iter().position(|p| *p == priority).unwrap_or(1);
            self.shed[i].inc();
            self.pressed.store(true, Ordering::Relaxed);
            return None;
        }
        Some(Admitted {
            adaptive: self.clone(),
            began: Instant::now(),
        })
    }

    fn sample(&self, rtt: Duration) {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let Ok(mut w) = self.window.lock() else {
            return;
        };
        w.samples += 1;
        w.total_us += rtt.as_micros() as u64;
        w.most_in_flight = w.most_in_flight.max(in_flight);
        if w.began.elapsed() < self.settings.window.0
            || w.samples < self.settings.min_samples as u64
        {
            return;
        }
        let short = (w.total_us as f64 / w.samples as f64).max(1.0);
        w.long_us = if w.windows < WARM_UP {
            (w.long_us * w.windows as f64 + short) / (w.windows + 1) as f64
        } else {
            let f = 2.0 / (LONG_WINDOW + 1.0);
            w.long_us * (1.0 - f) + short * f
        };
        w.windows += 1;
        if w.long_us / short > 2.0 {
            w.long_us *= 0.95;
        }
        let s = &self.settings;
        let pressed = self.pressed.swap(false, Ordering::Relaxed);
        if pressed || w.most_in_flight as f64 >= w.limit / 2.0 {
            let gradient = (s.tolerance * w.long_us / short).clamp(0.5, 1.0);
            let new = w.limit * gradient + w.limit.sqrt();
            let smoothed = w.limit * (1.0 - s.smoothing) + new * s.smoothing;
            w.limit = smoothed.clamp(s.min_limit as f64, s.max_limit as f64);
            let limit = w.limit as usize;
            if limit != self.limit() {
                self.limit.store(limit, Ordering::Relaxed);
                self.limit_gauge.set(limit as i64);
                tracing::debug!(upstream = %self.upstream, limit, short_us = short, long_us = w.long_us, "adaptive concurrency limit");
            }
        }
        w.began = Instant::now();
        w.samples = 0;
        w.total_us = 0;
        w.most_in_flight = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(yaml: &str) -> config::AdaptiveConcurrency {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_falls_when_latency_rises_and_recovers_when_it_falls() {
        let s = settings(
            "{ min_limit: 4, max_limit: 100, initial_limit: 40, window: 100ms, min_samples: 5 }",
        );
        let a = Adaptive::new(&Arc::from("unit-adaptive"), s);
        let window = |a: &Adaptive, rtt_ms: u64, in_flight: usize| {
            a.in_flight.store(in_flight, Ordering::Relaxed);
            for _ in 0..5 {
                a.sample(Duration::from_millis(rtt_ms));
            }
        };
        // A baseline at 1 ms, while the upstream keeps up.
        for _ in 0..12 {
            tokio::time::advance(Duration::from_millis(100)).await;
            window(&a, 1, 30);
        }
        let steady = a.limit();
        assert!(steady >= 40, "fast and busy: the limit grows ({steady})");
        // Ten times slower: the limit falls window after window.
        for _ in 0..40 {
            tokio::time::advance(Duration::from_millis(100)).await;
            window(&a, 10, 100);
        }
        assert!(a.limit() < steady / 4, "{} from {steady}", a.limit());
        assert!(a.limit() >= 4, "never under min_limit");
        // Fast again: it grows back.
        let low = a.limit();
        for _ in 0..30 {
            tokio::time::advance(Duration::from_millis(100)).await;
            window(&a, 1, 100);
        }
        assert!(a.limit() > low, "{} from {low}", a.limit());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_upstream_keeps_its_limit() {
        let s = settings("{ initial_limit: 40, window: 100ms, min_samples: 5 }");
        let a = Adaptive::new(&Arc::from("unit-adaptive-idle"), s);
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(100)).await;
            a.in_flight.store(3, Ordering::Relaxed);
            for _ in 0..5 {
                a.sample(Duration::from_millis(50));
            }
        }
        assert_eq!(
            a.limit(),
            40,
            "fewer than half the limit in flight: no change"
        );
    }

    #[test]
    fn sheddable_calls_go_first_and_critical_ones_never() {
        let s = settings("{ min_limit: 1, initial_limit: 4 }");
        let a = Adaptive::new(&Arc::from("unit-adaptive-shed"), s);
        let first = a.admit(Priority::Sheddable).unwrap();
        let _second = a.admit(Priority::Sheddable).unwrap();
        assert!(a.admit(Priority::Sheddable).is_none(), "half the limit");
        let _n1 = a.admit(Priority::Normal).unwrap();
        let _n2 = a.admit(Priority::Normal).unwrap();
        assert!(a.admit(Priority::Normal).is_none(), "the limit");
        let critical: Vec<_> = (0..10)
            .map(|_| a.admit(Priority::Critical).unwrap())
            .collect();
        assert_eq!(a.in_flight.load(Ordering::Relaxed), 14);
        drop(critical);
        drop(first);
        assert!(a.admit(Priority::Normal).is_some());
        assert_eq!(a.shed[2].get(), 1);
        assert_eq!(a.shed[1].get(), 1);
    }
}
