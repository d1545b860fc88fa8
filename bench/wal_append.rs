//! WAL append benchmark: records/s, MB/s and fsyncs per record for 4 KiB
//! writes (text-like and random data) and tiny metadata records, from 1 and
//! 4 threads in `batch` mode, and with a `sync` after every record from 4
//! threads (group commit). Prints figures; asserts nothing about time.
//!
//! `cargo bench --bench wal_append` — env: `WAL_BENCH_N` (records per
//! scenario, default 100000), `WAL_BENCH_DIR` (where the temp state dirs go),
//! `WAL_BENCH_ONLY` (run the scenarios whose name contains it),
//! `WAL_BENCH_DURABILITY` (`batch` (default), `os` or `always`),
//! `WAL_BENCH_COMPRESS_MIN` (bytes; default 512, huge = no compression).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use replfs::config::{Durability, WalConfig};
use replfs::wal::{Attr, Op, Ts, Wal};

#[derive(Clone, Copy)]
enum Payload {
    Text,
    Random,
    Meta,
}

struct Scenario {
    name: &'static str,
    payload: Payload,
    threads: usize,
    sync_each: bool,
    records: usize,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

const WORDS: &[&str] = &[
    "the",
    "replica",
    "segment",
    "write",
    "ahead",
    "log",
    "fsync",
    "mirror",
    "record",
    "of",
    "and",
    "error",
    "2024-05-01T12:00:00Z",
    "INFO",
    "request",
    "id=",
    "user",
    "path",
    "/var/lib",
    "{",
    "}",
    "\n",
    "    ",
    "return",
    "value",
    "0x7f3a",
    "latency_ms",
    "=",
    "ok",
    "failed",
];

/// 4 MiB of word soup (lz4 halves it, like source code or logs).
fn text_corpus() -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut out = Vec::with_capacity(4 << 20);
    while out.len() < 4 << 20 {
        let n = xorshift(&mut x);
        out.extend_from_slice(WORDS[(n % WORDS.len() as u64) as usize].as_bytes());
        if n & 0x300 != 0 {
            out.push(b' ');
        }
        if n % 97 == 0 {
            out.extend_from_slice(format!("{}", n % 100_000).as_bytes());
        }
    }
    out
}

fn random_corpus() -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..4 << 20).map(|_| xorshift(&mut x) as u8).collect()
}

fn make_op<'a>(payload: Payload, corpus: &'a [u8], i: usize) -> Op<'a> {
    let attr = Attr {
        mode: 0o100644,
        uid: 1000,
        gid: 1000,
        mtime: Ts {
            sec: 1_700_000_000 + i as i64,
            nsec: 0,
        },
    };
    let path = format!("projects/src/module{}/file{}.rs", i % 13, i % 101).into_bytes();
    match payload {
        Payload::Meta => Op::SetAttr {
            path,
            attr,
            atime: None,
        },
        Payload::Text | Payload::Random => {
            let start = (i * 4096 + i * 7) % (corpus.len() - 4096);
            let data = Cow::Borrowed(&corpus[start..start + 4096]);
            Op::Write {
                path,
                offset: (i as u64) * 4096,
                data,
                attr,
            }
        }
    }
}

/// The WAL settings under test, from the environment (see the module doc).
fn config_from_env() -> WalConfig {
    let durability = match std::env::var("WAL_BENCH_DURABILITY").as_deref() {
        Ok("os") => Durability::Os,
        Ok("always") => Durability::Always,
        _ => Durability::Batch,
    };
    let compress_min = std::env::var("WAL_BENCH_COMPRESS_MIN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    WalConfig {
        durability,
        compress_min,
        ..WalConfig::default()
    }
}

/// Appends `per_thread` records from each thread (syncing each if asked).
fn append_all(
    s: &Scenario,
    wal: &Wal,
    per_thread: usize,
    text: &Arc<Vec<u8>>,
    random: &Arc<Vec<u8>>,
) {
    let handles: Vec<_> = (0..s.threads)
        .map(|t| {
            let (wal, text, random) = (wal.clone(), text.clone(), random.clone());
            let (payload, sync_each) = (s.payload, s.sync_each);
            std::thread::spawn(move || {
                let corpus: &[u8] = if matches!(payload, Payload::Random) {
                    &random
                } else {
                    &text
                };
                for i in 0..per_thread {
                    let op = make_op(payload, corpus, t * per_thread + i);
                    let lsn = wal.append(&op).expect("append");
                    if sync_each {
                        wal.sync(lsn).expect("sync");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("bench thread");
    }
}

fn run(s: &Scenario, text: &Arc<Vec<u8>>, random: &Arc<Vec<u8>>) {
    let base = std::env::var_os("WAL_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let (wal, _) = Wal::open(dir.path(), &config_from_env()).expect("open WAL");
    // Start each scenario with no dirty data left over from the previous one.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let per_thread = s.records / s.threads;
    let t0 = Instant::now();
    append_all(s, &wal, per_thread, text, random);
    let appended = t0.elapsed();
    wal.close().expect("close");
    let total = t0.elapsed();
    let n = per_thread * s.threads;
    report(
        s,
        &wal,
        n,
        appended.as_secs_f64(),
        total.as_secs_f64(),
        dir.path(),
    );
}

fn report(s: &Scenario, wal: &Wal, n: usize, secs: f64, with_close: f64, dir: &std::path::Path) {
    let payload = match s.payload {
        Payload::Meta => 0,
        _ => 4096 * n,
    };
    let disk: u64 = replfs::wal::WalReader::open(dir)
        .and_then(|r| r.segments())
        .map(|v| v.iter().map(|s| s.bytes_used).sum())
        .unwrap_or(0);
    println!(
        "{:<34} {:>3} thr {:>8} rec {:>11.0} rec/s {:>8.1} MB/s payload {:>7.1} MB/s to WAL {:>8.4} fsync/rec  (incl. close {:.2}s)",
        s.name,
        s.threads,
        n,
        n as f64 / secs,
        payload as f64 / secs / 1e6,
        disk as f64 / secs / 1e6,
        wal.fsync_count() as f64 / n as f64,
        with_close,
    );
}

fn main() {
    let n: usize = std::env::var("WAL_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let (text, random) = (Arc::new(text_corpus()), Arc::new(random_corpus()));
    let sc = |name, payload, threads, sync_each, records| Scenario {
        name,
        payload,
        threads,
        sync_each,
        records,
    };
    let scenarios = [
        sc("4KiB text writes, batch", Payload::Text, 1, false, n),
        sc("4KiB random writes, batch", Payload::Random, 1, false, n),
        sc("metadata records, batch", Payload::Meta, 1, false, n),
        sc("4KiB text writes, batch", Payload::Text, 4, false, n),
        sc("4KiB random writes, batch", Payload::Random, 4, false, n),
        sc("metadata records, batch", Payload::Meta, 4, false, n),
        sc(
            "4KiB random, sync each (group)",
            Payload::Random,
            4,
            true,
            (n / 20).max(400),
        ),
        sc(
            "4KiB random, sync each, 1 thread",
            Payload::Random,
            1,
            true,
            (n / 40).max(200),
        ),
    ];
    println!("WAL append benchmark (default 64MiB segments, lz4 when it saves >= 1/8)");
    let only = std::env::var("WAL_BENCH_ONLY").unwrap_or_default();
    for s in scenarios.iter().filter(|s| s.name.contains(&only)) {
        run(s, &text, &random);
    }
}
