//! The `[ship]` section of the config: where the mirror is and how to talk to it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{de_duration, de_size};

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ShipConfig {
    /// The mirror's HOST:PORT (`--mirror` on the command line wins).
    pub mirror: Option<String>,
    /// The shared secret (`--key-file` wins).
    pub key_file: Option<PathBuf>,
    /// Volume id announced to the mirror (a mirror may serve several).
    pub volume: String,
    /// Upper bound of one batch's record bytes before compression.
    #[serde(deserialize_with = "de_size")]
    pub batch_bytes: u64,
    /// Upper bound of records in one batch.
    pub batch_records: usize,
    /// Most batches in flight (sent, not yet acknowledged).
    pub window: usize,
    /// Most wire bytes in flight: the mirror acknowledges a batch once it is
    /// durable, and makes a whole group of batches durable at once, so the
    /// window must hold a few groups for the link and the mirror's disk to
    /// work at the same time. Nothing in flight is held in memory (the WAL
    /// has it), so this bounds what is re-sent after a broken link.
    #[serde(deserialize_with = "de_size")]
    pub window_bytes: u64,
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// A link silent for this long (no ack, no pong) is dropped and redialled.
    #[serde(deserialize_with = "de_duration")]
    pub io_timeout: Duration,
    /// Ping an idle link this often.
    #[serde(deserialize_with = "de_duration")]
    pub keepalive: Duration,
    /// Reconnect backoff: starts here, doubles, capped at `max_backoff`
    /// (at [`REFUSED_BACKOFF`] while the mirror's host refuses connections).
    #[serde(deserialize_with = "de_duration")]
    pub min_backoff: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub max_backoff: Duration,
    /// An idle shipper is woken by new records (it does not poll); a record
    /// still not durable this long after it was appended is synced by the
    /// shipper itself, so the lag is not a group-commit period (or, with
    /// `durability = "os"`, unbounded).
    #[serde(deserialize_with = "de_duration")]
    pub poll_interval: Duration,
    /// Recovery point objective: when the lag (age of the oldest change the
    /// mirror has not acknowledged) exceeds it, a warning is logged once per
    /// crossing, `status` flags it, and `rpo_hook` runs.
    #[serde(deserialize_with = "de_opt_duration")]
    pub rpo: Option<Duration>,
    /// Shell command run on each crossing of the RPO target, with
    /// REPLFS_VOLUME, REPLFS_LAG_SECONDS, REPLFS_LAG_RECORDS, REPLFS_LAG_BYTES
    /// and REPLFS_RPO_SECONDS in its environment.
    pub rpo_hook: Option<String>,
    /// When the shipper is behind, writes inside one batch that later writes
    /// of the same batch overwrite are sent once, with the latest data.
    pub coalesce: bool,
}

/// Longest wait between connection attempts while the mirror's host answers
/// them with a refusal (nothing listens: the mirror is down or restarting):
/// a refused attempt costs a SYN and a RST, so a returning mirror is found
/// within this, not within `max_backoff`.
pub const REFUSED_BACKOFF: Duration = Duration::from_millis(250);

fn de_opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig {
            mirror: None,
            key_file: None,
            volume: "default".into(),
            batch_bytes: 1 << 20,
            batch_records: 4096,
            window: 256,
            window_bytes: 64 << 20,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
            keepalive: Duration::from_secs(15),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            poll_interval: Duration::from_millis(2),
            rpo: None,
            rpo_hook: None,
            coalesce: false,
        }
    }
}

impl ShipConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if self.batch_bytes < 4096 || self.batch_bytes > (16 << 20) {
            bail!("ship.batch_bytes must be between 4KiB and 16MiB");
        }
        if self.window == 0 || self.window > 4096 {
            bail!("ship.window must be between 1 and 4096");
        }
        if self.window_bytes < self.batch_bytes || self.window_bytes > (1 << 30) {
            bail!("ship.window_bytes must be between ship.batch_bytes and 1GiB");
        }
        if self.batch_records == 0 || self.batch_records > 65536 {
            bail!("ship.batch_records must be between 1 and 65536");
        }
        if self.volume.is_empty() || self.volume.len() > 255 {
            bail!("ship.volume must be 1 to 255 bytes");
        }
        if self.min_backoff.is_zero() || self.min_backoff > self.max_backoff {
            bail!("ship.min_backoff must be > 0 and <= ship.max_backoff");
        }
        if self.rpo.is_some_and(|r| r < Duration::from_secs(1)) {
            bail!("ship.rpo must be at least 1s");
        }
        if self.keepalive >= self.io_timeout {
            bail!("ship.keepalive must be shorter than ship.io_timeout");
        }
        Ok(())
    }
}
