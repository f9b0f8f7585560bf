//! The PostgreSQL sink: one transaction per batch writes the consolidated
//! changes and the worker's checkpoint `(job, worker, frontier)`.
//!
//! Writes are idempotent as well, so that a replay after a crash cannot double
//! anything: statistics are absolute values upserted under a version guard
//! (`as_of` only moves forward), one row per card (`card_stats`) copied in
//! (`COPY ... BINARY` into a staging table, one upsert from it; a large
//! batch's cards new to the store straight into `card_stats`); cards whose
//! windows all emptied are deleted under the same guard, alerts are inserted
//! with `ON CONFLICT DO NOTHING` on their deterministic id, archived events
//! likewise on their event id. The rest goes in bulk (`UNNEST` over arrays).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{accepts, to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};
use tripwire_dataflow::{CardStats, Channel, Time};

use super::{as_i64, migrate};
use crate::commit::{
    committer, frontier_sinks, Batch, CommitOptions, Committed, Committer, InputEnd, SinkInputs,
    Store,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::kafka_source::{
    DeadLetter, DecisionStore, Decisions, LateEvents, ProduceTimes, Progress, ProgressSample,
    SourceDecisions,
};

/// Where and how the sink commits.
#[derive(Clone, Debug)]
pub struct PgSinkConfig {
    /// tokio-postgres connection string.
    pub conninfo: String,
    /// The job's name in the checkpoints table.
    pub job: String,
    /// Commit at most this often (a batch also waits for the frontier to move).
    pub commit_interval: Duration,
    /// Commit at most this often while catching up (see `CommitOptions`).
    pub catch_up_interval: Duration,
    /// The source's progress samples, stored with each commit, if any.
    pub progress: Option<Progress>,
    /// Set once no more samples will come into `progress` (the dead-letter
    /// sink's `Confirm::settled`): a bounded run's last commit waits for it.
    pub progress_settled: Option<Arc<AtomicBool>>,
    /// The source's late records, stored in `late_events` with each commit, if any.
    pub late: Option<LateEvents>,
    /// The job's committed frontier when this run started (0 for a first run):
    /// updates below it were committed by an earlier run, and a replay
    /// recomputes them from partial windows, so they are dropped.
    pub resume_from: Time,
    /// Report commits here (the source's backpressure handle), if given.
    pub report_to: Option<Committed>,
    /// The source's sampled produce times: each is observed as end-to-end
    /// latency when the commit covering it lands.
    pub produce_times: Option<ProduceTimes>,
    /// The source's floors and read positions, stored with each commit, if any.
    pub decisions: Option<Decisions>,
    /// The topic the decisions are about.
    pub topic: String,
    /// A bounded run's end, from the source.
    pub end: Option<InputEnd>,
    /// Wait for each commit to reach the disk (`synchronous_commit`). Off by
    /// default: a commit that a crash loses takes its frontier with it, the
    /// committer finds its store behind what it acknowledged on reconnecting,
    /// and the group replays it (see `commit.rs`).
    pub synchronous_commit: bool,
    /// The greatest frontier any worker had stored when this run started
    /// (before a rescale fitted them): until a batch starts there, rows this
    /// run did not write may be in the store.
    pub high_water: Time,
    /// Shared by the sinks of a process's workers: a large batch (copied in,
    /// [`COPY_FROM_CARDS`] cards or more) commits only with one of its
    /// permits, so that at most that many bulk writes run at once (`None`:
    /// no limit). A catch-up ends with every worker's large batch at once;
    /// on a machine whose cores the stores share, two PostgreSQL backends
    /// copying side by side took both cores from Redis, whose readers (the
    /// authorisation service) then waited behind them.
    pub bulk_writers: Option<Arc<tokio::sync::Semaphore>>,
}

/// Commit this worker's statistics and alerts (and archived events, if given) to
/// PostgreSQL, exactly once per frontier.
pub fn pg_sink(inputs: SinkInputs<'_>, config: &PgSinkConfig) -> Committed {
    let worker = inputs.stats.inner.scope().index();
    let archive = inputs.archive.is_some();
    frontier_sinks(inputs, vec![pg_committer(worker, config, archive)]).remove(0)
}

/// Worker `worker`'s PostgreSQL committer, for [`frontier_sinks`] (with the
/// archived events in its batches if `archive`).
pub fn pg_committer(worker: usize, config: &PgSinkConfig, archive: bool) -> Committer {
    let store = Postgres::new(config.clone(), worker);
    let options = CommitOptions {
        interval: config.commit_interval,
        resume_from: config.resume_from,
        report_to: config.report_to.clone(),
        catch_up_interval: config.catch_up_interval,
        end: config.end.clone(),
    };
    committer("PgSink", worker, store, options, archive)
}

struct Postgres {
    config: PgSinkConfig,
    worker: usize,
    /// Whether a large batch's cards new to the store (see [`commit`]) are
    /// copied straight into `card_stats`; off after one of them was not new.
    insert_new_cards: bool,
    /// Where this sink's last commit left its worker's checkpoint (`None`:
    /// not known, as after a start or a failure); see [`commit`].
    left_at: Option<Time>,
    /// Commits that went in one round trip (for tests).
    one_trips: u64,
}

impl Postgres {
    /// A sink that knows nothing yet of its worker's checkpoint.
    fn new(config: PgSinkConfig, worker: usize) -> Self {
        Postgres { config, worker, insert_new_cards: true, left_at: None, one_trips: 0 }
    }
}

/// The SQLSTATE `advance_checkpoint` fails with: the checkpoint was not
/// where the commit expected it (migration 9).
const NOT_WHERE_EXPECTED: &str = "TW001";

/// Everything the source left in `shared` for this commit.
fn take<T>(shared: &Option<Arc<Mutex<Vec<T>>>>) -> Vec<T> {
    match shared {
        Some(v) => std::mem::take(&mut *v.lock().expect("shared with the source")),
        None => Vec::new(),
    }
}

/// A connection and its prepared statements.
struct PgConn {
    client: Client,
    statements: Statements,
}

impl Store for Postgres {
    type Conn = PgConn;

    async fn connect(&mut self) -> Result<PgConn, String> {
        let client = connect(&self.config.conninfo).await.map_err(|e| describe(&e))?;
        // Held while this connection lives: a rescale waits for every
        // session of an earlier run to end, commits in flight included.
        let job = [&self.config.job as &(dyn ToSql + Sync)];
        client
            .execute(
                &format!("SELECT pg_advisory_lock_shared({})", super::resume::SINKS_LOCK),
                &job,
            )
            .await
            .map_err(|e| describe(&e))?;
        if !self.config.synchronous_commit {
            client.batch_execute("SET synchronous_commit = off").await.map_err(|e| describe(&e))?;
        }
        // Where each commit copies its card rows before upserting them.
        client
            .batch_execute(
                "CREATE TEMP TABLE IF NOT EXISTS card_stats_in (LIKE card_stats)
                     ON COMMIT DELETE ROWS",
            )
            .await
            .map_err(|e| describe(&e))?;
        let statements = Statements::prepare(&client).await.map_err(|e| describe(&e))?;
        Ok(PgConn { client, statements })
    }

    async fn stored_frontier(&mut self, conn: &mut PgConn) -> Result<Option<Time>, String> {
        let row = conn
            .client
            .query_opt(
                "SELECT frontier FROM checkpoints WHERE job = $1 AND worker = $2",
                &[&self.config.job, &(self.worker as i32)],
            )
            .await
            .map_err(|e| describe(&e))?;
        Ok(row.map(|r| r.get::<_, i64>(0) as Time))
    }

    async fn commit(&mut self, conn: &mut PgConn, batch: &Batch) -> Result<(), String> {
        settle(&self.config, self.worker, batch).await;
        let (samples, late) = (take(&self.config.progress), take(&self.config.late));
        let decisions = match &self.config.decisions {
            Some(d) => d.take(DecisionStore::Postgres),
            None => SourceDecisions::default(),
        };
        let (client, st) = (&mut conn.client, &conn.statements);
        let job = &self.config.job;
        let source = Source { topic: &self.config.topic, samples: &samples, decisions: &decisions };
        let at = (job.as_str(), self.worker, self.config.high_water);
        let _turn = bulk_turn(&self.config, batch).await;
        let expected = self.left_at.take();
        let mut result =
            commit(client, st, at, batch, &source, &late, self.insert_new_cards, expected).await;
        if let (Err(e), Some(_)) = (&result, expected) {
            if e.code().map(SqlState::code) == Some(NOT_WHERE_EXPECTED) {
                // Someone else moved the checkpoint (or the store lost
                // commits): commit again, reading where it is first.
                tracing::info!(worker = self.worker, error = %describe(e),
                    "the checkpoint was not where the last commit left it");
                result = commit(client, st, at, batch, &source, &late, self.insert_new_cards, None)
                    .await;
            }
        }
        let result = result.map(|(left, one_trip)| {
            self.left_at = left;
            self.one_trips += u64::from(one_trip);
        });
        if let Err(e) = &result {
            if e.code() == Some(&SqlState::UNIQUE_VIOLATION) && self.insert_new_cards {
                // A card this run's dataflow took for new had a row after
                // all: from now on every card goes through the guarded upsert.
                tracing::warn!(
                    worker = self.worker,
                    error = %describe(e),
                    "a card taken for new is in card_stats: upserting every card from now on"
                );
                self.insert_new_cards = false;
            }
        }
        if result.is_ok() {
            for (a, _) in &batch.alerts {
                crate::metrics::alerts_total().with_label_values(&[a.rule.name()]).inc();
            }
            if let Some(times) = &self.config.produce_times {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let histogram = crate::metrics::end_to_end_latency();
                times.lock().expect("produce times").retain(|(t, ts)| {
                    if *t >= batch.frontier {
                        return true;
                    }
                    histogram.observe((now - ts).max(0) as f64 / 1000.0);
                    false
                });
            }
        }
        if result.is_err() {
            // Not stored: keep them for the retry.
            if let Some(p) = &self.config.progress {
                p.lock().expect("progress samples").extend(samples);
            }
            if let Some(l) = &self.config.late {
                l.lock().expect("late events").extend(late);
            }
            if let Some(d) = &self.config.decisions {
                d.put_back(DecisionStore::Postgres, decisions);
            }
        }
        result.map_err(|e| describe(&e))
    }
}

/// The error with what the server said, if it said anything (tokio-postgres
/// shows a server's error as "db error" alone).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    let (mut client, conn) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    migrate(&mut client).await?;
    Ok(client)
}

