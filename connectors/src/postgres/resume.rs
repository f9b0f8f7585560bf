//! Where a restarted job resumes: its committed frontier, and per partition the
//! recorded offset before which nothing it still needs lies.

use std::collections::HashMap;

use tokio_postgres::Client;
use tripwire_dataflow::Time;

use super::as_i64;
use crate::kafka_source::{Resume, SourceDecisions};

/// A restarted job's starting point.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumePoint {
    /// The least committed frontier over the job's sink workers.
    pub frontier: Time,
    /// Per partition, the offset to start at (absent: the beginning).
    pub start_offsets: HashMap<i32, i64>,
    /// What the source needs to reproduce the earlier run's decisions.
    pub resume: Resume,
}

/// The least frontier `job`'s PostgreSQL sink workers committed, `None` if they never did.
pub async fn committed_frontier(
    client: &Client,
    job: &str,
) -> Result<Option<Time>, tokio_postgres::Error> {
    let row =
        client.query_one("SELECT min(frontier) FROM checkpoints WHERE job = $1", &[&job]).await?;
    Ok(row.get::<_, Option<i64>>(0).map(|f| f as Time))
}

/// The greatest frontier any of `job`'s PostgreSQL sink workers ever stored,
/// including before a rescale fitted them (0 if none did): rows this run did
/// not write may lie below it.
pub async fn high_water(client: &Client, job: &str) -> Result<Time, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT GREATEST((SELECT max(frontier) FROM checkpoints WHERE job = $1),
                             (SELECT frontier FROM job_high_water WHERE job = $1))",
            &[&job],
        )
        .await?;
    Ok(row.get::<_, Option<i64>>(0).unwrap_or(0).max(0) as Time)
}

/// The advisory lock of `$1`'s sink sessions: each holds it shared while it
/// lives, and a rescale takes it exclusively (see [`fit_checkpoints`]).
pub(crate) const SINKS_LOCK: &str = "hashtextextended('tripwire sinks of ' || $1, 0)";

/// How long a rescale waits for an earlier run's sessions to end: longer
/// means another run of the job is still running.
const SINKS_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Make `job`'s checkpoints fit a run of `workers` sink workers, before it starts.
///
/// A worker's checkpoint speaks only for the keys that worker owned, and which
/// worker owns a key depends on how many there are. So a first run starts
/// every worker at 0 (a worker that never commits then holds the least
/// frontier at 0, as it should), and a run with another worker count (a
/// rescale) starts every worker at the least frontier of the last run, up to
/// which all keys are complete whoever owned them. One transaction, under a
/// lock, harmless to repeat: every process of a starting job calls it.
pub async fn fit_checkpoints(
    client: &mut Client,
    job: &str,
    workers: usize,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(7342002)", &[]).await?;
    let read = "SELECT worker, frontier FROM checkpoints WHERE job = $1";
    let rows = tx.query(read, &[&job]).await?;
    let mut present: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    present.sort_unstable();
    if present.iter().copied().eq(0..workers as i32) {
        return tx.commit().await;
    }
    // A rescale. A killed process's last commit may still be running in its
    // session (PostgreSQL carries out what was sent before the client died):
    // wait until every session of an earlier run has ended, then read the
    // checkpoints again. Otherwise such a commit lands after this read, with
    // rows beyond every frontier (and the high water) fitted here, which the
    // new workers take for rows of their own. No session of this run has
    // connected yet: every process fits before the dataflow starts.
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{}s'", SINKS_LOCK_WAIT.as_secs())).await?;
    tx.execute(&format!("SELECT pg_advisory_xact_lock({SINKS_LOCK})"), &[&job]).await?;
    let rows = tx.query(read, &[&job]).await?;
    let least: i64 = rows.iter().map(|r| r.get::<_, i64>(1)).min().unwrap_or(0);
    let greatest: i64 = rows.iter().map(|r| r.get::<_, i64>(1)).max().unwrap_or(0);
    tx.execute(
        "INSERT INTO job_high_water (job, frontier) VALUES ($1, $2)
         ON CONFLICT (job) DO UPDATE SET frontier = GREATEST(job_high_water.frontier, EXCLUDED.frontier)",
        &[&job, &greatest],
    )
    .await?;
    tx.execute("DELETE FROM checkpoints WHERE job = $1", &[&job]).await?;
    tx.execute(
        "INSERT INTO checkpoints (job, worker, frontier)
         SELECT $1, w, $2 FROM generate_series(0, $3 - 1) AS w",
        &[&job, &least, &(workers as i32)],
    )
    .await?;
    tracing::info!(job, workers, previous = ?present, frontier = least, "checkpoints fitted to the worker count");
    tx.commit().await
}

