//! `throughput`: Tripwire against the Kafka ceiling and against a naive consumer, on one topic.
//!
//! ```text
//! ./tripwire stack up
//! cargo build --release -p tripwire-jobs --bins
//! TRIPWIRE_BENCH_EVENTS=10000000 cargo bench -p tripwire-jobs --bench throughput
//! ```
//!
//! The topic (12 partitions) is bulk-loaded before any timing starts, and
//! reused by later runs with the same size. Then, on that topic:
//! (a) consume only, (b) consume + decode (one rdkafka consumer each),
//! (c) the `fraud-detector` job, 2 workers, exactly-once into PostgreSQL and
//! Redis, from offset 0 until its committed frontier covers all the input
//! (a bounded run ends only then), (d) the consumer a team would write by
//! hand: rdkafka, a HashMap of per-card windows, one SQL upsert per event (on
//! the first `TRIPWIRE_BENCH_NAIVE_EVENTS`, default 50,000, events).
//! Prints a table and writes `bench/results/throughput.json`.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tripwire_connectors::avro::{Limits, TransactionCodec};
use tripwire_connectors::ceiling::read_topic;
use tripwire_connectors::kafka_admin::{ensure_topic, partition_count};
use tripwire_connectors::registry::EmbeddedRegistry;
use tripwire_connectors::Endpoints;
use tripwire_jobs::generator::{GenConfig, Generator};

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Records in `topic` (the sum of its partitions' end offsets).
fn records_in(bootstrap: &str, topic: &str) -> i64 {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let Ok(Some(n)) = partition_count(bootstrap, topic) else { return 0 };
    (0..n as i32)
        .map(|p| c.fetch_watermarks(topic, p, Duration::from_secs(10)).map_or(0, |(_, hi)| hi))
        .sum()
}

fn load(bootstrap: &str, topic: &str, events: u64) {
    ensure_topic(bootstrap, topic, 12).unwrap();
    if records_in(bootstrap, topic) >= events as i64 {
        println!("topic {topic} already holds the input");
        return;
    }
    let started = Instant::now();
    let now = now_ms();
    let plan = Generator::new(GenConfig {
        seed: 1,
        cards: 100_000,
        partitions: 12,
        spacing_ms: 1,
        start_ms: now - events as i64 - 3_600_000,
        fraud_per_10k: 2,
        bad_per_10k: 1,
        now_ms: now,
        ..GenConfig::default()
    })
    .generate(events);
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("compression.type", "snappy")
        .set("linger.ms", "10")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    for p in &plan {
        let mut r = BaseRecord::to(topic).partition(p.partition).key(&p.key).payload(&p.payload);
        while let Err((_, back)) = producer.send(r) {
            r = back;
            producer.poll(Duration::from_millis(1));
        }
    }
    producer.flush(Duration::from_secs(300)).unwrap();
    println!(
        "loaded {} records into {topic} in {:.1?} (not timed below)",
        plan.len(),
        started.elapsed()
    );
}

/// (c): the job, bounded, from offset 0 to the end, exactly once into both stores.
fn tripwire(topic: &str, workers: usize, archive: bool) -> f64 {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/fraud-detector");
    assert!(bin.exists(), "build the job first: cargo build --release -p tripwire-jobs --bins");
    let job = format!("bench_{}_{}", std::process::id(), now_ms());
    let started = Instant::now();
    let status = Command::new(bin)
        .args(["--topic", topic, "--dlq-topic", &format!("{topic}-dlq"), "--job", &job])
        .args([
            "--bounded",
            "--idle-timeout-s",
            "0",
            "--metrics-port",
            "0",
            "-w",
            &workers.to_string(),
        ])
        .args(["--archive", if archive { "true" } else { "false" }])
        .env("TRIPWIRE_PG_SCHEMA", &job)
        .env("RUST_LOG", "error")
        .status()
        .unwrap();
    assert!(status.success());
    started.elapsed().as_secs_f64()
}

/// (d): what a team writes by hand: per event, update the card's windows in a
/// HashMap and upsert them with one SQL statement.
fn naive(bootstrap: &str, topic: &str, limit: u64) -> (u64, f64) {
    let endpoints = Endpoints::from_env().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = rt.block_on(async {
        let (c, conn) =
            tokio_postgres::connect(&endpoints.postgres_config(), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS naive_window_stats (card_id bigint, window_ms bigint,
                 count bigint, sum_minor bigint, PRIMARY KEY (card_id, window_ms))",
        )
        .await
        .unwrap();
        c
    });
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "tripwire-naive")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let parts = partition_count(bootstrap, topic).unwrap().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut codec =
        TransactionCodec::new(Arc::new(EmbeddedRegistry::new().unwrap()), Limits::default());
    let windows: [u64; 4] = [60_000, 300_000, 3_600_000, 86_400_000];
    let mut cards: HashMap<u64, VecDeque<(u64, i64)>> = HashMap::new();
    let (mut n, mut eof) = (0u64, 0);
    let started = Instant::now();
    while n < limit && eof < parts {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let Ok(x) = codec.decode(m.payload().unwrap_or_default(), now_ms()) else {
                    continue;
                };
                n += 1;
                let q = cards.entry(x.card_id).or_default();
                q.push_back((x.event_time_ms, x.amount_minor));
                while q.front().is_some_and(|(t, _)| *t + windows[3] <= x.event_time_ms) {
                    q.pop_front();
                }
                let stats: Vec<(i64, i64)> = windows
                    .iter()
                    .map(|w| {
                        let inside = q.iter().filter(|(t, _)| *t + w > x.event_time_ms);
                        inside.fold((0, 0), |(c, s), (_, a)| (c + 1, s + a))
                    })
                    .collect();
                rt.block_on(client.execute(
                    "INSERT INTO naive_window_stats VALUES
                         ($1, $2, $3, $4), ($1, $5, $6, $7), ($1, $8, $9, $10), ($1, $11, $12, $13)
                     ON CONFLICT (card_id, window_ms) DO UPDATE
                         SET count = EXCLUDED.count, sum_minor = EXCLUDED.sum_minor",
                    &[
                        &(x.card_id as i64),
                        &(windows[0] as i64),
                        &stats[0].0,
                        &stats[0].1,
                        &(windows[1] as i64),
                        &stats[1].0,
                        &stats[1].1,
                        &(windows[2] as i64),
                        &stats[2].0,
                        &stats[2].1,
                        &(windows[3] as i64),
                        &stats[3].0,
                        &stats[3].1,
                    ],
                ))
                .unwrap();
            }
            Some(Err(KafkaError::PartitionEOF(_))) => eof += 1,
            Some(Err(e)) => panic!("consume: {e}"),
            None => {}
        }
    }
    (n, started.elapsed().as_secs_f64())
}