/// Floors: `$1` job, `$2` topic, `$3` partitions, `$4` offsets, `$5` floors.
pub(super) const STORE_FLOORS: &str =
    "INSERT INTO source_floors (job, topic, partition, \"offset\", floor)
     SELECT $1, $2, * FROM UNNEST($3::int[], $4::bigint[], $5::bigint[])
     ON CONFLICT (job, topic, partition, \"offset\") DO UPDATE
         SET floor = GREATEST(source_floors.floor, EXCLUDED.floor)";

/// Read positions: `$1` job, `$2` topic, `$3` partitions, `$4` offsets.
pub(super) const STORE_POSITIONS: &str =
    "INSERT INTO source_positions (job, topic, partition, \"offset\")
     SELECT $1, $2, * FROM UNNEST($3::int[], $4::bigint[])
     ON CONFLICT (job, topic, partition) DO UPDATE
         SET \"offset\" = GREATEST(source_positions.\"offset\", EXCLUDED.\"offset\")";

/// The columns of `decisions` as [`STORE_FLOORS`] and [`STORE_POSITIONS`] take them.
#[allow(clippy::type_complexity)]
pub(super) fn decision_columns(
    decisions: &SourceDecisions,
) -> ((Vec<i32>, Vec<i64>, Vec<i64>), (Vec<i32>, Vec<i64>)) {
    let floors = &decisions.floors;
    (
        (
            floors.keys().map(|k| k.0).collect(),
            floors.keys().map(|k| k.1).collect(),
            floors.values().map(|f| as_i64(*f)).collect(),
        ),
        (
            decisions.positions.keys().copied().collect(),
            decisions.positions.values().copied().collect(),
        ),
    )
}

/// A large batch's turn among the process's bulk writers (see
/// [`PgSinkConfig::bulk_writers`]); a small batch needs none.
async fn bulk_turn<'c>(
    config: &'c PgSinkConfig,
    batch: &Batch,
) -> Option<tokio::sync::SemaphorePermit<'c>> {
    let writers = config.bulk_writers.as_ref()?;
    if batch.upserts.len() < COPY_FROM_CARDS {
        return None;
    }
    // Never closed: an error is impossible, and then no turn is needed.
    writers.acquire().await.ok()
}

