//! A sharded map of expiring entries holding at most about `max` keys: the
//! in-process limit store keeps states in one, the Redis store the keys it
//! may write.
//!
//! Each shard keeps, beside its map, a min-heap of (expiry, key): whenever
//! the shard is touched, the entries whose time has come are popped and
//! removed. Every push is popped once, so eviction costs O(log n) per
//! insertion, amortised, however full the shard is: a flood of new keys
//! into a full shard costs each call one look at the heap's head, never a
//! walk over the shard. A key refreshed often is pushed again only when its
//! expiry has moved on by an eighth of its lifetime, so the heap holds a few
//! entries per key at most. A full shard with nothing expired has no place
//! for a new key (the caller applies its over-capacity policy).

use std::borrow::Borrow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

const SHARDS: usize = 16;

/// An entry that stops mattering at a time (µs on the owner's clock).
pub(crate) trait Expiring {
    /// When it stops mattering.
    fn expires(&self) -> u64;
}

impl Expiring for u64 {
    fn expires(&self) -> u64 {
        *self
    }
}

/// A value and the expiry it was last queued under.
struct Slot<V> {
    value: V,
    queued: u64,
}

/// One shard: its entries, and when each is due to go.
pub(crate) struct Shard<K, V> {
    map: HashMap<K, Slot<V>>,
    due: BinaryHeap<Reverse<(u64, K)>>,
}

/// Sharded maps with a bound on their keys.
pub(crate) struct Shards<K, V> {
    shards: Vec<Mutex<Shard<K, V>>>,
    /// Keys one shard may hold; a reload may change it.
    max_per_shard: AtomicUsize,
}

impl<K: Eq + Hash + Ord + Clone, V: Expiring> Shards<K, V> {
    /// Room for about `max_keys` keys.
    pub(crate) fn new(max_keys: usize) -> Self {
        Shards {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        due: BinaryHeap::new(),
                    })
                })
                .collect(),
            max_per_shard: AtomicUsize::new(per_shard(max_keys)),
        }
    }

    /// Changes the bound (a reload); a smaller one takes effect as keys
    /// expire.
    pub(crate) fn set_max_keys(&self, max_keys: usize) {
        self.max_per_shard
            .store(per_shard(max_keys), Ordering::Relaxed);
    }

    /// The shard of a key's hash.
    pub(crate) fn index(hash: u64) -> usize {
        (hash % SHARDS as u64) as usize
    }

    /// Locks shard `i` (`None` if a panic poisoned it).
    pub(crate) fn lock(&self, i: usize) -> Option<MutexGuard<'_, Shard<K, V>>> {
        self.shards[i].lock().ok()
    }

    /// Whether `key` has, or may take, a place in `shard` (one of these) at
    /// `now`; removes the entries due by then first.
    pub(crate) fn room_for<Q>(&self, shard: &mut Shard<K, V>, key: &Q, now: u64) -> bool
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        shard.expire(now);
        shard.map.len() < self.max_per_shard.load(Ordering::Relaxed) || shard.map.contains_key(key)
    }

    /// Keys held now, across shards (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|m| m.lock().map_or(0, |m| m.map.len()))
            .sum()
    }
}

fn per_shard(max_keys: usize) -> usize {
    max_keys.div_ceil(SHARDS).max(1)
}

