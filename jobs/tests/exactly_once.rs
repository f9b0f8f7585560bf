//! Exactly once under the settings users run (the shipped defaults, idle
//! timeout included): re-runs of one job on a grown topic, a quiet partition
//! released by the idle timeout and the decision repeated by a replay after a
//! SIGKILL, dead letters exactly once across restarts, hostile and historic
//! timestamps, duplicate event ids, two jobs in one database. The judge is
//! the reference model over what an independent model of the source's rules
//! (`common::SourceModel`) accepts.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_postgres::NoTls;
use tripwire_connectors::avro::{encode, AvroTransaction};
use tripwire_connectors::kafka_admin::ensure_topic;
use tripwire_connectors::kafka_source::WAKE_GRACE;
use tripwire_connectors::readback;
use tripwire_connectors::registry::{EmbeddedRegistry, SchemaRegistry};
use tripwire_connectors::Endpoints;
use tripwire_dataflow::reference::Reference;
use tripwire_dataflow::{FraudConfig, StatKey, Time, Transaction};
use tripwire_jobs::generator::{Expect, Generator, Planned};

use common::{coordinates, dead_letters, now_ms, produce, Judged, SourceModel};

/// A job of the fraud detector under test, in a PostgreSQL schema of its own.
struct Job {
    name: String,
    schema: String,
    topic: String,
    config_file: std::path::PathBuf,
    extra: Vec<String>,
}

impl Job {
    fn new(name: &str, topic: &str, fraud: &FraudConfig) -> Job {
        let config_file = common::fraud_config_file(name, fraud);
        Job {
            name: name.into(),
            schema: name.into(),
            topic: topic.into(),
            config_file,
            extra: Vec::new(),
        }
    }

