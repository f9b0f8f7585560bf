//! The chaos test: exactly once while processes die and services restart.
//!
//! txgen's generator bulk-loads `TRIPWIRE_CHAOS_EVENTS` events (default
//! 2,000,000) into 6 partitions, with out-of-order, late and bad records,
//! identical and conflicting resends of event ids, one record minutes ahead of
//! its Kafka timestamp, and every fraud scenario. `fraud-detector` runs as 2
//! processes × 1 worker from a hosts file, with the shipped defaults (idle
//! timeout included). A driver SIGKILLs a random process at random moments
//! `TRIPWIRE_CHAOS_KILLS` times (default 20), each time stopping the other and
//! restarting the group as a supervisor would; along the way PostgreSQL is
//! stopped until the source has paused (backpressure) and the breaker has
//! opened, Redis is stopped until PostgreSQL has committed more without it,
//! and the Kafka broker is restarted under a running group, which must carry
//! on without a restart. Any process that dies on its own outside those
//! checks is restarted with its group, as the supervisor would.
//!
//! The job runs unbounded: once the input is read and every partition has
//! been quiet for the idle timeout, its frontier moves to `F`, just past the
//! latest record (its time clamped by its Kafka timestamp). At `F`,
//! PostgreSQL's statistics, alerts and archive and Redis's card hashes and
//! alert stream must equal the reference model's over the accepted input, key
//! for key, and equal a second run with no failures; each job's dead-letter
//! topic must hold every rejected record exactly once.
//! The comparison counts (matched, missing, extra) are printed, with the
//! commit latency, recovery time and commit throughput read from the job's logs.
//!
//! Needs the stack up on this machine (`./tripwire test` brings it up): the
//! test stops and starts its services.

mod common;
// The dataflow tests' harness, for its seeded random numbers.
#[path = "../../dataflow/tests/common/mod.rs"]
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tripwire_cluster::stack::{is_local, Stack};
use tripwire_connectors::kafka_admin::ensure_topic;
use tripwire_connectors::readback::{self, AlertRow};

use tripwire_connectors::Endpoints;
use tripwire_dataflow::reference::Reference;
use tripwire_dataflow::{FraudConfig, StatKey, Time, Transaction};
use tripwire_jobs::generator::{Expect, GenConfig, Generator, Planned, SchemaIds};

use common::{accepted, dead_letters, now_ms, produce, produce_at, record, rejected};
use harness::Rng;
use tripwire_connectors::dead_letter::DeadLetterReason;

const PROCESSES: usize = 2;
const LATENESS_MS: i64 = 5_000;
/// The partition that goes quiet (the generator's input fills 0..6).
const QUIET: i32 = 6;
/// Its cards, event ids, and how many records it gets early and, twice over, later.
const QUIET_CARDS: u64 = 900_000_000;
const QUIET_IDS: u64 = 1 << 61;
const QUIET_EARLY: u64 = 100;
const QUIET_LATE: u64 = 20;
/// How far past the quiet partition's records the frontier is before more come.
const QUIET_GAP_MS: i64 = 120_000;
/// Before which kill that happens.
const QUIET_AT: usize = 3;

/// Where the frontier must end: just past the latest record, its time
/// clamped by its Kafka timestamp (the record ahead counts as its timestamp;
/// every other one was produced after it happened).
fn end_of(fraud: &FraudConfig, accepted: &[Transaction], ahead_ts: i64) -> Time {
    accepted
        .iter()
        .map(|x| if x.event_id == 1 << 62 { ahead_ts as Time } else { x.event_time_ms })
        .map(|t| fraud.time_of(t))
        .max()
        .unwrap()
        + 1
}

/// The reference model's result over `accepted` at the frontier `end`.
struct Want {
    stats: BTreeMap<StatKey, i64>,
    alerts: BTreeSet<AlertRow>,
    /// Per card, its newest alert: (event time, alert id), as Redis orders them.
    last: BTreeMap<u64, String>,
    archive: BTreeSet<i64>,
    alert_ids: BTreeSet<i64>,
}

