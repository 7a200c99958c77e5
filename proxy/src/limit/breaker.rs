//! A circuit breaker for the limit store: after `threshold` failures in a
//! row it opens, and calls stop going to the store (they take their failure
//! mode at once instead of waiting out a timeout each). Every
//! `probe_interval` one call is let through as a probe; its success closes
//! the breaker, so limits work again by themselves once the store is back.
//!
//! What counts is a store round trip (one batch of calls), not a call: one
//! slow batch of a hundred calls is one failure. A probe is a [`Probe`]
//! value that travels with the probing call into the store's batch; it is
//! always resolved: by the batch's outcome, or, if it is dropped unreported
//! (the call was cancelled before its batch ran), as a failed probe, so the
//! next one goes one interval later. A probe can never stay out forever.
//!
//! Shared by every worker, lock-free: a call costs one atomic load while
//! the breaker is closed.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// What the breaker says about a call.
#[derive(Debug)]
pub(crate) enum Gate {
    /// Closed: go to the store.
    Pass,
    /// Open, and this call is the probe: go to the store with it.
    Probe(Probe),
    /// Open: do not go to the store.
    Refuse,
}

/// The one probe out while the breaker is open; resolved when reported, or
/// when dropped.
#[derive(Debug)]
pub(crate) struct Probe {
    breaker: Arc<Breaker>,
    reported: bool,
}

/// The breaker's state, as the `tollgate_limit_store_breaker_open` gauge
/// shows it (the tests read it).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Calls go to the store.
    Closed = 0,
    /// Calls take their failure mode; a probe is sent now and then.
    Open = 1,
}

/// A lock-free circuit breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
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
pub(crate) enum Transition {
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
    pub(crate) fn new(threshold: u32, probe_interval: Duration) -> Arc<Self> {
        Arc::new(Breaker {
            threshold: threshold.max(1),
            probe_interval,
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            next_probe: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            epoch: Instant::now(),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// The current state.
    #[cfg(test)]
    pub(crate) fn state(&self) -> State {
        if self.open.load(Ordering::Acquire) {
            State::Open
        } else {
            State::Closed
        }
    }

    /// Whether a call may go to the store.
    pub(crate) fn gate(self: &Arc<Self>) -> Gate {
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
            Gate::Probe(Probe {
                breaker: self.clone(),
                reported: false,
            })
        } else {
            Gate::Refuse
        }
    }

    /// Reports a store round trip that answered; `probe`: the probes it
    /// carried.
    pub(crate) fn success(&self, probes: impl IntoIterator<Item = Probe>) -> Transition {
        // Read first: on the common path (closed, no failures) nothing is
        // written, so workers do not contend for the line.
        if self.failures.load(Ordering::Acquire) != 0 {
            self.failures.store(0, Ordering::Release);
        }
        for p in probes {
            p.resolved();
            self.probing.store(false, Ordering::Release);
        }
        if self.open.load(Ordering::Acquire) && self.open.swap(false, Ordering::AcqRel) {
            Transition::Closed
        } else {
            Transition::None
        }
    }

    /// Reports a store round trip that failed (error or timeout); `probes`:
    /// the probes it carried.
    pub(crate) fn failure(&self, probes: impl IntoIterator<Item = Probe>) -> Transition {
        let mut probed = false;
        for p in probes {
            p.resolved();
            probed = true;
        }
        if probed {
            self.probe_failed();
            return Transition::None;
        }
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if failures >= self.threshold && !self.open.load(Ordering::Acquire) {
            self.next_probe.store(
                self.now() + self.probe_interval.as_micros() as u64,
                Ordering::Release,
            );
            if !self.open.swap(true, Ordering::AcqRel) {
                return Transition::Opened;
            }
        }
        Transition::None
    }

    /// The probe out failed (or was dropped): the next goes one interval
    /// from now.
    fn probe_failed(&self) {
        self.next_probe.store(
            self.now() + self.probe_interval.as_micros() as u64,
            Ordering::Release,
        );
        self.probing.store(false, Ordering::Release);
    }
}

impl Probe {
    /// Marks the probe as reported: its drop changes nothing more.
    fn resolved(mut self) {
        self.reported = true;
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker.probe_failed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(b: &Arc<Breaker>) -> Probe {
        match b.gate() {
            Gate::Probe(p) => p,
            other => panic!("expected a probe, got {other:?}"),
        }
    }

    fn refused(b: &Arc<Breaker>) -> bool {
        matches!(b.gate(), Gate::Refuse)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_probes_then_closes() {
        let b = Breaker::new(3, Duration::from_millis(200));
        assert_eq!(b.failure(None), Transition::None);
        assert_eq!(b.failure(None), Transition::None);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.failure(None), Transition::Opened);
        assert!(refused(&b), "no calls while open");

        tokio::time::advance(Duration::from_millis(201)).await;
        let p = probe(&b);
        assert!(refused(&b), "one probe at a time");
        assert_eq!(b.failure(Some(p)), Transition::None);
        assert!(refused(&b), "a failed probe waits another interval");

        tokio::time::advance(Duration::from_millis(201)).await;
        let p = probe(&b);
        assert_eq!(b.success(Some(p)), Transition::Closed);
        assert!(matches!(b.gate(), Gate::Pass));
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_unreported_lets_the_next_go_an_interval_later() {
        let b = Breaker::new(1, Duration::from_millis(200));
        b.failure(None);
        tokio::time::advance(Duration::from_millis(201)).await;
        // The probing call was cancelled: its probe is dropped, unreported.
        drop(probe(&b));
        assert!(refused(&b), "not at once: one probe per interval");
        tokio::time::advance(Duration::from_millis(201)).await;
        let p = probe(&b);
        assert_eq!(b.success(Some(p)), Transition::Closed);
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_millis(200));
        b.failure(None);
        b.success(None);
        assert_eq!(b.failure(None), Transition::None);
        assert_eq!(b.state(), State::Closed);
    }
}
