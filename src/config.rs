//! TOML configuration: one serde struct per section, defaults, validation with clear errors.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// When the WAL is made durable (fdatasync) on its own, besides an explicit
/// `fsync` through the mount, which always makes the file's changes durable.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every change is durable in the WAL before the operation returns
    /// (group commit: concurrent writers share one fdatasync).
    Always,
    /// The WAL is synced every `sync_interval` (default 10ms) and on fsync.
    #[default]
    Batch,
    /// Leave write-back to the kernel; only fsync through the mount syncs.
    Os,
}

/// How spare WAL segments are made (see [`WalConfig::zero_fill_after`]).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ZeroFill {
    /// Zero-filled while the log grows slowly (fsync-bound workloads),
    /// preallocated while it streams.
    #[default]
    Auto,
    Always,
    Never,
}

/// `zero_fill = "auto"` writes the next spare out as zeros when the last
/// segment filled slower than this: the zeros then cost at most as much
/// disk bandwidth again in the background.
pub const ZERO_FILL_MAX_RATE: u64 = 32 << 20;

/// What happens to a change when the WAL cannot take its record.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnWalFull {
    /// Refuse the change with ENOSPC before it touches the backing directory.
    #[default]
    Fail,
    /// Let the change through and record its path as needing resync.
    Resync,
    /// Make the writer wait until the shipper frees space (the mirror
    /// acknowledged records and their segments were retired).
    Block,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    pub durability: Durability,
    /// Interval of the background group commit in `batch` mode.
    #[serde(with = "humantime_serde_compat")]
    pub sync_interval: Duration,
    /// Size of one preallocated segment file, e.g. "64MiB".
    #[serde(deserialize_with = "de_size")]
    pub segment_size: u64,
    /// Records whose body is at least this big are lz4-compressed in the WAL
    /// when it saves 1/8 or more; 0 (the default) = never: lz4 costs ~20µs per
    /// 4 KiB of text on the write path, so compression is left to the shipper,
    /// which compresses whole batches on the wire.
    #[serde(deserialize_with = "de_size")]
    pub compress_min: u64,
    pub on_wal_full: OnWalFull,
    /// Upper bound of the WAL's disk use (all segments, spare included);
    /// reaching it makes the WAL full (`on_wal_full`). 0 = no limit but the
    /// disk's free space.
    #[serde(deserialize_with = "de_size")]
    pub max_size: u64,
    /// Acknowledged segments are kept at least this long after their last
    /// write, so `log replay` can reach back that far (point-in-time
    /// recovery); 0 = retire as soon as the mirror acknowledged them.
    #[serde(with = "humantime_serde_compat")]
    pub retain: Duration,
    /// Spare segments written out as zeros ("always"), preallocated with
    /// fallocate ("never"), or zeros while the log grows slower than
    /// 32 MiB/s ("auto"). An fdatasync of records in preallocated space also
    /// writes the extent metadata (unwritten extents turn written: a journal
    /// commit, or on ext4 without a journal the inode and extent blocks):
    /// measured here 155 µs against 80 µs in zero-filled space.
    pub zero_fill: ZeroFill,
}