/// The judge: the reference model over the accepted input, card by card
/// (every statistic and rule is per card), at the final frontier.
fn judge(fraud: &FraudConfig, accepted: &[Transaction], end: Time) -> Want {
    let mut by_card: BTreeMap<u64, Vec<Transaction>> = BTreeMap::new();
    for x in accepted {
        by_card.entry(x.card_id).or_default().push(x.clone());
    }
    let mut stats = BTreeMap::new();
    let mut alerts = BTreeSet::new();
    let mut last = BTreeMap::new();
    for events in by_card.values() {
        let r = Reference::new(fraud, events);
        stats.extend(r.stats_at(end - 1));
        let fired = r.alerts_until(end - 1);
        alerts.extend(fired.iter().map(readback::alert_row));
        if let Some(a) = fired.iter().max_by_key(|a| (a.event_time_ms, a.id)) {
            last.insert(a.card_id, format!("{:020}{:020}", a.event_time_ms, a.id));
        }
    }
    let archive = accepted
        .iter()
        .filter(|x| fraud.time_of(x.event_time_ms) < end)
        .map(|x| x.event_id as i64)
        .collect();
    let alert_ids = alerts.iter().map(|a| a.0).collect();
    Want { stats, alerts, last, archive, alert_ids }
}

fn quiet_id(event_id: i64) -> bool {
    (QUIET_IDS as i64..(QUIET_IDS + 1_000) as i64).contains(&event_id)
}

/// A run's results but those of the quiet partition's cards.
#[allow(clippy::type_complexity)]
fn not_quiet(
    r: &Results,
) -> (BTreeMap<&StatKey, &i64>, BTreeSet<&AlertRow>, BTreeSet<&i64>, BTreeMap<&u64, &String>) {
    (
        r.stats.iter().filter(|(k, _)| k.card_id < QUIET_CARDS).collect(),
        r.alerts.iter().filter(|a| !quiet_id(a.2)).collect(),
        r.archive.iter().filter(|i| !quiet_id(**i)).collect(),
        r.redis_last_alerts.iter().filter(|(c, _)| **c < QUIET_CARDS).collect(),
    )
}

/// (matched, missing, extra) of every result against the reference's.
fn rows_of(want: &Want, got: &Results) -> [(&'static str, (usize, usize, usize)); 5] {
    let redis_ids: BTreeSet<i64> = got.redis_alerts.iter().copied().collect();
    [
        ("PostgreSQL window_stats", compare(&want.stats, &got.stats)),
        ("PostgreSQL alerts", compare(&as_map(&want.alerts), &as_map(&got.alerts))),
        ("PostgreSQL raw_transactions", compare(&as_map(&want.archive), &as_map(&got.archive))),
        ("Redis card statistics", compare(&want.stats, &got.redis_stats)),
        ("Redis alert stream", compare(&as_map(&want.alert_ids), &as_map(&redis_ids))),
    ]
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One job (a name, a PostgreSQL schema, a Redis prefix) over the test's topic.
struct Job {
    name: String,
    topic: String,
    config_file: String,
    logs: PathBuf,
    attempts: usize,
}

/// A running group: one child per process, with its log file.
struct Group {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
    spawned_ms: i64,
}

impl Job {
    /// Start every process of the group, with a fresh hosts file (fresh ports).
    fn spawn(&mut self) -> Group {
        let listeners: Vec<TcpListener> =
            (0..PROCESSES).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let hosts: String = listeners
            .iter()
            .map(|l| format!("127.0.0.1:{}\n", l.local_addr().unwrap().port()))
            .collect();
        drop(listeners);
        let attempt = self.attempts;
        self.attempts += 1;
        let hosts_file = self.logs.join(format!("hosts-{attempt}.txt"));
        std::fs::write(&hosts_file, hosts).unwrap();
        let spawned_ms = now_ms();
        let mut children = Vec::new();
        let mut logs = Vec::new();
        for p in 0..PROCESSES {
            let log = self.logs.join(format!("{}-{attempt}-p{p}.log", self.name));
            let out = File::create(&log).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_fraud-detector"))
                .args(["--topic", &self.topic, "--dlq-topic", &format!("{}-dlq", self.name)])
                .args(["--job", &self.name, "--config", &self.config_file, "--log-json"])
                .args(["-w", "1", "-n", &PROCESSES.to_string(), "-p", &p.to_string()])
                .args(["-h", &hosts_file.display().to_string()])
                .args(["--lateness-ms", &LATENESS_MS.to_string()])
                .args(["--catch-up-commit-interval-ms", "0"])
                .args([
                    "--commit-interval-ms",
                    "100",
                    "--sample-every",
                    "2000",
                    "--metrics-port",
                    "0",
                ])
                .args(["--max-uncommitted", "100000"])
                .env("TRIPWIRE_PG_SCHEMA", &self.name)
                .env("RUST_LOG", "info,tripwire_connectors::commit=debug")
                .stdout(Stdio::from(out.try_clone().unwrap()))
                .stderr(Stdio::from(out))
                .spawn()
                .expect("fraud-detector starts");
            children.push(child);
            logs.push(log);
        }
        Group { children, logs, spawned_ms }
    }
}

impl Drop for Group {
    /// A failing test leaves no process behind.
    fn drop(&mut self) {
        self.kill(0);
    }
}

/// Brings every service back when dropped, so that a failing test does not leave one stopped.
struct Restore<'a>(&'a Stack);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.up() {
            eprintln!("could not bring the stack back up: {e:#}");
        }
    }
}

