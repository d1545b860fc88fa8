//! `replfs mirror`: the DR daemon that authenticates shippers and applies
//! their batches, in LSN order, to one directory per volume.
//!
//! # Layout
//! A volume's DIR holds exactly the replica: no bookkeeping inside it. The
//! state dir (never inside a DIR, and holding none) has `mirror.db` (per
//! volume: applied LSN, applied record time, last batch time, last peer;
//! resync requests), `positions/<volume>.pos` and `mirror.lock`.
//!
//! # Position and crashes
//! The position file is rewritten (`pwrite`, page cache) after every applied
//! record, so a killed mirror re-applies at most the one record in flight,
//! which the apply engine's idempotence covers (a `RENAME_EXCHANGE`, which is
//! not idempotent, is flagged in the file before it is applied; if a restart
//! finds the flag, the exchange is not re-applied and both names are
//! recorded for resync). Batches are made durable in groups by a second
//! thread per connection (`acks`): `syncfs` of DIR, catalog update, then the
//! `Ack` of every batch applied before the syncfs began, while the next
//! batches are applied. On start the position is the larger of the
//! catalog's and the position file's.
//!
//! Caveat (machine crash, not process crash): a position file written back
//! by the kernel before the tree's data may claim records whose effects were
//! lost with the page cache. Only the acknowledged position (the catalog,
//! written after the syncfs that covers it) is guaranteed; records after it and before the file's
//! position may need a re-verify of the replica (to do: compare with the
//! source after an unclean mirror shutdown).
//!
//! # Connections
//! One thread per connection, at most `max_connections`. A volume has one
//! shipper at a time: a second one is refused with `Error "volume busy"`,
//! unless the current one has been silent (no frame received, no record
//! applied) for `takeover_after`, in which case it is presumed dead (a cut
//! link leaves no RST): its socket is shut down, it stops between two
//! records and persists, and the newcomer takes the volume.

mod acks;
pub mod import;
mod server;
mod state;
#[cfg(test)]
mod tests;
mod volume;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use log::{info, warn};

pub use import::{ImportReport, import};
pub use state::{
    LOCK_FILE, MIRROR_DB, MirrorDb, POSITIONS_DIR, Position, PositionFile, ResyncRow, VolumeRow,
};

use crate::config::MirrorConfig;
use crate::proto::{Key, check_volume_id};
use server::{Limits, Shared};
use volume::Volume;

/// Volume id used by `replfs mirror --dir DIR --key-file F`.
pub const DEFAULT_VOLUME: &str = "default";

/// One volume the mirror serves.
#[derive(Clone, Debug)]
pub struct VolumeSpec {
    pub id: String,
    /// The replica (created, mode 0700, if missing).
    pub dir: PathBuf,
    pub key: Key,
}

/// Everything `run` / `spawn` need.
#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// `HOST:PORT` to listen on (port 0: any free port, see `local_addr`).
    pub listen: String,
    /// The mirror's state dir (created if missing).
    pub state: PathBuf,
    pub volumes: Vec<VolumeSpec>,
    /// Connections served at once; more are refused with `Error`.
    pub max_connections: usize,
    /// Time a new connection has to complete the handshake.
    pub handshake_timeout: Duration,
    /// A shipper that sends no frame (Ping included) for this long is dropped.
    pub idle_timeout: Duration,
    /// A write to a peer blocked this long drops the connection.
    pub write_timeout: Duration,
    /// A volume's shipper silent this long may be replaced by a new one.
    pub takeover_after: Duration,
}

impl MirrorOptions {
    /// Options with the default limits (64 connections, 10 s handshake,
    /// 120 s idle, 60 s write, 30 s takeover).
    pub fn new(listen: &str, state: &Path, volumes: Vec<VolumeSpec>) -> MirrorOptions {
        MirrorOptions {
            listen: listen.to_owned(),
            state: state.to_path_buf(),
            volumes,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            write_timeout: Duration::from_secs(60),
            takeover_after: Duration::from_secs(30),
        }
    }

    /// From the command line and the `[mirror]` config section: `--listen`
    /// wins over `mirror.listen`; `--dir`/`--key-file` add the volume
    /// `default` to those of the config (keys are loaded here).
    pub fn from_cli(
        listen: Option<String>,
        dir: Option<PathBuf>,
        state: PathBuf,
        key_file: Option<PathBuf>,
        cfg: &MirrorConfig,
    ) -> Result<MirrorOptions> {
        let Some(listen) = listen.or_else(|| cfg.listen.clone()) else {
            bail!("no address to listen on: pass --listen HOST:PORT or set mirror.listen");
        };
        let mut volumes = Vec::new();
        match (dir, key_file) {
            (Some(dir), Some(kf)) => volumes.push(VolumeSpec {
                id: DEFAULT_VOLUME.into(),
                dir,
                key: Key::load(&kf)?,
            }),
            (Some(_), None) => bail!("--dir needs --key-file (the volume's shared secret)"),
            (None, Some(_)) => bail!("--key-file needs --dir (or list volumes in the config)"),
            (None, None) => {}
        }
        for v in &cfg.volume {
            let key =
                Key::load(&v.key_file).with_context(|| format!("mirror volume {:?}", v.id))?;
            volumes.push(VolumeSpec {
                id: v.id.clone(),
                dir: v.dir.clone(),
                key,
            });
        }
        let mut o = MirrorOptions::new(&listen, &state, volumes);
        o.max_connections = cfg.max_connections;
        o.idle_timeout = cfg.idle_timeout;
        Ok(o)
    }
}

