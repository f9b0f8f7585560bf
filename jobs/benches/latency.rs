//! `latency`: from an event's produce time to the commits that make it visible in PostgreSQL and in Redis.
//!
//! ```text
//! ./tripwire stack up
//! cargo build --release -p tripwire-jobs --bins
//! cargo bench -p tripwire-jobs --bench latency     # TRIPWIRE_BENCH_RATES=10000,50000,100000
//! ```
//!
//! For each rate (events/s): a fresh 12-partition topic and job (one worker,
//! the job's default, or `TRIPWIRE_BENCH_WORKERS`; exactly-once into
//! PostgreSQL and Redis); `txgen --rate R --seconds S`
//! (`TRIPWIRE_BENCH_SECONDS`, default 60) produces traffic whose event time is
//! the wall clock. A trigger on the job's `checkpoints` table notifies the
//! benchmark of every commit; the notification arrives when the commit is
//! visible, and the benchmark stamps it on arrival. An event at event time
//! `e` is visible once every worker's committed frontier is past `e` (the
//! "results complete up to" view passes it), so its latency is the arrival
//! time of that notification minus the record's Kafka timestamp (its produce
//! time). Redis likewise: the sink publishes each stored frontier on the
//! job's `progress` channel, and a subscriber stamps each message on arrival.
//! An event is visible in both stores once both passed it. The trigger also
//! sends the time it ran: from there to the notification's arrival is
//! PostgreSQL's own part of a commit (its writes, its `COMMIT`, and the
//! notification's way here; the checkpoint is a real-time commit's first
//! statement), printed as "its own". Events of the
//! first 5 s (warm-up) and of the last second plus the lateness bound (no
//! later traffic completes their time) are not counted; every other event
//! must have become visible.
//!
//! txgen pays with a million cards (see `support::BULK_CARDS`), its other
//! settings are its defaults.
//!
//! Settings that bound the latency, all flags of the job and of txgen:
//! lateness bound L (`TRIPWIRE_BENCH_LATENESS_MS`, default 3 ms: an event's
//! time is complete once every partition has seen an event L later; txgen's
//! out-of-order records come up to L/2 behind), commit interval
//! (`TRIPWIRE_BENCH_COMMIT_MS`, default 0: each worker commits whenever its
//! frontier has moved and its last commit is done, so commits pace
//! themselves by how long they take), txgen's producer
//! (`TRIPWIRE_BENCH_PRODUCER`, default txgen's own, `batched`: one request
//! per broker and linger, as the Java producer sends them; or `librdkafka`:
//! one request per partition, which at 10K/s doubled the broker's CPU),
//! producer linger (`TRIPWIRE_BENCH_LINGER_MS`, default 5 ms: the default of librdkafka and,
//! since Kafka 4.0, of the Java producer; at 1 ms nearly every record is a
//! produce request of its own, and at 10K/s the broker took a tenth to a
//! fifth more CPU).
//!
//! First, one run at the first rate for `TRIPWIRE_BENCH_WARMUP_SECONDS`
//! (default 20, at least 10; 0 for none) that is printed but neither counted nor written:
//! right after `./tripwire stack up` the broker's JVM has not compiled its
//! code yet and PostgreSQL's caches are cold, and the first run measured
//! that (50K/s: p50 1.1 s, p99 4.5 s cold; 38 / 81 ms in the next run).
//!
//! Prints a table and writes `bench/results/latency.json`.
//!
//! To measure a change as a ratio in one run: build the job before it, copy
//! `target/release/fraud-detector` aside, build it after, and run with
//! `TRIPWIRE_BENCH_BASELINE=/path/to/the/copy`: each rate with each build in
//! turn, `TRIPWIRE_BENCH_ROUNDS` (default 2) times; nothing is written. With
//! `TRIPWIRE_BENCH_BASELINE_PRODUCER=librdkafka` the baseline's runs use that
//! producer (give the same build as the baseline to compare producers), and
//! with `TRIPWIRE_BENCH_BASELINE_WORKERS=N`, N workers (to compare worker counts).

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use support::{
    binary, clean_up, env_or, free_port, now_us, postgres, quantile, unique, write_results,
};
use tokio_postgres::AsyncMessage;
use tripwire_connectors::avro::{Limits, TransactionCodec};
use tripwire_connectors::kafka_admin::ensure_topic;
use tripwire_connectors::postgres::migrate;
use tripwire_connectors::redis_sink::Keys;
use tripwire_connectors::registry::EmbeddedRegistry;

