//! The PostgreSQL sink: when a worker's input frontier passes `t`, one
//! transaction writes the consolidated changes below `t` and the worker's
//! checkpoint `(job, worker, frontier)`.
//!
//! Writes are idempotent as well, so that a replay after a crash cannot double
//! anything: statistics are absolute values upserted under a version guard
//! (`as_of` only moves forward), emptied windows are deleted under the same
//! guard, alerts are inserted with `ON CONFLICT DO NOTHING` on their
//! deterministic id. All of it goes in bulk (`UNNEST` over arrays).
//!
//! The database work runs on a thread of its own (a current-thread tokio
//! runtime), never on the timely worker; batches reach it through a bounded
//! channel, and a full channel only means the worker keeps buffering.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use tokio_postgres::{Client, NoTls};
use tripwire_dataflow::{Alert, CardWindow, Diff, Time, WindowStats};

use super::migrate;

/// Where and how the sink commits.
#[derive(Clone, Debug)]
pub struct PgSinkConfig {
    /// tokio-postgres connection string.
    pub conninfo: String,
    /// The job's name in the checkpoints table.
    pub job: String,
    /// Commit at most this often (a batch also waits for the frontier to move).
    pub commit_interval: Duration,
}

/// What one transaction writes.
#[derive(Debug, Default)]
struct Batch {
    frontier: Time,
    upserts: Vec<(CardWindow, WindowStats, Time)>,
    deletes: Vec<(CardWindow, Time)>,
    alerts: Vec<Alert>,
}

/// The sink's view of its progress: the frontier below which everything is committed.
#[derive(Clone, Debug, Default)]
pub struct Committed(Arc<AtomicU64>);

impl Committed {
    /// Every output at a time below this is in PostgreSQL.
    pub fn frontier(&self) -> Time {
        self.0.load(Ordering::Acquire)
    }
}

/// Commit `stats` and `alerts` of this worker to PostgreSQL, exactly once per frontier.
pub fn pg_sink<'s>(
    stats: VecCollection<'s, Time, (CardWindow, WindowStats), Diff>,
    alerts: VecCollection<'s, Time, Alert, Diff>,
    config: &PgSinkConfig,
) -> Committed {
    let scope = stats.inner.scope();
    let worker = scope.index();
    let committed = Committed::default();
    let (tx, rx) = sync_channel::<Batch>(4);
    let thread = spawn_committer(config.clone(), worker, rx, committed.clone());

    let mut builder = OperatorBuilder::new("PgSink".to_owned(), scope);
    let activator = scope.activator_for(builder.operator_info().address);
    let mut stats_in = builder.new_input(stats.inner, Pipeline);
    let mut alerts_in = builder.new_input(alerts.inner, Pipeline);
    let interval = config.commit_interval;

    builder.build(move |_caps| {
        let mut pending_stats: Vec<((CardWindow, WindowStats), Time, Diff)> = Vec::new();
        let mut pending_alerts: Vec<(Alert, Time, Diff)> = Vec::new();
        let mut sent: Time = 0;
        let mut last_sent = Instant::now() - interval;
        let mut held: Option<Batch> = None;
        let mut tx = Some(tx);
        let mut thread = Some(thread);
        move |frontiers| {
            stats_in.for_each(|_cap, data| pending_stats.append(data));
            alerts_in.for_each(|_cap, data| pending_alerts.append(data));
            // Everything below the least input frontier is final; an empty frontier means all of it.
            let frontier = frontiers
                .iter()
                .map(|f| f.frontier().iter().min().copied().unwrap_or(Time::MAX))
                .min()
                .unwrap_or(Time::MAX);
            let done = frontier == Time::MAX;
            if held.is_none() && frontier > sent && (done || last_sent.elapsed() >= interval) {
                held = Some(batch(frontier, &mut pending_stats, &mut pending_alerts));
            }
            if let Some(b) = held.take() {
                let f = b.frontier;
                match tx.as_ref().map(|tx| tx.try_send(b)) {
                    Some(Ok(())) => {
                        sent = f;
                        last_sent = Instant::now();
                    }
                    Some(Err(TrySendError::Full(b))) => held = Some(b),
                    Some(Err(TrySendError::Disconnected(_))) | None => {
                        panic!("the PostgreSQL committer of worker {worker} has stopped")
                    }
                }
            }
            if done && held.is_none() {
                // End of input: let the committer finish and wait for it, so that
                // a bounded run's results are in PostgreSQL when the dataflow ends.
                drop(tx.take());
                if let Some(t) = thread.take() {
                    t.join().expect("committer thread");
                }
            } else if held.is_some() || frontier > sent {
                // A batch waits for the channel or the commit interval; come back for it.
                activator.activate_after(Duration::from_millis(10));
            }
        }
    });
    committed
}

/// Take every update below `frontier` and consolidate it into one batch.
fn batch(
    frontier: Time,
    stats: &mut Vec<((CardWindow, WindowStats), Time, Diff)>,
    alerts: &mut Vec<(Alert, Time, Diff)>,
) -> Batch {
    // Per key: the net change of each value, and the latest time it changed.
    let mut keys: BTreeMap<CardWindow, (BTreeMap<WindowStats, Diff>, Time)> = BTreeMap::new();
    stats.retain(|((key, value), t, d)| {
        if *t >= frontier {
            return true;
        }
        let entry = keys.entry(*key).or_insert_with(|| (BTreeMap::new(), 0));
        *entry.0.entry(*value).or_default() += d;
        entry.1 = entry.1.max(*t);
        false
    });
    let mut b = Batch { frontier, ..Batch::default() };
    for (key, (values, as_of)) in keys {
        let mut now = values.iter().filter(|(_, d)| **d > 0).map(|(v, _)| *v);
        match now.next() {
            Some(v) => b.upserts.push((key, v, as_of)),
            None if values.values().any(|d| *d < 0) => b.deletes.push((key, as_of)),
            None => {}
        }
    }
    alerts.retain(|(a, t, d)| {
        if *t >= frontier {
            return true;
        }
        if *d > 0 {
            b.alerts.push(a.clone());
        }
        false
    });
    b
}

