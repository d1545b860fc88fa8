//! The replicating FUSE mount: a passthrough over BACKING that logs every change.
//!
//! `ops` is the core (testable without a kernel mount), `fuse` the thin fuser
//! adapter, `inodes` the inode table, `sys` the syscall wrappers.

pub mod checkpoint;
pub mod error;
pub mod fuse;
pub mod inflight;
pub mod inodes;
pub mod iomode;
pub mod mapwatch;
pub mod materialize;
pub mod ops;
pub mod sys;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use log::{info, warn};

use crate::config::Config;
use crate::wal::Wal;

/// What `replfs mount` needs to run.
pub struct MountArgs {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub state: PathBuf,
    pub config: Config,
    /// The mirror to ship to, if any (without one the WAL only accumulates).
    pub target: Option<crate::ship::Target>,
    /// The config file, re-read on SIGHUP.
    pub config_path: Option<PathBuf>,
}

/// Refuses a state dir inside BACKING (its WAL would log itself) and the reverse.
pub fn check_layout(backing: &Path, mountpoint: &Path, state: &Path) -> Result<()> {
    let b = backing
        .canonicalize()
        .with_context(|| format!("backing directory {} not found", backing.display()))?;
    if !b.is_dir() {
        bail!("backing path {} is not a directory", b.display());
    }
    std::fs::create_dir_all(state)
        .with_context(|| format!("cannot create state dir {}", state.display()))?;
    let s = state.canonicalize()?;
    if s.starts_with(&b) {
        bail!(
            "state dir {} must not lie inside the backing directory {}",
            s.display(),
            b.display()
        );
    }
    if b.starts_with(&s) {
        bail!(
            "backing directory {} must not lie inside the state dir {}",
            b.display(),
            s.display()
        );
    }
    let m = mountpoint
        .canonicalize()
        .with_context(|| format!("mount point {} not found", mountpoint.display()))?;
    if (m != b && m.starts_with(&b)) || s.starts_with(&m) {
        bail!(
            "mount point {} must not lie inside the backing directory or contain the state dir",
            m.display()
        );
    }
    Ok(())
}

/// Opens the WAL, mounts, serves until unmounted (fusermount3 -u, SIGTERM,
/// SIGINT), then flushes the WAL. `on_mounted` runs once the mount is live.
pub fn serve(args: MountArgs, on_mounted: impl FnOnce()) -> Result<()> {
    check_layout(&args.backing, &args.mountpoint, &args.state)?;
    let sigs = crate::daemon::block_signals()?;
    let (wal, report) = Wal::open(&args.state, &args.config.wal)
        .with_context(|| format!("cannot open the WAL in {}", args.state.display()))?;
    info!(
        "WAL recovered: head LSN {}, {} segment(s){}",
        report.head_lsn,
        report.segments,
        if report.unclean_shutdown {
            ", previous run did not shut down cleanly"
        } else {
            ""
        }
    );
    if let Some((seg, off, cut)) = &report.truncated_tail {
        warn!(
            "cut a torn tail of {cut} bytes at offset {off} of {}",
            seg.display()
        );
    }
    let excludes = crate::exclude::Excludes::new(&args.config.exclude)?;
    check_exclude_list(&args.state, &wal, &excludes)?;
    checkpoint::recover(&args.state, &wal)?;
    // Opened before the mount: BACKING may be the mount point itself.
    let root = std::fs::File::open(&args.backing)
        .with_context(|| format!("cannot open {}", args.backing.display()))?;
    let (inflight, left) = inflight::Inflight::open(&args.state)?;
    mark_left_over(&wal, &args.backing, &excludes, left)?;
    let ship_wal = wal.clone();
    let core = Arc::new(ops::Core::new(&args.backing, wal, inflight, &args.config)?);
    let fs = fuse::ReplFs::new(core.clone(), &args.config.mount);
    // The control socket is up before the mount appears, so that `replfs
    // status` and `replfs throttle` answer as soon as it is visible.
    let services = crate::daemon::Services::start(
        &args.state,
        &ship_wal,
        &args.config,
        args.config_path.clone(),
        args.target.clone(),
        false,
        Some(crate::daemon::MountSide {
            backing: &args.backing,
            stats: core.stats.clone(),
        }),
    )?;
    let mut session = match fuser::Session::new(fs, &args.mountpoint, &session_config(&args)) {
        Ok(s) => s,
        Err(e) => {
            services.stop();
            core.shutdown();
            return Err(e)
                .with_context(|| format!("cannot mount on {}", args.mountpoint.display()));
        }
    };
    info!(
        "mounted {} on {}",
        args.backing.display(),
        args.mountpoint.display()
    );
    let mut unmounter = session.unmount_callable();
    let mnt = args.mountpoint.clone();
    let stop_wal = ship_wal.clone();
    crate::daemon::spawn_signal_thread(sigs, services.reloader(), move || {
        // Writers blocked on a full WAL hold their files open: release them.
        stop_wal.stop_blocking();
        info!("unmounting {}", mnt.display());
        match unmounter.unmount() {
            Ok(()) => true,
            Err(e) => {
                warn!("unmount of {} failed: {e}", mnt.display());
                false
            }
        }
    });
    let watcher = spawn_mapwatch(core.clone(), args.mountpoint.clone())?;
    let checkpointer = checkpoint::spawn(
        ship_wal.clone(),
        root.into(),
        args.config.mount.checkpoint_interval,
    )?;
    on_mounted();
    let r = session.run();
    core.mapwatch.stop();
    let _ = watcher.join();
    // Every change is in BACKING's page cache by now: the last checkpoint
    // makes BACKING durable up to the head.
    checkpointer.stop();
    services.stop();
    // destroy() closes the WAL; close again in case the session ended without it.
    core.shutdown();
    r.context("FUSE session failed")?;
    info!(
        "unmounted {}; WAL flushed at LSN {}",
        args.mountpoint.display(),
        core.wal.head_lsn()
    );
    Ok(())
}