const WARM_UP_MS: i64 = 5_000;
/// Events this close to the end of the traffic are not counted, besides the
/// lateness bound: no later traffic completes their time (only the idle
/// timeout does, 30 s later).
const TAIL_MS: i64 = 1_000;

/// Commits as the benchmark saw them: (arrival µs, worker, frontier ms).
type Commits = Arc<Mutex<Vec<(i64, i32, i64)>>>;

/// Per PostgreSQL commit, ms from its checkpoint's write (the first statement
/// of a real-time commit) to the notification's arrival: the commit's writes,
/// its `COMMIT`, and the notification's way to the benchmark.
type Own = Arc<Mutex<Vec<f64>>>;

/// Create the job's schema and a trigger that notifies every checkpoint
/// write (with the time it ran), then listen on a thread of its own, stamping
/// each notification.
fn listen(schema: &str) -> (Commits, Own) {
    let (rt, mut client) = postgres(schema);
    rt.block_on(async {
        migrate(&mut client).await.unwrap();
        client
            .batch_execute(
                "CREATE FUNCTION bench_notify_checkpoint() RETURNS trigger AS $$
                 BEGIN
                     PERFORM pg_notify('bench_checkpoints', NEW.worker || ' ' || NEW.frontier
                         || ' ' || (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
                     RETURN NEW;
                 END $$ LANGUAGE plpgsql;
                 CREATE TRIGGER bench_notify AFTER INSERT OR UPDATE ON checkpoints
                     FOR EACH ROW EXECUTE FUNCTION bench_notify_checkpoint();",
            )
            .await
            .unwrap();
    });
    let commits: Commits = Arc::default();
    let seen = commits.clone();
    let own: Own = Arc::default();
    let took = own.clone();
    let mut endpoints = support::endpoints();
    endpoints.pg_schema = Some(schema.to_string());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (client, mut conn) =
                tokio_postgres::connect(&endpoints.postgres_config(), tokio_postgres::NoTls)
                    .await
                    .unwrap();
            let listen = async {
                client.batch_execute("LISTEN bench_checkpoints").await.unwrap();
                ready_tx.send(()).unwrap();
                std::future::pending::<()>().await
            };
            let drive = async {
                while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    if let Ok(AsyncMessage::Notification(n)) = m {
                        let at = now_us();
                        let mut it = n.payload().split(' ').map(|x| x.parse::<i64>().unwrap());
                        let (w, f) = (it.next().unwrap(), it.next().unwrap());
                        seen.lock().unwrap().push((at, w as i32, f));
                        let written = it.next().unwrap();
                        took.lock().unwrap().push((at - written) as f64 / 1000.0);
                    }
                }
            };
            tokio::select! { _ = listen => {}, _ = drive => {} }
        });
    });
    ready_rx.recv_timeout(Duration::from_secs(30)).expect("LISTEN is in place");
    (commits, own)
}

/// Subscribe to the job's Redis progress channel on a thread of its own,
/// stamping each published frontier on arrival.
fn listen_redis(job: &str) -> Commits {
    let commits: Commits = Arc::default();
    let seen = commits.clone();
    let (url, channel) = (support::endpoints().redis_url(), Keys::new(job).progress());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
        let mut pubsub = con.as_pubsub();
        pubsub.subscribe(&channel).unwrap();
        ready_tx.send(()).unwrap();
        while let Ok(m) = pubsub.get_message() {
            let at = now_us();
            let payload: String = m.get_payload().unwrap();
            let mut it = payload.split(' ').map(|x| x.parse::<i64>().unwrap());
            let (w, f) = (it.next().unwrap(), it.next().unwrap());
            seen.lock().unwrap().push((at, w as i32, f));
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(30)).expect("SUBSCRIBE is in place");
    commits
}

