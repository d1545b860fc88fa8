//! The BACKING checkpoint, and what a mount does after a machine restart.
//!
//! The WAL is synced every `wal.sync_interval` (10 ms) and shipped once
//! durable; BACKING's own changes sit in the page cache until the kernel
//! writes them back (up to `vm.dirty_expire_centisecs`, 30 s) or an fsync
//! through the mount. A machine crash can so leave records in the WAL — and
//! on the mirror — whose changes BACKING lost. BACKING is what the
//! applications saw survive the crash (every fsynced change is in it), so
//! the mirror is brought back to BACKING, not the reverse:
//!
//! - Every `mount.checkpoint_interval`, and at unmount, the mount reads the
//!   head LSN, `syncfs`es BACKING and records that LSN as the BACKING
//!   checkpoint ([`Wal::set_backing_checkpoint`]): every change logged up to
//!   it is durable in BACKING (a record is appended after its change was
//!   made). The WAL does not retire segments past it, and asks for an early
//!   checkpoint when that holds one back.
//! - The catalog keeps the kernel boot id of the last mount. A mount that
//!   finds another one and records after the checkpoint ([`recover`])
//!   records the paths those records name for resync: the shipper repairs
//!   them from BACKING by checksums once the mirror has applied the log. If
//!   the WAL no longer reaches back to the checkpoint, or more than
//!   [`MAX_PATHS`] paths are named, the whole tree is recorded instead.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use crossbeam_channel::{Sender, select};
use log::{info, warn};

use crate::catalog::{Catalog, KEY_BACKING_BOOT, KEY_BACKING_DOUBT};
use crate::wal::reader::WalReader;
use crate::wal::{Lsn, Wal, WalError};

/// Early checkpoints (asked by the WAL) come at most this often.
const MIN_SPACING: Duration = Duration::from_secs(1);

/// More paths than this after the checkpoint: the whole tree is resynced.
pub const MAX_PATHS: usize = 10_000;

const REASON: &str = "changed after the last BACKING checkpoint before the machine restarted";

/// The running kernel's boot id as text (`None` when unreadable).
fn boot_id() -> Option<String> {
    crate::daemon::boot_id().map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
}

/// At mount start, before any change: if the machine restarted since the
/// last mount and the WAL holds records after the BACKING checkpoint, record
/// the paths they name for resync (durably, before anything else), then
/// remember this boot. Also gives a state dir without a checkpoint (new, or
/// from before checkpoints) one at the head.
pub fn recover(state: &Path, wal: &Wal) -> Result<()> {
    let cat = Catalog::open(state)?;
    let head = wal.head_lsn();
    let checkpoint = wal.backing_checkpoint();
    let mut doubt: Option<Lsn> = cat.get(KEY_BACKING_DOUBT)?.and_then(|v| v.parse().ok());
    let now = boot_id();
    if let (Some(prev), Some(now)) = (cat.get(KEY_BACKING_BOOT)?, &now)
        && prev != *now
    {
        let c = checkpoint.unwrap_or(0);
        if c < head {
            warn!(
                "the machine restarted since the last mount: changes logged after LSN {c} \
                 (the last BACKING checkpoint) up to {head} may be missing from BACKING; \
                 their paths are recorded for resync, so the mirror is repaired to what \
                 BACKING holds"
            );
            let d = doubt.map_or(c, |d| d.min(c));
            cat.set(KEY_BACKING_DOUBT, &d.to_string())?;
            doubt = Some(d);
        }
    }
    if let Some(now) = &now {
        cat.set(KEY_BACKING_BOOT, now)?;
    }
    if let Some(d) = doubt {
        match paths_after(state, d, head)? {
            Some(paths) => {
                info!(
                    "{} path(s) recorded for resync after the restart",
                    paths.len()
                );
                cat.add_resyncs(&paths, REASON, head)?;
            }
            None => {
                warn!("the whole tree is recorded for resync after the restart");
                cat.add_resync(b"", REASON, head)?;
            }
        }
        cat.remove(KEY_BACKING_DOUBT)?;
    }
    if checkpoint.is_none() {
        wal.set_backing_checkpoint(head)?;
    }
    Ok(())
}