/// Before a bounded run's last commit, wait until the restart points
/// before the end are all confirmed (the dead-letter sink's last
/// transaction is committed), at most [`SETTLE_WAIT`]: without them, the
/// next run would restart from an earlier point and read more again.
async fn settle(config: &PgSinkConfig, worker: usize, batch: &Batch) {
    let last = config.end.as_ref().and_then(InputEnd::get).is_some_and(|e| batch.frontier >= e);
    let Some(settled) = config.progress_settled.as_ref().filter(|_| last) else { return };
    let started = std::time::Instant::now();
    while !settled.load(Ordering::Acquire) {
        if started.elapsed() >= SETTLE_WAIT {
            tracing::warn!(
                worker,
                "the last restart points were not confirmed in time; committing without them"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The longest a bounded run's last commit waits for its restart points.
const SETTLE_WAIT: Duration = Duration::from_secs(60);

/// What a commit stores for the source: restart points and decisions.
struct Source<'a> {
    topic: &'a str,
    samples: &'a [ProgressSample],
    decisions: &'a SourceDecisions,
}

/// How a row of `card_stats` replaces the stored one: only by a later one.
const UPSERT_GUARD: &str = "ON CONFLICT (card_id) DO UPDATE SET
     windows = EXCLUDED.windows, as_of = EXCLUDED.as_of
 WHERE card_stats.as_of <= EXCLUDED.as_of";

/// Batches of fewer cards than this go in as statement parameters, in the
/// same round trip as everything else; larger ones by `COPY` (which waits
/// for the server before it sends, and once more before the upsert from it).
const COPY_FROM_CARDS: usize = 1_000;

/// The sink's statements, prepared once per connection.
struct Statements {
    lock: Statement,
    advance: Statement,
    late: Statement,
    samples: Statement,
    floors: Statement,
    positions: Statement,
    upsert: Statement,
    upsert_rows: Statement,
    /// `upsert_rows` without the conflict check, for cards new to the store.
    insert_rows: Statement,
    delete: Statement,
    alerts: Statement,
    archive: Statement,
    checkpoint: Statement,
}

impl Statements {
    async fn prepare(c: &Client) -> Result<Statements, tokio_postgres::Error> {
        let upsert_staged =
            format!("INSERT INTO card_stats SELECT * FROM card_stats_in {UPSERT_GUARD}");
        // A small batch's rows as parameters: the windows of all cards in
        // one array of window rows, each card's from row `o`, `n` long.
        let insert_rows = "INSERT INTO card_stats
             SELECT c.card_id, ($2::bigint[])[c.o + 1 : c.o + c.n][1:6], c.as_of
             FROM UNNEST($1::bigint[], $3::int[], $4::int[], $5::bigint[])
                  AS c(card_id, o, n, as_of)";
        let upsert_rows = format!("{insert_rows} {UPSERT_GUARD}");
        let (late, samples, upsert, delete, alerts, archive, checkpoint) = tokio::try_join!(
            // Keyed by their source coordinates: a replay re-reads them, and finds them there.
            c.prepare(
                "INSERT INTO late_events (topic, partition, \"offset\", reason, detail)
                 SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::text[], $5::text[])
                 ON CONFLICT DO NOTHING"
            ),
            c.prepare(
                "INSERT INTO source_progress (job, topic, partition, \"offset\", max_event_time, basis, top)
                 SELECT $1, * FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[])
                 ON CONFLICT DO NOTHING"
            ),
            c.prepare(&upsert_staged),
            c.prepare(
                "DELETE FROM card_stats c
                 USING UNNEST($1::bigint[], $2::bigint[]) AS d(card_id, as_of)
                 WHERE c.card_id = d.card_id AND c.as_of <= d.as_of"
            ),
            c.prepare(
                "INSERT INTO alerts (alert_id, card_id, rule, trigger_event, event_time, details)
                 SELECT a, c, r, t, to_timestamp(e / 1000.0), d::jsonb
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[],
                             $6::text[]) AS x(a, c, r, t, e, d)
                 ON CONFLICT (alert_id) DO NOTHING"
            ),
            c.prepare(
                "INSERT INTO raw_transactions (event_id, card_id, account_id, merchant_id, mcc,
                     amount_minor, currency, country, lat_e6, lon_e6, channel, event_time, device_id)
                 SELECT e, c, a, m, mcc, amt, cur, ctry, lat, lon, ch, to_timestamp(t / 1000.0), dev
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                             $6::bigint[], $7::text[], $8::text[], $9::bigint[], $10::bigint[],
                             $11::text[], $12::bigint[], $13::bigint[])
                      AS x(e, c, a, m, mcc, amt, cur, ctry, lat, lon, ch, t, dev)
                 ON CONFLICT (event_id) DO NOTHING"
            ),
            c.prepare(
                "INSERT INTO checkpoints (job, worker, frontier) VALUES ($1, $2, $3)
                 ON CONFLICT (job, worker) DO UPDATE
                     SET frontier = GREATEST(checkpoints.frontier, EXCLUDED.frontier),
                         updated_at = now()"
            ),
        )?;
        let (lock, advance, floors, positions, upsert_rows, insert_rows) = tokio::try_join!(
            c.prepare("SELECT frontier FROM checkpoints WHERE job = $1 AND worker = $2 FOR UPDATE"),
            c.prepare("SELECT advance_checkpoint($1, $2, $3, $4)"),
            c.prepare(STORE_FLOORS),
            c.prepare(STORE_POSITIONS),
            c.prepare(&upsert_rows),
            c.prepare(insert_rows),
        )?;
        Ok(Statements {
            lock,
            advance,
            late,
            samples,
            floors,
            positions,
            upsert,
            upsert_rows,
            insert_rows,
            delete,
            alerts,
            archive,
            checkpoint,
        })
    }
}