impl Group {
    /// SIGKILL process `first`, then the others (a timely cluster cannot lose a member).
    fn kill(&mut self, first: usize) {
        let n = self.children.len();
        for i in 0..n {
            let c = &mut self.children[(first + i) % n];
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A process that ended on its own, with its status.
    fn ended(&mut self) -> Option<String> {
        self.children.iter_mut().enumerate().find_map(|(i, c)| {
            c.try_wait().unwrap().map(|status| format!("process {i} ended: {status}"))
        })
    }

    /// Whether some process's source has partitions paused by backpressure now.
    fn paused(&self) -> bool {
        self.logs.iter().any(|l| {
            let lines = BufReader::new(File::open(l).unwrap()).lines().map_while(Result::ok);
            lines
                .filter(|l| l.contains("backpressure"))
                .last()
                .is_some_and(|l| !l.contains("\"paused\":0"))
        })
    }

    /// Whether every process of the group has read the stores' checkpoints
    /// and started its dataflow (a store stopped before that keeps the
    /// process waiting for it, with no committer to fail).
    fn started(&self) -> bool {
        self.log_lines("\"message\":\"starting\"").len() >= self.logs.len()
    }

    /// Every log line of the group so far that contains `needle`.
    fn log_lines(&self, needle: &str) -> Vec<String> {
        self.logs
            .iter()
            .flat_map(|l| BufReader::new(File::open(l).unwrap()).lines().map_while(Result::ok))
            .filter(|l| l.contains(needle))
            .collect()
    }
}

/// The test's view of the stores, reconnecting across restarts.
struct Stores {
    rt: tokio::runtime::Runtime,
    endpoints: Endpoints,
}

impl Stores {
    fn pg(&self, schema: &str) -> Option<tokio_postgres::Client> {
        let mut e = self.endpoints.clone();
        e.pg_schema = Some(schema.to_string());
        self.rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&e.postgres_config(), NoTls).await.ok()?;
            tokio::spawn(conn);
            Some(c)
        })
    }

    /// The least PostgreSQL checkpoint of `job`, once every worker has one.
    fn pg_frontier(&self, job: &str) -> Option<i64> {
        let c = self.pg(job)?;
        let f = self.rt.block_on(readback::pg_frontiers(&c, job)).ok()?;
        (f.len() == PROCESSES).then(|| f.iter().copied().min()).flatten()
    }

    fn redis(&self) -> Option<redis::Connection> {
        redis::Client::open(self.endpoints.redis_url()).ok()?.get_connection().ok()
    }

    /// The least Redis frontier of `job`, once every worker has one.
    fn redis_frontier(&self, job: &str) -> Option<Time> {
        let f = readback::redis_frontiers(&mut self.redis()?, job, PROCESSES).ok()?;
        f.into_iter().collect::<Option<Vec<Time>>>()?.into_iter().min()
    }
}

/// The last warnings and errors of each log, and its last lines, without the
/// dead letters' (a clean clone's CI keeps only what the test prints).
fn log_tails(logs: &[PathBuf]) -> String {
    let mut out = String::new();
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("dead letter: ")).collect();
        let alarms: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("\"level\":\"WARN\""))
            .collect();
        out += &format!("--- {}: last warnings and errors\n", log.display());
        for l in &alarms[alarms.len().saturating_sub(12)..] {
            out += &format!("{l}\n");
        }
        out += "--- last lines\n";
        for l in &lines[lines.len().saturating_sub(8)..] {
            out += &format!("{l}\n");
        }
    }
    out
}

