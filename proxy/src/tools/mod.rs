//! The policy tools: what an operator runs to trust a config before it
//! rolls out, and to look at a running one.
//!
//! ```text
//! convert.rs   tollgate convert envoy-ratelimit: their rules as routes and limits
//! explain.rs   tollgate explain: a call's route, why, and its limits' keys
//! test.rs      tollgate test: timelines of calls and their expected outcomes
//! inspect.rs   tollgate inspect: a key's state, asked of a running tollgate
//! ```

pub(crate) mod convert;
pub(crate) mod explain;
pub(crate) mod inspect;
pub(crate) mod test;

use std::sync::Arc;

use crate::limit::step::Stores;

/// Stores for a tool that decides nothing against the running service: an
/// in-process store of its own, no Redis.
pub(crate) fn offline_stores() -> Stores {
    Stores {
        memory: Arc::new(crate::limit::memory::MemoryStore::new(1_000_000)),
        redis: None,
    }
}