impl WalConfig {
    /// Whether the spare made after a segment that took `filled` to fill is
    /// zero-filled.
    pub fn zero_fill_after(&self, filled: Duration) -> bool {
        match self.zero_fill {
            ZeroFill::Always => true,
            ZeroFill::Never => false,
            ZeroFill::Auto => {
                filled.as_secs_f64() * ZERO_FILL_MAX_RATE as f64 >= self.segment_size as f64
            }
        }
    }
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            durability: Durability::Batch,
            sync_interval: Duration::from_millis(10),
            segment_size: 64 << 20,
            compress_min: 0,
            on_wal_full: OnWalFull::Fail,
            max_size: 0,
            retain: Duration::ZERO,
            zero_fill: ZeroFill::Auto,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MountConfig {
    /// Number of FUSE worker threads.
    pub threads: usize,
    /// Kernel attribute/entry cache timeout, also how long the kernel
    /// remembers that a name does not exist. Every change passes through the
    /// mount, so long timeouts are safe unless BACKING is changed behind it.
    #[serde(with = "humantime_serde_compat")]
    pub attr_timeout: Duration,
    /// Pass `allow_other` (requires root or user_allow_other in /etc/fuse.conf).
    pub allow_other: bool,
    /// FUSE writeback cache: `write(2)` returns once the data is in the
    /// kernel's page cache; the kernel sends it to replfs (and so to BACKING
    /// and the WAL, in the order it arrives) at close, fsync, memory pressure
    /// or after `vm.dirty_expire_centisecs` (30s by default). Much faster
    /// small and sequential writes; but until then the data is in neither
    /// BACKING nor the WAL: `status` cannot count it in the lag, a crash of
    /// the mount process loses it (fsync stays the durability point, as on
    /// a native filesystem), errors such as ENOSPC from a full WAL are
    /// reported by close/fsync rather than by write, and SEEK_DATA/SEEK_HOLE
    /// do not see data not yet written back. Off by default.
    pub writeback_cache: bool,
    /// Kernel FUSE passthrough for read-only opens of regular files: the
    /// kernel reads the backing file itself, the daemon only sees the open
    /// and the release. Writes always go through the daemon (and the WAL):
    /// a writable open while read-only passthrough opens of the same file
    /// exist is a passthrough open in direct-I/O mode (its reads and writes
    /// reach the daemon; see docs/operations.md for shared writable mmap).
    /// Needs root and a kernel with CONFIG_FUSE_PASSTHROUGH (6.9+); the
    /// kernel refuses it together with the writeback cache, which then wins.
    /// Stores through a shared writable mapping of such a direct-I/O open
    /// reach BACKING itself, also after its close: the mount watches the
    /// file while it is mapped and has it repaired (`crate::fs::mapwatch`),
    /// which needs BACKING on ext4, XFS or btrfs and Linux 6.13+; elsewhere
    /// passthrough stays off. On by default.
    pub passthrough: bool,
    /// How often BACKING is made durable (`syncfs`) and that point recorded
    /// as the BACKING checkpoint. After a machine crash, the paths changed by
    /// records after the last checkpoint may have lost those changes in
    /// BACKING while the WAL (synced every `wal.sync_interval`) kept them:
    /// the next mount has them repaired on the mirror from BACKING. Segments
    /// are not retired past the checkpoint. Also done at unmount.
    #[serde(with = "humantime_serde_compat")]
    pub checkpoint_interval: Duration,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            threads: 4,
            attr_timeout: Duration::from_secs(60),
            allow_other: true,
            writeback_cache: false,
            passthrough: true,
            checkpoint_interval: Duration::from_secs(30),
        }
    }
}

/// `[mirror]`: the `replfs mirror` daemon (see `docs/protocol.md`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    /// `HOST:PORT` to listen on; `--listen` wins.
    pub listen: Option<String>,
    /// Connections served at once; more are refused.
    pub max_connections: usize,
    /// A shipper that sends no frame (Ping included) for this long is dropped.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// The volumes served (`[[mirror.volume]]`), besides `--dir`'s `default`.
    pub volume: Vec<MirrorVolumeConfig>,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            listen: None,
            max_connections: 64,
            idle_timeout: Duration::from_secs(120),
            volume: Vec::new(),
        }
    }
}

/// One `[[mirror.volume]]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MirrorVolumeConfig {
    /// Volume id the shipper names in its handshake.
    pub id: String,
    /// The replica directory (nothing else is written there).
    pub dir: std::path::PathBuf,
    /// The volume's shared secret (whole file, >= 16 bytes).
    pub key_file: std::path::PathBuf,
}

impl MirrorConfig {
    fn validate(&self) -> Result<()> {
        if self.max_connections == 0 || self.max_connections > 4096 {
            bail!("mirror.max_connections must be between 1 and 4096");
        }
        if self.idle_timeout < Duration::from_secs(1) {
            bail!("mirror.idle_timeout must be at least 1s");
        }
        for (i, v) in self.volume.iter().enumerate() {
            crate::proto::check_volume_id(&v.id)
                .map_err(|e| anyhow::anyhow!("mirror.volume: {e}"))?;
            if self.volume[..i].iter().any(|o| o.id == v.id) {
                bail!("mirror.volume: id {:?} is listed twice", v.id);
            }
        }
        Ok(())
    }
}

/// The whole config file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Glob patterns of paths served through the mount but never logged,
    /// shipped or synced (see `crate::exclude`).
    pub exclude: Vec<String>,
    pub wal: WalConfig,
    pub mount: MountConfig,
    #[serde(default)]
    pub mirror: MirrorConfig,
    pub ship: crate::ship::ShipConfig,
    pub throttle: crate::ship::throttle::ThrottleConfig,
}

