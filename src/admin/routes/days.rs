//! UTC calendar days of the usage calls: `YYYY-MM-DD` and `YYYY-MM` parameters, day ranges and
//! their epoch-millisecond bounds. Days are UTC because the daily rollups are.

use time::{Date, Month, OffsetDateTime};

use crate::admin::error::{AppError, AppResult};

/// Days a range covers when the caller gives no `from`.
pub const DEFAULT_DAYS: i64 = 30;
/// Longest range a per-day list may cover.
pub const MAX_LISTED_DAYS: i64 = 366;

/// Today, UTC.
pub fn today() -> Date {
    OffsetDateTime::now_utc().date()
}

/// `YYYY-MM-DD`.
pub fn format_day(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// `YYYY-MM`.
pub fn format_month(d: Date) -> String {
    format!("{:04}-{:02}", d.year(), u8::from(d.month()))
}

/// Splits `s` at `-` into numbers, each of exactly the given width.
fn numbers(s: &str, widths: &[usize]) -> Option<Vec<i64>> {
    let parts: Vec<&str> = s.split('-').collect();
    if parts.len() != widths.len() {
        return None;
    }
    parts
        .iter()
        .zip(widths)
        .map(|(p, w)| {
            (p.len() == *w && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<i64>().ok())
                .flatten()
        })
        .collect()
}

fn date(year: i64, month: i64, day: i64) -> Option<Date> {
    let month = Month::try_from(u8::try_from(month).ok()?).ok()?;
    Date::from_calendar_date(i32::try_from(year).ok()?, month, u8::try_from(day).ok()?).ok()
}

/// Parses a `YYYY-MM-DD` parameter.
pub fn parse_day(name: &str, s: &str) -> AppResult<Date> {
    numbers(s, &[4, 2, 2])
        .and_then(|n| date(n[0], n[1], n[2]))
        .ok_or_else(|| AppError::BadRequest(format!("{name} must be a date as YYYY-MM-DD")))
}

/// Epoch ms of a day's first instant.
pub fn start_ms(d: Date) -> i64 {
    d.midnight().assume_utc().unix_timestamp() * 1000
}

/// An inclusive range of UTC days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayRange {
    pub from: Date,
    pub to: Date,
}

impl DayRange {
    /// The range of `?from=&to=` (both `YYYY-MM-DD`, inclusive): `to` defaults to today and
    /// `from` to [`DEFAULT_DAYS`] days ending at `to`. With `max_days`, longer ranges are
    /// refused.
    pub fn from_query(
        from: Option<&str>,
        to: Option<&str>,
        max_days: Option<i64>,
    ) -> AppResult<DayRange> {
        let to = match to {
            Some(s) => parse_day("to", s)?,
            None => today(),
        };
        let from = match from {
            Some(s) => parse_day("from", s)?,
            None => to
                .checked_sub(time::Duration::days(DEFAULT_DAYS - 1))
                .unwrap_or(to),
        };
        let range = DayRange { from, to };
        if from > to {
            return Err(AppError::BadRequest(
                "from must not be after to".to_string(),
            ));
        }
        if let Some(max) = max_days {
            if range.len() > max {
                return Err(AppError::BadRequest(format!(
                    "a range may cover at most {max} days"
                )));
            }
        }
        Ok(range)
    }

    /// The days of `?month=YYYY-MM`, this month by default.
    pub fn month(month: Option<&str>) -> AppResult<DayRange> {
        let first = match month {
            None => today().replace_day(1).ok(),
            Some(s) => numbers(s, &[4, 2]).and_then(|n| date(n[0], n[1], 1)),
        }
        .ok_or_else(|| AppError::BadRequest("month must be YYYY-MM".into()))?;
        let last = first
            .replace_day(first.month().length(first.year()))
            .map_err(|e| AppError::Internal(e.to_string()))?;
        Ok(DayRange {
            from: first,
            to: last,
        })
    }

    /// Number of days, both ends included.
    pub fn len(&self) -> i64 {
        (self.to - self.from).whole_days() + 1
    }

    /// Every day, in order.
    pub fn days(&self) -> impl Iterator<Item = Date> {
        let to = self.to;
        std::iter::successors(Some(self.from), move |d| d.next_day().filter(|n| *n <= to))
    }

    /// Epoch ms just past the last day (exclusive).
    pub fn end_ms(&self) -> i64 {
        self.to
            .next_day()
            .map(start_ms)
            .unwrap_or_else(|| start_ms(self.to) + 86_400_000)
    }

    /// `from` as `YYYY-MM-DD`.
    pub fn first_day(&self) -> String {
        format_day(self.from)
    }

    /// `to` as `YYYY-MM-DD`.
    pub fn last_day(&self) -> String {
        format_day(self.to)
    }
}

/// A time bound of a record list: epoch ms, or a `YYYY-MM-DD` day, which as an upper bound
/// (`end`) means the end of that day.
pub fn parse_bound(name: &str, s: &str, end: bool) -> AppResult<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let day = parse_day(name, s).map_err(|_| {
        AppError::BadRequest(format!("{name} must be epoch milliseconds or YYYY-MM-DD"))
    })?;
    Ok(if end {
        DayRange { from: day, to: day }.end_ms()
    } else {
        start_ms(day)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;

    #[test]
    fn days_parse_strictly() {
        assert_eq!(
            format_day(parse_day("d", "2024-02-29").unwrap()),
            "2024-02-29"
        );
        for bad in [
            "2023-02-29",
            "2024-2-01",
            "2024-02-01 ",
            "20240201",
            "",
            "2024-13-01",
        ] {
            assert!(parse_day("d", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ranges() {
        let r = DayRange::from_query(Some("2024-02-27"), Some("2024-03-01"), Some(366)).unwrap();
        assert_eq!(r.len(), 4);
        let days: Vec<String> = r.days().map(format_day).collect();
        assert_eq!(
            days,
            ["2024-02-27", "2024-02-28", "2024-02-29", "2024-03-01"]
        );
        assert_eq!(start_ms(r.from), 1_708_992_000_000);
        assert_eq!(r.end_ms(), 1_709_337_600_000);
        assert!(DayRange::from_query(Some("2024-03-02"), Some("2024-03-01"), None).is_err());
        assert!(DayRange::from_query(Some("2020-01-01"), Some("2024-03-01"), Some(366)).is_err());
        assert_eq!(
            DayRange::from_query(None, None, None).unwrap().len(),
            DEFAULT_DAYS
        );
    }

    #[test]
    fn months() {
        let m = DayRange::month(Some("2024-02")).unwrap();
        assert_eq!(
            (m.first_day(), m.last_day()),
            ("2024-02-01".into(), "2024-02-29".into())
        );
        assert!(DayRange::month(Some("2024-2")).is_err());
        assert_eq!(DayRange::month(None).unwrap().from.day(), 1);
    }

    #[test]
    fn bounds() {
        assert_eq!(
            parse_bound("from", "1700000000000", false).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_bound("from", "2024-02-27", false).unwrap(),
            1_708_992_000_000
        );
        assert_eq!(
            parse_bound("to", "2024-02-27", true).unwrap(),
            1_709_078_400_000
        );
        assert!(parse_bound("to", "yesterday", true).is_err());
    }
}
