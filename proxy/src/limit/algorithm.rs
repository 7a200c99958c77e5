//! The four limit algorithms, each written once as a pure function of
//! (state, now, cost): no clock, no storage. The in-process backend calls
//! them directly; the Redis scripts implement the same decisions, and
//! `limit/behaviour.rs` is the table every backend must pass.
//!
//! Times are microseconds since an arbitrary epoch (the backend's clock, or
//! Redis `TIME`), so one replica's clock never decides for another.
//!
//! A cost may come from the client (`cost: { header: … }`), so every sum
//! and product with it saturates: a cost near 2^64 must be refused, not
//! wrap around to a small number and pass.

use std::collections::VecDeque;

use crate::config::Rate;

/// How a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Every admitted unit is remembered for one period: exact, most memory.
    SlidingWindowLog,
    /// The current and previous fixed windows, the previous one weighted by
    /// how much of it still overlaps the sliding window: close, two counters.
    SlidingWindowCounter,
    /// Generic cell rate algorithm (a token bucket kept as one timestamp):
    /// smooth, allows bursts of `burst`.
    Gcra,
    /// Counts per aligned window: cheapest, allows 2x at window edges.
    FixedWindow,
    /// A fixed window that is a calendar day, ISO week (from Monday) or
    /// month, in UTC: a quota. The store's clock must be Unix time.
    Calendar(Calendar),
}

/// A calendar window, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Calendar {
    /// From midnight.
    Day,
    /// From Monday's midnight.
    Week,
    /// From the first's midnight.
    Month,
}

const DAY_MICROS: u64 = 86_400_000_000;

// === impl Calendar ===

impl Calendar {
    /// The window holding `now` (µs of Unix time): its start and its end.
    pub fn window(self, now: u64) -> (u64, u64) {
        let days = now / DAY_MICROS;
        let (first, len) = match self {
            Calendar::Day => (days, 1),
            // 1970-01-01 was a Thursday: Monday is three days on from it.
            Calendar::Week => (days.saturating_sub((days + 3) % 7), 7),
            Calendar::Month => {
                let (y, m, d) = civil_from_days(days);
                (days - (d - 1), days_in_month(y, m))
            }
        };
        (first * DAY_MICROS, (first + len) * DAY_MICROS)
    }

    /// The longest such window, in µs (how long its state matters).
    pub fn longest_micros(self) -> u64 {
        DAY_MICROS
            * match self {
                Calendar::Day => 1,
                Calendar::Week => 7,
                Calendar::Month => 31,
            }
    }
}

/// (year, month 1-12, day 1-31) of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400)) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A limit's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Params {
    /// Units per period.
    pub rate: Rate,
    /// GCRA only: how many units may go at once (default: the rate's limit).
    pub burst: Option<u64>,
    /// The algorithm.
    pub algorithm: Algorithm,
}

/// What one limit says about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the call's cost fits.
    pub allowed: bool,
    /// The limit's size (for `ratelimit-limit`).
    pub limit: u64,
    /// Units left after this call (for `ratelimit-remaining`).
    pub remaining: u64,
    /// Microseconds until the quota is fully available again
    /// (`ratelimit-reset`).
    pub reset_micros: u64,
    /// Rejected: microseconds to wait before the same call can pass
    /// (`retry-after`, RetryInfo). 0 when allowed.
    pub retry_after_micros: u64,
}

/// A decision and the state a call keeps.
trait MapNext {
    fn map_next(self) -> (Decision, Next);
}

impl MapNext for (Decision, State) {
    fn map_next(self) -> (Decision, Next) {
        (self.0, Next::State(self.1))
    }
}

/// A limit's state for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Fixed window: its start and the units counted in it.
    Fixed {
        /// Window start.
        window: u64,
        /// Units counted.
        count: u64,
    },
    /// Sliding counter: the current window's start and the counts of the
    /// current and previous windows.
    Counter {
        /// Current window start.
        window: u64,
        /// Units in the current window.
        current: u64,
        /// Units in the previous window.
        previous: u64,
    },
    /// Sliding log: (time, units) of the admissions still in the window,
    /// admissions within [`LOG_GRAIN`] of a period of each other merged
    /// into one (at the later time), and their sum.
    Log {
        /// (time, units), oldest first.
        entries: VecDeque<(u64, u64)>,
        /// Units in `entries`.
        used: u64,
    },
    /// GCRA: the theoretical arrival time of the next unit.
    Gcra {
        /// Theoretical arrival time.
        tat: u64,
    },
}

