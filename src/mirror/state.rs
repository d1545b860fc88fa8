//! The mirror's state dir: `mirror.db` (rusqlite: per-volume positions,
//! peers, resync requests), one position file per volume, and the lock.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use log::warn;
use rusqlite::{Connection, OptionalExtension, params};

use crate::daemon::boot_id;
use crate::wal::Lsn;

/// File name of the mirror catalog inside the state dir.
pub const MIRROR_DB: &str = "mirror.db";
/// Lock file: one mirror process per state dir.
pub const LOCK_FILE: &str = "mirror.lock";
/// Directory of the per-volume position files.
pub const POSITIONS_DIR: &str = "positions";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS volumes (
    id              TEXT PRIMARY KEY,
    dir             TEXT    NOT NULL,
    applied_lsn     INTEGER NOT NULL DEFAULT 0,
    applied_time_ns INTEGER NOT NULL DEFAULT 0,
    last_batch_ns   INTEGER,
    peer            TEXT
);
CREATE TABLE IF NOT EXISTS resync (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    volume  TEXT    NOT NULL,
    path    BLOB    NOT NULL,
    reason  TEXT    NOT NULL,
    lsn     INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    UNIQUE (volume, lsn, path)
);
CREATE TABLE IF NOT EXISTS sources (
    volume  TEXT PRIMARY KEY,
    source  TEXT NOT NULL,
    horizon INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS in_doubt (
    volume  TEXT PRIMARY KEY,
    upto    INTEGER NOT NULL
);
";

fn to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One volume as `mirror.db` knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRow {
    pub id: String,
    pub dir: String,
    pub applied_lsn: Lsn,
    /// Log time (ns since the epoch) of the last applied record: the lag in
    /// seconds is the source's head time minus this.
    pub applied_time_ns: i64,
    /// When the last batch was finished (ns since the epoch).
    pub last_batch_ns: Option<i64>,
    /// Address of the last shipper that authenticated for this volume.
    pub peer: Option<String>,
}

/// A path a `Resync` record asked the mirror to resynchronise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncRow {
    pub volume: String,
    pub path: Vec<u8>,
    pub reason: String,
    pub lsn: Lsn,
    pub time_ns: i64,
}

/// The open `mirror.db`. Other processes (status tools) may read it at the
/// same time: WAL journal mode and a busy timeout.
pub struct MirrorDb {
    conn: Connection,
    path: PathBuf,
}

impl MirrorDb {
    pub fn open(state: &Path) -> Result<MirrorDb> {
        let path = state.join(MIRROR_DB);
        let ctx = || format!("mirror catalog {}", path.display());
        let conn = Connection::open(&path).with_context(ctx)?;
        conn.busy_timeout(Duration::from_secs(10))
            .with_context(ctx)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .with_context(ctx)?;
        // FULL: an Ack promises the position survives a machine crash.
        conn.pragma_update(None, "synchronous", "FULL")
            .with_context(ctx)?;
        conn.execute_batch(SCHEMA).with_context(ctx)?;
        Ok(MirrorDb { conn, path })
    }

    fn ctx(&self) -> String {
        format!("mirror catalog {}", self.path.display())
    }

    pub fn volume(&self, id: &str) -> Result<Option<VolumeRow>> {
        self.conn
            .query_row(
                "SELECT id, dir, applied_lsn, applied_time_ns, last_batch_ns, peer
                 FROM volumes WHERE id = ?1",
                [id],
                |r| {
                    Ok(VolumeRow {
                        id: r.get(0)?,
                        dir: r.get(1)?,
                        applied_lsn: r.get::<_, i64>(2)? as u64,
                        applied_time_ns: r.get(3)?,
                        last_batch_ns: r.get(4)?,
                        peer: r.get(5)?,
                    })
                },
            )
            .optional()
            .with_context(|| self.ctx())
    }

