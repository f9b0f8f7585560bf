//! Observability against the stack's real Prometheus: it scrapes a running
//! fraud detector fed by txgen at a fixed rate; every PromQL expression of the
//! shipped dashboard (`cluster/grafana/tripwire.json`) and alert rules
//! (`cluster/prometheus/alerts.yml`) returns data from that run, read from the
//! files themselves; `promtool` checks and unit-tests the rules; and `/ready`
//! turns false while PostgreSQL is stopped and true again once it is back.
//!
//! Needs the stack up on this machine (`./tripwire test` brings it up): the
//! test stops and starts PostgreSQL.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tripwire_cluster::stack::{is_local, Stack};
use tripwire_connectors::kafka_admin::ensure_topic;

use common::{now_ms, wait_until, Processes};

/// Brings PostgreSQL back if the test stops in the middle of its outage.
struct Restore<'a>(&'a Stack);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let _ = self.0.up();
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("cluster/grafana/tripwire.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect()
}

/// Every alert rule's `expr`, cut before its first comparison: the series the
/// condition is about, which exist in a healthy run whether or not it fires.
fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("cluster/prometheus/alerts.yml")).unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("expr:").map(str::trim))
        .map(|full| {
            let mut depth = 0i32;
            let mut cut = full.len();
            let bytes = full.as_bytes();
            for (i, c) in full.char_indices() {
                match c {
                    '(' | '{' | '[' => depth += 1,
                    ')' | '}' | ']' => depth -= 1,
                    '>' | '<' | '=' | '!'
                        if depth == 0 && bytes.get(i.wrapping_sub(1)) == Some(&b' ') =>
                    {
                        cut = i;
                        break;
                    }
                    _ => {}
                }
            }
            (full.to_string(), full[..cut].trim().to_string())
        })
        .collect()
}

/// How many series `expr` returns now, from Prometheus's HTTP API.
fn series(prometheus: &str, expr: &str) -> usize {
    let url = format!("http://{prometheus}/api/v1/query");
    let Ok(mut r) = ureq::get(&url).query("query", expr).call() else { return 0 };
    let body: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default())
            .unwrap_or_default();
    assert_ne!(body["status"], "error", "Prometheus rejects {expr}: {body}");
    body["data"]["result"].as_array().map_or(0, Vec::len)
}

fn ready(port: u16) -> Option<bool> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let r = agent.get(&format!("http://127.0.0.1:{port}/ready")).call().ok()?;
    Some(r.status().as_u16() == 200)
}

#[test]
fn prometheus_gets_every_dashboard_and_alert_series_and_ready_follows_postgres() {
    // The rules, statically.
    for args in [["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(root().join("cluster/prometheus"))
            .output()
            .expect("promtool (installed with Prometheus by the stack)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    let stack = Stack::from_env().unwrap();
    let e = stack.endpoints.clone();
    let pg_address = format!("{}:{}", e.pg_host, e.pg_port);
    if !is_local(&pg_address) {
        println!("skipped: PostgreSQL at {pg_address} is not on this machine, so the test cannot stop it");
        return;
    }
    let prometheus = e.prometheus_address();
    let id = format!("obs_{}_{}", std::process::id(), now_ms());
    ensure_topic(&e.kafka_bootstrap, &id, 6).expect("topic; is the stack up?");
    // The stack's Prometheus scrapes 9250..9257; the other job tests serve no
    // metrics, so the series Prometheus has come from this test's job.
    let port = 9250;
    let _restore = Restore(&stack);
    let mut processes = Processes(Vec::new());
    processes.0.push(
        Command::new(env!("CARGO_BIN_EXE_txgen"))
            .args(["--topic", &id, "--partitions", "6", "--rate", "2000", "--seconds", "180"])
            .args(["--cards", "2000", "--fraud-per-10k", "30", "--bad-per-10k", "10"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    processes.0.push(
        Command::new(env!("CARGO_BIN_EXE_fraud-detector"))
            .args(["--topic", &id, "--dlq-topic", &format!("{id}-dlq"), "--job", &id])
            .args(["--commit-interval-ms", "200", "--idle-timeout-s", "5"])
            .args(["--metrics-port", &port.to_string()])
            .env("TRIPWIRE_PG_SCHEMA", &id)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // Every expression of the dashboard and the rules returns data from this run.
    let mut exprs: Vec<(String, String)> =
        dashboard_exprs().into_iter().map(|x| (x.clone(), x)).collect();
    exprs.extend(alert_exprs());
    assert!(exprs.len() >= 20, "expressions found in the files: {}", exprs.len());
    let deadline = Instant::now() + Duration::from_secs(150);
    let missing = loop {
        let missing: Vec<String> = exprs
            .iter()
            .filter(|(_, q)| series(&prometheus, q) == 0)
            .map(|(full, q)| format!("{full}  (queried: {q})"))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(missing.is_empty(), "expressions without data:\n{}", missing.join("\n"));
    println!("{} expressions from the dashboard and the rules all return data", exprs.len());

    // /ready follows PostgreSQL.
    wait_until("ready", Duration::from_secs(60), || ready(port) == Some(true));

    stack.down(&["postgres".to_string()]).unwrap();
    wait_until("not ready while PostgreSQL is down", Duration::from_secs(60), || {
        ready(port) == Some(false)
    });
    stack.up().unwrap();
    wait_until("ready again once PostgreSQL is back", Duration::from_secs(60), || {
        ready(port) == Some(true)
    });
}