/// The thread that watches inodes mapped through released passthrough
/// opens (`mapwatch`): a round a second while any is watched.
fn spawn_mapwatch(
    core: Arc<ops::Core>,
    mountpoint: std::path::PathBuf,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("mapwatch".into())
        .spawn(move || {
            while let Some((_round, watched)) = core.mapwatch.next_round() {
                let dev = &core.mapwatch.fuse_dev;
                if dev.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                    // How /proc/PID/maps lists a mapping made through the
                    // mount (a FUSE file system there: not the directory
                    // under it after a lazy unmount).
                    let fuse = nix::sys::statfs::statfs(&mountpoint)
                        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::FUSE_SUPER_MAGIC);
                    if let (true, Ok(md)) = (fuse, std::fs::metadata(&mountpoint)) {
                        use std::os::unix::fs::MetadataExt;
                        dev.store(md.dev(), std::sync::atomic::Ordering::Relaxed);
                    }
                }
                core.mapwatch_round(watched, false);
            }
        })
        .context("cannot start the mapwatch thread")
}

/// Catalog key of the exclude list the mount last ran with.
pub const KEY_EXCLUDE_FINGERPRINT: &str = "exclude.fingerprint";

/// A mount that starts with another exclude list than the last one records
/// the whole tree for resync: paths newly excluded must leave the replica,
/// paths no longer excluded must reach it. The first mount only stores it.
fn check_exclude_list(state: &Path, wal: &Wal, ex: &crate::exclude::Excludes) -> Result<()> {
    let cat = crate::catalog::Catalog::open(state)?;
    let now = ex.fingerprint();
    match cat.get(KEY_EXCLUDE_FINGERPRINT)? {
        Some(old) if old == now => return Ok(()),
        Some(old) => {
            warn!(
                "the exclude list changed ({:?} -> {:?}): the whole tree is recorded for resync",
                old.replace('\n', ", "),
                now.replace('\n', ", ")
            );
            cat.add_resync(b"", "exclude list changed", wal.head_lsn())?;
        }
        None => {}
    }
    cat.set(KEY_EXCLUDE_FINGERPRINT, &now)?;
    Ok(())
}

/// Changes that were in flight when a previous run died may be in BACKING
/// but not in the log: log their paths as needing resync, durably, before
/// anything else happens. A change to an entry also changed its parent
/// directory's mtime: the parent's metadata as BACKING has it now is logged
/// too, so the replica's parent converges without a resync of its subtree.
/// An excluded path is never logged: only its parent's metadata is.
fn mark_left_over(
    wal: &Wal,
    backing: &Path,
    ex: &crate::exclude::Excludes,
    paths: Vec<Vec<u8>>,
) -> Result<()> {
    for path in paths {
        if ex.is_excluded(&path) {
            let parent = parent_attr(backing, &path).filter(|op| !ex.is_excluded(op.path()));
            if let Some(op) = parent {
                let lsn = wal.append(&op)?;
                wal.sync(lsn)?;
            }
            continue;
        }
        warn!(
            "a change to {:?} was in flight when the previous run stopped; logging it as needing resync",
            String::from_utf8_lossy(&path)
        );
        let parent = parent_attr(backing, &path);
        let mut lsn = wal.append(&crate::wal::Op::Resync {
            path,
            reason: "change in flight when the mount process died".into(),
        })?;
        if let Some(op) = parent {
            lsn = wal.append(&op)?;
        }
        wal.sync(lsn)?;
    }
    Ok(())
}

/// A SetAttr record of the parent directory of `path` as it is in BACKING
/// (None for the root itself or a parent that no longer exists).
fn parent_attr(backing: &Path, path: &[u8]) -> Option<crate::wal::Op<'static>> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    if path.is_empty() {
        return None;
    }
    let parent = path
        .iter()
        .rposition(|&b| b == b'/')
        .map_or(&path[..0], |i| &path[..i]);
    let md = std::fs::symlink_metadata(backing.join(std::ffi::OsStr::from_bytes(parent))).ok()?;
    md.is_dir().then(|| crate::wal::Op::SetAttr {
        path: parent.to_vec(),
        attr: crate::wal::Attr {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            mtime: ops::ts(md.mtime(), md.mtime_nsec()),
        },
        atime: None,
    })
}

fn session_config(args: &MountArgs) -> fuser::Config {
    use fuser::MountOption as M;
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        M::FSName(format!("replfs:{}", args.backing.display())),
        M::Subtype("replfs".into()),
        M::DefaultPermissions,
    ];
    if args.config.mount.allow_other {
        c.acl = fuser::SessionACL::All;
    }
    c.n_threads = Some(args.config.mount.threads);
    c.clone_fd = true;
    c
}