/// The distinct paths named by records `from + 1 ..= to`; `None` when the
/// WAL no longer holds them all or they are more than [`MAX_PATHS`].
fn paths_after(state: &Path, from: Lsn, to: Lsn) -> Result<Option<Vec<Vec<u8>>>> {
    let mut set = BTreeSet::new();
    if from >= to {
        return Ok(Some(Vec::new()));
    }
    for rec in WalReader::open(state)?.iter_range(from + 1, to) {
        let rec = match rec {
            Ok(r) => r,
            Err(WalError::NotRetained { .. }) => return Ok(None),
            Err(e) => return Err(e).context("reading the WAL after the BACKING checkpoint"),
        };
        for p in rec.op.paths() {
            set.insert(p.to_vec());
        }
        if set.len() > MAX_PATHS {
            return Ok(None);
        }
    }
    Ok(Some(set.into_iter().collect()))
}

/// The checkpoint thread of a mount.
pub struct Checkpointer {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

/// Starts checkpointing BACKING (`root`: a descriptor of its root) every
/// `interval`, and whenever the WAL asks.
pub fn spawn(wal: Wal, root: OwnedFd, interval: Duration) -> Result<Checkpointer> {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
    let kicks = wal.checkpoint_requests();
    let thread = std::thread::Builder::new()
        .name("checkpoint".into())
        .spawn(move || {
            loop {
                let last = select! {
                    recv(stopped) -> _ => true,
                    recv(kicks) -> _ => {
                        // At most one early checkpoint a second, however
                        // fast segments fill.
                        select! {
                            recv(stopped) -> _ => true,
                            default(MIN_SPACING) => false,
                        }
                    }
                    default(interval) => false,
                };
                if let Err(e) = checkpoint(&wal, &root) {
                    warn!("BACKING checkpoint failed: {e:#}");
                }
                if last {
                    break;
                }
            }
        })
        .context("cannot start the checkpoint thread")?;
    Ok(Checkpointer { stop, thread })
}

impl Checkpointer {
    /// Takes a last checkpoint (call once no change can come any more) and
    /// ends the thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// One checkpoint: the head LSN, then `syncfs`, then the record of it.
fn checkpoint(wal: &Wal, root: &OwnedFd) -> Result<()> {
    let head = wal.head_lsn();
    if wal.backing_checkpoint() == Some(head) {
        return Ok(());
    }
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(root.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("syncfs of BACKING");
    }
    wal.set_backing_checkpoint(head)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WalConfig;
    use crate::wal::{Attr, Op};
    use std::borrow::Cow;

    fn write(path: &str) -> Op<'static> {
        Op::Write {
            path: path.as_bytes().to_vec(),
            offset: 0,
            data: Cow::Owned(b"x".to_vec()),
            attr: Attr::default(),
        }
    }

    /// A 1 MiB write: a few fill a 4 MiB test segment.
    fn write_mib(path: &str) -> Op<'static> {
        Op::Write {
            path: path.as_bytes().to_vec(),
            offset: 0,
            data: Cow::Owned(vec![7u8; 1 << 20]),
            attr: Attr::default(),
        }
    }

    fn open(dir: &Path) -> Wal {
        let cfg = WalConfig {
            segment_size: 4 << 20,
            ..WalConfig::default()
        };
        Wal::open(dir, &cfg).unwrap().0
    }

    fn resync_paths(dir: &Path) -> Vec<String> {
        let rows = Catalog::open(dir).unwrap().resync_list().unwrap();
        rows.iter()
            .map(|r| String::from_utf8_lossy(&r.path).into_owned())
            .collect()
    }

    fn other_boot(dir: &Path) {
        Catalog::open(dir)
            .unwrap()
            .set(KEY_BACKING_BOOT, "00112233445566778899aabbccddeeff")
            .unwrap();
    }

