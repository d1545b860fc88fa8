//! The `replfs` command line: parse, dispatch, exit codes (0 ok, 1 a check
//! failed, 2 error).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use replfs::config::Config;

/// `replfs --version`: the crate version and the on-disk and wire format
/// versions this build speaks (a mount and a mirror must agree on the latter).
static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (WAL format {}, protocol {})",
        env!("CARGO_PKG_VERSION"),
        replfs::wal::segment::FORMAT_VERSION,
        replfs::proto::PROTO_VERSION
    )
});

#[derive(Parser)]
#[command(
    name = "replfs",
    version = VERSION.as_str(),
    about = "Asynchronous-replication FUSE filesystem for disaster recovery"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve BACKING at MOUNTPOINT, logging every change to the WAL in --state.
    Mount(MountCmd),
    /// Drain a state dir's WAL backlog to the mirror without a mount (after an
    /// unmount or a crash); returns once the mirror has acknowledged it all.
    Ship(ShipCmd),
    /// Serve as the DR mirror: authenticate shippers and apply their WAL
    /// batches to --dir (or to each [[mirror.volume]] of the config).
    Mirror(MirrorCmd),
    /// Link, positions, lag (records, bytes, seconds), ship rate, throttle,
    /// WAL disk use: from the running daemon, or from disk when none runs.
    Status {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show or change the shipping throttle of a running mount or ship, live.
    Throttle {
        #[arg(long)]
        state: PathBuf,
        #[command(subcommand)]
        action: ThrottleCmd,
    },
    /// Compare the source tree with the mirror's copy through the protocol
    /// (each side hashes its own files) and list every difference: missing,
    /// extra, type, content, metadata. Exit 0 only when identical up to the
    /// LSN the mirror has applied (changes still in flight are listed apart).
    Verify(VerifyCmd),
    /// Inspect the write-ahead log.
    #[command(subcommand)]
    Log(LogCmd),
    /// Write man pages (replfs.1, replfs-SUBCOMMAND.1, ...) into DIR
    /// (packaging).
    #[command(hide = true)]
    GenMan { dir: PathBuf },
    /// Write the completion script for SHELL into DIR (packaging).
    #[command(hide = true)]
    GenCompletions {
        shell: clap_complete::Shell,
        dir: PathBuf,
    },
}

#[derive(Args)]
struct VerifyCmd {
    /// The source's state directory.
    #[arg(long)]
    state: PathBuf,
    /// The source tree (default: the backing directory the last mount of
    /// --state served).
    #[arg(long, value_name = "DIR")]
    source: Option<PathBuf>,
    /// The mirror (default: the config, then what the last mount used).
    #[arg(long, value_name = "HOST:PORT")]
    mirror: Option<String>,
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    #[arg(long)]
    config: Option<PathBuf>,
    /// Machine-readable report.
    #[arg(long)]
    json: bool,
    /// Also record every difference found (not those in flight) for repair:
    /// the running mount or `replfs ship` brings those paths in line by
    /// comparing their blocks, whatever their size and mtime say.
    #[arg(long)]
    repair: bool,
}

#[derive(Args)]
struct MountCmd {
    /// The directory whose content is served and replicated.
    backing: PathBuf,
    /// Where to mount it (may be BACKING itself, to interpose on it in place).
    mountpoint: PathBuf,
    /// State directory: WAL segments, catalog, lock (must not lie inside BACKING).
    #[arg(long)]
    state: PathBuf,
    /// TOML config file (see packaging/replfs.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The DR mirror to ship the WAL to (`replfs mirror` listening there).
    #[arg(long, value_name = "HOST:PORT")]
    mirror: Option<String>,
    /// File holding the secret shared with the mirror.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Stay in the foreground (systemd, tests); by default replfs daemonizes
    /// once the mount is live and logs to STATE/replfs.log.
    #[arg(short, long)]
    foreground: bool,
}

#[derive(Args)]
struct ShipCmd {
    #[arg(long)]
    state: PathBuf,
    /// Defaults to the mirror the last mount of this state dir shipped to.
    #[arg(long, value_name = "HOST:PORT")]
    mirror: Option<String>,
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    #[arg(long)]
    config: Option<PathBuf>,
    /// Give up (exit 2) if the backlog is not acknowledged within this long,
    /// e.g. 10m; by default keep retrying until done or interrupted.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<std::time::Duration>,
}

