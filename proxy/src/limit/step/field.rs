//! Key parts and costs read from the call's first request message: the
//! field's numbers for the call's method, found by walking the wire format
//! (`grpc/fields.rs`), and its value written into the key or read as a
//! cost.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::reply::{invalid_field, schema_pending};
use super::Compiled;
use crate::grpc::fields::{find, WireValue};
use crate::limit::{CallInfo, FirstMessage, Rejection};
use crate::schema::{FieldPath, Kind};

/// A field path, ready for the methods of a route.
pub(crate) enum FieldRef {
    /// The same numbers for every method the route takes (a path of
    /// numbers, or one method).
    One(FieldPath),
    /// Service → method → numbers; a method not there does not have it.
    PerMethod(HashMap<String, HashMap<String, FieldPath>>),
    /// Names whose schema has not been loaded yet (reflection did not
    /// answer): calls are refused with UNAVAILABLE until it is.
    Pending(String),
}

/// A field read from a call.
pub(super) enum Read<'a> {
    /// Its value and how it reads.
    Value(WireValue<'a>, Kind),
    /// Absent (proto3 leaves zero values out), or the message could not
    /// be read (compressed, or none arrived).
    Missing,
}

// === impl FieldRef ===

impl FieldRef {
    /// Reads the field `path` (as written, for messages) of `l` from a call.
    pub(super) fn read<'a>(
        &self,
        l: &Compiled,
        path: &str,
        call: &CallInfo<'a>,
    ) -> Result<Read<'a>, Box<Rejection>> {
        let at = match self {
            FieldRef::One(p) => p,
            FieldRef::PerMethod(m) => match m.get(call.service).and_then(|s| s.get(call.method)) {
                Some(p) => p,
                None => return Ok(Read::Missing),
            },
            FieldRef::Pending(why) => return Err(Box::new(schema_pending(l, why))),
        };
        let FirstMessage::Held(message) = call.message else {
            return Ok(Read::Missing);
        };
        match find(message, &at.numbers) {
            Ok(Some(v)) => {
                if !fits(v, at.kind) {
                    return Err(Box::new(invalid_field(
                        path,
                        &format!(
                            "has the wrong wire type for its declared type; rate limit {:?} reads it",
                            l.name
                        ),
                    )));
                }
                Ok(Read::Value(v, at.kind))
            }
            Ok(None) => Ok(Read::Missing),
            Err(e) => Err(Box::new(invalid_field(
                path,
                &format!("cannot be read: the request message {e}"),
            ))),
        }
    }
}

/// Whether a wire value is what its declared kind is sent as.
fn fits(v: WireValue<'_>, kind: Kind) -> bool {
    match kind {
        Kind::Wire => true,
        Kind::String | Kind::Bytes => matches!(v, WireValue::Len(_)),
        Kind::Int32
        | Kind::Int64
        | Kind::Uint32
        | Kind::Uint64
        | Kind::Sint32
        | Kind::Sint64
        | Kind::Bool => matches!(v, WireValue::Varint(_)),
        Kind::Fixed32 | Kind::SFixed32 | Kind::Float => matches!(v, WireValue::Fixed32(_)),
        Kind::Fixed64 | Kind::SFixed64 | Kind::Double => matches!(v, WireValue::Fixed64(_)),
    }
}

/// Appends a field's value to a key: text as it is, bytes in hex, numbers
/// in decimal as their type reads.
pub(super) fn push(out: &mut String, v: WireValue<'_>, kind: Kind) {
    match (v, kind) {
        (WireValue::Len(b), Kind::Bytes) => {
            for byte in b {
                let _ = write!(out, "{byte:02x}");
            }
        }
        (WireValue::Len(b), _) => match std::str::from_utf8(b) {
            Ok(s) => out.push_str(s),
            Err(_) => out.push_str(&String::from_utf8_lossy(b)),
        },
        (WireValue::Fixed32(n), Kind::Float) => {
            let _ = write!(out, "{}", f32::from_bits(n));
        }
        (WireValue::Fixed64(n), Kind::Double) => {
            let _ = write!(out, "{}", f64::from_bits(n));
        }
        (v, kind) => match integer(v, kind) {
            Some(n) => {
                let _ = write!(out, "{n}");
            }
            None => out.push('?'),
        },
    }
}

