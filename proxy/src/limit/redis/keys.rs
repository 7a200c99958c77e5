//! Redis keys: `prefix:{tag}:key`, each key its own Cluster hash tag, and
//! the bound on the distinct keys one replica writes.

use crate::limit::check::Check;
use crate::limit::shards::Shards;

/// Bounds the distinct keys one replica writes to Redis
/// (`limiter.max_keys`), so a client sending ever new key values cannot
/// fill Redis: a key seen within its lifetime passes, a new one passes
/// while there is room, and beyond that the limit does not count the call
/// (`over_capacity`), as the in-process store does.
pub(super) struct KeyGate {
    pub(super) seen: Shards<u64, u64>,
    epoch: std::time::Instant,
}

impl KeyGate {
    pub(super) fn new(max_keys: usize) -> Self {
        KeyGate {
            seen: Shards::new(max_keys),
            epoch: std::time::Instant::now(),
        }
    }

    /// Microseconds since the gate was made: one reading serves a call.
    pub(super) fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    pub(super) fn admit(&self, hash: u64, ttl_micros: u64, now: u64) -> bool {
        let Some(mut shard) = self.seen.lock(Shards::<u64, u64>::index(hash)) else {
            return false;
        };
        if !self.seen.room_for(&mut shard, &hash, now) {
            return false;
        }
        shard.put(&hash, || hash, now + ttl_micros, now);
        true
    }
}

/// `{tag}`: the Cluster hash tag of a call's keys, 16 hex digits in braces.
pub(super) fn hash_tag(tag: u64) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [b'{'; 18];
    for i in 0..16 {
        t[1 + i] = HEX[((tag >> ((15 - i) * 4)) & 0xf) as usize];
    }
    t[17] = b'}';
    t
}

/// Writes the Redis key of `check` to `out`: `prefix:{tag}:key`, the tag
/// being the key's own (its slot stays the same whatever else its route
/// limits).
pub(super) fn write_key(out: &mut Vec<u8>, prefix: &str, check: &Check) {
    out.extend_from_slice(prefix.as_bytes());
    out.push(b':');
    out.extend_from_slice(&hash_tag(check.tag));
    out.push(b':');
    out.extend_from_slice(check.key.as_bytes());
}

#[cfg(test)]
mod tests {
    use redis::cluster_routing::Slot;

    use super::*;
    use crate::config::Rate;
    use crate::limit::algorithm::{Algorithm, Params};

    #[test]
    fn keys_carry_the_calls_hash_tag_and_its_slot() {
        let params = Params {
            rate: Rate::parse("10/s").unwrap_or_else(|e| panic!("{e}")),
            burst: None,
            algorithm: Algorithm::Gcra,
        };
        let mut c = Check::new(
            "route\u{1f}per-client\u{1f}Gcra\u{1f}m-1".into(),
            params,
            1,
            false,
        );
        c.tag = 0xab;
        let mut key = Vec::new();
        write_key(&mut key, "tollgate", &c);
        assert_eq!(
            String::from_utf8_lossy(&key),
            "tollgate:{00000000000000ab}:route\u{1f}per-client\u{1f}Gcra\u{1f}m-1"
        );
        // The slot of the key is the slot of its tag alone.
        assert_eq!(Slot::for_key(&key), Slot::for_key(hash_tag(c.tag)));
    }
}
