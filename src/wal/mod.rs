//! The write-ahead log: the only module that decides record order and durability.
//!
//! API contract (used by `fs`, the log tools and, later, the shipper):
//!
//! - [`Wal::open`] recovers the log in a state dir (cuts a torn tail, reports a
//!   corrupt middle as an error naming segment and offset) and starts the
//!   group-commit thread.
//! - [`Wal::admit`] is called *before* a change touches the backing directory:
//!   it fails (ENOSPC) when the WAL cannot take more records and the policy is
//!   `fail`, so a refused change never happens at all.
//! - [`Wal::append`] is called after the change succeeded, while the caller
//!   still holds the locks that order that change against conflicting ones. It
//!   assigns the next LSN and writes the record into the current segment (one
//!   `pwrite`, page cache) before returning, so a crash of the process after
//!   `append` returns cannot lose it. It never fails for lack of space: a spare
//!   preallocated segment is always kept in reserve.
//! - [`Wal::sync`] waits until every record up to an LSN is durable (group
//!   commit: one fdatasync serves all waiters).
//! - [`reader::WalReader`] iterates records in LSN order across segments for
//!   recovery, `log dump`/`verify`/`replay` and the shipper.

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
pub use writer::{RecoveryReport, Wal, WalError};
