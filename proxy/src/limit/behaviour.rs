//! The behaviour every limit backend must show, as a table: each case is a
//! limit and a sequence of calls at given times with the expected answer.
//! The pure algorithms run it in unit tests; the Redis backends run the same
//! table against real servers.

use std::time::Duration;

use super::algorithm::{Algorithm, Decision, Params};
use crate::config::Rate;

/// One call of a case.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Microseconds after the case's start.
    pub at: u64,
    /// Units the call costs.
    pub cost: u64,
    /// Whether it must pass.
    pub allowed: bool,
    /// If set: the retry-after (µs) a rejection must give, within 1%.
    pub retry_after: Option<u64>,
}

/// A named case.
#[derive(Debug, Clone)]
pub struct Case {
    /// What it shows.
    pub name: &'static str,
    /// The limit.
    pub params: Params,
    /// The calls, in time order.
    pub steps: Vec<Step>,
}

const S: u64 = 1_000_000;

fn params(algorithm: Algorithm, limit: u64, period_secs: u64, burst: Option<u64>) -> Params {
    Params {
        rate: Rate {
            limit,
            period: Duration::from_secs(period_secs),
        },
        burst,
        algorithm,
    }
}

fn ok(at: u64) -> Step {
    Step {
        at,
        cost: 1,
        allowed: true,
        retry_after: None,
    }
}

fn no(at: u64) -> Step {
    Step {
        at,
        cost: 1,
        allowed: false,
        retry_after: None,
    }
}

fn no_retry(at: u64, retry_after: u64) -> Step {
    Step {
        at,
        cost: 1,
        allowed: false,
        retry_after: Some(retry_after),
    }
}

/// Every case, for every algorithm.
pub fn cases() -> Vec<Case> {
    use Algorithm::*;
    let mut cases = Vec::new();
    // A burst of 10 against 5/s: exactly 5 pass, for every algorithm.
    for a in [FixedWindow, SlidingWindowLog, SlidingWindowCounter, Gcra] {
        let mut steps: Vec<Step> = (0..5).map(|i| ok(10 * S + i)).collect();
        steps.extend((5..10).map(|i| no(10 * S + i)));
        cases.push(Case {
            name: "a burst admits exactly the limit",
            params: params(a, 5, 1, None),
            steps,
        });
    }
    cases.push(Case {
        name: "fixed window resets at the window edge",
        params: params(FixedWindow, 2, 1, None),
        steps: vec![
            ok(10 * S + 900_000),
            ok(10 * S + 900_001),
            no_retry(10 * S + 900_002, 99_998),
            ok(11 * S),
            ok(11 * S + 1),
            no(11 * S + 2),
        ],
    });
    cases.push(Case {
        name: "sliding log frees each slot one period after its use",
        params: params(SlidingWindowLog, 2, 1, None),
        steps: vec![
            ok(10 * S),
            ok(10 * S + 500_000),
            no_retry(10 * S + 600_000, 400_000),
            ok(11 * S),
            no(11 * S + 1),
            ok(11 * S + 500_000),
        ],
    });
    cases.push(Case {
        name: "sliding counter weighs the previous window",
        params: params(SlidingWindowCounter, 10, 1, None),
        steps: {
            // 10 in the previous window; halfway through the next one the
            // previous window still weighs 5, so 5 more pass, not 10.
            let mut s: Vec<Step> = (0..10).map(|i| ok(10 * S + 100_000 + i)).collect();
            s.extend((0..5).map(|i| ok(11 * S + 500_000 + i)));
            s.push(no(11 * S + 500_010));
            s
        },
    });
    cases.push(Case {
        name: "gcra refills one unit per emission interval",
        params: params(Gcra, 10, 1, Some(2)),
        steps: vec![
            ok(10 * S),
            ok(10 * S),
            no_retry(10 * S, 100_000),
            ok(10 * S + 100_000),
            no(10 * S + 100_001),
            ok(10 * S + 200_000),
        ],
    });
    cases.push(Case {
        name: "cost counts as that many calls",
        params: params(FixedWindow, 10, 60, None),
        steps: vec![
            Step {
                at: 10 * S,
                cost: 7,
                allowed: true,
                retry_after: None,
            },
            Step {
                at: 10 * S + 1,
                cost: 4,
                allowed: false,
                retry_after: None,
            },
            Step {
                at: 10 * S + 2,
                cost: 3,
                allowed: true,
                retry_after: None,
            },
        ],
    });
    // A client-chosen cost near 2^64 must be refused, never wrap around to
    // a small sum that passes; the calls after it see the state it left.
    for a in [FixedWindow, SlidingWindowLog, SlidingWindowCounter, Gcra] {
        for huge in [u64::MAX, u64::MAX - 1, 1 << 63] {
            let mut steps: Vec<Step> = (0..3).map(|i| ok(10 * S + i)).collect();
            steps.push(Step {
                at: 10 * S + 3,
                cost: huge,
                allowed: false,
                retry_after: None,
            });
            steps.push(no(10 * S + 4));
            cases.push(Case {
                name: "a cost near 2^64 is refused and wraps nothing",
                params: params(a, 3, 60, None),
                steps,
            });
        }
    }
    cases
}

/// A time every period of the table divides (1 s and 60 s), far from the
/// epoch: backends run each case from here.
pub const ALIGNED_START: u64 = 1_700_000_040 * S;

