//! Exactly once under SIGKILL and rescaling: the fraud-detector binary is
//! killed several times while it reads a topic, restarted each time with
//! another number of workers (2, 3, 1 threads in one process), and finally
//! runs to the topic's end as 2 processes × 2 workers, all with the shipped
//! defaults (idle timeout included). PostgreSQL and Redis must then hold
//! exactly the reference model's result over the accepted input as of the end
//! of input (a bounded run ends just past its last event, windows as they
//! stand): every statistic, every alert once, every worker's frontier there.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tripwire_connectors::dead_letter::DeadLetterReason;
use tripwire_connectors::kafka_admin::ensure_topic;
use tripwire_connectors::readback;
use tripwire_connectors::Endpoints;
use tripwire_dataflow::reference::Reference;
use tripwire_dataflow::FraudConfig;
use tripwire_jobs::generator::{Expect, GenConfig, Generator, SchemaIds};

use common::{accepted, now_ms, produce};

struct Run {
    topic: String,
    job: String,
    schema: String,
    config_file: String,
}

impl Run {
    /// Start the job as `processes` processes of `workers` workers each.
    fn start(&self, processes: usize, workers: usize) -> Vec<Child> {
        let hosts = std::env::temp_dir().join(format!("{}-hosts.txt", self.job));
        let ports: Vec<std::net::TcpListener> =
            (0..processes).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let lines: String = ports
            .iter()
            .map(|l| format!("127.0.0.1:{}\n", l.local_addr().unwrap().port()))
            .collect();
        drop(ports);
        std::fs::write(&hosts, lines).unwrap();
        (0..processes)
            .map(|p| {
                Command::new(env!("CARGO_BIN_EXE_fraud-detector"))
                    .args(["--topic", &self.topic, "--dlq-topic", &format!("{}-dlq", self.topic)])
                    .args(["--job", &self.job, "--bounded", "-w", &workers.to_string()])
                    .args(["-n", &processes.to_string(), "-p", &p.to_string()])
                    .args(["-h", &hosts.display().to_string()])
                    .args(["--commit-interval-ms", "20"])
                    .args(["--catch-up-commit-interval-ms", "0"])
                    .args([
                        "--sample-every",
                        "300",
                        "--config",
                        &self.config_file,
                        "--metrics-port",
                        "0",
                    ])
                    .env("TRIPWIRE_PG_SCHEMA", &self.schema)
                    .env("RUST_LOG", "error")
                    .spawn()
                    .expect("fraud-detector starts")
            })
            .collect()
    }
}

fn pg(schema: &str) -> (tokio::runtime::Runtime, tokio_postgres::Client) {
    let mut endpoints = Endpoints::from_env().unwrap();
    endpoints.pg_schema = Some(schema.to_string());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&endpoints.postgres_config(), NoTls).await.unwrap();
        tokio::spawn(conn);
        c
    });
    (rt, client)
}

/// The least checkpoint of the job (a starting run gives every one of its workers a row).
fn committed(rt: &tokio::runtime::Runtime, c: &tokio_postgres::Client, job: &str) -> Option<i64> {
    rt.block_on(async {
        let rows =
            c.query("SELECT min(frontier) FROM checkpoints WHERE job = $1", &[&job]).await.ok()?;
        rows[0].get(0)
    })
}

