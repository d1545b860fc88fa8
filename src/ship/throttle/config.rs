//! The `[throttle]` section: a default rate and burst, and weekly windows
//! (`[[throttle.window]]`) that set another rate at certain hours.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use serde::Deserialize;

use super::clock::{SECS_PER_DAY, WEEKDAYS, Weekday};
use super::rate::Rate;
use crate::config::de_size;

/// The smallest bucket accepted: one small batch (also `ship.batch_bytes`'s
/// floor).
pub const MIN_BURST: u64 = 4096;

/// `[throttle]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleConfig {
    /// Outside every window.
    pub rate: Rate,
    /// Bucket size: the most sent at line speed after an idle spell. Unset:
    /// `default_burst(rate)`. Windows without their own burst use this.
    #[serde(deserialize_with = "de_burst")]
    pub burst: Option<u64>,
    /// `[[throttle.window]]`, in file order (numbered from 1 in messages).
    #[serde(rename = "window", deserialize_with = "de_windows")]
    pub windows: Vec<WindowConfig>,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            rate: Rate::Unlimited,
            burst: None,
            windows: Vec::new(),
        }
    }
}

/// One `[[throttle.window]]`: from `start` to `end` on each of `days`. The
/// day is the day the window opens: `fri 22:00-06:00` runs Friday night into
/// Saturday morning.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    #[serde(default = "DaySet::all")]
    pub days: DaySet,
    pub start: TimeOfDay,
    /// Before `start` = the window crosses midnight; `24:00` = to midnight.
    pub end: TimeOfDay,
    pub rate: Rate,
    #[serde(default, deserialize_with = "de_burst")]
    pub burst: Option<u64>,
}

/// The burst when none is configured: 250 ms of the rate, at least 64 KiB.
/// Small enough that a 10 s span starting with a full bucket (after an idle
/// spell) ships at most 2.5% over the rate; big enough for 64 KiB batches.
/// `0` when unlimited (no bucket).
pub fn default_burst(rate: Rate) -> u64 {
    match rate {
        Rate::Unlimited => 0,
        Rate::BytesPerSec(r) => (r / 4).max(64 << 10),
    }
}

/// Checks a burst given by an operator (config or `replfs throttle set`).
pub fn check_burst(bytes: u64) -> Result<()> {
    if bytes < MIN_BURST {
        bail!("a burst must be at least 4KiB (got {bytes} bytes)");
    }
    Ok(())
}

impl ThrottleConfig {
    /// The same checks also run while the TOML is read, where their errors
    /// get a line number (for windows, that of the first
    /// `[[throttle.window]]`: toml has no span for later ones); this is for
    /// configs built in code.
    pub fn validate(&self) -> Result<()> {
        if let Some(b) = self.burst {
            check_burst(b).map_err(|e| anyhow::anyhow!("throttle.burst: {e}"))?;
        }
        check_windows(&self.windows)
    }

    /// The window in force at a local time, with its index (0-based).
    pub fn window_at(&self, day: Weekday, secs: u32) -> Option<(usize, &WindowConfig)> {
        let pos = day.index() * SECS_PER_DAY + secs;
        self.windows
            .iter()
            .enumerate()
            .find(|(_, w)| w.spans().any(|(s, e)| s <= pos && pos < e))
    }
}

impl WindowConfig {
    fn validate(&self) -> Result<()> {
        if self.start.0 >= SECS_PER_DAY {
            bail!("start must be before 24:00");
        }
        if self.start == self.end {
            bail!("start and end are equal; write 00:00-24:00 for a whole day");
        }
        if self.days.0 & 0x7f == 0 {
            bail!("no days");
        }
        if let Some(b) = self.burst {
            check_burst(b)?;
        }
        Ok(())
    }

    /// The window's spans of the week, as `[start, end)` in seconds since
    /// Monday 00:00, split where they wrap past Sunday midnight.
    fn spans(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        const WEEK: u32 = 7 * SECS_PER_DAY;
        // Clamped so that an unvalidated config cannot overflow.
        let (start, end) = (self.start.0.min(SECS_PER_DAY), self.end.0.min(SECS_PER_DAY));
        let len = if end > start {
            end - start
        } else {
            (SECS_PER_DAY + end).saturating_sub(start)
        };
        self.days.iter().flat_map(move |d| {
            let s = d.index() * SECS_PER_DAY + start;
            let e = s + len;
            let wrapped = (e > WEEK).then(|| (0, e - WEEK));
            std::iter::once((s, e.min(WEEK))).chain(wrapped)
        })
    }
}

/// Each window on its own, then each pair for overlaps; windows are named by
/// their number (from 1) and their text.
fn check_windows(windows: &[WindowConfig]) -> Result<()> {
    for (i, w) in windows.iter().enumerate() {
        w.validate()
            .map_err(|e| anyhow::anyhow!("throttle: window {} ({w}): {e}", i + 1))?;
    }
    for (j, b) in windows.iter().enumerate() {
        for (i, a) in windows[..j].iter().enumerate() {
            if let Some(at) = first_overlap(a, b) {
                let (day, secs) = week_pos(at);
                bail!(
                    "throttle: window {} ({b}) overlaps window {} ({a}) on {day} at {}",
                    j + 1,
                    i + 1,
                    TimeOfDay(secs)
                );
            }
        }
    }
    Ok(())
}