    /// Creates the row of a new volume, or records its (possibly new) dir.
    pub fn ensure_volume(&self, id: &str, dir: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO volumes (id, dir) VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET dir = excluded.dir",
                [id, dir],
            )
            .map(drop)
            .with_context(|| self.ctx())
    }

    pub fn set_peer(&self, id: &str, peer: &str) -> Result<()> {
        self.conn
            .execute("UPDATE volumes SET peer = ?2 WHERE id = ?1", [id, peer])
            .map(drop)
            .with_context(|| self.ctx())
    }

    /// Records the end of a batch: the applied position and when.
    pub fn set_applied(&self, id: &str, lsn: Lsn, time_ns: i64, batch_ns: i64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE volumes SET applied_lsn = ?2, applied_time_ns = ?3, last_batch_ns = ?4
                 WHERE id = ?1",
                params![id, to_sql(lsn), time_ns, batch_ns],
            )
            .map(drop)
            .with_context(|| self.ctx())
    }

    /// The source the volume's replica was last baselined from ("" = none)
    /// and the sync horizon (records up to it may be skipped when they
    /// cannot apply: see `Msg::SyncEnd`).
    pub fn source(&self, volume: &str) -> Result<(String, Lsn)> {
        Ok(self
            .conn
            .query_row(
                "SELECT source, horizon FROM sources WHERE volume = ?1",
                [volume],
                |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)),
            )
            .optional()
            .with_context(|| self.ctx())?
            .unwrap_or_default())
    }

    /// Records the horizon of the last sync.
    pub fn set_horizon(&self, volume: &str, horizon: Lsn) -> Result<()> {
        self.conn
            .execute(
                "UPDATE sources SET horizon = ?2 WHERE volume = ?1",
                params![volume, to_sql(horizon)],
            )
            .map(drop)
            .with_context(|| self.ctx())
    }

    /// A baseline from `source` starts: the replica is now positioned at
    /// `lsn` of that source's log, and earlier resync requests are void.
    pub fn begin_baseline(&self, volume: &str, source: &str, lsn: Lsn, now_ns: i64) -> Result<()> {
        let tx = self
            .conn
            .unchecked_transaction()
            .with_context(|| self.ctx())?;
        tx.execute(
            "INSERT INTO sources (volume, source) VALUES (?1, ?2)
             ON CONFLICT (volume) DO UPDATE SET source = excluded.source",
            [volume, source],
        )
        .with_context(|| self.ctx())?;
        tx.execute(
            "UPDATE volumes SET applied_lsn = ?2, applied_time_ns = ?3, last_batch_ns = ?3
             WHERE id = ?1",
            params![volume, to_sql(lsn), now_ns],
        )
        .with_context(|| self.ctx())?;
        tx.execute("DELETE FROM resync WHERE volume = ?1", [volume])
            .with_context(|| self.ctx())?;
        tx.execute("DELETE FROM in_doubt WHERE volume = ?1", [volume])
            .with_context(|| self.ctx())?;
        tx.commit().with_context(|| self.ctx())
    }

    /// The last LSN of the records a machine crash left in doubt (0: none):
    /// see `Volume::open`.
    pub fn in_doubt(&self, volume: &str) -> Result<Lsn> {
        Ok(self
            .conn
            .query_row(
                "SELECT upto FROM in_doubt WHERE volume = ?1",
                [volume],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .with_context(|| self.ctx())?
            .map_or(0, |v| v as u64))
    }

    /// Records that the records up to `upto` are in doubt (0: none are).
    pub fn set_in_doubt(&self, volume: &str, upto: Lsn) -> Result<()> {
        let r = if upto == 0 {
            self.conn
                .execute("DELETE FROM in_doubt WHERE volume = ?1", [volume])
        } else {
            self.conn.execute(
                "INSERT INTO in_doubt (volume, upto) VALUES (?1, ?2)
                 ON CONFLICT (volume) DO UPDATE SET upto = excluded.upto",
                params![volume, to_sql(upto)],
            )
        };
        r.map(drop).with_context(|| self.ctx())
    }

    /// Records a resync request; recording the same one twice (a record
    /// re-applied after a crash) keeps one row.
    pub fn add_resync(&self, volume: &str, path: &[u8], reason: &str, lsn: Lsn) -> Result<()> {
        self.add_resyncs(volume, &[path], reason, lsn)
    }

    /// Records several resync requests in one transaction (one flush).
    pub fn add_resyncs(
        &self,
        volume: &str,
        paths: &[impl AsRef<[u8]>],
        reason: &str,
        lsn: Lsn,
    ) -> Result<()> {
        let now = crate::wal::segment::now_ns();
        let tx = self
            .conn
            .unchecked_transaction()
            .with_context(|| self.ctx())?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO resync (volume, path, reason, lsn, time_ns)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .with_context(|| self.ctx())?;
            for p in paths {
                st.execute(params![volume, p.as_ref(), reason, to_sql(lsn), now])
                    .with_context(|| self.ctx())?;
            }
        }
        tx.commit().with_context(|| self.ctx())
    }

    /// The paths of a volume's resync requests (for the shipper to repair)
    /// and the highest row id among them (None: no request).
    pub fn resync_paths(&self, volume: &str) -> Result<(Vec<Vec<u8>>, Option<i64>)> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id, path FROM resync WHERE volume = ?1 ORDER BY id")
            .with_context(|| self.ctx())?;
        let rows: Vec<(i64, Vec<u8>)> = st
            .query_map([volume], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(Iterator::collect)
            .with_context(|| self.ctx())?;
        let max = rows.last().map(|r| r.0);
        Ok((rows.into_iter().map(|r| r.1).collect(), max))
    }

    /// Drops a volume's resync requests up to row `id` (repaired).
    pub fn clear_resync(&self, volume: &str, id: i64) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM resync WHERE volume = ?1 AND id <= ?2",
                params![volume, id],
            )
            .map(drop)
            .with_context(|| self.ctx())
    }

    /// Resync requests of a volume, oldest first.
    pub fn resync_list(&self, volume: &str) -> Result<Vec<ResyncRow>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT volume, path, reason, lsn, time_ns FROM resync
                 WHERE volume = ?1 ORDER BY id",
            )
            .with_context(|| self.ctx())?;
        let rows = st.query_map([volume], |r| {
            Ok(ResyncRow {
                volume: r.get(0)?,
                path: r.get(1)?,
                reason: r.get(2)?,
                lsn: r.get::<_, i64>(3)? as u64,
                time_ns: r.get(4)?,
            })
        });
        rows.and_then(Iterator::collect).with_context(|| self.ctx())
    }
}

