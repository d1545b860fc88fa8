//! Tests of the token bucket and its policy on simulated time (`ManualClock`):
//! accuracy over 10 s spans, bursts, live changes, schedule boundaries.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// How fast the simulated link itself goes (sending takes time even unlimited).
const LINE: u64 = 100 * MIB;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn hm(h: u32, m: u32) -> u32 {
    h * 3600 + m * 60
}

fn limited(rate: u64, burst: Option<u64>) -> ThrottleConfig {
    ThrottleConfig {
        rate: Rate::BytesPerSec(rate),
        burst,
        windows: Vec::new(),
    }
}

fn setup(cfg: &ThrottleConfig, day: Weekday, at: u32) -> (Arc<ManualClock>, Arc<Throttle>) {
    let clock = ManualClock::new(day, at);
    let t = Arc::new(Throttle::new(cfg, clock.clone()));
    (clock, t)
}

/// A sender with a constant backlog: `batch`-sized requests until `until`,
/// each taking `batch / LINE` on the wire. Returns (grant time, bytes).
fn pump(clock: &ManualClock, t: &Throttle, batch: u64, until: f64) -> Vec<(f64, u64)> {
    let stop = AtomicBool::new(false);
    let mut grants = Vec::new();
    while clock.elapsed().as_secs_f64() < until {
        assert!(t.acquire(batch, &stop));
        grants.push((clock.elapsed().as_secs_f64(), batch));
        clock.advance(Duration::from_nanos(batch * 1_000_000_000 / LINE));
    }
    grants
}

fn sent_in(grants: &[(f64, u64)], from: f64, to: f64) -> u64 {
    grants
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(_, b)| b)
        .sum()
}

/// Every 10 s span starting in [from, to] (in 100 ms steps) carries within
/// 5% of `rate` × 10 s.
fn assert_10s_rate(grants: &[(f64, u64)], rate: u64, from: f64, to: f64) {
    let mut a = from;
    while a <= to + 1e-9 {
        let ratio = sent_in(grants, a, a + 10.0) as f64 / (rate as f64 * 10.0);
        assert!(
            (0.95..=1.05).contains(&ratio),
            "10 s from {a:.1} s: {ratio:.4} of the rate"
        );
        a += 0.1;
    }
}

/// Token-bucket conformance: between any two grants i <= j, no more than
/// `burst + rate × (t_j - t_i)` went out.
fn assert_conforms(grants: &[(f64, u64)], rate: u64, burst: u64) {
    for i in 0..grants.len() {
        let mut sum = 0;
        for g in &grants[i..] {
            sum += g.1;
            let allowed = burst as f64 + rate as f64 * (g.0 - grants[i].0) + 1.0;
            assert!(
                sum as f64 <= allowed,
                "{sum} bytes from {} s to {} s",
                grants[i].0,
                g.0
            );
        }
    }
}

#[test]
fn a_steady_backlog_ships_within_5_percent_of_the_rate() {
    let (clock, t) = setup(&limited(2 * MIB, None), Weekday::Mon, 0);
    let grants = pump(&clock, &t, 256 * KIB, 60.0);
    assert_10s_rate(&grants, 2 * MIB, 0.0, 50.0);
    assert_conforms(&grants, 2 * MIB, 512 * KIB);
    assert_eq!(t.max_batch(), Some(512 * KIB));
    assert_eq!(t.granted_bytes(), grants.iter().map(|g| g.1).sum::<u64>());
}

#[test]
fn after_an_idle_spell_only_the_burst_goes_at_once() {
    let (clock, t) = setup(&limited(2 * MIB, None), Weekday::Mon, 0);
    pump(&clock, &t, 64 * KIB, 5.0);
    clock.advance(secs(30.0));
    let start = clock.elapsed().as_secs_f64();
    let grants = pump(&clock, &t, 64 * KIB, start + 12.0);
    // What went before the bucket ran dry: the burst, at line speed.
    let line_gap = 64.0 * KIB as f64 / LINE as f64 + 1e-9;
    let first: u64 = grants
        .windows(2)
        .take_while(|w| w[1].0 - w[0].0 <= line_gap)
        .map(|w| w[0].1)
        .sum::<u64>()
        + 64 * KIB;
    assert_eq!(first, 512 * KIB);
    assert_conforms(&grants, 2 * MIB, 512 * KIB);
    // Even the 10 s starting with the full bucket stays within 5% (2.5%).
    assert_10s_rate(&grants, 2 * MIB, start, start + 2.0);
}