/// One transaction: the batch's changes and the worker's checkpoint.
///
/// Requests go out together (tokio-postgres pipelines the requests of
/// futures polled at once, in order): `BEGIN` with the checkpoint's lock,
/// then every statement with `COMMIT`, so that a commit of a small batch
/// costs two round trips however many kinds of change it carries. (A
/// statement that fails aborts the transaction, and the `COMMIT` behind it
/// then rolls back; the caller drops the connection on any error.) A large
/// batch's cards go by `COPY`, and its `COMMIT` waits for the upsert from it.
///
/// In real time a commit costs one round trip: a small batch that starts
/// where this sink's last commit left the checkpoint (`expected`), beyond
/// any replay (`high_water`), sends `BEGIN`, `advance_checkpoint` (which
/// locks the checkpoint and fails unless it is still there), its writes and
/// `COMMIT` at once, as a store that holds exactly what this run's commits
/// left. Should the checkpoint have moved, the transaction rolls back and
/// the caller commits again without `expected`. (At 10K/s this took 1-7 ms
/// off PostgreSQL's p99 of produce -> visible, in three rounds:
/// `bench/README.md`.) Returns where the checkpoint is left, if this commit
/// moved it, and whether it went in one round trip.
#[allow(clippy::too_many_arguments)]
async fn commit(
    client: &Client,
    st: &Statements,
    (job, worker, high_water): (&str, usize, Time),
    b: &Batch,
    source: &Source<'_>,
    late: &[DeadLetter],
    insert_new_cards: bool,
    expected: Option<Time>,
) -> Result<(Option<Time>, bool), tokio_postgres::Error> {
    let samples = source.samples;
    let (upserts, deletes, alerts) = (&b.upserts, &b.deletes, &b.alerts);
    let tx = client;
    // What this worker's store already covers. A batch at or below it (a
    // replay from the least frontier of all workers re-sends what this worker
    // had committed) is not applied again: upserts are guarded by `as_of`,
    // but a window deleted later would come back, with nothing left to
    // delete it. Locked, so that two commits of one worker take turns.
    let (worker_i32, frontier) = (worker as i32, as_i64(b.frontier));
    let one_trip = expected == Some(b.start)
        && b.start >= high_water
        && b.frontier > b.start
        && b.upserts.len() < COPY_FROM_CARDS;
    let stored: Option<i64> = if one_trip {
        // Checked by `advance_checkpoint`, sent first.
        Some(as_i64(b.start))
    } else {
        let lock_params: [&(dyn ToSql + Sync); 2] = [&job, &worker_i32];
        let (_, stored) =
            tokio::try_join!(tx.batch_execute("BEGIN"), tx.query_opt(&st.lock, &lock_params))?;
        stored.map(|r| r.get(0))
    };
    let covered = stored.is_some_and(|s| s >= frontier);
    let (upserts, deletes, alerts, archived): (&[_], &[_], &[_], &[_]) =
        if covered { (&[], &[], &[], &[]) } else { (upserts, deletes, alerts, &b.archive) };
    // When the store holds exactly what this run's commits left (its frontier
    // is where this batch starts, and no other run or worker can have written
    // beyond it), a card that came and went within the batch has no row to
    // delete. Catching up, that is most deletes.
    let exact = stored == Some(as_i64(b.start)) && b.start >= high_water;
    let kept: Vec<(u64, Time)>;
    let deletes: &[_] = if exact {
        kept = deletes.iter().filter(|(k, _)| !b.passing(k)).copied().collect();
        tracing::debug!(
            worker,
            skipped = deletes.len() - kept.len(),
            "cards that came and went not deleted"
        );
        &kept
    } else {
        deletes
    };
    let late_cols = (
        late.iter().map(|d| d.topic.as_str()).collect::<Vec<_>>(),
        late.iter().map(|d| d.partition).collect::<Vec<i32>>(),
        late.iter().map(|d| d.offset).collect::<Vec<i64>>(),
        late.iter().map(|d| d.reason.as_str()).collect::<Vec<_>>(),
        late.iter().map(|d| d.detail.as_str()).collect::<Vec<_>>(),
    );
    let late_fut = async {
        if late.is_empty() {
            return Ok(0);
        }
        let (t, p, o, r, d) = &late_cols;
        tx.execute(&st.late, &[t, p, o, r, d]).await
    };

    let sample_cols = (
        samples.iter().map(|s| s.topic.as_str()).collect::<Vec<_>>(),
        samples.iter().map(|s| s.partition).collect::<Vec<i32>>(),
        samples.iter().map(|s| s.offset).collect::<Vec<i64>>(),
        samples.iter().map(|s| as_i64(s.max_event_time)).collect::<Vec<i64>>(),
        samples.iter().map(|s| as_i64(s.basis)).collect::<Vec<i64>>(),
        samples.iter().map(|s| as_i64(s.top)).collect::<Vec<i64>>(),
    );
    let samples_fut = async {
        if samples.is_empty() {
            return Ok(0);
        }
        let (t, p, o, m, b, top) = &sample_cols;
        tx.execute(&st.samples, &[&job, t, p, o, m, b, top]).await
    };
    let (floor_cols, position_cols) = decision_columns(source.decisions);
    let floors_fut = async {
        if floor_cols.0.is_empty() {
            return Ok(0);
        }
        let (p, o, f) = &floor_cols;
        tx.execute(&st.floors, &[&job, &source.topic, p, o, f]).await
    };
    let positions_fut = async {
        if position_cols.0.is_empty() {
            return Ok(0);
        }
        let (p, o) = &position_cols;
        tx.execute(&st.positions, &[&job, &source.topic, p, o]).await
    };

    let copy = upserts.len() >= COPY_FROM_CARDS;
    // Which of the batch's cards are new to the store: none of its rows at
    // `start` (so the store holds none, when it holds exactly what this run
    // left). They go straight into `card_stats` (a large batch's without the
    // staging table), without the upsert's conflict check and its
    // speculative insertion: half of PostgreSQL's work when a bulk load
    // ends, and in real time, where a card's first transaction of the day
    // is new, 0.6 x the time of the upsert for them (`bench/README.md`).
    // Should one have a row after all, the key's uniqueness fails the
    // commit, and its retry upserts them all (the caller turns this off).
    let new: Vec<bool> = if exact && insert_new_cards {
        flags(upserts.iter().map(|u| u.0), &b.absent_before)
    } else {
        Vec::new()
    };
    let split =
        |is_new: bool| upserts.iter().zip(&new).filter(move |(_, n)| **n == is_new).map(|(u, _)| u);
    // A small batch's cards as parameters: the new ones, and the others.
    let card_cols = match (copy, new.is_empty()) {
        (true, _) => Default::default(),
        (false, true) => (CardColumns::default(), CardColumns::of(upserts.iter())),
        (false, false) => (CardColumns::of(split(true)), CardColumns::of(split(false))),
    };
    let upsert_fut = async {
        if upserts.is_empty() {
            return Ok(0);
        }
        if copy {
            if new.is_empty() {
                copy_cards(tx, "card_stats_in", upserts.iter()).await?;
                return tx.execute(&st.upsert, &[]).await;
            }
            let inserted = copy_cards(tx, "card_stats", split(true)).await?;
            if new.iter().all(|n| *n) {
                return Ok(inserted);
            }
            copy_cards(tx, "card_stats_in", split(false)).await?;
            return Ok(inserted + tx.execute(&st.upsert, &[]).await?);
        }
        let (inserted, upserted) = tokio::try_join!(
            card_rows(tx, &st.insert_rows, &card_cols.0),
            card_rows(tx, &st.upsert_rows, &card_cols.1)
        )?;
        Ok(inserted + upserted)
    };

    let delete_cols = (
        deletes.iter().map(|d| d.0 as i64).collect::<Vec<i64>>(),
        deletes.iter().map(|d| as_i64(d.1)).collect::<Vec<i64>>(),
    );
    let delete_fut = async {
        if deletes.is_empty() {
            return Ok(0);
        }
        let (c, a) = &delete_cols;
        tx.execute(&st.delete, &[c, a]).await
    };

    let alert_cols = (
        alerts.iter().map(|(a, _)| a.id as i64).collect::<Vec<i64>>(),
        alerts.iter().map(|(a, _)| a.card_id as i64).collect::<Vec<i64>>(),
        alerts.iter().map(|(a, _)| a.rule.name()).collect::<Vec<&str>>(),
        alerts.iter().map(|(a, _)| a.trigger_event as i64).collect::<Vec<i64>>(),
        alerts.iter().map(|(a, _)| as_i64(a.event_time_ms)).collect::<Vec<i64>>(),
        alerts
            .iter()
            .map(|(a, _)| serde_json::to_string(&a.details).expect("details serialize"))
            .collect::<Vec<String>>(),
    );
    let alerts_fut = async {
        if alerts.is_empty() {
            return Ok(0);
        }
        let (i, c, r, t, e, d) = &alert_cols;
        tx.execute(&st.alerts, &[i, c, r, t, e, d]).await
    };

    let archive_fut = archive(tx, &st.archive, archived);
    let checkpoint_fut = async {
        if covered || one_trip {
            return Ok(0);
        }
        tx.execute(&st.checkpoint, &[&job, &worker_i32, &frontier]).await
    };
    let writes = async {
        tokio::try_join!(
            late_fut,
            samples_fut,
            floors_fut,
            positions_fut,
            upsert_fut,
            delete_fut,
            alerts_fut,
            archive_fut,
            checkpoint_fut
        )
    };
    let left = (!covered).then_some(b.frontier);
    if one_trip {
        let from = as_i64(b.start);
        let params: [&(dyn ToSql + Sync); 4] = [&job, &worker_i32, &from, &frontier];
        let advance = tx.execute(&st.advance, &params);
        // Every answer awaited, so that the checkpoint's refusal is the
        // error returned, not the writes' "transaction aborted" behind it.
        let (begun, advanced, written, committed) =
            tokio::join!(tx.batch_execute("BEGIN"), advance, writes, tx.batch_execute("COMMIT"));
        begun?;
        advanced?;
        written?;
        committed?;
    } else if copy {
        writes.await?;
        tx.batch_execute("COMMIT").await?;
    } else {
        tokio::try_join!(writes, tx.batch_execute("COMMIT"))?;
    }
    Ok((left, one_trip))
}