/// Every record of `topic`: (produce time ms, event time ms).
fn read_back(bootstrap: &str, topic: &str) -> Vec<(i64, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "tripwire-bench-latency")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..12 {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut codec =
        TransactionCodec::new(Arc::new(EmbeddedRegistry::new().unwrap()), Limits::default());
    let (mut out, mut eof) = (Vec::new(), 0);
    while eof < 12 {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let produced = m.timestamp().to_millis().expect("records carry CreateTime");
                let x = codec.decode(m.payload().unwrap_or_default(), Some(produced)).unwrap();
                out.push((produced, x.event_time_ms as i64));
            }
            Some(Err(KafkaError::PartitionEOF(_))) => eof += 1,
            Some(Err(e)) => panic!("reading back: {e}"),
            None => {}
        }
    }
    out
}

/// The complete-up-to steps: (arrival µs, least frontier over the
/// `workers`), each with a larger frontier than the last.
fn steps(commits: &[(i64, i32, i64)], workers: usize) -> Vec<(i64, i64)> {
    let mut latest: HashMap<i32, i64> = HashMap::new();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for &(at, w, f) in commits {
        latest.insert(w, f);
        if latest.len() == workers {
            let least = *latest.values().min().unwrap();
            if out.last().is_none_or(|l| least > l.1) {
                out.push((at, least));
            }
        }
    }
    out
}

/// Quantiles of produce -> visible, ms.
#[derive(Clone, Copy)]
struct Quantiles {
    p50: f64,
    p99: f64,
    p999: f64,
}

impl Quantiles {
    fn of(mut latencies: Vec<f64>) -> Self {
        latencies.sort_by(f64::total_cmp);
        Quantiles {
            p50: quantile(&latencies, 0.5),
            p99: quantile(&latencies, 0.99),
            p999: quantile(&latencies, 0.999),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "p50_ms": self.p50, "p99_ms": self.p99, "p999_ms": self.p999 })
    }
}

struct Measured {
    achieved: f64,
    postgres: Quantiles,
    redis: Quantiles,
    both: Quantiles,
    /// PostgreSQL's own part of each commit (see [`Own`]).
    pg_own: Quantiles,
    counted: usize,
    commits: usize,
}

/// Per event, produce -> the first step whose frontier is past its time, ms.
fn latencies(counted: &[(i64, i64)], steps: &[(i64, i64)]) -> Vec<f64> {
    counted
        .iter()
        .map(|&(produced, event_time)| {
            let i = steps.partition_point(|s| s.1 <= event_time);
            (steps[i].0 as f64 / 1000.0 - produced as f64).max(0.0)
        })
        .collect()
}

/// What every rate of a run shares.
#[derive(Clone, Copy)]
struct Settings {
    seconds: u64,
    lateness_ms: u64,
    commit_ms: u64,
    linger_ms: u64,
    /// txgen's `--producer`, if not its default.
    producer: Option<&'static str>,
    /// The job's worker threads (`-w`).
    workers: usize,
}

/// A txgen producer named by the environment variable `name`, if set.
fn producer_from(name: &str) -> Option<&'static str> {
    match std::env::var(name).ok()?.as_str() {
        "batched" => Some("batched"),
        "librdkafka" => Some("librdkafka"),
        other => panic!("{name}={other}: batched or librdkafka"),
    }
}