#[test]
fn killed_and_restarted_job_leaves_exactly_the_reference_result() {
    let endpoints = Endpoints::from_env().unwrap();
    let id = format!("{}_{}", std::process::id(), now_ms());
    let config_file = std::env::temp_dir().join(format!("crash_{id}.toml"));
    #[derive(serde::Serialize)]
    struct File {
        fraud: FraudConfig,
    }
    std::fs::write(&config_file, toml::to_string(&File { fraud: FraudConfig::seconds() }).unwrap())
        .unwrap();
    let run = Run {
        topic: format!("crash_{id}"),
        job: format!("crash_{id}"),
        schema: format!("crash_{id}"),
        config_file: config_file.display().to_string(),
    };
    ensure_topic(&endpoints.kafka_bootstrap, &run.topic, 6).expect("topic; is the stack up?");

    let now = now_ms();
    let plan = Generator::new(GenConfig {
        seed: 11,
        cards: 500,
        partitions: 6,
        start_ms: now - 3 * 3_600_000,
        spacing_ms: 40,
        fraud_per_10k: 40,
        bad_per_10k: 10,
        v1_percent: 30,
        lateness_ms: 5_000,
        out_of_order_per_10k: 300,
        late_per_10k: 20,
        duplicates_per_10k: 5,
        near_miss_per_10k: 0,
        // Second-scale windows: benign randomness is what fires the rules here.
        spending_profiles: false,
        rate_per_s: None,
        now_ms: now,
        schema_ids: SchemaIds::EMBEDDED,
    })
    .generate(30_000);
    produce(&endpoints.kafka_bootstrap, &run.topic, &plan);

    // Kill it three times, each time after it has committed more than before,
    // each time with another number of workers.
    let (rt, client) = pg(&run.schema);
    let mut kills = Vec::new();
    for workers in [2, 3, 1] {
        let before = committed(&rt, &client, &run.job).unwrap_or(0);
        let mut child = run.start(1, workers).pop().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let now = committed(&rt, &client, &run.job).unwrap_or(0);
            if now > before && now < i64::MAX {
                child.kill().expect("SIGKILL");
                child.wait().unwrap();
                kills.push(now);
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the job ended ({status}) before it could be killed; progress {now}");
            }
            assert!(Instant::now() < deadline, "no progress to kill at");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for mut child in run.start(2, 2) {
        let status = child.wait().unwrap();
        assert!(status.success(), "the last run finishes: {status}");
    }

    // The judge: the reference model over the records the source accepts.
    let (accepted, _) = accepted(&plan);
    let fraud = FraudConfig::seconds();
    let reference = Reference::new(&fraud, &accepted);
    // The input's end: just past the last accepted event's (ticked) time (its
    // Kafka timestamps are all later than its event times).
    let end = accepted.iter().map(|x| reference.time_of(x.event_time_ms)).max().unwrap() + 1;
    let want: BTreeSet<i64> = reference.alerts_until(end - 1).iter().map(|a| a.id as i64).collect();
    let want_stats = reference.stats_at(end - 1);
    assert!(want.len() > 50, "the input fires rules: {}", want.len());

    let late_planned =
        plan.iter().filter(|p| p.expect == Expect::Reject(DeadLetterReason::Late)).count();
    let (alerts, stats, frontiers, late) = rt.block_on(async {
        let alerts: Vec<i64> = client
            .query("SELECT alert_id FROM alerts", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let stats = readback::pg_stats(&client).await.unwrap();
        let frontiers: Vec<i64> = client
            .query("SELECT frontier FROM checkpoints WHERE job = $1", &[&run.job])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let late: i64 = client
            .query_one(
                "SELECT count(*) FROM late_events WHERE topic = $1 AND reason = 'late'",
                &[&run.topic],
            )
            .await
            .unwrap()
            .get(0);
        (alerts, stats, frontiers, late)
    });
    let got: BTreeSet<i64> = alerts.iter().copied().collect();
    let missing = want.difference(&got).count();
    let extra = got.difference(&want).count();
    println!(
        "kills at frontiers {kills:?}; alerts: {} matched, {missing} missing, {extra} extra",
        want.len() - missing
    );
    assert_eq!((missing, extra), (0, 0), "PostgreSQL alerts equal the reference's");
    assert!(want_stats.len() > 20, "statistics to compare: {}", want_stats.len());
    let differ = |got| common::stats_differ(&want_stats, got);
    assert_eq!(differ(&stats), None, "PostgreSQL statistics equal the reference's as of the end");
    assert_eq!(frontiers, vec![end as i64; 4], "the last run's four workers, at the end");
    assert!(late_planned > 0, "the input has late records");
    assert_eq!(late as usize, late_planned, "every late record in late_events, once");
    let (samples, resumed): (i64, i64) = rt.block_on(async {
        let r = client
            .query_one(
                "SELECT count(*), count(DISTINCT partition) FROM source_progress WHERE job = $1",
                &[&run.job],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    });
    assert!(samples > 0 && resumed == 6, "restart points recorded for every partition: {samples}");
    // The restarts did resume from recorded offsets: some sample lies below the
    // last kill's frontier minus the longest window.
    let below: i64 = rt.block_on(async {
        let skip = kills.iter().max().unwrap() - fraud.max_window() as i64 - 1;
        client
            .query_one(
                "SELECT count(*) FROM source_progress WHERE job = $1 AND max_event_time < $2",
                &[&run.job, &skip],
            )
            .await
            .unwrap()
            .get(0)
    });
    assert!(below > 0, "a restart point below the resume frontier existed");

    // Redis: every alert in the stream exactly once.
    let mut con = redis::Client::open(endpoints.redis_url()).unwrap().get_connection().unwrap();
    let ids = readback::redis_alert_ids(&mut con, &run.job).unwrap();
    let unique: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "no alert twice in the Redis stream");
    assert_eq!(unique, want, "the Redis stream holds exactly the reference's alerts");
    let redis_stats = readback::redis_stats(&mut con, &run.job).unwrap();
    assert_eq!(differ(&redis_stats), None, "Redis statistics equal the reference's as of the end");
}