/// Write a small batch's cards `c` with `statement` (`insert_rows` or
/// `upsert_rows`); nothing to send if there are none.
async fn card_rows(
    tx: &Client,
    statement: &Statement,
    c: &CardColumns,
) -> Result<u64, tokio_postgres::Error> {
    if c.card.is_empty() {
        return Ok(0);
    }
    let windows = WindowRows(&c.windows);
    let params: [&(dyn ToSql + Sync); 5] = [&c.card, &windows, &c.offset, &c.len, &c.as_of];
    tx.execute(statement, &params).await
}

/// A small batch's cards as the columns `upsert_rows` and `insert_rows`
/// take: each card's non-empty windows, rows of one array, from row
/// `offset`, `len` long.
#[derive(Default)]
struct CardColumns {
    card: Vec<i64>,
    windows: Vec<[i64; 6]>,
    offset: Vec<i32>,
    len: Vec<i32>,
    as_of: Vec<i64>,
}

impl CardColumns {
    fn of<'a>(upserts: impl Iterator<Item = &'a (u64, CardStats, Time)>) -> Self {
        let mut c = CardColumns::default();
        for (card, stats, as_of) in upserts {
            c.card.push(*card as i64);
            c.as_of.push(as_i64(*as_of));
            let offset = c.windows.len() as i32;
            c.windows.extend(stats.non_empty().map(|(window_ms, w)| window_row(window_ms, &w)));
            c.offset.push(offset);
            c.len.push(c.windows.len() as i32 - offset);
        }
        c
    }
}

/// One window's statistics as a row of `card_stats.windows` holds them.
fn window_row(window_ms: Time, s: &tripwire_dataflow::WindowStats) -> [i64; 6] {
    [window_ms as i64, s.count, s.sum, s.max_amount, s.distinct_merchants, s.distinct_countries]
}

/// Window rows as a two-dimensional `bigint[]` (`card_stats.windows`, or a
/// batch's windows for `upsert_rows`), in PostgreSQL's binary array format:
/// one array per row read where six were.
#[derive(Debug)]
struct WindowRows<'a>(&'a [[i64; 6]]);

impl ToSql for WindowRows<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let rows = i32::try_from(self.0.len())?;
        // Dimensions (none for an empty array), no nulls, elements of type int8.
        let dims: &[i32] = if rows == 0 { &[] } else { &[rows, 1, 6, 1] };
        out.reserve(12 + 4 * dims.len() + 12 * 6 * self.0.len());
        out.put_i32(dims.len() as i32 / 2);
        out.put_i32(0);
        out.put_u32(Type::INT8.oid());
        for d in dims {
            out.put_i32(*d);
        }
        for v in self.0.iter().flatten() {
            out.put_i32(8);
            out.put_i64(*v);
        }
        Ok(IsNull::No)
    }

    accepts!(INT8_ARRAY);
    to_sql_checked!();
}

/// For each of `keys` (ascending), whether it is among `among` (ascending):
/// [`Batch::passing`] for every card at once, in one merge (a binary search
/// per card, twice over, for the hundreds of thousands of a bulk load's
/// last batch, would be a pass of cache misses each).
fn flags(keys: impl Iterator<Item = u64>, among: &[u64]) -> Vec<bool> {
    let mut rest = among.iter().peekable();
    keys.map(|k| {
        while rest.next_if(|a| **a < k).is_some() {}
        rest.peek().is_some_and(|a| **a == k)
    })
    .collect()
}

/// Copy the cards' rows into `table`: `card_stats` itself, or its staging
/// table `card_stats_in` (emptied at commit); how many.
async fn copy_cards<'a>(
    tx: &Client,
    table: &str,
    upserts: impl Iterator<Item = &'a (u64, CardStats, Time)>,
) -> Result<u64, tokio_postgres::Error> {
    let sink = tx.copy_in(&format!("COPY {table} FROM STDIN BINARY")).await?;
    let types = [Type::INT8, Type::INT8_ARRAY, Type::INT8];
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    // The window rows of one card, reused: no allocation per row.
    let mut windows: Vec<[i64; 6]> = Vec::new();
    for (card, stats, as_of) in upserts {
        windows.clear();
        windows.extend(stats.non_empty().map(|(window_ms, s)| window_row(window_ms, &s)));
        let (card, as_of) = (*card as i64, as_i64(*as_of));
        writer.as_mut().write(&[&card, &WindowRows(&windows), &as_of]).await?;
    }
    writer.finish().await
}

/// Archive accepted events, once each (a replay finds them there).
async fn archive(
    tx: &Client,
    statement: &Statement,
    events: &[tripwire_dataflow::Transaction],
) -> Result<u64, tokio_postgres::Error> {
    if events.is_empty() {
        return Ok(0);
    }
    let col = |f: &dyn Fn(&tripwire_dataflow::Transaction) -> i64| -> Vec<i64> {
        events.iter().map(f).collect()
    };
    let text = |f: &dyn Fn(&tripwire_dataflow::Transaction) -> &[u8]| -> Vec<&str> {
        events.iter().map(|x| std::str::from_utf8(f(x)).unwrap_or("?")).collect()
    };
    let channels: Vec<&str> = events
        .iter()
        .map(|x| match x.channel {
            Channel::Pos => "POS",
            Channel::Ecom => "ECOM",
            Channel::Atm => "ATM",
        })
        .collect();
    let devices: Vec<Option<i64>> = events.iter().map(|x| x.device_id.map(|d| d as i64)).collect();
    tx.execute(
        statement,
        &[
            &col(&|x| x.event_id as i64),
            &col(&|x| x.card_id as i64),
            &col(&|x| x.account_id as i64),
            &col(&|x| x.merchant_id as i64),
            &col(&|x| i64::from(x.mcc)),
            &col(&|x| x.amount_minor),
            &text(&|x| &x.currency),
            &text(&|x| &x.country),
            &col(&|x| i64::from(x.lat_e6)),
            &col(&|x| i64::from(x.lon_e6)),
            &channels,
            &col(&|x| x.event_time_ms as i64),
            &devices,
        ],
    )
    .await
}