fn measure(bin: &Path, rate: u64, settings: Settings) -> Measured {
    let Settings { seconds, lateness_ms, commit_ms, linger_ms, producer, workers } = settings;
    let bootstrap = support::endpoints().kafka_bootstrap;
    let name = unique(&format!("bench_latency_{rate}"));
    ensure_topic(&bootstrap, &name, 12).unwrap();
    let (commits, own) = listen(&name);
    let published = listen_redis(&name);
    let port = free_port();
    let mut job = Command::new(bin)
        .args(["--topic", &name, "--job", &name, "--dlq-topic", &format!("{name}-dlq")])
        .args(["-w", &workers.to_string(), "--archive", "false"])
        .args(["--lateness-ms", &lateness_ms.to_string()])
        .args(["--commit-interval-ms", &commit_ms.to_string()])
        .args(["--metrics-port", &port.to_string()])
        .env("TRIPWIRE_PG_SCHEMA", &name)
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    // Ready: stores connected, partitions assigned.
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready = format!("http://127.0.0.1:{port}/ready");
    while ureq::get(&ready).call().is_err() {
        assert!(Instant::now() < deadline, "the job did not become ready");
        assert!(job.try_wait().unwrap().is_none(), "the job exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let txgen = Command::new(binary("txgen"))
        .args(["--topic", &name, "--rate", &rate.to_string(), "--seconds", &seconds.to_string()])
        .args(["--linger-ms", &linger_ms.to_string()])
        .args(["--lateness-ms", &lateness_ms.to_string()])
        .args(["--late-per-10k", "0", "--bad-per-10k", "0"])
        .args(["--cards", &support::BULK_CARDS.to_string()])
        .args(producer.map(|p| ["--producer", p]).into_iter().flatten())
        .status()
        .unwrap();
    assert!(txgen.success(), "txgen failed");

    let records = read_back(&bootstrap, &name);
    let first = records.iter().map(|r| r.0).min().unwrap();
    let last = records.iter().map(|r| r.0).max().unwrap();
    // What txgen managed (on 2 cores it competes with the job and the stores).
    let achieved = records.len() as f64 * 1000.0 / (last - first).max(1) as f64;
    let counted: Vec<(i64, i64)> = records
        .into_iter()
        .filter(|r| r.0 >= first + WARM_UP_MS && r.0 < last - TAIL_MS - lateness_ms as i64)
        .collect();
    let newest = counted.iter().map(|r| r.1).max().unwrap();
    // Wait until every counted event is visible (the job keeps committing
    // as the tail's traffic closes their times).
    let deadline = Instant::now() + Duration::from_secs(300);
    let visible =
        |c: &Commits| steps(&c.lock().unwrap(), workers).last().is_some_and(|s| s.1 > newest);
    while !visible(&commits) || !visible(&published) {
        assert!(Instant::now() < deadline, "counted events never became visible");
        std::thread::sleep(Duration::from_millis(50));
    }
    job.kill().unwrap();
    job.wait().unwrap();
    clean_up(&name, &[&name]);

    let commits = commits.lock().unwrap().clone();
    let pg = latencies(&counted, &steps(&commits, workers));
    let redis = latencies(&counted, &steps(&published.lock().unwrap(), workers));
    let latencies: Vec<f64> = pg.iter().zip(&redis).map(|(a, b)| a.max(*b)).collect();
    if std::env::var_os("TRIPWIRE_BENCH_VERBOSE").is_some() {
        // Per second of produce time: median, p99 and worst, to see stalls.
        let mut by_second: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
        for (l, r) in latencies.iter().zip(&counted) {
            by_second.entry((r.0 - first) / 1000).or_default().push(*l);
        }
        for (sec, mut ls) in by_second {
            ls.sort_by(f64::total_cmp);
            // The wall clock's second too (UTC), to match the stores' logs.
            let wall = (first / 1000 + sec) % 86_400;
            println!(
                "second {sec} ({:02}:{:02}:{:02}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                wall / 3600,
                wall / 60 % 60,
                wall % 60,
                quantile(&ls, 0.5),
                quantile(&ls, 0.99),
                quantile(&ls, 1.0)
            );
        }
    }
    let own = std::mem::take(&mut *own.lock().unwrap());
    Measured {
        achieved,
        counted: latencies.len(),
        postgres: Quantiles::of(pg),
        redis: Quantiles::of(redis),
        both: Quantiles::of(latencies),
        pg_own: Quantiles::of(own),
        commits: commits.len(),
    }
}

fn main() {
    let rates = support::env_list("TRIPWIRE_BENCH_RATES", "10000,50000,100000");
    let seconds = env_or("TRIPWIRE_BENCH_SECONDS", 60);
    let lateness_ms = env_or("TRIPWIRE_BENCH_LATENESS_MS", 3);
    let commit_ms = env_or("TRIPWIRE_BENCH_COMMIT_MS", 0);
    let linger_ms = env_or("TRIPWIRE_BENCH_LINGER_MS", 5);
    let producer = producer_from("TRIPWIRE_BENCH_PRODUCER");
    // One, the job's default: on two cores shared with the stores a second
    // worker cost the job a third more CPU in real time (its own polling
    // and commits), and the results waited for the two workers' frontiers
    // to meet (about 2 ms at 10K/s); at 50K/s, in one run, p99 98-136 ms
    // against 455-4,573 ms with two (`bench/README.md`).
    let workers = env_or("TRIPWIRE_BENCH_WORKERS", 1) as usize;
    let settings = Settings { seconds, lateness_ms, commit_ms, linger_ms, producer, workers };
    let bin = binary("fraud-detector");
    // At least 10 s: the first 5 s and the tail of a run are not counted.
    let warm_up = match env_or("TRIPWIRE_BENCH_WARMUP_SECONDS", 20) {
        0 => 0,
        s => s.max(10),
    };
    if let (Some(&rate), true) = (rates.first(), warm_up > 0) {
        let m = measure(&bin, rate, Settings { seconds: warm_up, ..settings });
        println!(
            "warm-up, not counted: {warm_up} s at {rate} events/s, both p50 {:.1} ms, p99 {:.1} ms",
            m.both.p50, m.both.p99
        );
    }
    if let Ok(baseline) = std::env::var("TRIPWIRE_BENCH_BASELINE") {
        let rounds = env_or("TRIPWIRE_BENCH_ROUNDS", 2);
        let baseline_producer = producer_from("TRIPWIRE_BENCH_BASELINE_PRODUCER");
        let baseline_workers = env_or("TRIPWIRE_BENCH_BASELINE_WORKERS", workers as u64) as usize;
        println!("| rate | round | build | produced | both p50 ms | both p99 ms | both p99.9 ms | PostgreSQL p99 ms | Redis p99 ms | PostgreSQL's own p50 / p99 ms |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for &rate in &rates {
            for round in 1..=rounds {
                for (name, b) in [("baseline", Path::new(&baseline)), ("this", bin.as_path())] {
                    let settings = if name == "baseline" {
                        Settings {
                            producer: baseline_producer.or(settings.producer),
                            workers: baseline_workers,
                            ..settings
                        }
                    } else {
                        settings
                    };
                    let m = measure(b, rate, settings);
                    println!(
                        "| {rate} | {round} | {name} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} / {:.1} |",
                        m.achieved, m.both.p50, m.both.p99, m.both.p999, m.postgres.p99, m.redis.p99,
                        m.pg_own.p50, m.pg_own.p99
                    );
                }
            }
        }
        return;
    }
    let mut results = serde_json::Map::new();
    let mut table = Vec::new();
    for &rate in &rates {
        let m = measure(&bin, rate, settings);
        table.push(format!(
            "| {rate} | {:.0} | {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} | {:.1} | {:.1} |",
            m.achieved,
            m.counted,
            m.commits,
            m.postgres.p50,
            m.postgres.p99,
            m.pg_own.p50,
            m.pg_own.p99,
            m.redis.p50,
            m.redis.p99,
            m.both.p50,
            m.both.p99,
            m.both.p999
        ));
        results.insert(
            rate.to_string(),
            serde_json::json!({
                "p50_ms": m.both.p50, "p99_ms": m.both.p99, "p999_ms": m.both.p999,
                "postgres": m.postgres.json(), "redis": m.redis.json(),
                "postgres_own": m.pg_own.json(),
                "events": m.counted, "checkpoint_writes": m.commits, "produced_eps": m.achieved.round(),
                "seconds": seconds, "workers": workers, "lateness_ms": lateness_ms,
                "commit_interval_ms": commit_ms, "linger_ms": linger_ms,
            }),
        );
    }
    println!(
        "\n{seconds} s per rate, {workers} workers, lateness bound {lateness_ms} ms, \
         commit interval {commit_ms} ms, producer linger {linger_ms} ms\n"
    );
    println!(
        "| events/s asked | produced | events counted | PostgreSQL commits | PostgreSQL p50 / p99 ms | its own p50 / p99 ms | Redis p50 / p99 ms | both p50 ms | both p99 ms | both p99.9 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for line in table {
        println!("{line}");
    }
    write_results("latency", &serde_json::Value::Object(results));
}
