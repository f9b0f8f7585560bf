//! `tripwire`: the operator's CLI.
//!
//! # Layout
//!
//! - [`stack`]: `tripwire stack up | down | status | logs`, the local Kafka,
//!   PostgreSQL, Redis and Prometheus on loopback, installed when missing.
//! - `demo` ([`demo`]) and `test`: the README's two commands.
//!
//! Depends on `tripwire-connectors` (addresses and clients), never on the
//! dataflow: the CLI runs jobs, it does not compute.

mod demo;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tripwire_cluster::launch::{self, Launch};
use tripwire_cluster::query;

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use tripwire_cluster::stack::Stack;

/// Tripwire's operator CLI.
#[cfg(test)]
mod tests {
    use super::parse_test_result;

    #[test]
    fn libtest_result_lines_are_counted_and_other_lines_are_not() {
        let line = "test result: ok. 8 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 6.32s";
        assert_eq!(parse_test_result(line), Some((8, 2)));
        assert_eq!(parse_test_result("test foo ... ok"), None);
    }
}

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage the local stack (Kafka, PostgreSQL, Redis, Prometheus).
    Stack {
        #[command(subcommand)]
        action: StackCmd,
    },
    /// Bring the stack up, generate traffic with txgen, run the fraud detector over it,
    /// and show what it found.
    Demo,
    /// Start a job as one process per line of a hosts file, and supervise the group.
    Launch(LaunchArgs),
    /// Copy the job binary, its config and the hosts file to the remote hosts, then launch.
    Submit(LaunchArgs),
    /// Per process of a launched group: up or down, pid, frontier, events/s, last commit, restarts.
    Status {
        /// The group's name (as given to launch).
        #[arg(long, default_value = "fraud-detector")]
        name: String,
        /// Worker threads per process (to map checkpoints to processes).
        #[arg(short = 'w', long, default_value_t = 1)]
        workers: usize,
        /// The jobs' metrics base port.
        #[arg(long, default_value_t = 9250)]
        metrics_port: u16,
    },
    /// Stop a launched group cleanly (SIGTERM to its supervisor).
    Stop {
        /// The group's name (as given to launch).
        #[arg(long, default_value = "fraud-detector")]
        name: String,
    },
    /// Relay TCP connections: `LISTEN=TARGET` pairs (used to reach the stack from network namespaces).
    Forward {
        /// `host:port=host:port`, repeatable.
        mappings: Vec<String>,
    },
    /// Canned queries against PostgreSQL, printed as tables.
    Query {
        #[command(subcommand)]
        what: QueryCmd,
    },
    /// Check formatting and lints, bring the stack up and run every test of the workspace.
    Test {
        /// Leave the services this command started running afterwards.
        #[arg(long)]
        keep_stack: bool,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
}

