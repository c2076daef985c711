//! Human-friendly sizes (`"512MiB"`) and durations (`"30s"`, `"30m"`) for the configuration.
//!
//! Both also accept a bare integer (bytes, or seconds), so environment overrides such as
//! `MAILGATE_IMAP__MAX_LITERAL_BYTES=1048576` work too. They serialize back to the same
//! notation so that `check-config` prints what an operator would write.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A span of time with whole-millisecond precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl ByteSize {
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

fn split_number(text: &str) -> Option<(u64, &str)> {
    let text = text.trim();
    let end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let number = text[..end].parse().ok()?;
    Some((number, text[end..].trim()))
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (number, unit) = split_number(text).ok_or_else(|| format!("`{text}` is not a size such as 64KiB"))?;
        let factor: u64 = match unit {
            "" | "B" => 1,
            "K" | "KB" | "KiB" => 1 << 10,
            "M" | "MB" | "MiB" => 1 << 20,
            "G" | "GB" | "GiB" => 1 << 30,
            _ => return Err(format!("`{text}`: unknown size unit `{unit}` (use B, KiB, MiB, GiB)")),
        };
        number.checked_mul(factor).map(ByteSize).ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl std::str::FromStr for Span {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (number, unit) = split_number(text).ok_or_else(|| format!("`{text}` is not a duration such as 30s"))?;
        let millis: u64 = match unit {
            "ms" => 1,
            "" | "s" => 1000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("`{text}`: unknown duration unit `{unit}` (use ms, s, m, h, d)")),
        };
        number
            .checked_mul(millis)
            .map(|ms| Span(Duration::from_millis(ms)))
            .ok_or_else(|| format!("`{text}` is too long"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 >= factor && self.0 % factor == 0 {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, factor) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1000)] {
            if ms >= factor && ms % factor == 0 {
                return write!(f, "{}{unit}", ms / factor);
            }
        }
        write!(f, "{ms}ms")
    }
}

struct TextOrNumber<T>(std::marker::PhantomData<T>);

impl<T> Visitor<'_> for TextOrNumber<T>
where
    T: std::str::FromStr<Err = String>,
{
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string such as \"30s\" or \"64KiB\", or an integer")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        v.to_string().parse().map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        u64::try_from(v).map_err(|_| E::custom("must not be negative")).and_then(|v| self.visit_u64(v))
    }
}

macro_rules! text_serde {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(TextOrNumber::<$ty>(std::marker::PhantomData))
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}
text_serde!(ByteSize);
text_serde!(Span);

/// A moment in time written as RFC 3339 (`2027-03-31T00:00:00Z`, `2027-03-31T08:00:00+02:00`),
/// shown as it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Moment(pub time::OffsetDateTime);

impl Moment {
    pub fn system_time(self) -> std::time::SystemTime {
        self.0.into()
    }

    /// The calendar date in the moment's own offset (`2027-03-31`): what a user is told.
    pub fn date(self) -> String {
        let date = self.0.date();
        format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day())
    }
}

/// Now, in seconds since the Unix epoch (what histories and shared marks store).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Seconds since the Unix epoch as RFC 3339 in UTC (see [`rfc3339`]).
pub fn rfc3339_unix(seconds: u64) -> String {
    rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
}

/// A system time as RFC 3339 in UTC, to the second (reports).
pub fn rfc3339(at: std::time::SystemTime) -> String {
    let at = time::OffsetDateTime::from(at).replace_nanosecond(0).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

impl std::str::FromStr for Moment {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
            .map(Moment)
            .map_err(|e| format!("`{text}` is not an RFC 3339 time such as 2027-03-31T00:00:00Z: {e}"))
    }
}

impl fmt::Display for Moment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.format(&time::format_description::well_known::Rfc3339).map_err(|_| fmt::Error)?)
    }
}

impl<'de> Deserialize<'de> for Moment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

impl Serialize for Moment {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print_back() {
        for (text, bytes, shown) in [
            ("512MiB", 512 << 20, "512MiB"),
            ("64KiB", 64 << 10, "64KiB"),
            ("1000", 1000, "1000B"),
            ("2 GiB", 2 << 30, "2GiB"),
        ] {
            let size: ByteSize = text.parse().unwrap();
            assert_eq!(size.0, bytes);
            assert_eq!(size.to_string(), shown);
        }
        assert!("12XB".parse::<ByteSize>().is_err());
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn durations_parse_and_print_back() {
        for (text, ms, shown) in
            [("30m", 1_800_000, "30m"), ("10s", 10_000, "10s"), ("250ms", 250, "250ms"), ("90", 90_000, "90s")]
        {
            let span: Span = text.parse().unwrap();
            assert_eq!(span.0.as_millis(), ms);
            assert_eq!(span.to_string(), shown);
        }
        assert!("soon".parse::<Span>().is_err());
    }

    #[test]
    fn moments_parse_with_their_offset_and_tell_their_date() {
        let moment: Moment = "2027-03-31T23:30:00-02:00".parse().unwrap();
        assert_eq!(moment.date(), "2027-03-31");
        assert_eq!(moment.to_string(), "2027-03-31T23:30:00-02:00");
        let utc: Moment = "2027-04-01T01:30:00Z".parse().unwrap();
        assert_eq!(moment.system_time(), utc.system_time());
        assert_eq!(rfc3339(utc.system_time()), "2027-04-01T01:30:00Z");
        assert!("2027-03-31".parse::<Moment>().unwrap_err().contains("RFC 3339"));
    }
}
