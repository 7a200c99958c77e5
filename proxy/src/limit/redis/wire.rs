//! The wire format of a batch: the `EVALSHA` of decide.lua (or
//! refund.lua) and the numbers it answers. The contract is written at the
//! top of each script.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use super::batcher::{Kind, Request};
use super::keys::write_key;
use super::Inner;
use crate::limit::algorithm::{Algorithm, Calendar, Decision, Params};
use crate::limit::check::{Check, Use};

/// Identity hasher for keys already hashed ([`Check::hash`]).
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A check's key, hashed once: equal keys are sent once per batch.
struct KeyRef<'a>(&'a Check);

impl std::hash::Hash for KeyRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(self.0.hash ^ self.0.tag);
    }
}

impl PartialEq for KeyRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.tag == other.0.tag && self.0.key == other.0.key
    }
}

impl Eq for KeyRef<'_> {}

/// The `EVALSHA` of a group (see the contract at the top of decide.lua):
/// each key once, limit definitions once, then the calls referring to them.
pub(super) fn command(inner: &Inner, group: &[Request]) -> redis::Cmd {
    let limits: usize = group.iter().map(|r| r.checks.len()).sum();
    let mut keys: HashMap<KeyRef<'_>, usize, BuildHasherDefault<Prehashed>> =
        HashMap::with_capacity_and_hasher(limits, Default::default());
    let mut unique: Vec<&Check> = Vec::new();
    // Each definition with its flags (shadow, peek, charge).
    let mut defs: Vec<(Params, u64)> = Vec::new();
    // Per limit of every call: its key and definition (1-based).
    let mut refs: Vec<(usize, usize)> = Vec::with_capacity(limits);
    for r in group {
        for c in &r.checks {
            let k = *keys.entry(KeyRef(c)).or_insert_with(|| {
                unique.push(c);
                unique.len()
            });
            let def = (c.params, flags(c));
            let d = match defs.iter().position(|d| *d == def) {
                Some(d) => d + 1,
                None => {
                    defs.push(def);
                    defs.len()
                }
            };
            refs.push((k, d));
        }
    }
    // ARGV[2]: every number, as one MessagePack array. Redis turns it into
    // one Lua table of numbers in one C call, where separate arguments cost
    // an object in Redis, a Lua string and a `tonumber` each.
    let count = 2 + 7 * defs.len() + unique.len() + 2 * group.len() + 3 * limits;
    let mut numbers = Vec::with_capacity(5 + 9 * count);
    msgpack::array(&mut numbers, count);
    msgpack::uint(&mut numbers, defs.len() as u64);
    for (p, flags) in &defs {
        for n in [
            script_algorithm(p.algorithm),
            p.rate.limit,
            p.rate.period_micros(),
            p.capacity(),
            p.rate.emission_interval_micros(),
            p.ttl_micros(),
            *flags,
        ] {
            msgpack::uint(&mut numbers, n);
        }
    }
    // A key belongs to one algorithm (it is part of the key): the script
    // reads the batch's states knowing each key's, without a pass over the
    // calls.
    for c in &unique {
        let shape = match c.params.algorithm {
            Algorithm::Calendar(_) => FIXED_WINDOW,
            a => script_algorithm(a),
        };
        msgpack::uint(&mut numbers, shape);
    }
    msgpack::uint(&mut numbers, group.len() as u64);
    let mut refs = refs.into_iter();
    for r in group {
        msgpack::uint(&mut numbers, r.checks.len() as u64);
        msgpack::uint(&mut numbers, u64::from(r.details));
        for (c, (k, d)) in r.checks.iter().zip(refs.by_ref()) {
            msgpack::uint(&mut numbers, k as u64);
            msgpack::uint(&mut numbers, d as u64);
            // Lua reads integers above 2^63 as negative (and is exact only
            // below 2^53): any cost above the capacity is refused alike, so
            // one more than the capacity stands for them all; a charge
            // counts at most the capacity.
            let most = match c.mode {
                Use::Charge => c.params.capacity(),
                Use::Take | Use::Peek => c.params.capacity().saturating_add(1),
            };
            msgpack::uint(&mut numbers, c.cost.min(most));
        }
    }
    let mut cmd = redis::Cmd::with_capacity(5 + unique.len(), 64 * unique.len() + numbers.len());
    cmd.arg("EVALSHA")
        .arg(inner.script.get_hash())
        .arg(unique.len());
    let mut key = Vec::with_capacity(128);
    for c in &unique {
        key.clear();
        write_key(&mut key, &inner.prefix, c);
        cmd.arg(&key[..]);
    }
    match group[0].now {
        Some(n) => cmd.arg(n),
        None => cmd.arg(""),
    };
    cmd.arg(numbers);
    cmd
}

