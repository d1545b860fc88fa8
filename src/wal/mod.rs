//! The write-ahead log: the only module that decides record order and durability.
//!
//! API contract (used by `fs`, the log tools and, later, the shipper):
//!
//! - [`Wal::open`] recovers the log in a state dir (cuts a torn tail, reports a
//!   corrupt middle as an error naming segment and offset) and starts the
//!   group-commit thread.
//! - [`Wal::admit`] is called *before* a change touches the backing directory
//!   and before any file-system lock is taken: when the WAL is full (its
//!   next segment would pass `wal.max_size`, or the disk refused it) it
//!   fails with ENOSPC under `on_wal_full = "fail"` (the default: a refused
//!   change never happens at all, so the log has no gap and nothing needs
//!   repair, and no writer stalls), waits for room under `"block"`, and
//!   admits under `"resync"`. Policies, limit and hysteresis: `writer/space.rs`.
//! - [`Wal::record`] is what the mount calls after a change: it appends the
//!   record, or — when logging is paused (`resync` policy, WAL full) or the
//!   change names a path still waiting for a resync — records the change's
//!   paths in the catalog instead (once per path) and returns `None`.
//! - [`Wal::append`] is called after the change succeeded, while the caller
//!   still holds the locks that order that change against conflicting ones. It
//!   assigns the next LSN and writes the record into the current segment (one
//!   `pwritev`, page cache) before returning, so a crash of the process after
//!   `append` returns cannot lose it. It does not fail for lack of space once
//!   admitted: a preallocated spare segment is kept in reserve, and `admit`
//!   refuses as soon as no spare can be made. (If the current segment also
//!   runs out while full, `append` returns `Full`: the caller must record a
//!   resync, e.g. with [`Wal::mark_resync`] — never a silent gap.)
//! - [`Wal::commit`] is called after the caller dropped its locks: in `always`
//!   mode it waits for durability.
//! - [`Wal::sync`] waits until every record up to an LSN is durable (group
//!   commit: one fdatasync serves all waiters).
//! - [`Wal::retire`] deletes segments the mirror acknowledged; the space it
//!   frees ends a full state. [`Wal::space`] reports disk use and limit.
//! - [`reader::WalReader`] iterates records in LSN order across segments for
//!   `log dump`/`verify`/`replay` and the shipper, with the same scanner that
//!   recovery uses. A live follower uses `iter_range(from, head_lsn)`.
//!
//! The on-disk format is specified in `docs/wal-format.md`.

pub mod codec;
pub mod reader;
pub mod record;
mod recovery;
pub mod segment;
pub mod writer;

pub use reader::{SegmentInfo, WalReader};
pub use record::{Attr, Lsn, NodeKind, Op, Record, Ts};
pub use writer::{RecoveryReport, Wal, WalError, WalSpace};
