//! The in-process limit store: each replica counts on its own. State is
//! kept per key in sharded maps; a call's limits are decided under their
//! shards' locks and committed only if none rejects.

use std::sync::{Arc, MutexGuard};

use tokio::time::Instant;

use super::algorithm::{Decision, Next, State};
use super::check::{Answer, Check, Use};
use super::shards::{Expiring, Shard, Shards};

type Map = Shard<Arc<str>, Entry>;

struct Entry {
    state: State,
    expires: u64,
}

impl Expiring for Entry {
    fn expires(&self) -> u64 {
        self.expires
    }
}

/// In-process limit state.
pub(crate) struct MemoryStore {
    shards: Shards<Arc<str>, Entry>,
    epoch: Instant,
    /// Unix time at `epoch`, in µs: calendar windows need the real date.
    unix_at_epoch: u64,
    /// A clock the caller sets instead (µs of Unix time): `tollgate test`
    /// steps through a timeline with it.
    clock: Option<Arc<std::sync::atomic::AtomicU64>>,
}

// === impl MemoryStore ===

impl MemoryStore {
    /// A store keeping at most about `max_keys` keys.
    pub(crate) fn new(max_keys: usize) -> Self {
        MemoryStore {
            shards: Shards::new(max_keys),
            epoch: Instant::now(),
            unix_at_epoch: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            clock: None,
        }
    }

    /// A store whose time is what `clock` holds (µs of Unix time).
    pub(crate) fn with_clock(max_keys: usize, clock: Arc<std::sync::atomic::AtomicU64>) -> Self {
        MemoryStore {
            clock: Some(clock),
            ..MemoryStore::new(max_keys)
        }
    }

    /// Changes the bound on keys (a reload).
    pub(crate) fn set_max_keys(&self, max_keys: usize) {
        self.shards.set_max_keys(max_keys);
    }

    /// Now, in microseconds of Unix time as it was when the store was made,
    /// advanced by a monotonic clock (tokio's, so tests can pause and
    /// advance it): a step of the wall clock never moves a window.
    pub(crate) fn now(&self) -> u64 {
        if let Some(c) = &self.clock {
            return c.load(std::sync::atomic::Ordering::Relaxed);
        }
        self.unix_at_epoch + self.epoch.elapsed().as_micros() as u64
    }

    /// Decides every check at once; commits the new states only if no
    /// non-shadow check rejects (a peek commits nothing, a charge never
    /// rejects).
    pub(crate) fn decide(&self, checks: &[Check]) -> Vec<Answer> {
        self.decide_at(checks, self.now())
    }