fn main() {
    let events = env_or("TRIPWIRE_BENCH_EVENTS", 10_000_000);
    let naive_limit = env_or("TRIPWIRE_BENCH_NAIVE_EVENTS", 50_000);
    let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
    let topic = format!("bench_throughput_{events}");
    load(&bootstrap, &topic, events);
    let records = records_in(&bootstrap, &topic) as f64;

    let (n, s) = read_topic(&bootstrap, &topic, false);
    let consume_eps = n as f64 / s;
    let (n, s) = read_topic(&bootstrap, &topic, true);
    let decode_eps = n as f64 / s;
    let tripwire_eps = records / tripwire(&topic, 2, false);
    let tripwire_archive_eps = records / tripwire(&topic, 2, true);
    let (n, s) = naive(&bootstrap, &topic, naive_limit);
    let naive_eps = n as f64 / s;

    println!("\n{records} records, 12 partitions, this machine (2 cores, 24 GiB)\n");
    println!("| what | events/s |");
    println!("|---|---|");
    println!("| (a) consume only | {consume_eps:.0} |");
    println!("| (b) consume + decode | {decode_eps:.0} |");
    println!(
        "| (c) Tripwire, exactly-once into PostgreSQL + Redis, 2 workers | {tripwire_eps:.0} |"
    );
    println!("| (c') the same, archiving every event | {tripwire_archive_eps:.0} |");
    println!("| (d) naive: HashMap + one upsert per event | {naive_eps:.0} |");
    println!("\nc/b = {:.2}, c/d = {:.1}", tripwire_eps / decode_eps, tripwire_eps / naive_eps);
    let json = serde_json::json!({
        "events": records,
        "consume_eps": consume_eps.round(),
        "decode_eps": decode_eps.round(),
        "tripwire_eps": tripwire_eps.round(),
        "tripwire_archive_eps": tripwire_archive_eps.round(),
        "naive_eps": naive_eps.round(),
        "c_over_b": tripwire_eps / decode_eps,
        "c_over_d": tripwire_eps / naive_eps,
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("throughput.json"),
        serde_json::to_string_pretty(&json).unwrap() + "\n",
    )
    .unwrap();
    println!("wrote bench/results/throughput.json");
}
