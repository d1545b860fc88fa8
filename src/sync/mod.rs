//! Baseline and delta sync, repair of paths logged as needing resync, and
//! verify: the source and the mirror compare their trees through the
//! protocol (manifests and block checksums are computed on each side, so
//! only differences cross the link).
//!
//! # When a sync runs
//! - **Baseline** (the whole tree): when the mirror's copy belongs to no
//!   source or to another one (first pairing, failback), when it is behind
//!   the oldest retained WAL record, or when the catalog holds a whole-tree
//!   resync row (WAL overflow, exclude list changed). The shipper makes the
//!   WAL durable up to `L0`, sends `SYNC_BEGIN(L0)` (the mirror is now at
//!   `L0`), brings the tree in line, then ships the log from `L0 + 1`.
//! - **Repair** of the catalog's resync rows (paths changed while the WAL was
//!   full, changes in flight at a crash): once the shipper has caught up,
//!   the subtree of each path (and its ancestors' metadata) is brought in line.
//!
//! # Why nothing changed during a sync is missed
//! The mount keeps serving and logging while the tree is copied, so the copy
//! is fuzzy: a file may be read before or after a change whose record
//! (LSN > L0) is shipped after the sync. Replaying those records on the copy
//! is harmless (the apply engine is idempotent for records already reflected
//! in the tree) but not always enough (a rename whose source the copy missed
//! and whose target it did not yet see). So every path that a record between
//! the sync's start and end touched is recorded as needing repair, and
//! repaired once the shipper has caught up again; a repair that is itself
//! disturbed does the same. When the source stops changing, a repair runs
//! with nothing moving and the mirror converges exactly.
//!
//! # Comparing
//! Both sides list the subtree as a manifest in one canonical order
//! ([`manifest`]), and the two sorted streams are merged. Regular files whose
//! size and mtime match are taken as equal (like rsync's quick check); others
//! get the mirror's block checksums (BLAKE3, blocks of 64 KiB or more) and
//! only the blocks that differ are sent. `verify` asks for a content hash of
//! every file on both sides instead.

pub mod delta;
pub mod manifest;
pub mod serve;
pub mod verify;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read, Seek, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};

use crate::proto::Msg;
use manifest::Entry;

/// One side of a sync conversation (the shipper's connection; tests plug a
/// mirror in directly).
pub trait Peer {
    /// Sends one message; returns the bytes put on the wire.
    fn send(&mut self, m: &Msg) -> Result<u64>;
    /// The mirror's next answer (keepalive answers are skipped).
    fn recv(&mut self) -> Result<Msg>;
    /// Called often during long stretches with nothing to send (walking an
    /// unchanged tree): keeps the connection from looking idle.
    fn keepalive(&mut self) -> Result<()> {
        Ok(())
    }
    /// The next answer may take this much longer than usual (the mirror
    /// reads a big file to checksum it).
    fn allow(&mut self, _extra: std::time::Duration) {}
}

/// How far a sync has got (shared with `status` and the progress line).
#[derive(Debug, Default)]
pub struct Progress {
    /// 0 = idle, 1 = counting, 2 = listing the mirror, 3 = copying.
    pub phase: AtomicU64,
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    /// Wire bytes sent by the sync (after compression).
    pub bytes_sent: AtomicU64,
    /// File data sent (before compression).
    pub data_sent: AtomicU64,
    /// Unix seconds at the start (0 = none yet).
    pub started: AtomicU64,
    /// Whole-tree baselines and partial repairs finished since start.
    pub baselines: AtomicU64,
    pub repairs: AtomicU64,
}

/// A point-in-time copy of [`Progress`] for display.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ProgressView {
    pub phase: String,
    pub files_total: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub bytes_done: u64,
    pub bytes_sent: u64,
    pub data_sent: u64,
    pub elapsed_seconds: f64,
    /// Bytes examined per second.
    pub rate: f64,
    pub eta_seconds: Option<f64>,
    pub baselines: u64,
    pub repairs: u64,
}

