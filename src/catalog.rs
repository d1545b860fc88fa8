//! rusqlite state in `STATE/catalog.db`: the WAL segment list, key/value
//! settings (clean-shutdown flag, format version, volume id, positions) and
//! the paths that need a resync.
//!
//! The segment files are the truth for recovery; the catalog is kept in step
//! with them (see `wal::recovery`). Other processes (status, tools, the
//! shipper) may open it at the same time: WAL journal mode and a busy timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::wal::Lsn;

/// File name of the catalog inside the state dir.
pub const CATALOG_FILE: &str = "catalog.db";
/// Key of the flag set by a clean `Wal::close` and cleared by `Wal::open`.
pub const KEY_CLEAN_SHUTDOWN: &str = "clean_shutdown";
/// Key holding the WAL segment format version last written.
pub const KEY_FORMAT_VERSION: &str = "wal_format_version";
/// Key holding a random id naming this volume (shared with its mirror).
pub const KEY_VOLUME_ID: &str = "volume_id";
/// Key of this source's identity (see [`Catalog::source_id`]).
pub const KEY_SOURCE_ID: &str = "source_id";
/// Key of the backing directory the last `replfs mount` served (absolute).
pub const KEY_BACKING: &str = "source.backing";
/// Key of the BACKING checkpoint: every change logged at or below this LSN
/// is durable in BACKING (a `syncfs` of it completed after the record was
/// appended). Segments are not retired past it.
pub const KEY_BACKING_CHECKPOINT: &str = "backing.checkpoint_lsn";
/// Key of the kernel boot id under which the last mount ran.
pub const KEY_BACKING_BOOT: &str = "backing.boot_id";
/// Key set when a mount finds the machine restarted since the last mount
/// with records after the checkpoint: BACKING may lack changes logged after
/// this LSN; cleared once their paths are recorded for resync.
pub const KEY_BACKING_DOUBT: &str = "backing.doubt_after";
const SCHEMA_VERSION: &str = "1";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS segments (
    first_lsn  INTEGER PRIMARY KEY,
    file_name  TEXT    NOT NULL,
    created_ns INTEGER NOT NULL,
    last_lsn   INTEGER,
    bytes      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS resync (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    path    BLOB    NOT NULL,
    reason  TEXT    NOT NULL,
    lsn     INTEGER NOT NULL,
    time_ns INTEGER NOT NULL
);
";

/// A catalog error, naming the database file.
#[derive(Debug, thiserror::Error)]
#[error("catalog {}: {err}", path.display())]
pub struct CatalogError {
    pub path: PathBuf,
    pub err: rusqlite::Error,
}

/// One WAL segment as the catalog knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentRow {
    pub first_lsn: Lsn,
    pub file_name: String,
    pub created_ns: i64,
    /// Last LSN in the segment once it is closed (`None` while current).
    pub last_lsn: Option<Lsn>,
    /// Bytes used (header and records) when last recorded.
    pub bytes: u64,
}

/// A path recorded as needing a resync from the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncRow {
    pub id: i64,
    pub path: Vec<u8>,
    pub reason: String,
    /// Head LSN when it was recorded (the resync covers changes after it).
    pub lsn: Lsn,
    pub time_ns: i64,
}

/// An open catalog. Not `Sync`: wrap it in a mutex to share it.
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