/// A running mirror (see [`spawn`]). Dropping it shuts it down too.
pub struct MirrorHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl MirrorHandle {
    /// The address actually listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets each connection finish or stop its batch
    /// between two records and persist its position, and waits for them.
    /// The state dir is unlocked when this returns.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.close_all();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                bail!("the mirror's accept thread panicked");
            }
            info!("mirror on {} stopped", self.addr);
        }
        Ok(())
    }
}

impl Drop for MirrorHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            warn!("stopping the mirror: {e:#}");
        }
    }
}

/// Starts the mirror in background threads and returns once it listens.
pub fn spawn(opts: MirrorOptions) -> Result<MirrorHandle> {
    check_volumes(&opts.volumes)?;
    check_layout(&opts.state, &opts.volumes)?;
    create_private_dir(&opts.state, "state dir")?;
    for v in &opts.volumes {
        create_private_dir(&v.dir, &format!("directory of volume {}", v.id))?;
    }
    let lock = state::lock_state(&opts.state)?;
    let db = MirrorDb::open(&opts.state)?;
    let mut volumes = HashMap::new();
    let mut keys = HashMap::new();
    for v in &opts.volumes {
        let vol = Volume::open(&v.id, &v.dir, &opts.state, &db)
            .with_context(|| format!("cannot open volume {}", v.id))?;
        warn_if_unbaselined(&vol);
        volumes.insert(v.id.clone(), Arc::new(vol));
        keys.insert(v.id.clone(), v.key.clone());
    }
    let listener = TcpListener::bind(&opts.listen)
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let limits = Limits {
        max_connections: opts.max_connections.max(1),
        handshake_timeout: opts.handshake_timeout,
        idle_timeout: opts.idle_timeout,
        write_timeout: opts.write_timeout,
        takeover_after: opts.takeover_after,
    };
    let shared = Arc::new(Shared::new(limits, volumes, keys, db, lock));
    let sh = shared.clone();
    let thread = std::thread::Builder::new()
        .name("mirror-accept".into())
        .spawn(move || server::accept_loop(listener, sh))
        .context("cannot start the accept thread")?;
    info!(
        "mirror listening on {addr} for {} volume(s), state {}",
        opts.volumes.len(),
        opts.state.display()
    );
    Ok(MirrorHandle {
        addr,
        shared,
        thread: Some(thread),
    })
}

/// Runs the mirror until SIGTERM or SIGINT, then shuts it down cleanly.
pub fn run(opts: MirrorOptions) -> Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    // Blocked before any thread starts, so only `wait` below sees them.
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    let handle = spawn(opts)?;
    loop {
        match set.wait() {
            Ok(Signal::SIGHUP) => info!("SIGHUP: nothing to reload yet"),
            Ok(sig) => {
                info!("{sig}: shutting down the mirror");
                break;
            }
            Err(e) => {
                warn!("sigwait failed: {e}; shutting down");
                break;
            }
        }
    }
    handle.shutdown()
}

fn check_volumes(volumes: &[VolumeSpec]) -> Result<()> {
    if volumes.is_empty() {
        bail!(
            "no volume to serve: pass --dir and --key-file, or list [[mirror.volume]] in the config"
        );
    }
    for (i, v) in volumes.iter().enumerate() {
        check_volume_id(&v.id).map_err(anyhow::Error::msg)?;
        if volumes[..i].iter().any(|o| o.id == v.id) {
            bail!("volume {} is listed twice", v.id);
        }
    }
    Ok(())
}

fn create_private_dir(dir: &Path, what: &str) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the {what} {}", dir.display()))?;
    info!("created the {what} {}", dir.display());
    Ok(())
}

/// The state dir must not lie inside any volume's DIR nor hold one, and
/// volume dirs must not nest.
fn check_layout(state: &Path, volumes: &[VolumeSpec]) -> Result<()> {
    let st = resolve(state)?;
    let mut dirs: Vec<(String, PathBuf)> = Vec::new();
    for v in volumes {
        let d = resolve(&v.dir)?;
        if st.starts_with(&d) {
            bail!(
                "the state dir {} lies inside the directory {} of volume {}: keep them apart",
                state.display(),
                v.dir.display(),
                v.id
            );
        }
        if d.starts_with(&st) {
            bail!(
                "the directory {} of volume {} lies inside the state dir {}: keep them apart",
                v.dir.display(),
                v.id,
                state.display()
            );
        }
        for (id, o) in &dirs {
            if d.starts_with(o) || o.starts_with(&d) {
                bail!(
                    "the directories of volumes {id} and {} overlap ({} and {})",
                    v.id,
                    o.display(),
                    d.display()
                );
            }
        }
        dirs.push((v.id.clone(), d));
    }
    Ok(())
}

/// `p` with symlinks resolved, whether or not it exists yet: its deepest
/// existing ancestor canonicalized, the rest appended lexically.
fn resolve(p: &Path) -> Result<PathBuf> {
    use std::path::Component;
    let abs = std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))?;
    let comps: Vec<Component<'_>> = abs.components().collect();
    for k in (1..=comps.len()).rev() {
        let Ok(mut out) = comps[..k].iter().collect::<PathBuf>().canonicalize() else {
            continue;
        };
        for c in &comps[k..] {
            match c {
                Component::ParentDir => {
                    out.pop();
                }
                Component::Normal(n) => out.push(n),
                _ => {}
            }
        }
        return Ok(out);
    }
    bail!("cannot resolve {}", p.display())
}

fn warn_if_unbaselined(vol: &Volume) {
    if vol.applied() != 0 {
        return;
    }
    let non_empty = std::fs::read_dir(&vol.dir).is_ok_and(|mut d| d.next().is_some());
    if non_empty {
        warn!(
            "volume {}: {} is not empty but no record was applied yet; \
             records will be applied on top of what is there",
            vol.id,
            vol.dir.display()
        );
    }
}