impl Progress {
    pub fn view(&self) -> ProgressView {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let phase = match g(&self.phase) {
            0 => "idle",
            1 => "counting",
            2 => "listing the mirror",
            _ => "copying",
        };
        let started = g(&self.started);
        let elapsed = if started == 0 || g(&self.phase) == 0 {
            0.0
        } else {
            (now_secs_f() - started as f64).max(0.0)
        };
        let (done, total) = (g(&self.bytes_done), g(&self.bytes_total));
        let rate = if elapsed > 0.5 {
            done as f64 / elapsed
        } else {
            0.0
        };
        let eta = (rate > 0.0 && total >= done).then(|| (total - done) as f64 / rate);
        ProgressView {
            phase: phase.into(),
            files_total: g(&self.files_total),
            bytes_total: total,
            files_done: g(&self.files_done),
            bytes_done: done,
            bytes_sent: g(&self.bytes_sent),
            data_sent: g(&self.data_sent),
            elapsed_seconds: elapsed,
            rate,
            eta_seconds: eta,
            baselines: g(&self.baselines),
            repairs: g(&self.repairs),
        }
    }

    fn start(&self) {
        for a in [
            &self.files_total,
            &self.bytes_total,
            &self.files_done,
            &self.bytes_done,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        self.started.store(now_secs_f() as u64, Ordering::Relaxed);
        self.phase.store(1, Ordering::Relaxed);
    }
}

impl ProgressView {
    /// One line for a terminal: `sync: 1234/5678 files, 1.2 GiB/3.4 GiB, 56 MiB/s, ETA 1m 2s`.
    pub fn line(&self) -> String {
        let eta = self
            .eta_seconds
            .map(|s| format!(", ETA {}", fmt_secs(s)))
            .unwrap_or_default();
        format!(
            "sync ({}): {}/{} files, {}/{}, {}/s, {} sent{eta}",
            self.phase,
            self.files_done,
            self.files_total,
            fmt_bytes(self.bytes_done as f64),
            fmt_bytes(self.bytes_total as f64),
            fmt_bytes(self.rate),
            fmt_bytes(self.bytes_sent as f64),
        )
    }
}

fn fmt_secs(s: f64) -> String {
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn fmt_bytes(b: f64) -> String {
    crate::status::human_bytes(b)
}

fn now_secs_f() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The mirror's manifest, received and kept on disk (an unnamed temporary
/// file in the state dir), so a tree of any size costs no memory and the
/// connection is free for sync ops while the lists are merged.
pub struct Spool {
    file: BufReader<File>,
    buf: VecDeque<Entry>,
    pub entries: u64,
}

impl Spool {
    /// Asks the peer for the manifest of `path` and spools it into `dir`.
    pub fn fetch(
        peer: &mut dyn Peer,
        path: &[u8],
        hashes: bool,
        dir: &std::path::Path,
    ) -> Result<Spool> {
        let mut f = tempfile::tempfile_in(dir)
            .with_context(|| format!("cannot create a spool file in {}", dir.display()))?;
        peer.send(&Msg::ManifestReq {
            path: path.to_vec(),
            hashes,
        })?;
        let mut w = std::io::BufWriter::new(&mut f);
        let mut entries = 0u64;
        loop {
            match peer.recv()? {
                Msg::Manifest { last, entries: raw } => {
                    // Validate now: a bad listing is refused before any op.
                    entries += manifest::decode_entries(&raw)?.len() as u64;
                    w.write_all(&(raw.len() as u32).to_le_bytes())?;
                    w.write_all(&raw)?;
                    if last {
                        break;
                    }
                }
                Msg::Error { msg } => bail!("the mirror refused: {msg}"),
                other => bail!("expected a Manifest from the mirror, got {}", other.name()),
            }
        }
        w.flush()?;
        drop(w);
        f.rewind()?;
        Ok(Spool {
            file: BufReader::with_capacity(256 << 10, f),
            buf: VecDeque::new(),
            entries,
        })
    }

    fn fill(&mut self) -> Result<()> {
        while self.buf.is_empty() {
            let mut len = [0u8; 4];
            match self.file.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let mut raw = vec![0u8; u32::from_le_bytes(len) as usize];
            self.file.read_exact(&mut raw)?;
            self.buf.extend(manifest::decode_entries(&raw)?);
        }
        Ok(())
    }

    pub fn peek(&mut self) -> Result<Option<&Entry>> {
        self.fill()?;
        Ok(self.buf.front())
    }

    pub fn take(&mut self) -> Result<Option<Entry>> {
        self.fill()?;
        Ok(self.buf.pop_front())
    }
}

/// Sorts paths and drops those below another one in the list (a repair of
/// a directory covers its subtree); `""` covers everything.
pub fn collapse(mut paths: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    paths.sort_by(|a, b| manifest::path_cmp(a, b));
    paths.dedup();
    let mut out: Vec<Vec<u8>> = Vec::new();
    for p in paths {
        if out.last().is_some_and(|l| manifest::is_within(&p, l)) {
            continue;
        }
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests;
