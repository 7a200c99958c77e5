//! The `grpc-timeout` header: an integer of at most 8 digits and a unit
//! (`H`, `M`, `S`, `m`, `u`, `n`).

use std::time::Duration;

/// Parses a `grpc-timeout` value; `None` if malformed.
pub(crate) fn parse(v: &[u8]) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a duration as a `grpc-timeout` value (at most 8 digits), rounding
/// up so the upstream never sees a shorter deadline than ours.
pub(crate) fn encode(d: Duration) -> String {
    let nanos = d.as_nanos();
    for (unit, per) in [
        ('n', 1u128),
        ('u', 1_000),
        ('m', 1_000_000),
        ('S', 1_000_000_000),
        ('M', 60_000_000_000),
        ('H', 3_600_000_000_000),
    ] {
        let n = nanos.div_ceil(per);
        if n < 100_000_000 {
            return format!("{n}{unit}");
        }
    }
    "99999999H".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse(b"5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse(b"7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse(b"9n"), Some(Duration::from_nanos(9)));
        for bad in [
            &b""[..],
            b"S",
            b"10",
            b"10s",
            b"123456789S",
            b"-1S",
            b"1.5S",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn encodes_within_eight_digits_rounding_up() {
        assert_eq!(encode(Duration::from_millis(100)), "100000u");
        assert_eq!(encode(Duration::from_secs(5)), "5000000u");
        assert_eq!(encode(Duration::from_nanos(1_500)), "1500n");
        assert_eq!(
            parse(encode(Duration::from_secs(90_000)).as_bytes())
                .map(|d| d >= Duration::from_secs(90_000)),
            Some(true)
        );
    }
}
