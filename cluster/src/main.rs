//! `tripwire`: the operator's CLI.
//!
//! # Layout
//!
//! - [`stack`]: `tripwire stack up | down | status | logs`, the local Kafka,
//!   PostgreSQL, Redis and Prometheus on loopback, installed when missing.
//! - `demo` and `test`: the README's two commands.
//!
//! Depends on `tripwire-connectors` (addresses and clients), never on the
//! dataflow: the CLI runs jobs, it does not compute.

mod stack;

use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use stack::Stack;

/// Tripwire's operator CLI.
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
    /// Bring the stack up and run the main job on generated traffic.
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
            StackCmd::Status => Ok(print_status(&stack)),
            StackCmd::Logs { services, lines } => {
                print!("{}", stack.logs(&services, lines));
                Ok(ExitCode::SUCCESS)
            }
        },
        Cmd::Demo => {
            stack.up()?;
            let code = print_status(&stack);
            println!(
                "\nThe stack is up. The fraud-detector job joins this command once it exists;"
            );
            println!("stop the stack with `./tripwire stack down`.");
            Ok(code)
        }
        Cmd::Test {
            keep_stack,
            cargo_args,
        } => {
            let started = stack.up()?;
            print_status(&stack);
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(&stack.root)
                .args(["test", "--release", "--workspace"])
                .args(&cargo_args)
                .status()
                .context("running cargo test")?;
            if !keep_stack && !started.is_empty() {
                let started: Vec<String> = started.iter().map(|s| s.to_string()).collect();
                stack.down(&started)?;
            }
            Ok(if status.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
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
