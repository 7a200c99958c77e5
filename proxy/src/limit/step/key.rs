//! A call's key and cost for one limit, read from its metadata, peer,
//! method and first message: the per-call work of the step, so it writes
//! into one buffer.

use std::net::IpAddr;

use http::HeaderValue;

use super::field::{self, Read};
use super::reply::{invalid_field, invalid_metadata, missing_part};
use super::{Compiled, CostOf, Part};
use crate::config::{MissingWord, OnMissing, Repeated};
use crate::limit::{CallInfo, Rejection};

/// Appends the key's value for a call to `out`; `Ok(false)`: a part is
/// missing and the limit skips such calls; `Err`: the call cannot be used
/// (a header the key reads is repeated, a field it reads is malformed, a
/// part is missing and the limit rejects such calls).
pub(super) fn value(
    l: &Compiled,
    call: &CallInfo<'_>,
    out: &mut String,
) -> Result<bool, Box<Rejection>> {
    for (i, part) in l.key.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        let present = match part {
            Part::Header(h, repeated) => {
                let mut values = call.headers.get_all(h).iter();
                match values.next() {
                    None => false,
                    Some(first) => {
                        push_value(out, first);
                        if let Some(second) = values.next() {
                            match repeated {
                                Repeated::First => {}
                                Repeated::All => {
                                    for v in std::iter::once(second).chain(values) {
                                        out.push(',');
                                        push_value(out, v);
                                    }
                                }
                                Repeated::Reject => {
                                    let times = 2 + values.count();
                                    return Err(Box::new(invalid_metadata(
                                        h,
                                        &format!(
                                            "appears {times} times; rate limit {:?} keys on one value: send it once",
                                            l.name
                                        ),
                                    )));
                                }
                            }
                        }
                        true
                    }
                }
            }
            Part::PeerIp(mask) => {
                masked(out, call.peer.ip(), *mask);
                true
            }
            Part::Method => {
                out.push_str(call.service);
                out.push('/');
                out.push_str(call.method);
                true
            }
            Part::TlsIdentity => match call.tls_identity {
                Some(id) => {
                    out.push_str(id);
                    true
                }
                None => false,
            },
            Part::Constant(c) => {
                out.push_str(c);
                true
            }
            Part::Field(path, at) => match at.read(l, path, call)? {
                Read::Value(v, kind) => {
                    field::push(out, v, kind);
                    true
                }
                Read::Missing => false,
            },
        };
        if !present {
            match &l.on_missing {
                OnMissing::Default { default } => out.push_str(default),
                OnMissing::Word(MissingWord::Skip) => return Ok(false),
                OnMissing::Word(MissingWord::Reject) => {
                    return Err(Box::new(missing_part(l, part)));
                }
            }
        }
    }
    Ok(true)
}

/// The units a call takes of `l` (`None`: the limit skips the call): a
/// header's cost must be one whole number, at most the limit's `max`;
/// absent, the call costs 1. A field's must be a whole number from 1 to
/// `max`; absent or 0, the limit's `on_missing` says.
pub(super) fn cost(l: &Compiled, call: &CallInfo<'_>) -> Result<Option<u64>, Box<Rejection>> {
    let (h, max) = match &l.cost {
        CostOf::Constant(n) => return Ok(Some(*n)),
        CostOf::Header(h, max) => (h, *max),
        CostOf::Field(path, at, max) => return field_cost(l, call, path, at, *max),
    };
    let mut values = call.headers.get_all(h).iter();
    let Some(v) = values.next() else {
        return Ok(Some(1));
    };
    let refuse = |why: String| Err(Box::new(invalid_metadata(h, &why)));
    if values.next().is_some() {
        return refuse(format!(
            "appears more than once; it states the cost of the call for rate limit {:?}: send it once",
            l.name
        ));
    }
    let most = max.unwrap_or(u64::MAX);
    match v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(n) if n <= most => Ok(Some(n.max(1))),
        Some(_) => refuse(format!(
            "states a cost above the most a call may take for rate limit {:?} ({most})",
            l.name
        )),
        None => refuse(format!(
            "must be a whole number of units from 1 to {most} (the cost of the call for rate limit {:?})",
            l.name
        )),
    }
}