#[derive(clap::Args)]
struct LaunchArgs {
    /// Hosts file: one `host:port` per process (timely's format; `#` comments).
    #[arg(long)]
    hosts: PathBuf,
    /// Worker threads per process.
    #[arg(short = 'w', long, default_value_t = 1)]
    workers: usize,
    /// The job's TOML config, passed as `--config`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The group's name, for status and stop (and the job's checkpoints unless it gets `--job`).
    #[arg(long, default_value = "fraud-detector")]
    name: String,
    /// Give up after this many restarts of the group.
    #[arg(long, default_value_t = 10)]
    max_restarts: u32,
    /// Where remote hosts keep the submitted files.
    #[arg(long, default_value = "tripwire-job")]
    remote_dir: String,
    /// Environment for the job, `NAME=VALUE` (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// The job binary.
    binary: PathBuf,
    /// Arguments for the job (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

impl LaunchArgs {
    fn launch(self) -> Launch {
        Launch {
            name: self.name,
            hosts_file: self.hosts,
            workers: self.workers,
            config: self.config,
            binary: self.binary,
            args: self.args,
            max_restarts: self.max_restarts,
            remote_dir: self.remote_dir,
            env: self.env,
        }
    }
}

#[derive(Subcommand)]
enum QueryCmd {
    /// Alerts since a time, newest first, optionally of one rule or card.
    Alerts {
        /// How far back, e.g. "2 hours".
        #[arg(long, default_value = "1 hour")]
        since: String,
        /// Only this rule (velocity, amount_spike, impossible_travel, card_testing, country_hopping).
        #[arg(long)]
        rule: Option<String>,
        /// Only this card.
        #[arg(long)]
        card: Option<u64>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The cards with the most alerts.
    Riskiest {
        /// How far back, e.g. "1 day".
        #[arg(long, default_value = "1 day")]
        since: String,
        /// How many cards.
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
    /// One card's windows.
    Card {
        /// The card id.
        id: u64,
    },
    /// How far results are complete, per job.
    Progress,
}

#[derive(Subcommand)]
enum StackCmd {
    /// Install what is missing and start every service; harmless to repeat.
    Up,
    /// Stop every process `up` started (by pid).
    Down {
        /// Only these services (kafka, postgres, redis, prometheus).
        services: Vec<String>,
    },
    /// Stop and start one service again (what the outage tests do).
    Restart {
        /// kafka, postgres, redis or prometheus.
        service: String,
    },
    /// One line per service: up or down, and its address.
    Status,
    /// The last lines of each service's log.
    Logs {
        /// Only these services.
        services: Vec<String>,
        /// How many lines of each.
        #[arg(short = 'n', long, default_value_t = 40)]
        lines: usize,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tripwire: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let stack = Stack::from_env()?;
    match cli.command {
        Cmd::Stack { action } => match action {
            StackCmd::Up => {
                stack.up()?;
                Ok(print_status(&stack))
            }
            StackCmd::Down { services } => {
                stack.down(&services)?;
                Ok(ExitCode::SUCCESS)
            }
            StackCmd::Restart { service } => {
                stack.restart(&service)?;
                Ok(print_status(&stack))
            }
            StackCmd::Status => Ok(print_status(&stack)),
            StackCmd::Logs { services, lines } => {
                print!("{}", stack.logs(&services, lines));
                Ok(ExitCode::SUCCESS)
            }
        },
        Cmd::Launch(a) => supervise(&stack, a.launch()),
        Cmd::Submit(a) => {
            let l = a.launch();
            launch::submit(&l)?;
            supervise(&stack, l)
        }
        Cmd::Status { name, workers, metrics_port } => {
            let Some(state) = launch::read_state(&stack.home, &name) else {
                println!("no group named {name} is running (launch it with `tripwire launch --name {name} ...`)");
                return Ok(ExitCode::FAILURE);
            };
            print!("{}", query::status(&stack.endpoints, &state, workers, metrics_port)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Stop { name } => {
            let Some(state) = launch::read_state(&stack.home, &name) else {
                println!("no group named {name} is running");
                return Ok(ExitCode::FAILURE);
            };
            tripwire_cluster::stack::process::stop(
                state.supervisor,
                "TERM",
                std::time::Duration::from_secs(60),
            )?;
            println!("stopped {name}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Forward { mappings } => {
            tripwire_cluster::forward::run(&mappings)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Query { what } => {
            let sql = match what {
                QueryCmd::Alerts { since, rule, card, limit } => {
                    query::alerts_sql(&since, rule.as_deref(), card, limit)?
                }
                QueryCmd::Riskiest { since, limit } => query::riskiest_sql(&since, limit)?,
                QueryCmd::Card { id } => query::card_sql(id),
                QueryCmd::Progress => query::PROGRESS_SQL.to_string(),
            };
            let (columns, rows) = query::rows(&stack.endpoints, &sql)?;
            print!("{}", query::table(&columns, &rows));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo => {
            stack.up()?;
            if print_status(&stack) != ExitCode::SUCCESS {
                return Ok(ExitCode::FAILURE);
            }
            demo::run(&stack)?;
            println!("The stack keeps running; stop it with `./tripwire stack down`.");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Test { keep_stack, cargo_args } => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            // Formatting and lints first: a red run says so before the long part.
            for check in [
                &["fmt", "--all", "--", "--check"][..],
                &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"][..],
            ] {
                let status = Command::new(&cargo)
                    .current_dir(&stack.root)
                    .args(check)
                    .status()
                    .with_context(|| format!("running cargo {}", check[0]))?;
                if !status.success() {
                    println!("tests: 0 passed, 1 failed (cargo {} failed)", check[0]);
                    return Ok(ExitCode::FAILURE);
                }
            }
            let started = stack.up()?;
            print_status(&stack);
            let mut child = Command::new(cargo)
                .current_dir(&stack.root)
                .args(["test", "--release", "--workspace"])
                .args(&cargo_args)
                .stdout(Stdio::piped())
                .spawn()
                .context("running cargo test")?;
            // Pass the output through and add up every test binary's result line,
            // so the run ends on one summary for the whole workspace.
            let (mut passed, mut failed) = (0u64, 0u64);
            let stdout = child.stdout.take().context("cargo test stdout")?;
            for line in BufReader::new(stdout).lines() {
                let line = line?;
                println!("{line}");
                if let Some((p, f)) = parse_test_result(&line) {
                    passed += p;
                    failed += f;
                }
            }
            let status = child.wait()?;
            if !keep_stack && !started.is_empty() {
                let started: Vec<String> = started.iter().map(|s| s.to_string()).collect();
                stack.down(&started)?;
            }
            // After the stack is down, so that this is the run's last line.
            println!("tests: {passed} passed, {failed} failed");
            Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

/// Run a launched group until it ends; SIGINT or SIGTERM stops it cleanly.
fn supervise(stack: &Stack, launch: Launch) -> Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        });
        flag.store(true, Ordering::SeqCst);
    });
    let restarts = launch.supervise(&stack.home, stop)?;
    eprintln!("launch: done after {restarts} restarts");
    Ok(ExitCode::SUCCESS)
}

/// `(passed, failed)` from a libtest line like `test result: ok. 8 passed; 0 failed; ...`.
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| -> Option<u64> {
        rest.split(';').find_map(|part| {
            part.trim().strip_suffix(word)?.rsplit(' ').next()?.trim().parse().ok()
        })
    };
    Some((count(" passed")?, count(" failed")?))
}

/// Print `status` and fail unless every service is up.
fn print_status(stack: &Stack) -> ExitCode {
    let lines = stack.status();
    for (line, _) in &lines {
        println!("{line}");
    }
    if lines.iter().all(|(_, up)| *up) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
