//! The control socket (`STATE/control.sock`): how `replfs status` and
//! `replfs throttle` talk to a running mount or `replfs ship`. One JSON
//! request per connection, one JSON answer, then close.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use log::warn;
use serde::{Deserialize, Serialize};

pub const SOCKET: &str = "control.sock";
/// Requests are tiny; anything longer is refused.
const MAX_REQUEST: u64 = 4096;

/// What a client may ask.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    ThrottleShow,
    ThrottleSet { rate: String, burst: Option<String> },
    ThrottleClear,
}

/// The daemon side: answers requests.
pub trait Handler: Send + Sync {
    fn handle(&self, req: Request) -> Result<serde_json::Value>;
}

pub fn socket_path(state: &Path) -> PathBuf {
    state.join(SOCKET)
}

/// A listening control socket; removed when dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `STATE/control.sock` (mode 0600). The caller holds the state
    /// dir's lock, so a socket file left there is stale and is replaced.
    pub fn start(state: &Path, handler: Arc<dyn Handler>) -> Result<ControlServer> {
        let path = socket_path(state);
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(l, handler, s2))?;
        Ok(ControlServer {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(l: UnixListener, handler: Arc<dyn Handler>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        match l.accept() {
            Ok((s, _)) => {
                if let Err(e) = serve_one(s, &*handler) {
                    warn!("control socket: {e:#}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                warn!("control socket accept: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn serve_one(s: UnixStream, handler: &dyn Handler) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new((&s).take(MAX_REQUEST)).read_line(&mut line)?;
    let answer = match serde_json::from_str::<Request>(&line) {
        Ok(req) => match handler.handle(req) {
            Ok(v) => serde_json::json!({ "ok": true, "result": v }),
            Err(e) => serde_json::json!({ "ok": false, "error": format!("{e:#}") }),
        },
        Err(e) => serde_json::json!({ "ok": false, "error": format!("bad request: {e}") }),
    };
    let mut w = &s;
    writeln!(w, "{answer}")?;
    Ok(())
}

/// Asks the daemon of a state dir. `Ok(None)` when no daemon is listening.
pub fn request(state: &Path, req: &Request) -> Result<Option<serde_json::Value>> {
    let path = socket_path(state);
    let s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot reach {}", path.display())),
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    let exchange = (|| {
        let mut w = &s;
        writeln!(w, "{}", serde_json::to_string(req)?)?;
        BufReader::new(&s).read_line(&mut line)
    })();
    match exchange {
        // The daemon is going away (shutting down between accept and answer).
        Ok(0) => return Ok(None),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("no answer from {}", path.display())),
        Ok(_) => {}
    }
    let v: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("bad answer from {}", path.display()))?;
    if v["ok"] == true {
        Ok(Some(v["result"].clone()))
    } else {
        anyhow::bail!(
            "{}",
            v["error"]
                .as_str()
                .unwrap_or("the daemon refused the request")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, req: Request) -> Result<serde_json::Value> {
            match req {
                Request::ThrottleClear => anyhow::bail!("nothing to clear"),
                r => Ok(serde_json::to_value(r)?),
            }
        }
    }

    #[test]
    fn requests_round_trip_and_errors_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            request(dir.path(), &Request::Status).unwrap().is_none(),
            "no daemon"
        );
        let srv = ControlServer::start(dir.path(), Arc::new(Echo)).unwrap();
        let req = Request::ThrottleSet {
            rate: "2MiB/s".into(),
            burst: None,
        };
        let v = request(dir.path(), &req).unwrap().unwrap();
        assert_eq!(v["cmd"], "throttle-set");
        assert_eq!(v["rate"], "2MiB/s");
        let e = request(dir.path(), &Request::ThrottleClear).unwrap_err();
        assert!(format!("{e}").contains("nothing to clear"));
        let mode = std::fs::metadata(socket_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(srv);
        assert!(!socket_path(dir.path()).exists(), "socket removed on drop");
    }

    #[test]
    fn garbage_gets_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let _srv = ControlServer::start(dir.path(), Arc::new(Echo)).unwrap();
        let s = UnixStream::connect(socket_path(dir.path())).unwrap();
        let mut w = &s;
        writeln!(w, "{{\"cmd\":\"format-disk\"}}").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("bad request"), "{line}");
    }
}
