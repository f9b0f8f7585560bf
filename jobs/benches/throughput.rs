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
//! the first `TRIPWIRE_BENCH_NAIVE_EVENTS`, default 50,000, events), (e) the
//! Kafka Streams peer (`bench/peers/kafka-streams/`, built with Maven if
//! needed): its DSL and Processor API apps, exactly_once_v2, JVM and app
//! start-up excluded, after checking the Processor API app against the
//! reference model on a small topic. During (c) a Redis client reads one
//! card's hash 500 times a second, as an authorisation service would.
//! Before (c), an untimed run of the job warms PostgreSQL and the page cache.
//! Prints a table and writes `bench/results/throughput.json`.
//!
//! To measure a change as a ratio in one run: build the job before it, copy
//! `target/release/fraud-detector` aside, build it after, and run with
//! `TRIPWIRE_BENCH_BASELINE=/path/to/the/copy`: only (c) then, the two builds
//! in turn, `TRIPWIRE_BENCH_ROUNDS` (default 2) times each.

#[path = "support/peer.rs"]
mod peer;
mod support;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use support::{
    binary, bulk_config, clean_up, env_or, load, records_in, unique, write_results, JobRun,
};
use tripwire_connectors::avro::{Limits, TransactionCodec};
use tripwire_connectors::ceiling::read_topic;
use tripwire_connectors::kafka_admin::partition_count;
use tripwire_connectors::registry::EmbeddedRegistry;
use tripwire_connectors::Endpoints;
use tripwire_jobs::generator::{GenConfig, Generator};

/// (c): the job, bounded, from offset 0 to the end, exactly once into both
/// stores; its seconds and, with `reader`, the latencies (ms, sorted) of a
/// Redis client reading cards all along.
fn tripwire(
    bin: &Path,
    topic: &str,
    workers: usize,
    archive: bool,
    fsync: bool,
    reader: bool,
) -> (f64, Vec<f64>) {
    let job = unique("bench_throughput");
    let mut args = vec!["--archive".to_string(), archive.to_string()];
    if fsync {
        args.extend(["--synchronous-commit".to_string(), "true".to_string()]);
    }
    let redis = redis::Client::open(support::endpoints().redis_url()).unwrap();
    let mut con = redis.get_connection().unwrap();
    let appendfsync = if fsync { "always" } else { "everysec" };
    redis::cmd("CONFIG").arg("SET").arg("appendfsync").arg(appendfsync).exec(&mut con).unwrap();
    let reads = reader.then(|| peer::Reader::start(&job, support::BULK_CARDS, READS_PER_S));
    let secs = JobRun { topic, job: &job, processes: 1, workers, args }.run_bounded_binary(bin);
    let reads = reads.map(peer::Reader::finish).unwrap_or_default();
    clean_up(&job, &[]);
    redis::cmd("CONFIG").arg("SET").arg("appendfsync").arg("everysec").exec(&mut con).unwrap();
    (secs, reads)
}

/// The Redis reader's pace during (c): an authorisation service's reads.
const READS_PER_S: u32 = 500;

/// (e): the Kafka Streams peer, both apps, on the same topic; first checked
/// against the reference model on a small topic. `None` (and why) without Java or Maven.
fn kafka_streams(bootstrap: &str, topic: &str) -> Option<(f64, f64, usize)> {
    let jar = match peer::jar() {
        Ok(jar) => jar,
        Err(e) => {
            println!("the Kafka Streams peer is not run: {e}");
            return None;
        }
    };
    let small = unique("kstreams_check");
    let plan = Generator::new(GenConfig {
        cards: 300,
        partitions: 4,
        late_per_10k: 0,
        duplicates_per_10k: 0,
        bad_per_10k: 0,
        fraud_per_10k: 50,
        ..bulk_config(7, 20_000)
    })
    .generate(20_000);
    load(bootstrap, &small, &plan);
    let checked = peer::check_against_reference(&jar, bootstrap, &small, &plan)
        .unwrap_or_else(|e| panic!("the peer disagrees with the reference model: {e}"));
    let _ = tripwire_connectors::kafka_admin::delete_topics(bootstrap, &[&small]);
    let eps = |mode| {
        let (line, _) = peer::run(&jar, "run", mode, bootstrap, topic, &[]);
        println!("kafka streams {mode}: {line}");
        line["eps"].as_f64().expect("eps")
    };
    Some((eps("dsl"), eps("processor"), checked))
}

