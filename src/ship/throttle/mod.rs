//! Throttling of the shipper's wire bytes: a token bucket whose rate and size
//! come from, first match wins, a live override (`replfs throttle set`), the
//! schedule window in force (`[[throttle.window]]`), the default rate.
//!
//! The bucket holds at most `burst` bytes, so after an idle spell at most
//! `burst` goes out at line speed; it starts empty whenever limiting starts,
//! so a new limit holds from its first second. A request bigger than the
//! bucket waits for a full bucket and then takes it into debt (the bucket
//! goes negative and refills): huge batches cannot deadlock, and the average
//! rate still holds. Waits are sliced (≤ 50 ms) and the schedule is re-read
//! every 50 ms, so a live change or a window boundary acts even mid-wait.

pub mod clock;
mod config;
mod rate;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::info;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

#[doc(hidden)]
pub use clock::ManualClock;
pub use clock::{Clock, SystemClock, Weekday};
pub use config::{
    DaySet, MIN_BURST, ThrottleConfig, TimeOfDay, WindowConfig, check_burst, default_burst,
};
pub use rate::{MIN_RATE, Rate};

/// The longest single sleep inside `acquire`.
const SLICE: Duration = Duration::from_millis(50);
/// How stale the schedule's verdict may get before the local time is read
/// again (reading it costs a `localtime_r`; the shipper may ask thousands of
/// times a second).
const RECHECK: Duration = Duration::from_millis(50);

/// What limits the shipper now, and why; `replfs status` and `replfs
/// throttle show` print it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InForce {
    pub rate: Rate,
    /// The rate as a number for scripts; `null` = unlimited.
    pub bytes_per_sec: Option<u64>,
    /// Bucket size in bytes; 0 when unlimited.
    pub burst: u64,
    /// `live override (replfs throttle set)`, `schedule window 1: mon-fri
    /// 08:00-18:00` or `default rate`.
    pub reason: String,
}

/// The shipper's throttle; shared (`Arc`) between the shipper thread and the
/// control socket.
pub struct Throttle {
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    granted: AtomicU64,
}

struct State {
    cfg: ThrottleConfig,
    live: Option<(Rate, Option<u64>)>,
    policy: InForce,
    /// When `policy` was last worked out.
    checked: Instant,
    /// Bytes that may go now; negative = debt from an oversized request.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    refilled: Instant,
}

impl Throttle {
    pub fn new(cfg: &ThrottleConfig, clock: Arc<dyn Clock>) -> Throttle {
        let now = clock.now();
        let policy = policy_for(cfg, None, clock.local_time());
        info!("throttle: {}", describe(&policy));
        Throttle {
            state: Mutex::new(State {
                cfg: cfg.clone(),
                live: None,
                policy,
                checked: now,
                tokens: 0.0,
                refilled: now,
            }),
            clock,
            granted: AtomicU64::new(0),
        }
    }

    /// A throttle on the real clock and the local time zone.
    pub fn with_system_clock(cfg: &ThrottleConfig) -> Throttle {
        Throttle::new(cfg, Arc::new(SystemClock))
    }

    /// Blocks until `bytes` may go on the wire; false if `stop` was set while
    /// waiting (nothing is then taken from the bucket).
    pub fn acquire(&self, bytes: u64, stop: &AtomicBool) -> bool {
        loop {
            match self.try_acquire(bytes) {
                Ok(()) => return true,
                Err(wait) => {
                    if stop.load(Ordering::Acquire) {
                        return false;
                    }
                    self.clock.sleep(wait.min(SLICE));
                }
            }
        }
    }

    /// Takes `bytes` from the bucket if they may go now; else says how long
    /// until they may at the current rate (ask again then, or sooner: the
    /// rate may change). For a caller that has other work while it waits.
    pub fn try_acquire(&self, bytes: u64) -> Result<(), Duration> {
        let mut st = self.state.lock();
        self.settle(&mut st, false);
        let Some(rate) = st.policy.rate.bytes_per_sec() else {
            self.granted.fetch_add(bytes, Ordering::Relaxed);
            return Ok(());
        };
        // Oversized requests wait for a full bucket, then go into debt.
        let need = bytes.min(st.policy.burst) as f64;
        // Half a byte of slack absorbs float rounding of the refill.
        if st.tokens + 0.5 >= need {
            st.tokens -= bytes as f64;
            self.granted.fetch_add(bytes, Ordering::Relaxed);
            return Ok(());
        }
        if rate == 0 {
            return Err(SLICE);
        }
        let nanos = ((need - st.tokens) * 1e9 / rate as f64).ceil();
        Err(Duration::from_nanos((nanos as u64).max(1_000)))
    }