impl<K: Eq + Hash + Ord + Clone, V: Expiring> Shard<K, V> {
    /// The value of `key`, if held (tests).
    #[cfg(test)]
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.map.get(key).map(|s| &s.value)
    }

    /// The value of `key`, if held, to change in place (its expiry must
    /// not change: [`Shard::put`] a new value for that).
    pub(crate) fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.map.get_mut(key).map(|s| &mut s.value)
    }

    /// Sets `key`'s value at `now` (`make_key` makes the owned key when it
    /// is new); queues it again when its expiry has moved on by an eighth
    /// of its lifetime or more.
    pub(crate) fn put<Q>(&mut self, key: &Q, make_key: impl FnOnce() -> K, value: V, now: u64)
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let expires = value.expires();
        match self.map.get_mut(key) {
            Some(slot) => {
                slot.value = value;
                let slack = expires.saturating_sub(now) / 8;
                if expires > slot.queued.saturating_add(slack) {
                    slot.queued = expires;
                    self.due.push(Reverse((expires, make_key())));
                }
            }
            None => {
                let k = make_key();
                self.due.push(Reverse((expires, k.clone())));
                self.map.insert(
                    k,
                    Slot {
                        value,
                        queued: expires,
                    },
                );
            }
        }
    }

    /// Removes the entries whose time has come by `now`: pops the heap's
    /// due part; an entry refreshed since it was queued goes back in at its
    /// new expiry, a stale heap entry (queued again later) is dropped.
    fn expire(&mut self, now: u64) {
        while let Some(Reverse((at, _))) = self.due.peek() {
            if *at > now {
                return;
            }
            let Some(Reverse((at, key))) = self.due.pop() else {
                return;
            };
            let Some(slot) = self.map.get_mut(&key) else {
                continue;
            };
            if slot.queued != at {
                continue;
            }
            let expires = slot.value.expires();
            if expires <= now {
                self.map.remove(&key);
            } else {
                slot.queued = expires;
                self.due.push(Reverse((expires, key)));
            }
        }
    }

    /// Entries waiting in the heap (tests).
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.due.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_keys_make_room_and_live_ones_keep_theirs() {
        let s: Shards<u64, u64> = Shards::new(SHARDS * 4);
        let mut shard = s.lock(0).unwrap();
        for k in 0..4u64 {
            assert!(s.room_for(&mut shard, &k, 0));
            shard.put(&k, || k, 100 + k, 0);
        }
        assert!(!s.room_for(&mut shard, &9, 50), "full, nothing expired");
        assert!(s.room_for(&mut shard, &2, 50), "a held key keeps its place");
        // Key 0 expires at 100, key 1 at 101: one new key fits at 100.
        assert!(s.room_for(&mut shard, &9, 100));
        shard.put(&9, || 9, 500, 100);
        assert!(!s.room_for(&mut shard, &10, 100));
        assert!(shard.get(&0).is_none() && shard.get(&3).is_some());
    }

    #[test]
    fn a_key_refreshed_on_every_call_is_queued_a_few_times_per_lifetime() {
        let s: Shards<u64, u64> = Shards::new(SHARDS * 4);
        let mut shard = s.lock(0).unwrap();
        // A lifetime of 1000, refreshed every 1 for 10 lifetimes.
        for now in 0..10_000u64 {
            assert!(s.room_for(&mut shard, &7, now));
            shard.put(&7, || 7, now + 1000, now);
        }
        assert!(
            shard.queued() <= 10,
            "{} heap entries for one key",
            shard.queued()
        );
        // Then silence: it goes when its last expiry passes, not before.
        assert!(s.room_for(&mut shard, &8, 10_500));
        assert!(shard.get(&7).is_some());
        s.room_for(&mut shard, &8, 11_000);
        assert!(shard.get(&7).is_none());
        assert_eq!(shard.queued(), 0);
    }

    #[test]
    fn a_flood_into_a_full_shard_walks_nothing() {
        // 4 live keys fill the shard; 100,000 new keys each cost a look at
        // the heap's head. The heap never grows with refused keys.
        let s: Shards<u64, u64> = Shards::new(SHARDS * 4);
        let mut shard = s.lock(0).unwrap();
        for k in 0..4u64 {
            s.room_for(&mut shard, &k, 0);
            shard.put(&k, || k, 1_000_000, 0);
        }
        for k in 100..100_100u64 {
            assert!(!s.room_for(&mut shard, &k, k));
        }
        assert_eq!(shard.queued(), 4);
    }
}
