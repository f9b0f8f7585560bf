//! The schema registry stopped mid-run: records framed with a schema id the
//! running job has not fetched yet wait for the registry (retried, counted,
//! logged) instead of turning into dead letters; once it is back, every
//! record is read and the stores hold exactly the reference's result.
//!
//! Freezes the stack's registry (SIGSTOP, then SIGCONT: its in-memory storage
//! would not survive a restart, a persistent registry's would): one test in a
//! binary of its own.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tripwire_cluster::stack::Stack;
use tripwire_connectors::confluent_registry::ConfluentRegistry;
use tripwire_connectors::kafka_admin::ensure_topic;
use tripwire_connectors::readback;
use tripwire_connectors::registry::{EmbeddedRegistry, SchemaRegistry};
use tripwire_dataflow::reference::Reference;
use tripwire_dataflow::{FraudConfig, Time, Transaction};
use tripwire_jobs::generator::{GenConfig, Generator, SchemaIds};

use common::{now_ms, produce, SourceModel};

#[test]
fn a_registry_outage_makes_records_wait_not_dead_letters() {
    let stack = Stack::from_env().unwrap();
    let e = stack.endpoints.clone();
    let topic = format!("registry_outage_{}_{}", std::process::id(), now_ms());
    ensure_topic(&e.kafka_bootstrap, &topic, 2).expect("topic; is the stack up?");
    let registry = ConfluentRegistry::new(&e.registry_url).retry_for(Duration::from_secs(60));
    let embedded = EmbeddedRegistry::new().unwrap();
    let subject = format!("{topic}-value");
    let v1 = registry.register(&subject, &embedded.schema(1).unwrap()).unwrap();
    let v2 = registry.register(&subject, &embedded.schema(2).unwrap()).unwrap();
    let fraud = FraudConfig::seconds();
    let config_file = common::fraud_config_file(&topic, &fraud);
    let traffic = |seed: u64, start_ms: i64, v1_percent: u64| {
        Generator::new(GenConfig {
            bad_per_10k: 0,
            v1_percent,
            late_per_10k: 0,
            duplicates_per_10k: 0,
            schema_ids: SchemaIds { v1, v2, alert: 3 },
            ..common::traffic(seed, 2, start_ms)
        })
    };

    // Before the outage: v2 records only, so the job fetches only v2's schema.
    let start = now_ms() - 3_600_000;
    let mut plan = traffic(41, start, 0).generate_more(3_000);
    produce(&e.kafka_bootstrap, &topic, &plan);
    let log = std::env::temp_dir().join(format!("{topic}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut job = Command::new(env!("CARGO_BIN_EXE_fraud-detector"))
        .args(["--topic", &topic, "--dlq-topic", &format!("{topic}-dlq"), "--job", &topic])
        .args(["--schema-registry", "--metrics-port", "0"])
        .arg("--config")
        .arg(&config_file)
        .env("TRIPWIRE_PG_SCHEMA", &topic)
        .env("RUST_LOG", "warn")
        .stdout(out.try_clone().unwrap())
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap();
    let pg = || {
        let mut e = e.clone();
        e.pg_schema = Some(topic.clone());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let c = rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&e.postgres_config(), NoTls).await.ok()?;
            tokio::spawn(conn);
            Some(c)
        });
        (rt, c)
    };
    let committed = || -> Option<Time> {
        let (rt, c) = pg();
        let f = rt.block_on(readback::pg_frontiers(&c?, &topic)).ok()?;
        f.into_iter().min().map(|f| f as Time)
    };
    let wait = |t: Time, job: &mut std::process::Child| {
        let deadline = Instant::now() + Duration::from_secs(180);
        while committed().is_none_or(|c| c < t) {
            assert!(job.try_wait().unwrap().is_none(), "the job ended");
            assert!(Instant::now() < deadline, "never committed {t}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait((start + 60_000) as Time, &mut job);

    // The outage: v1 records arrive; the job must ask the registry for v1.
    let pid = stack.files("registry").running_pid().expect("the stack runs the registry");
    let signal = |s: &str| {
        let ok = Command::new("kill").args([s, &pid.to_string()]).status().unwrap().success();
        assert!(ok, "kill {s} {pid}");
    };
    // Whatever happens below, the registry is thawed again for the tests after this one.
    struct Thaw(u32);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
        }
    }
    let _thaw = Thaw(pid);
    signal("-STOP");
    let after = traffic(42, start + 3_000 * 50 + 10_000, 100).generate_more(1_000);
    produce(&e.kafka_bootstrap, &topic, &after);
    plan.extend(after);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).unwrap().contains("schema registry unreachable") {
        assert!(Instant::now() < deadline, "the job never found the registry unreachable");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The outage lasts 30 s from the job's first failed request.
    let outage_started = Instant::now();
    while outage_started.elapsed() < Duration::from_secs(30) {
        assert!(job.try_wait().unwrap().is_none(), "the job keeps running while it waits");
        std::thread::sleep(Duration::from_millis(500));
    }
    signal("-CONT");

    // Everything read, once every partition has been quiet for the idle timeout.
    let model =
        SourceModel { lateness_ms: 5_000, dedup_horizon_ms: 3_600_000, tick_ms: fraud.tick_ms };
    let judged = model.judge_with(std::sync::Arc::new(registry), &plan, &[]);
    let end = model.end(&judged);
    wait(end, &mut job);
    job.kill().unwrap();
    job.wait().unwrap();

    let (rt, c) = pg();
    let c = c.unwrap();
    let (stats, archive, dead): (BTreeMap<_, _>, BTreeSet<i64>, i64) = rt.block_on(async {
        (
            readback::pg_stats(&c).await.unwrap(),
            readback::pg_archive(&c).await.unwrap(),
            c.query_one("SELECT count(*) FROM late_events", &[]).await.unwrap().get(0),
        )
    });
    let mut by_card: BTreeMap<u64, Vec<Transaction>> = BTreeMap::new();
    for x in &judged.accepted {
        by_card.entry(x.card_id).or_default().push(x.clone());
    }
    let mut want = BTreeMap::new();
    for events in by_card.values() {
        want.extend(Reference::new(&fraud, events).stats_at(end - 1));
    }
    assert_eq!(judged.accepted.len(), plan.len(), "the input has only good records");
    assert_eq!(archive.len(), plan.len(), "every record read, none dead-lettered");
    assert_eq!(dead, 0);
    assert!(stats == want, "statistics equal the reference's");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("dead letter"), "no record went to the dead letters");
}
