//! A store that loses acknowledged writes is noticed, said and repaired.
//!
//! Under a running job (the shipped defaults), Redis is restored from an older
//! append-only file and PostgreSQL from an older copy of its data directory.
//! Each time the job's committer, reconnecting, finds its store behind what it
//! had acknowledged, logs it in one line and exits with status 75; restarted
//! (as `tripwire launch` would), the job resumes from what the stores hold and
//! replay repairs them: at the end both equal the reference model's result.
//!
//! Between the snapshots and the rollbacks, a quiet gap makes the source
//! release every partition, a timing decision (a floor) that records produced
//! afterwards are late by. Each rollback loses that decision in one store;
//! the job must find it in the other, or its replay would accept those
//! records and the stores would disagree (as they did before decisions were
//! recorded in Redis too).
//!
//! Stops and starts the stack's PostgreSQL and Redis: one test in a binary of
//! its own, so that no other test runs beside it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tripwire_cluster::stack::Stack;
use tripwire_connectors::dead_letter::DeadLetterReason;
use tripwire_connectors::kafka_admin::ensure_topic;
use tripwire_connectors::postgres;
use tripwire_connectors::readback;
use tripwire_dataflow::reference::Reference;
use tripwire_dataflow::{FraudConfig, Time, Transaction};
use tripwire_jobs::generator::{Expect, GenConfig, Generator};

use common::{now_ms, produce, record, traffic, SourceModel};

const EXIT_STORE_BEHIND: i32 = 75;
/// Event ids of the records produced behind the released frontier.
const BEHIND_IDS: u64 = 1 << 60;

struct Stores {
    stack: Stack,
    job: String,
}

