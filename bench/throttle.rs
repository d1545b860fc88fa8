//! Throttle accuracy on the real clock: a sender with a constant backlog
//! pushes fixed-size batches through `Throttle::acquire` for ~12 s per
//! setting and prints the achieved rate over each 10 s sliding window, its
//! ratio to the setting, and the most the sender ever got ahead of the rate
//! (the bucket depth used, which must stay within the burst).
//!
//! `cargo bench --bench throttle`; `THROTTLE_BENCH_SECS=N` changes the run
//! length (the 10 s windows need N > 10).

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use replfs::ship::throttle::{Rate, Throttle, ThrottleConfig};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const WINDOW: f64 = 10.0;

struct Setting {
    rate: u64,
    burst: Option<u64>,
    batch: u64,
}

fn main() {
    let secs = std::env::var("THROTTLE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > WINDOW)
        .unwrap_or(12.0);
    let settings = [
        Setting {
            rate: 8 * MIB,
            burst: None,
            batch: 64 * KIB,
        },
        Setting {
            rate: MIB,
            burst: Some(256 * KIB),
            batch: 64 * KIB,
        },
    ];
    for s in &settings {
        run(s, secs);
    }
}

fn run(s: &Setting, secs: f64) {
    let cfg = ThrottleConfig {
        rate: Rate::BytesPerSec(s.rate),
        burst: s.burst,
        windows: Vec::new(),
    };
    let t = Throttle::with_system_clock(&cfg);
    let f = t.in_force();
    println!(
        "rate {} burst {} KiB, batches of {} KiB, {secs:.0} s on the real clock",
        f.rate,
        f.burst / KIB,
        s.batch / KIB
    );
    let grants = pump(&t, s.batch, Duration::from_secs_f64(secs));
    report(&grants, s.rate, f.burst);
}

/// (seconds since start, bytes) of every grant.
fn pump(t: &Throttle, batch: u64, run_for: Duration) -> Vec<(f64, u64)> {
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let mut grants = Vec::new();
    while start.elapsed() < run_for {
        if t.acquire(batch, &stop) {
            grants.push((start.elapsed().as_secs_f64(), batch));
        }
    }
    grants
}

fn report(grants: &[(f64, u64)], rate: u64, burst: u64) {
    let end = grants.last().map_or(0.0, |g| g.0);
    let mut a = 0.0;
    let (mut lo, mut hi) = (f64::MAX, 0.0f64);
    while a + WINDOW <= end + 1e-9 {
        let bytes: u64 = grants
            .iter()
            .filter(|g| g.0 >= a && g.0 < a + WINDOW)
            .map(|g| g.1)
            .sum();
        let achieved = bytes as f64 / WINDOW;
        let ratio = achieved / rate as f64;
        (lo, hi) = (lo.min(ratio), hi.max(ratio));
        println!(
            "  10 s from {a:4.1} s: {:8.3} MiB/s = {ratio:.4} of the setting",
            achieved / MIB as f64
        );
        a += 0.5;
    }
    let total: u64 = grants.iter().map(|g| g.1).sum();
    println!(
        "  whole run: {:.3} MiB/s = {:.4}; 10 s windows {lo:.4} .. {hi:.4}",
        total as f64 / end.max(1e-9) / MIB as f64,
        total as f64 / end.max(1e-9) / rate as f64
    );
    println!(
        "  most ahead of the rate: {} KiB (burst {} KiB)\n",
        max_ahead(grants, rate) / KIB,
        burst / KIB
    );
}

/// The largest `bytes(i..=j) - rate × (t_j - t_i)` over grants i <= j: how
/// far the sender ever got ahead of the rate, i.e. the bucket depth used.
fn max_ahead(grants: &[(f64, u64)], rate: u64) -> u64 {
    // Kadane-style: the best run ending at j either extends the one ending
    // at j-1 or starts afresh at j.
    let mut best = 0.0f64;
    let mut run = 0.0f64;
    let mut prev_t = 0.0;
    for (i, &(t, b)) in grants.iter().enumerate() {
        let carried = if i == 0 {
            0.0
        } else {
            run - rate as f64 * (t - prev_t)
        };
        run = carried.max(0.0) + b as f64;
        best = best.max(run);
        prev_t = t;
    }
    best as u64
}