    /// [`decide`](Self::decide) at a given time (µs on this store's clock;
    /// tests step through cases with it).
    pub(crate) fn decide_at(&self, checks: &[Check], now: u64) -> Vec<Answer> {
        if let [c] = checks {
            return vec![self.decide_one(c, now)];
        }
        let mut shard_ids: Vec<usize> = checks
            .iter()
            .map(|c| Shards::<Arc<str>, Entry>::index(c.hash))
            .collect();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        // Locks in index order: two calls cannot deadlock.
        let mut guards: Vec<(usize, MutexGuard<'_, Map>)> = shard_ids
            .iter()
            .filter_map(|&i| self.shards.lock(i).map(|g| (i, g)))
            .collect();
        let mut answers = Vec::with_capacity(checks.len());
        let mut next_states = Vec::with_capacity(checks.len());
        let mut commit = true;
        for c in checks {
            let i = Shards::<Arc<str>, Entry>::index(c.hash);
            let decided = guards
                .iter_mut()
                .find(|(j, _)| *j == i)
                .and_then(|(_, map)| self.decide_in(map, c, now));
            let Some((d, next)) = decided else {
                answers.push(Answer::OverCapacity);
                next_states.push(None);
                continue;
            };
            if !d.allowed && !c.shadow {
                commit = false;
            }
            answers.push(Answer::Decided(d));
            next_states.push((d.allowed && c.mode != Use::Peek).then_some(next));
        }
        if commit {
            for (c, next) in checks.iter().zip(next_states) {
                let Some(next) = next else { continue };
                let i = Shards::<Arc<str>, Entry>::index(c.hash);
                if let Some((_, map)) = guards.iter_mut().find(|(j, _)| *j == i) {
                    store(map, c, next, now);
                }
            }
        }
        answers
    }

    /// One limit: one lock, no bookkeeping for the others.
    fn decide_one(&self, c: &Check, now: u64) -> Answer {
        let Some(mut map) = self.shards.lock(Shards::<Arc<str>, Entry>::index(c.hash)) else {
            return Answer::OverCapacity;
        };
        match self.decide_in(&mut map, c, now) {
            Some((d, next)) => {
                if d.allowed && c.mode != Use::Peek {
                    store(&mut map, c, next, now);
                }
                Answer::Decided(d)
            }
            None => Answer::OverCapacity,
        }
    }

    /// The decision for `c` in its (locked) shard, and what to keep if
    /// the call goes on; `None` when the shard has no room for a new key.
    fn decide_in(&self, map: &mut Map, c: &Check, now: u64) -> Option<(Decision, Next)> {
        if !self.shards.room_for(map, c.key.as_str(), now) {
            return None;
        }
        let current = map
            .get_mut(c.key.as_str())
            .filter(|e| e.expires > now)
            .map(|e| &mut e.state);
        Some(match c.mode {
            Use::Take | Use::Peek => c.params.decide(current, now, c.cost),
            Use::Charge => c.params.charge(current, now, c.cost),
        })
    }
}

/// Keeps what an allowed call leaves: the key's state, changed in place
/// (a sliding log is moved, never copied).
fn store(map: &mut Map, c: &Check, next: Next, now: u64) {
    let mut state = map
        .get_mut(c.key.as_str())
        .filter(|e| e.expires > now)
        .map(|e| std::mem::replace(&mut e.state, State::Gcra { tat: 0 }));
    c.params.keep(&mut state, next);
    let Some(state) = state else { return };
    // A GCRA key charged past its burst owes more than its usual lifetime.
    let ttl = match &state {
        State::Gcra { tat } => c.params.ttl_micros().max(tat.saturating_sub(now)),
        _ => c.params.ttl_micros(),
    };
    let expires = now.saturating_add(ttl);
    map.put(
        c.key.as_str(),
        || Arc::from(c.key.as_str()),
        Entry { state, expires },
        now,
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Rate;
    use crate::limit::algorithm::{Algorithm, Params};
    use crate::limit::behaviour::{behaviour_table, cases, check_step, ALIGNED_START};

    #[test]
    fn the_memory_store_passes_the_table() {
        let store = MemoryStore::new(10_000);
        behaviour_table!(|n, case, step| {
            let check =
                Check::new(format!("case-{n}"), case.params, step.cost, false).with_mode(step.mode);
            match store.decide_at(&[check], ALIGNED_START + step.at)[0] {
                Answer::Decided(d) => d,
                Answer::OverCapacity => panic!("over capacity"),
            }
        });
    }

    fn check(key: &str, limit: u64, shadow: bool) -> Check {
        Check::new(
            key.into(),
            Params {
                rate: Rate {
                    limit,
                    period: Duration::from_secs(60),
                },
                burst: None,
                algorithm: Algorithm::FixedWindow,
            },
            1,
            shadow,
        )
    }

    fn allowed(a: &Answer) -> bool {
        matches!(a, Answer::Decided(d) if d.allowed)
    }

    #[test]
    fn a_rejected_call_consumes_no_other_limit() {
        let s = MemoryStore::new(1000);
        let wide = check("wide", 10, false);
        let narrow = check("narrow", 1, false);
        let a = s.decide(&[wide.clone(), narrow.clone()]);
        assert!(a.iter().all(allowed));
        // narrow now rejects: wide must not be charged for these calls.
        for _ in 0..5 {
            let a = s.decide(&[wide.clone(), narrow.clone()]);
            assert!(allowed(&a[0]) && !allowed(&a[1]));
        }
        let a = s.decide(&[wide]);
        match a[0] {
            Answer::Decided(d) => assert_eq!(d.remaining, 8, "only the first call counted"),
            Answer::OverCapacity => panic!(),
        }
    }

    #[test]
    fn a_refused_peek_keeps_the_others_and_a_charge_never_refuses() {
        let s = MemoryStore::new(1000);
        let charged = |mode| check("charged", 2, false).with_mode(mode);
        for _ in 0..3 {
            assert!(allowed(&s.decide(&[charged(Use::Charge)])[0]));
        }
        let wide = check("wide", 10, false);
        let a = s.decide(&[wide.clone(), charged(Use::Peek)]);
        assert!(allowed(&a[0]) && !allowed(&a[1]));
        match s.decide(&[wide])[0] {
            Answer::Decided(d) => assert_eq!(d.remaining, 9, "the refused call took nothing"),
            Answer::OverCapacity => panic!(),
        }
        let peeked = check("peeked", 1, false).with_mode(Use::Peek);
        for _ in 0..3 {
            assert!(
                allowed(&s.decide(std::slice::from_ref(&peeked))[0]),
                "a peek takes nothing"
            );
        }
    }

    #[test]
    fn shadow_limits_never_block_the_others() {
        let s = MemoryStore::new(1000);
        s.decide(&[check("shadow", 1, true)]);
        let a = s.decide(&[check("shadow", 1, true), check("real", 5, false)]);
        assert!(!allowed(&a[0]) && allowed(&a[1]));
    }

    #[test]
    fn the_number_of_keys_is_bounded() {
        let s = MemoryStore::new(16);
        let over = (0..200)
            .map(|i| s.decide(&[check(&format!("k{i}"), 5, false)])[0])
            .filter(|a| *a == Answer::OverCapacity)
            .count();
        assert!(over > 0, "a flood of keys hits the bound");
        let kept = s.shards.len();
        assert!(kept <= 16, "{kept} keys kept");
    }
}
