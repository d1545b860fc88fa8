//! The services every replfs source daemon (`mount` and `ship`) runs beside
//! the WAL: the shipper, the throttle, the status monitor, the control socket,
//! and signal handling (SIGTERM/SIGINT stop, SIGHUP reloads the config).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use log::{error, info, warn};

use crate::config::Config;
use crate::control::ControlServer;
use crate::ship::monitor::{Monitor, Monitored};
use crate::ship::throttle::{SystemClock, Throttle};
use crate::ship::{ShipArgs, Shipper, Target};
use crate::wal::{Lsn, Wal};

/// What a `replfs mount` adds to the services (`replfs ship` has none).
pub struct MountSide<'a> {
    /// BACKING, for syncs (read directly, never through the mount).
    pub backing: &'a Path,
    /// The mount's counters, shown by `replfs status`.
    pub stats: Arc<crate::status::MountStats>,
}

pub struct Services {
    shipper: Option<Shipper>,
    monitor: Monitor,
    control: ControlServer,
    pub throttle: Arc<Throttle>,
    config_path: Option<PathBuf>,
}

impl Services {
    /// Starts shipping to `target` (following the WAL, or draining it to the
    /// head when `drain`), the monitor and the control socket.
    pub fn start(
        state: &Path,
        wal: &Wal,
        config: &Config,
        config_path: Option<PathBuf>,
        target: Option<Target>,
        drain: bool,
        mount: Option<MountSide<'_>>,
    ) -> Result<Services> {
        let (backing, mount) = match mount {
            Some(m) => (Some(m.backing), Some(m.stats)),
            None => (None, None),
        };
        let throttle = Arc::new(Throttle::new(&config.throttle, Arc::new(SystemClock)));
        let mirror = target.as_ref().map(|t| t.addr.clone());
        // Opened now, before a mount in place covers it: syncs read the
        // backing directory itself, never through the mount.
        let backing = crate::ship::remember_backing(state, backing)?
            .map(|b| crate::sync::manifest::open_root(&b).map(Arc::new))
            .transpose()?;
        let excludes = crate::exclude::Excludes::new(&config.exclude)?;
        let shipper = target.map(|target| {
            let args = ShipArgs {
                state: state.to_path_buf(),
                target,
                cfg: config.ship.clone(),
                throttle: throttle.clone(),
                backing,
                excludes,
            };
            if drain {
                Shipper::start_drain(wal.clone(), args)
            } else {
                Shipper::start(wal.clone(), args)
            }
        });
        let monitor = Monitor::start(Monitored {
            state: state.to_path_buf(),
            wal: wal.clone(),
            ship: shipper.as_ref().map(|s| s.stats.clone()),
            throttle: throttle.clone(),
            mirror,
            volume: config.ship.volume.clone(),
            rpo: config.ship.rpo,
            rpo_hook: config.ship.rpo_hook.clone(),
            mount,
        })?;
        let control = ControlServer::start(state, monitor.handler())?;
        Ok(Services {
            shipper,
            monitor,
            control,
            throttle,
            config_path,
        })
    }

    /// What SIGHUP does: re-read the config file; a bad one is refused and
    /// the one in force stays.
    pub fn reloader(&self) -> impl Fn() + Send + 'static {
        let (throttle, path) = (self.throttle.clone(), self.config_path.clone());
        move || reload(&throttle, path.as_deref())
    }

    /// A flag that makes the shipper give up (SIGTERM during `replfs ship`).
    pub fn ship_stop_flag(&self) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        self.shipper.as_ref().map(Shipper::stop_flag)
    }

    /// Waits for a draining shipper; returns the LSN the mirror acknowledged.
    pub fn wait_drained(&mut self) -> Option<Lsn> {
        self.shipper.take().map(Shipper::wait)
    }

    /// Stops everything; the backlog stays in the WAL.
    pub fn stop(self) {
        drop(self.control);
        if let Some(s) = self.shipper {
            s.stop();
        }
        self.monitor.stop();
    }
}

fn reload(throttle: &Throttle, path: Option<&Path>) {
    let Some(path) = path else {
        info!("SIGHUP: no config file to reload");
        return;
    };
    match Config::load(path) {
        Ok(c) => {
            throttle.reconfigure(&c.throttle);
            let f = throttle.in_force();
            info!(
                "SIGHUP: reloaded {}; throttle {} ({})",
                path.display(),
                f.rate,
                f.reason
            );
        }
        Err(e) => error!("SIGHUP: {e:#}; keeping the configuration in force"),
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread and the threads it
/// starts afterwards, so that only the signal thread receives them.
pub fn block_signals() -> Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    Ok(set)
}

/// Waits for signals: SIGHUP calls `on_hup`; SIGTERM/SIGINT call `on_stop`,
/// and the thread ends once it returns true.
pub fn spawn_signal_thread(
    set: nix::sys::signal::SigSet,
    on_hup: impl Fn() + Send + 'static,
    mut on_stop: impl FnMut() -> bool + Send + 'static,
) {
    use nix::sys::signal::Signal;
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                match set.wait() {
                    Ok(Signal::SIGHUP) => on_hup(),
                    Ok(sig) => {
                        info!("{sig}: stopping");
                        if on_stop() {
                            return;
                        }
                    }
                    Err(e) => {
                        warn!("sigwait failed: {e}");
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        error!("cannot start the signal thread: {e}");
    }
}

/// The running kernel's boot id (`/proc/sys/kernel/random/boot_id`, a
/// random UUID drawn at every boot); `None` when it cannot be read.
pub fn boot_id() -> Option<[u8; 16]> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    parse_uuid(text.trim())
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        id[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    (id != [0; 16]).then_some(id)
}

#[cfg(test)]
mod boot_id_tests {
    use super::*;

    #[test]
    fn boot_ids_parse_as_uuids() {
        assert_eq!(
            parse_uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
            Some([
                0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2,
                0xe1, 0xf0
            ])
        );
        for bad in [
            "",
            "0f1e",
            "zz1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            "00000000-0000-0000-0000-000000000000",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad}");
        }
    }
}