/// (d): what a team writes by hand: per event, update the card's windows in a
/// HashMap and upsert them with one SQL statement.
fn naive(bootstrap: &str, topic: &str, limit: u64) -> (u64, f64) {
    let (rt, client) = tripwire_connectors::readback::pg_client(&support::endpoints());
    rt.block_on(async {
        client
            .batch_execute(
                "DROP TABLE IF EXISTS naive_window_stats;
             CREATE TABLE naive_window_stats (card_id bigint, window_ms bigint,
                 count bigint, sum_minor bigint, PRIMARY KEY (card_id, window_ms))",
            )
            .await
            .unwrap();
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
                let Ok(x) =
                    codec.decode(m.payload().unwrap_or_default(), m.timestamp().to_millis())
                else {
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
    let topic = support::bulk_topic(events);
    if records_in(&bootstrap, &topic) == 0 {
        load(&bootstrap, &topic, &Generator::new(bulk_config(1, events)).generate(events));
    }
    let records = records_in(&bootstrap, &topic) as f64;

    let bin = binary("fraud-detector");
    if let Ok(baseline) = std::env::var("TRIPWIRE_BENCH_BASELINE") {
        return against_baseline(&topic, records, &bin, Path::new(&baseline));
    }
    let (n, s) = read_topic(&bootstrap, &topic, false);
    let consume_eps = n as f64 / s;
    let (n, s) = read_topic(&bootstrap, &topic, true);
    let decode_eps = n as f64 / s;
    // An untimed run first: whichever Tripwire run came first was the
    // slowest (PostgreSQL's buffers and the page cache still cold), which
    // made the fsync row look faster than the one without fsyncs.
    tripwire(&bin, &topic, 2, false, true, false);
    let (secs, reads) = tripwire(&bin, &topic, 2, false, false, true);
    let tripwire_eps = records / secs;
    let tripwire_archive_eps = records / tripwire(&bin, &topic, 2, true, false, false).0;
    let tripwire_fsync_eps = records / tripwire(&bin, &topic, 2, false, true, false).0;
    let (n, s) = naive(&bootstrap, &topic, naive_limit);
    let naive_eps = n as f64 / s;
    let peer = kafka_streams(&bootstrap, &topic);
    let (dsl_eps, processor_eps) = peer.map_or((f64::NAN, f64::NAN), |p| (p.0, p.1));

    println!("\n{records} records, 12 partitions, this machine (2 cores, 24 GiB)\n");
    println!("| what | events/s |");
    println!("|---|---|");
    println!("| (a) consume only | {consume_eps:.0} |");
    println!("| (b) consume + decode | {decode_eps:.0} |");
    println!(
        "| (c) Tripwire, exactly-once into PostgreSQL + Redis, 2 workers | {tripwire_eps:.0} |"
    );
    println!("| (c') the same, archiving every event | {tripwire_archive_eps:.0} |");
    println!("| (c\") (c) with every commit waiting for its fsync (PostgreSQL synchronous_commit on, Redis appendfsync always) | {tripwire_fsync_eps:.0} |");
    println!("| (d) naive: HashMap + one upsert per event | {naive_eps:.0} |");
    println!("| (e) Kafka Streams DSL (sliding windows), exactly_once_v2 | {dsl_eps:.0} |");
    println!("| (e') Kafka Streams Processor API, a store per card, exactly_once_v2 | {processor_eps:.0} |");
    println!(
        "\nc/b = {:.2}, c/d = {:.1}, c/e = {:.2}, c/e' = {:.2}",
        tripwire_eps / decode_eps,
        tripwire_eps / naive_eps,
        tripwire_eps / dsl_eps,
        tripwire_eps / processor_eps
    );
    if let Some((_, _, checked)) = peer {
        println!("(e) and (e') exclude JVM and app start-up; the Processor API app matched the reference model on {checked} statistics of a 20,000-event topic first");
    }
    let q = |p| support::quantile(&reads, p);
    println!(
        "\nRedis reads of one card (GET, {READS_PER_S}/s) during (c): {} reads, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        reads.len(), q(0.5), q(0.99), q(0.999), q(1.0)
    );
    let json = serde_json::json!({
        "events": records,
        "consume_eps": consume_eps.round(),
        "decode_eps": decode_eps.round(),
        "tripwire_eps": tripwire_eps.round(),
        "tripwire_archive_eps": tripwire_archive_eps.round(),
        "tripwire_fsync_eps": tripwire_fsync_eps.round(),
        "naive_eps": naive_eps.round(),
        "c_over_b": tripwire_eps / decode_eps,
        "c_over_d": tripwire_eps / naive_eps,
        "kstreams_dsl_eps": dsl_eps.round(),
        "kstreams_processor_eps": processor_eps.round(),
        "c_over_kstreams_dsl": tripwire_eps / dsl_eps,
        "c_over_kstreams_processor": tripwire_eps / processor_eps,
        "redis_read_ms": {
            "reads": reads.len(),
            "p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": q(1.0),
        },
    });
    write_results("throughput", &json);
}

/// (c) with this build and with `baseline`, in turn (after an untimed warm-up
/// run), with the Redis reader: a change measured as a ratio in one run.
fn against_baseline(topic: &str, records: f64, bin: &Path, baseline: &Path) {
    let rounds = env_or("TRIPWIRE_BENCH_ROUNDS", 2);
    tripwire(bin, topic, 2, false, false, false);
    println!("\n{records} records, (c) with each build in turn\n");
    println!("| round | build | events/s | Redis read p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    let mut sums = [0.0f64; 2];
    for round in 1..=rounds {
        for (i, (name, b)) in [("baseline", baseline), ("this", bin)].into_iter().enumerate() {
            let (secs, reads) = tripwire(b, topic, 2, false, false, true);
            let q = |p| support::quantile(&reads, p);
            sums[i] += records / secs;
            println!(
                "| {round} | {name} | {:.0} | {:.2} | {:.2} |",
                records / secs,
                q(0.5),
                q(0.99)
            );
        }
    }
    println!("\nthis / baseline = {:.2} (mean events/s over {rounds} rounds)", sums[1] / sums[0]);
}