/// A check's flags on the wire: 1 shadow, plus 2 peek or 4 charge.
fn flags(c: &Check) -> u64 {
    u64::from(c.shadow)
        + match c.mode {
            Use::Take => 0,
            Use::Peek => 2,
            Use::Charge => 4,
        }
}

/// The algorithms' numbers on the wire, as both scripts name them
/// (`FIXED_WINDOW, SLIDING_COUNTER, SLIDING_LOG = 1, 2, 3`; GCRA is their
/// last branch).
const FIXED_WINDOW: u64 = 1;
const SLIDING_COUNTER: u64 = 2;
const SLIDING_LOG: u64 = 3;
const GCRA: u64 = 4;
/// Calendar windows (`CALENDAR_DAY, CALENDAR_WEEK, CALENDAR_MONTH`).
const CALENDAR_DAY: u64 = 5;
const CALENDAR_WEEK: u64 = 6;
const CALENDAR_MONTH: u64 = 7;

/// An algorithm as the scripts number it.
fn script_algorithm(a: Algorithm) -> u64 {
    match a {
        Algorithm::FixedWindow => FIXED_WINDOW,
        Algorithm::Calendar(Calendar::Day) => CALENDAR_DAY,
        Algorithm::Calendar(Calendar::Week) => CALENDAR_WEEK,
        Algorithm::Calendar(Calendar::Month) => CALENDAR_MONTH,
        Algorithm::SlidingWindowCounter => SLIDING_COUNTER,
        Algorithm::SlidingWindowLog => SLIDING_LOG,
        Algorithm::Gcra => GCRA,
    }
}