#[derive(Subcommand)]
enum ThrottleCmd {
    /// The rate and burst in force, and why (live setting, schedule window, default).
    Show,
    /// Override the config and schedule until `clear`: RATE like 2MiB/s,
    /// 100Mbit/s or unlimited.
    Set {
        rate: String,
        #[arg(long)]
        burst: Option<String>,
    },
    /// Drop the live override: the config and its schedule apply again.
    Clear,
}

#[derive(Subcommand)]
enum LogCmd {
    /// List records: a table, or one JSON object per line with --json.
    Dump {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        from: Option<u64>,
        #[arg(long)]
        to: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a directory from the log, up to an LSN or a time.
    Replay {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        into: PathBuf,
        #[arg(long, conflicts_with = "until_time")]
        until: Option<u64>,
        /// RFC 3339 time, e.g. 2026-11-22T10:00:00Z.
        #[arg(long)]
        until_time: Option<String>,
        /// Replay into a non-empty directory.
        #[arg(long)]
        force: bool,
    },
    /// Check every segment completely and list every problem (exit 1 if any
    /// error, warnings such as a torn tail allowed).
    Verify {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write the retained log (or LSN --from..=--to-lsn) to FILE, to carry
    /// a backlog or a baseline to the mirror out of band (`replfs mirror import`).
    Export {
        #[arg(long)]
        state: PathBuf,
        /// The export file (written as FILE.tmp, then renamed).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// First LSN (default: the oldest retained record).
        #[arg(long)]
        from: Option<u64>,
        /// Last LSN (default: the head).
        #[arg(long)]
        to_lsn: Option<u64>,
    },
    /// Change rate, busiest directories, coalescing saving and the link
    /// bandwidth needed for an RPO, from the retained log.
    Stats {
        #[arg(long)]
        state: PathBuf,
        /// Recovery point objective, e.g. 30s, 15m (default), 1h.
        #[arg(long)]
        rpo: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct MirrorCmd {
    #[command(subcommand)]
    action: Option<MirrorAction>,
    /// Address to listen on (overrides mirror.listen in the config).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// The replica directory of the volume "default" (needs --key-file).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Mirror state dir: catalog and positions (never inside a replica dir).
    #[arg(long, required = true)]
    state: Option<PathBuf>,
    /// File holding the secret shared with the shipper of --dir.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// TOML config file ([mirror] section, [[mirror.volume]] list).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum MirrorAction {
    /// Apply a `replfs log export` file to a volume (the mirror daemon must
    /// not be running on --state); shipping then resumes from there.
    Import {
        /// The replica directory of the volume.
        #[arg(long)]
        dir: PathBuf,
        /// Mirror state dir (as given to `replfs mirror --state`).
        #[arg(long)]
        state: PathBuf,
        /// Volume id (default: "default", the volume of `--dir`).
        #[arg(long)]
        volume: Option<String>,
        /// The export file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let journal = logging::init();
    let cli = Cli::parse();
    if matches!(
        cli.cmd,
        Cmd::Status { .. } | Cmd::Verify(_) | Cmd::Log(_) | Cmd::Throttle { .. }
    ) {
        // Report commands end quietly when their reader goes away
        // (`replfs log dump --json | head`), like other Unix tools. The
        // daemons keep ignoring SIGPIPE: a closed socket is an error there.
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let prefix = if journal { "<3>" } else { "" };
            eprintln!("{prefix}replfs: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Log output: env_logger's format (timestamp, level, module) on a terminal
/// or in `STATE/replfs.log`; under systemd, when stderr is the journal, no
/// timestamp (journald adds its own) and an sd-daemon `<N>` syslog priority
/// prefix on every line, so `journalctl -p warning` and friends see the
/// levels. `RUST_LOG` selects what is logged either way (default: info).
mod logging {
    use std::io::Write;

    /// Sets up the global logger; returns whether stderr is the journal.
    pub fn init() -> bool {
        let mut b =
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
        let journal = stderr_is_journal();
        if journal {
            b.format(|buf, r| {
                let line = journal_line(r.level(), r.target(), &r.args().to_string());
                writeln!(buf, "{line}")
            });
        }
        b.init();
        journal
    }

    /// The sd-daemon(3) priority of a log level: `<3>` error, `<4>` warning,
    /// `<6>` info, `<7>` debug (and trace).
    pub fn priority(level: log::Level) -> u8 {
        match level {
            log::Level::Error => 3,
            log::Level::Warn => 4,
            log::Level::Info => 6,
            log::Level::Debug | log::Level::Trace => 7,
        }
    }

    /// One record for the journal: `<N>module: message`, and every further
    /// line of a multi-line message with the same prefix `<N>` (journald
    /// takes each line as an entry, at the default priority unless told).
    pub fn journal_line(level: log::Level, target: &str, msg: &str) -> String {
        let p = priority(level);
        let mut lines = msg.split('\n');
        let mut out = format!("<{p}>{target}: {}", lines.next().unwrap_or(""));
        for l in lines {
            out.push_str(&format!("\n<{p}>{l}"));
        }
        out
    }

    /// Whether stderr is the journal stream systemd set up: `JOURNAL_STREAM`
    /// is `DEVICE:INODE` of that stream, and must match stderr itself, as
    /// systemd.exec(5) asks (a child whose stderr was redirected, such as
    /// the daemon `replfs mount` forks into `STATE/replfs.log`, inherits
    /// the variable but not the stream).
    fn stderr_is_journal() -> bool {
        let Ok(var) = std::env::var("JOURNAL_STREAM") else {
            return false;
        };
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // fstat on fd 2 with a zeroed, properly sized buffer.
        if unsafe { libc::fstat(2, &mut st) } != 0 {
            return false;
        }
        stream_matches(&var, st.st_dev as u64, st.st_ino as u64)
    }

    /// `JOURNAL_STREAM`'s `DEVICE:INODE` (decimal) against stderr's.
    pub fn stream_matches(var: &str, dev: u64, ino: u64) -> bool {
        let Some((d, i)) = var.trim().split_once(':') else {
            return false;
        };
        d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use log::Level;

        #[test]
        fn journal_lines_carry_the_syslog_priority_and_no_timestamp() {
            assert_eq!(
                journal_line(
                    Level::Info,
                    "replfs::ship",
                    "connected to mirror dr:7450 (volume vol1), resuming after LSN 42"
                ),
                "<6>replfs::ship: connected to mirror dr:7450 (volume vol1), resuming after LSN 42"
            );
            assert_eq!(
                journal_line(Level::Warn, "replfs::mirror::server", "peer p volume v: x"),
                "<4>replfs::mirror::server: peer p volume v: x"
            );
            assert_eq!(journal_line(Level::Error, "t", "boom"), "<3>t: boom");
            assert_eq!(journal_line(Level::Debug, "t", "d"), "<7>t: d");
            assert_eq!(journal_line(Level::Trace, "t", "d"), "<7>t: d");
            assert_eq!(journal_line(Level::Info, "t", ""), "<6>t: ");
        }

        #[test]
        fn every_line_of_a_multi_line_message_keeps_its_priority() {
            assert_eq!(
                journal_line(Level::Warn, "replfs::wal", "two problems:\n  one\n  two"),
                "<4>replfs::wal: two problems:\n<4>  one\n<4>  two"
            );
        }

        #[test]
        fn journal_stream_must_be_stderr_itself() {
            assert!(stream_matches("2049:123456", 2049, 123456));
            assert!(stream_matches("2049:123456\n", 2049, 123456));
            assert!(!stream_matches("2049:123457", 2049, 123456));
            assert!(!stream_matches("2050:123456", 2049, 123456));
            assert!(!stream_matches("", 2049, 123456));
            assert!(!stream_matches("2049", 2049, 123456));
            assert!(!stream_matches("x:y", 2049, 123456));
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::GenMan { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("cannot write man pages to {}", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::GenCompletions { shell, dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let path = clap_complete::generate_to(shell, &mut Cli::command(), "replfs", &dir)
                .with_context(|| format!("cannot write completions to {}", dir.display()))?;
            println!("{}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Mount(m) => mount(m),
        Cmd::Mirror(m) => mirror(m),
        Cmd::Ship(s) => ship(s),
        Cmd::Verify(v) => verify(v),
        Cmd::Status { state, json } => status(&state, json),
        Cmd::Throttle { state, action } => throttle(&state, action),
        Cmd::Log(LogCmd::Dump {
            state,
            from,
            to,
            json,
        }) => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            replfs::tools::dump(&state, from, to, json, &mut out)?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Log(LogCmd::Replay {
            state,
            into,
            until,
            until_time,
            force,
        }) => {
            let until = match (until, until_time) {
                (Some(l), _) => replfs::tools::Until::Lsn(l),
                (None, Some(t)) => replfs::tools::Until::Time(replfs::tools::parse_time(&t)?),
                (None, None) => replfs::tools::Until::End,
            };
            let r = replfs::tools::replay(&state, &into, until, force)?;
            println!("{r}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Log(LogCmd::Export {
            state,
            to,
            from,
            to_lsn,
        }) => {
            let r = replfs::tools::export(&state, &to, from, to_lsn)?;
            println!("{r}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Log(LogCmd::Verify { state, json }) => {
            let report = replfs::tools::verify(&state)?;
            print!(
                "{}",
                if json {
                    report.to_json()
                } else {
                    report.render()
                }
            );
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Log(LogCmd::Stats { state, rpo, json }) => {
            let rpo = replfs::tools::parse_rpo(rpo.as_deref())?;
            let report = replfs::tools::stats(&state, rpo)?;
            print!(
                "{}",
                if json {
                    report.to_json()
                } else {
                    report.render()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The config file if one is given, else the defaults.
fn load_config(path: Option<&std::path::Path>) -> Result<Config> {
    path.map_or_else(|| Ok(Config::default()), Config::load)
}

fn mount(m: MountCmd) -> Result<ExitCode> {
    let config = load_config(m.config.as_deref())?;
    replfs::fs::check_layout(&m.backing, &m.mountpoint, &m.state)?;
    if !m.foreground {
        return daemon::spawn(&m.state);
    }
    let ready = daemon::ready_fd();
    let target = replfs::ship::resolve_target(&m.state, &config.ship, m.mirror, m.key_file, true)?;
    if target.is_none() {
        log::warn!(
            "no mirror configured: changes are logged in {} but not shipped",
            m.state.display()
        );
    }
    let args = replfs::fs::MountArgs {
        backing: m.backing,
        mountpoint: m.mountpoint,
        state: m.state,
        config,
        target,
        config_path: m.config.clone(),
    };
    replfs::fs::serve(args, move || daemon::signal_ready(ready)).context("mount failed")?;
    Ok(ExitCode::SUCCESS)
}

/// The mirror a state dir ships to (command line, config, then what the
/// last mount used); an error when none is known.
fn known_target(
    state: &Path,
    config: &replfs::config::Config,
    mirror: Option<String>,
    key_file: Option<PathBuf>,
) -> Result<replfs::ship::Target> {
    replfs::ship::resolve_target(state, &config.ship, mirror, key_file, false)?.ok_or_else(|| {
        anyhow::anyhow!(
            "no mirror known for {}: use --mirror HOST:PORT",
            state.display()
        )
    })
}

fn verify(v: VerifyCmd) -> Result<ExitCode> {
    let config = load_config(v.config.as_deref())?;
    let target = known_target(&v.state, &config, v.mirror, v.key_file)?;
    let source = match v.source {
        Some(s) => s,
        None => replfs::ship::remember_backing(&v.state, None)?.ok_or_else(|| {
            anyhow::anyhow!(
                "{} does not record a backing directory: use --source DIR",
                v.state.display()
            )
        })?,
    };
    let excludes = replfs::exclude::Excludes::new(&config.exclude)?;
    let report = replfs::sync::verify::run(
        &v.state,
        &target,
        &source,
        &excludes,
        config.ship.io_timeout,
    )?;
    if v.repair {
        let n = replfs::sync::verify::record_repairs(&v.state, &report)?;
        if n > 0 && !v.json {
            println!(
                "{n} path(s) recorded for repair: the running mount or `replfs ship` repairs them"
            );
        }
    }
    if v.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", replfs::sync::verify::render(&report));
    }
    Ok(if report.identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn ship(s: ShipCmd) -> Result<ExitCode> {
    let config = load_config(s.config.as_deref())?;
    let target = known_target(&s.state, &config, s.mirror, s.key_file)?;
    let sigs = replfs::daemon::block_signals()?;
    let (wal, _) = replfs::wal::Wal::open(&s.state, &config.wal)
        .with_context(|| format!("cannot open the WAL in {}", s.state.display()))?;
    wal.sync(wal.head_lsn())?;
    let head = wal.head_lsn();
    let addr = target.addr.clone();
    let mut services = replfs::daemon::Services::start(
        &s.state,
        &wal,
        &config,
        s.config.clone(),
        Some(target),
        true,
        None,
    )?;
    let stop = services.ship_stop_flag();
    if let (Some(t), Some(f)) = (s.timeout, stop.clone()) {
        std::thread::spawn(move || {
            std::thread::sleep(t);
            f.store(true, std::sync::atomic::Ordering::Release);
        });
    }
    replfs::daemon::spawn_signal_thread(sigs, services.reloader(), move || {
        if let Some(f) = &stop {
            f.store(true, std::sync::atomic::Ordering::Release);
        }
        true
    });
    let acked = services.wait_drained().unwrap_or(0);
    services.stop();
    wal.close()?;
    if acked < head {
        anyhow::bail!("stopped: the mirror at {addr} acknowledged LSN {acked} of {head}");
    }
    println!("shipped: the mirror at {addr} has acknowledged LSN {acked} (head {head})");
    Ok(ExitCode::SUCCESS)
}

fn status(state: &std::path::Path, json: bool) -> Result<ExitCode> {
    use replfs::control::{Request, request};
    let st: replfs::status::Status = match request(state, &Request::Status)? {
        Some(v) => serde_json::from_value(v).context("bad status from the daemon")?,
        None => replfs::status::offline(state)?,
    };
    if json {
        println!("{}", serde_json::to_string(&st)?);
    } else {
        print!("{}", replfs::status::render(&st));
    }
    Ok(ExitCode::SUCCESS)
}

fn throttle(state: &std::path::Path, action: ThrottleCmd) -> Result<ExitCode> {
    use replfs::control::{Request, request};
    let req = match action {
        ThrottleCmd::Show => Request::ThrottleShow,
        ThrottleCmd::Set { rate, burst } => Request::ThrottleSet { rate, burst },
        ThrottleCmd::Clear => Request::ThrottleClear,
    };
    let v = request(state, &req)?.ok_or_else(|| {
        anyhow::anyhow!(
            "no replfs mount or ship is running on {} (nothing to throttle)",
            state.display()
        )
    })?;
    println!(
        "throttle: {} burst {} ({})",
        v["rate"].as_str().unwrap_or("?"),
        v["burst"],
        v["reason"].as_str().unwrap_or("?")
    );
    Ok(ExitCode::SUCCESS)
}

fn mirror(m: MirrorCmd) -> Result<ExitCode> {
    if let Some(MirrorAction::Import {
        dir,
        state,
        volume,
        file,
    }) = m.action
    {
        let r = replfs::mirror::import(&dir, &state, volume.as_deref(), &file)?;
        println!("{r}");
        return Ok(ExitCode::SUCCESS);
    }
    let config = load_config(m.config.as_deref())?;
    let state = m.state.context("--state is required")?;
    let opts = replfs::mirror::MirrorOptions::from_cli(
        m.listen,
        m.dir,
        state,
        m.key_file,
        &config.mirror,
    )?;
    replfs::mirror::run(opts)?;
    Ok(ExitCode::SUCCESS)
}

/// Daemonizing: the parent re-executes itself in the foreground in a new
/// session, and returns once the child says the mount is live.
mod daemon {
    use std::fs::OpenOptions;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    use std::path::Path;
    use std::process::{Command, ExitCode, Stdio};

    use anyhow::{Context, Result, bail};

    const READY_ENV: &str = "REPLFS_READY_FD";

    pub fn spawn(state: &Path) -> Result<ExitCode> {
        let log_path = state.join("replfs.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open log file {}", log_path.display()))?;
        let (rd, wr) = nix::unistd::pipe()?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(std::env::args_os().skip(1)).arg("--foreground");
        cmd.env(READY_ENV, wr.as_raw_fd().to_string());
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let wr_raw = wr.as_raw_fd();
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                // Keep the ready pipe open across exec.
                let flags = libc::fcntl(wr_raw, libc::F_GETFD);
                libc::fcntl(wr_raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                Ok(())
            });
        }
        let child = cmd.spawn().context("cannot start the mount daemon")?;
        drop(wr);
        let mut buf = [0u8; 1];
        let mut rd = std::fs::File::from(rd);
        match rd.read(&mut buf) {
            Ok(1) => {
                println!(
                    "replfs: mounted (daemon pid {}; log {})",
                    child.id(),
                    log_path.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            _ => bail!(
                "the mount daemon exited before mounting; see {}",
                log_path.display()
            ),
        }
    }

    pub fn ready_fd() -> Option<OwnedFd> {
        let fd: i32 = std::env::var(READY_ENV).ok()?.parse().ok()?;
        unsafe { std::env::remove_var(READY_ENV) };
        // The fd was handed to us by our parent through the environment.
        (unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
            .then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn signal_ready(fd: Option<OwnedFd>) {
        if let Some(fd) = fd {
            let mut f = std::fs::File::from(fd);
            let _ = std::io::Write::write_all(&mut f, b"1");
        }
    }
}
