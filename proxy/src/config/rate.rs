//! Rates as written in the config: `100/s`, `6000/min`, `1000/h`,
//! `10000/day`, and over any period: `5/10s`, `100/5m`, `2000/2h`,
//! `50000/week`, `1000000/month` (30 days; with `window: calendar`, the
//! calendar month).

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

/// The shortest period a rate may have.
pub(super) const MIN_PERIOD: Duration = Duration::from_millis(1);
/// The longest period a rate may have: a year of 365 days.
pub(super) const MAX_PERIOD: Duration = Duration::from_secs(365 * DAY);

const DAY: u64 = 86_400;
/// A week, in seconds.
pub const WEEK: u64 = 7 * DAY;
/// A month as a rate's unit, in seconds: 30 days (a calendar window counts
/// the month as it is).
pub const MONTH: u64 = 30 * DAY;
const YEAR: u64 = 365 * DAY;

/// Units a period may be written in, with their length in milliseconds;
/// the first spelling of each is the one rates are shown in.
const UNITS: &[(&[&str], u64)] = &[
    (&["ms", "msec", "millisecond", "milliseconds"], 1),
    (&["s", "sec", "second", "seconds"], 1_000),
    (&["min", "m", "minute", "minutes"], 60_000),
    (&["h", "hour", "hours"], 3_600_000),
    (&["day", "d", "days"], DAY * 1_000),
    (&["week", "w", "weeks"], WEEK * 1_000),
    (&["month", "months"], MONTH * 1_000),
    (&["year", "y", "years"], YEAR * 1_000),
];

impl super::parsed::FromText for Rate {
    fn from_text(text: &str) -> Result<Self, String> {
        Rate::parse(text)
    }
}

// === impl Rate ===

impl Rate {
    /// Parses `N/period`: the period is a unit (`s`, `min`, `h`, `day`,
    /// `week`, `month`, `year`, `ms`, with their long spellings) with an
    /// optional whole count before it (`10s`, `5min`, `2h`, `3day`).
    pub fn parse(s: &str) -> Result<Rate, String> {
        let shown = super::error::shown(s);
        let (n, per) = s.split_once('/').ok_or_else(|| {
            format!("{shown} is not a rate like 100/s, 6000/min, 5/10s or 50000/week")
        })?;
        let limit: u64 = n
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| format!("{shown}: the part before / is not a whole number"))?;
        if limit == 0 {
            return Err(format!("{shown}: the rate must be more than 0"));
        }
        let per = per.trim();
        let digits = per.find(|c: char| !c.is_ascii_digit()).unwrap_or(per.len());
        let (count, unit) = per.split_at(digits);
        let count: u64 = match count {
            "" => 1,
            c => c
                .parse()
                .map_err(|_| format!("{shown}: the period's count is too large"))?,
        };
        let unit = unit.trim();
        let Some((_, ms)) = UNITS.iter().find(|(names, _)| names.contains(&unit)) else {
            return Err(format!(
                "{shown}: unknown period unit; write one of ms, s, min, h, day, week, month, year, optionally after a count (10s, 5min)"
            ));
        };
        let period = count
            .checked_mul(*ms)
            .map(Duration::from_millis)
            .filter(|p| *p <= MAX_PERIOD);
        let Some(period) = period else {
            return Err(format!(
                "{shown}: the period is longer than a year; use a period of at most 365 days"
            ));
        };
        if period < MIN_PERIOD {
            return Err(format!(
                "{shown}: the period is zero; use a period of at least 1ms"
            ));
        }
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
    /// `100/s`, `6000/min`, `5/10s`, `50000/week`: the largest unit the
    /// period is a whole number of.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.period.as_millis() as u64;
        let (names, unit) = UNITS
            .iter()
            .rev()
            .find(|(_, u)| ms.is_multiple_of(*u))
            .unwrap_or(&UNITS[0]);
        match ms / unit {
            1 => write!(f, "{}/{}", self.limit, names[0]),
            n => write!(f, "{}/{n}{}", self.limit, names[0]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn period(s: &str) -> Duration {
        Rate::parse(s).unwrap_or_else(|e| panic!("{e}")).period
    }

    #[test]
    fn rates() {
        assert_eq!(
            Rate::parse("100/s").unwrap(),
            Rate {
                limit: 100,
                period: Duration::from_secs(1)
            }
        );
        assert_eq!(period("6000/min"), Duration::from_secs(60));
        assert_eq!(Rate::parse("1_000/h").unwrap().limit, 1000);
        assert_eq!(Rate::parse("10000/day").unwrap().to_string(), "10000/day");
        assert!(Rate::parse("0/s").unwrap_err().contains("more than 0"));
        assert!(Rate::parse("100").unwrap_err().contains("not a rate"));
        assert!(Rate::parse("100/fortnight")
            .unwrap_err()
            .contains("unknown period unit"));
        assert!(Rate::parse("x/s")
            .unwrap_err()
            .contains("not a whole number"));
        assert_eq!(
            Rate::parse("3/s").unwrap().emission_interval_micros(),
            333_333
        );
    }

    #[test]
    fn any_period() {
        assert_eq!(period("5/10s"), Duration::from_secs(10));
        assert_eq!(period("100/5m"), Duration::from_secs(300));
        assert_eq!(period("100/5min"), Duration::from_secs(300));
        assert_eq!(period("2000/2h"), Duration::from_secs(7200));
        assert_eq!(period("50000/week"), Duration::from_secs(WEEK));
        assert_eq!(period("9/3 days"), Duration::from_secs(3 * DAY));
        assert_eq!(period("1000000/month"), Duration::from_secs(MONTH));
        assert_eq!(period("7/250ms"), Duration::from_millis(250));
        for (text, shown) in [
            ("5/10s", "5/10s"),
            ("100/5m", "100/5min"),
            ("2000/2h", "2000/2h"),
            ("50000/week", "50000/week"),
            ("5/7d", "5/week"),
            ("6/1500ms", "6/1500ms"),
            ("1/90s", "1/90s"),
            ("3/month", "3/month"),
            ("6000/min", "6000/min"),
        ] {
            assert_eq!(Rate::parse(text).unwrap().to_string(), shown, "{text}");
        }
    }

    #[test]
    fn absurd_periods_are_refused_with_the_bound() {
        assert!(Rate::parse("5/0s").unwrap_err().contains("at least 1ms"));
        assert!(Rate::parse("5/0ms").unwrap_err().contains("at least 1ms"));
        assert!(Rate::parse("5/366d")
            .unwrap_err()
            .contains("at most 365 days"));
        assert!(Rate::parse("5/99999999999999999999s")
            .unwrap_err()
            .contains("too large"));
        assert!(Rate::parse("5/18446744073709551615year")
            .unwrap_err()
            .contains("at most 365 days"));
        assert_eq!(period("5/year"), MAX_PERIOD);
    }
}