/// Takes the exclusive `flock` on `STATE/mirror.lock` (held while the
/// returned file is open).
pub fn lock_state(state: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let path = state.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: a valid open descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "another replfs mirror is using the state dir {} (lock {})",
                state.display(),
                path.display()
            );
        }
        return Err(e).with_context(|| format!("cannot lock {}", path.display()));
    }
    Ok(f)
}

/// The content of a position file (64 bytes, little-endian):
/// magic `RPLFSPOS`, applied LSN, applied record time, LSN of a
/// `RENAME_EXCHANGE` being applied (0: none), the boot it was written
/// during, reserved, CRC32C of 0..60.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub applied: Lsn,
    pub time_ns: i64,
    /// Set just before an exchange is applied, cleared with the next write:
    /// if a restart finds it set, that exchange may or may not have happened.
    pub exchange: Lsn,
    /// The kernel's boot id when the file was written (all zero: unknown,
    /// or a file from before boot ids were recorded). [`PositionFile::write`]
    /// stamps the current one.
    pub boot: [u8; 16],
}

const POS_MAGIC: &[u8; 8] = b"RPLFSPOS";
const POS_LEN: usize = 64;

impl Position {
    fn to_bytes(self) -> [u8; POS_LEN] {
        let mut b = [0u8; POS_LEN];
        b[0..8].copy_from_slice(POS_MAGIC);
        b[8..16].copy_from_slice(&self.applied.to_le_bytes());
        b[16..24].copy_from_slice(&self.time_ns.to_le_bytes());
        b[24..32].copy_from_slice(&self.exchange.to_le_bytes());
        b[32..48].copy_from_slice(&self.boot);
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn parse(b: &[u8]) -> Option<Position> {
        let b: &[u8; POS_LEN] = b.try_into().ok()?;
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let crc = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
        if &b[0..8] != POS_MAGIC || crc32c::crc32c(&b[..60]) != crc {
            return None;
        }
        let mut boot = [0u8; 16];
        boot.copy_from_slice(&b[32..48]);
        Some(Position {
            applied: u64_at(8),
            time_ns: u64_at(16) as i64,
            exchange: u64_at(24),
            boot,
        })
    }
}

/// `STATE/positions/<volume>.pos`, rewritten in place (`pwrite`) after
/// every applied record, stamped with the current boot id.
pub struct PositionFile {
    file: File,
    path: PathBuf,
    /// This boot's id (zeros when unknown: then no file is ever trusted
    /// as written during this boot).
    boot: [u8; 16],
}

impl PositionFile {
    /// Opens (creating if needed) the position file of `volume`; returns it
    /// with the position it holds (`None`: new, or unreadable — logged).
    pub fn open(state: &Path, volume: &str) -> Result<(PositionFile, Option<Position>)> {
        let dir = state.join(POSITIONS_DIR);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{volume}.pos"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open position file {}", path.display()))?;
        let mut buf = vec![0u8; POS_LEN];
        let n = read_up_to(&file, &mut buf)
            .with_context(|| format!("cannot read position file {}", path.display()))?;
        let pos = match (n, Position::parse(&buf)) {
            (0, _) => None,
            (_, Some(p)) => Some(p),
            (_, None) => {
                warn!(
                    "position file {} is damaged; using the catalog's position",
                    path.display()
                );
                None
            }
        };
        let pf = PositionFile {
            file,
            path,
            boot: boot_id().unwrap_or_default(),
        };
        if n == 0 {
            pf.write(Position::default())?;
            pf.sync()?;
            sync_dir(&dir)?;
        }
        Ok((pf, pos))
    }

    /// Rewrites the position, stamped with this boot's id (page cache:
    /// survives a kill of the process, not always a crash of the machine).
    pub fn write(&self, p: Position) -> Result<()> {
        self.write_as(Position {
            boot: self.boot,
            ..p
        })
    }

    /// Was `p` (as read from the file) written during this boot? Then the
    /// replica's page cache held every change applied before it.
    pub fn same_boot(&self, p: &Position) -> bool {
        self.boot != [0; 16] && p.boot == self.boot
    }

    /// Writes `p` with the boot id it carries (tests: another boot's file).
    pub fn write_as(&self, p: Position) -> Result<()> {
        self.file
            .write_all_at(&p.to_bytes(), 0)
            .with_context(|| format!("cannot write position file {}", self.path.display()))
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("cannot fsync position file {}", self.path.display()))
    }
}

