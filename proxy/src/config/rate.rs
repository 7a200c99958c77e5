//! Rates as written in the config: `100/s`, `6000/min`, `1000/h`,
//! `10000/day`.

use std::fmt;
use std::time::Duration;

/// `limit` units per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Units allowed per period (requests, or cost units).
    pub limit: u64,
    /// The period.
    pub period: Duration,
}

impl super::parsed::FromText for Rate {
    fn from_text(text: &str) -> Result<Self, String> {
        Rate::parse(text)
    }
}

// === impl Rate ===

impl Rate {
    /// Parses `N/unit` with unit `s`, `sec`, `second`, `m`, `min`, `minute`,
    /// `h`, `hour`, `d`, `day`.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let (n, unit) = s.split_once('/').ok_or_else(|| {
            format!("{s:?} is not a rate like 100/s, 6000/min, 1000/h or 10000/day")
        })?;
        let limit: u64 = n
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| format!("{s:?}: {n:?} is not a whole number"))?;
        if limit == 0 {
            return Err(format!("{s:?}: the rate must be more than 0"));
        }
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?}; use s, min, h or day"
                ))
            }
        };
        Ok(Rate { limit, period })
    }

    /// Time between two units at this rate, in microseconds (at least 1).
    pub fn emission_interval_micros(&self) -> u64 {
        (self.period.as_micros() as u64 / self.limit).max(1)
    }

    /// The period in microseconds.
    pub fn period_micros(&self) -> u64 {
        self.period.as_micros() as u64
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "min",
            3600 => "h",
            _ => "day",
        };
        write!(f, "{}/{unit}", self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(
            Rate::parse("100/s").unwrap(),
            Rate {
                limit: 100,
                period: Duration::from_secs(1)
            }
        );
        assert_eq!(
            Rate::parse("6000/min").unwrap().period,
            Duration::from_secs(60)
        );
        assert_eq!(Rate::parse("1_000/h").unwrap().limit, 1000);
        assert_eq!(Rate::parse("10000/day").unwrap().to_string(), "10000/day");
        assert!(Rate::parse("0/s").unwrap_err().contains("more than 0"));
        assert!(Rate::parse("100").unwrap_err().contains("not a rate"));
        assert!(Rate::parse("100/week")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(Rate::parse("x/s")
            .unwrap_err()
            .contains("not a whole number"));
        assert_eq!(
            Rate::parse("3/s").unwrap().emission_interval_micros(),
            333_333
        );
    }
}
