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
    /// Bring the stack up and run every test of the workspace.
    Test {
        /// Leave the services this command started running afterwards.
        #[arg(long)]
        keep_stack: bool,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
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
            let started = stack.up()?;
            print_status(&stack);
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
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