impl Stores {
    fn pg(&self) -> Option<(tokio::runtime::Runtime, tokio_postgres::Client)> {
        let mut e = self.stack.endpoints.clone();
        e.pg_schema = Some(self.job.clone());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&e.postgres_config(), NoTls).await.ok()?;
            tokio::spawn(conn);
            Some(c)
        })?;
        Some((rt, client))
    }

    fn redis(&self) -> Option<redis::Connection> {
        redis::Client::open(self.stack.endpoints.redis_url()).ok()?.get_connection().ok()
    }

    /// The least frontier of both stores, when both answer.
    fn committed(&self) -> Option<Time> {
        let (rt, c) = self.pg()?;
        let pg = rt.block_on(readback::pg_frontiers(&c, &self.job)).ok()?.into_iter().min()?;
        let mut con = self.redis()?;
        let redis = readback::redis_frontiers(&mut con, &self.job, 2).ok()?;
        let redis = redis.into_iter().collect::<Option<Vec<Time>>>()?.into_iter().min()?;
        Some((pg as Time).min(redis))
    }

    fn wait_for(&self, t: Time, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(240);
        while self.committed().is_none_or(|c| c < t) {
            assert!(Instant::now() < deadline, "{what}: the stores never reached {t}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stop `service`, run `f` on its files, start it again.
    fn while_stopped(&self, service: &str, f: impl FnOnce(&Path)) {
        self.stack.down(&[service.to_string()]).unwrap();
        f(&self.stack.home.join(service));
        self.stack.up().unwrap();
    }
}

fn copy(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let ok = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap().success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

#[test]
fn stores_rolled_back_under_a_running_job_are_noticed_and_repaired() {
    let stack = Stack::from_env().unwrap();
    let bootstrap = stack.endpoints.kafka_bootstrap.clone();
    let id = format!("rollback_{}_{}", std::process::id(), now_ms());
    ensure_topic(&bootstrap, &id, 4).expect("topic; is the stack up?");
    let fraud = FraudConfig::seconds();
    let config_file = common::fraud_config_file(&id, &fraud);
    let mut gen = Generator::new(GenConfig {
        late_per_10k: 20,
        duplicates_per_10k: 20,
        ..traffic(31, 4, now_ms() - 3_600_000)
    });
    let model =
        SourceModel { lateness_ms: 5_000, dedup_horizon_ms: 3_600_000, tick_ms: fraud.tick_ms };
    let stores = Stores { stack, job: id.clone() };

    // The job, one process of two workers, restarted whenever it exits (as
    // `tripwire launch` does); its exit statuses and its log are kept.
    let log = std::env::temp_dir().join(format!("{id}.log"));
    let exits: Arc<Mutex<Vec<Option<i32>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let (exits, stop, log, id, config_file) =
            (exits.clone(), stop.clone(), log.clone(), id.clone(), config_file.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
                let mut child = Command::new(env!("CARGO_BIN_EXE_fraud-detector"))
                    .args(["--topic", &id, "--dlq-topic", &format!("{id}-dlq"), "--job", &id])
                    .args(["-w", "2", "--metrics-port", "0"])
                    .arg("--config")
                    .arg(&config_file)
                    .env("TRIPWIRE_PG_SCHEMA", &id)
                    // The job's log level; raise it to see its decisions
                    // (`info,tripwire_connectors::kafka_source=debug`).
                    .env(
                        "RUST_LOG",
                        std::env::var("TRIPWIRE_TEST_JOB_LOG").unwrap_or("error".into()),
                    )
                    .stdout(out.try_clone().unwrap())
                    .stderr(out)
                    .spawn()
                    .unwrap();
                loop {
                    if let Some(status) = child.try_wait().unwrap() {
                        exits.lock().unwrap().push(status.code());
                        break;
                    }
                    if stop.load(Ordering::SeqCst) {
                        child.kill().unwrap();
                        child.wait().unwrap();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
    };

    let mut plan = gen.generate_more(8_000);
    produce(&bootstrap, &id, &plan);
    let early = model.judge(&plan, &[]);
    let mid = model.tick(early.accepted[early.accepted.len() / 2].event_time_ms);
    stores.wait_for(mid, "first commits");

    // Snapshots of both stores as they are now.
    let snapshots = Snapshots {
        redis: std::env::temp_dir().join(format!("{id}-redis")),
        pg: std::env::temp_dir().join(format!("{id}-pg")),
    };
    stores.while_stopped("redis", |dir| copy(&dir.join("appendonlydir"), &snapshots.redis));
    stores.while_stopped("postgres", |dir| copy(&dir.join("data"), &snapshots.pg));
    let snapshot_at = stores.committed().unwrap();

    // More input, then a quiet gap: the idle timeout releases every
    // partition, and the floor that decision sets is recorded with commits
    // past the snapshots. Both rollbacks lose it in one store each.
    let more = gen.generate_more(4_000);
    produce(&bootstrap, &id, &more);
    plan.extend(more);
    let released = model.end(&model.judge(&plan, &[]));
    assert!(released > snapshot_at);
    stores.wait_for(released, "the quiet partitions released");

    // Records behind that floor (but within the lateness bound of their
    // partitions' newest records) are late only by that decision: a replay
    // that lost it would accept them. Then more input.
    let behind_records: Vec<_> = (0..4)
        .flat_map(|p| {
            (0..5).map(move |i| {
                let id = BEHIND_IDS + (p * 5 + i) as u64;
                let t = released as i64 - 1_500 + i as i64 * 100;
                record(p, id, i as u64, t, Expect::Reject(DeadLetterReason::Late))
            })
        })
        .collect();
    let more = gen.generate_more(8_000);
    produce(&bootstrap, &id, &behind_records);
    produce(&bootstrap, &id, &more);
    let behind = plan.len()..plan.len() + behind_records.len();
    plan.extend(behind_records);
    plan.extend(more);
    let judged = model.judge(&plan, &[]);
    let later = model.tick(judged.accepted[judged.accepted.len() * 3 / 4].event_time_ms);
    assert!(later > released);
    stores.wait_for(later, "commits past the snapshots");

    // Redis comes back from its older append-only file.
    stores.while_stopped("redis", |dir| copy(&snapshots.redis, &dir.join("appendonlydir")));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !exits.lock().unwrap().contains(&Some(EXIT_STORE_BEHIND)) {
        assert!(Instant::now() < deadline, "the job did not notice Redis lost writes");
        std::thread::sleep(Duration::from_millis(100));
    }
    stores.wait_for(later, "Redis repaired by replay");

    // PostgreSQL comes back from its older data directory.
    stores.while_stopped("postgres", |dir| copy(&snapshots.pg, &dir.join("data")));
    // A committer finds out what its store lost when it next commits: the
    // stream goes on.
    let last = gen.generate_more(2_000);
    produce(&bootstrap, &id, &last);
    plan.extend(last);
    let deadline = Instant::now() + Duration::from_secs(120);
    while exits.lock().unwrap().iter().filter(|c| **c == Some(EXIT_STORE_BEHIND)).count() < 2 {
        assert!(Instant::now() < deadline, "the job did not notice PostgreSQL lost writes");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Once every partition has been quiet for the idle timeout, everything is
    // committed (the newest record is late under no floor: the end does not
    // depend on them). Then the reference decides lateness with the floors
    // the job recorded (timing decisions are the one input the log does not
    // hold), read once the last run has recorded what it found in both
    // stores; the floor set at the release must be among them, making the
    // records behind it late.
    let end = model.end(&model.judge(&plan, &[]));
    stores.wait_for(end, "the end, repaired");
    let floors = {
        let (rt, c) = stores.pg().unwrap();
        rt.block_on(postgres::recorded_decisions(&c, &id, &id)).unwrap().floors
    };
    // The late letters the job committed record its decisions too: a
    // process that released a quiet partition may commit the letters of the
    // records that made late and die (a store found behind) before a store
    // records the floor; the next run repeats the decision from the letters.
    let lettered: BTreeSet<(i32, i64)> = common::dead_letters(&format!("{id}-dlq"))
        .into_iter()
        .filter(|l| l.2 == DeadLetterReason::Late.to_string())
        .map(|l| (l.0, l.1))
        .collect();
    let judged = model.judge_recorded(&plan, &floors, &lettered);
    let by_floors = model.judge_recorded(&plan, &floors, &BTreeSet::new());
    assert_eq!(model.end(&judged), end);
    one_floor_explains_the_letters_alone(&model, &plan, &floors, &judged, &by_floors);
    stop.store(true, Ordering::SeqCst);
    supervisor.join().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let said = text.lines().filter(|l| l.contains("store lost acknowledged writes")).count();
    assert!(said >= 2, "each rollback is said in the log: {said} lines");
    assert!(text.contains("RedisSink") && text.contains("PgSink"), "naming the store");

    let late: BTreeSet<usize> = judged.late.iter().copied().collect();
    assert!(
        behind.clone().all(|i| late.contains(&i)),
        "the recorded floors make the records behind the release late"
    );

    // The judge.
    let mut by_card: BTreeMap<u64, Vec<Transaction>> = BTreeMap::new();
    for x in &judged.accepted {
        by_card.entry(x.card_id).or_default().push(x.clone());
    }
    let (mut want_stats, mut want_alerts) = (BTreeMap::new(), BTreeSet::new());
    for events in by_card.values() {
        let r = Reference::new(&fraud, events);
        want_stats.extend(r.stats_at(end - 1));
        want_alerts.extend(r.alerts_until(end - 1).iter().map(readback::alert_row));
    }
    let (rt, c) = stores.pg().unwrap();
    let (stats, alerts, archive) = rt.block_on(async {
        (
            readback::pg_stats(&c).await.unwrap(),
            readback::pg_alerts(&c).await.unwrap(),
            readback::pg_archive(&c).await.unwrap(),
        )
    });
    let mut con = stores.redis().unwrap();
    let redis_stats = readback::redis_stats(&mut con, &id).unwrap();
    let mut redis_alerts = readback::redis_alert_ids(&mut con, &id).unwrap();
    redis_alerts.sort_unstable();
    let mut want_ids: Vec<i64> = want_alerts.iter().map(|a| a.0).collect();
    want_ids.sort_unstable();
    let want_archive: BTreeSet<i64> = judged.accepted.iter().map(|x| x.event_id as i64).collect();
    let differ = |got| common::stats_differ(&want_stats, got);
    assert_eq!(
        differ(&stats),
        None,
        "PostgreSQL statistics equal the reference's after the repairs"
    );
    assert_eq!(
        differ(&redis_stats),
        None,
        "Redis statistics equal the reference's after the repairs"
    );
    assert_eq!(alerts, want_alerts, "PostgreSQL alerts");
    assert_eq!(redis_alerts, want_ids, "the Redis stream holds each alert once");
    assert_eq!(archive, want_archive, "the archive");
}

/// The records late by their letters alone (no recorded floor makes them
/// late) must be what one floor decision, unrecorded, made late: per
/// partition, every record accepted from the first of them up to the next
/// recorded floor is newer than all of them. Lateness from nowhere fails.
fn one_floor_explains_the_letters_alone(
    model: &SourceModel,
    plan: &[tripwire_jobs::generator::Planned],
    floors: &BTreeMap<(i32, i64), Time>,
    judged: &common::Judged,
    by_floors: &common::Judged,
) {
    let at = common::coordinates(plan);
    let times = common::event_times(plan);
    let time = |i: usize| times[i].expect("an accepted or late record decodes");
    let before: BTreeSet<usize> = by_floors.late.iter().copied().collect();
    let alone: Vec<usize> = judged.late.iter().copied().filter(|i| !before.contains(i)).collect();
    let dead: BTreeSet<usize> = judged.dead.iter().chain(&judged.duplicates).copied().collect();
    let partitions: BTreeSet<i32> = alone.iter().map(|&i| at[i].0).collect();
    for p in partitions {
        let mine: Vec<usize> = alone.iter().copied().filter(|&i| at[i].0 == p).collect();
        let first = mine.iter().map(|&i| at[i].1).min().unwrap();
        let newest = mine.iter().map(|&i| model.tick(time(i))).max().unwrap();
        let until = floors.range((p, first + 1)..(p + 1, 0)).next().map_or(i64::MAX, |(k, _)| k.1);
        let older: Vec<(i32, i64)> = (0..plan.len())
            .filter(|&i| at[i].0 == p && (first..until).contains(&at[i].1) && !dead.contains(&i))
            .filter(|&i| model.tick(time(i)) <= newest)
            .map(|i| at[i])
            .collect();
        assert!(
            older.is_empty(),
            "partition {p}: {} records late by their letters alone from offset {first} on, but {older:?} among them, no newer, were accepted",
            mine.len()
        );
    }
}

/// The stores' copies, removed however the test ends (a data directory is gigabytes).
struct Snapshots {
    redis: std::path::PathBuf,
    pg: std::path::PathBuf,
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.redis);
        let _ = std::fs::remove_dir_all(&self.pg);
    }
}
