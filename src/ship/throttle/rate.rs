//! `Rate`: a replication rate limit as operators write it (`2MiB/s`,
//! `100Mbit/s`, `unlimited`), parsed and printed.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// The lowest limited rate accepted from an operator: anything below is
/// almost surely a typo (`100` meaning 100 Mbit/s), and would ship a 64 KiB
/// batch per minute.
pub const MIN_RATE: u64 = 1024;

/// A cap on wire bytes per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rate {
    Unlimited,
    BytesPerSec(u64),
}

/// Units in the order `Display` prefers them; each is `(name, bytes/s)`.
/// Bit rates are decimal, as network links are sold: 1 Mbit/s = 125 000 B/s.
const DISPLAY_UNITS: &[(&str, u64)] = &[
    ("GiB/s", 1 << 30),
    ("MiB/s", 1 << 20),
    ("KiB/s", 1 << 10),
    ("GB/s", 1_000_000_000),
    ("MB/s", 1_000_000),
    ("KB/s", 1_000),
    ("Gbit/s", 125_000_000),
    ("Mbit/s", 125_000),
    ("Kbit/s", 125),
];

/// Every unit accepted on input (matched case-sensitively except for the
/// `k`/`K` prefix spelled both ways, since both are common).
fn unit_multiplier(unit: &str) -> Option<f64> {
    Some(match unit {
        "" | "B/s" => 1.0,
        "KB/s" | "kB/s" => 1e3,
        "MB/s" => 1e6,
        "GB/s" => 1e9,
        "KiB/s" => 1024.0,
        "MiB/s" => 1024.0 * 1024.0,
        "GiB/s" => 1024.0 * 1024.0 * 1024.0,
        "bit/s" | "bps" => 1.0 / 8.0,
        "Kbit/s" | "kbit/s" | "Kbps" | "kbps" => 1e3 / 8.0,
        "Mbit/s" | "Mbps" => 1e6 / 8.0,
        "Gbit/s" | "Gbps" => 1e9 / 8.0,
        _ => return None,
    })
}

impl Rate {
    /// Bytes per second, `None` when unlimited.
    pub fn bytes_per_sec(self) -> Option<u64> {
        match self {
            Rate::Unlimited => None,
            Rate::BytesPerSec(n) => Some(n),
        }
    }

    fn parse_number(s: &str) -> Result<Rate> {
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let Ok(num) = num.parse::<f64>() else {
            bail!("bad rate {s:?}: expected \"unlimited\" or a number and a unit like 2MiB/s");
        };
        let unit = unit.trim();
        let Some(mult) = unit_multiplier(unit) else {
            if unit_multiplier(&format!("{unit}/s")).is_some() {
                bail!("bad rate {s:?}: a rate needs \"/s\" (e.g. {num}{unit}/s)");
            }
            bail!(
                "bad rate {s:?}: unknown unit {unit:?} (use B/s, KB/s, KiB/s, MB/s, MiB/s, \
                 GB/s, GiB/s, Kbit/s, Mbit/s or Gbit/s)"
            );
        };
        let v = (num * mult).round();
        if !v.is_finite() || v > u64::MAX as f64 {
            bail!("bad rate {s:?}: out of range");
        }
        if (v as u64) < MIN_RATE {
            bail!("bad rate {s:?}: the lowest rate is 1KiB/s (write \"unlimited\" for no limit)");
        }
        Ok(Rate::BytesPerSec(v as u64))
    }
}

impl FromStr for Rate {
    type Err = anyhow::Error;

    /// `unlimited`, a plain number of bytes/s, or a number and a unit;
    /// blanks between them are allowed (`2 MiB/s` reads back `Display`).
    fn from_str(s: &str) -> Result<Rate> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("unlimited") {
            return Ok(Rate::Unlimited);
        }
        Rate::parse_number(s)
    }
}

