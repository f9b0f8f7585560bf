//! Dead letters exactly once across broker deaths: the Kafka broker is
//! SIGKILLed while the job is sending dead letters, the job is SIGKILLed while
//! the broker is down, and the broker is then restarted (cleanly) under the
//! job's next run. The dead-letter topic, read `read_committed`, must then
//! hold every rejected record exactly once, and `late_events` every late one
//! once. All with the shipped defaults but `--bounded`.
//!
//! The failure this guards against: an idempotent producer alone bumps its
//! epoch after some broker failures and sends again letters the broker had
//! already written, and letters still in flight when a process dies land
//! behind the tail its successor read.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tripwire_cluster::stack::process;
use tripwire_cluster::stack::{is_local, Stack};
use tripwire_connectors::dead_letter::DeadLetterReason;
use tripwire_connectors::kafka_admin::ensure_topic;
use tripwire_dataflow::FraudConfig;
use tripwire_jobs::generator::{Expect, GenConfig, Generator};

use common::{dead_letters, now_ms, produce, rejected};

/// Brings the broker back whatever happens, for the tests after this one.
struct Restore<'a>(&'a Stack);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.up() {
            eprintln!("could not bring the stack back up: {e:#}");
        }
    }
}

fn start(topic: &str, job: &str, schema: &str, config_file: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fraud-detector"))
        .args(["--topic", topic, "--dlq-topic", &format!("{topic}-dlq")])
        .args(["--job", job, "--bounded", "-w", "2", "--metrics-port", "0"])
        .args(["--config", config_file])
        .env("TRIPWIRE_PG_SCHEMA", schema)
        .env("RUST_LOG", "error,tripwire_connectors::dead_letter_sink=warn")
        .spawn()
        .expect("fraud-detector starts")
}

/// Records in the dead-letter topic so far (letters, aborted or not, and
/// transaction markers): more than before means the job is sending letters.
fn letters_so_far(bootstrap: &str, dlq: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    (0..8)
        .map(|p| {
            consumer.fetch_watermarks(dlq, p, Duration::from_secs(5)).map(|(_, h)| h).unwrap_or(0)
        })
        .sum()
}

#[test]
fn dead_letters_once_when_broker_and_job_die() {
    let stack = Stack::from_env().unwrap();
    let endpoints = stack.endpoints.clone();
    if !is_local(&endpoints.kafka_bootstrap) {
        println!("skipped: {} is not on this machine", endpoints.kafka_bootstrap);
        return;
    }
    let _restore = Restore(&stack);
    let bootstrap = endpoints.kafka_bootstrap.clone();
    let id = format!("{}_{}", std::process::id(), now_ms());
    let topic = format!("dlq_outage_{id}");
    let dlq = format!("{topic}-dlq");
    let job = topic.clone();
    let config_file = common::fraud_config_file(&topic, &FraudConfig::seconds());
    let config_file = config_file.display().to_string();
    ensure_topic(&bootstrap, &topic, 8).expect("topic; is the stack up?");

    // Many rejected records (some of them 100 kB), spread over the whole
    // input, so that letters are on their way whenever the broker dies.
    let now = now_ms();
    let plan = Generator::new(GenConfig {
        bad_per_10k: 600,
        late_per_10k: 100,
        // 100,000 events 50 ms apart: 1.4 h, all in the past.
        ..common::traffic(23, 8, now - 3 * 3_600_000)
    })
    .generate(100_000);
    produce(&bootstrap, &topic, &plan);
    let want = rejected(&plan);
    let late = plan.iter().filter(|p| p.expect == Expect::Reject(DeadLetterReason::Late)).count();
    assert!(want.len() > 5_000 && late > 0, "{} rejected, {late} late", want.len());

    // First run: the broker dies (SIGKILL) once letters are flowing, and the
    // job dies (SIGKILL) while the broker is down.
    let mut child = start(&topic, &job, &topic, &config_file);
    let deadline = Instant::now() + Duration::from_secs(180);
    while letters_so_far(&bootstrap, &dlq) == 0 {
        assert!(child.try_wait().unwrap().is_none(), "the job ended before any dead letter");
        assert!(Instant::now() < deadline, "no dead letter within 180 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let broker = stack.files("kafka").running_pid().expect("the stack runs the broker");
    process::stop(broker, "KILL", Duration::from_secs(30)).unwrap();
    let first_finished = child.try_wait().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let began = Instant::now();
    println!("broker and job killed; the job had finished already: {first_finished:?}");
    stack.up().unwrap();

    // Second run, to the end; the broker restarts (cleanly) under it once it
    // has committed dead letters beyond the first run's.
    let before = letters_so_far(&bootstrap, &dlq);
    let mut child = start(&topic, &job, &topic, &config_file);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut restarted = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if !restarted && letters_so_far(&bootstrap, &dlq) > before {
            stack.restart("kafka").unwrap();
            restarted = true;
        }
        assert!(Instant::now() < deadline, "the second run did not finish within 180 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "second run: {status} after {:?}; broker restarted under it: {restarted}",
        began.elapsed()
    );
    if !status.success() {
        // The broker restart may end a run that could not reconnect in time;
        // a supervisor restarts it, and so does this test.
        let status = start(&topic, &job, &topic, &config_file).wait().unwrap();
        assert!(status.success(), "the third run finishes: {status}");
        println!("third run ended after {:?}", began.elapsed());
    }

    let mut got: Vec<(i32, i64)> = dead_letters(&dlq).iter().map(|d| (d.0, d.1)).collect();
    got.sort_unstable();
    let copies = got.len() - {
        let mut u = got.clone();
        u.dedup();
        u.len()
    };
    println!("{} dead letters ({copies} copies), {} rejected records", got.len(), want.len());
    if got != want {
        let (g, w): (std::collections::BTreeSet<_>, std::collections::BTreeSet<_>) =
            (got.iter().collect(), want.iter().collect());
        let extra: Vec<_> = g.difference(&w).take(10).collect();
        let missing: Vec<_> = w.difference(&g).take(10).collect();
        println!("plan {} records; extra {extra:?}; missing {missing:?}", plan.len());
        let all = dead_letters(&dlq);
        let reasons: std::collections::BTreeMap<&str, usize> =
            all.iter().fold(Default::default(), |mut m, d| {
                *m.entry(d.2.as_str()).or_default() += 1;
                m
            });
        println!("letters by reason: {reasons:?}");
    }
    assert_eq!(copies, 0, "no dead letter twice");
    assert!(got == want, "each rejected record in the dead-letter topic once");

    let mut endpoints = endpoints;
    endpoints.pg_schema = Some(topic.clone());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let stored: i64 = rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&endpoints.postgres_config(), NoTls).await.unwrap();
        tokio::spawn(conn);
        c.query_one(
            "SELECT count(*) FROM late_events WHERE topic = $1 AND reason = 'late'",
            &[&topic],
        )
        .await
        .unwrap()
        .get(0)
    });
    assert_eq!(stored as usize, late, "every late record in late_events, once");
    // The oversize records make these topics some 100 MB: give the disk back.
    tripwire_connectors::kafka_admin::delete_topics(&bootstrap, &[&topic, &dlq]).unwrap();
}