    #[test]
    fn after_a_restart_only_paths_past_the_checkpoint_are_resynced() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path());
        recover(dir.path(), &wal).unwrap();
        assert_eq!(
            wal.backing_checkpoint(),
            Some(0),
            "a new state dir starts at its head"
        );
        for p in ["before/a", "before/b"] {
            wal.append(&write(p)).unwrap();
        }
        wal.set_backing_checkpoint(wal.head_lsn()).unwrap();
        for p in ["after/c", "after/c", "after/d"] {
            wal.append(&write(p)).unwrap();
        }
        let head = wal.head_lsn();
        wal.sync(head).unwrap();
        drop(wal);

        // Same boot (a crash of the mount process only): nothing to do.
        let wal = open(dir.path());
        recover(dir.path(), &wal).unwrap();
        assert!(resync_paths(dir.path()).is_empty());
        drop(wal);

        // Another boot: the paths after the checkpoint, each once.
        other_boot(dir.path());
        let wal = open(dir.path());
        recover(dir.path(), &wal).unwrap();
        assert_eq!(resync_paths(dir.path()), ["after/c", "after/d"]);
        let rows = Catalog::open(dir.path()).unwrap().resync_list().unwrap();
        assert!(rows.iter().all(|r| r.lsn == head && r.reason == REASON));
        let cat = Catalog::open(dir.path()).unwrap();
        assert_eq!(cat.get(KEY_BACKING_DOUBT).unwrap(), None, "handled once");
        assert_eq!(cat.get(KEY_BACKING_BOOT).unwrap(), boot_id());
        drop(wal);

        // A clean unmount's checkpoint at the head: a restart finds nothing.
        let wal = open(dir.path());
        wal.set_backing_checkpoint(wal.head_lsn()).unwrap();
        drop(wal);
        other_boot(dir.path());
        let wal = open(dir.path());
        recover(dir.path(), &wal).unwrap();
        assert_eq!(resync_paths(dir.path()).len(), 2, "nothing added");
    }

    #[test]
    fn records_no_longer_in_the_wal_resync_the_whole_tree() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path());
        recover(dir.path(), &wal).unwrap();
        // Enough records for several 4 MiB segments, acknowledged and
        // checkpointed, then retired.
        let big = write_mib("big");
        for _ in 0..12 {
            wal.append(&big).unwrap();
        }
        let head = wal.head_lsn();
        wal.sync(head).unwrap();
        assert!(
            wal.retire(head).unwrap().is_empty(),
            "held by the checkpoint"
        );
        let wal_dir = crate::wal::segment::wal_dir(dir.path());
        let files = || std::fs::read_dir(&wal_dir).unwrap().count();
        let before = files();
        wal.set_backing_checkpoint(head).unwrap();
        assert!(files() < before, "the checkpoint retires what it held back");
        wal.append(&write("late")).unwrap();
        wal.sync(wal.head_lsn()).unwrap();
        drop(wal);
        // The checkpoint as an older version would have left it: before
        // the retired records.
        Catalog::open(dir.path())
            .unwrap()
            .set(crate::catalog::KEY_BACKING_CHECKPOINT, "1")
            .unwrap();
        other_boot(dir.path());
        let wal = open(dir.path());
        recover(dir.path(), &wal).unwrap();
        assert_eq!(resync_paths(dir.path()), [""], "the whole tree");
    }

    #[test]
    fn a_segment_held_only_by_the_checkpoint_asks_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path());
        recover(dir.path(), &wal).unwrap();
        let kicks = wal.checkpoint_requests();
        let big = write_mib("big");
        for _ in 0..6 {
            wal.append(&big).unwrap();
        }
        wal.sync(wal.head_lsn()).unwrap();
        assert!(kicks.try_recv().is_err());
        assert!(wal.retire(wal.head_lsn()).unwrap().is_empty());
        assert!(
            kicks.try_recv().is_ok(),
            "retirement asked for a checkpoint"
        );
    }
}