#[test]
fn a_request_bigger_than_the_bucket_goes_into_debt() {
    let (clock, t) = setup(&limited(MIB, Some(64 * KIB)), Weekday::Mon, 0);
    let grants = pump(&clock, &t, MIB, 31.0);
    assert_10s_rate(&grants, MIB, 1.0, 20.0);
    let gaps: Vec<f64> = grants.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(gaps.iter().all(|g| (g - 1.0).abs() < 0.01), "{gaps:?}");
}

#[test]
fn a_live_limit_takes_effect_within_a_second() {
    let (clock, t) = setup(&ThrottleConfig::default(), Weekday::Mon, 0);
    assert_eq!(t.max_batch(), None);
    let t2 = t.clone();
    clock.at(secs(5.0), move || t2.set_live(Rate::BytesPerSec(MIB), None));
    let grants = pump(&clock, &t, 256 * KIB, 30.0);
    // Unlimited: line speed.
    assert!(sent_in(&grants, 0.0, 5.0) > 4 * LINE);
    // From the change on, nothing beyond the bucket (empty at the switch).
    let after: Vec<_> = grants.iter().copied().filter(|g| g.0 >= 5.0).collect();
    assert_conforms(&after, MIB, 256 * KIB);
    assert!(sent_in(&grants, 5.0, 6.0) <= MIB + 256 * KIB);
    assert_10s_rate(&grants, MIB, 5.0, 20.0);
    let f = t.in_force();
    assert_eq!((f.rate, f.burst), (Rate::BytesPerSec(MIB), 256 * KIB));
    assert_eq!(f.reason, "live override (replfs throttle set)");
}

#[test]
fn a_live_change_acts_in_the_middle_of_a_wait() {
    let (clock, t) = setup(&limited(4 * KIB, None), Weekday::Mon, 0);
    let t2 = t.clone();
    // 256 KiB at 4 KiB/s would take 16 s (the bucket, 64 KiB, then debt).
    clock.at(secs(2.0), move || t2.set_live(Rate::Unlimited, None));
    assert!(t.acquire(256 * KIB, &AtomicBool::new(false)));
    let waited = clock.elapsed().as_secs_f64();
    assert!((2.0..2.06).contains(&waited), "waited {waited} s");
    // And back: clearing the override restores the configured rate.
    t.clear_live();
    assert_eq!(t.in_force().rate, Rate::BytesPerSec(4 * KIB));
    assert_eq!(t.in_force().reason, "default rate");
}

#[test]
fn a_slower_live_rate_acts_mid_wait_too() {
    let (clock, t) = setup(&limited(8 * MIB, None), Weekday::Mon, 0);
    let t2 = t.clone();
    clock.at(secs(5.1), move || {
        t2.set_live(Rate::BytesPerSec(MIB), Some(128 * KIB))
    });
    let grants = pump(&clock, &t, 2 * MIB, 25.0);
    let after: Vec<_> = grants.iter().copied().filter(|g| g.0 >= 5.1).collect();
    // The 2 MiB requests are bigger than the new bucket: each waits for a
    // full bucket and goes into debt, so only the average is bounded.
    assert_10s_rate(&grants, MIB, 6.0, 12.0);
    assert!(after.len() <= 11, "{} grants after the change", after.len());
}

