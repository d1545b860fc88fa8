//! Point-in-time recovery from a real mounted workload: `log replay` up to an
//! LSN or a time rebuilds the tree exactly as it was then.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::workload::{mixed_workload, pattern};
use common::*;

/// A copy of the tree at this instant, metadata and hard links included.
fn snapshot(src: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a");
}

fn head_lsn(rig: &Rig) -> u64 {
    rig.dump()
        .last()
        .and_then(|r| r["lsn"].as_u64())
        .unwrap_or(0)
}

#[test]
fn replay_to_a_past_lsn_or_time_rebuilds_the_tree_of_that_moment() {
    let rig = Rig::new();
    fs::set_permissions(&rig.backing, fs::Permissions::from_mode(0o755)).unwrap();
    // Part 1, then a pause: the tree at the end of part 1 is the target.
    let m = rig.mount(None);
    mixed_workload(&rig.mnt);
    m.unmount();
    let mid_lsn = head_lsn(&rig);
    let at_mid = rig.path("at-mid");
    snapshot(&rig.backing, &at_mid);
    std::thread::sleep(Duration::from_millis(50));
    let mid_time = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    std::thread::sleep(Duration::from_millis(50));
    // Part 2 changes, overwrites and removes much of it.
    let m = rig.mount(None);
    fs::remove_file(rig.mnt.join("doc-moved.txt")).unwrap();
    fs::rename(rig.mnt.join("a/b2"), rig.mnt.join("b3")).unwrap();
    fs::write(rig.mnt.join("b3/f1"), pattern(50_000, 9)).unwrap();
    fs::write(rig.mnt.join("late"), b"after the point").unwrap();
    std::os::unix::fs::chown(rig.mnt.join("late"), Some(77), Some(77)).unwrap();
    m.unmount();
    assert!(head_lsn(&rig) > mid_lsn);
    // By LSN.
    let by_lsn = rig.replay("by-lsn", &["--until", &mid_lsn.to_string()]);
    assert_same_tree(&at_mid, &by_lsn);
    // By time: the last record at or before it is the last of part 1.
    let by_time = rig.replay("by-time", &["--until-time", &mid_time]);
    assert_same_tree(&at_mid, &by_time);
    // To the end: the source as it is now.
    let end = rig.replay("to-end", &[]);
    assert_same_tree(&rig.backing, &end);
    // Replaying into a non-empty directory needs --force.
    let out = replfs(&[
        "log",
        "replay",
        "--state",
        rig.state.to_str().unwrap(),
        "--into",
        end.to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "non-empty target refused without --force"
    );
    // A point beyond the log is refused clearly.
    let out = replfs(&[
        "log",
        "replay",
        "--state",
        rig.state.to_str().unwrap(),
        "--into",
        rig.path("nowhere").to_str().unwrap(),
        "--until",
        "999999",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("999999"));
}
