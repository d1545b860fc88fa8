//! replfs: a FUSE filesystem that logs every change to a write-ahead log and
//! ships it to a disaster-recovery mirror.

pub mod apply;
pub mod catalog;
pub mod config;
pub mod control;
pub mod daemon;
pub mod exclude;
pub mod fs;
pub mod mirror;
pub mod proto;
pub mod ship;
pub mod status;
pub mod sync;
pub mod tools;
pub mod wal;