fn read_up_to(f: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_persist_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (pf, p) = PositionFile::open(dir.path(), "v").unwrap();
        assert_eq!(p, None);
        let want = Position {
            applied: 9,
            time_ns: -3,
            exchange: 10,
            boot: boot_id().expect("a boot id"),
        };
        pf.write(Position {
            boot: [7; 16],
            ..want
        })
        .unwrap();
        assert!(pf.same_boot(&want));
        drop(pf);
        let (pf, p) = PositionFile::open(dir.path(), "v").unwrap();
        assert_eq!(p, Some(want), "written with this boot's id");
        let other = Position {
            boot: [7; 16],
            ..want
        };
        pf.write_as(other).unwrap();
        assert!(!pf.same_boot(&other));
        assert!(!pf.same_boot(&Position::default()), "zeros: unknown boot");
        let (_, p) = PositionFile::open(dir.path(), "v").unwrap();
        assert_eq!(p, Some(other));
        let f = dir.path().join(POSITIONS_DIR).join("v.pos");
        let mut b = std::fs::read(&f).unwrap();
        b[9] ^= 1;
        std::fs::write(&f, b).unwrap();
        assert_eq!(PositionFile::open(dir.path(), "v").unwrap().1, None);
    }

    #[test]
    fn the_catalog_keeps_volumes_and_resyncs() {
        let dir = tempfile::tempdir().unwrap();
        let db = MirrorDb::open(dir.path()).unwrap();
        assert_eq!(db.volume("v").unwrap(), None);
        db.ensure_volume("v", "/srv/v").unwrap();
        db.set_applied("v", 5, 6, 7).unwrap();
        db.set_peer("v", "10.0.0.1:5").unwrap();
        db.ensure_volume("v", "/srv/v2").unwrap();
        let row = db.volume("v").unwrap().unwrap();
        assert_eq!((row.applied_lsn, row.dir.as_str()), (5, "/srv/v2"));
        assert_eq!(row.peer.as_deref(), Some("10.0.0.1:5"));
        db.add_resync("v", b"a", "why", 3).unwrap();
        db.add_resync("v", b"a", "why", 3).unwrap();
        assert_eq!(db.resync_list("v").unwrap().len(), 1);
        db.add_resyncs("v", &[b"a".to_vec(), b"b".to_vec()], "why", 3)
            .unwrap();
        assert_eq!(db.resync_list("v").unwrap().len(), 2);
        assert_eq!(db.in_doubt("v").unwrap(), 0);
        db.set_in_doubt("v", 9).unwrap();
        db.set_in_doubt("v", 12).unwrap();
        assert_eq!(db.in_doubt("v").unwrap(), 12);
        db.begin_baseline("v", "src", 1, 0).unwrap();
        assert_eq!(db.in_doubt("v").unwrap(), 0, "a baseline voids it");
        assert!(db.resync_list("v").unwrap().is_empty());
        db.set_in_doubt("v", 4).unwrap();
        db.set_in_doubt("v", 0).unwrap();
        assert_eq!(db.in_doubt("v").unwrap(), 0);
    }

    #[test]
    fn one_mirror_per_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let _l = lock_state(dir.path()).unwrap();
        let e = lock_state(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("another replfs mirror"), "{e:#}");
    }
}
