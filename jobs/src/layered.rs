//! Settings in layers, as operators expect them: command-line flags over
//! environment variables over a TOML file over built-in defaults.
//!
//! The file's `[job]` table uses the flags' long names (`commit_interval_ms`
//! or `commit-interval-ms`). [`file_args`] turns its entries into flags placed
//! before the real command line, so that clap parses one thing; the real
//! flags come later and win (the command sets `args_override_self`). An entry
//! whose flag has an environment variable that is set is left out, so the
//! environment wins over the file. An unknown key is an error, not a typo
//! silently ignored.

use std::ffi::OsString;

/// The command line to parse: `argv[0]`, the file's `[job]` entries as flags, then `argv[1..]`.
pub fn file_args(
    cmd: &clap::Command,
    argv: &[OsString],
    job: &toml::Table,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Vec<OsString>, String> {
    let mut injected = Vec::new();
    for (key, value) in job {
        let long = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
            .ok_or_else(|| format!("[job] has an unknown setting {key:?}"))?;
        if arg.get_env().and_then(|v| v.to_str()).is_some_and(|var| env(var).is_some()) {
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => {
                if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
                    if *b {
                        injected.push(OsString::from(format!("--{long}")));
                    }
                    continue;
                }
                b.to_string()
            }
            other => {
                return Err(format!("[job] {key} = {other}: expected a string, number or boolean"))
            }
        };
        injected.push(OsString::from(format!("--{long}={text}")));
    }
    let mut out = Vec::with_capacity(argv.len() + injected.len());
    out.extend(argv.first().cloned());
    out.extend(injected);
    out.extend(argv.iter().skip(1).cloned());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cmd() -> Command {
        Command::new("job")
            .args_override_self(true)
            .arg(Arg::new("topic").long("topic").env("T_TOPIC").default_value("transactions"))
            .arg(Arg::new("interval").long("commit-interval-ms").default_value("500"))
            .arg(Arg::new("bounded").long("bounded").action(ArgAction::SetTrue))
    }

    fn parse(
        file: &str,
        env: &[(&str, &str)],
        argv: &[&str],
    ) -> Result<(String, String, bool), String> {
        let table: toml::Table = toml::from_str(file).unwrap();
        let job = table.get("job").and_then(|j| j.as_table()).cloned().unwrap_or_default();
        let argv: Vec<OsString> =
            std::iter::once("job").chain(argv.iter().copied()).map(Into::into).collect();
        let lookup = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        let args = file_args(&cmd(), &argv, &job, lookup)?;
        // clap reads the real environment for `env`; the test's variables are not set there,
        // so an env-set entry shows as "left out" and the default remains.
        let m = cmd().try_get_matches_from(args).map_err(|e| e.to_string())?;
        Ok((
            m.get_one::<String>("topic").unwrap().clone(),
            m.get_one::<String>("interval").unwrap().clone(),
            m.get_flag("bounded"),
        ))
    }

    #[test]
    fn file_beats_defaults_and_flags_beat_the_file() {
        let file = "[job]\ntopic = \"from-file\"\ncommit_interval_ms = 250\nbounded = true\n";
        assert_eq!(parse(file, &[], &[]).unwrap(), ("from-file".into(), "250".into(), true));
        assert_eq!(
            parse(file, &[], &["--topic", "from-flag", "--commit-interval-ms=7"]).unwrap(),
            ("from-flag".into(), "7".into(), true)
        );
        assert_eq!(parse("", &[], &[]).unwrap(), ("transactions".into(), "500".into(), false));
    }

    #[test]
    fn a_set_environment_variable_keeps_the_file_entry_out() {
        let file = "[job]\ntopic = \"from-file\"\n";
        let (topic, _, _) = parse(file, &[("T_TOPIC", "from-env")], &[]).unwrap();
        assert_eq!(
            topic, "transactions",
            "the file's topic was left for the environment to decide"
        );
    }

    #[test]
    fn unknown_keys_and_tables_are_errors() {
        let e = parse("[job]\ncomit_interval_ms = 1\n", &[], &[]).unwrap_err();
        assert!(e.contains("comit_interval_ms"), "{e}");
        let e = parse("[job]\ntopic = [1, 2]\n", &[], &[]).unwrap_err();
        assert!(e.contains("expected a string"), "{e}");
    }
}
