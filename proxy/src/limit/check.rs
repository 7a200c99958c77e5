//! What a limit store is asked and answers, whatever the store: one
//! [`Check`] per limit of a call (its key, hashed once, and parameters),
//! one [`Answer`] back.

use super::algorithm::{Decision, Params};

/// One limit of a call, as the store sees it.
#[derive(Debug, Clone)]
pub struct Check {
    /// The full key (route, limit, values).
    pub key: String,
    /// The key's hash (shard choice), computed once.
    pub hash: u64,
    /// Redis Cluster hash tag: the key's own hash (tests may set others).
    pub tag: u64,
    /// The limit's parameters for this key.
    pub params: Params,
    /// Units the call costs.
    pub cost: u64,
    /// Shadow: decided and reported, never blocks the others' commit.
    pub shadow: bool,
    /// What the check does with the key's state.
    pub mode: Use,
}

/// What a check does with its key's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Use {
    /// Takes the cost if it fits (and the call's other limits allow it):
    /// a call's check.
    Take,
    /// Only asks whether the cost would fit, keeping nothing: a limit
    /// charged after the call, asked before it.
    Peek,
    /// Takes the cost whether or not it fits and never refuses: the
    /// charge of a call that has ended (the key may go over its limit and
    /// refuse until enough has left its window).
    Charge,
}

impl Check {
    /// A check of `key`, hashed once here; its Cluster tag is its own hash
    /// until the caller sets one shared by the call.
    pub fn new(key: String, params: Params, cost: u64, shadow: bool) -> Check {
        let hash = fnv1a(key.as_bytes());
        Check {
            key,
            hash,
            tag: hash,
            params,
            cost,
            shadow,
            mode: Use::Take,
        }
    }

    /// This check as one replica of `replicas` counts it alone: its share
    /// of the limit, under a key of its own (the `local` failure mode).
    pub fn local_share(&self, replicas: u64) -> Check {
        let mut params = self.params;
        params.rate.limit = (params.rate.limit / replicas).max(1);
        if let Some(b) = params.burst {
            params.burst = Some((b / replicas).max(1));
        }
        Check::new(
            format!("local\u{1f}{}", self.key),
            params,
            self.cost,
            self.shadow,
        )
        .with_mode(self.mode)
    }

    /// The same check, used as `mode` says.
    pub fn with_mode(mut self, mode: Use) -> Check {
        self.mode = mode;
        self
    }
}

/// What the store answered for one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The algorithm's decision.
    Decided(Decision),
    /// The store is full of other keys: the call was not counted here.
    OverCapacity,
}

/// FNV-1a: a stable hash for shard choice and for shortening long keys.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
