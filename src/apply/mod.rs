//! The apply engine: reproduces WAL records in a directory, shared by the
//! mirror and `replfs log replay`.
//!
//! # Containment (invariant 6)
//! Everything happens relative to an `O_PATH` descriptor of the root; no
//! absolute path is ever built. Every record path is checked component by
//! component (`..`, `.`, empty components, NUL and absolute paths are refused,
//! even though the decoder already rejects them) and its parent directory is
//! resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`: the source kernel resolved
//! symlinks before the filesystem saw the operation, so a legitimate record
//! never traverses one. The last component is handled with `*at` calls that do
//! not follow it (`AT_SYMLINK_NOFOLLOW`, `O_NOFOLLOW`, `fchmodat2`), and data
//! records only ever open an existing *regular* file (checked before and after
//! the open), so a planted or replicated device node or fifo is never opened
//! for writing. Extended attributes are set only on regular files and
//! directories (Linux refuses `user.*` on other kinds); records for other
//! kinds are skipped with a warning.
//!
//! The engine does reproduce what the source holds, including setuid files,
//! file capabilities (`security.capability`) and device nodes: keep the
//! mirror root private (mode 0700) or on a `nosuid,nodev` mount.
//!
//! # Metadata and order
//! After each change the target gets its recorded metadata (chown, then chmod
//! with the permission, setuid, setgid and sticky bits, because chown clears
//! setuid/setgid; then the mtime, atime left alone unless a `SetAttr`
//! recorded it) and then the parent directory gets its recorded mtime (both
//! parents for a rename). A file's mtime is set after its data change and a
//! directory's mtime after the entry change in it, so neither is disturbed
//! afterwards.
//!
//! # Idempotence
//! The mirror may crash after applying a record but before persisting its
//! position, and then applies that record again. Re-applying the last applied
//! record is harmless:
//! - `Create` when a node of the same kind (and device number) exists: only
//!   the metadata is set; an existing file is never truncated. A directory
//!   that exists is accepted the same way.
//! - `Symlink` when the same symlink (same target) exists: metadata only.
//! - `Link` when `path` exists and is the same inode as `existing`: ok.
//! - `Remove` when the entry is absent: ok.
//! - `Rename` (plain or `RENAME_NOREPLACE`) when `from` is absent and `to`
//!   exists: ok. `RENAME_EXCHANGE` cannot be recognised as already applied
//!   (both names exist either way): re-applying it swaps back, so the caller
//!   must not re-apply an exchange it knows to be applied.
//! - `Write`, `Truncate`, `Fallocate`, `SetAttr`, `SetXattr` are idempotent
//!   as they stand; `RemoveXattr` of an absent attribute is ok.
//!
//! Any other disagreement between a record and the tree (a directory where a
//! file is created, a write to a symlink) is an error: the replica diverged.

pub(crate) mod contain;
mod ops;
pub(crate) mod sys;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_contain;

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use log::warn;

use crate::wal::{Lsn, Op, Record};

/// Applies records to one directory tree.
#[derive(Debug)]
pub struct Applier {
    root: OwnedFd,
}

/// Why a record could not be applied, or the root could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot open apply root {}: {error}", path.display())]
    Root { path: PathBuf, error: io::Error },
    #[error("LSN {lsn}: {op} {path}: {failure}")]
    Record {
        lsn: Lsn,
        op: &'static str,
        path: String,
        failure: Failure,
    },
}

impl ApplyError {
    /// The OS error number behind this error, if it came from a system call.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            ApplyError::Root { error, .. } => error.raw_os_error(),
            ApplyError::Record {
                failure: Failure::Os { error, .. },
                ..
            } => error.raw_os_error(),
            ApplyError::Record { .. } => None,
        }
    }
}

/// What went wrong with one record.
#[derive(Debug)]
pub enum Failure {
    /// The record would reach outside the root (or is malformed): refused.
    Unsafe(String),
    /// The tree disagrees with the record: the replica has diverged.
    Conflict(String),
    /// A system call failed at the named step.
    Os {
        step: &'static str,
        error: io::Error,
    },
}

impl Failure {
    fn os(step: &'static str, error: io::Error) -> Failure {
        Failure::Os { step, error }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Unsafe(why) => write!(f, "refused: {why}"),
            Failure::Conflict(what) => write!(f, "conflicts with the tree: {what}"),
            Failure::Os { step, error } => write!(f, "{step}: {error}"),
        }
    }
}

/// Tags an `io::Result` with the step that produced it.
trait IoStep<T> {
    fn step(self, step: &'static str) -> Result<T, Failure>;
}

impl<T> IoStep<T> for io::Result<T> {
    fn step(self, step: &'static str) -> Result<T, Failure> {
        self.map_err(|e| Failure::os(step, e))
    }
}

impl Applier {
    /// Opens `dir` (which must exist and be a directory) as the apply root.
    pub fn open(dir: &Path) -> Result<Applier, ApplyError> {
        let root_err = |error| ApplyError::Root {
            path: dir.to_path_buf(),
            error,
        };
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| root_err(io::Error::from_raw_os_error(libc::EINVAL)))?;
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        // SAFETY: valid C string; the returned fd is ours alone.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd < 0 {
            return Err(root_err(io::Error::last_os_error()));
        }
        // SAFETY: the kernel just returned this descriptor to us.
        Ok(Applier {
            root: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Applies one record (see the module documentation for the rules).
    /// A `Resync` record changes nothing: it is logged as a warning and the
    /// caller reports it.
    pub fn apply(&mut self, rec: &Record) -> Result<(), ApplyError> {
        self.apply_at(rec.lsn, &rec.op)
    }

    /// [`Applier::apply`] of the record `lsn` holding `op`.
    pub fn apply_at(&mut self, lsn: Lsn, op: &Op<'_>) -> Result<(), ApplyError> {
        if let Op::Resync { path, reason } = op {
            warn!(
                "LSN {lsn}: {} needs resync from the source: {reason}",
                display_path(path)
            );
        }
        ops::apply_op(self.root.as_fd(), op).map_err(|failure| ApplyError::Record {
            lsn,
            op: op.name(),
            path: op_paths(op),
            failure,
        })
    }

    /// The root directory (an `O_PATH` descriptor).
    pub fn root(&self) -> std::os::fd::BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Applies an op that is not a log record (a sync op: LSN 0).
    pub fn apply_op(&mut self, op: &Op<'_>) -> Result<(), ApplyError> {
        ops::apply_op(self.root.as_fd(), op).map_err(|failure| ApplyError::Record {
            lsn: 0,
            op: op.name(),
            path: op_paths(op),
            failure,
        })
    }

    /// Flushes everything applied so far to stable storage (`syncfs` of the
    /// root's filesystem), e.g. before the mirror persists its position.
    pub fn sync(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        sys::syncfs(self.root.as_raw_fd())
    }
}

/// The path(s) a record names, escaped for messages (`from -> to`).
fn op_paths(op: &Op<'_>) -> String {
    match op {
        Op::Rename { from, to, .. } => format!("{} -> {}", display_path(from), display_path(to)),
        Op::Link { existing, path, .. } => format!(
            "{} (link to {})",
            display_path(path),
            display_path(existing)
        ),
        other => display_path(other.path()),
    }
}

/// A record path for humans: `.` for the root, UTF-8 kept, control
/// characters and backslashes escaped, invalid bytes as `\xNN` (lossless).
pub fn display_path(path: &[u8]) -> String {
    if path.is_empty() {
        return ".".into();
    }
    escape_bytes(path)
}

/// Escapes arbitrary bytes into printable text without losing information.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => out.extend(c.escape_unicode()),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}
