//! Limits charged after the call (`charge:`). Before the call, such a limit
//! only peeks: is a unit left for the key? (nothing is taken). When the
//! call ends, its cost is charged whether or not it fits: the number the
//! upstream put in a trailer or header, or the count of its response
//! messages. A key charged past its limit refuses the next calls until
//! enough has left its window. Calls in flight at once all pass the peek,
//! so a key can end over its limit by what they cost together: the price
//! of a cost known only afterwards.

use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use prometheus::IntCounter;

use super::Stores;
use crate::config::{FailureMode, OverCapacity};
use crate::limit::check::{Check, Use};

/// Where a limit charged after the call reads its cost.
pub(super) enum ChargeFrom {
    /// A response trailer (or the header of a trailers-only response).
    Trailer(HeaderName),
    /// A response header.
    Header(HeaderName),
    /// The number of messages the upstream sent.
    ResponseMessages,
}

/// A limit's charge, compiled.
pub(super) struct ChargeOf {
    pub(super) from: ChargeFrom,
    /// Charged when the call ends without its number.
    pub(super) default: u64,
    pub(super) failure_mode: FailureMode,
    pub(super) over_capacity: OverCapacity,
    pub(super) counters: ChargeCounters,
}

/// A limit's charge counters (`tollgate_limit_charges_total` by outcome,
/// and the units).
pub(super) struct ChargeCounters {
    pub(super) charged: IntCounter,
    pub(super) defaulted: IntCounter,
    pub(super) failed: IntCounter,
    pub(super) local_fallback: IntCounter,
    pub(super) units: IntCounter,
}

/// One limit's charge of a call, due when it ends.
struct Pending {
    /// The key and parameters the call's peek used; the cost is set when
    /// the call ends.
    check: Check,
    of: Arc<ChargeOf>,
    /// A header source's number, read from the response headers.
    header: Option<u64>,
}

/// The charges of a call that went on, made when it ends: by
/// [`Charges::settle`], or when dropped (the call failed or was cancelled:
/// each limit's default).
pub(crate) struct Charges {
    pending: Vec<Pending>,
    stores: Stores,
    worker: usize,
    replicas: u64,
    /// Set once the call has gone on: a refused call is charged nothing.
    armed: bool,
}

// === impl Charges ===

impl Charges {
    pub(super) fn new(stores: Stores, worker: usize, replicas: u64) -> Self {
        Charges {
            pending: Vec::new(),
            stores,
            worker,
            replicas,
            armed: false,
        }
    }