    /// The biggest batch worth building now: the bucket size when limited
    /// (bigger batches would go into debt), `None` when unlimited.
    pub fn max_batch(&self) -> Option<u64> {
        let mut st = self.state.lock();
        self.settle(&mut st, false);
        st.policy.rate.bytes_per_sec().map(|_| st.policy.burst)
    }

    /// An operator's override, in force over the config and the schedule
    /// until `clear_live`. Without `burst`: `[throttle].burst`, else
    /// `default_burst(rate)`. (`Rate::BytesPerSec(0)`, which `Rate`'s parser
    /// refuses, would pause shipping.)
    pub fn set_live(&self, rate: Rate, burst: Option<u64>) {
        let mut st = self.state.lock();
        st.live = Some((rate, burst));
        self.settle(&mut st, true);
    }

    /// Back to the schedule and the default rate.
    pub fn clear_live(&self) {
        let mut st = self.state.lock();
        st.live = None;
        self.settle(&mut st, true);
    }

    /// A reloaded config (SIGHUP); a live override stays in force. `cfg`
    /// should have passed `validate`: of overlapping windows the first wins.
    pub fn reconfigure(&self, cfg: &ThrottleConfig) {
        let mut st = self.state.lock();
        st.cfg = cfg.clone();
        self.settle(&mut st, true);
    }

    pub fn in_force(&self) -> InForce {
        let mut st = self.state.lock();
        self.settle(&mut st, false);
        st.policy.clone()
    }

    /// Bytes let through since the throttle was made.
    pub fn granted_bytes(&self) -> u64 {
        self.granted.load(Ordering::Relaxed)
    }

    /// Brings the bucket up to now at the rate that applied until now, then
    /// re-reads the policy if asked to or if its verdict is stale.
    fn settle(&self, st: &mut State, force: bool) {
        let now = self.clock.now();
        st.refill(now);
        if force || now.saturating_duration_since(st.checked) >= RECHECK {
            let p = policy_for(&st.cfg, st.live, self.clock.local_time());
            st.switch_to(p);
            st.checked = now;
        }
    }
}

impl State {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        if let Some(r) = self.policy.rate.bytes_per_sec() {
            self.tokens = (self.tokens + r as f64 * dt).min(self.policy.burst as f64);
        }
    }

    fn switch_to(&mut self, p: InForce) {
        if p == self.policy {
            return;
        }
        info!("throttle: {}", describe(&p));
        // Unlimited keeps no bucket: limiting starts again from empty. A
        // smaller bucket spills what it cannot hold; debt is kept.
        self.tokens = match p.rate {
            Rate::Unlimited => 0.0,
            Rate::BytesPerSec(_) => self.tokens.min(p.burst as f64),
        };
        self.policy = p;
    }
}

/// The policy at a local time: live override, else the window in force,
/// else the default.
fn policy_for(
    cfg: &ThrottleConfig,
    live: Option<(Rate, Option<u64>)>,
    (day, secs): (Weekday, u32),
) -> InForce {
    let (rate, burst, reason) = match (live, cfg.window_at(day, secs)) {
        (Some((rate, burst)), _) => (rate, burst, "live override (replfs throttle set)".into()),
        (None, Some((i, w))) => (w.rate, w.burst, format!("schedule window {}: {w}", i + 1)),
        (None, None) => (cfg.rate, None, "default rate".into()),
    };
    let burst = match rate {
        Rate::Unlimited => 0,
        Rate::BytesPerSec(_) => burst.or(cfg.burst).unwrap_or(default_burst(rate)).max(1),
    };
    InForce {
        rate,
        bytes_per_sec: rate.bytes_per_sec(),
        burst,
        reason,
    }
}

fn describe(p: &InForce) -> String {
    match p.rate {
        Rate::Unlimited => format!("unlimited ({})", p.reason),
        r => format!("{r}, burst {} ({})", human_size(p.burst), p.reason),
    }
}

/// `512 KiB`, `4 MiB`, or bytes when no binary unit states it exactly.
fn human_size(n: u64) -> String {
    let unit = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .into_iter()
        .find(|(_, u)| n >= *u && n % u == 0);
    match unit {
        Some((name, u)) => format!("{} {name}", n / u),
        None => format!("{n} bytes"),
    }
}

#[cfg(test)]
mod tests;