    fn command(&self, bounded: bool) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fraud-detector"));
        c.args(["--topic", &self.topic, "--dlq-topic", &format!("{}-dlq", self.topic)])
            .args(["--job", &self.name, "--metrics-port", "0"])
            .arg("--config")
            .arg(&self.config_file)
            .args(&self.extra)
            .env("TRIPWIRE_PG_SCHEMA", &self.schema)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if bounded {
            c.arg("--bounded");
        }
        c
    }

    /// Run bounded to the end of the topic.
    fn bounded(&self) -> ExitStatus {
        self.command(true).status().expect("fraud-detector runs")
    }

    /// Start a live run (no `--bounded`).
    fn live(&self) -> Child {
        self.command(false).spawn().expect("fraud-detector starts")
    }

    fn pg(&self) -> (tokio::runtime::Runtime, tokio_postgres::Client) {
        let mut endpoints = Endpoints::from_env().unwrap();
        endpoints.pg_schema = Some(self.schema.clone());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = rt.block_on(async {
            let (c, conn) =
                tokio_postgres::connect(&endpoints.postgres_config(), NoTls).await.unwrap();
            tokio::spawn(conn);
            c
        });
        (rt, client)
    }

    /// Every PostgreSQL worker frontier of the job (empty before its first start).
    fn frontiers(&self) -> Vec<i64> {
        let (rt, c) = self.pg();
        rt.block_on(readback::pg_frontiers(&c, &self.name)).unwrap_or_default()
    }

    /// Both stores' least frontier, once both have one.
    fn committed(&self) -> Option<Time> {
        let frontiers = self.frontiers();
        let pg = frontiers.iter().copied().min()?;
        let mut con = redis::Client::open(Endpoints::from_env().unwrap().redis_url())
            .unwrap()
            .get_connection()
            .unwrap();
        let redis = readback::redis_frontiers(&mut con, &self.name, frontiers.len()).ok()?;
        let redis = redis.into_iter().collect::<Option<Vec<Time>>>()?.into_iter().min()?;
        Some((pg as Time).min(redis))
    }

    /// Wait (polling the stores, up to `limit`) until both have committed at least `t`.
    fn wait_for(&self, t: Time, limit: Duration, child: &mut Child) {
        let deadline = Instant::now() + limit;
        while self.committed().is_none_or(|c| c < t) {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("job {} ended ({status}) before committing {t}", self.name);
            }
            assert!(Instant::now() < deadline, "job {} did not commit {t} in {limit:?}", self.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the job's stores hold.
    fn results(&self) -> Results {
        let (rt, c) = self.pg();
        let (stats, alerts, archive, late) = rt.block_on(async {
            let late: Vec<(i32, i64)> = c
                .query(
                    "SELECT partition, \"offset\" FROM late_events WHERE topic = $1",
                    &[&self.topic],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            (
                readback::pg_stats(&c).await.unwrap(),
                readback::pg_alerts(&c).await.unwrap(),
                readback::pg_archive(&c).await.unwrap(),
                late.into_iter().collect(),
            )
        });
        let mut con = redis::Client::open(Endpoints::from_env().unwrap().redis_url())
            .unwrap()
            .get_connection()
            .unwrap();
        let redis_stats = readback::redis_stats(&mut con, &self.name).unwrap();
        let redis_alerts = readback::redis_alert_ids(&mut con, &self.name).unwrap();
        Results { stats, alerts, archive, late, redis_stats, redis_alerts }
    }
}

struct Results {
    stats: BTreeMap<StatKey, i64>,
    alerts: BTreeSet<readback::AlertRow>,
    archive: BTreeSet<i64>,
    late: BTreeSet<(i32, i64)>,
    redis_stats: BTreeMap<StatKey, i64>,
    redis_alerts: Vec<i64>,
}

/// Check `got` against the reference model over `accepted` at closed time `at`.
fn assert_exact(
    fraud: &FraudConfig,
    accepted: &[Transaction],
    late: BTreeSet<(i32, i64)>,
    at: Time,
    got: &Results,
    what: &str,
) {
    assert_exact_archived(fraud, accepted, late, at, got, what, true)
}

/// [`assert_exact`] of a job that archives the accepted events or (`archived`
/// false) does not: its archive is then empty.
fn assert_exact_archived(
    fraud: &FraudConfig,
    accepted: &[Transaction],
    late: BTreeSet<(i32, i64)>,
    at: Time,
    got: &Results,
    what: &str,
    archived: bool,
) {
    let mut by_card: BTreeMap<u64, Vec<Transaction>> = BTreeMap::new();
    for x in accepted {
        by_card.entry(x.card_id).or_default().push(x.clone());
    }
    let (mut stats, mut alerts) = (BTreeMap::new(), BTreeSet::new());
    for events in by_card.values() {
        let r = Reference::new(fraud, events);
        stats.extend(r.stats_at(at));
        alerts.extend(r.alerts_until(at).iter().map(readback::alert_row));
    }
    let archive: BTreeSet<i64> = accepted
        .iter()
        .filter(|x| fraud.time_of(x.event_time_ms) <= at)
        .map(|x| x.event_id as i64)
        .collect();
    let alert_ids: Vec<i64> = alerts.iter().map(|a| a.0).collect();
    let mut redis_alerts = got.redis_alerts.clone();
    redis_alerts.sort_unstable();
    let mut want_ids = alert_ids.clone();
    want_ids.sort_unstable();
    assert!(!stats.is_empty() && !archive.is_empty(), "{what}: something to compare");
    let differ = |g| common::stats_differ(&stats, g);
    assert_eq!(differ(&got.stats), None, "{what}: PostgreSQL statistics equal the reference's");
    assert_eq!(differ(&got.redis_stats), None, "{what}: Redis statistics equal the reference's");
    assert_eq!(got.alerts, alerts, "{what}: PostgreSQL alerts equal the reference's");
    assert_eq!(redis_alerts, want_ids, "{what}: the Redis stream holds each alert once");
    if archived {
        assert_eq!(got.archive, archive, "{what}: the archive holds every accepted event once");
    } else {
        assert!(got.archive.is_empty(), "{what}: no archive");
    }
    assert_eq!(got.late, late, "{what}: late_events holds exactly the late records");
}

fn unique(name: &str) -> String {
    format!("{name}_{}_{}", std::process::id(), now_ms())
}

fn model(fraud: &FraudConfig) -> SourceModel {
    SourceModel { lateness_ms: 5_000, dedup_horizon_ms: 3_600_000, tick_ms: fraud.tick_ms }
}

fn traffic(seed: u64, partitions: i32, start_ms: i64) -> Generator {
    Generator::new(common::traffic(seed, partitions, start_ms))
}

fn late_set(j: &Judged, at: &[(i32, i64)]) -> BTreeSet<(i32, i64)> {
    j.late.iter().map(|i| at[*i]).collect()
}

/// A bounded run records where its input ended; the same job run again on the
/// grown topic, bounded and then live, continues from there: its stores end
/// with the reference's result over everything accepted, the records read
/// after an end judged against the floor that end left.
#[test]
fn a_job_run_again_on_a_grown_topic_continues_where_it_ended() {
    let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
    let topic = unique("rerun");
    ensure_topic(&bootstrap, &topic, 4).expect("topic; is the stack up?");
    let fraud = FraudConfig::seconds();
    let m = model(&fraud);
    let job = Job::new(&topic, &topic, &fraud);
    let mut gen = traffic(11, 4, now_ms() - 3_600_000);

    let mut plan = gen.generate_more(5_000);
    produce(&bootstrap, &topic, &plan);
    assert!(job.bounded().success(), "the first bounded run");
    let first = m.judge(&plan, &[]);
    let end1 = m.end(&first);
    assert_eq!(job.frontiers(), vec![end1 as i64], "the first run ends just past its last event");

    let more = gen.generate_more(5_000);
    produce(&bootstrap, &topic, &more);
    let ends = vec![(plan.len(), end1)];
    plan.extend(more);
    assert!(job.bounded().success(), "the second bounded run");
    let second = m.judge(&plan, &ends);
    let end2 = m.end(&second);
    assert!(end2 > end1 && second.accepted.len() > first.accepted.len() + 4_000);
    assert_eq!(job.frontiers(), vec![end2 as i64], "the second run ends at the grown end");
    let at = coordinates(&plan);
    assert_exact(
        &fraud,
        &second.accepted,
        late_set(&second, &at),
        end2 - 1,
        &job.results(),
        "bounded → bounded",
    );

    // Bounded → live: the live run reads the rest and, once every partition has
    // been quiet for the (default) idle timeout, commits up to just past it.
    let more = gen.generate_more(3_000);
    produce(&bootstrap, &topic, &more);
    let ends = vec![(ends[0].0, end1), (plan.len(), end2)];
    plan.extend(more);
    let third = m.judge(&plan, &ends);
    let end3 = m.end(&third);
    let mut live = job.live();
    job.wait_for(end3, Duration::from_secs(150), &mut live);
    live.kill().unwrap();
    live.wait().unwrap();
    assert_eq!(job.committed(), Some(end3), "nothing beyond the last event is committed");
    let at = coordinates(&plan);
    assert_exact(
        &fraud,
        &third.accepted,
        late_set(&third, &at),
        end3 - 1,
        &job.results(),
        "bounded → live",
    );

    // Every record the model rejects is in the dead-letter topic once, and nothing else.
    let mut letters: Vec<(i32, i64)> =
        dead_letters(&format!("{topic}-dlq")).iter().map(|d| (d.0, d.1)).collect();
    letters.sort_unstable();
    let mut want: Vec<(i32, i64)> = third.dead.iter().map(|i| at[*i]).collect();
    want.sort_unstable();
    assert_eq!(letters, want, "dead letters: each rejected record once, over three runs");
    assert!(!third.duplicates.is_empty(), "the input had identical resends");
}

/// One record, valid Avro, on partition `p` at event time `e`, with its own id.
fn record(id: u64, card: u64, e: i64) -> Vec<u8> {
    let r = AvroTransaction {
        event_id: id as i64,
        card_id: card as i64,
        account_id: 1,
        merchant_id: (id % 50) as i64,
        mcc: 5411,
        amount_minor: 1_000 + (id % 700) as i64,
        currency: "EUR".into(),
        country: "DE".into(),
        lat: 52.52,
        lon: 13.405,
        channel: tripwire_connectors::avro::AvroChannel::POS,
        event_time: e,
        device_id: None,
    };
    let schema = EmbeddedRegistry::new().unwrap().schema(2).expect("transaction v2");
    encode(&r, 2, &schema).unwrap()
}

fn planned(partition: i32, card: u64, payload: Vec<u8>) -> Planned {
    Planned { partition, key: card.to_string(), payload, expect: Expect::Accept(0), label: None }
}

/// A record minutes ahead of its Kafka timestamp is accepted and does not make
/// the ordinary traffic after it late; one ten years ahead is refused; a
/// month-old record is refused by default and accepted by a backfill.
#[test]
fn hostile_and_historic_timestamps_are_judged_against_the_log() {
    let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
    let topic = unique("hostile");
    ensure_topic(&bootstrap, &topic, 2).expect("topic; is the stack up?");
    let fraud = FraudConfig::seconds();
    let now = now_ms();
    let mut plan = Vec::new();
    let mut id = 1_000;
    let mut next = |card: u64, e: i64| {
        id += 1;
        planned(0, card, record(id, card, e))
    };
    // Ordinary traffic, then one record 4 minutes ahead, then more ordinary traffic.
    for i in 0..200 {
        plan.push(next(i % 7, now - 600_000 + i as i64 * 1_000));
    }
    plan.push(next(99, now + 240_000));
    for i in 0..200 {
        plan.push(next(i % 7, now - 400_000 + i as i64 * 1_000));
    }
    let ten_years = plan.len();
    plan.push(next(98, now + 10 * 365 * 86_400_000));
    // A month old, on a partition of its own (it is in order there).
    let mut old = next(97, now - 30 * 86_400_000);
    old.partition = 1;
    plan.push(old);
    produce(&bootstrap, &topic, &plan);

    let job = Job::new(&format!("{topic}_default"), &topic, &fraud);
    assert!(job.bounded().success());
    let got = job.results();
    assert!(got.late.is_empty(), "nothing late after the record ahead: {:?}", got.late);
    assert_eq!(got.archive.len(), 400, "every ordinary record accepted");
    let mut letters = dead_letters(&format!("{topic}-dlq"));
    letters.sort();
    assert_eq!(
        letters,
        vec![
            (0, ten_years as i64, "too_far_in_future".to_string()),
            (1, 0, "too_far_in_past".to_string())
        ]
    );
    // The bounded run ends just past the latest log time, not at the record ahead.
    let end = job.frontiers()[0];
    assert!(end < now + 120_000, "the record ahead did not move the end: {end}");

    // A backfill accepts the month-old record (and still refuses ten years ahead).
    let mut backfill = Job::new(&format!("{topic}_backfill"), &topic, &fraud);
    backfill.extra = vec!["--backfill".into(), "--dlq-topic".into(), format!("{topic}-dlq2")];
    assert!(backfill.bounded().success());
    let (rt, c) = backfill.pg();
    let old: i64 = rt.block_on(async {
        c.query_one("SELECT count(*) FROM raw_transactions WHERE card_id = 97", &[])
            .await
            .unwrap()
            .get(0)
    });
    assert_eq!(old, 1, "the month-old record is archived by the backfill");
}

/// With the default idle timeout, a quiet partition stops holding results back
/// while another is busy; a record it sends behind the released frontier is
/// late, and stays late when a SIGKILLed job replays it (the release was
/// recorded). Dead letters stay exactly once across the restart.
#[test]
fn a_quiet_partition_is_released_and_a_replay_repeats_the_decision() {
    let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
    let topic = unique("idle");
    ensure_topic(&bootstrap, &topic, 2).expect("topic; is the stack up?");
    let fraud = FraudConfig::seconds();
    let job = Job::new(&topic, &topic, &fraud);
    let t0 = now_ms();
    let mut plan: Vec<Planned> = Vec::new();
    // Partition 1: a little traffic, then quiet.
    for i in 0..20u64 {
        plan.push(planned(
            1,
            500 + i % 3,
            record(10_000 + i, 500 + i % 3, t0 - 20_000 + i as i64 * 500),
        ));
    }
    produce(&bootstrap, &topic, &plan);
    let mut live = job.live();
    // Partition 0 stays busy, on the wall clock, until the quiet one is released.
    let mut id = 20_000u64;
    let mut busy = |plan: &mut Vec<Planned>, until: &dyn Fn() -> bool| {
        while !until() {
            let batch: Vec<Planned> = (0..10)
                .map(|k| {
                    id += 1;
                    planned(0, k, record(id, k, now_ms()))
                })
                .collect();
            produce(&bootstrap, &topic, &batch);
            plan.extend(batch);
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    busy(&mut plan, &|| {
        assert!(Instant::now() < deadline, "the quiet partition was never released");
        job.committed().is_some_and(|c| c > (t0 + 2_000) as Time)
    });
    // Behind the released frontier: late. Then an ordinary record on it again.
    let late_at = plan.len();
    let late = planned(1, 501, record(30_001, 501, t0 - 4_000));
    produce(&bootstrap, &topic, std::slice::from_ref(&late));
    plan.push(late);
    let target = now_ms() + 1_000;
    let fresh = planned(1, 502, record(30_002, 502, target));
    produce(&bootstrap, &topic, std::slice::from_ref(&fresh));
    plan.push(fresh);
    let deadline = Instant::now() + Duration::from_secs(120);
    busy(&mut plan, &|| {
        assert!(Instant::now() < deadline, "the record after the late one was never committed");
        job.committed().is_some_and(|c| c > target as Time)
    });
    live.kill().unwrap();
    live.wait().unwrap();
    let at = coordinates(&plan);
    let before = job.results();
    assert_eq!(
        before.late,
        BTreeSet::from([at[late_at]]),
        "the record behind the frontier is late"
    );

    // A replay after the SIGKILL repeats the decision: still late, still one dead letter.
    let mut again = job.live();
    let last = plan.iter().filter_map(|p| decode_time(&p.payload)).max().unwrap();
    job.wait_for(fraud.time_of(last) + 1, Duration::from_secs(150), &mut again);
    again.kill().unwrap();
    again.wait().unwrap();
    let after = job.results();
    let accepted: Vec<Transaction> = plan
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != late_at)
        .filter_map(|(_, p)| decode(&p.payload))
        .collect();
    assert_exact(
        &fraud,
        &accepted,
        BTreeSet::from([at[late_at]]),
        fraud.time_of(last),
        &after,
        "after the replay",
    );
    let letters = dead_letters(&format!("{topic}-dlq"));
    assert_eq!(
        letters,
        vec![(at[late_at].0, at[late_at].1, "late".to_string())],
        "one dead letter"
    );
}

/// After the whole input has been quiet for the (default) idle timeout, a
/// producer's burst reaches the partitions one after another (here the
/// second partition's share 300 ms before the first's, each on a worker of
/// its own). The partition read first must not move the frontier past the
/// other, still quiet: nothing of the burst is late, and the results are
/// exact. (Before, the other worker followed what the first had read at
/// once, and every record of the share that came second was late.)
#[test]
fn a_burst_after_a_quiet_spell_leaves_none_of_its_records_late() {
    burst_after_a_quiet_spell("wake", Duration::from_millis(300));
}

/// The same burst with its second share arriving well after the wake-up's
/// grace (`WAKE_GRACE`), as from a producer that stalls between partitions
/// (a slow machine stretched the 300 ms above past the grace): the quiet
/// worker follows the busy one's latest record less the lateness bound, so
/// the share, within that bound of the first, is still on time. (Before, it
/// followed just past the busy one's latest record, and all of it was late.)
#[test]
fn a_burst_whose_second_share_comes_after_the_grace_is_on_time_within_the_lateness_bound() {
    burst_after_a_quiet_spell("stall", WAKE_GRACE * 3);
}

/// A topic of two partitions read by two workers, ten records on each, then
/// quiet until the whole input is released; then a burst of ten records on
/// partition 1 and, `gap` after it is in the log, ten on partition 0 over
/// the same event times (the last 2 s, within the default lateness bound of
/// 5 s). Nothing is late, and the results are exact.
fn burst_after_a_quiet_spell(name: &str, gap: Duration) {
    let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
    let topic = unique(name);
    ensure_topic(&bootstrap, &topic, 2).expect("topic; is the stack up?");
    let fraud = FraudConfig::seconds();
    let mut job = Job::new(&topic, &topic, &fraud);
    job.extra = vec!["-w".into(), "2".into()];
    let t0 = now_ms();
    let mut id = 1_000u64;
    let mut share = |partition: i32, from: i64| -> Vec<Planned> {
        (0..10i64)
            .map(|i| {
                id += 1;
                let card = 100 + (i % 3) as u64 + 10 * partition as u64;
                planned(partition, card, record(id, card, from + i * 200))
            })
            .collect()
    };
    let mut plan: Vec<Planned> = [share(0, t0 - 10_000), share(1, t0 - 10_000)].concat();
    produce(&bootstrap, &topic, &plan);
    let mut live = job.live();
    // Both partitions quiet for the idle timeout: the frontier moves just
    // past the latest record, and both partitions are released.
    let first = plan.iter().filter_map(|p| decode_time(&p.payload)).max().unwrap();
    job.wait_for(fraud.time_of(first) + 1, Duration::from_secs(120), &mut live);

    // The burst: partition 1's share, then partition 0's, over the same times.
    let now = now_ms();
    let (second, last) = (share(1, now - 2_000), share(0, now - 2_000));
    produce(&bootstrap, &topic, &second);
    std::thread::sleep(gap);
    produce(&bootstrap, &topic, &last);
    plan.extend(second);
    plan.extend(last);
    let end = plan.iter().filter_map(|p| decode_time(&p.payload)).max().unwrap();
    job.wait_for(fraud.time_of(end) + 1, Duration::from_secs(120), &mut live);
    live.kill().unwrap();
    live.wait().unwrap();

    let got = job.results();
    let at = coordinates(&plan);
    let late: Vec<(i32, i64)> = got.late.iter().copied().collect();
    assert!(late.is_empty(), "records of the burst late: {late:?} (plan {at:?})");
    assert_eq!(dead_letters(&format!("{topic}-dlq")), vec![], "no dead letters");
    let accepted: Vec<Transaction> = plan.iter().filter_map(|p| decode(&p.payload)).collect();
    assert_exact(&fraud, &accepted, BTreeSet::new(), fraud.time_of(end), &got, "after the burst");
}

fn decode(payload: &[u8]) -> Option<Transaction> {
    let registry = std::sync::Arc::new(EmbeddedRegistry::new().unwrap());
    let mut codec = tripwire_connectors::avro::TransactionCodec::new(
        registry,
        tripwire_connectors::avro::Limits::default(),
    );
    codec.decode(payload, None).ok()
}

fn decode_time(payload: &[u8]) -> Option<Time> {
    decode(payload).map(|x| x.event_time_ms)
}

/// A fresh topic of `partitions` loaded with `events` of traffic (seed
/// `seed`, ending about an hour ago), and the model's judgement of it.
struct Loaded {
    topic: String,
    plan: Vec<Planned>,
    fraud: FraudConfig,
    judged: Judged,
    end: Time,
    at: Vec<(i32, i64)>,
}

impl Loaded {
    fn new(name: &str, partitions: i32, seed: u64, events: u64) -> Loaded {
        let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
        let topic = unique(name);
        ensure_topic(&bootstrap, &topic, partitions).expect("topic; is the stack up?");
        let fraud = FraudConfig::seconds();
        let plan = traffic(seed, partitions, now_ms() - 3_600_000).generate_more(events);
        produce(&bootstrap, &topic, &plan);
        let m = model(&fraud);
        let judged = m.judge(&plan, &[]);
        let end = m.end(&judged);
        Loaded { topic, fraud, judged, end, at: coordinates(&plan), plan }
    }

    /// `job`'s stores hold the reference's result over the whole topic
    /// (its archive too, if `archived`).
    fn assert_exact(&self, job: &Job, archived: bool) {
        assert_exact_archived(
            &self.fraud,
            &self.judged.accepted,
            late_set(&self.judged, &self.at),
            self.end - 1,
            &job.results(),
            &job.name,
            archived,
        );
    }
}

/// Two jobs share a database, each in its schema; a second job in a schema
/// that holds another job's results is refused with a message saying so.
#[test]
fn two_jobs_share_a_database_in_schemas_of_their_own() {
    let loaded = Loaded::new("pair", 2, 21, 3_000);
    let (topic, fraud) = (&loaded.topic, &loaded.fraud);
    let a = Job::new(&format!("{topic}_a"), topic, fraud);
    let mut b = Job::new(&format!("{topic}_b"), topic, fraud);
    b.extra = vec!["--dlq-topic".into(), format!("{topic}-dlq-b")];
    assert!(a.bounded().success() && b.bounded().success());
    for job in [&a, &b] {
        loaded.assert_exact(job, true);
    }
    let mut intruder = Job::new(&format!("{topic}_c"), topic, fraud);
    intruder.schema = a.schema.clone();
    let out = intruder.command(true).stderr(Stdio::piped()).output().unwrap();
    assert!(!out.status.success(), "a second job in a's schema is refused");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&a.name), "the refusal names the job already there: {text}");
}

/// Two jobs read one topic with other lateness bounds and write their dead
/// letters to one topic (as two jobs left at the default name do): each
/// reads back only its own letters, so each finds late exactly what its own
/// bound makes late, not what the other's made late (a job starting read
/// every late letter of its source as its own decision), and neither fences
/// the other's dead-letter transactions.
#[test]
fn two_jobs_with_other_lateness_bounds_share_a_dead_letter_topic() {
    let loaded = Loaded::new("shared_dlq", 2, 23, 3_000);
    let (topic, fraud) = (&loaded.topic, &loaded.fraud);
    // Both with `{topic}-dlq`, the dead-letter topic `Job::command` names.
    let a = Job::new(&format!("{topic}_a"), topic, fraud);
    let mut b = Job::new(&format!("{topic}_b"), topic, fraud);
    b.extra = vec!["--lateness-ms".into(), "600000".into()];
    assert!(a.bounded().success() && b.bounded().success());
    loaded.assert_exact(&a, true);
    let loose = SourceModel { lateness_ms: 600_000, ..model(fraud) };
    let plan_b = loose.judge(&loaded.plan, &[]);
    assert_ne!(
        late_set(&plan_b, &loaded.at),
        late_set(&loaded.judged, &loaded.at),
        "the two bounds decide differently on this input"
    );
    assert_exact_archived(
        fraud,
        &plan_b.accepted,
        late_set(&plan_b, &loaded.at),
        loose.end(&plan_b) - 1,
        &b.results(),
        &b.name,
        true,
    );
}

/// A small backpressure bound pauses the sources again and again: with the
/// archive, where each event counts until PostgreSQL has committed it, and
/// without, where it counts until it has passed the dataflow (its
/// statistics then wait folded per card, and the partitions holding the
/// dataflow back read on without waiting for a commit). Either way the
/// results are the reference's. (Every other test runs with the shipped
/// bound, which their inputs never reach.)
#[test]
fn sources_paused_by_a_small_backpressure_bound_leave_the_results_exact() {
    let loaded = Loaded::new("bound", 4, 31, 8_000);
    let topic = &loaded.topic;
    for (suffix, archived, bound) in [("a", true, "300"), ("p", false, "100")] {
        let mut job = Job::new(&format!("{topic}_{suffix}"), topic, &loaded.fraud);
        job.extra = vec!["--dlq-topic".into(), format!("{topic}-dlq-{suffix}")];
        job.extra.extend(["--max-uncommitted".into(), bound.into()]);
        job.extra.extend(["--archive".into(), archived.to_string(), "--log-json".into()]);
        let out = job
            .command(true)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .output()
            .expect("fraud-detector runs");
        assert!(out.status.success(), "{}: the bounded run", job.name);
        let log = String::from_utf8_lossy(&out.stdout);
        let pauses = log
            .lines()
            .filter(|l| l.contains("backpressure") && !l.contains("\"paused\":0"))
            .count();
        assert!(pauses >= 2, "{}: the sources paused ({pauses} times) at {bound}", job.name);
        loaded.assert_exact(&job, archived);
    }
}

/// A resume point that retention removed is an error naming the partition,
/// the offset wanted and the earliest one left, never a silent jump.
#[test]
fn an_expired_resume_point_is_an_error_that_says_where() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
    let topic = unique("expired");
    ensure_topic(&bootstrap, &topic, 1).expect("topic; is the stack up?");
    let fraud = FraudConfig::seconds();
    // Five minutes of traffic, far longer than the longest window.
    let plan = traffic(51, 1, now_ms() - 3_600_000).generate_more(6_000);
    produce(&bootstrap, &topic, &plan);
    let mut job = Job::new(&topic, &topic, &fraud);
    job.extra =
        vec!["--dedup-horizon-ms".into(), "0".into(), "--sample-every".into(), "200".into()];
    assert!(job.bounded().success());
    let (rt, c) = job.pg();
    let samples: i64 = rt.block_on(async {
        c.query_one("SELECT count(*) FROM source_progress", &[]).await.unwrap().get(0)
    });
    assert!(samples > 10, "restart points recorded");
    // Retention (here: DeleteRecords) removes all but the last few records.
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(plan.len() as i64 - 10)).unwrap();
    rt.block_on(admin.delete_records(&tpl, &AdminOptions::new())).unwrap();
    let out = job.command(true).stderr(Stdio::piped()).output().unwrap();
    assert!(!out.status.success(), "the run refuses to start");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("partition 0")
            && text
                .contains(&format!("earliest offset the broker still has is {}", plan.len() - 10)),
        "the message names partition, wanted and earliest offsets: {text}"
    );
}
