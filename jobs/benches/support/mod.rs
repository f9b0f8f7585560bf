//! What the benchmarks share: loading a topic, running the job, storing results.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use tripwire_connectors::kafka_admin::{delete_topics, ensure_topic, partition_count};
use tripwire_connectors::Endpoints;
use tripwire_jobs::generator::{GenConfig, Planned};

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Microseconds since the epoch.
pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

/// `name` from the environment, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A comma-separated list of numbers from the environment variable `name`, or `default`.
pub fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|x| x.trim().parse().unwrap_or_else(|_| panic!("{name}: comma-separated numbers")))
        .collect()
}

/// The stack's endpoints.
pub fn endpoints() -> Endpoints {
    Endpoints::from_env().expect("TRIPWIRE_* addresses parse")
}

/// A name no earlier run used (for topics, jobs and schemas).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{}", std::process::id(), now_ms())
}

/// Records in `topic` (the sum of its partitions' end offsets).
pub fn records_in(bootstrap: &str, topic: &str) -> i64 {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let Ok(Some(n)) = partition_count(bootstrap, topic) else { return 0 };
    (0..n as i32)
        .map(|p| c.fetch_watermarks(topic, p, Duration::from_secs(10)).map_or(0, |(_, hi)| hi))
        .sum()
}

/// Cards of the bulk loads: 1,000 payments a second of event time over a
/// million cards is one payment per card every 17 minutes. (With 100,000
/// cards each would pay every 100 s, 36 times an hour: every card would trip
/// the hourly velocity rule again and again, and the benchmark would measure
/// an alert storm, not fraud detection.)
pub const BULK_CARDS: u64 = 1_000_000;

/// The topic holding the bulk load of `events` events (reused across runs).
pub fn bulk_topic(events: u64) -> String {
    format!("bench_bulk_{events}_{BULK_CARDS}cards")
}

/// The generator settings of a bulk load of `events` events ending an hour
/// before the present (so every scenario is complete), 12 partitions.
pub fn bulk_config(seed: u64, events: u64) -> GenConfig {
    let now = now_ms();
    GenConfig {
        seed,
        cards: BULK_CARDS,
        partitions: 12,
        spacing_ms: 1,
        start_ms: now - events as i64 - 3_600_000,
        fraud_per_10k: 2,
        bad_per_10k: 1,
        now_ms: now,
        ..GenConfig::default()
    }
}

/// Make `topic` (12 partitions) hold `plan`, unless it already holds as many
/// records (an earlier run loaded it). Not part of any timing.
pub fn load(bootstrap: &str, topic: &str, plan: &[Planned]) {
    ensure_topic(bootstrap, topic, 12).unwrap();
    let have = records_in(bootstrap, topic);
    if have == plan.len() as i64 {
        println!("topic {topic} already holds the input ({have} records)");
        return;
    }
    assert_eq!(have, 0, "topic {topic} holds {have} records, not {}: delete it", plan.len());
    let started = Instant::now();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("compression.type", "snappy")
        .set("linger.ms", "10")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    for p in plan {
        let mut r = BaseRecord::to(topic).partition(p.partition).key(&p.key).payload(&p.payload);
        while let Err((_, back)) = producer.send(r) {
            r = back;
            producer.poll(Duration::from_millis(1));
        }
    }
    producer.flush(Duration::from_secs(300)).unwrap();
    println!("loaded {} records into {topic} in {:.1?} (not timed)", plan.len(), started.elapsed());
}

/// A built binary of this workspace (release).
pub fn binary(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release").join(name);
    assert!(bin.exists(), "build the jobs first: cargo build --release -p tripwire-jobs --bins");
    bin
}

/// A loopback port free at the moment.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// How to run the job.
pub struct JobRun<'a> {
    /// Input topic.
    pub topic: &'a str,
    /// Job name, also its PostgreSQL schema.
    pub job: &'a str,
    /// Processes (a hosts file on loopback when more than one).
    pub processes: usize,
    /// Worker threads per process.
    pub workers: usize,
    /// Further flags.
    pub args: Vec<String>,
}