#[test]
fn stop_ends_a_wait_without_taking_tokens() {
    let (clock, t) = setup(&limited(4 * KIB, None), Weekday::Mon, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    clock.at(secs(1.0), move || {
        s2.store(true, std::sync::atomic::Ordering::Release)
    });
    assert!(!t.acquire(64 * KIB, &stop));
    assert!(clock.elapsed() < secs(1.06));
    assert_eq!(t.granted_bytes(), 0);
}

fn office_hours(day_rate: u64) -> ThrottleConfig {
    ThrottleConfig {
        rate: Rate::BytesPerSec(8 * MIB),
        burst: None,
        windows: vec![WindowConfig {
            days: "mon-fri".parse().unwrap(),
            start: TimeOfDay(hm(8, 0)),
            end: TimeOfDay(hm(18, 0)),
            rate: Rate::BytesPerSec(day_rate),
            burst: Some(256 * KIB),
        }],
    }
}

#[test]
fn the_schedule_switches_at_the_window_boundary() {
    // Monday 17:59:00: one minute of office hours left.
    let (clock, t) = setup(&office_hours(MIB), Weekday::Mon, hm(17, 59));
    let f = t.in_force();
    assert_eq!(f.reason, "schedule window 1: mon-fri 08:00-18:00");
    assert_eq!((f.rate, f.burst), (Rate::BytesPerSec(MIB), 256 * KIB));
    let grants = pump(&clock, &t, 64 * KIB, 75.0);
    assert_10s_rate(&grants, MIB, 0.0, 50.0);
    // 18:00 is at 60 s; the new rate holds from within 1 s of it.
    assert_10s_rate(&grants, 8 * MIB, 60.1, 65.0);
    assert!(sent_in(&grants, 59.0, 60.0) <= MIB + 64 * KIB);
    let f = t.in_force();
    assert_eq!(
        (f.rate, f.reason.as_str()),
        (Rate::BytesPerSec(8 * MIB), "default rate")
    );
    assert_eq!(f.burst, 2 * MIB);
}

#[test]
fn a_live_override_survives_reload_and_schedule() {
    let (clock, t) = setup(&office_hours(MIB), Weekday::Fri, hm(7, 59));
    t.set_live(Rate::BytesPerSec(3 * MIB), None);
    clock.advance(secs(120.0));
    t.reconfigure(&office_hours(2 * MIB));
    let f = t.in_force();
    assert_eq!(f.rate, Rate::BytesPerSec(3 * MIB));
    assert_eq!(f.burst, 768 * KIB);
    assert!(f.reason.starts_with("live override"));
    t.clear_live();
    assert_eq!(t.in_force().rate, Rate::BytesPerSec(2 * MIB));
    // From Friday 18:00 no window is in force until Monday 08:00.
    clock.advance(secs(10.0 * 3600.0));
    assert_eq!(t.in_force().rate, Rate::BytesPerSec(8 * MIB));
    clock.advance(secs((2 * 86400 + 3600) as f64));
    assert_eq!(t.in_force().rate, Rate::BytesPerSec(8 * MIB));
    clock.advance(secs(13.0 * 3600.0));
    assert_eq!(t.in_force().rate, Rate::BytesPerSec(2 * MIB));
}

#[test]
fn a_night_window_crossing_midnight_opens_the_tap() {
    let cfg = ThrottleConfig {
        rate: Rate::BytesPerSec(MIB),
        burst: Some(MIB),
        windows: vec![WindowConfig {
            days: "mon-fri".parse().unwrap(),
            start: TimeOfDay(hm(22, 0)),
            end: TimeOfDay(hm(6, 0)),
            rate: Rate::Unlimited,
            burst: None,
        }],
    };
    let (clock, t) = setup(&cfg, Weekday::Fri, hm(21, 59));
    assert_eq!(t.in_force().rate, Rate::BytesPerSec(MIB));
    clock.advance(secs(60.0));
    let f = t.in_force();
    assert_eq!((f.rate, f.burst), (Rate::Unlimited, 0));
    assert_eq!(f.reason, "schedule window 1: mon-fri 22:00-06:00");
    assert_eq!(t.max_batch(), None);
    // Saturday 05:59 is still Friday's night; 06:00 is not.
    clock.advance(secs((8 * 3600 - 60) as f64));
    assert_eq!(t.in_force().rate, Rate::Unlimited);
    clock.advance(secs(60.0));
    assert_eq!(t.in_force().rate, Rate::BytesPerSec(MIB));
    // Saturday night has no window.
    clock.advance(secs((17 * 3600) as f64));
    assert_eq!(t.in_force().rate, Rate::BytesPerSec(MIB));
}

#[test]
fn a_smaller_bucket_spills_what_it_cannot_hold() {
    let (clock, t) = setup(&limited(8 * MIB, Some(4 * MIB)), Weekday::Mon, 0);
    clock.advance(secs(10.0));
    t.set_live(Rate::BytesPerSec(MIB), Some(64 * KIB));
    let stop = AtomicBool::new(false);
    assert!(t.acquire(64 * KIB, &stop));
    assert_eq!(t.try_acquire(64 * KIB), Err(Duration::from_micros(62_500)));
}

#[test]
fn in_force_serializes_for_the_status_command() {
    let (_clock, t) = setup(&limited(2 * MIB, Some(MIB)), Weekday::Mon, 0);
    let v = serde_json::to_value(t.in_force()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"rate": "2 MiB/s", "bytes_per_sec": 2 * MIB,
                           "burst": MIB, "reason": "default rate"})
    );
}

#[test]
fn real_time_a_waiting_sender_wakes_on_a_live_change() {
    let t = Arc::new(Throttle::with_system_clock(&limited(4 * KIB, None)));
    let t2 = t.clone();
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        t2.set_live(Rate::Unlimited, None);
    });
    let start = std::time::Instant::now();
    assert!(t.acquire(64 * KIB, &AtomicBool::new(false)));
    let waited = start.elapsed();
    h.join().unwrap();
    assert!(waited >= Duration::from_millis(140), "{waited:?}");
    assert!(waited < Duration::from_millis(400), "{waited:?}");
}
