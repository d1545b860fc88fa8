//! Tests of the `[throttle]` section: parsing, validation, window lookup.

use super::*;
use crate::config::Config;

fn parse(text: &str) -> Result<ThrottleConfig> {
    Ok(Config::parse(text)?.throttle)
}

fn err(text: &str) -> String {
    format!("{:#}", parse(text).unwrap_err())
}

fn window(days: &str, start: &str, end: &str) -> WindowConfig {
    WindowConfig {
        days: days.parse().unwrap(),
        start: start.parse().unwrap(),
        end: end.parse().unwrap(),
        rate: Rate::BytesPerSec(1 << 20),
        burst: None,
    }
}

fn with_windows(ws: Vec<WindowConfig>) -> ThrottleConfig {
    ThrottleConfig {
        windows: ws,
        ..ThrottleConfig::default()
    }
}

#[test]
fn the_default_is_unlimited_without_windows() {
    let c = parse("").unwrap();
    assert_eq!(c, ThrottleConfig::default());
    assert_eq!(c.rate, Rate::Unlimited);
    assert_eq!(c.burst, None);
}

#[test]
fn a_full_section_parses() {
    let c = parse(
        "[throttle]\nrate = \"100Mbit/s\"\nburst = \"4MiB\"\n\
         [[throttle.window]]\ndays = \"mon-fri\"\nstart = \"08:00\"\nend = \"18:00\"\n\
         rate = \"2MiB/s\"\nburst = \"1MiB\"\n\
         [[throttle.window]]\nstart = \"22:00\"\nend = \"06:00\"\nrate = \"unlimited\"\n",
    )
    .unwrap();
    assert_eq!(c.rate, Rate::BytesPerSec(12_500_000));
    assert_eq!(c.burst, Some(4 << 20));
    assert_eq!(c.windows.len(), 2);
    assert_eq!(c.windows[0].to_string(), "mon-fri 08:00-18:00");
    assert_eq!(c.windows[0].burst, Some(1 << 20));
    assert_eq!(c.windows[1].to_string(), "all 22:00-06:00");
    assert_eq!(c.windows[1].rate, Rate::Unlimited);
}

#[test]
fn bad_values_name_the_line() {
    let cases: &[(&str, &str)] = &[
        ("[throttle]\nrate = \"fast\"\n", "line 2"),
        (
            "[throttle]\nrate = \"1MiB/s\"\nburst = \"lots\"\n",
            "line 3",
        ),
        ("[throttle]\nspeed = \"1MiB/s\"\n", "line 2"),
        (
            "[[throttle.window]]\nstart = \"8am\"\nend = \"18:00\"\nrate = \"1MiB/s\"\n",
            "line 2",
        ),
        (
            "[[throttle.window]]\ndays = \"weekdays\"\nstart = \"08:00\"\nend = \"18:00\"\nrate = \"1MiB/s\"\n",
            "line 2",
        ),
        (
            "[[throttle.window]]\nstart = \"08:00\"\nend = \"25:00\"\nrate = \"1MiB/s\"\n",
            "line 3",
        ),
    ];
    for (text, line) in cases {
        let e = err(text);
        assert!(e.contains(line), "{text:?}: {e}");
    }
    assert!(err("[throttle]\nrate = \"fast\"\n").contains("bad rate \"fast\""));
    assert!(err("[[throttle.window]]\nstart = \"08:00\"\nend = \"18:00\"\n").contains("rate"));
}

#[test]
fn semantic_errors_name_the_window_and_line() {
    let e = err("[throttle]\nburst = 100\n");
    assert!(e.contains("line 2") && e.contains("at least 4KiB"), "{e}");
    let w = "[throttle]\n[[throttle.window]]\ndays = \"sat\"\nstart = \"09:00\"\n\
             end = \"09:00\"\nrate = 4096\n";
    let e = err(w);
    assert!(e.contains("line 2"), "{e}");
    assert!(e.contains("window 1 (sat 09:00-09:00)"), "{e}");
    assert!(e.contains("00:00-24:00"), "{e}");
    let w = "[[throttle.window]]\nstart = \"24:00\"\nend = \"09:00\"\nrate = 4096\n";
    assert!(err(w).contains("start must be before 24:00"));
    let w = "[[throttle.window]]\nstart = \"08:00\"\nend = \"09:00\"\nrate = 4096\nburst = 1\n";
    assert!(err(w).contains("line 5"));
}

#[test]
fn overlaps_in_a_file_name_both_windows_and_the_first_window_line() {
    let text = "[throttle]\nrate = \"unlimited\"\n\n\
                [[throttle.window]]\ndays = \"mon-fri\"\nstart = \"08:00\"\nend = \"18:00\"\n\
                rate = \"2MiB/s\"\n\n\
                [[throttle.window]]\ndays = \"mon-fri\"\nstart = \"17:00\"\nend = \"19:00\"\n\
                rate = \"1MiB/s\"\n";
    let e = err(text);
    assert!(e.contains("line 4"), "{e}");
    let want =
        "window 2 (mon-fri 17:00-19:00) overlaps window 1 (mon-fri 08:00-18:00) on mon at 17:00";
    assert!(e.contains(want), "{e}");
}

#[test]
fn overlapping_windows_are_rejected_naming_both() {
    let c = with_windows(vec![
        window("mon-fri", "08:00", "18:00"),
        window("mon-fri", "17:00", "19:00"),
    ]);
    let e = format!("{:#}", c.validate().unwrap_err());
    assert_eq!(
        e,
        "throttle: window 2 (mon-fri 17:00-19:00) overlaps window 1 (mon-fri 08:00-18:00) \
         on mon at 17:00"
    );
}

