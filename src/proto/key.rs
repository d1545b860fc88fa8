//! The shared secret of a volume: loaded from a key file, never printed,
//! never sent.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, bail};
use log::warn;

/// Shortest key accepted from a key file.
pub const MIN_KEY_LEN: usize = 16;

/// A shared secret. `Debug` shows only its length; the bytes are zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl Key {
    /// The whole file's bytes, minus one trailing newline (`\n` or `\r\n`).
    /// Refuses an empty key or one shorter than [`MIN_KEY_LEN`] bytes; warns
    /// when the file is readable by its group or others.
    pub fn load(path: &Path) -> anyhow::Result<Key> {
        let mut bytes = std::fs::read(path)
            .with_context(|| format!("cannot read key file {}", path.display()))?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        let key = Key(bytes);
        if key.0.is_empty() {
            bail!("key file {} is empty", path.display());
        }
        if key.0.len() < MIN_KEY_LEN {
            bail!(
                "key file {} holds {} bytes; a key needs at least {MIN_KEY_LEN} \
                 (e.g. `head -c 32 /dev/urandom | base64 > KEYFILE`)",
                path.display(),
                key.0.len()
            );
        }
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o044 != 0 {
                warn!(
                    "key file {} is readable by group or others (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o7777
                );
            }
        }
        Ok(key)
    }

    /// A key from raw bytes (tests, embedding). No length check.
    pub fn from_bytes(b: &[u8]) -> Key {
        Key(b.to_vec())
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(<{} secret bytes>)", self.0.len())
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}
