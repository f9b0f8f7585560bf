//! `tripwire demo`: txgen writes labelled traffic, the fraud detector reads it to its end
//! (2 workers), and the results are shown from PostgreSQL.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use tripwire_cluster::stack::Stack;

fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed with {status}");
    }
    Ok(())
}

/// Build the job binaries, generate, detect, and print the findings.
pub fn run(stack: &Stack) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_checked(
        Command::new(&cargo).current_dir(&stack.root).args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "tripwire-jobs",
            "--bins",
        ]),
        "building the job binaries",
    )?;
    let bin = |name: &str| stack.root.join("target/release").join(name);
    // A topic of its own per run, so that the demo's numbers are this run's.
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let topic = format!("demo-{stamp}");
    let labels = stack.home.join(format!("{topic}-labels.csv"));
    println!("\n== txgen: 200,000 transactions with fraud scenarios and bad records into {topic}");
    run_checked(
        Command::new(bin("txgen")).args(["--topic", &topic, "--events", "200000"]).args([
            "--fraud-per-10k",
            "5",
            "--bad-per-10k",
            "2",
            "--labels",
            &labels.display().to_string(),
        ]),
        "txgen",
    )?;
    println!(
        "\n== fraud-detector: 2 workers, reading {topic} to its end, committing to PostgreSQL"
    );
    run_checked(
        Command::new(bin("fraud-detector"))
            .args(["--topic", &topic, "--dlq-topic", &format!("{topic}-dlq"), "--job", &topic])
            .args(["--bounded", "-w", "2"])
            // Dead letters are logged one by one at WARN; the demo shows the summary instead.
            .env("RUST_LOG", "error"),
        "fraud-detector",
    )?;
    let e = &stack.endpoints;
    let psql = |sql: &str| -> Result<()> {
        run_checked(
            Command::new("psql")
                .env("PGPASSWORD", &e.pg_password)
                .args(["-h", &e.pg_host, "-p", &e.pg_port.to_string(), "-U", &e.pg_user])
                .args(["-d", &e.pg_database, "-c", sql]),
            "psql",
        )
    };
    println!(
        "\n== alerts by rule (all demo runs; alert ids are deterministic, so a re-run adds none)"
    );
    psql("SELECT rule, count(*) AS alerts FROM alerts GROUP BY rule ORDER BY rule")?;
    println!("== results complete up to, per job");
    psql(&format!(
        "SELECT job, CASE WHEN frontier_ms = 9223372036854775807 THEN 'all input' \
         ELSE complete_up_to::text END AS complete FROM results_complete_up_to WHERE job = '{topic}'"
    ))?;
    println!("Labels of the injected fraud: {}", Path::new(&labels).display());
    Ok(())
}