#[test]
fn overlaps_are_found_across_midnight_and_the_week_end() {
    let cases = [
        // Friday night runs into Saturday morning.
        (
            ("fri", "22:00", "06:00"),
            ("sat", "05:00", "07:00"),
            Some("sat at 05:00"),
        ),
        (("fri", "22:00", "06:00"), ("sat", "06:00", "07:00"), None),
        // Sunday night runs into Monday morning.
        (
            ("sun", "23:00", "01:00"),
            ("mon", "00:30", "02:00"),
            Some("mon at 00:30"),
        ),
        (
            ("sun", "23:00", "01:00"),
            ("mon-sat", "00:00", "00:59"),
            Some("mon at 00:00"),
        ),
        (
            ("all", "22:00", "06:00"),
            ("sat,sun", "08:00", "20:00"),
            None,
        ),
        (
            ("mon,wed,fri", "08:00", "18:00"),
            ("tue,thu", "08:00", "18:00"),
            None,
        ),
        (
            ("mon,wed,fri", "08:00", "18:00"),
            ("tue-thu", "12:00", "13:00"),
            Some("wed at 12:00"),
        ),
        // Touching ends do not overlap.
        (
            ("mon-fri", "08:00", "18:00"),
            ("mon-fri", "18:00", "22:00"),
            None,
        ),
        (
            ("all", "00:00", "24:00"),
            ("sun", "23:59", "00:01"),
            Some("mon at 00:00"),
        ),
    ];
    for (a, b, want) in cases {
        let c = with_windows(vec![window(a.0, a.1, a.2), window(b.0, b.1, b.2)]);
        let got = c.validate().err().map(|e| format!("{e:#}"));
        match (want, &got) {
            (None, None) => {}
            (Some(w), Some(e)) if e.ends_with(w) => {}
            _ => panic!("{a:?} vs {b:?}: expected {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn the_window_in_force_follows_days_and_crosses_midnight() {
    let c = with_windows(vec![
        window("mon-fri", "08:00", "18:00"),
        window("fri", "22:00", "06:00"),
        window("sat,sun", "10:00:30", "12:00"),
    ]);
    c.validate().unwrap();
    let at = |d: Weekday, t: &str| {
        let secs = t.parse::<TimeOfDay>().unwrap().0;
        c.window_at(d, secs).map(|(i, _)| i + 1)
    };
    use Weekday::*;
    assert_eq!(at(Mon, "07:59:59"), None);
    assert_eq!(at(Mon, "08:00"), Some(1));
    assert_eq!(at(Wed, "17:59:59"), Some(1));
    assert_eq!(at(Fri, "18:00"), None);
    assert_eq!(at(Sat, "08:00"), None);
    assert_eq!(at(Fri, "22:00"), Some(2));
    assert_eq!(at(Sat, "03:00"), Some(2));
    assert_eq!(at(Sat, "06:00"), None);
    assert_eq!(at(Thu, "23:00"), None);
    assert_eq!(at(Sat, "10:00:29"), None);
    assert_eq!(at(Sun, "10:00:30"), Some(3));
    assert_eq!(at(Sun, "12:00"), None);
}

#[test]
fn days_parse_and_print() {
    let cases: &[(&str, u8, &str)] = &[
        ("all", 0x7f, "all"),
        ("mon-fri", 0x1f, "mon-fri"),
        ("sat,sun", 0x60, "sat,sun"),
        ("mon,wed,fri", 0x15, "mon,wed,fri"),
        ("Monday-Wednesday", 0x07, "mon-wed"),
        ("fri-mon", 0x71, "fri-mon"),
        ("mon,tue,wed,sun", 0x47, "sun-wed"),
        ("mon-sun", 0x7f, "all"),
        ("sun", 0x40, "sun"),
        (" tue , thu ", 0x0a, "tue,thu"),
    ];
    for (text, mask, shown) in cases {
        let d: DaySet = text.parse().unwrap();
        assert_eq!(d.0, *mask, "{text}");
        assert_eq!(d.to_string(), *shown, "{text}");
        assert_eq!(shown.parse::<DaySet>().unwrap(), d);
    }
    for bad in ["", "weekdays", "mon-", "mon,,fri", "mo"] {
        assert!(bad.parse::<DaySet>().is_err(), "{bad:?}");
    }
}

#[test]
fn times_parse_and_print() {
    let ok: &[(&str, u32, &str)] = &[
        ("00:00", 0, "00:00"),
        ("08:30", 8 * 3600 + 1800, "08:30"),
        ("23:59:59", 86_399, "23:59:59"),
        ("24:00", 86_400, "24:00"),
    ];
    for (text, secs, shown) in ok {
        let t: TimeOfDay = text.parse().unwrap();
        assert_eq!(t.0, *secs);
        assert_eq!(t.to_string(), *shown);
    }
    for bad in [
        "8:00",
        "08:60",
        "24:01",
        "25:00",
        "08",
        "08:00:00:00",
        "ab:cd",
        "8am",
    ] {
        assert!(bad.parse::<TimeOfDay>().is_err(), "{bad:?}");
    }
}

#[test]
fn default_burst_is_a_quarter_second_with_a_floor() {
    assert_eq!(default_burst(Rate::BytesPerSec(8 << 20)), 2 << 20);
    assert_eq!(default_burst(Rate::BytesPerSec(100_000)), 64 << 10);
    assert_eq!(default_burst(Rate::Unlimited), 0);
}