/// The two MessagePack forms the script's numbers need (spec:
/// github.com/msgpack/msgpack/blob/master/spec.md), each in its shortest
/// encoding, as Redis's `cmsgpack.unpack` reads them.
mod msgpack {
    /// An array header for `len` elements.
    pub(super) fn array(out: &mut Vec<u8>, len: usize) {
        if len < 16 {
            out.push(0x90 | len as u8);
        } else if let Ok(n) = u16::try_from(len) {
            out.push(0xdc);
            out.extend_from_slice(&n.to_be_bytes());
        } else {
            // A batch holds far fewer than 2^32 numbers.
            out.push(0xdd);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }

    /// An unsigned integer.
    pub(super) fn uint(out: &mut Vec<u8>, n: u64) {
        if n < 0x80 {
            out.push(n as u8);
        } else if let Ok(n) = u8::try_from(n) {
            out.extend_from_slice(&[0xcc, n]);
        } else if let Ok(n) = u16::try_from(n) {
            out.push(0xcd);
            out.extend_from_slice(&n.to_be_bytes());
        } else if let Ok(n) = u32::try_from(n) {
            out.push(0xce);
            out.extend_from_slice(&n.to_be_bytes());
        } else {
            out.push(0xcf);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// The `EVALSHA` of a group of refunds (contract at the top of
/// refund.lua): every request of the group names the same decision time.
pub(super) fn refund_command(inner: &Inner, group: &[Request]) -> redis::Cmd {
    let checks: Vec<&Check> = group.iter().flat_map(|r| &r.checks).collect();
    let mut numbers = Vec::with_capacity(5 + 9 * 4 * checks.len());
    msgpack::array(&mut numbers, 4 * checks.len());
    for c in &checks {
        let p = &c.params;
        for n in [
            script_algorithm(p.algorithm),
            p.rate.period_micros(),
            p.rate.emission_interval_micros(),
            c.cost.min(p.capacity()),
        ] {
            msgpack::uint(&mut numbers, n);
        }
    }
    let mut cmd = redis::Cmd::new();
    cmd.arg("EVALSHA")
        .arg(inner.refund.get_hash())
        .arg(checks.len());
    let mut key = Vec::with_capacity(128);
    for c in &checks {
        key.clear();
        write_key(&mut key, &inner.prefix, c);
        cmd.arg(&key[..]);
    }
    cmd.arg(group[0].now.unwrap_or(0)).arg(numbers);
    cmd
}

/// The decision script's numbers: the time it decided at, then each
/// call's decisions: -1 for a call every limit allows (figures not
/// wanted), else five numbers per limit. A refund answers one number.
pub(super) fn split(
    numbers: &[i64],
    group: &[Request],
) -> Result<(u64, Vec<Vec<Decision>>), String> {
    let Some((&decided_at, numbers)) = numbers.split_first() else {
        return Err("the script returned nothing".into());
    };
    let decided_at = u64::try_from(decided_at).unwrap_or(0);
    if group[0].kind == Kind::Refund {
        return Ok((decided_at, group.iter().map(|_| Vec::new()).collect()));
    }
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let too_few = || {
        format!(
            "the decision script returned {} numbers: too few for the batch",
            numbers.len()
        )
    };
    let mut at = 0;
    let mut out = Vec::with_capacity(group.len());
    for r in group {
        let limits = r.checks.len();
        match numbers.get(at) {
            Some(-1) => {
                at += 1;
                let allowed = Decision {
                    allowed: true,
                    limit: 0,
                    remaining: 0,
                    reset_micros: 0,
                    retry_after_micros: 0,
                };
                out.push(vec![allowed; limits]);
            }
            Some(_) => {
                let figures = numbers.get(at..at + 5 * limits).ok_or_else(too_few)?;
                at += 5 * limits;
                out.push(
                    figures
                        .chunks_exact(5)
                        .map(|d| Decision {
                            allowed: d[0] == 1,
                            limit: n(d[1]),
                            remaining: n(d[2]),
                            reset_micros: n(d[3]),
                            retry_after_micros: n(d[4]),
                        })
                        .collect(),
                );
            }
            None => return Err(too_few()),
        }
    }
    if at != numbers.len() {
        return Err(format!(
            "the decision script returned {} numbers, {} more than the batch",
            numbers.len(),
            numbers.len() - at
        ));
    }
    Ok((decided_at, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_go_to_redis_in_the_shortest_messagepack_form() {
        let written = |write: &dyn Fn(&mut Vec<u8>)| {
            let mut out = Vec::new();
            write(&mut out);
            out
        };
        let encode = |n: u64| written(&|out| msgpack::uint(out, n));
        assert_eq!(encode(0), [0x00]);
        assert_eq!(encode(127), [0x7f]);
        assert_eq!(encode(128), [0xcc, 0x80]);
        assert_eq!(encode(255), [0xcc, 0xff]);
        assert_eq!(encode(256), [0xcd, 0x01, 0x00]);
        assert_eq!(encode(65_536), [0xce, 0x00, 0x01, 0x00, 0x00]);
        assert_eq!(
            encode(86_400_000_000),
            [0xcf, 0, 0, 0, 0x14, 0x1d, 0xd7, 0x60, 0x00]
        );
        let header = |len: usize| written(&|out| msgpack::array(out, len));
        assert_eq!(header(0), [0x90]);
        assert_eq!(header(15), [0x9f]);
        assert_eq!(header(16), [0xdc, 0x00, 0x10]);
        assert_eq!(header(70_000), [0xdd, 0x00, 0x01, 0x11, 0x70]);
    }
}