/// A field's value as a whole number, as a parser reads its type (32-bit
/// types from the low 32 bits; `Wire`: unsigned); `None` for text, bytes
/// and floating point.
pub(super) fn integer(v: WireValue<'_>, kind: Kind) -> Option<i128> {
    let zigzag32 = |n: u32| i128::from((n >> 1) as i32 ^ -((n & 1) as i32));
    Some(match (v, kind) {
        (WireValue::Varint(n), Kind::Int32) => i128::from(n as u32 as i32),
        (WireValue::Varint(n), Kind::Int64) => i128::from(n as i64),
        (WireValue::Varint(n), Kind::Uint32) => i128::from(n as u32),
        (WireValue::Varint(n), Kind::Sint32) => zigzag32(n as u32),
        (WireValue::Varint(n), Kind::Sint64) => i128::from((n >> 1) as i64 ^ -((n & 1) as i64)),
        (WireValue::Varint(n), Kind::Bool) => i128::from(n != 0),
        (WireValue::Varint(n), Kind::Uint64 | Kind::Wire) => i128::from(n),
        (WireValue::Fixed32(n), Kind::SFixed32) => i128::from(n as i32),
        (WireValue::Fixed32(n), Kind::Fixed32 | Kind::Wire) => i128::from(n),
        (WireValue::Fixed64(n), Kind::SFixed64) => i128::from(n as i64),
        (WireValue::Fixed64(n), Kind::Fixed64 | Kind::Wire) => i128::from(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_as_their_types() {
        let shown = |v, k| {
            let mut s = String::new();
            push(&mut s, v, k);
            s
        };
        assert_eq!(shown(WireValue::Len(b"acc-1"), Kind::String), "acc-1");
        assert_eq!(shown(WireValue::Len(&[0, 0xab]), Kind::Bytes), "00ab");
        assert_eq!(shown(WireValue::Varint(-5i64 as u64), Kind::Int64), "-5");
        assert_eq!(shown(WireValue::Varint(-5i64 as u64), Kind::Int32), "-5");
        // A parser keeps an int32's and a uint32's low 32 bits: so does a
        // key, or 7 + k * 2^32 would be 2^32 budgets for account 7.
        assert_eq!(shown(WireValue::Varint(7 + (3 << 32)), Kind::Uint32), "7");
        assert_eq!(shown(WireValue::Varint(7 + (3 << 32)), Kind::Int32), "7");
        assert_eq!(shown(WireValue::Varint(2), Kind::Bool), "1");
        assert_eq!(
            shown(WireValue::Varint(-5i64 as u64), Kind::Wire),
            "18446744073709551611"
        );
        assert_eq!(shown(WireValue::Varint(3), Kind::Sint64), "-2");
        assert_eq!(shown(WireValue::Varint(4), Kind::Sint32), "2");
        assert_eq!(shown(WireValue::Varint(3 + (1 << 32)), Kind::Sint32), "-2");
        assert_eq!(
            shown(WireValue::Fixed32(1.5f32.to_bits()), Kind::Float),
            "1.5"
        );
        assert_eq!(
            shown(WireValue::Fixed32(-3i32 as u32), Kind::SFixed32),
            "-3"
        );
        assert_eq!(integer(WireValue::Len(b"1"), Kind::String), None);
        assert!(!fits(WireValue::Varint(1), Kind::String));
        assert!(fits(WireValue::Len(b"x"), Kind::Wire));
        assert!(!fits(WireValue::Fixed64(1), Kind::Fixed32));
    }
}