#[cfg(test)]
mod tests {
    //! Against the stack's PostgreSQL (`./tripwire stack up`), in a schema of its own.

    use super::*;
    use crate::Endpoints;

    fn stats(count: i64) -> CardStats {
        let s = tripwire_dataflow::WindowStats {
            count,
            sum: 100 * count,
            max_amount: 100,
            distinct_merchants: 1,
            distinct_countries: 1,
        };
        CardStats::new([(60_000, s)])
    }

    /// A restarted group replays from the least frontier of all workers, so a
    /// worker that had committed further re-sends batches its store already
    /// holds. Applied again, an old upsert would bring back a window that a
    /// later batch deleted, and nothing would ever delete it again.
    #[test]
    fn a_batch_the_workers_checkpoint_covers_is_not_applied_again() {
        in_fresh_schema("covered", |mut store, mut conn| async move {
            let key = 7;
            let upsert = |frontier, as_of| Batch {
                frontier,
                upserts: vec![(key, stats(1), as_of)],
                ..Batch::default()
            };
            store.commit(&mut conn, &upsert(100, 50)).await.unwrap();
            let delete = Batch { frontier: 200, deletes: vec![(key, 150)], ..Batch::default() };
            store.commit(&mut conn, &delete).await.unwrap();
            assert_eq!(rows(&conn.client).await, vec![], "deleted at 150");

            // The replay re-sends the first batch, with a frontier of its own below 200.
            store.commit(&mut conn, &upsert(120, 50)).await.unwrap();
            assert_eq!(rows(&conn.client).await, vec![], "the window stays deleted");
            assert_eq!(checkpoint(&conn.client).await, 200);

            // A batch beyond the checkpoint is applied, with the changes below it it carries.
            store.commit(&mut conn, &upsert(300, 250)).await.unwrap();
            assert_eq!(rows(&conn.client).await, vec![(1, 250)]);
            assert_eq!(checkpoint(&conn.client).await, 300);
        });
    }

    /// A batch that starts where the sink's last commit left the checkpoint
    /// goes in one round trip. When the checkpoint has moved meanwhile (here
    /// by hand: another run of the job), that transaction rolls back and the
    /// batch commits again the way that reads the checkpoint first: applied
    /// when it is still beyond the checkpoint, not applied when the
    /// checkpoint covers it.
    #[test]
    fn a_commit_that_finds_the_checkpoint_moved_commits_again_from_where_it_is() {
        in_fresh_schema("moved", |mut store, mut conn| async move {
            let card = |key, start, frontier| Batch {
                start,
                frontier,
                upserts: vec![(key, stats(1), start + 1)],
                ..Batch::default()
            };
            // The first commit reads the checkpoint (none yet); the next one,
            // starting where it left it, goes in one round trip.
            store.commit(&mut conn, &card(1, 0, 100)).await.unwrap();
            assert_eq!((store.left_at, store.one_trips), (Some(100), 0));
            store.commit(&mut conn, &card(2, 100, 200)).await.unwrap();
            assert_eq!((store.left_at, store.one_trips), (Some(200), 1));
            assert_eq!(checkpoint(&conn.client).await, 200);

            // Moved to 250, below this batch's end: applied, on the second try.
            move_checkpoint(&conn.client, 250).await;
            store.commit(&mut conn, &card(3, 200, 300)).await.unwrap();
            assert_eq!((store.left_at, store.one_trips), (Some(300), 1));
            assert_eq!(checkpoint(&conn.client).await, 300);
            assert_eq!(card_ids(&conn.client).await, vec![1, 2, 3]);

            // Moved to 500, beyond this batch: it is covered, so not applied.
            move_checkpoint(&conn.client, 500).await;
            store.commit(&mut conn, &card(4, 300, 400)).await.unwrap();
            assert_eq!((store.left_at, store.one_trips), (None, 1));
            assert_eq!(checkpoint(&conn.client).await, 500);
            assert_eq!(card_ids(&conn.client).await, vec![1, 2, 3]);

            // Reading the checkpoint again, the sink does not expect it anywhere:
            // the next commit reads it; the one after goes in one round trip.
            store.commit(&mut conn, &card(5, 500, 600)).await.unwrap();
            store.commit(&mut conn, &card(6, 600, 700)).await.unwrap();
            assert_eq!((store.left_at, store.one_trips), (Some(700), 2));
            assert_eq!(card_ids(&conn.client).await, vec![1, 2, 3, 5, 6]);
        });
    }

    /// Small batches go in as parameters, large ones by `COPY`: either way
    /// each card's row holds its non-empty windows, in order, and a later
    /// batch replaces an earlier one's row.
    #[test]
    fn small_and_large_batches_store_every_cards_windows() {
        let windows = [60_000, 300_000, 3_600_000];
        // Card c: windows whose index divides c + 1 are non-empty, with values from c.
        let card = |c: u64, round: i64| {
            CardStats::new(windows.iter().enumerate().map(|(i, &w)| {
                let count =
                    if (c + 1).is_multiple_of(i as u64 + 1) { (c as i64 % 7) + round } else { 0 };
                let s = tripwire_dataflow::WindowStats {
                    count,
                    sum: count * (c as i64 + 3),
                    max_amount: c as i64 + i as i64,
                    distinct_merchants: count.min(3),
                    distinct_countries: count.min(2),
                };
                (w, if count == 0 { tripwire_dataflow::WindowStats::default() } else { s })
            }))
        };
        let large = COPY_FROM_CARDS as u64 + 200;
        in_fresh_schema("paths", |mut store, mut conn| async move {
            // Round 1 in small batches of 100 cards, round 2 in one large batch.
            for (frontier, chunk) in (0..large).collect::<Vec<_>>().chunks(100).enumerate() {
                let upserts = chunk.iter().map(|&c| (c, card(c, 1), 10)).collect();
                let b = Batch { frontier: 20 + frontier as Time, upserts, ..Batch::default() };
                store.commit(&mut conn, &b).await.unwrap();
            }
            assert_eq!(stored(&conn.client).await, expected(large, 1, &card, &windows));
            let upserts = (0..large).map(|c| (c, card(c, 2), 100)).collect();
            store
                .commit(&mut conn, &Batch { frontier: 200, upserts, ..Batch::default() })
                .await
                .unwrap();
            assert_eq!(stored(&conn.client).await, expected(large, 2, &card, &windows));
        });
    }