fn to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Catalog {
    /// Opens (creating if needed) `STATE/catalog.db`.
    pub fn open(state_dir: &Path) -> Result<Catalog, CatalogError> {
        let path = state_dir.join(CATALOG_FILE);
        let wrap = |err| CatalogError {
            path: path.clone(),
            err,
        };
        let conn = Connection::open(&path).map_err(wrap)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(wrap)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(wrap)?;
        // FULL: the clean-shutdown flag must not be lost in a crash after open.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(wrap)?;
        conn.execute_batch(SCHEMA).map_err(wrap)?;
        // Catalogs made before the column existed: their rows are repairs.
        let has_unlogged: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('resync') WHERE name = 'unlogged'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(wrap)?
            > 0;
        if !has_unlogged {
            conn.execute_batch("ALTER TABLE resync ADD COLUMN unlogged INTEGER NOT NULL DEFAULT 0")
                .map_err(wrap)?;
        }
        let cat = Catalog { conn, path };
        if cat.get("schema_version")?.is_none() {
            cat.set("schema_version", SCHEMA_VERSION)?;
        }
        Ok(cat)
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, err: rusqlite::Error) -> CatalogError {
        CatalogError {
            path: self.path.clone(),
            err,
        }
    }

    /// All segments, oldest first.
    pub fn segments(&self) -> Result<Vec<SegmentRow>, CatalogError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT first_lsn, file_name, created_ns, last_lsn, bytes FROM segments ORDER BY first_lsn")
            .map_err(|e| self.err(e))?;
        let rows = st.query_map([], |r| {
            Ok(SegmentRow {
                first_lsn: r.get::<_, i64>(0)? as u64,
                file_name: r.get(1)?,
                created_ns: r.get(2)?,
                last_lsn: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                bytes: r.get::<_, i64>(4)? as u64,
            })
        });
        rows.and_then(Iterator::collect).map_err(|e| self.err(e))
    }

    /// Inserts or replaces the row of `seg.first_lsn`.
    pub fn put_segment(&self, seg: &SegmentRow) -> Result<(), CatalogError> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO segments (first_lsn, file_name, created_ns, last_lsn, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    to_sql(seg.first_lsn),
                    seg.file_name,
                    seg.created_ns,
                    seg.last_lsn.map(to_sql),
                    to_sql(seg.bytes)
                ])
            })
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Forgets a segment (it was retired or never became durable).
    pub fn remove_segment(&self, first_lsn: Lsn) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "DELETE FROM segments WHERE first_lsn = ?1",
                [to_sql(first_lsn)],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// A value of the key/value table.
    pub fn get(&self, key: &str) -> Result<Option<String>, CatalogError> {
        self.conn
            .query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Deletes a key (absent is fine).
    pub fn remove(&self, key: &str) -> Result<(), CatalogError> {
        self.conn
            .execute("DELETE FROM kv WHERE key = ?1", [key])
            .map(drop)
            .map_err(|e| self.err(e))
    }

    pub fn set(&self, key: &str, value: &str) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO kv (key, value) VALUES (?1, ?2)",
                [key, value],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// `Some(true)` after a clean close, `Some(false)` while open or after a
    /// crash, `None` for a new state dir.
    pub fn clean_shutdown(&self) -> Result<Option<bool>, CatalogError> {
        Ok(self.get(KEY_CLEAN_SHUTDOWN)?.map(|v| v == "1"))
    }

    pub fn set_clean_shutdown(&self, clean: bool) -> Result<(), CatalogError> {
        self.set(KEY_CLEAN_SHUTDOWN, if clean { "1" } else { "0" })
    }

    /// The volume id, created (random, 16 hex digits) on first use.
    pub fn volume_id(&self) -> Result<String, CatalogError> {
        if let Some(id) = self.get(KEY_VOLUME_ID)? {
            return Ok(id);
        }
        let id = format!("{:016x}", crate::wal::segment::new_salt());
        self.set(KEY_VOLUME_ID, &id)?;
        Ok(id)
    }

    /// This source's identity towards mirrors (random, 16 hex digits, made
    /// on first use): a mirror whose copy carries another id (or none) is
    /// brought in line by a baseline before the log is shipped.
    pub fn source_id(&self) -> Result<String, CatalogError> {
        if let Some(id) = self.get(KEY_SOURCE_ID)? {
            return Ok(id);
        }
        let id = format!("{:016x}", crate::wal::segment::new_salt());
        self.set(KEY_SOURCE_ID, &id)?;
        Ok(id)
    }

    /// Records that `path` (empty = the whole tree) needs a repair on the
    /// mirror (its changes are in the log, or were never meant to be).
    pub fn add_resync(&self, path: &[u8], reason: &str, lsn: Lsn) -> Result<(), CatalogError> {
        self.add_resyncs(&[path], reason, lsn)
    }

    /// [`Catalog::add_resync`] for many paths in one transaction (one
    /// commit, not one per path). No deduplication against pending rows: a
    /// repair in progress clears the rows it started with, so a row added
    /// meanwhile must stand on its own (repairs collapse duplicate paths).
    pub fn add_resyncs(
        &self,
        paths: &[impl AsRef<[u8]>],
        reason: &str,
        lsn: Lsn,
    ) -> Result<(), CatalogError> {
        let now = crate::wal::segment::now_ns();
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO resync (path, reason, lsn, time_ns) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(|e| self.err(e))?;
            for p in paths {
                insert
                    .execute(params![p.as_ref(), reason, to_sql(lsn), now])
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Records that a change to `path` went to BACKING but not into the log
    /// (the WAL writer: a full WAL, a failed append). Unlike a repair-only
    /// row, later changes to such a path are not logged either until the
    /// shipper repaired it (a record naming it might not apply on the
    /// mirror). Returns the row id the writer keeps to notice when the row
    /// was cleared.
    pub fn add_unlogged(&self, path: &[u8], reason: &str, lsn: Lsn) -> Result<i64, CatalogError> {
        let now = crate::wal::segment::now_ns();
        self.conn
            .execute(
                "INSERT INTO resync (path, reason, lsn, time_ns, unlogged) VALUES (?1, ?2, ?3, ?4, 1)",
                params![path, reason, to_sql(lsn), now],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// The rows of [`Catalog::add_unlogged`] still waiting: (id, path).
    pub fn unlogged_list(&self) -> Result<Vec<(i64, Vec<u8>)>, CatalogError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id, path FROM resync WHERE unlogged = 1 ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)));
        rows.and_then(Iterator::collect).map_err(|e| self.err(e))
    }

    /// Ids of the resync rows still waiting, oldest first.
    pub fn resync_ids(&self) -> Result<Vec<i64>, CatalogError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id FROM resync ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = st.query_map([], |r| r.get(0));
        rows.and_then(Iterator::collect).map_err(|e| self.err(e))
    }

    /// Paths waiting for a resync, oldest first.
    pub fn resync_list(&self) -> Result<Vec<ResyncRow>, CatalogError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id, path, reason, lsn, time_ns FROM resync ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = st.query_map([], |r| {
            Ok(ResyncRow {
                id: r.get(0)?,
                path: r.get(1)?,
                reason: r.get(2)?,
                lsn: r.get::<_, i64>(3)? as u64,
                time_ns: r.get(4)?,
            })
        });
        rows.and_then(Iterator::collect).map_err(|e| self.err(e))
    }

    /// How many resync entries are waiting.
    pub fn resync_count(&self) -> Result<u64, CatalogError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM resync", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// Drops resync entries up to and including `id` (after they were served).
    pub fn clear_resync(&self, up_to_id: i64) -> Result<(), CatalogError> {
        self.conn
            .execute("DELETE FROM resync WHERE id <= ?1", [up_to_id])
            .map(drop)
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(first: Lsn, last: Option<Lsn>) -> SegmentRow {
        SegmentRow {
            first_lsn: first,
            file_name: crate::wal::segment::segment_file_name(first),
            created_ns: 5,
            last_lsn: last,
            bytes: 100,
        }
    }

    #[test]
    fn segments_kv_and_resync_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Catalog::open(dir.path()).unwrap();
            assert_eq!(c.clean_shutdown().unwrap(), None);
            c.put_segment(&row(1, Some(9))).unwrap();
            c.put_segment(&row(10, None)).unwrap();
            c.put_segment(&row(10, Some(12))).unwrap();
            c.set_clean_shutdown(true).unwrap();
            c.add_resync(b"a/b", "WAL full", 12).unwrap();
            let id = c.volume_id().unwrap();
            assert_eq!(id, c.volume_id().unwrap());
        }
        let c = Catalog::open(dir.path()).unwrap();
        assert_eq!(
            c.segments().unwrap(),
            vec![row(1, Some(9)), row(10, Some(12))]
        );
        assert_eq!(c.clean_shutdown().unwrap(), Some(true));
        let r = c.resync_list().unwrap();
        assert_eq!((r[0].path.as_slice(), r[0].lsn), (&b"a/b"[..], 12));
        c.clear_resync(r[0].id).unwrap();
        assert!(c.resync_list().unwrap().is_empty());
        // Many at once, duplicates kept (a repair in progress clears only
        // the rows it started with), in order.
        c.add_resyncs(&[b"x".to_vec(), b"y".to_vec(), b"x".to_vec()], "mirror", 3)
            .unwrap();
        let r: Vec<_> = c
            .resync_list()
            .unwrap()
            .into_iter()
            .map(|r| r.path)
            .collect();
        assert_eq!(r, vec![b"x".to_vec(), b"y".to_vec(), b"x".to_vec()]);
        c.remove_segment(1).unwrap();
        assert_eq!(c.segments().unwrap().len(), 1);
    }

    #[test]
    fn two_connections_can_share_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = Catalog::open(dir.path()).unwrap();
        let b = Catalog::open(dir.path()).unwrap();
        a.set("acked_lsn", "7").unwrap();
        assert_eq!(b.get("acked_lsn").unwrap().as_deref(), Some("7"));
    }
}