/// The sliding log keeps at most about this many entries per key: an
/// admission within 1/LOG_GRAIN of a period of the newest one joins it, at
/// the later time. Units then leave the window up to that much late (never
/// early: the log admits no more than the limit in any window), and one
/// large-cost call is one entry, not one per unit.
pub const LOG_GRAIN: u64 = 1024;

/// What a decision keeps if its call goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// This state replaces the key's.
    State(State),
    /// The sliding log takes `cost` more units at `at` (in place: no copy
    /// of the log per decision).
    Log {
        /// The time of the admission.
        at: u64,
        /// Its units.
        cost: u64,
    },
}

// === impl Params ===

impl Params {
    /// The most units this limit can ever admit at once.
    pub fn capacity(&self) -> u64 {
        match self.algorithm {
            Algorithm::Gcra => self.burst.unwrap_or(self.rate.limit).max(1),
            _ => self.rate.limit,
        }
    }

    /// Decides a call of `cost` units at `now` against `state` (`None`: a key
    /// never seen). Returns the decision and what to keep if the call goes
    /// on ([`Params::keep`]); a rejected call changes nothing that matters
    /// (the log drops the admissions that have left its window, in place).
    pub fn decide(&self, state: Option<&mut State>, now: u64, cost: u64) -> (Decision, Next) {
        self.decide_as(state, now, cost, false)
    }

    /// Charges `cost` units at `now` whether or not they fit: the cost of a
    /// call known only once it has ended. The decision always allows (its
    /// figures count the charge); what it returns is always kept. A key
    /// charged over its limit refuses until enough has left its window (a
    /// GCRA key owes the time its excess takes to drain).
    pub fn charge(&self, state: Option<&mut State>, now: u64, cost: u64) -> (Decision, Next) {
        self.decide_as(state, now, cost, true)
    }

    fn decide_as(
        &self,
        state: Option<&mut State>,
        now: u64,
        cost: u64,
        force: bool,
    ) -> (Decision, Next) {
        match self.algorithm {
            Algorithm::FixedWindow => {
                let period = self.rate.period_micros();
                let window = now - now % period;
                self.fixed(
                    state.as_deref(),
                    now,
                    cost,
                    (window, window + period),
                    force,
                )
            }
            Algorithm::Calendar(c) => self.fixed(state.as_deref(), now, cost, c.window(now), force),
            Algorithm::SlidingWindowCounter => self.counter(state.as_deref(), now, cost, force),
            Algorithm::SlidingWindowLog => return self.log(state, now, cost, force),
            Algorithm::Gcra => self.gcra(state.as_deref(), now, cost, force),
        }
        .map_next()
    }

    /// Applies what an allowed call keeps to its key's state.
    pub fn keep(&self, state: &mut Option<State>, next: Next) {
        match next {
            Next::State(s) => *state = Some(s),
            Next::Log { at, cost } => match state {
                Some(State::Log { entries, used }) => {
                    *used = used.saturating_add(cost);
                    let grain = self.rate.period_micros() / LOG_GRAIN;
                    match entries.back_mut() {
                        Some(newest) if at.saturating_sub(newest.0) < grain => {
                            newest.0 = newest.0.max(at);
                            newest.1 = newest.1.saturating_add(cost);
                        }
                        _ => entries.push_back((at, cost)),
                    }
                }
                _ => {
                    *state = Some(State::Log {
                        entries: VecDeque::from([(at, cost)]),
                        used: cost,
                    })
                }
            },
        }
    }

    /// How long a key's state matters: after this long without calls it is
    /// the same as no state (for expiry in the stores).
    pub fn ttl_micros(&self) -> u64 {
        match self.algorithm {
            Algorithm::SlidingWindowCounter => 2 * self.rate.period_micros(),
            Algorithm::Calendar(c) => c.longest_micros(),
            Algorithm::Gcra => self
                .rate
                .emission_interval_micros()
                .saturating_mul(self.capacity()),
            _ => self.rate.period_micros(),
        }
    }

