//! Throttling and status with a real mount and mirror: live retuning through
//! the control socket, SIGHUP reloads, the lag (records, bytes, seconds) and
//! the RPO target as an operator sees them.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::workload::pattern;
use common::*;

fn throttle(state: &Path, args: &[&str]) -> String {
    let mut a = vec!["throttle", "--state", state.to_str().unwrap()];
    a.extend_from_slice(args);
    let out = replfs(&a);
    assert!(
        out.status.success(),
        "throttle {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// Incompressible data, so wire bytes are the data bytes.
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn throttle_set_live_status_shows_lag_and_rpo() {
    let rig = Rig::new();
    fs::set_permissions(&rig.backing, fs::Permissions::from_mode(0o755)).unwrap();
    let key = key_file(rig.tmp.path(), "key", 3);
    let mirror = MirrorProc::start(&rig.path("dr"), &rig.path("dr-state"), &key, free_port());
    let hook_out = rig.path("hook.out");
    let cfg = format!(
        "[ship]\nrpo = \"2s\"\nrpo_hook = \"echo $REPLFS_VOLUME $REPLFS_RPO_SECONDS >> {}\"\n",
        hook_out.display()
    );
    let m = Mount::start_shipping(&rig, Some(&cfg), &mirror.addr(), &key);
    // The daemon answers from the start, before its first status snapshot.
    let st = status_json(&rig.state);
    assert_eq!(st["daemon"], true);
    assert_eq!(st["volume"], "default");
    // Paired (the first baseline, of an empty tree, done) before the test
    // starts: the lag below is the throttle's doing, not the connection's.
    wait_status(&rig.state, Duration::from_secs(30), "first pairing", |st| {
        st["link"] == "connected" && st["sync"]["phase"] == "idle" && st["sync"]["baselines"] == 1
    });
    assert_eq!(
        st["throttle_bytes_per_sec"],
        serde_json::Value::Null,
        "unlimited by default"
    );
    // Throttle hard, live, then build a backlog of 3 MiB.
    let shown = throttle(&rig.state, &["set", "256KiB/s", "--burst", "64KiB"]);
    assert!(shown.contains("256"), "{shown}");
    // In 64 KiB writes (records no bigger than the burst): a 1 MiB record
    // would go through at once into debt, and the rate over the first
    // seconds would show that record, not the setting.
    for i in 0..3 {
        use std::io::Write;
        let mut f = fs::File::create(rig.mnt.join(format!("big{i}"))).unwrap();
        for chunk in random_bytes(1 << 20, i + 1).chunks(64 << 10) {
            f.write_all(chunk).unwrap();
        }
    }
    let st = status_json(&rig.state);
    assert_eq!(st["throttle_bytes_per_sec"], 262144);
    assert_eq!(st["link"], "connected");
    assert!(st["lag_records"].as_u64().unwrap() > 0, "{st}");
    // Lag bytes and seconds are refreshed every second by the daemon.
    wait_for("lag bytes in status", Duration::from_secs(5), || {
        status_json(&rig.state)["lag_bytes"].as_u64().unwrap() > 1 << 20
    });
    // The lag grows past the 2 s RPO target: flagged, and the hook ran once.
    wait_for(
        "the RPO target to be exceeded",
        Duration::from_secs(15),
        || status_json(&rig.state)["rpo_exceeded"] == true,
    );
    let st = status_json(&rig.state);
    assert!(st["lag_seconds"].as_f64().unwrap() > 2.0, "{st}");
    wait_for("the RPO hook", Duration::from_secs(5), || hook_out.exists());
    assert_eq!(fs::read_to_string(&hook_out).unwrap().trim(), "default 2");
    // The achieved rate stays near the setting. Loosely: over the few seconds
    // seen here the first burst weighs in; bench/throttle.rs measures 10 s windows.
    let rate = st["rate_10s_bytes_per_sec"].as_f64().unwrap();
    assert!(
        rate > 0.5 * 262_144.0 && rate < 1.6 * 262_144.0,
        "rate {rate} vs 256 KiB/s"
    );
    // Open the tap: the change takes effect at once and the lag returns to zero.
    throttle(&rig.state, &["set", "unlimited"]);
    let took = wait_for("the backlog to drain", Duration::from_secs(20), || {
        let st = status_json(&rig.state);
        st["lag_records"] == 0 && st["rpo_exceeded"] == false
    });
    assert!(
        took < Duration::from_secs(5),
        "draining 3 MiB unthrottled took {took:?}"
    );
    wait_converged(&rig.backing, &mirror.dir, Duration::from_secs(30));
    assert_eq!(
        fs::read_to_string(&hook_out).unwrap().lines().count(),
        1,
        "one hook run per crossing"
    );
    let shown = throttle(&rig.state, &["clear"]);
    assert!(shown.contains("unlimited"), "{shown}");
    m.unmount();
    // Without a daemon, status reads the catalog and the WAL.
    let st = status_json(&rig.state);
    assert_eq!(st["daemon"], false);
    assert_eq!(st["link"], "down");
    assert_eq!(st["lag_records"], 0);
    assert_eq!(st["acked_lsn"], st["head_lsn"]);
    let out = replfs(&["status", "--state", rig.state.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("acked LSN") && table.contains("lag"),
        "{table}"
    );
}

#[test]
fn sighup_reloads_the_throttle_and_keeps_it_on_a_bad_config() {
    let rig = Rig::new();
    let key = key_file(rig.tmp.path(), "key", 4);
    let mirror = MirrorProc::start(&rig.path("dr"), &rig.path("dr-state"), &key, free_port());
    let m = Mount::start_shipping(
        &rig,
        Some("[throttle]\nrate = \"1MiB/s\"\n"),
        &mirror.addr(),
        &key,
    );
    let cfg = rig.tmp.path().join("replfs-test.toml");
    assert!(throttle(&rig.state, &["show"]).contains("1 MiB/s"));
    let hup = |pid: u32| unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    // A broken config is refused: the old throttle stays.
    fs::write(&cfg, "[throttle]\nrate = \"fast please\"\n").unwrap();
    hup(m.pid());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        throttle(&rig.state, &["show"]).contains("1 MiB/s"),
        "bad config kept the old throttle"
    );
    // A good one takes effect.
    fs::write(&cfg, "[throttle]\nrate = \"2MiB/s\"\n").unwrap();
    hup(m.pid());
    wait_for("the reloaded throttle", Duration::from_secs(5), || {
        throttle(&rig.state, &["show"]).contains("2 MiB/s")
    });
    // A live override wins over the reloaded config until cleared.
    throttle(&rig.state, &["set", "100Mbit/s"]);
    hup(m.pid());
    std::thread::sleep(Duration::from_millis(300));
    assert!(throttle(&rig.state, &["show"]).contains("live"));
    assert!(throttle(&rig.state, &["clear"]).contains("2 MiB/s"));
    fs::write(rig.mnt.join("f"), pattern(10_000, 1)).unwrap();
    wait_converged(&rig.backing, &mirror.dir, Duration::from_secs(30));
    m.unmount();
}

#[test]
fn throttle_without_a_daemon_says_so() {
    let rig = Rig::new();
    let out = replfs(&["throttle", "--state", rig.state.to_str().unwrap(), "show"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no replfs mount or ship is running"));
}
