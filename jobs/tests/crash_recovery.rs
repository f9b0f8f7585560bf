//! Exactly once under SIGKILL and rescaling: the fraud-detector binary is
//! killed several times while it reads a topic, restarted each time with
//! another number of workers (2, 1, 3 threads in one process), and finally
//! runs to the topic's end as 2 processes × 2 workers, all with the shipped
//! defaults (idle timeout, restart point interval, dedup horizon) but the
//! commit intervals (20 ms, also while catching up: kills come at commits,
//! and a bounded run at the shipped 20 s catch-up interval would commit this
//! input once, at its end). PostgreSQL and Redis must then hold
//! exactly the reference model's result over the accepted input as of the end
//! of input (a bounded run ends just past its last event, windows as they
//! stand): every statistic, every alert once, every worker's frontier there.
//! The first two restarts read from the beginning; the last kill waits until
//! a restart must seek every partition to a recorded restart point, and the
//! last run must say that it did. (A run's restart points reach PostgreSQL
//! only once its dead-letter producer has started and committed, a second or
//! so: the last kill then mostly comes after that run's last commit, and the
//! last run seeks, replays an hour and more, and must write nothing wrong.)
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tripwire_connectors::dead_letter::DeadLetterReason;
use tripwire_connectors::kafka_admin::ensure_topic;
use tripwire_connectors::readback;
use tripwire_connectors::Endpoints;
use tripwire_dataflow::reference::Reference;
use tripwire_dataflow::FraudConfig;
use tripwire_jobs::generator::{Expect, GenConfig, Generator, SchemaIds};

use common::{accepted, committed, now_ms, pg, produce};

struct Run {
    topic: String,
    job: String,
    schema: String,
    config_file: String,
}

impl Run {
    /// Start the job as `processes` processes of `workers` workers each, each
    /// process logging (its info about resuming, as JSON) to `log(p)`.
    fn start(
        &self,
        processes: usize,
        workers: usize,
        log: impl Fn(usize) -> PathBuf,
    ) -> Vec<Child> {
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
                    .args(["--config", &self.config_file, "--metrics-port", "0"])
                    .arg("--log-json")
                    .env("TRIPWIRE_PG_SCHEMA", &self.schema)
                    .env("RUST_LOG", "error,fraud_detector=info")
                    .stdout(File::create(log(p)).unwrap())
                    .spawn()
                    .expect("fraud-detector starts")
            })
            .collect()
    }
}

/// The job's default `--dedup-horizon-ms`, which this test does not change.
const DEDUP_HORIZON_MS: i64 = 3_600_000;

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
    let start = now - 3 * 3_600_000;
    let plan = Generator::new(GenConfig {
        seed: 11,
        cards: 500,
        partitions: 6,
        start_ms: start,
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
    // 100 minutes of event time: longer than the dedup horizon, so that a
    // late enough restart seeks to recorded offsets instead of the beginning.
    .generate(150_000);
    produce(&endpoints.kafka_bootstrap, &run.topic, &plan);

    // A restart re-reads from the latest restart point (the shipped sample
    // interval: every 5,000 records of a partition, about 20 minutes of event
    // time here) lying the longest window, a tick and the shipped dedup
    // horizon (an hour) below the frontier both stores committed.
    let window = FraudConfig::seconds().max_window() as i64;
    // Kill it three times, each time after both stores have committed more
    // than before, each time with another number of workers: twice at the
    // first such commit, early in the input, so that those restarts read from
    // the beginning, and once only when every partition has a stored restart
    // point a restart would start at, so that the last run must seek.
    let (rt, client) = pg(&run.schema);
    let mut redis = redis::Client::open(endpoints.redis_url()).unwrap().get_connection().unwrap();
    let logs = |name: &str| {
        let job = run.job.clone();
        let name = name.to_string();
        move |p: usize| std::env::temp_dir().join(format!("{job}-{name}-p{p}.log"))
    };
    // Partitions with a restart point a restart from `frontier` would start at.
    let seekable = |frontier: i64| -> i64 {
        let below = frontier - window - 1 - DEDUP_HORIZON_MS;
        rt.block_on(client.query_one(
            "SELECT count(DISTINCT partition) FROM source_progress
             WHERE job = $1 AND max_event_time < $2",
            &[&run.job, &below],
        ))
        .unwrap()
        .get(0)
    };
    let mut kills = Vec::new();
    // Down to one worker, then up to three. (In the order 2, 3, 1, a
    // one-worker run after a killed three-worker one twice waited a minute
    // for its last restart points, which the third kill waits for; why is
    // not yet understood.)
    for (workers, must_seek) in [(2, false), (1, false), (3, true)] {
        let before = kills.last().copied().unwrap_or(0);
        let mut child = run.start(1, workers, logs(&format!("w{workers}"))).pop().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let pg = committed(&rt, &client, &run.job).unwrap_or(0);
            let redis = readback::redis_frontiers(&mut redis, &run.job, workers).unwrap();
            let redis = redis.iter().map(|f| f.unwrap_or(0) as i64).min().unwrap();
            let now = pg.min(redis);
            if now > before && (!must_seek || seekable(now) == 6) {
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
    let last = logs("last");
    for mut child in run.start(2, 2, &last) {
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
    // The last run did resume from recorded offsets: each of its processes
    // says so, for every partition.
    for p in 0..2 {
        let log = std::fs::read_to_string(last(p)).unwrap();
        let resumed = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["fields"]["message"] == "resuming from checkpoints")
            .unwrap_or_else(|| panic!("process {p} of the last run resumes: {log}"));
        assert_eq!(
            resumed["fields"]["partitions_resumed"], 6,
            "process {p} of the last run starts every partition at a restart point: {resumed}"
        );
    }

    // Redis: every alert in the stream exactly once.
    let con = &mut redis;
    let ids = readback::redis_alert_ids(con, &run.job).unwrap();
    let unique: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "no alert twice in the Redis stream");
    assert_eq!(unique, want, "the Redis stream holds exactly the reference's alerts");
    let redis_stats = readback::redis_stats(con, &run.job).unwrap();
    assert_eq!(differ(&redis_stats), None, "Redis statistics equal the reference's as of the end");
}
