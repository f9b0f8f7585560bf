//! `fraud-detector`'s settings in layers: flags over `TRIPWIRE_*` variables over
//! the `--config` file over defaults, read back through `--print-config`.

use std::process::{Command, Output};

fn run(file: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let path =
        std::env::temp_dir().join(format!("config_{}_{}.toml", std::process::id(), file.len()));
    std::fs::write(&path, file).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fraud-detector"));
    cmd.args(["--config", &path.display().to_string(), "--print-config"]).args(args);
    for var in ["TRIPWIRE_TOPIC", "TRIPWIRE_JOB", "TRIPWIRE_ARCHIVE", "TRIPWIRE_JOB_CONFIG"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn effective(file: &str, env: &[(&str, &str)], args: &[&str]) -> toml::Table {
    let out = run(file, env, args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

const FILE: &str = r#"
[job]
topic = "from-file"
job = "from-file"
commit_interval_ms = 250
lateness_ms = 1000
archive = false
bounded = true

[fraud]
windows = [1000, 5000]
tick_ms = 10
velocity = { limits = [[1000, 3]] }
amount_spike = { window_ms = 5000, factor_percent = 300, min_history = 3 }
travel = { max_speed_kmh = 900, lookback_ms = 5000 }
card_testing = { small_amount_minor = 500, min_merchants = 3, window_ms = 5000 }
country_hopping = { min_countries = 3, window_ms = 5000 }
"#;

#[test]
fn flags_beat_environment_beats_file_beats_defaults() {
    let e = effective(FILE, &[("TRIPWIRE_TOPIC", "from-env")], &["--lateness-ms", "42"]);
    let job = e["job"].as_table().unwrap();
    assert_eq!(job["topic"].as_str(), Some("from-env"), "environment over file");
    assert_eq!(job["job"].as_str(), Some("from-file"), "file over default");
    assert_eq!(job["lateness_ms"].as_integer(), Some(42), "flag over file");
    assert_eq!(job["commit_interval_ms"].as_integer(), Some(250), "file over default");
    assert_eq!(job["archive"].as_bool(), Some(false), "a boolean setting from the file");
    assert_eq!(job["bounded"].as_bool(), Some(true), "a switch from the file");
    assert_eq!(job["sample_every"].as_integer(), Some(5_000), "default when nobody says");
    assert_eq!(e["fraud"]["tick_ms"].as_integer(), Some(10), "the [fraud] table");
    // And the defaults alone, for contrast.
    let d = effective("", &[], &[]);
    assert_eq!(d["job"]["topic"].as_str(), Some("transactions"));
    assert_eq!(d["fraud"]["tick_ms"].as_integer(), Some(1));
}

#[test]
fn printed_settings_read_back_as_the_same_settings() {
    let first = effective(FILE, &[], &["-w", "3"]);
    let again = effective(&toml::to_string(&first).unwrap(), &[], &[]);
    assert_eq!(first, again);
}

#[test]
fn unknown_settings_and_invalid_rules_are_refused_with_their_names() {
    let out = run("[job]\ncomit_interval_ms = 1\n", &[], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("comit_interval_ms"));
    let out = run(&FILE.replace("windows = [1000, 5000]", "windows = []"), &[], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid [fraud] config"));
}
