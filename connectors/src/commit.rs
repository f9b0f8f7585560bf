//! Frontier-driven commits: the operator every sink shares, and the committer thread behind it.
//!
//! When a worker's input frontier passes `t`, everything below `t` is final:
//! the operator consolidates those updates into one [`Batch`] (per card and
//! window the latest row, or its deletion; new alerts) and hands it to a
//! committer thread of the sink's own, which writes it, with the worker's
//! checkpoint, atomically. The database work never runs on the timely worker;
//! batches travel through a bounded channel, and a full channel only means
//! the worker keeps buffering. A failed commit is retried with exponential
//! backoff until it succeeds, so batches land in frontier order, each once.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use tripwire_dataflow::{Alert, CardWindow, Diff, Time, WindowStats};

/// What one commit writes: every change below `frontier`, consolidated.
#[derive(Debug, Default)]
pub struct Batch {
    /// Everything at a time below this is in the batch (or was in an earlier one).
    pub frontier: Time,
    /// Rows to write: card and window, the current statistics, and the time they changed.
    pub upserts: Vec<(CardWindow, WindowStats, Time)>,
    /// Windows that emptied, with the time they did.
    pub deletes: Vec<(CardWindow, Time)>,
    /// New alerts, each with the (timely) time it belongs to.
    pub alerts: Vec<(Alert, Time)>,
}

/// The sink's view of its progress: the frontier below which everything is committed.
#[derive(Clone, Debug, Default)]
pub struct Committed(Arc<AtomicU64>);

impl Committed {
    /// Every output at a time below this is in the sink's store.
    pub fn frontier(&self) -> Time {
        self.0.load(Ordering::Acquire)
    }
}

/// A store a committer thread writes batches to.
pub trait Store: Send + 'static {
    /// A live connection.
    type Conn;
    /// Connect (and prepare: migrations, scripts).
    fn connect(&mut self) -> impl Future<Output = Result<Self::Conn, String>>;
    /// Write `batch` and the worker's checkpoint atomically; idempotent on replay.
    fn commit(
        &mut self,
        conn: &mut Self::Conn,
        batch: &Batch,
    ) -> impl Future<Output = Result<(), String>>;
}

/// Run the frontier-driven commit operator named `name` for this worker, writing to `store`.
///
/// `resume_from` is the frontier an earlier run committed (0 for a first run).
/// A replay recomputes the outputs below it from partial windows; they are
/// consolidated into a batch of their own, ending exactly at `resume_from`,
/// and dropped. Without that boundary a row inserted before `resume_from` and
/// deleted after it would cancel out inside one batch, and the earlier run's
/// row would never be deleted.
pub fn frontier_sink<'s, S: Store>(
    name: &str,
    stats: VecCollection<'s, Time, (CardWindow, WindowStats), Diff>,
    alerts: VecCollection<'s, Time, Alert, Diff>,
    commit_interval: Duration,
    resume_from: Time,
    store: S,
) -> Committed {
    let scope = stats.inner.scope();
    let worker = scope.index();
    let committed = Committed::default();
    let (tx, rx) = sync_channel::<Batch>(4);
    let thread = spawn_committer(name, store, worker, rx, committed.clone());

    let mut builder = OperatorBuilder::new(name.to_owned(), scope);
    let activator = scope.activator_for(builder.operator_info().address);
    let mut stats_in = builder.new_input(stats.inner, Pipeline);
    let mut alerts_in = builder.new_input(alerts.inner, Pipeline);
    let interval = commit_interval;
    let name = name.to_owned();

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
            if sent < resume_from && frontier >= resume_from {
                // The replayed past: consolidated up to the resume point, then dropped.
                drop(batch(resume_from, &mut pending_stats, &mut pending_alerts));
                sent = resume_from;
            }
            if held.is_none()
                && sent >= resume_from
                && frontier > sent
                && (done || last_sent.elapsed() >= interval)
            {
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
                        panic!("the committer of {name} on worker {worker} has stopped")
                    }
                }
            }
            if done && held.is_none() {
                // End of input: let the committer finish and wait for it, so that
                // a bounded run's results are stored when the dataflow ends.
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
    // A key the batch touched ends either with its one current row or with
    // none; "none" is written as a (guarded) delete even when the batch's own
    // changes cancel out (inserted and deleted within it), because the store
    // may hold a row this run did not write: one committed by an earlier run
    // beyond the resume point, or by another worker before a rescale.
    for (key, (values, as_of)) in keys {
        match values.iter().find(|(_, d)| **d > 0) {
            Some((v, _)) => b.upserts.push((key, *v, as_of)),
            None => b.deletes.push((key, as_of)),
        }
    }
    alerts.retain(|(a, t, d)| {
        if *t >= frontier {
            return true;
        }
        if *d > 0 {
            b.alerts.push((a.clone(), *t));
        }
        false
    });
    b
}

fn spawn_committer<S: Store>(
    name: &str,
    mut store: S,
    worker: usize,
    rx: Receiver<Batch>,
    committed: Committed,
) -> JoinHandle<()> {
    let name = name.to_owned();
    std::thread::Builder::new()
        .name(format!("{name}-{worker}"))
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let mut conn: Option<S::Conn> = None;
                let mut backoff = Duration::from_millis(100);
                for batch in rx {
                    loop {
                        if conn.is_none() {
                            match store.connect().await {
                                Ok(c) => conn = Some(c),
                                Err(e) => tracing::warn!(sink = %name, worker, error = %e, "connect failed; retrying"),
                            }
                        }
                        let result = match conn.as_mut() {
                            Some(c) => store.commit(c, &batch).await,
                            None => Err(String::new()),
                        };
                        match result {
                            Ok(()) => {
                                backoff = Duration::from_millis(100);
                                committed.0.store(batch.frontier, Ordering::Release);
                                tracing::debug!(sink = %name, worker, frontier = batch.frontier,
                                    upserts = batch.upserts.len(), deletes = batch.deletes.len(),
                                    alerts = batch.alerts.len(), "committed");
                                break;
                            }
                            Err(e) => {
                                if !e.is_empty() {
                                    tracing::warn!(sink = %name, worker, error = %e, "commit failed; retrying");
                                }
                                conn = None;
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
