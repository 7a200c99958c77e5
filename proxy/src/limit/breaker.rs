//! A circuit breaker for the limit store: after `threshold` failures in a
//! row it opens, and calls stop going to the store (they take their failure
//! mode at once instead of waiting out a timeout each). Every
//! `probe_interval` one call is let through as a probe; its success closes
//! the breaker, so limits work again by themselves once the store is back.
//!
//! Shared by every worker, lock-free: a call costs one atomic load while
//! the breaker is closed.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// What the breaker says about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Closed: go to the store.
    Pass,
    /// Open, and this call is the probe: go to the store and report back.
    Probe,
    /// Open: do not go to the store.
    Refuse,
}

/// The breaker's state, as the `tollgate_limit_store_breaker_state` gauge
/// shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls go to the store.
    Closed = 0,
    /// Calls take their failure mode; a probe is sent now and then.
    Open = 1,
}

/// A lock-free circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    probe_interval: Duration,
    failures: AtomicU32,
    open: AtomicBool,
    /// While open: when the next probe may go, in µs since `epoch`.
    next_probe: AtomicU64,
    probing: AtomicBool,
    epoch: Instant,
}

/// What changed when a result was reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing.
    None,
    /// The breaker just opened.
    Opened,
    /// The breaker just closed.
    Closed,
}

// === impl Breaker ===

impl Breaker {
    /// Opens after `threshold` failures in a row; probes every
    /// `probe_interval` while open.
    pub fn new(threshold: u32, probe_interval: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            probe_interval,
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            next_probe: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// The current state.
    pub fn state(&self) -> State {
        if self.open.load(Ordering::Acquire) {
            State::Open
        } else {
            State::Closed
        }
    }

    /// Whether a call may go to the store.
    pub fn gate(&self) -> Gate {
        if !self.open.load(Ordering::Acquire) {
            return Gate::Pass;
        }
        if self.now() < self.next_probe.load(Ordering::Acquire) {
            return Gate::Refuse;
        }
        // One probe at a time.
        if self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            Gate::Probe
        } else {
            Gate::Refuse
        }
    }

    /// Reports a store call that answered.
    pub fn success(&self, gate: Gate) -> Transition {
        // Read first: on the common path (closed, no failures) nothing is
        // written, so workers do not contend for the line.
        if self.failures.load(Ordering::Acquire) != 0 {
            self.failures.store(0, Ordering::Release);
        }
        if gate == Gate::Probe {
            self.probing.store(false, Ordering::Release);
        }
        if self.open.load(Ordering::Acquire) && self.open.swap(false, Ordering::AcqRel) {
            Transition::Closed
        } else {
            Transition::None
        }
    }

    /// Reports a store call that failed (error or timeout).
    pub fn failure(&self, gate: Gate) -> Transition {
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let next = self.now() + self.probe_interval.as_micros() as u64;
        if gate == Gate::Probe {
            self.next_probe.store(next, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            return Transition::None;
        }
        if failures >= self.threshold && !self.open.load(Ordering::Acquire) {
            self.next_probe.store(next, Ordering::Release);
            if !self.open.swap(true, Ordering::AcqRel) {
                return Transition::Opened;
            }
        }
        Transition::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_probes_then_closes() {
        let b = Breaker::new(3, Duration::from_millis(200));
        assert_eq!(b.failure(b.gate()), Transition::None);
        assert_eq!(b.failure(b.gate()), Transition::None);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.failure(b.gate()), Transition::Opened);
        assert_eq!(b.gate(), Gate::Refuse, "no calls while open");

        tokio::time::advance(Duration::from_millis(201)).await;
        let probe = b.gate();
        assert_eq!(probe, Gate::Probe);
        assert_eq!(b.gate(), Gate::Refuse, "one probe at a time");
        assert_eq!(b.failure(probe), Transition::None);
        assert_eq!(
            b.gate(),
            Gate::Refuse,
            "a failed probe waits another interval"
        );

        tokio::time::advance(Duration::from_millis(201)).await;
        let probe = b.gate();
        assert_eq!(probe, Gate::Probe);
        assert_eq!(b.success(probe), Transition::Closed);
        assert_eq!(b.gate(), Gate::Pass);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_millis(200));
        b.failure(Gate::Pass);
        b.success(Gate::Pass);
        assert_eq!(b.failure(Gate::Pass), Transition::None);
        assert_eq!(b.state(), State::Closed);
    }
}