fn spawn_committer(
    config: PgSinkConfig,
    worker: usize,
    rx: Receiver<Batch>,
    committed: Committed,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("pg-sink-{worker}"))
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let mut client: Option<Client> = None;
                let mut backoff = Duration::from_millis(100);
                for batch in rx {
                    loop {
                        if client.is_none() {
                            client = connect(&config.conninfo).await.map_err(|e| {
                                tracing::warn!(worker, error = %e, "PostgreSQL connect failed; retrying");
                            }).ok();
                        }
                        let result = match client.as_mut() {
                            Some(c) => commit(c, &config.job, worker, &batch).await,
                            None => Err(None),
                        };
                        match result {
                            Ok(()) => {
                                backoff = Duration::from_millis(100);
                                committed.0.store(batch.frontier, Ordering::Release);
                                tracing::debug!(worker, frontier = batch.frontier,
                                    upserts = batch.upserts.len(), deletes = batch.deletes.len(),
                                    alerts = batch.alerts.len(), "committed");
                                break;
                            }
                            Err(e) => {
                                if let Some(e) = e {
                                    tracing::warn!(worker, error = %e, "PostgreSQL commit failed; retrying");
                                }
                                client = None;
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(5));
                            }
                        }
                    }
                }
            });
        })
        .expect("committer thread starts")
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

/// One transaction: the batch's changes and the worker's checkpoint.
async fn commit(
    client: &mut Client,
    job: &str,
    worker: usize,
    b: &Batch,
) -> Result<(), Option<tokio_postgres::Error>> {
    let as_i64 = |t: Time| t.min(i64::MAX as u64) as i64;
    let tx = client.transaction().await?;
    if !b.upserts.is_empty() {
        let col = |f: &dyn Fn(&(CardWindow, WindowStats, Time)) -> i64| -> Vec<i64> {
            b.upserts.iter().map(f).collect()
        };
        tx.execute(
            "INSERT INTO window_stats (card_id, window_ms, count, sum_minor, max_amount_minor,
                                       distinct_merchants, distinct_countries, as_of)
             SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                                  $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[])
             ON CONFLICT (card_id, window_ms) DO UPDATE SET
                 count = EXCLUDED.count, sum_minor = EXCLUDED.sum_minor,
                 max_amount_minor = EXCLUDED.max_amount_minor,
                 distinct_merchants = EXCLUDED.distinct_merchants,
                 distinct_countries = EXCLUDED.distinct_countries, as_of = EXCLUDED.as_of
             WHERE window_stats.as_of <= EXCLUDED.as_of",
            &[
                &col(&|u| u.0.card_id as i64),
                &col(&|u| u.0.window_ms as i64),
                &col(&|u| u.1.count),
                &col(&|u| u.1.sum),
                &col(&|u| u.1.max_amount),
                &col(&|u| u.1.distinct_merchants),
                &col(&|u| u.1.distinct_countries),
                &col(&|u| as_i64(u.2)),
            ],
        )
        .await?;
    }
    if !b.deletes.is_empty() {
        let cards: Vec<i64> = b.deletes.iter().map(|d| d.0.card_id as i64).collect();
        let windows: Vec<i64> = b.deletes.iter().map(|d| d.0.window_ms as i64).collect();
        let as_of: Vec<i64> = b.deletes.iter().map(|d| as_i64(d.1)).collect();
        tx.execute(
            "DELETE FROM window_stats w
             USING UNNEST($1::bigint[], $2::bigint[], $3::bigint[]) AS d(card_id, window_ms, as_of)
             WHERE w.card_id = d.card_id AND w.window_ms = d.window_ms AND w.as_of <= d.as_of",
            &[&cards, &windows, &as_of],
        )
        .await?;
    }
    if !b.alerts.is_empty() {
        let ids: Vec<i64> = b.alerts.iter().map(|a| a.id as i64).collect();
        let cards: Vec<i64> = b.alerts.iter().map(|a| a.card_id as i64).collect();
        let rules: Vec<&str> = b.alerts.iter().map(|a| a.rule.name()).collect();
        let triggers: Vec<i64> = b.alerts.iter().map(|a| a.trigger_event as i64).collect();
        let times: Vec<i64> = b.alerts.iter().map(|a| as_i64(a.event_time_ms)).collect();
        let details: Vec<String> = b
            .alerts
            .iter()
            .map(|a| serde_json::to_string(&a.details).expect("details serialize"))
            .collect();
        tx.execute(
            "INSERT INTO alerts (alert_id, card_id, rule, trigger_event, event_time, details)
             SELECT a, c, r, t, to_timestamp(e / 1000.0), d::jsonb
             FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::text[])
                  AS x(a, c, r, t, e, d)
             ON CONFLICT (alert_id) DO NOTHING",
            &[&ids, &cards, &rules, &triggers, &times, &details],
        )
        .await?;
    }
    tx.execute(
        "INSERT INTO checkpoints (job, worker, frontier) VALUES ($1, $2, $3)
         ON CONFLICT (job, worker) DO UPDATE
             SET frontier = GREATEST(checkpoints.frontier, EXCLUDED.frontier), updated_at = now()",
        &[&job, &(worker as i32), &as_i64(b.frontier)],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
