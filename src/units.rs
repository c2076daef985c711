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
}