    /// On either path, a card's row is replaced only by a later one: a batch
    /// carrying an earlier `as_of` for a card (a replay beside a run that
    /// wrote further) leaves that row as it is, and still updates and
    /// inserts the batch's other cards.
    #[test]
    fn a_later_row_is_never_replaced_by_an_earlier_one_on_either_path() {
        for (name, cards) in [("guard_small", 3), ("guard_large", COPY_FROM_CARDS as u64 + 3)] {
            in_fresh_schema(name, |mut store, mut conn| async move {
                // Card 0 stored at 500 by a run ahead, card 1 at 100; the others absent.
                for (card, count, as_of) in [(0i64, 9i64, 500i64), (1, 1, 100)] {
                    conn.client
                        .execute(
                            "INSERT INTO card_stats
                             VALUES ($1, ARRAY[[60000, $2::bigint, 100 * $2::bigint, 100, 1, 1]], $3)",
                            &[&card, &count, &as_of],
                        )
                        .await
                        .unwrap();
                }
                let upserts = (0..cards).map(|c| (c, stats(2), 300)).collect();
                let b = Batch { frontier: 400, upserts, ..Batch::default() };
                store.commit(&mut conn, &b).await.unwrap();
                let got: Vec<(i64, i64, i64)> = conn
                    .client
                    .query("SELECT card_id, count, as_of FROM window_stats ORDER BY card_id", &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect();
                let mut want = vec![(0, 9, 500)];
                want.extend((1..cards as i64).map(|c| (c, 2, 300)));
                assert_eq!(got, want, "{name}");
            });
        }
    }

    /// A batch's cards new to the store go straight into `card_stats`
    /// (copied in a large batch, as parameters in a small one), beside the
    /// upsert of the others; when one of them has a row after all (one this
    /// run did not write), the commit fails on the key's uniqueness, and its
    /// retry upserts every card, under the guard.
    #[test]
    fn new_cards_are_inserted_and_one_that_was_not_new_fails_over_to_the_upsert() {
        // Many cards: every batch copied in; few: every batch as parameters.
        for (name, cards) in
            [("new_cards_large", COPY_FROM_CARDS as u64 + 200), ("new_cards_small", 40)]
        {
            new_cards(name, cards);
        }
    }

    fn new_cards(name: &str, cards: u64) {
        let row = |card: u64, count: i64| -> Row {
            (card as i64, vec![60_000], vec![count], vec![100 * count], vec![100], vec![1], vec![1])
        };
        in_fresh_schema(name, |mut store, mut conn| async move {
            // The first commit leaves the checkpoint that later batches start from.
            let first = Batch { frontier: 100, ..Batch::default() };
            store.commit(&mut conn, &first).await.unwrap();
            // The first `cards` cards, all new.
            let b = Batch {
                start: 100,
                frontier: 200,
                upserts: (0..cards).map(|c| (c, stats(1), 150)).collect(),
                absent_before: (0..cards).collect(),
                ..Batch::default()
            };
            store.commit(&mut conn, &b).await.unwrap();
            assert!(store.insert_new_cards, "no card had a row");
            let want: Vec<Row> = (0..cards).map(|c| row(c, 1)).collect();
            assert_eq!(stored(&conn.client).await, want);
            // Those again, changed, beside new ones (every other card up to 2 * cards).
            let new: Vec<u64> = (cards..2 * cards).step_by(2).collect();
            let b = Batch {
                start: 200,
                frontier: 300,
                upserts: (0..cards)
                    .chain(new.iter().copied())
                    .map(|c| (c, stats(2), 250))
                    .collect(),
                absent_before: new.clone(),
                ..Batch::default()
            };
            store.commit(&mut conn, &b).await.unwrap();
            assert!(store.insert_new_cards);
            let mut want: Vec<Row> =
                (0..cards).chain(new.iter().copied()).map(|c| row(c, 2)).collect();
            assert_eq!(stored(&conn.client).await, want);
            // A card taken for new has a row this run did not write.
            let odd = 2 * cards + 1;
            conn.client
                .execute(
                    "INSERT INTO card_stats VALUES ($1, '{{60000, 9, 900, 100, 1, 1}}', 280)",
                    &[&(odd as i64)],
                )
                .await
                .unwrap();
            let b = Batch {
                start: 300,
                frontier: 400,
                upserts: (2 * cards..3 * cards).map(|c| (c, stats(3), 350)).collect(),
                absent_before: (2 * cards..3 * cards).collect(),
                ..Batch::default()
            };
            let failed = store.commit(&mut conn, &b).await.expect_err("the card's key is taken");
            assert!(failed.contains("23505"), "{failed}");
            assert!(!store.insert_new_cards, "turned off after the conflict");
            // As the committer does after a failure: a new connection.
            conn = store.connect().await.unwrap();
            assert_eq!(checkpoint(&conn.client).await, 300, "nothing of the batch stored");
            store.commit(&mut conn, &b).await.unwrap();
            assert_eq!(checkpoint(&conn.client).await, 400);
            want.extend((2 * cards..3 * cards).map(|c| row(c, 3)));
            want.sort();
            assert_eq!(
                stored(&conn.client).await,
                want,
                "the card's row replaced by the later one"
            );
        });
    }

    type Row = (i64, Vec<i64>, Vec<i64>, Vec<i64>, Vec<i64>, Vec<i64>, Vec<i64>);

    /// What the test gave, row by row, as plain loops over its windows.
    fn expected(
        cards: u64,
        round: i64,
        card: &dyn Fn(u64, i64) -> CardStats,
        windows: &[Time],
    ) -> Vec<Row> {
        (0..cards)
            .map(|c| {
                let stats = card(c, round);
                let mut row: Row = (c as i64, vec![], vec![], vec![], vec![], vec![], vec![]);
                for (w, s) in windows.iter().zip(stats.windows()) {
                    assert_eq!(*w, s.0);
                    if s.1.count > 0 {
                        row.1.push(*w as i64);
                        row.2.push(s.1.count);
                        row.3.push(s.1.sum);
                        row.4.push(s.1.max_amount);
                        row.5.push(s.1.distinct_merchants);
                        row.6.push(s.1.distinct_countries);
                    }
                }
                row
            })
            .collect()
    }

    /// Every card's windows as analysts read them (`window_stats`), by card.
    async fn stored(c: &Client) -> Vec<Row> {
        let q = "SELECT card_id, array_agg(window_ms ORDER BY window_ms),
                        array_agg(count ORDER BY window_ms), array_agg(sum_minor ORDER BY window_ms),
                        array_agg(max_amount_minor ORDER BY window_ms),
                        array_agg(distinct_merchants ORDER BY window_ms),
                        array_agg(distinct_countries ORDER BY window_ms)
                 FROM window_stats GROUP BY card_id ORDER BY card_id";
        c.query(q, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6)))
            .collect()
    }

    /// Run `test` with a sink connected to a schema of its own, dropped after.
    fn in_fresh_schema<F, Fut>(name: &str, test: F)
    where
        F: FnOnce(Postgres, PgConn) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let endpoints = Endpoints::from_env().unwrap();
        let admin = endpoints.postgres_config();
        let schema = format!(
            "pgsink_{name}_{}_{}",
            std::process::id(),
            SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
        );
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let admin_client = connect_plain(&admin).await;
            admin_client.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
            let conninfo = format!("{admin} options='-c search_path={schema}'");
            let mut store = Postgres::new(unit_config(conninfo.clone()), 0);
            let conn = store.connect().await.unwrap();
            test(store, conn).await;
            admin_client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
        });
    }

    /// A rescale waits until every session of the job's earlier run has
    /// ended, and fits the checkpoints to what the last commit of such a
    /// session left: PostgreSQL carries out a commit that a killed process
    /// sent before it died. Fitted to what was there before that commit
    /// landed, the new workers took its rows for their own, and left some of
    /// them stale for good (the kill-and-rescale test found this).
    #[test]
    fn a_rescale_waits_for_a_commit_an_earlier_run_left_in_flight() {
        in_fresh_schema("fence", |store, conn| async move {
            let mut fitter = connect_plain(&store.config.conninfo).await;
            let job = store.config.job.clone();
            // The earlier run: one worker, at 100.
            let c = &conn.client;
            let first = "INSERT INTO checkpoints (job, worker, frontier) VALUES ($1, 0, 100)";
            c.execute(first, &[&job]).await.unwrap();
            // Its last commit, under way in its sink's session: on to 500.
            c.batch_execute("BEGIN").await.unwrap();
            c.execute("SELECT advance_checkpoint($1, 0, 100, 500)", &[&job]).await.unwrap();
            let rescale = {
                let job = job.clone();
                tokio::spawn(async move {
                    crate::postgres::fit_checkpoints(&mut fitter, &job, 2).await.map(|()| fitter)
                })
            };
            tokio::pin!(rescale);
            let early = tokio::time::timeout(Duration::from_millis(300), &mut rescale).await;
            assert!(early.is_err(), "the rescale went on while the earlier run's commit ran");
            c.batch_execute("COMMIT").await.unwrap();
            drop(conn);
            let fitter = rescale.await.unwrap().expect("the rescale, once the session ended");
            let rows: Vec<(i32, i64)> = fitter
                .query(
                    "SELECT worker, frontier FROM checkpoints WHERE job = $1 ORDER BY 1",
                    &[&job],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            assert_eq!(
                rows,
                vec![(0, 500), (1, 500)],
                "both workers start where the commit left it"
            );
            let high = crate::postgres::high_water(&fitter, &job).await.unwrap();
            assert_eq!(high, 500, "rows up to the commit's frontier may be another run's");
        });
    }

    /// The unit tests' sink configuration: commits at once, nothing from a source.
    fn unit_config(conninfo: String) -> PgSinkConfig {
        PgSinkConfig {
            conninfo,
            job: "unit".into(),
            commit_interval: Duration::ZERO,
            catch_up_interval: Duration::ZERO,
            progress: None,
            progress_settled: None,
            late: None,
            resume_from: 0,
            report_to: None,
            produce_times: None,
            decisions: None,
            topic: "unit".into(),
            end: None,
            synchronous_commit: false,
            high_water: 0,
            bulk_writers: None,
        }
    }

    /// A bounded run's last commit (its batch reaches the input's end) waits
    /// until the dead-letter sink has confirmed every restart point; any
    /// other commit does not wait.
    #[test]
    fn a_bounded_runs_last_commit_waits_for_its_restart_points() {
        let end = InputEnd::default();
        end.set(100);
        let settled = Arc::new(AtomicBool::new(false));
        let config = PgSinkConfig {
            progress_settled: Some(settled.clone()),
            end: Some(end),
            ..unit_config(String::new())
        };
        let (before, last) = (
            Batch { frontier: 50, ..Batch::default() },
            Batch { frontier: 100, ..Batch::default() },
        );
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let wait = Duration::from_secs(10);
            tokio::time::timeout(wait, settle(&config, 0, &before))
                .await
                .expect("no wait before the end");
            let mut settling = Box::pin(settle(&config, 0, &last));
            let early = tokio::time::timeout(Duration::from_millis(100), &mut settling).await;
            assert!(
                early.is_err(),
                "the last commit went on before its restart points were confirmed"
            );
            settled.store(true, Ordering::Release);
            tokio::time::timeout(wait, settling).await.expect("it goes on once they are");
        });
    }

    /// While one worker's large batch commits, another worker's large batch
    /// waits for its turn and a small one does not; without a limit nothing
    /// waits.
    #[test]
    fn large_batches_take_turns_and_small_ones_never_wait() {
        use futures_util::FutureExt;
        let config = PgSinkConfig {
            bulk_writers: Some(Arc::new(tokio::sync::Semaphore::new(1))),
            ..unit_config(String::new())
        };
        let cards = |n: u64| Batch {
            upserts: (0..n).map(|c| (c, stats(1), 1)).collect(),
            ..Batch::default()
        };
        let (large, small) = (cards(COPY_FROM_CARDS as u64), cards(COPY_FROM_CARDS as u64 - 1));
        let first = bulk_turn(&config, &large).now_or_never().expect("a free turn");
        assert!(first.is_some(), "a large batch takes a turn");
        assert!(
            bulk_turn(&config, &large).now_or_never().is_none(),
            "a second large batch went on while the first one committed"
        );
        let beside = bulk_turn(&config, &small).now_or_never().expect("a small batch never waits");
        assert!(beside.is_none(), "a small batch needs no turn");
        drop(first);
        assert!(
            bulk_turn(&config, &large).now_or_never().is_some(),
            "its turn once the first ends"
        );
        let unlimited = unit_config(String::new());
        let free = bulk_turn(&unlimited, &large).now_or_never().expect("no limit, no wait");
        assert!(free.is_none());
    }

    async fn rows(c: &Client) -> Vec<(i64, i64)> {
        let q = "SELECT count, as_of FROM window_stats WHERE card_id = 7";
        c.query(q, &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    async fn card_ids(c: &Client) -> Vec<i64> {
        let q = "SELECT card_id FROM card_stats ORDER BY card_id";
        c.query(q, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
    }

    /// Where worker 0's checkpoint is, set by hand (another run of the job).
    async fn move_checkpoint(c: &Client, to: i64) {
        let q = "UPDATE checkpoints SET frontier = $1 WHERE worker = 0";
        assert_eq!(c.execute(q, &[&to]).await.unwrap(), 1);
    }

    async fn checkpoint(c: &Client) -> i64 {
        let q = "SELECT frontier FROM checkpoints WHERE worker = 0";
        c.query_one(q, &[]).await.unwrap().get(0)
    }

    async fn connect_plain(conninfo: &str) -> Client {
        let (c, conn) = tokio_postgres::connect(conninfo, NoTls)
            .await
            .expect("connect; is the stack up? (./tripwire stack up)");
        tokio::spawn(conn);
        c
    }
}
