//! A key's state as the store in use holds it, changing nothing: the
//! admin server's `/limits` and `tollgate inspect`. The store is asked the
//! way a limit charged after its call is asked before it (a peek), for no
//! units, so the answer is what the next call would see.

use serde_json::{json, Value};

use super::explain::algorithm_name;
use super::{stored_key, Compiled, Part, RouteLimits};
use crate::limit::algorithm::{Algorithm, Decision, Params};
use crate::limit::check::{Answer, Check, Use};
use crate::limit::step::Stores;

/// One limit of a route, as `/limits` lists it.
pub(crate) fn describe(l: &Compiled) -> Value {
    let key: Vec<String> = l.key.iter().map(part_name).collect();
    json!({
        "name": l.name,
        "key": key.join(" / "),
        "rate": l.params.rate.to_string(),
        "algorithm": algorithm_name(l.params.algorithm),
        "counts": if l.per_message.is_some() { "messages" } else { "calls" },
        "shadow": l.shadow,
        "failure_mode": format!("{:?}", l.failure_mode).to_lowercase(),
    })
}

fn part_name(p: &Part) -> String {
    match p {
        Part::Header(h, _) => format!("header {h}"),
        Part::PeerIp(None) => "peer ip".to_owned(),
        Part::PeerIp(Some(m)) => format!("peer ip /{m}"),
        Part::Method => "method".to_owned(),
        Part::Constant(c) => format!("constant {c:?}"),
        Part::TlsIdentity => "tls identity".to_owned(),
        Part::Field(path, _) => format!("field {path}"),
    }
}

/// What to ask the store about one key of one limit.
pub(crate) struct Asked {
    /// The limit's description ([`describe`]).
    limit: Value,
    /// The key's values as the limit reads them from a call, joined by `/`.
    value: String,
    /// The peek: the key as stored, its parameters (an override's, if one
    /// applies), no units.
    check: Check,
    overridden: bool,
    /// Its share of the limit in process, while Redis cannot answer
    /// (`failure_mode: local`).
    local: Option<Check>,
}

impl RouteLimits {
    /// Each limit of the route ([`describe`]).
    pub(crate) fn describe(&self) -> Vec<Value> {
        self.limits.iter().map(describe).collect()
    }

    /// The peek of key `value` of limit `limit`; `Err` says why there is
    /// no such key to look at.
    pub(crate) fn ask(&self, limit: &str, value: &str) -> Result<Asked, String> {
        let Some(l) = self.limits.iter().find(|l| l.name == limit) else {
            let names: Vec<&str> = self.limits.iter().map(|l| l.name.as_str()).collect();
            return Err(format!(
                "the route has no limit {}; its limits: {}",
                crate::config::shown(limit),
                names.join(", ")
            ));
        };
        if l.per_message
            .as_ref()
            .is_some_and(|m| m.scope == crate::config::Scope::Stream)
        {
            return Err(format!(
                "limit {:?} counts each stream's messages in the stream itself: there is no key to look at",
                l.name
            ));
        }
        let mut key = String::with_capacity(l.key_prefix.len() + value.len());
        key.push_str(&l.key_prefix);
        key.push_str(value);
        let (key, params) = stored_key(l, key);
        let check = Check::new(key, params, 0, false).with_mode(Use::Peek);
        let local = (l.failure_mode == crate::config::FailureMode::Local
            && self.stores.redis.is_some())
        .then(|| check.local_share(self.replicas));
        Ok(Asked {
            limit: describe(l),
            value: value.to_owned(),
            overridden: params != l.params,
            check,
            local,
        })
    }
}

/// The key's state from `stores` (`worker`: the Redis batcher to use), as
/// `/limits` answers it; `Err` when Redis could not answer.
pub(crate) async fn state(stores: &Stores, worker: usize, asked: Asked) -> Result<Value, String> {
    let Asked {
        mut limit,
        value,
        check,
        overridden,
        local,
    } = asked;
    let params = check.params;
    if let Some(o) = limit.as_object_mut() {
        o.insert("rate".into(), params.rate.to_string().into());
        if params.algorithm == Algorithm::Gcra {
            o.insert("burst".into(), params.capacity().into());
        }
        o.insert("overridden".into(), overridden.into());
    }
    let (store, now) = match &stores.redis {
        Some(redis) => {
            let decided = match redis.decide(worker, vec![check.clone()], None, true).await {
                Ok(d) => d,
                Err(e) => {
                    let mut why = format!(
                        "Redis did not answer ({e}); the limit takes its failure mode meanwhile"
                    );
                    if let Some(local) = &local {
                        if let Some(Value::Object(f)) = peek_memory(stores, local, &local.params) {
                            let n = |k: &str| f.get(k).and_then(Value::as_u64).unwrap_or(0);
                            why.push_str(&format!(
                                "; this replica's local share: used {} of {}, {} left",
                                n("used"),
                                n("limit"),
                                n("remaining")
                            ));
                        }
                    }
                    return Err(why);
                }
            };
            let now = decided.first().map(|d| figures(d, &params));
            (redis.backend(), now)
        }
        None => ("memory", peek_memory(stores, &check, &params)),
    };
    let mut answer = json!({
        "limit": limit,
        "value": value,
        "key": check.key,
        "store": store,
        "state": now.unwrap_or(Value::Null),
    });
    if let Some(local) = local {
        answer["local_share"] = peek_memory(stores, &local, &local.params).unwrap_or(Value::Null);
    }
    Ok(answer)
}

/// The key's state in process; `None` when the store is full of other keys
/// and would not hold this one.
fn peek_memory(stores: &Stores, check: &Check, params: &Params) -> Option<Value> {
    match stores.memory.decide(std::slice::from_ref(check)).first() {
        Some(Answer::Decided(d)) => Some(figures(d, params)),
        _ => None,
    }
}

/// What a decision for no units says of the key: what is used and left of
/// the limit, and when it is whole again (for GCRA, how far its
/// theoretical arrival time is ahead of now).
fn figures(d: &Decision, params: &Params) -> Value {
    let seconds = |us: u64| us as f64 / 1e6;
    let mut v = json!({
        "limit": d.limit,
        "used": d.limit.saturating_sub(d.remaining),
        "remaining": d.remaining,
        "reset_seconds": seconds(d.reset_micros),
    });
    if params.algorithm == Algorithm::Gcra {
        v["tat_ahead_seconds"] = seconds(d.reset_micros).into();
    }
    v
}