impl fmt::Display for Rate {
    /// The first unit that states the rate exactly in under 4 digits
    /// (`2 MiB/s`, `500 KB/s`, `100 Mbit/s`), else the exact unit with the
    /// fewest digits, else bytes/s: what is printed reads back the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Rate::BytesPerSec(n) = *self else {
            return f.write_str("unlimited");
        };
        let exact = DISPLAY_UNITS.iter().filter(|(_, u)| n >= *u && n % u == 0);
        let short = exact.clone().find(|(_, u)| n / u < 1000);
        match short.or_else(|| exact.min_by_key(|(_, u)| n / u)) {
            Some((name, u)) => write!(f, "{} {name}", n / u),
            None => write!(f, "{n} B/s"),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    /// A string as `FromStr` reads it, or an integer number of bytes/s.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Rate, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Num(u64),
            Text(String),
        }
        let text = match Repr::deserialize(d)? {
            Repr::Num(n) => n.to_string(),
            Repr::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        let table: &[(&str, Rate)] = &[
            ("unlimited", Rate::Unlimited),
            ("Unlimited", Rate::Unlimited),
            ("12345", Rate::BytesPerSec(12345)),
            ("12345B/s", Rate::BytesPerSec(12345)),
            ("2MiB/s", Rate::BytesPerSec(2 << 20)),
            ("2 MiB/s", Rate::BytesPerSec(2 << 20)),
            (" 2MiB/s ", Rate::BytesPerSec(2 << 20)),
            ("500KB/s", Rate::BytesPerSec(500_000)),
            ("500kB/s", Rate::BytesPerSec(500_000)),
            ("64KiB/s", Rate::BytesPerSec(65536)),
            ("3MB/s", Rate::BytesPerSec(3_000_000)),
            ("1GB/s", Rate::BytesPerSec(1_000_000_000)),
            ("1GiB/s", Rate::BytesPerSec(1 << 30)),
            ("100Mbit/s", Rate::BytesPerSec(12_500_000)),
            ("100Mbps", Rate::BytesPerSec(12_500_000)),
            ("1.5Gbit/s", Rate::BytesPerSec(187_500_000)),
            ("800Kbit/s", Rate::BytesPerSec(100_000)),
            ("0.5MiB/s", Rate::BytesPerSec(512 << 10)),
        ];
        for (text, want) in table {
            assert_eq!(text.parse::<Rate>().unwrap(), *want, "{text}");
        }
    }

    #[test]
    fn bad_rates_say_why() {
        let table: &[(&str, &str)] = &[
            ("", "expected \"unlimited\" or a number"),
            ("fast", "expected \"unlimited\" or a number"),
            ("2MiB", "needs \"/s\""),
            ("2 Mbit", "needs \"/s\""),
            ("5 parsecs/s", "unknown unit"),
            ("2mib/s", "unknown unit"),
            ("0", "lowest rate"),
            ("100", "lowest rate"),
            ("1.2.3MB/s", "expected"),
            ("-1MB/s", "expected"),
            ("99999999999999999999GiB/s", "out of range"),
        ];
        for (text, want) in table {
            let e = format!("{:#}", text.parse::<Rate>().unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn display_is_exact_and_reads_back() {
        let table: &[(Rate, &str)] = &[
            (Rate::Unlimited, "unlimited"),
            (Rate::BytesPerSec(2 << 20), "2 MiB/s"),
            (Rate::BytesPerSec(12_500_000), "100 Mbit/s"),
            (Rate::BytesPerSec(500_000), "500 KB/s"),
            (Rate::BytesPerSec(187_500_000), "1500 Mbit/s"),
            (Rate::BytesPerSec(12345), "12345 B/s"),
            (Rate::BytesPerSec(3 << 30), "3 GiB/s"),
        ];
        for (rate, text) in table {
            assert_eq!(rate.to_string(), *text);
            assert_eq!(text.parse::<Rate>().unwrap(), *rate);
        }
    }

    #[test]
    fn serde_takes_strings_and_integers() {
        #[derive(Deserialize)]
        struct T {
            r: Rate,
        }
        let t: T = toml::from_str("r = 4096").unwrap();
        assert_eq!(t.r, Rate::BytesPerSec(4096));
        let t: T = toml::from_str("r = \"1MiB/s\"").unwrap();
        assert_eq!(t.r, Rate::BytesPerSec(1 << 20));
        assert_eq!(serde_json::to_string(&t.r).unwrap(), "\"1 MiB/s\"");
    }
}
