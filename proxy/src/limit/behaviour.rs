//! The behaviour every limit backend must show, as a table: each case is a
//! limit and a sequence of calls at given times with the expected answer.
//! [`behaviour_table!`] runs it against a backend: the pure algorithms and
//! the in-process store in the unit tests below, Redis and Redis Cluster
//! against real servers in `tests/it/redis_store.rs`.
//!
//! Compiled only for tests: the library's unit tests declare it in
//! `limit/mod.rs`, the integration tests include this file by path. Both
//! give it `super::algorithm` and `super::Rate`.

use std::time::Duration;

use super::algorithm::{Algorithm, Calendar::*, Decision, Params};
use super::check::Use;
use super::Rate;

/// One call of a case.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    /// Microseconds after the case's start.
    pub(crate) at: u64,
    /// Units the call costs.
    pub(crate) cost: u64,
    /// Whether it must pass.
    pub(crate) allowed: bool,
    /// If set: the retry-after (µs) a rejection must give, within 1%.
    pub(crate) retry_after: Option<u64>,
    /// A call's check, a peek (charged after the call) or a charge.
    pub(crate) mode: Use,
}

/// A named case.
#[derive(Debug, Clone)]
pub(crate) struct Case {
    /// What it shows.
    pub(crate) name: &'static str,
    /// The limit.
    pub(crate) params: Params,
    /// The calls, in time order.
    pub(crate) steps: Vec<Step>,
}

/// A second, in µs.
pub(crate) const S: u64 = 1_000_000;

/// A limit of `limit` per `period_secs`.
pub(crate) fn params(
    algorithm: Algorithm,
    limit: u64,
    period_secs: u64,
    burst: Option<u64>,
) -> Params {
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
        mode: Use::Take,
    }
}

fn no(at: u64) -> Step {
    Step {
        allowed: false,
        ..ok(at)
    }
}

fn no_retry(at: u64, retry_after: u64) -> Step {
    Step {
        retry_after: Some(retry_after),
        ..no(at)
    }
}

fn costs(cost: u64, step: Step) -> Step {
    Step { cost, ..step }
}

fn peek(step: Step) -> Step {
    Step {
        mode: Use::Peek,
        ..step
    }
}

/// A charge of `cost` at `at`: always allowed.
fn charge(at: u64, cost: u64) -> Step {
    Step {
        mode: Use::Charge,
        ..costs(cost, ok(at))
    }
}

