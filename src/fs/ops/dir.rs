//! Directories: readdir, and shutting the core down.

use super::*;

// ---- directories -------------------------------------------------------

impl Core {
    /// Entries of a directory from offset `off` (0 = start), with the offset
    /// of the entry after each.
    pub fn readdir(&self, fh: u64, off: i64, buf: &mut [u8]) -> Res<Vec<sys::DirEnt>> {
        let h = self.handle(fh)?;
        let _g = h.dir_lock.lock();
        let mut ents = sys::read_dir_at(&h.fd, off, buf)?;
        for e in &mut ents {
            e.ino = self.inodes.dirent_ino(e.ino);
        }
        Ok(ents)
    }

    /// Flushes the WAL and reports how it ended (unmount / SIGTERM).
    pub fn shutdown(&self) {
        // Stores through mappings of passthrough opens are logged while the
        // WAL still takes records.
        let (_round, watched) = self.mapwatch.finish();
        self.mapwatch_round(watched, true);
        if let Err(e) = self.wal.close() {
            error!("closing the WAL failed: {e}");
        }
    }
}