impl Config {
    /// Reads and validates a config file; errors name the file and line.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.wal.segment_size < (4 << 20) {
            bail!("wal.segment_size must be at least 4MiB (records can be over 1MiB)");
        }
        if self.wal.segment_size > (1 << 32) {
            bail!("wal.segment_size must be at most 4GiB");
        }
        if self.mount.threads == 0 || self.mount.threads > 64 {
            bail!("mount.threads must be between 1 and 64");
        }
        if self.mount.writeback_cache && self.mount.attr_timeout.is_zero() {
            bail!(
                "mount.writeback_cache needs a non-zero mount.attr_timeout: the kernel then \
                 trusts its own file sizes and times, which is only right when nothing \
                 changes BACKING behind the mount"
            );
        }
        if self.wal.max_size != 0 && self.wal.max_size < 3 * self.wal.segment_size {
            bail!(
                "wal.max_size must be 0 (no limit) or at least 3 segments ({} bytes): \
                 the active segment, its spare and one to retire",
                3 * self.wal.segment_size
            );
        }
        crate::exclude::Excludes::new(&self.exclude)?;
        self.mirror.validate()?;
        self.ship.validate()?;
        self.throttle.validate()?;
        if self.wal.sync_interval.is_zero() {
            bail!("wal.sync_interval must be greater than zero");
        }
        let ci = self.mount.checkpoint_interval;
        if ci < Duration::from_millis(100) || ci > Duration::from_secs(3600) {
            bail!("mount.checkpoint_interval must be between 100ms and 1h");
        }
        Ok(())
    }
}

/// Parses sizes like `4096`, `64KiB`, `10MiB`, `1GiB`, `10MB`.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .with_context(|| format!("bad size {s:?}: expected a number and a unit like 10MiB"))?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KiB" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" => 1024.0f64.powi(4),
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        u => bail!("bad size {s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB, TiB, kB, MB, GB)"),
    };
    let v = num * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        bail!("bad size {s:?}: out of range");
    }
    Ok(v as u64)
}

pub fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum SizeRepr {
        Num(u64),
        Text(String),
    }
    match SizeRepr::deserialize(d)? {
        SizeRepr::Num(n) => Ok(n),
        SizeRepr::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

/// A duration as a humantime string ("10ms", "30s", "15m").
pub fn de_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Duration, D::Error> {
    humantime_serde_compat::deserialize(d)
}

/// Durations as humantime strings ("10ms", "30s", "15m").
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::Deserialize;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("bad duration {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("1MB").unwrap(), 1_000_000);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn defaults_and_overrides() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        let c = Config::parse(
            "[wal]\ndurability = \"always\"\nsegment_size = \"16MiB\"\nsync_interval = \"5ms\"\n",
        )
        .unwrap();
        assert_eq!(c.wal.durability, Durability::Always);
        assert_eq!(c.wal.segment_size, 16 << 20);
        assert_eq!(c.wal.sync_interval, Duration::from_millis(5));
    }

    #[test]
    fn unknown_keys_are_rejected_with_line() {
        let err = Config::parse("[wal]\ndurability = \"batch\"\nbogus = 1\n").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("bogus"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn the_mirror_section_parses_and_validates() {
        let c = Config::parse(
            "[mirror]\nlisten = \"0.0.0.0:7450\"\nidle_timeout = \"5m\"\n\
             [[mirror.volume]]\nid = \"vol1\"\ndir = \"/srv/dr/vol1\"\nkey_file = \"/etc/replfs/vol1.key\"\n",
        )
        .unwrap();
        assert_eq!(c.mirror.listen.as_deref(), Some("0.0.0.0:7450"));
        assert_eq!(c.mirror.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.mirror.volume[0].id, "vol1");
        assert_eq!(c.mirror.max_connections, 64);
        let dup = "[[mirror.volume]]\nid = \"a\"\ndir = \"/x\"\nkey_file = \"/k\"\n";
        assert!(Config::parse(&dup.repeat(2)).is_err());
        let bad_id = "[[mirror.volume]]\nid = \"a/b\"\ndir = \"/x\"\nkey_file = \"/k\"\n";
        assert!(Config::parse(bad_id).is_err());
        assert!(Config::parse("[[mirror.volume]]\nid = \"a\"\ndir = \"/x\"\n").is_err());
        assert!(Config::parse("[mirror]\nmax_connections = 0\n").is_err());
    }

    #[test]
    fn the_example_config_parses_to_the_defaults() {
        let text = include_str!("../packaging/replfs.example.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(
            c,
            Config::default(),
            "packaging/replfs.example.toml shows the defaults"
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Config::parse("[wal]\ndurability = \"sometimes\"\n").is_err());
        assert!(Config::parse("[wal]\nsegment_size = \"1KiB\"\n").is_err());
        assert!(Config::parse("[mount]\nthreads = 0\n").is_err());
        let err =
            Config::parse("[mount]\nwriteback_cache = true\nattr_timeout = \"0s\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("writeback_cache"), "{err:#}");
        let c = Config::parse("[mount]\nwriteback_cache = true\n").unwrap();
        assert!(c.mount.writeback_cache);
        assert!(c.mount.passthrough, "on by default");
        let c = Config::parse("[mount]\npassthrough = false\n").unwrap();
        assert!(!c.mount.passthrough);
        let err = Config::parse("[mount]\npassthrough = \"yes\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("passthrough"), "{err:#}");
    }
}