/// Whether a backend's decision for `step` (number `i` of `case`) is the
/// one the table wants; the error says what differs.
pub fn check_step(case: &Case, i: usize, step: &Step, d: &Decision) -> Result<(), String> {
    let what = format!("{} ({:?}) step {i}", case.name, case.params.algorithm);
    if d.allowed != step.allowed {
        return Err(format!(
            "{what}: {} but the table says {}: {d:?}",
            if d.allowed { "allowed" } else { "refused" },
            if step.allowed { "allowed" } else { "refused" },
        ));
    }
    if let Some(r) = step.retry_after {
        if d.retry_after_micros.abs_diff(r) * 100 > r {
            return Err(format!(
                "{what}: retry after {} µs, the table says {r}",
                d.retry_after_micros
            ));
        }
    }
    if d.allowed && d.retry_after_micros != 0 {
        return Err(format!("{what}: allowed with a retry delay: {d:?}"));
    }
    if !d.allowed && d.retry_after_micros == 0 {
        return Err(format!("{what}: a rejection must say when to retry: {d:?}"));
    }
    if d.remaining > d.limit {
        return Err(format!("{what}: more remaining than the limit: {d:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::algorithm::State;
    use crate::limit::memory::{Answer, Check, MemoryStore};

    #[test]
    fn the_memory_store_passes_the_table() {
        let store = MemoryStore::new(10_000);
        for (n, case) in cases().into_iter().enumerate() {
            for (i, step) in case.steps.iter().enumerate() {
                let check = Check::new(format!("case-{n}"), case.params, step.cost, false);
                let a = store.decide_at(&[check], ALIGNED_START + step.at);
                let Answer::Decided(d) = a[0] else {
                    panic!("over capacity")
                };
                check_step(&case, i, step, &d).unwrap();
            }
        }
    }

    #[test]
    fn the_pure_algorithms_pass_the_table() {
        for case in cases() {
            let mut state: Option<State> = None;
            for (i, step) in case.steps.iter().enumerate() {
                let (d, next) = case.params.decide(state.as_mut(), step.at, step.cost);
                assert_eq!(
                    d.allowed, step.allowed,
                    "{} ({:?}) step {i}: {d:?}",
                    case.name, case.params.algorithm
                );
                if let Some(r) = step.retry_after {
                    let diff = d.retry_after_micros.abs_diff(r);
                    assert!(
                        diff * 100 <= r,
                        "{} step {i}: retry {} µs, want {r}",
                        case.name,
                        d.retry_after_micros
                    );
                }
                if d.allowed {
                    assert_eq!(d.retry_after_micros, 0);
                    case.params.keep(&mut state, next);
                } else {
                    assert!(
                        d.retry_after_micros > 0,
                        "{} step {i}: a rejection says when to retry",
                        case.name
                    );
                }
            }
        }
    }

    #[test]
    fn waiting_the_retry_delay_lets_the_call_pass() {
        use Algorithm::*;
        for a in [FixedWindow, SlidingWindowLog, SlidingWindowCounter, Gcra] {
            let p = params(a, 3, 1, None);
            let mut state = None;
            let mut now = 5 * S + 123_456;
            for _ in 0..3 {
                let (d, next) = p.decide(state.as_mut(), now, 1);
                assert!(d.allowed);
                p.keep(&mut state, next);
                now += 1_000;
            }
            let (d, _) = p.decide(state.as_mut(), now, 1);
            assert!(!d.allowed, "{a:?}");
            let (d, _) = p.decide(state.as_mut(), now + d.retry_after_micros, 1);
            assert!(d.allowed, "{a:?}: still refused after the retry delay");
        }
    }

    #[test]
    fn remaining_counts_down_and_reset_is_within_a_period() {
        let p = params(Algorithm::FixedWindow, 3, 1, None);
        let (d1, next) = p.decide(None, 10 * S + 250_000, 1);
        assert_eq!((d1.limit, d1.remaining, d1.reset_micros), (3, 2, 750_000));
        let mut state = None;
        p.keep(&mut state, next);
        let (d2, _) = p.decide(state.as_mut(), 10 * S + 250_001, 1);
        assert_eq!(d2.remaining, 1);
    }

    #[test]
    fn the_sliding_log_holds_about_one_entry_per_grain_and_one_per_large_call() {
        use crate::limit::algorithm::{State, LOG_GRAIN};
        // 1,000,000 per minute, a call every 100 µs for a whole minute: an
        // entry per call would be 600,000; merged within a grain, about
        // LOG_GRAIN.
        let p = params(Algorithm::SlidingWindowLog, 1_000_000, 60, None);
        let mut state = None;
        let mut now = 10 * S;
        for _ in 0..6_000_000 / 10 {
            let (d, next) = p.decide(state.as_mut(), now, 1);
            assert!(d.allowed);
            p.keep(&mut state, next);
            now += 100;
        }
        let Some(State::Log { entries, used }) = &state else {
            panic!("{state:?}")
        };
        assert_eq!(*used, 600_000);
        assert!(
            entries.len() as u64 <= LOG_GRAIN + 1,
            "{} entries",
            entries.len()
        );
        // One call of 400,000 units is one entry.
        let (d, next) = p.decide(state.as_mut(), now + 1_000_000, 400_000);
        assert!(d.allowed);
        p.keep(&mut state, next);
        let (d, _) = p.decide(state.as_mut(), now + 1_000_001, 1);
        assert!(!d.allowed, "the limit is full");
    }
}