    pub(super) fn push(
        &mut self,
        key: String,
        params: crate::limit::algorithm::Params,
        shadow: bool,
        of: Arc<ChargeOf>,
    ) {
        let check = Check::new(key, params, 0, shadow).with_mode(Use::Charge);
        self.pending.push(Pending {
            check,
            of,
            header: None,
        });
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The call has gone on: it is charged when it ends.
    pub(crate) fn arm(&mut self) {
        self.armed = true;
    }

    /// Reads the numbers of limits charged from a response header.
    pub(crate) fn response_headers(&mut self, headers: &HeaderMap) {
        for p in &mut self.pending {
            if let ChargeFrom::Header(name) = &p.of.from {
                p.header = number(headers, name);
            }
        }
    }

    /// The call has ended, with these trailers (`None`: without any) after
    /// `messages` response messages: each limit is charged its cost.
    pub(crate) fn settle(&mut self, trailers: Option<&HeaderMap>, messages: u64) {
        if !std::mem::take(&mut self.armed) {
            return;
        }
        let mut checks = Vec::with_capacity(self.pending.len());
        let mut of = Vec::with_capacity(self.pending.len());
        for p in self.pending.drain(..) {
            let given = match &p.of.from {
                ChargeFrom::Trailer(name) => trailers.and_then(|t| number(t, name)),
                ChargeFrom::Header(_) => p.header,
                ChargeFrom::ResponseMessages => Some(messages),
            };
            let c = &p.of.counters;
            let cost = match given {
                Some(n) => {
                    c.charged.inc();
                    n
                }
                None => {
                    c.defaulted.inc();
                    p.of.default
                }
            };
            // More than the limit holds fills it for a whole period: the
            // stores count no further (and the scripts' doubles stay exact).
            let cost = cost.min(p.check.params.capacity());
            if cost == 0 {
                continue;
            }
            let mut check = p.check;
            check.cost = cost;
            checks.push(check);
            of.push(p.of);
        }
        if checks.is_empty() {
            return;
        }
        let Some(redis) = self.stores.redis.clone() else {
            self.stores.memory.decide(&checks);
            for (c, of) in checks.iter().zip(&of) {
                of.counters.units.inc_by(c.cost);
            }
            return;
        };
        // Charged where the call's peek was decided: a key this replica may
        // not write to Redis was peeked in process (`over_capacity: local`)
        // or not at all.
        let now = redis.key_clock();
        let (mut remote, mut remote_of, mut local) = (Vec::new(), Vec::new(), Vec::new());
        for (c, of) in checks.into_iter().zip(of) {
            if redis.admit(&c, now) {
                remote.push(c);
                remote_of.push(of);
            } else if of.over_capacity == OverCapacity::Local {
                local.push(in_process(&c, self.replicas, &of));
            }
        }
        if !local.is_empty() {
            self.stores.memory.decide(&local);
        }
        if remote.is_empty() {
            return;
        }
        // Told to Redis in the background: the client has its answer.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            for of in &remote_of {
                of.counters.failed.inc();
            }
            return;
        };
        let (memory, worker, replicas) = (self.stores.memory.clone(), self.worker, self.replicas);
        runtime.spawn(async move {
            match redis.decide(worker, remote.clone(), None, false).await {
                Ok(_) => {
                    for (c, of) in remote.iter().zip(&remote_of) {
                        of.counters.units.inc_by(c.cost);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "a charge after the call did not reach Redis");
                    let mut local = Vec::new();
                    for (c, of) in remote.iter().zip(&remote_of) {
                        if of.failure_mode == FailureMode::Local {
                            local.push(in_process(c, replicas, of));
                        } else {
                            of.counters.failed.inc();
                        }
                    }
                    if !local.is_empty() {
                        memory.decide(&local);
                    }
                }
            }
        });
    }
}

/// `c` charged in process instead of Redis: this replica's share of the
/// limit, the cost at most what that share holds.
fn in_process(c: &Check, replicas: u64, of: &ChargeOf) -> Check {
    of.counters.local_fallback.inc();
    let mut local = c.local_share(replicas);
    local.cost = local.cost.min(local.params.capacity());
    of.counters.units.inc_by(local.cost);
    local
}

impl Drop for Charges {
    fn drop(&mut self) {
        // Ended without trailers or messages counted: failed or cancelled.
        self.settle(None, 0);
    }
}

/// The whole number in header `name` (once, digits only), if any.
fn number(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    let mut values = headers.get_all(name).iter();
    let v = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let v = v.to_str().ok()?.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Too many digits for a u64: more than any limit holds.
    Some(v.parse().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_is_a_whole_number_given_once() {
        let name = HeaderName::from_static("x-cost");
        let mut h = HeaderMap::new();
        assert_eq!(number(&h, &name), None);
        for (v, want) in [
            ("7", Some(7)),
            (" 12 ", Some(12)),
            ("0", Some(0)),
            ("99999999999999999999999", Some(u64::MAX)),
            ("-3", None),
            ("+3", None),
            ("1.5", None),
            ("", None),
            ("ten", None),
        ] {
            h.insert(&name, v.parse().unwrap());
            assert_eq!(number(&h, &name), want, "{v:?}");
        }
        h.insert(&name, "1".parse().unwrap());
        h.append(&name, "2".parse().unwrap());
        assert_eq!(number(&h, &name), None, "given twice");
    }
}
