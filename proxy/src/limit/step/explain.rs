//! What a route's limits make of one call, without asking any store: the
//! key each limit computes (as the store holds it), its rate, algorithm,
//! cost and modes. `tollgate explain` prints it.

use std::fmt::Write as _;

use super::charge::ChargeFrom;
use super::{key, keyed, Compiled, RouteLimits};
use crate::config::{Action, Direction, Scope};
use crate::limit::algorithm::Algorithm;
use crate::limit::CallInfo;

/// One limit of the route, for one call.
pub(crate) struct Report {
    /// Its name.
    pub(crate) name: String,
    /// What it counts: calls, or messages.
    pub(crate) counts: String,
    /// Its rate for this call's key (an override's, if one applies).
    pub(crate) rate: String,
    /// How it counts.
    pub(crate) algorithm: String,
    /// The key, or why the limit does not count this call.
    pub(crate) key: Keyed,
    /// What the call costs (or how it will be charged).
    pub(crate) cost: String,
    /// When Redis cannot answer.
    pub(crate) failure_mode: String,
    /// When the key finds no place.
    pub(crate) over_capacity: String,
    /// Evaluated and counted, never refusing.
    pub(crate) shadow: bool,
    /// The limit does not count this call: a key part or its cost is
    /// missing, and it skips such calls.
    pub(crate) skips: bool,
}

/// A limit's key for a call.
pub(crate) enum Keyed {
    /// Counted under `stored` (the key the store holds); `value` is the
    /// part read from the call; `overridden`: an override's rate applies.
    Key {
        /// The whole key, as the store holds it (hashed when long).
        stored: String,
        /// The values read from the call, joined.
        value: String,
        /// An entry of `overrides` matched the value.
        overridden: bool,
    },
    /// The limit does not count the call (a part is missing, `skip`).
    Skipped,
    /// The call is refused before any store is asked.
    Refused(String),
}

impl RouteLimits {
    /// Every limit of the route, for `call`.
    pub(crate) fn reports(&self, call: &CallInfo<'_>) -> Vec<Report> {
        self.limits.iter().map(|l| report(l, call)).collect()
    }
}

fn report(l: &Compiled, call: &CallInfo<'_>) -> Report {
    let (key, params) = match keyed(l, call) {
        Ok(Some((stored, params))) => {
            // The values again, as written before any hashing of the key.
            let mut value = String::new();
            let _ = key::value(l, call, &mut value);
            (
                Keyed::Key {
                    stored,
                    value,
                    overridden: params != l.params,
                },
                params,
            )
        }
        Ok(None) => (Keyed::Skipped, l.params),
        Err(r) => (
            Keyed::Refused(format!("{}: {}", r.code.name(), r.message)),
            l.params,
        ),
    };
    let counts = match &l.per_message {
        None => "calls".to_owned(),
        Some(m) => {
            let whose = match m.direction {
                Direction::Client => "the client's messages",
                Direction::Server => "the upstream's messages",
            };
            let scope = match m.scope {
                Scope::Stream => "per stream",
                Scope::Key => "per key, across streams",
            };
            let action = match m.action {
                Action::Reject => "over the rate: the stream ends",
                Action::Delay => "over the rate: the next message waits",
            };
            format!("{whose}, {scope}; {action}")
        }
    };
    let mut skips = matches!(key, Keyed::Skipped);
    let cost = match &l.charge {
        Some(c) => {
            let from = match &c.from {
                ChargeFrom::Trailer(h) => format!("trailer {h}"),
                ChargeFrom::Header(h) => format!("header {h}"),
                ChargeFrom::ResponseMessages => "the number of response messages".to_owned(),
            };
            format!(
                "charged when the call ends, from {from} (default {}); before it, a unit must be left",
                c.default
            )
        }
        None => match key::cost(l, call) {
            Ok(Some(n)) => n.to_string(),
            Ok(None) => {
                skips = true;
                "none: the cost is missing and the limit skips the call".to_owned()
            }
            Err(r) => format!("refused: {}: {}", r.code.name(), r.message),
        },
    };
    let mut algorithm = algorithm_name(params.algorithm).to_owned();
    if params.algorithm == Algorithm::Gcra {
        let _ = write!(algorithm, ", burst {}", params.capacity());
    }
    Report {
        name: l.name.clone(),
        counts,
        rate: params.rate.to_string(),
        algorithm,
        key,
        cost,
        failure_mode: format!("{:?}", l.failure_mode).to_lowercase(),
        over_capacity: format!("{:?}", l.over_capacity).to_lowercase(),
        shadow: l.shadow,
        skips,
    }
}

/// An algorithm as the config names it.
pub(super) fn algorithm_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::SlidingWindowLog => "sliding_window_log",
        Algorithm::SlidingWindowCounter => "sliding_window_counter",
        Algorithm::Gcra => "gcra",
        Algorithm::FixedWindow => "fixed_window",
        Algorithm::Calendar(_) => "fixed_window, calendar window",
    }
}