    /// A fixed window: `(window, end)` is the one `now` is in. `force`: the
    /// cost is taken whether or not it fits (a charge), in this and the
    /// other algorithms.
    fn fixed(
        &self,
        state: Option<&State>,
        now: u64,
        cost: u64,
        (window, end): (u64, u64),
        force: bool,
    ) -> (Decision, State) {
        let limit = self.rate.limit;
        let count = match state {
            Some(State::Fixed { window: w, count }) if *w == window => *count,
            _ => 0,
        };
        let reset = end - now;
        let allowed = force || count.saturating_add(cost) <= limit;
        // A charge past the limit fills the window: counting further would
        // change nothing in it.
        let count = if allowed {
            count.saturating_add(cost).min(limit.max(count))
        } else {
            count
        };
        (
            Decision {
                allowed,
                limit,
                remaining: limit.saturating_sub(count),
                reset_micros: reset,
                retry_after_micros: if allowed { 0 } else { reset },
            },
            State::Fixed { window, count },
        )
    }

    fn counter(
        &self,
        state: Option<&State>,
        now: u64,
        cost: u64,
        force: bool,
    ) -> (Decision, State) {
        let period = self.rate.period_micros();
        let limit = self.rate.limit;
        let window = now - now % period;
        let (current, previous) = match state {
            Some(State::Counter {
                window: w,
                current,
                previous,
            }) if *w == window => (*current, *previous),
            Some(State::Counter {
                window: w, current, ..
            }) if *w + period == window => (0, *current),
            _ => (0, 0),
        };
        let elapsed = now - window;
        // The previous window's count weighted by the share of it the
        // sliding window still covers, rounded down, as Cloudflare's and
        // Upstash's counters do: a fraction of a call holds no room. Kept
        // exact, the fraction left at a window's last call refused it under
        // steady load (48 a window of 50), and a limit of 1 admitted one
        // call every other window. The price: just after a window's edge
        // the weight is one short, so a call the previous window's last
        // moments would have refused may pass (sliding_window_log is exact).
        let carried =
            (u128::from(previous) * u128::from(period - elapsed) / u128::from(period)) as u64;
        let allowed = force || carried.saturating_add(current).saturating_add(cost) <= limit;
        // A charge past the limit fills the window, no further: the next
        // window weighs at most a full one (and the scripts' products stay
        // below 2^53).
        let current = if allowed {
            current.saturating_add(cost).min(limit.max(current))
        } else {
            current
        };
        let remaining = limit.saturating_sub(carried.saturating_add(current));
        let reset = window + period - now;
        let retry = if allowed {
            0
        } else if current.saturating_add(cost) <= limit && previous > 0 {
            // Wait until enough of the previous window has slid out: the
            // first elapsed' with floor(previous * (period - elapsed') /
            // period) <= room, i.e. elapsed' > period - (room + 1) * period
            // / previous.
            let room = u128::from(limit - (current + cost));
            let keep = ((room + 1) * u128::from(period)).div_ceil(u128::from(previous));
            let at = (u128::from(period) + 1).saturating_sub(keep);
            (at as u64).saturating_sub(elapsed).max(1)
        } else {
            reset
                + if previous > 0 || current > 0 {
                    period / 2
                } else {
                    0
                }
        };
        (
            Decision {
                allowed,
                limit,
                remaining,
                reset_micros: reset,
                retry_after_micros: retry,
            },
            State::Counter {
                window,
                current,
                previous,
            },
        )
    }

