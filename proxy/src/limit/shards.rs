//! A sharded map of expiring entries holding at most about `max` keys: the
//! in-process limit store keeps states in one, the Redis store the keys it
//! may write. A full shard first drops its expired entries; if it is still
//! full, a new key gets no place (the caller counts it `over_capacity`).

use std::collections::HashMap;
use std::hash::Hash;
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

/// Sharded maps with a bound on their keys.
pub(crate) struct Shards<K, V> {
    maps: Vec<Mutex<HashMap<K, V>>>,
    max_per_shard: usize,
}

impl<K: Eq + Hash, V: Expiring> Shards<K, V> {
    /// Room for about `max_keys` keys.
    pub(crate) fn new(max_keys: usize) -> Self {
        Shards {
            maps: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    /// The shard of a key's hash.
    pub(crate) fn index(hash: u64) -> usize {
        (hash % SHARDS as u64) as usize
    }

    /// Locks shard `i` (`None` if a panic poisoned it).
    pub(crate) fn lock(&self, i: usize) -> Option<MutexGuard<'_, HashMap<K, V>>> {
        self.maps[i].lock().ok()
    }

    /// Whether `key` has, or may take, a place in `map` (one of this
    /// value's shards) at `now`.
    pub(crate) fn room_for(&self, map: &mut HashMap<K, V>, key: &K, now: u64) -> bool {
        if map.len() < self.max_per_shard || map.contains_key(key) {
            return true;
        }
        map.retain(|_, v| v.expires() > now);
        map.len() < self.max_per_shard
    }

    /// Keys held now, across shards (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.maps
            .iter()
            .map(|m| m.lock().map_or(0, |m| m.len()))
            .sum()
    }
}