impl JobRun<'_> {
    /// Start every process of the job; each child's output is inherited.
    pub fn spawn(&self) -> Vec<Child> {
        self.spawn_binary(&binary("fraud-detector"))
    }

    /// [`JobRun::spawn`] with the job binary `bin` (another build, to compare with).
    pub fn spawn_binary(&self, bin: &Path) -> Vec<Child> {
        let hosts = (self.processes > 1).then(|| {
            let path = std::env::temp_dir().join(format!("{}.hosts", self.job));
            let lines: Vec<String> =
                (0..self.processes).map(|_| format!("127.0.0.1:{}", free_port())).collect();
            std::fs::write(&path, lines.join("\n") + "\n").unwrap();
            path
        });
        (0..self.processes)
            .map(|p| {
                let mut cmd = Command::new(bin);
                cmd.args(["--topic", self.topic, "--job", self.job])
                    // Its own dead-letter topic, as the README asks of every job: a
                    // shared one holds earlier runs' letters, which a new run skips.
                    .args(["--dlq-topic", &format!("{}-dlq", self.job)])
                    .args(["-w", &self.workers.to_string()])
                    .args(&self.args)
                    .env("TRIPWIRE_PG_SCHEMA", self.job)
                    .env("RUST_LOG", "error");
                if let Some(hosts) = &hosts {
                    cmd.args(["-n", &self.processes.to_string(), "-p", &p.to_string()])
                        .arg("-h")
                        .arg(hosts);
                }
                cmd.spawn().unwrap()
            })
            .collect()
    }

    /// The same run, bounded: to the topic's end, replay-exact lateness, no endpoints.
    pub fn bounded(&self) -> JobRun<'_> {
        let mut run = JobRun { args: self.args.clone(), ..*self };
        run.args.extend(
            ["--bounded", "--idle-timeout-s", "0", "--metrics-port", "0"].map(String::from),
        );
        run
    }

    /// Run the job bounded (to the topic's end, everything committed); its seconds.
    pub fn run_bounded(&self) -> f64 {
        self.run_bounded_binary(&binary("fraud-detector"))
    }

    /// [`JobRun::run_bounded`] with the job binary `bin`.
    pub fn run_bounded_binary(&self, bin: &Path) -> f64 {
        let started = Instant::now();
        for mut child in self.bounded().spawn_binary(bin) {
            assert!(child.wait().unwrap().success(), "the job failed");
        }
        started.elapsed().as_secs_f64()
    }
}

/// A PostgreSQL client on the job's schema, and the runtime driving it.
pub fn postgres(schema: &str) -> (tokio::runtime::Runtime, tokio_postgres::Client) {
    let mut endpoints = endpoints();
    endpoints.pg_schema = Some(schema.to_string());
    tripwire_connectors::readback::pg_client(&endpoints)
}

/// Write `bench/results/{name}.json`.
pub fn write_results(name: &str, json: &serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    std::fs::create_dir_all(&dir).unwrap();
    let text = serde_json::to_string_pretty(json).unwrap() + "\n";
    std::fs::write(dir.join(format!("{name}.json")), text).unwrap();
    println!("wrote bench/results/{name}.json");
}

/// The `q`-quantile (0..=1) of sorted `xs`, nearest rank.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    xs[rank - 1]
}

/// Have Redis rewrite its append-only file now and wait for it, so that the
/// next run starts from a compact one: Redis rewrites it on its own once it
/// passes `auto-aof-rewrite-min-size` (8 GB on the stack, about 15 minutes
/// of real time at 50K events/s), and a rewrite that fell inside a measured
/// run took 2-6 s of Redis's CPU, on cores the run shares, from it.
fn compact_redis_log(con: &mut redis::Connection) {
    let info = |con: &mut redis::Connection| -> String {
        redis::cmd("INFO").arg("persistence").query(con).unwrap_or_default()
    };
    if !info(con).contains("aof_enabled:1") {
        return;
    }
    // Refused only while a rewrite runs already; then that one is waited for.
    let _ = redis::cmd("BGREWRITEAOF").exec(con);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let now = info(con);
        if !now.contains("aof_rewrite_in_progress:1") && !now.contains("aof_rewrite_scheduled:1") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("Redis's append-only file rewrite did not end within 120 s; going on");
}

/// Remove what a benchmark's job left behind: its PostgreSQL schema, its
/// Redis keys (they would live a day), and `topics` with their dead-letter
/// topics. A later run never needs them; the results are in the JSON.
pub fn clean_up(job: &str, topics: &[&str]) {
    let (rt, client) = postgres(job);
    rt.block_on(client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{job}\" CASCADE"))).unwrap();
    let redis = redis::Client::open(endpoints().redis_url()).unwrap();
    let mut con = redis.get_connection().unwrap();
    let pattern = format!("tripwire:{job}:*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(10_000)
            .query(&mut con)
            .unwrap();
        if !keys.is_empty() {
            redis::cmd("UNLINK").arg(&keys).exec(&mut con).unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    compact_redis_log(&mut con);
    let dead: Vec<String> = topics.iter().map(|t| format!("{t}-dlq")).collect();
    let all: Vec<&str> = topics.iter().copied().chain(dead.iter().map(String::as_str)).collect();
    delete_topics(&endpoints().kafka_bootstrap, &all).unwrap();
}
