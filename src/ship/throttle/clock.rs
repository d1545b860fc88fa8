//! The throttle's view of time: a monotonic clock for the token bucket, local
//! wall-clock time for the schedule, and sleeping — behind a trait so tests
//! drive simulated time (`ManualClock`) instead of waiting.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

pub const SECS_PER_DAY: u32 = 86_400;

/// A day of the week, Monday first (ISO 8601).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

pub const WEEKDAYS: [Weekday; 7] = [
    Weekday::Mon,
    Weekday::Tue,
    Weekday::Wed,
    Weekday::Thu,
    Weekday::Fri,
    Weekday::Sat,
    Weekday::Sun,
];

impl Weekday {
    /// 0 = Monday .. 6 = Sunday.
    pub fn index(self) -> u32 {
        self as u32
    }

    /// The day `i` days after Monday (taken modulo 7).
    pub fn from_index(i: u32) -> Weekday {
        WEEKDAYS[(i % 7) as usize]
    }

    pub fn name(self) -> &'static str {
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][self as usize]
    }
}

impl fmt::Display for Weekday {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Time as the throttle sees it.
pub trait Clock: Send + Sync {
    /// Monotonic time, for the token bucket.
    fn now(&self) -> Instant;
    /// Local weekday and seconds since local midnight, for the schedule.
    fn local_time(&self) -> (Weekday, u32);
    fn sleep(&self, d: Duration);
}

/// The real clock; the schedule follows the process's local time zone (TZ or
/// /etc/localtime), so DST changes move windows with the wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn local_time(&self) -> (Weekday, u32) {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        local_time_of(secs).unwrap_or_else(|| utc_time_of(secs))
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// Local weekday and time of day of a Unix time, via `localtime_r`.
fn local_time_of(unix: i64) -> Option<(Weekday, u32)> {
    // time_t is i64 here but 32 bits on some targets.
    #[allow(clippy::useless_conversion)]
    let t: libc::time_t = unix.try_into().ok()?;
    // SAFETY: localtime_r only writes into `tm`, which we own; it is
    // reentrant, unlike localtime.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return None;
        }
        tm
    };
    // tm_wday counts from Sunday; tm_sec may be 60 on a leap second.
    let day = Weekday::from_index((tm.tm_wday as u32 + 6) % 7);
    let secs = (tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec.min(59)) as u32;
    Some((day, secs.min(SECS_PER_DAY - 1)))
}

/// The fallback if the local time cannot be had: UTC (1970-01-01 was a
/// Thursday).
fn utc_time_of(unix: i64) -> (Weekday, u32) {
    let days = unix.div_euclid(SECS_PER_DAY as i64);
    let secs = unix.rem_euclid(SECS_PER_DAY as i64) as u32;
    (Weekday::from_index((days + 3).rem_euclid(7) as u32), secs)
}

type Event = Box<dyn FnOnce() + Send>;

/// A clock that moves only when told to (`advance`) or when someone sleeps
/// on it: tests of the throttle run minutes of simulated time in
/// microseconds, deterministically.
#[doc(hidden)]
pub struct ManualClock {
    base: Instant,
    /// Seconds since Monday 00:00 local time when the clock was made.
    week_start: u32,
    inner: Mutex<ManualInner>,
}

struct ManualInner {
    elapsed: Duration,
    /// Callbacks due at a simulated time, in no particular order.
    events: Vec<(Duration, Event)>,
}

impl ManualClock {
    /// A clock whose local time starts at `day`, `secs` after midnight.
    pub fn new(day: Weekday, secs: u32) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            base: Instant::now(),
            week_start: day.index() * SECS_PER_DAY + secs % SECS_PER_DAY,
            inner: Mutex::new(ManualInner {
                elapsed: Duration::ZERO,
                events: Vec::new(),
            }),
        })
    }

    /// Simulated time since the clock was made.
    pub fn elapsed(&self) -> Duration {
        self.inner.lock().elapsed
    }

    /// Runs `f` once the clock reaches `at` (since its creation), from
    /// whichever thread moves it there — e.g. a live change in the middle of
    /// a throttle's wait. `f` runs with no lock of the clock held.
    pub fn at(&self, at: Duration, f: impl FnOnce() + Send + 'static) {
        self.inner.lock().events.push((at, Box::new(f)));
    }

    /// Moves the clock forward by `d`, running the events due on the way at
    /// their own time.
    pub fn advance(&self, d: Duration) {
        let target = self.elapsed() + d;
        loop {
            let due = {
                let mut inner = self.inner.lock();
                let next = inner.events.iter().enumerate().min_by_key(|(_, e)| e.0);
                match next.map(|(i, e)| (i, e.0)) {
                    Some((i, at)) if at <= target => {
                        inner.elapsed = inner.elapsed.max(at);
                        Some(inner.events.swap_remove(i).1)
                    }
                    _ => {
                        inner.elapsed = inner.elapsed.max(target);
                        None
                    }
                }
            };
            match due {
                Some(f) => f(),
                None => return,
            }
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + self.elapsed()
    }

    fn local_time(&self) -> (Weekday, u32) {
        let week = 7 * SECS_PER_DAY as u64;
        let at = (self.week_start as u64 + self.elapsed().as_secs()) % week;
        (
            Weekday::from_index((at / SECS_PER_DAY as u64) as u32),
            (at % SECS_PER_DAY as u64) as u32,
        )
    }

    fn sleep(&self, d: Duration) {
        self.advance(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_fallback_knows_the_weekday() {
        // 2024-01-01 00:00:00 UTC was a Monday; 2023-12-31 23:59:59 a Sunday.
        assert_eq!(utc_time_of(1_704_067_200), (Weekday::Mon, 0));
        assert_eq!(utc_time_of(1_704_067_199), (Weekday::Sun, 86_399));
        assert_eq!(utc_time_of(0), (Weekday::Thu, 0));
    }

    #[test]
    fn the_system_clock_gives_a_local_time() {
        let (_, secs) = SystemClock.local_time();
        assert!(secs < SECS_PER_DAY);
    }

    #[test]
    fn the_manual_clock_wraps_days_and_weeks() {
        let c = ManualClock::new(Weekday::Sun, 23 * 3600 + 59 * 60);
        assert_eq!(c.local_time(), (Weekday::Sun, 86_340));
        c.advance(Duration::from_secs(90));
        assert_eq!(c.local_time(), (Weekday::Mon, 30));
        let t0 = c.now();
        c.sleep(Duration::from_millis(1500));
        assert_eq!(c.now() - t0, Duration::from_millis(1500));
    }

    #[test]
    fn manual_clock_events_run_in_order_at_their_time() {
        let c = ManualClock::new(Weekday::Mon, 0);
        let seen = Arc::new(Mutex::new(Vec::new()));
        for at in [3u64, 1, 2, 9] {
            let (s, c2) = (seen.clone(), Arc::downgrade(&c));
            c.at(Duration::from_secs(at), move || {
                let now = c2.upgrade().map(|c| c.elapsed().as_secs());
                s.lock().push((at, now));
            });
        }
        c.advance(Duration::from_secs(5));
        assert_eq!(*seen.lock(), vec![(1, Some(1)), (2, Some(2)), (3, Some(3))]);
        assert_eq!(c.elapsed(), Duration::from_secs(5));
    }
}