fn field_cost(
    l: &Compiled,
    call: &CallInfo<'_>,
    path: &str,
    at: &field::FieldRef,
    max: Option<u64>,
) -> Result<Option<u64>, Box<Rejection>> {
    let most = max.unwrap_or(u64::MAX);
    let refuse = |why: String| Err(Box::new(invalid_field(path, &why)));
    let n = match at.read(l, path, call)? {
        Read::Missing => 0,
        Read::Value(v, kind) => match field::integer(v, kind) {
            Some(n) => n,
            None => {
                return refuse(format!(
                    "is not a whole number; rate limit {:?} charges by it",
                    l.name
                ))
            }
        },
    };
    if n < 0 {
        return refuse(format!(
            "is negative; rate limit {:?} charges by it: send a whole number from 1 to {most}",
            l.name
        ));
    }
    if n == 0 {
        return match l.on_missing {
            OnMissing::Word(MissingWord::Skip) => Ok(None),
            _ => refuse(format!(
                "is absent or 0; rate limit {:?} charges by it: send a whole number from 1 to {most}",
                l.name
            )),
        };
    }
    match u64::try_from(n) {
        Ok(n) if n <= most => Ok(Some(n)),
        _ => refuse(format!(
            "is above the most a call may carry for rate limit {:?} ({most})",
            l.name
        )),
    }
}

/// Appends the peer address, masked to its first `mask` bits (`10.1.2.0/24`).
/// An IPv4 client of a dual-stack listener (`::ffff:10.1.2.3`) counts as
/// its IPv4 address, so a `/24` means the same for every client. IPv4 is
/// written digit by digit: it is on every call of a per-IP limit.
fn masked(out: &mut String, ip: IpAddr, mask: Option<u8>) {
    use std::fmt::Write as _;
    let ip = ip.to_canonical();
    let most = if ip.is_ipv4() { 32 } else { 128 };
    let m = mask.unwrap_or(most).min(most);
    match crate::config::mask(ip, m) {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_decimal(out, octet.into());
            }
            if mask.is_some() {
                out.push('/');
                push_decimal(out, m.into());
            }
        }
        IpAddr::V6(v6) => {
            let _ = match mask {
                None => write!(out, "{v6}"),
                Some(_) => write!(out, "{v6}/{m}"),
            };
        }
    }
}

/// Appends a header value to a key: as text, or lossily when it is not
/// visible ASCII.
fn push_value(out: &mut String, v: &HeaderValue) {
    match v.to_str() {
        Ok(v) => out.push_str(v),
        Err(_) => out.push_str(&String::from_utf8_lossy(v.as_bytes())),
    }
}

/// Appends `n` (at most 999) in decimal.
fn push_decimal(out: &mut String, n: u32) {
    if n >= 100 {
        out.push(char::from(b'0' + (n / 100) as u8));
    }
    if n >= 10 {
        out.push(char::from(b'0' + (n / 10 % 10) as u8));
    }
    out.push(char::from(b'0' + (n % 10) as u8));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(ip: &str, mask: Option<u8>) -> String {
        let mut out = String::new();
        masked(&mut out, ip.parse().unwrap(), mask);
        out
    }

    #[test]
    fn peer_ips_are_masked() {
        assert_eq!(shown("10.1.2.3", Some(24)), "10.1.2.0/24");
        assert_eq!(shown("10.1.2.3", None), "10.1.2.3");
        assert_eq!(shown("255.100.9.0", Some(32)), "255.100.9.0/32");
        assert_eq!(shown("192.168.7.250", Some(0)), "0.0.0.0/0");
        assert_eq!(shown("192.168.7.250", Some(20)), "192.168.0.0/20");
        assert_eq!(shown("2001:db8::1", Some(32)), "2001:db8::/32");
        // IPv4 through a dual-stack listener: masked as IPv4.
        assert_eq!(shown("::ffff:10.1.2.3", Some(24)), "10.1.2.0/24");
        assert_eq!(shown("::ffff:10.1.2.3", None), "10.1.2.3");
    }
}