/// Where `job` resumes reading `topic` so that every output at a time `>= frontier` is recomputed.
///
/// Those outputs depend only on events at or after `frontier - longest - tick`
/// (`skip_below`), and whether such an event is a duplicate only on events at
/// most `dedup_horizon` before it; each partition restarts at the latest
/// sample whose largest earlier event time lies below `skip_below -
/// dedup_horizon` (or at its beginning), with the partition's watermark basis
/// there, and from `decisions` (what the stores recorded) every floor recorded
/// for it and how far an earlier run had read.
pub async fn resume_point(
    client: &Client,
    job: &str,
    topic: &str,
    frontier: Time,
    (longest, tick, dedup_horizon): (Time, Time, Time),
    decisions: &SourceDecisions,
) -> Result<ResumePoint, tokio_postgres::Error> {
    let skip_below = frontier.saturating_sub(longest.saturating_add(tick.max(1)));
    let read_from = skip_below.saturating_sub(dedup_horizon);
    let rows = client
        .query(
            "SELECT DISTINCT ON (partition) partition, \"offset\", max_event_time,
                    coalesce(basis, max_event_time), coalesce(top, max_event_time)
             FROM source_progress
             WHERE job = $1 AND topic = $2 AND max_event_time < $3
             ORDER BY partition, \"offset\" DESC",
            &[&job, &topic, &as_i64(read_from)],
        )
        .await?;
    let mut point = ResumePoint { frontier, ..ResumePoint::default() };
    point.resume.skip_below = skip_below;
    for r in rows {
        let partition: i32 = r.get(0);
        point.start_offsets.insert(partition, r.get(1));
        let restored = point.resume.partitions.entry(partition).or_default();
        restored.max_event = Some(r.get::<_, i64>(2) as Time);
        // A basis of 0 is a sample taken after a single record: none yet.
        restored.basis = Some(r.get::<_, i64>(3) as Time).filter(|b| *b > 0);
        restored.top = Some(r.get::<_, i64>(4) as Time);
    }
    for (&(partition, offset), &floor) in &decisions.floors {
        point.resume.partitions.entry(partition).or_default().floors.push((offset, floor));
    }
    for (&partition, &offset) in &decisions.positions {
        point.resume.partitions.entry(partition).or_default().replay_until = offset;
    }
    Ok(point)
}

/// The source decisions `job`'s PostgreSQL commits recorded about `topic`.
pub async fn recorded_decisions(
    client: &Client,
    job: &str,
    topic: &str,
) -> Result<SourceDecisions, tokio_postgres::Error> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&job, &topic];
    let (floors, positions) = tokio::try_join!(
        client.query(
            "SELECT partition, \"offset\", floor FROM source_floors WHERE job = $1 AND topic = $2",
            &params,
        ),
        client.query(
            "SELECT partition, \"offset\" FROM source_positions WHERE job = $1 AND topic = $2",
            &params,
        ),
    )?;
    Ok(SourceDecisions {
        floors: floors.iter().map(|r| ((r.get(0), r.get(1)), r.get::<_, i64>(2) as Time)).collect(),
        positions: positions.iter().map(|r| (r.get(0), r.get(1))).collect(),
    })
}

/// Record `decisions` about `topic` for `job` (idempotent: the greater floor,
/// the further position). A starting job records here the union of what both
/// stores hold, so that each holds every decision the results depend on.
pub async fn record_decisions(
    client: &Client,
    job: &str,
    topic: &str,
    decisions: &SourceDecisions,
) -> Result<(), tokio_postgres::Error> {
    let ((p, o, f), (pp, po)) = super::sink::decision_columns(decisions);
    client.execute(super::sink::STORE_FLOORS, &[&job, &topic, &p, &o, &f]).await?;
    client.execute(super::sink::STORE_POSITIONS, &[&job, &topic, &pp, &po]).await?;
    Ok(())
}