/// Run `group` until `done`, restarting it (as the supervisor would) if a
/// process ends on its own, unless `no_restart` names why that would be a failure.
fn run_until(
    job: &mut Job,
    group: &mut Group,
    what: &str,
    timeout: Duration,
    no_restart: Option<&str>,
    mut done: impl FnMut(&Group) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done(group) {
        if let Some(why) = group.ended() {
            if let Some(context) = no_restart {
                panic!(
                    "{why} {context}; log: {}\n{}",
                    group
                        .logs
                        .iter()
                        .map(|l| l.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    log_tails(&group.logs)
                );
            }
            println!("  {why}; restarting the group");
            group.kill(0);
            *group = job.spawn();
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `stack down` stops only a server this stack started (it keeps its pid):
/// one started otherwise would go on answering, and the outage would not happen.
fn stopped(host: &str, port: u16, what: &str) {
    let address = format!("{host}:{port}");
    assert!(
        std::net::TcpStream::connect(&address).is_err(),
        "{what} still answers at {address} after `stack down`: this stack did not start it \
         (stop it, then ./tripwire stack up)"
    );
}

/// Matched, missing and extra entries of `got` against `want` (a changed value is both).
fn compare<K: Ord, V: PartialEq>(
    want: &BTreeMap<K, V>,
    got: &BTreeMap<K, V>,
) -> (usize, usize, usize) {
    let matched = want.iter().filter(|(k, v)| got.get(k) == Some(v)).count();
    (matched, want.len() - matched, got.len() - matched)
}

fn as_map<K: Ord + Clone>(set: &BTreeSet<K>) -> BTreeMap<K, ()> {
    set.iter().map(|k| (k.clone(), ())).collect()
}

/// Everything a job left in the stores at the end.
#[derive(PartialEq, Debug)]
struct Results {
    stats: BTreeMap<StatKey, i64>,
    alerts: BTreeSet<AlertRow>,
    archive: BTreeSet<i64>,
    redis_stats: BTreeMap<StatKey, i64>,
    redis_alerts: Vec<i64>,
    /// Per card, its newest alert in Redis (the same whatever the batching).
    redis_last_alerts: BTreeMap<u64, String>,
}

fn read_results(stores: &Stores, job: &str) -> Results {
    let c = stores.pg(job).expect("PostgreSQL is up");
    let (stats, alerts, archive) = stores.rt.block_on(async {
        (
            readback::pg_stats(&c).await.unwrap(),
            readback::pg_alerts(&c).await.unwrap(),
            readback::pg_archive(&c).await.unwrap(),
        )
    });
    let mut con = stores.redis().expect("Redis is up");
    let redis_stats = readback::redis_stats(&mut con, job).unwrap();
    let mut redis_alerts = readback::redis_alert_ids(&mut con, job).unwrap();
    redis_alerts.sort_unstable();
    let redis_last_alerts = readback::redis_last_alerts(&mut con, job).unwrap();
    Results { stats, alerts, archive, redis_stats, redis_alerts, redis_last_alerts }
}

/// `2026-11-24T19:40:01.123456Z` → ms since the epoch.
fn rfc3339_ms(s: &str) -> Option<i64> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    // Days since the epoch of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    Some(((days * 24 + h) * 60 + min) * 60_000 + (sec * 1000.0) as i64)
}

/// A `committed` log line of the PostgreSQL sink: (wall ms, latency µs, rows).
fn pg_commits(lines: &[String]) -> Vec<(i64, u64, u64)> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "committed" && v["fields"]["sink"] == "PgSink")
        .filter_map(|v| {
            Some((
                rfc3339_ms(v["timestamp"].as_str()?)?,
                v["fields"]["latency_us"].as_u64()?,
                v["fields"]["rows"].as_u64()?,
            ))
        })
        .collect()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn chaos_leaves_exactly_the_reference_result_and_that_of_a_run_without_failures() {
    let stack = Stack::from_env().unwrap();
    let endpoints = stack.endpoints.clone();
    let pg_address = format!("{}:{}", endpoints.pg_host, endpoints.pg_port);
    let redis_address = format!("{}:{}", endpoints.redis_host, endpoints.redis_port);
    for address in [&endpoints.kafka_bootstrap, &pg_address, &redis_address] {
        if !is_local(address) {
            println!("skipped: {address} is not on this machine, so the test cannot restart it");
            return;
        }
    }
    let _restore = Restore(&stack);
    let events = env_or("TRIPWIRE_CHAOS_EVENTS", 2_000_000);
    let kills = env_or("TRIPWIRE_CHAOS_KILLS", 20) as usize;
    let seed = env_or("TRIPWIRE_CHAOS_SEED", 7);
    let id = format!("{}_{}", std::process::id(), now_ms());
    let topic = format!("chaos_{id}");
    let logs = std::env::temp_dir().join(format!("chaos_{id}"));
    std::fs::create_dir_all(&logs).unwrap();
    // The default rules with every window and look-back capped at an hour:
    // the scenarios (timed for the defaults) fire, and a restart re-reads at
    // most an hour of event time rather than a day.
    const MINUTE: Time = 60_000;
    let default = FraudConfig::default();
    let fraud = FraudConfig {
        windows: vec![MINUTE, 5 * MINUTE, 20 * MINUTE, 60 * MINUTE],
        amount_spike: tripwire_dataflow::config::AmountSpikeConfig {
            window_ms: 60 * MINUTE,
            ..default.amount_spike.clone()
        },
        travel: tripwire_dataflow::config::TravelConfig {
            lookback_ms: 60 * MINUTE,
            ..default.travel.clone()
        },
        ..default
    };
    #[derive(serde::Serialize)]
    struct FileConfig<'a> {
        fraud: &'a FraudConfig,
    }
    let config_file = logs.join("job.toml");
    std::fs::write(&config_file, toml::to_string(&FileConfig { fraud: &fraud }).unwrap()).unwrap();
    ensure_topic(&endpoints.kafka_bootstrap, &topic, 7).expect("topic; is the stack up?");

    // The input, produced before any job starts.
    let started = Instant::now();
    let now = now_ms();
    let start_ms = now - events as i64 * 20 - 60_000;
    let plan = Generator::new(GenConfig {
        seed,
        cards: 20_000,
        partitions: 6,
        // Benign events end a minute before now: at the end every window still holds some.
        start_ms,
        spacing_ms: 20,
        fraud_per_10k: 5,
        bad_per_10k: 5,
        v1_percent: 30,
        lateness_ms: LATENESS_MS,
        out_of_order_per_10k: 300,
        late_per_10k: 20,
        duplicates_per_10k: 5,
        near_miss_per_10k: 0,
        spending_profiles: true,
        rate_per_s: None,
        now_ms: now,
        schema_ids: SchemaIds::EMBEDDED,
    })
    .generate(events);
    // Halfway, on partition 0, a record four minutes ahead of its Kafka
    // timestamp: accepted, and no record after it may become late for it.
    let mut plan = plan;
    let ahead_ts = now_ms();
    let ahead = record(0, 1 << 62, 7, ahead_ts + 240_000, Expect::Accept(1 << 62));
    // The quiet partition: a few cards' records early in event time, read at
    // once and then nothing while the other partitions are read for minutes,
    // so that it is released by the idle timeout under kills (see `QUIET`).
    let quiet_start = start_ms;
    let quiet_early: Vec<Planned> = (0..QUIET_EARLY)
        .map(|i| {
            let id = QUIET_IDS + i;
            record(QUIET, id, QUIET_CARDS + i % 5, quiet_start + i as i64 * 500, Expect::Accept(id))
        })
        .collect();
    let quiet_max = quiet_start + (QUIET_EARLY as i64 - 1) * 500;
    produce(&endpoints.kafka_bootstrap, &topic, &quiet_early);
    let half = plan.len() / 2;
    produce(&endpoints.kafka_bootstrap, &topic, &plan[..half]);
    produce_at(&endpoints.kafka_bootstrap, &topic, &ahead, ahead_ts);
    produce(&endpoints.kafka_bootstrap, &topic, &plan[half..]);
    plan.insert(half, ahead);
    plan.extend(quiet_early);
    println!("input: {} records ({events} events) in {:?}", plan.len(), started.elapsed());

    // What the source will accept, and where the frontier must end (more is
    // produced to the quiet partition along the way, see below).
    let (accepted, _) = accepted(&plan);
    let mut end = end_of(&fraud, &accepted, ahead_ts);
    let start = accepted.iter().map(|x| fraud.time_of(x.event_time_ms)).min().unwrap();
    let late = plan.iter().filter(|p| matches!(p.expect, Expect::Reject(_))).count();
    let (mut quiet_late, mut quiet_calm): (Vec<Planned>, Vec<Planned>) = Default::default();
    let scenarios: BTreeSet<_> = plan.iter().filter_map(|p| p.label).collect();
    assert_eq!(scenarios.len(), 5, "every fraud scenario is in the input");
    assert!(late > 0, "the input has rejected records");

    let stores = Stores {
        rt: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
        endpoints: endpoints.clone(),
    };
    let mut rng = Rng::new(seed);
    let mut job = Job {
        name: format!("chaos_{id}"),
        topic: topic.clone(),
        config_file: config_file.display().to_string(),
        logs: logs.clone(),
        attempts: 0,
    };
    let name = job.name.clone();
    let committed = |job: &str| stores.pg_frontier(job).unwrap_or(0);

    // Kill points: mostly at random progress (so that kills spread over the
    // input), some at a random time after a start (so that some hit start-up).
    let mut targets: Vec<i64> =
        (0..kills).map(|_| (start + rng.below(end - start)) as i64).collect();
    targets.sort_unstable();
    let mut group = job.spawn();
    let mut recoveries: Vec<i64> = Vec::new();
    let mut outages = Vec::new();
    println!("driver: {kills} kills; the frontier must end at {end}");
    assert!(kills > QUIET_AT, "the quiet partition's second part comes after kill {QUIET_AT}");
    for (k, target) in targets.iter().enumerate() {
        match k {
            QUIET_AT => {
                // Once the committed frontier is two minutes past the quiet
                // partition's records, it has been released and its floor
                // recorded (nothing else lets the frontier pass it). Records
                // then produced to it behind that frontier are late, in every
                // replay whatever the timing; records after the others' are accepted.
                let released = fraud.time_of((quiet_max + QUIET_GAP_MS) as Time) as i64;
                run_until(
                    &mut job,
                    &mut group,
                    "the frontier past the quiet partition",
                    Duration::from_secs(300),
                    None,
                    |_: &Group| committed(&name) >= released,
                );
                let behind = (0..QUIET_LATE).map(|i| {
                    let id = QUIET_IDS + QUIET_EARLY + i;
                    let t = quiet_max + 1_000 + i as i64 * 1_000;
                    record(
                        QUIET,
                        id,
                        QUIET_CARDS + i % 5,
                        t,
                        Expect::Reject(DeadLetterReason::Late),
                    )
                });
                let now = now_ms();
                let newest = (0..QUIET_LATE).map(|i| {
                    let id = QUIET_IDS + QUIET_EARLY + QUIET_LATE + i;
                    let t = now - 10_000 + i as i64 * 100;
                    record(QUIET, id, QUIET_CARDS + i % 5, t, Expect::Accept(id))
                });
                quiet_late = behind.chain(newest).collect();
                quiet_calm = quiet_late
                    .iter()
                    .enumerate()
                    .map(|(i, q)| Planned {
                        expect: Expect::Accept(QUIET_IDS + QUIET_EARLY + i as u64),
                        ..q.clone()
                    })
                    .collect();
                produce(&endpoints.kafka_bootstrap, &topic, &quiet_late);
                plan.extend(quiet_late.iter().cloned());
                end = end_of(&fraud, &common::accepted(&plan).0, ahead_ts);
                println!("  quiet partition released; {} more records on it", quiet_late.len());
            }
            2 => {
                // PostgreSQL stops: the source must pause and the breaker open.
                let before = committed(&name);
                run_until(
                    &mut job,
                    &mut group,
                    "a commit before the PostgreSQL outage",
                    Duration::from_secs(120),
                    None,
                    |g: &Group| g.started() && committed(&name) > before,
                );
                let opens = group.log_lines("circuit breaker open").len();
                stack.down(&["postgres".to_string()]).unwrap();
                stopped(&endpoints.pg_host, endpoints.pg_port, "PostgreSQL");
                let t = Instant::now();
                run_until(
                    &mut job,
                    &mut group,
                    "the source paused and the breaker opened",
                    Duration::from_secs(120),
                    Some("while PostgreSQL was down"),
                    |g: &Group| {
                        // Paused now: some process's latest backpressure line
                        // (possibly from just before the outage) pauses partitions.
                        g.log_lines("circuit breaker open").len() > opens && g.paused()
                    },
                );
                let closes = group.log_lines("circuit breaker closed").len();
                stack.up().unwrap();
                // Before the next kill, which may be due at once (its
                // progress target reached before the outage) and would
                // otherwise take the processes down before their probe.
                run_until(
                    &mut job,
                    &mut group,
                    "the breaker closed once PostgreSQL was back",
                    Duration::from_secs(120),
                    Some("after PostgreSQL came back"),
                    |g: &Group| g.log_lines("circuit breaker closed").len() > closes,
                );
                outages.push(format!(
                    "PostgreSQL down {:?}: source paused, breaker opened, and closed again",
                    t.elapsed()
                ));
            }
            5 => {
                // Redis stops under a running group: PostgreSQL must keep committing.
                let before = committed(&name);
                run_until(
                    &mut job,
                    &mut group,
                    "a commit before the Redis outage",
                    Duration::from_secs(120),
                    None,
                    |g: &Group| g.started() && committed(&name) > before,
                );
                let before = committed(&name);
                stack.down(&["redis".to_string()]).unwrap();
                stopped(&endpoints.redis_host, endpoints.redis_port, "Redis");
                let t = Instant::now();
                run_until(
                    &mut job,
                    &mut group,
                    "PostgreSQL commits while Redis is down",
                    Duration::from_secs(120),
                    None,
                    |_: &Group| {
                        let now = committed(&name);
                        now > before || now >= end as i64
                    },
                );
                stack.up().unwrap();
                outages.push(format!("Redis down {:?}: PostgreSQL committed on", t.elapsed()));
            }
            8 => {
                // The broker restarts under the running group, which must carry on.
                let before = committed(&name);
                run_until(
                    &mut job,
                    &mut group,
                    "a commit before the broker restart",
                    Duration::from_secs(120),
                    None,
                    |_: &Group| committed(&name) > before,
                );
                let t = Instant::now();
                stack.restart("kafka").unwrap();
                let back = committed(&name);
                run_until(
                    &mut job,
                    &mut group,
                    "progress after the broker restart",
                    Duration::from_secs(180),
                    Some("after the broker restart: the source must reconnect"),
                    |_: &Group| {
                        let now = committed(&name);
                        now > back || now >= end as i64
                    },
                );
                outages.push(format!("Kafka restarted, progress resumed after {:?}", t.elapsed()));
            }
            _ => {}
        }
        if rng.below(5) == 0 {
            // A random moment soon after the start.
            let wait = Duration::from_millis(rng.below(1_500));
            let until = Instant::now() + wait;
            run_until(
                &mut job,
                &mut group,
                "a random moment",
                wait + Duration::from_secs(60),
                None,
                |_: &Group| Instant::now() >= until,
            );
        } else {
            run_until(
                &mut job,
                &mut group,
                "the next kill point",
                Duration::from_secs(300),
                None,
                |_: &Group| committed(&name) >= *target,
            );
            let until = Instant::now() + Duration::from_millis(rng.below(200));
            run_until(
                &mut job,
                &mut group,
                "a random moment",
                Duration::from_secs(60),
                None,
                |_: &Group| Instant::now() >= until,
            );
        }
        let victim = rng.below(PROCESSES as u64) as usize;
        let at = committed(&name);
        group.kill(victim);
        group = job.spawn();
        let spawned = group.spawned_ms;
        println!("  kill {}: process {victim} at committed frontier {at}", k + 1);
        recoveries.push(spawned);
    }
    run_until(
        &mut job,
        &mut group,
        "both stores committed up to the end",
        Duration::from_secs(600),
        None,
        |_: &Group| {
            committed(&name) >= end as i64 && stores.redis_frontier(&name).unwrap_or(0) >= end
        },
    );
    let all_logs: Vec<String> = (0..job.attempts)
        .flat_map(|a| (0..PROCESSES).map(move |p| (a, p)))
        .flat_map(|(a, p)| {
            let l = logs.join(format!("{name}-{a}-p{p}.log"));
            BufReader::new(File::open(l).unwrap()).lines().map_while(Result::ok).collect::<Vec<_>>()
        })
        .collect();
    let breaker_closed = all_logs.iter().filter(|l| l.contains("circuit breaker closed")).count();
    // Folds of what waited for a commit (`Pending::compact`): the judge below
    // then covers results that went through them.
    let compactions = all_logs.iter().filter(|l| l.contains("compacted pending changes")).count();
    group.kill(0);
    let chaos_elapsed = started.elapsed();

    // The same input once more, without failures.
    let mut calm = Job { name: format!("calm_{id}"), attempts: 0, ..job };
    let calm_name = calm.name.clone();
    let mut calm_group = calm.spawn();
    let calm_start = Instant::now();
    run_until(
        &mut calm,
        &mut calm_group,
        "the run without failures reached the end",
        Duration::from_secs(600),
        Some("in the run without failures"),
        |_: &Group| {
            committed(&calm_name) >= end as i64
                && stores.redis_frontier(&calm_name).unwrap_or(0) >= end
        },
    );
    let calm_elapsed = calm_start.elapsed();
    calm_group.kill(0);

    // The judge. The run without failures read the quiet partition's later
    // records right after its early ones, with no quiet time between them, so
    // it accepts the ones the chaos run found behind the released frontier:
    // each run is judged against the reference over what it must accept.
    let (accepted, _) = common::accepted(&plan);
    let calm_plan: Vec<Planned> =
        plan[..plan.len() - quiet_late.len()].iter().chain(&quiet_calm).cloned().collect();
    let (calm_accepted, _) = common::accepted(&calm_plan);
    assert_eq!(end_of(&fraud, &calm_accepted, ahead_ts), end);
    let want = judge(&fraud, &accepted, end);
    let calm_want = judge(&fraud, &calm_accepted, end);
    let quiet_cards = |w: &Want| w.stats.keys().filter(|k| k.card_id >= QUIET_CARDS).count();
    assert!(quiet_cards(&want) > 0, "the quiet partition's later records are in the result");

    let got = read_results(&stores, &name);
    let calm_got = read_results(&stores, &calm_name);
    let frontiers =
        stores.rt.block_on(readback::pg_frontiers(&stores.pg(&name).unwrap(), &name)).unwrap();
    let rows = rows_of(&want, &got);
    let calm_rows = rows_of(&calm_want, &calm_got);
    println!(
        "\nchaos: {kills} kills, {} group starts, {:?} in all; {}",
        job_attempts(&logs, &name),
        chaos_elapsed,
        outages.join("; ")
    );
    for (run, rows) in [("chaos", &rows), ("without failures", &calm_rows)] {
        println!(
            "{:<30}{:>10}{:>10}{:>8}",
            format!("{run}, against the reference"),
            "matched",
            "missing",
            "extra"
        );
        for (what, (m, miss, extra)) in rows {
            println!("{what:<30}{m:>10}{miss:>10}{extra:>8}");
        }
    }

    // Figures: commit latency and throughput of PostgreSQL, recovery after restarts.
    let commits = pg_commits(&all_logs);
    let mut latencies: Vec<u64> = commits.iter().map(|c| c.1).collect();
    latencies.sort_unstable();
    let (rows_total, busy_us): (u64, u64) =
        commits.iter().fold((0, 0), |(r, b), c| (r + c.2, b + c.1));
    let mut recovery: Vec<i64> = recoveries
        .iter()
        .filter_map(|spawned| {
            commits.iter().map(|c| c.0).filter(|t| t > spawned).min().map(|t| t - spawned)
        })
        .collect();
    recovery.sort_unstable();
    if !latencies.is_empty() && !recovery.is_empty() {
        println!(
            "PostgreSQL commits: {} ({} rows), latency p50 {:.1} ms, p99 {:.1} ms; {:.0} rows/s of commit time; recovery (start to first commit) p50 {} ms, max {} ms; run without failures {:?} ({:.0} events/s)",
            commits.len(),
            rows_total,
            percentile(&latencies, 0.5) as f64 / 1000.0,
            percentile(&latencies, 0.99) as f64 / 1000.0,
            rows_total as f64 / (busy_us.max(1) as f64 / 1e6),
            recovery[recovery.len() / 2],
            recovery[recovery.len() - 1],
            calm_elapsed,
            events as f64 / calm_elapsed.as_secs_f64(),
        );
    }

    assert_eq!(frontiers, vec![end as i64; PROCESSES], "every worker committed up to the end");
    assert!(want.stats.len() > 1_000 && want.alerts.len() > 500, "the comparison has substance");
    for (run, rows) in [("chaos", &rows), ("without failures", &calm_rows)] {
        for (what, (_, missing, extra)) in rows {
            assert_eq!((*missing, *extra), (0, 0), "{run}: {what} equal the reference's");
        }
    }
    for (run, got) in [("chaos", &got), ("without failures", &calm_got)] {
        let ids: BTreeSet<i64> = got.redis_alerts.iter().copied().collect();
        assert_eq!(got.redis_alerts.len(), ids.len(), "{run}: no alert twice in the Redis stream");
    }
    assert!(breaker_closed > 0, "the breaker closed again once PostgreSQL was back");
    println!("compactions of what waited for a commit: {compactions}");
    assert!(compactions > 0, "the chaos run compacted what waited for its commits");
    assert!(!want.last.is_empty(), "cards with alerts");
    assert!(
        got.redis_last_alerts == want.last,
        "every card's last_alert is the reference's newest"
    );
    assert!(calm_got.redis_last_alerts == calm_want.last, "and so without failures");
    assert!(
        not_quiet(&got) == not_quiet(&calm_got),
        "the run with failures equals the run without, but for the quiet partition's cards"
    );
    for (job, plan) in [(&name, &plan), (&calm_name, &calm_plan)] {
        let rejected = rejected(plan);
        let mut letters: Vec<(i32, i64)> =
            dead_letters(&format!("{job}-dlq")).iter().map(|d| (d.0, d.1)).collect();
        letters.sort_unstable();
        println!("{job}: {} dead letters, {} rejected records", letters.len(), rejected.len());
        assert_eq!(letters, rejected, "{job}: each rejected record in the dead-letter topic once");
    }
    let _ = std::fs::remove_dir_all(&logs);
}

fn job_attempts(logs: &std::path::Path, name: &str) -> usize {
    std::fs::read_dir(logs)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            let f = e.file_name().to_string_lossy().into_owned();
            f.starts_with(name) && f.ends_with("-p0.log")
        })
        .count()
}