    fn log(&self, state: Option<&mut State>, now: u64, cost: u64, force: bool) -> (Decision, Next) {
        let period = self.rate.period_micros();
        let limit = self.rate.limit;
        let mut none = VecDeque::new();
        let mut zero = 0;
        let (entries, used) = match state {
            Some(State::Log { entries, used }) => (entries, used),
            _ => (&mut none, &mut zero),
        };
        while let Some(&(t, c)) = entries.front() {
            if t + period > now {
                break;
            }
            entries.pop_front();
            *used = used.saturating_sub(c);
        }
        let used = *used;
        let allowed = force || used.saturating_add(cost) <= limit;
        let retry = if allowed {
            0
        } else if cost > limit {
            period
        } else {
            // The earliest time enough old admissions have left the window.
            let mut freed = 0;
            let mut at = now + period;
            for (t, c) in entries.iter() {
                freed += c;
                if (used - freed).saturating_add(cost) <= limit {
                    at = t + period;
                    break;
                }
            }
            at - now
        };
        let oldest = entries.front().map(|(t, _)| *t);
        let used = if allowed {
            used.saturating_add(cost)
        } else {
            used
        };
        let reset = match (oldest, allowed) {
            (Some(t), _) => t + period - now,
            (None, true) => period,
            (None, false) => 0,
        };
        (
            Decision {
                allowed,
                limit,
                remaining: limit.saturating_sub(used),
                reset_micros: reset,
                retry_after_micros: retry,
            },
            Next::Log { at: now, cost },
        )
    }

    fn gcra(&self, state: Option<&State>, now: u64, cost: u64, force: bool) -> (Decision, State) {
        let t = self.rate.emission_interval_micros();
        let capacity = self.capacity();
        let tau = t.saturating_mul(capacity);
        let tat = match state {
            Some(State::Gcra { tat }) => (*tat).max(now),
            _ => now,
        };
        let new_tat = tat.saturating_add(t.saturating_mul(cost));
        let allow_at = new_tat.saturating_sub(tau);
        let allowed = force || (now >= allow_at && cost <= capacity);
        let kept = if allowed { new_tat } else { tat };
        let remaining = (now + tau).saturating_sub(kept) / t;
        (
            Decision {
                allowed,
                limit: capacity,
                remaining,
                reset_micros: kept - now,
                retry_after_micros: if allowed {
                    0
                } else if cost > capacity {
                    tau
                } else {
                    allow_at - now
                },
            },
            State::Gcra { tat: kept },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::behaviour::{behaviour_table, cases, check_step, params, ALIGNED_START, S};
    use crate::limit::check::Use;

    #[test]
    fn the_pure_algorithms_pass_the_table() {
        // Each case from no state; a step that passes keeps its state.
        let mut states: Vec<Option<State>> = vec![None; cases().len()];
        behaviour_table!(|n, case, step| {
            let state = &mut states[n];
            let now = ALIGNED_START + step.at;
            let (d, next) = match step.mode {
                Use::Charge => case.params.charge(state.as_mut(), now, step.cost),
                Use::Take | Use::Peek => case.params.decide(state.as_mut(), now, step.cost),
            };
            if d.allowed && step.mode != Use::Peek {
                case.params.keep(state, next);
            }
            d
        });
    }

    #[test]
    fn calendar_windows_tile_time_and_start_where_the_calendar_does() {
        let day = DAY_MICROS;
        // 1970 to 2100, a month at a time: each starts on the 1st where the
        // previous ended, and is 28 to 31 days long.
        let mut at = 0;
        for _ in 0..(130 * 12) {
            let (start, end) = Calendar::Month.window(at + day / 2);
            assert_eq!(start, at);
            assert_eq!(civil_from_days(start / day).2, 1);
            assert!((28..=31).contains(&((end - start) / day)));
            at = end;
        }
        assert_eq!(civil_from_days(at / day), (2100, 1, 1));
        // 2024-02-29 00:00 UTC is in February 2024, which has 29 days.
        let leap = 1_709_164_800 * 1_000_000;
        let (start, end) = Calendar::Month.window(leap);
        assert_eq!(
            (civil_from_days(start / day), (end - start) / day),
            ((2024, 2, 1), 29)
        );
        // Weeks begin on Monday: 2024-01-01 was one; so was 1969-12-29.
        let monday = 1_704_067_200 * 1_000_000;
        for d in 0..7 {
            assert_eq!(
                Calendar::Week.window(monday + d * day + 5),
                (monday, monday + 7 * day)
            );
        }
        assert_eq!(
            Calendar::Day.window(monday + day + 1),
            (monday + day, monday + 2 * day)
        );
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