/// Every case, for every algorithm.
pub(crate) fn cases() -> Vec<Case> {
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
            s.extend((0..5).map(|_| ok(11 * S + 500_000)));
            s.push(no(11 * S + 500_000));
            s
        },
    });
    cases.push(Case {
        name: "sliding counter rounds the previous window's weight down",
        params: params(SlidingWindowCounter, 10, 1, None),
        steps: {
            // 10 in the previous window. 15 % into the next one they weigh
            // 8.5, counted as 8: two pass. The third waits until they weigh
            // under 8, 50_001 µs later. At the very end of the window they
            // weigh 0.1, counted as 0, so the window's last call passes too
            // (an exact weight refused it: 9 of 10 per window under steady
            // load).
            let mut s: Vec<Step> = (0..10).map(|i| ok(10 * S + i)).collect();
            s.push(ok(11 * S + 150_000));
            s.push(ok(11 * S + 150_000));
            s.push(no_retry(11 * S + 150_000, 50_001));
            s.push(no(11 * S + 200_000));
            s.push(ok(11 * S + 200_001));
            s.extend((0..7).map(|_| ok(11 * S + 990_000)));
            s.push(no(11 * S + 990_000));
            s
        },
    });
    cases.push(Case {
        name: "sliding counter at a window's edge: the weight rounded down",
        params: params(SlidingWindowCounter, 1, 1, None),
        steps: vec![
            // The previous window's one call came at its very end; a
            // microsecond into the next it weighs 0.999999, counted as 0.
            ok(10 * S + 999_999),
            ok(11 * S + 1),
            no(11 * S + 2),
        ],
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
            costs(7, ok(10 * S)),
            costs(4, no(10 * S + 1)),
            costs(3, ok(10 * S + 2)),
        ],
    });
    // Charged after the call: peeks ask whether a unit is left and take
    // nothing; charges take their cost even past the limit, which then
    // refuses until enough has left its window.
    for a in [FixedWindow, SlidingWindowLog, SlidingWindowCounter, Gcra] {
        let t0 = 10 * S;
        cases.push(Case {
            name: "peeks take nothing; a charge takes its cost, past the limit",
            params: params(a, 5, 60, None),
            steps: vec![
                peek(ok(t0)),
                peek(ok(t0 + 1)),
                peek(ok(t0 + 2)),
                charge(t0 + 3, 4),
                peek(ok(t0 + 4)),
                charge(t0 + 5, 3),
                peek(no(t0 + 6)),
                no(t0 + 7),
                costs(5, peek(ok(t0 + 120 * S))),
                ok(t0 + 120 * S + 1),
                costs(4, ok(t0 + 120 * S + 2)),
                peek(no(t0 + 120 * S + 3)),
            ],
        });
    }
    // A charge past the limit refuses until it has drained: a fixed
    // window's next window, the log's entry leaving, GCRA's debt paid.
    // (One charge is at most the limit's capacity: tollgate charges no
    // more, and a store need count no further.)
    cases.push(Case {
        name: "a fixed window charged past its limit opens in the next window",
        params: params(FixedWindow, 5, 60, None),
        steps: vec![
            charge(10 * S, 5),
            charge(10 * S, 3),
            no_retry(10 * S + 1, 50 * S - 1),
            ok(60 * S),
        ],
    });
    cases.push(Case {
        name: "a sliding log charged past its limit opens when the charge leaves",
        params: params(SlidingWindowLog, 5, 60, None),
        steps: vec![
            charge(10 * S, 5),
            charge(10 * S, 3),
            no_retry(10 * S + 1, 60 * S - 1),
            ok(70 * S),
        ],
    });
    cases.push(Case {
        name: "gcra charged past its burst owes the time the excess takes",
        // 5 per minute: a unit every 12 s. 10 units at 10 s: arrival time
        // 130 s; one more fits once 130 + 12 - 60 = 82 s, later than the
        // minute a key's state lasts when nothing is owed.
        params: params(Gcra, 5, 60, None),
        steps: vec![
            charge(10 * S, 5),
            charge(10 * S, 5),
            no_retry(10 * S + 1, 72 * S - 1),
            no_retry(75 * S, 7 * S),
            ok(82 * S),
            no(82 * S + 1),
        ],
    });
    // Any period: 10 s, 5 min and a week, in every algorithm. A burst of
    // the limit at a window's start passes and the next call is refused
    // with the wait the algorithm owes; two periods on, the whole limit
    // passes again.
    for period in [10, 300, 7 * 86_400] {
        for a in [FixedWindow, SlidingWindowLog, SlidingWindowCounter, Gcra] {
            let p = period * S;
            // A rolling window's start (a week from the epoch's Thursday).
            let t0 = 10 * p + (p - ALIGNED_START % p) % p;
            let mut steps: Vec<Step> = (0..4).map(|i| ok(t0 + i)).collect();
            steps.push(match a {
                FixedWindow | SlidingWindowLog => no_retry(t0 + 4, p - 4),
                Gcra => no_retry(t0 + 4, p / 4 - 4),
                _ => no(t0 + 4),
            });
            steps.push(no(t0 + p / 8));
            steps.extend((0..4).map(|i| ok(t0 + 2 * p + i)));
            steps.push(no(t0 + 2 * p + 4));
            cases.push(Case {
                name: "any period: 4 per 10 s, 5 min or week",
                params: params(a, 4, period, None),
                steps,
            });
        }
    }
    // Calendar windows. ALIGNED_START is Monday 2024-01-01, 00:00 UTC:
    // January has 31 days and February (2024 is a leap year) 29.
    const D: u64 = 86_400 * S;
    const H: u64 = 3_600 * S;
    cases.push(Case {
        name: "a calendar day resets at UTC midnight",
        params: params(Calendar(Day), 1, 86_400, None),
        steps: vec![ok(23 * H), no_retry(23 * H + 59 * 60 * S, 60 * S), ok(D)],
    });
    cases.push(Case {
        name: "a calendar week runs Monday to Sunday, not from the epoch's Thursday",
        params: params(Calendar(Week), 2, 7 * 86_400, None),
        steps: vec![
            ok(0),
            ok(3 * D - 1),
            // A rolling week from the epoch would begin on this Thursday.
            no_retry(3 * D + H, 4 * D - H),
            no(7 * D - 1),
            ok(7 * D),
            ok(7 * D + 1),
            no(7 * D + 2),
        ],
    });
    cases.push(Case {
        name: "a calendar month is the month, 31 days or a leap February's 29",
        params: params(Calendar(Month), 1, 30 * 86_400, None),
        steps: vec![
            ok(0),
            // 30 days on is still 31 January.
            no_retry(30 * D, D),
            ok(31 * D),
            // 29 February 2024, then 1 March.
            no_retry(59 * D + 23 * H, H),
            ok(60 * D),
            no(60 * D + 30 * D),
            ok(60 * D + 31 * D),
        ],
    });
    // A client-chosen cost near 2^64 must be refused, never wrap around to
    // a small sum that passes; the calls after it see the state it left.
    for a in [
        FixedWindow,
        SlidingWindowLog,
        SlidingWindowCounter,
        Gcra,
        Calendar(Day),
    ] {
        for huge in [u64::MAX, u64::MAX - 1, 1 << 63] {
            let mut steps: Vec<Step> = (0..3).map(|i| ok(10 * S + i)).collect();
            steps.push(costs(huge, no(10 * S + 3)));
            steps.push(no(10 * S + 4));
            cases.push(Case {
                name: "a cost near 2^64 is refused and wraps nothing",
                params: params(a, 3, if a == Calendar(Day) { 86_400 } else { 60 }, None),
                steps,
            });
        }
    }
    cases
}

/// Runs every case of the table: `|n, case, step| decision` answers one
/// step (`n` numbers the case: each case has a key of its own) and may
/// `.await` inside an async test; every answer is checked with
/// [`check_step`].
macro_rules! behaviour_table {
    (|$n:ident, $case:ident, $step:ident| $decide:expr) => {
        for ($n, $case) in cases().into_iter().enumerate() {
            for (i, $step) in $case.steps.iter().enumerate() {
                let decision = $decide;
                if let Err(e) = check_step(&$case, i, $step, &decision) {
                    panic!("{e}");
                }
            }
        }
    };
}
pub(crate) use behaviour_table;

/// Monday 2024-01-01, 00:00 UTC: a time every rolling period of the table
/// but the week divides, where calendar days, weeks and months all begin.
/// Backends run each case from here.
pub(crate) const ALIGNED_START: u64 = 1_704_067_200 * S;

/// Whether a backend's decision for `step` (number `i` of `case`) is the
/// one the table wants; the error says what differs.
pub(crate) fn check_step(case: &Case, i: usize, step: &Step, d: &Decision) -> Result<(), String> {
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