/// The first second of the week both windows cover, if any.
fn first_overlap(a: &WindowConfig, b: &WindowConfig) -> Option<u32> {
    a.spans()
        .flat_map(|x| b.spans().map(move |y| (x, y)))
        .filter(|((s1, e1), (s2, e2))| s1 < e2 && s2 < e1)
        .map(|((s1, _), (s2, _))| s1.max(s2))
        .min()
}

fn week_pos(secs: u32) -> (Weekday, u32) {
    (
        Weekday::from_index(secs / SECS_PER_DAY),
        secs % SECS_PER_DAY,
    )
}

impl fmt::Display for WindowConfig {
    /// `mon-fri 08:00-18:00`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}-{}", self.days, self.start, self.end)
    }
}

/// A time of day as seconds since midnight; `24:00` (86400) ends a day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeOfDay(pub u32);

impl FromStr for TimeOfDay {
    type Err = anyhow::Error;

    /// `HH:MM` or `HH:MM:SS`, 24-hour clock; `24:00` is midnight at the end.
    fn from_str(s: &str) -> Result<TimeOfDay> {
        let bad = || anyhow::anyhow!("bad time {s:?}: expected HH:MM, e.g. 08:00 or 22:30");
        let parts: Vec<&str> = s.trim().split(':').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
            return Err(bad());
        }
        let mut n = [0u32; 3];
        for (slot, p) in n.iter_mut().zip(&parts) {
            *slot = p.parse().map_err(|_| bad())?;
        }
        let [h, m, sec] = n;
        if m > 59 || sec > 59 || h > 24 || (h == 24 && (m, sec) != (0, 0)) {
            bail!("bad time {s:?}: out of range (00:00 to 24:00)");
        }
        Ok(TimeOfDay(h * 3600 + m * 60 + sec))
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (h, m, s) = (self.0 / 3600, self.0 / 60 % 60, self.0 % 60);
        match s {
            0 => write!(f, "{h:02}:{m:02}"),
            _ => write!(f, "{h:02}:{m:02}:{s:02}"),
        }
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A set of weekdays, bit `i` = `Weekday::from_index(i)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DaySet(pub u8);

impl DaySet {
    pub fn all() -> DaySet {
        DaySet(0x7f)
    }

    pub fn contains(self, d: Weekday) -> bool {
        self.0 & (1 << d.index()) != 0
    }

    pub fn iter(self) -> impl Iterator<Item = Weekday> {
        WEEKDAYS.into_iter().filter(move |&d| self.contains(d))
    }

    fn parse_day(s: &str) -> Option<Weekday> {
        const FULL: [&str; 7] = [
            "monday",
            "tuesday",
            "wednesday",
            "thursday",
            "friday",
            "saturday",
            "sunday",
        ];
        let s = s.trim().to_ascii_lowercase();
        WEEKDAYS
            .into_iter()
            .find(|d| s == d.name() || s == FULL[d.index() as usize])
    }

    /// `a-b` (may wrap past Sunday: `fri-mon`) or a single day.
    fn parse_item(item: &str) -> Option<u8> {
        let (a, b) = match item.split_once('-') {
            Some((a, b)) => (Self::parse_day(a)?, Self::parse_day(b)?),
            None => (Self::parse_day(item)?, Self::parse_day(item)?),
        };
        let n = (b.index() + 7 - a.index()) % 7;
        Some(
            (0..=n)
                .map(|k| 1u8 << ((a.index() + k) % 7))
                .fold(0, |m, b| m | b),
        )
    }
}

impl FromStr for DaySet {
    type Err = anyhow::Error;

    /// `all`, or a comma list of days and ranges: `mon-fri`, `sat,sun`,
    /// `mon,wed,fri`; three-letter or full day names, any case.
    fn from_str(s: &str) -> Result<DaySet> {
        if s.trim().eq_ignore_ascii_case("all") {
            return Ok(DaySet::all());
        }
        let mut mask = 0u8;
        for item in s.split(',') {
            match DaySet::parse_item(item) {
                Some(m) => mask |= m,
                None => bail!(
                    "bad days {s:?}: expected \"all\" or days like mon-fri, sat,sun or mon,wed,fri"
                ),
            }
        }
        Ok(DaySet(mask))
    }
}

impl fmt::Display for DaySet {
    /// `all`, a range (`mon-fri`, `fri-mon`) when the days run on, else a
    /// comma list; reads back the same set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == DaySet::all() {
            return f.write_str("all");
        }
        let days: Vec<Weekday> = self.iter().collect();
        let first_of_run = WEEKDAYS
            .into_iter()
            .find(|&d| self.contains(d) && !self.contains(Weekday::from_index(d.index() + 6)));
        if let (Some(a), true) = (first_of_run, days.len() >= 3) {
            let b = Weekday::from_index(a.index() + days.len() as u32 - 1);
            if DaySet::parse_item(&format!("{a}-{b}")) == Some(self.0) {
                return write!(f, "{a}-{b}");
            }
        }
        let names: Vec<&str> = days.iter().map(|d| d.name()).collect();
        f.write_str(&names.join(","))
    }
}

impl<'de> Deserialize<'de> for DaySet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A size, checked here so that the error names the line.
fn de_burst<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    let b = de_size(d)?;
    check_burst(b).map_err(serde::de::Error::custom)?;
    Ok(Some(b))
}

/// The windows, checked here so that the error names a line.
fn de_windows<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<WindowConfig>, D::Error> {
    let w = Vec::<WindowConfig>::deserialize(d)?;
    check_windows(&w).map_err(serde::de::Error::custom)?;
    Ok(w)
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
