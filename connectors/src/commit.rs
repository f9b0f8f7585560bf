//! Frontier-driven commits: the operator every sink shares, and the committer thread behind it.
//!
//! When a worker's input frontier passes `t`, everything below `t` is final:
//! the operator consolidates those updates into one [`Batch`] (per card
//! the latest row, or its deletion; new alerts; archived events) and
//! hands it to a committer thread of the sink's own, which writes it, with the
//! worker's checkpoint, atomically. The database work never runs on the timely
//! worker; a batch is handed over through a one-batch mailbox, which a free
//! committer empties the moment a batch is posted.
//!
//! - **A store that falls behind** (busy, slow, down): while the committer is
//!   busy the operator folds each new batch into the one it holds
//!   ([`Batch::absorb`]), so what waits is one batch whose statistics are
//!   bounded by the number of keys, not by the length of the outage, and a
//!   loaded store gets fewer, better consolidated batches. Only alerts and
//!   archived events grow with the input; the PostgreSQL sink reports its
//!   commits to the source, which pauses when too much is uncommitted
//!   (backpressure, see `kafka_source`).
//! - **Catching up**: while results are more than a minute behind the wall
//!   clock, commits wait at least [`CommitOptions::catch_up_interval`].
//!   Statistics from this worker's window operator ([`SinkInputs::coalesce`])
//!   then come coalesced per epoch: the operator asks for the open epoch to
//!   close when a batch is due and that epoch holds the frontier, and cuts
//!   no batch inside a closed one
//!   (see `tripwire_dataflow::coalesce`).
//! - **Failures** are retried with exponential backoff behind a circuit
//!   breaker ([`Breaker`]): after a few failures in a row it opens, commits
//!   wait out a cool-down, one probe (half-open) decides whether it closes.
//!   Its state is logged on every change and kept in the metric
//!   `tripwire_sink_breaker_state{sink,worker}`. Batches land in frontier
//!   order, each once.

use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use tripwire_dataflow::{Alert, CardChange, CardStats, Coalesce, Diff, Time, Transaction};

use crate::metrics;

/// What one commit writes: every change below `frontier`, consolidated.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Everything at a time below this is in the batch (or was in an earlier one).
    pub frontier: Time,
    /// Rows to write: card, its current statistics, and the time they changed; by card.
    pub upserts: Vec<(u64, CardStats, Time)>,
    /// Cards whose every window emptied, with the time they did; by card.
    pub deletes: Vec<(u64, Time)>,
    /// The frontier of the batch before this one: what the store holds when
    /// this batch begins, if nothing but this run wrote to it.
    pub start: Time,
    /// The cards among `upserts` and `deletes` that had no row at `start`, as
    /// this run's dataflow knows it, ascending. A delete of one of them is a
    /// card that came and went within the batch: nothing to delete, unless
    /// the store holds a row this run did not write (see [`Batch::passing`]).
    pub absent_before: Vec<u64>,
    /// New alerts, each with the (timely) time it belongs to.
    pub alerts: Vec<(Alert, Time)>,
    /// Accepted events to archive (when the sink archives).
    pub archive: Vec<Transaction>,
}

impl Batch {
    /// Rows the batch writes.
    pub fn rows(&self) -> usize {
        self.upserts.len() + self.deletes.len() + self.alerts.len() + self.archive.len()
    }

    /// Fold `later` (the next batch) into this one: per key the later row or
    /// deletion wins (its changes are the more recent), alerts and archived
    /// events add up, and the frontier is the later one.
    pub fn absorb(&mut self, later: Batch) {
        // Both batches hold their cards in order: one merge, no map (a
        // B-tree here cost a tenth of the workers' time while a store lagged).
        // Per card: its last row (or none) and time, and whether it had no
        // row at the start of the earlier batch (a card the earlier batch did
        // not touch was at its end as at its start).
        let early = std::mem::take(self);
        let (mut e, mut l) = (early.by_card().peekable(), later.by_card().peekable());
        self.upserts.reserve(early.upserts.len().max(later.upserts.len()));
        loop {
            // Which batch the next card comes from: 0 the earlier, 1 the later, 2 both.
            let from = match (e.peek().map(|x| x.0), l.peek().map(|y| y.0)) {
                (None, None) => break,
                (Some(x), Some(y)) if x == y => 2,
                (Some(x), Some(y)) if x < y => 0,
                (Some(_), None) => 0,
                _ => 1,
            };
            let (row, absent) = match from {
                0 => {
                    let row = e.next().expect("peeked");
                    (row, early.passing(&row.0))
                }
                1 => {
                    let row = l.next().expect("peeked");
                    (row, later.passing(&row.0))
                }
                _ => {
                    let card = e.next().expect("peeked").0;
                    (l.next().expect("peeked"), early.passing(&card))
                }
            };
            let (card, stats, t) = row;
            match stats {
                Some(s) => self.upserts.push((card, *s, t)),
                None => self.deletes.push((card, t)),
            }
            if absent {
                self.absent_before.push(card);
            }
        }
        drop((e, l));
        self.start = early.start;
        self.frontier = early.frontier.max(later.frontier);
        self.alerts = early.alerts;
        self.alerts.extend(later.alerts);
        self.archive = early.archive;
        self.archive.extend(later.archive);
    }

    /// Its rows and deletions in card order: card, row (`None`: deleted), time.
    fn by_card(&self) -> impl Iterator<Item = (u64, Option<&CardStats>, Time)> + '_ {
        let mut upserts = self.upserts.iter().peekable();
        let mut deletes = self.deletes.iter().peekable();
        std::iter::from_fn(move || match (upserts.peek(), deletes.peek()) {
            (Some(u), Some(d)) if u.0 < d.0 => upserts.next().map(|(c, s, t)| (*c, Some(s), *t)),
            (Some(_), None) => upserts.next().map(|(c, s, t)| (*c, Some(s), *t)),
            _ => deletes.next().map(|(c, t)| (*c, None, *t)),
        })
    }

    /// A copy of it without its archived events.
    fn without_archive(&self) -> Batch {
        Batch {
            frontier: self.frontier,
            upserts: self.upserts.clone(),
            deletes: self.deletes.clone(),
            start: self.start,
            absent_before: self.absent_before.clone(),
            alerts: self.alerts.clone(),
            archive: Vec::new(),
        }
    }

    /// Whether it changes nothing in a store but its frontier.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.deletes.is_empty()
            && self.alerts.is_empty()
            && self.archive.is_empty()
    }

    /// Whether the delete of `key` is of a card that came and went within
    /// the batch (no row at its start, none at its end).
    pub fn passing(&self, key: &u64) -> bool {
        self.absent_before.binary_search(key).is_ok()
    }
}

/// A sink's progress, shared with whoever needs it (the source, for backpressure; tests).
#[derive(Clone, Debug, Default)]
pub struct Committed(Arc<Marks>);

#[derive(Default)]
struct Marks {
    committed: AtomicU64,
    input: AtomicU64,
    /// Every input at a time below this has passed the dataflow to the
    /// commit operator, though statistics may still wait in an open epoch
    /// (folded per card): `input` holds at the epoch's start, this does not.
    through: AtomicU64,
    /// Alerts the commit operator holds for this sink, not yet posted...
    alerts_pending: AtomicU64,
    /// ... and those posted to its committer, not yet committed.
    alerts_posted: AtomicU64,
    /// Whether the sink archives the accepted events (and so holds each
    /// until it is committed).
    archives: AtomicBool,
    /// Set by a source at its backpressure bound: what waits is committed
    /// at the commit interval, not the catch-up interval (see [`Committed::press`]).
    pressed: AtomicBool,
    /// Wakes the commit operator that feeds this sink, once it runs.
    wake: Mutex<Option<timely::scheduling::SyncActivator>>,
}

impl std::fmt::Debug for Marks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Marks")
            .field("committed", &self.committed)
            .field("input", &self.input)
            .field("through", &self.through)
            .field("alerts_pending", &self.alerts_pending)
            .field("alerts_posted", &self.alerts_posted)
            .field("archives", &self.archives)
            .field("pressed", &self.pressed)
            .finish_non_exhaustive()
    }
}

impl Committed {
    /// A handle for a sink whose store already holds everything below `t`.
    pub fn starting_at(t: Time) -> Self {
        let c = Committed::default();
        c.0.committed.store(t, Ordering::Release);
        c.0.input.store(t, Ordering::Release);
        c.0.through.store(t, Ordering::Release);
        c
    }

    /// Every output at a time below this is in the sink's store.
    pub fn frontier(&self) -> Time {
        self.0.committed.load(Ordering::Acquire)
    }

    /// Every output at a time below this has reached the sink (committed or not yet).
    pub fn input_frontier(&self) -> Time {
        self.0.input.load(Ordering::Acquire)
    }

    /// Every input at a time below this has passed the dataflow (the windows
    /// and the rules) to the sink. What the sink holds of it until it is
    /// committed grows with the input only in alerts
    /// ([`Committed::alerts_held`]) and, where the sink archives
    /// ([`Committed::archives`]), the events themselves: its statistics wait
    /// folded per card, however many events changed them.
    pub fn through(&self) -> Time {
        self.0.through.load(Ordering::Acquire)
    }

    /// Alerts the sink holds and has not committed.
    pub fn alerts_held(&self) -> u64 {
        self.0.alerts_pending.load(Ordering::Acquire) + self.0.alerts_posted.load(Ordering::Acquire)
    }

    /// Whether the sink archives the accepted events: it then holds each
    /// until it is committed, not only until it is [`through`](Committed::through).
    pub fn archives(&self) -> bool {
        self.0.archives.load(Ordering::Acquire)
    }

    /// A source at its backpressure bound (`true`) or back under it: while
    /// pressed, what waits goes to the stores at the commit interval even
    /// when catching up, where it would wait for the catch-up interval, so
    /// a paused source reads on after one commit, not after up to 20 s. A
    /// Kafka Streams or Flink sink flushes a full buffer the same way.
    pub fn press(&self, on: bool) {
        if self.0.pressed.swap(on, Ordering::AcqRel) != on && on {
            if let Some(wake) = self.0.wake.lock().expect("commit operator's activator").as_ref() {
                // Fails only once the dataflow is gone, when nothing waits.
                let _ = wake.activate();
            }
        }
    }

    /// Whether a source is at its backpressure bound.
    pub fn pressed(&self) -> bool {
        self.0.pressed.load(Ordering::Acquire)
    }
}

pub use tripwire_dataflow::InputEnd;

/// Set when the process is shutting down: no committer starts another commit.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// Commits under way in this process.
static COMMITTING: AtomicUsize = AtomicUsize::new(0);

/// For a clean shutdown (SIGTERM): let every commit under way in this process
/// finish, start no new one, and return once none runs (or after `limit`).
///
/// Batches not yet begun are simply not written; the next run replays them.
pub fn finish_current_commits(limit: Duration) -> bool {
    STOPPING.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + limit;
    while COMMITTING.load(Ordering::SeqCst) > 0 {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// A store a committer thread writes batches to.
pub trait Store: Send + 'static {
    /// A live connection.
    type Conn;
    /// Connect (and prepare: migrations, scripts).
    fn connect(&mut self) -> impl Future<Output = Result<Self::Conn, String>>;
    /// The frontier the store holds for this worker (`None`: none at all).
    fn stored_frontier(
        &mut self,
        conn: &mut Self::Conn,
    ) -> impl Future<Output = Result<Option<Time>, String>>;
    /// Write `batch` and the worker's checkpoint atomically; idempotent on replay.
    fn commit(
        &mut self,
        conn: &mut Self::Conn,
        batch: &Batch,
    ) -> impl Future<Output = Result<(), String>>;
}

/// What a sink commits: statistics and alerts, and optionally the accepted events to archive.
pub struct SinkInputs<'s> {
    /// Per card, the changes of its statistics (a changelog: see [`CardChange`]).
    pub stats: VecCollection<'s, Time, (u64, CardChange), Diff>,
    /// Alerts.
    pub alerts: VecCollection<'s, Time, Alert, Diff>,
    /// Accepted events, when the sink archives them.
    pub archive: Option<VecCollection<'s, Time, Transaction, Diff>>,
    /// The coalescing of `stats` by the window operator that emits them
    /// (this worker's), which the commit operator enables and cuts batches
    /// by; `None` for statistics from elsewhere.
    pub coalesce: Option<Rc<Coalesce>>,
}

/// How a sink commits.
#[derive(Clone, Debug)]
pub struct CommitOptions {
    /// Commit at most this often (a batch also waits for the frontier to move).
    pub interval: Duration,
    /// The frontier an earlier run committed to this store (0 for a first run).
    ///
    /// A replay recomputes the outputs below it from partial windows; they are
    /// dropped as they arrive. (Were they kept, a row inserted before
    /// `resume_from` and deleted after it would cancel out inside one batch,
    /// and the earlier run's row would never be deleted.)
    pub resume_from: Time,
    /// Report progress here (for the source's backpressure) instead of in a new handle.
    pub report_to: Option<Committed>,
    /// The least commit interval while results are more than a minute behind
    /// the wall clock (catching up): larger batches consolidate more updates
    /// per key, so the stores write far fewer rows.
    pub catch_up_interval: Duration,
    /// A bounded run's end, once the source knows it: nothing at or after it is committed.
    pub end: Option<InputEnd>,
}

/// A circuit breaker's state: the value of `tripwire_sink_breaker_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Commits go through.
    Closed = 0,
    /// The store failed repeatedly: commits wait for the cool-down.
    Open = 1,
    /// After a cool-down: one commit probes whether the store is back.
    HalfOpen = 2,
}

/// The retry policy of a committer: exponential backoff, then a circuit breaker.
///
/// Failures in a row below `threshold` are retried after 100 ms, 200 ms, ...;
/// the `threshold`-th opens the breaker, after which each attempt is a
/// half-open probe following a cool-down that doubles up to `max_cooldown`.
/// A success closes it and resets everything.
#[derive(Debug)]
pub struct Breaker {
    state: BreakerState,
    failures: u32,
    threshold: u32,
    max_cooldown: Duration,
    opened: Option<Instant>,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` failures in a row.
    pub fn new(threshold: u32, max_cooldown: Duration) -> Self {
        Breaker { state: BreakerState::Closed, failures: 0, threshold, max_cooldown, opened: None }
    }

    /// Its state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// A commit failed: the new state, and how long to wait before the next attempt.
    pub fn failed(&mut self) -> (BreakerState, Duration) {
        self.failures += 1;
        let wait = Duration::from_millis(100)
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(self.max_cooldown);
        if self.failures >= self.threshold {
            self.state = BreakerState::Open;
            self.opened.get_or_insert_with(Instant::now);
        }
        (self.state, wait)
    }

    /// The cool-down is over: the next attempt is a probe.
    pub fn probe(&mut self) -> BreakerState {
        if self.state == BreakerState::Open {
            self.state = BreakerState::HalfOpen;
        }
        self.state
    }

    /// A commit succeeded: closed again; how long it had been open, if it was.
    pub fn succeeded(&mut self) -> Option<Duration> {
        self.state = BreakerState::Closed;
        self.failures = 0;
        self.opened.take().map(|t| t.elapsed())
    }
}

/// Run the frontier-driven commit operator named `name` for this worker, writing to `store`.
pub fn frontier_sink<S: Store>(
    name: &str,
    inputs: SinkInputs<'_>,
    options: CommitOptions,
    store: S,
) -> Committed {
    let worker = inputs.stats.inner.scope().index();
    let archive = inputs.archive.is_some();
    let mut marks = frontier_sinks(inputs, vec![committer(name, worker, store, options, archive)]);
    marks.remove(0)
}

/// A store's committer thread, started, waiting for the commit operator
/// ([`frontier_sinks`]) to post it batches.
pub struct Committer {
    name: String,
    mailbox: Arc<Mailbox>,
    thread: JoinHandle<()>,
    committed: Committed,
    options: CommitOptions,
    /// Whether its batches carry the archived events.
    archive: bool,
}

/// Start worker `worker`'s committer named `name`, writing to `store`.
pub fn committer<S: Store>(
    name: &str,
    worker: usize,
    store: S,
    options: CommitOptions,
    archive: bool,
) -> Committer {
    let committed = options.report_to.clone().unwrap_or_default();
    committed.0.committed.fetch_max(options.resume_from, Ordering::AcqRel);
    committed.0.input.fetch_max(options.resume_from, Ordering::AcqRel);
    committed.0.through.fetch_max(options.resume_from, Ordering::AcqRel);
    committed.0.archives.store(archive, Ordering::Release);
    let mailbox = Arc::new(Mailbox::default());
    let thread = spawn_committer(name, store, worker, mailbox.clone(), committed.clone());
    Committer { name: name.to_owned(), mailbox, thread, committed, options, archive }
}

/// What the commit operator keeps per committer.
struct Outlet {
    name: String,
    mailbox: Arc<Mailbox>,
    thread: Option<JoinHandle<()>>,
    marks: Committed,
    interval: Duration,
    catch_up: Duration,
    archive: bool,
    /// Everything below this was posted (or is below where this store resumes).
    sent: Time,
    last_sent: Instant,
    /// A bounded run's last batch, at its input's end, was posted.
    ended: bool,
}

/// Run one frontier-driven commit operator for this worker that feeds every
/// committer in `committers`; their progress, in order.
///
/// One operator for all the stores: it holds each change once and
/// consolidates it once for every store due at the same moment (each store's
/// batch is then a copy), where an operator per store held and sorted every
/// change once per store, which was half of the workers' time.
pub fn frontier_sinks(inputs: SinkInputs<'_>, committers: Vec<Committer>) -> Vec<Committed> {
    let scope = inputs.stats.inner.scope();
    let worker = scope.index();
    let marks: Vec<Committed> = committers.iter().map(|c| c.committed.clone()).collect();
    let names: Vec<&str> = committers.iter().map(|c| c.name.as_str()).collect();
    let mut builder = OperatorBuilder::new(names.join("+"), scope);
    let activator = scope.activator_for(builder.operator_info().address);
    for m in &marks {
        let wake = scope.worker().sync_activator_for(builder.operator_info().address.to_vec());
        *m.0.wake.lock().expect("commit operator's activator") = Some(wake);
    }
    let mut stats_in = builder.new_input(inputs.stats.inner, Pipeline);
    let mut alerts_in = builder.new_input(inputs.alerts.inner, Pipeline);
    let mut archive_in = inputs.archive.map(|a| builder.new_input(a.inner, Pipeline));
    // Changes below every store's resume point were committed by an earlier run.
    let resume_from = committers.iter().map(|c| c.options.resume_from).min().unwrap_or(0);
    // No epoch spans a store's resume point: it opens at or after the highest.
    // An epoch stays open at most as long as a batch may wait.
    let coalesce = inputs.coalesce;
    if let Some(c) = coalesce.as_ref() {
        let from = committers.iter().map(|c| c.options.resume_from).max().unwrap_or(0);
        let longest = committers
            .iter()
            .map(|c| c.options.interval.max(c.options.catch_up_interval))
            .max()
            .unwrap_or_default();
        c.enable(from, activator.clone(), longest);
    }
    let end = committers.iter().find_map(|c| c.options.end.clone());
    let mut outlets: Vec<Outlet> = committers
        .into_iter()
        .map(|c| Outlet {
            marks: c.committed,
            interval: c.options.interval,
            catch_up: c.options.catch_up_interval,
            sent: c.options.resume_from,
            last_sent: Instant::now() - c.options.interval,
            ended: false,
            archive: c.archive,
            name: c.name,
            mailbox: c.mailbox,
            thread: Some(c.thread),
        })
        .collect();

    builder.build(move |_caps| {
        let mut pending = Pending::default();
        // Everything below this has left `pending`.
        let mut forgotten: Time = resume_from;
        // How many statistics changes were left after the last compaction.
        let mut compacted: usize = 0;
        // This worker's part in the job's CPU priority.
        let mut priority = crate::priority::Behind::default();
        move |frontiers| {
            // The replayed past (below `resume_from`) is dropped as it arrives.
            let keep = |t: &Time| *t >= resume_from;
            stats_in.for_each(|_cap, data| {
                // Past the replay, in one copy (a filter moves them one by one).
                if data.iter().all(|(_, t, _)| keep(t)) {
                    pending.stats.append(data);
                } else {
                    pending.stats.extend(data.drain(..).filter(|(_, t, _)| keep(t)))
                }
            });
            alerts_in.for_each(|_cap, data| {
                pending.alerts.extend(data.drain(..).filter(|(_, t, _)| keep(t)))
            });
            if let Some(input) = archive_in.as_mut() {
                input.for_each(|_cap, data| {
                    pending.archive.extend(data.drain(..).filter(|(_, t, _)| keep(t)))
                });
            }
            // Everything below the least input frontier is final; an empty frontier means all of it.
            let least = |f: &timely::progress::frontier::MutableAntichain<Time>| {
                f.frontier().iter().min().copied().unwrap_or(Time::MAX)
            };
            // Statistics come first; the other inputs (alerts, archived
            // events) are not held back by an open epoch.
            let others = frontiers[1..].iter().map(least).min().unwrap_or(Time::MAX);
            let statistics = least(&frontiers[0]);
            let frontier = statistics.min(others);
            let through = if coalesce.is_some() { others } else { frontier };
            let done = frontier == Time::MAX;
            // Catching up (results more than a minute behind the wall clock),
            // nobody waits for each half second: larger batches consolidate
            // more updates per key and cost the stores far fewer rows.
            let behind = wall_clock_ms().saturating_sub(frontier) > CATCH_UP_BEHIND_MS;
            if let Some(settle) = priority.update(behind && !done, Instant::now()) {
                activator.activate_after(settle);
            }
            // ... unless a source waits for a commit to read on (backpressure).
            let pressed = outlets.iter().any(|o| o.marks.pressed());
            let due = |o: &Outlet| {
                if behind && !pressed {
                    o.interval.max(o.catch_up)
                } else {
                    o.interval
                }
            };
            // No batch (nor compaction) ends inside an epoch whose changes
            // were coalesced: it ends at the epoch's start instead.
            let frontier = match coalesce.as_ref() {
                Some(c) => {
                    c.catching_up(behind && !done);
                    if done {
                        frontier
                    } else {
                        c.cut(frontier)
                    }
                }
                None => frontier,
            };
            // What waits for a commit stays bounded by the cards it changes.
            if !done && pending.stats.len() >= COMPACT_FROM.max(2 * compacted) {
                let mut cuts: Vec<Time> = outlets.iter().map(|o| o.sent).collect();
                cuts.sort_unstable();
                cuts.dedup();
                // No batch is cut beyond a bounded run's end (below): nor
                // may a compaction fold a change before it into one after.
                let limit =
                    end.as_ref().and_then(InputEnd::get).map_or(frontier, |e| frontier.min(e));
                let before = pending.stats.len();
                pending.compact(&cuts, limit);
                compacted = pending.stats.len();
                tracing::debug!(
                    worker,
                    before,
                    after = compacted,
                    limit,
                    "compacted pending changes"
                );
            }
            // Per store: where its batch ends (if one is due now), and when it next is.
            let mut due_at: Vec<Option<Time>> = Vec::with_capacity(outlets.len());
            let mut wake: Option<Duration> = None;
            for o in outlets.iter_mut() {
                // A bounded run ends at its input's end, not at the end of time:
                // what lies beyond (windows closing) is not committed. Once the
                // sources are done, the dataflow still runs those departures, and
                // the frontier passes through their times on its way to the end
                // of time: it is held at the end all along (each worker's source
                // sets the end before it lets its capability go, so a sink that
                // sees the frontier beyond the end knows it).
                let known_end = end.as_ref().and_then(InputEnd::get);
                let frontier = match (done, known_end) {
                    (true, Some(end)) => end.max(o.sent),
                    (false, Some(end)) => frontier.min(end),
                    _ => frontier,
                };
                o.marks.0.input.fetch_max(frontier, Ordering::AcqRel);
                o.marks.0.through.fetch_max(through, Ordering::AcqRel);
                let due = due(o);
                // The frontier can reach the end before the sources tell
                // the end (the last worker to finish reading lets go of its
                // capability after): a store's batch to the end was then not
                // its last. It gets one more, empty if nothing is left, so
                // that what a last commit carries (a bounded run's restart
                // points, which it waits for) is stored.
                let last = done && known_end.is_some() && !o.ended;
                o.ended |= last;
                let now = (frontier > o.sent && (done || o.last_sent.elapsed() >= due)) || last;
                due_at.push(now.then_some(frontier));
                if !now && !done && frontier > o.sent {
                    let w = due.saturating_sub(o.last_sent.elapsed());
                    wake = Some(wake.map_or(w, |x| x.min(w)));
                }
            }
            // One batch per distinct (start, end) among the stores due now,
            // shared by the stores that take it (a store that does not archive
            // gets a copy without the archived events, if there are any).
            for i in 0..outlets.len() {
                let Some(frontier) = due_at[i] else { continue };
                let start = outlets[i].sent;
                let takers: Vec<usize> = (i..outlets.len())
                    .filter(|&j| due_at[j] == Some(frontier) && outlets[j].sent == start)
                    .collect();
                let archive = takers.iter().any(|&j| outlets[j].archive);
                let batch = Arc::new(pending.batch(start, frontier, archive));
                // A batch cut at the start of an open epoch, with nothing
                // before it, does not restart the interval: the epoch's
                // changes (all of them, at a catch-up's start) go as soon as
                // it closes, not a whole interval later.
                let held = batch.is_empty() && coalesce.as_ref().is_some_and(|c| c.is_open());
                let mut without: Option<Arc<Batch>> = None;
                for &j in &takers {
                    let o = &mut outlets[j];
                    let mine = if o.archive || batch.archive.is_empty() {
                        batch.clone()
                    } else {
                        without.get_or_insert_with(|| Arc::new(batch.without_archive())).clone()
                    };
                    o.sent = frontier;
                    // Counted before it is posted: the committer uncounts
                    // it once committed, and may do so at once.
                    o.marks.0.alerts_posted.fetch_add(mine.alerts.len() as u64, Ordering::AcqRel);
                    if !held {
                        o.last_sent = Instant::now();
                    }
                    due_at[j] = None;
                    // Taken at once by a free committer; folded into the waiting
                    // one while it is busy (what waits stays one batch).
                    o.mailbox.post(mine);
                }
            }
            // What every store has been sent can go: a pass over everything
            // pending, so only when that moved (not on every activation).
            let least = outlets.iter().map(|o| o.sent).min().unwrap_or(Time::MAX);
            if least > forgotten {
                pending.forget(least);
                forgotten = least;
                compacted = compacted.min(pending.stats.len());
                if let Some(c) = coalesce.as_ref() {
                    c.forget(least);
                }
            }
            // An open epoch holds the statistics back: it closes when the
            // first store's batch is due and the epoch is what holds the
            // frontier (the window operator then emits what it held, and the
            // frontier moves on); see `Coalesce::request`.
            if let Some(c) = coalesce.as_ref().filter(|c| !done && c.is_open()) {
                let until_due = outlets
                    .iter()
                    .map(|o| due(o).saturating_sub(o.last_sent.elapsed()))
                    .min()
                    .unwrap_or_default();
                if until_due.is_zero() {
                    c.request(statistics);
                } else {
                    wake = Some(wake.map_or(until_due, |w| w.min(until_due)));
                }
            }
            for o in outlets.iter() {
                o.marks.0.alerts_pending.store(pending.alerts.len() as u64, Ordering::Release);
                if o.thread.as_ref().is_some_and(|t| t.is_finished()) {
                    panic!("the committer of {} on worker {worker} has stopped", o.name);
                }
            }
            if done {
                // End of input: the last batches are posted; let the committers
                // finish and wait for them, so that a bounded run's results are
                // stored when the dataflow ends. (Waiting here, not coming back
                // later: with no capability left, the dataflow may be torn
                // down before a later activation.)
                for o in outlets.iter_mut() {
                    o.mailbox.close();
                    if let Some(t) = o.thread.take() {
                        t.join().expect("committer thread");
                    }
                }
            } else if let Some(w) = wake {
                // A batch waits for its commit interval: come back when it is due.
                activator.activate_after(w);
            }
        }
    });
    marks
}

/// Statistics changes waiting for a commit are compacted once there are this
/// many, and again each time their number doubles (a change is about 170
/// bytes). Small, so that the exactly-once tests (commits every 100 ms)
/// compact as a catch-up does; a pass is a sort of what waits, and doubling
/// keeps their total cost within a constant of the last one's.
const COMPACT_FROM: usize = 1 << 12;

/// Results further behind the wall clock than this are being caught up on.
const CATCH_UP_BEHIND_MS: Time = 60_000;
fn wall_clock_ms() -> Time {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Time)
}

/// Updates that reached the operator and are not yet in a batch.
#[derive(Default)]
struct Pending {
    stats: Vec<((u64, CardChange), Time, Diff)>,
    /// Scratch for [`Pending::compact`]: segment, card, time, index; kept
    /// between passes, with its memory.
    order: Vec<(u64, u64, Time, u32)>,
    /// Scratch for [`Pending::compact`]: which changes it folds.
    folded: Vec<bool>,
    alerts: Vec<(Alert, Time, Diff)>,
    archive: Vec<(Transaction, Time, Diff)>,
}

impl Pending {
    /// Consolidate every update from `start` to below `frontier` into one batch
    /// (archived events only if `archive`); they stay until [`Pending::forget`].
    fn batch(&self, start: Time, frontier: Time, archive: bool) -> Batch {
        // Per card, its changes in time order: it ends as its last change
        // says, and had a row at `start` if its first change says it had one.
        // Sorted by card and time (a sort: grouping through a map cost a third
        // of the worker's time in bulk loads, in cache misses); what is sorted
        // is the card, the time and an index, not the changes themselves
        // (hundreds of bytes each: moving them was the workers' largest cost).
        let updates = &self.stats;
        let mut order: Vec<(u64, Time, u32)> = Vec::with_capacity(updates.len());
        order.extend(
            updates
                .iter()
                .enumerate()
                .filter(|(_, (_, t, _))| start <= *t && *t < frontier)
                .map(|(i, ((k, _), t, _))| (*k, *t, i as u32)),
        );
        order.sort_unstable();
        // At most one row per change: sized once, not grown (a bulk load's
        // last batch is hundreds of megabytes, each growth a copy of it).
        let cards = order.chunk_by(|x, y| x.0 == y.0).count();
        let mut b = Batch { frontier, start, ..Batch::default() };
        b.upserts.reserve_exact(cards);
        // A card that ends without a row is a delete even when the card came
        // and went within the batch (it is then also listed in
        // `absent_before`): the store may hold a row this run did not write,
        // one committed by an earlier run beyond the resume point, or by
        // another worker before a rescale. The sink knows whether it can.
        for group in order.chunk_by(|x, y| x.0 == y.0) {
            let card = group[0].0;
            let first = &updates[group[0].2 as usize].0 .1;
            let (last, t) =
                (&updates[group[group.len() - 1].2 as usize].0 .1, group[group.len() - 1].1);
            if last.stats.is_empty() {
                b.deletes.push((card, t));
            } else {
                b.upserts.push((card, last.stats, t));
            }
            if !first.existed {
                b.absent_before.push(card);
            }
        }
        let within = |t: &Time| start <= *t && *t < frontier;
        b.alerts = self
            .alerts
            .iter()
            .filter(|(_, t, d)| within(t) && *d > 0)
            .map(|(a, t, _)| (a.clone(), *t))
            .collect();
        if archive {
            b.archive = self
                .archive
                .iter()
                .filter(|(_, t, d)| within(t) && *d > 0)
                .map(|(x, _, _)| x.clone())
                .collect();
        }
        b
    }

    /// Fold each card's changes within each segment `[cuts[i], cuts[i + 1])`,
    /// the last ending at `frontier`, into one: the first's `existed`, the
    /// last's statistics and time. What a batch makes of them is unchanged
    /// for every batch that can still be cut: each starts at one of `cuts`
    /// (what each store has been sent, ascending) and ends at or beyond
    /// `frontier` (the input frontier now). Changes at or beyond `frontier`
    /// are left as they are. So what waits for a commit is bounded by the
    /// cards it changes, not by the changes: a catch-up waits its catch-up
    /// interval and changes each card many times meanwhile.
    ///
    /// In place: each group's last change takes its first's `existed` and
    /// stays, the others go (where they stand is no matter: a batch sorts).
    /// Building a new vector instead cost the workers a sixth of their time
    /// in a bulk load, most of it faulting in fresh memory for each pass.
    fn compact(&mut self, cuts: &[Time], frontier: Time) {
        let Some(&first_cut) = cuts.first() else { return };
        let segment = |t: Time| cuts.partition_point(|c| *c <= t);
        let updates = &mut self.stats;
        let order = &mut self.order;
        order.clear();
        for (i, u) in updates.iter().enumerate() {
            let t = u.1;
            if first_cut <= t && t < frontier {
                order.push((segment(t) as u64, u.0 .0, t, i as u32));
            }
        }
        order.sort_unstable();
        // Every change is kept but the folded ones.
        let folded = &mut self.folded;
        folded.clear();
        folded.resize(updates.len(), false);
        for group in order.chunk_by(|x, y| (x.0, x.1) == (y.0, y.1)) {
            let (first, last) = (group[0].3 as usize, group[group.len() - 1].3 as usize);
            let existed = updates[first].0 .1.existed;
            updates[last].0 .1.existed = existed;
            for x in &group[..group.len() - 1] {
                folded[x.3 as usize] = true;
            }
        }
        let mut i = 0;
        updates.retain(|_| {
            i += 1;
            !folded[i - 1]
        });
    }

    /// Drop every update below `below`: every store has been sent it.
    fn forget(&mut self, below: Time) {
        self.stats.retain(|(_, t, _)| *t >= below);
        self.alerts.retain(|(_, t, _)| *t >= below);
        self.archive.retain(|(_, t, _)| *t >= below);
    }
}

/// Where the commit operator leaves batches for its committer thread: at most
/// one waits. A free committer takes a batch the moment it is posted; while
/// the committer is busy, newer batches are folded into the waiting one.
#[derive(Default)]
struct Mailbox {
    state: Mutex<MailboxState>,
    posted: Condvar,
}

#[derive(Default)]
struct MailboxState {
    waiting: Option<Arc<Batch>>,
    closed: bool,
}

impl Mailbox {
    /// Post `batch` (shared with the other stores' mailboxes: folding one
    /// into a waiting batch copies whichever is still shared).
    fn post(&self, batch: Arc<Batch>) {
        let mut s = self.state.lock().expect("mailbox");
        match s.waiting.as_mut() {
            Some(w) => Arc::make_mut(w).absorb(Arc::unwrap_or_clone(batch)),
            None => s.waiting = Some(batch),
        }
        self.posted.notify_one();
    }

    /// No more batches come.
    fn close(&self) {
        self.state.lock().expect("mailbox").closed = true;
        self.posted.notify_one();
    }

    /// The next batch, waiting for one; `None` once closed and empty.
    fn take(&self) -> Option<Arc<Batch>> {
        let mut s = self.state.lock().expect("mailbox");
        loop {
            if let Some(b) = s.waiting.take() {
                return Some(b);
            }
            if s.closed {
                return None;
            }
            s = self.posted.wait(s).expect("mailbox");
        }
    }
}

/// Exit status of a process whose store lost acknowledged writes: the
/// supervisor restarts the group, which resumes from what the stores hold.
pub const EXIT_STORE_BEHIND: i32 = 75;

/// A store must hold at least what it acknowledged (`acknowledged`); one that
/// holds less lost writes (restored from an older snapshot, failed over to a
/// replica that lagged, asynchronous commit). Then the job cannot go on from
/// where it thinks it is: it says so and exits, and the restarted group
/// resumes from what the stores hold, which replay repairs.
fn verify_store(name: &str, worker: usize, held: Option<Time>, acknowledged: Time) {
    if held.unwrap_or(0) >= acknowledged {
        return;
    }
    tracing::error!(sink = %name, worker, held = ?held, acknowledged,
        "store lost acknowledged writes: it holds frontier {:?} but had acknowledged {acknowledged}; restarting the group from what the stores hold", held);
    metrics::store_rollbacks_total().with_label_values(&[name]).inc();
    std::process::exit(EXIT_STORE_BEHIND);
}

fn spawn_committer<S: Store>(
    name: &str,
    mut store: S,
    worker: usize,
    mailbox: Arc<Mailbox>,
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
            let worker_label = worker.to_string();
            let breaker_gauge = metrics::sink_breaker_state().with_label_values(&[&name, &worker_label]);
            let seconds = metrics::commit_seconds().with_label_values(&[&name]);
            let rows = metrics::committed_rows_total().with_label_values(&[&name]);
            let failures = metrics::commit_failures_total().with_label_values(&[&name]);
            let frontier_gauge =
                metrics::committed_frontier().with_label_values(&[&name, &worker_label]);
            let batch_rows = metrics::commit_batch_rows().with_label_values(&[&name]);
            breaker_gauge.set(BreakerState::Closed as i64);
            rt.block_on(async move {
                // Connected before the first batch, not by it: a bulk run's
                // first batch is its last, and connecting then (statements
                // prepared, the frontier read) lay on its way to the end.
                // Should the store not answer now, the first batch connects.
                let mut conn: Option<S::Conn> = match store.connect().await {
                    Ok(mut c) => match store.stored_frontier(&mut c).await {
                        Ok(held) => {
                            verify_store(&name, worker, held, committed.frontier());
                            Some(c)
                        }
                        Err(_) => None,
                    },
                    Err(_) => None,
                };
                // What this committer's store has acknowledged, at least.
                let mut acked: Time = 0;
                let mut breaker = Breaker::new(3, Duration::from_secs(5));
                while let Some(batch) = mailbox.take() {
                    loop {
                        // Announce the commit, then look at STOPPING (in that
                        // order, so that a shutdown either sees it or stops it).
                        COMMITTING.fetch_add(1, Ordering::SeqCst);
                        if STOPPING.load(Ordering::SeqCst) {
                            COMMITTING.fetch_sub(1, Ordering::SeqCst);
                            std::future::pending::<()>().await;
                        }
                        let started = Instant::now();
                        let result = match conn.as_mut() {
                            Some(c) => store.commit(c, &batch).await,
                            None => match store.connect().await {
                                Ok(mut c) => {
                                    let acknowledged = committed.frontier().max(acked);
                                    match store.stored_frontier(&mut c).await {
                                        Ok(held) => {
                                            verify_store(&name, worker, held, acknowledged);
                                            let r = store.commit(&mut c, &batch).await;
                                            conn = Some(c);
                                            r
                                        }
                                        Err(e) => Err(format!("reading its frontier: {e}")),
                                    }
                                }
                                Err(e) => Err(format!("connect: {e}")),
                            },
                        };
                        COMMITTING.fetch_sub(1, Ordering::SeqCst);
                        match result {
                            Ok(()) => {
                                let took = started.elapsed();
                                acked = acked.max(batch.frontier);
                                committed.0.committed.fetch_max(batch.frontier, Ordering::AcqRel);
                                committed.0.alerts_posted.fetch_sub(batch.alerts.len() as u64, Ordering::AcqRel);
                                seconds.observe(took.as_secs_f64());
                                rows.inc_by(batch.rows() as u64);
                                batch_rows.observe(batch.rows() as f64);
                                frontier_gauge.set(batch.frontier.min(i64::MAX as u64) as i64);
                                tracing::debug!(sink = %name, worker, frontier = batch.frontier,
                                    upserts = batch.upserts.len(), deletes = batch.deletes.len(),
                                    alerts = batch.alerts.len(), archived = batch.archive.len(),
                                    rows = batch.rows(), latency_us = took.as_micros() as u64,
                                    "committed");
                                if let Some(outage) = breaker.succeeded() {
                                    breaker_gauge.set(BreakerState::Closed as i64);
                                    tracing::info!(sink = %name, worker, outage_ms = outage.as_millis() as u64,
                                        frontier = batch.frontier, "circuit breaker closed: store is back");
                                }
                                break;
                            }
                            Err(e) => {
                                failures.inc();
                                conn = None;
                                let before = breaker.state();
                                let (state, wait) = breaker.failed();
                                if state != before {
                                    breaker_gauge.set(state as i64);
                                }
                                if before == BreakerState::Closed && state == BreakerState::Open {
                                    tracing::warn!(sink = %name, worker, error = %e, retry_in_ms = wait.as_millis() as u64,
                                        "circuit breaker open: commits wait for the store");
                                } else if before == BreakerState::HalfOpen {
                                    tracing::warn!(sink = %name, worker, error = %e, retry_in_ms = wait.as_millis() as u64,
                                        "probe failed: circuit breaker stays open");
                                } else {
                                    tracing::warn!(sink = %name, worker, error = %e, retry_in_ms = wait.as_millis() as u64,
                                        breaker = ?state, "commit failed; retrying");
                                }
                                tokio::time::sleep(wait).await;
                                if breaker.probe() == BreakerState::HalfOpen {
                                    breaker_gauge.set(BreakerState::HalfOpen as i64);
                                }
                            }
                        }
                    }
                }
            });
        })
        .expect("committer thread starts")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tripwire_dataflow::WindowStats;

    #[test]
    fn breaker_opens_after_threshold_probes_half_open_and_closes_on_success() {
        let mut b = Breaker::new(3, Duration::from_secs(5));
        assert_eq!(b.failed(), (BreakerState::Closed, Duration::from_millis(100)));
        assert_eq!(b.failed(), (BreakerState::Closed, Duration::from_millis(200)));
        assert_eq!(b.failed(), (BreakerState::Open, Duration::from_millis(400)));
        assert_eq!(b.probe(), BreakerState::HalfOpen);
        // A failed probe opens it again, with a longer cool-down, capped.
        for _ in 0..10 {
            assert_eq!(b.failed().0, BreakerState::Open);
            b.probe();
        }
        assert_eq!(b.failed().1, Duration::from_secs(5));
        assert!(b.succeeded().is_some(), "it had been open");
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.failed(), (BreakerState::Closed, Duration::from_millis(100)), "reset");
        assert!(b.succeeded().is_none(), "it had not opened");
    }

    fn key(card_id: u64) -> u64 {
        card_id
    }

    fn stats(count: i64) -> CardStats {
        let s = WindowStats {
            count,
            sum: count * 10,
            max_amount: 10,
            distinct_merchants: 1,
            distinct_countries: 1,
        };
        CardStats::new([(60_000, s)])
    }

    fn change(count: i64, existed: bool) -> CardChange {
        CardChange { stats: stats(count), existed }
    }

    #[test]
    fn a_cards_last_change_decides_its_row_and_its_first_whether_it_had_one() {
        let updates = vec![
            // 5 → 6 at time 3, 6 → 5 at time 7: ends as 5.
            ((key(1), change(6, true)), 3, 1),
            ((key(1), change(5, true)), 7, 1),
            // Came at 2, went at 4: ends with no row.
            ((key(2), change(1, false)), 2, 1),
            ((key(2), change(0, true)), 4, 1),
            // Came at 5, changed again at 12, beyond the frontier.
            ((key(3), change(1, false)), 5, 1),
            ((key(3), change(2, true)), 12, 1),
        ];
        let mut p = Pending { stats: updates, ..Pending::default() };
        let b = p.batch(0, 10, false);
        assert_eq!(b.upserts, vec![(key(1), stats(5), 7), (key(3), stats(1), 5)]);
        assert_eq!(b.deletes, vec![(key(2), 4)]);
        p.forget(10);
        assert_eq!(p.stats.len(), 1, "the change at 12 waits for a later batch");
        // Cards 2 and 3 had no row when the batch began; card 2 came and went.
        assert_eq!(b.absent_before, vec![key(2), key(3)]);
        assert!(b.passing(&key(2)) && !b.passing(&key(1)));
    }

    #[test]
    fn compacting_changes_leaves_every_batch_that_can_still_be_cut_as_it_was() {
        // Seeded pseudo-random changes: 8 cards, times 0..100, each card's
        // `existed` true after its first change unless it emptied.
        let mut next = tripwire_dataflow::seeded(0x2545_F491_4F6C_DD1D);
        for _ in 0..200 {
            let mut had = [false; 8];
            let mut updates = Vec::new();
            for t in 0..100 {
                for card in 0..8u64 {
                    if next(4) == 0 {
                        let count = next(3) as i64;
                        updates.push(((key(card), change(count, had[card as usize])), t, 1));
                        had[card as usize] = count > 0;
                    }
                }
            }
            // Arrival order is not time order.
            for i in (1..updates.len()).rev() {
                updates.swap(i, next(i as u64 + 1) as usize);
            }
            let (a, b) = (next(40), 40 + next(30));
            let cuts = if a == b { vec![a] } else { vec![a, b] };
            let frontier = b + next(30);
            let before = Pending { stats: updates.clone(), ..Pending::default() };
            let mut after = Pending { stats: updates, ..Pending::default() };
            after.compact(&cuts, frontier);
            assert!(after.stats.len() <= before.stats.len());
            for &start in &cuts {
                for end in [frontier, frontier + 1, frontier + 17, Time::MAX] {
                    let (x, y) = (before.batch(start, end, false), after.batch(start, end, false));
                    assert_eq!(x.upserts, y.upserts, "cuts {cuts:?} frontier {frontier} end {end}");
                    assert_eq!(x.deletes, y.deletes, "cuts {cuts:?} frontier {frontier} end {end}");
                    assert_eq!(x.absent_before, y.absent_before, "cuts {cuts:?} end {end}");
                }
            }
        }
        // Many changes of one card within a segment become one.
        let updates = (0..10).map(|t| ((key(1), change(t + 1, t > 0)), t as Time, 1)).collect();
        let mut p = Pending { stats: updates, ..Pending::default() };
        p.compact(&[0], 10);
        assert_eq!(p.stats, vec![((key(1), change(10, false)), 9, 1)]);
    }

    /// A store that keeps what it is given: per batch, its frontier and the
    /// cards it upserts with their times. With a gate, each commit first
    /// waits until the gate opens (a store that is away).
    struct Recording(Arc<Mutex<Vec<Recorded>>>, Option<Gate>);

    /// Open (`true`) or shut, and who waits for it to open.
    type Gate = Arc<(Mutex<bool>, Condvar)>;

    /// A batch as [`Recording`] keeps it.
    type Recorded = (Time, Vec<(u64, Time)>);

    impl Store for Recording {
        type Conn = ();
        async fn connect(&mut self) -> Result<(), String> {
            Ok(())
        }
        async fn stored_frontier(&mut self, _: &mut ()) -> Result<Option<Time>, String> {
            Ok(None)
        }
        async fn commit(&mut self, _: &mut (), batch: &Batch) -> Result<(), String> {
            if let Some((open, changed)) = self.1.as_deref() {
                let mut open = open.lock().expect("gate");
                while !*open {
                    open = changed.wait(open).expect("gate");
                }
            }
            let cards = batch.upserts.iter().map(|(c, _, t)| (*c, *t)).collect();
            self.0.lock().expect("recording").push((batch.frontier, cards));
            Ok(())
        }
    }

    type StatsInput = differential_dataflow::input::InputSession<Time, (u64, CardChange), Diff>;
    type AlertsInput = differential_dataflow::input::InputSession<Time, Alert, Diff>;

    /// A dataflow of statistics and alerts fed by hand into one commit
    /// operator with a single committer writing to `store`.
    fn recording_sink(
        worker: &mut timely::worker::Worker,
        store: Recording,
        options: CommitOptions,
    ) -> (StatsInput, AlertsInput, Vec<Committed>) {
        use differential_dataflow::input::Input;
        worker.dataflow::<Time, _, _>(|scope| {
            let (stats_in, stats) = scope.new_collection::<(u64, CardChange), Diff>();
            let (alerts_in, alerts) = scope.new_collection::<Alert, Diff>();
            let committer = committer("Recording", 0, store, options, false);
            let marks = frontier_sinks(
                SinkInputs { stats, alerts, archive: None, coalesce: None },
                vec![committer],
            );
            (stats_in, alerts_in, marks)
        })
    }

    /// A bounded run's last batch ends at the input's end, while the frontier
    /// runs on through the windows that close after it. A compaction then
    /// must not fold a card's change before the end into its change after
    /// the end: the batch, cut at the end, would miss the card.
    #[test]
    fn a_compaction_past_a_bounded_runs_end_leaves_the_batch_at_the_end_every_card() {
        const END: Time = 100;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let store = Recording(seen.clone(), None);
        timely::execute_directly(move |worker| {
            let end = InputEnd::default();
            end.set(END);
            let options = CommitOptions {
                // One batch early on, then none until the input is done.
                interval: Duration::from_secs(3600),
                resume_from: 0,
                report_to: None,
                catch_up_interval: Duration::from_secs(3600),
                end: Some(end),
            };
            let (mut stats, mut alerts, marks) = recording_sink(worker, store, options);
            type Inputs<'a> = (&'a mut StatsInput, &'a mut AlertsInput);
            // Both inputs to `to`, and steps until the operator has seen it
            // (as far as the end: it reports no frontier beyond that).
            let advance =
                |(stats, alerts): Inputs<'_>, to: Time, worker: &mut timely::worker::Worker| {
                    stats.advance_to(to);
                    alerts.advance_to(to);
                    stats.flush();
                    alerts.flush();
                    worker.step_while(|| marks[0].0.input.load(Ordering::Acquire) < to.min(END));
                };
            // The first batch goes at once, at 5.
            advance((&mut stats, &mut alerts), 5, worker);
            // Card 0 changes before the end and again after it, among fewer
            // changes than make a compaction.
            stats.update_at((key(0), change(1, false)), 10, 1);
            stats.update_at((key(0), change(2, true)), 150, 1);
            for card in 1..=COMPACT_FROM as u64 / 2 {
                stats.update_at((key(card), change(1, false)), 20 + card % 50, 1);
            }
            advance((&mut stats, &mut alerts), 160, worker);
            // More changes after the end: now what waits is compacted, with
            // the frontier past both of card 0's changes.
            for card in 1..=COMPACT_FROM as u64 / 2 {
                stats.update_at((key(card), change(2, true)), 160 + card % 30, 1);
            }
            stats.close();
            alerts.close();
        });
        let batches = seen.lock().expect("recording");
        let (frontier, cards) = batches.last().expect("batches");
        assert_eq!(*frontier, END, "the last batch ends at the input's end");
        assert_eq!(cards.len(), COMPACT_FROM / 2 + 1, "every card that changed before the end");
        assert!(cards.contains(&(key(0), 10)), "card 0 as it was before the end");
    }

    /// The frontier can reach a bounded run's end before the sources tell
    /// the end (the last worker to finish reading lets go of its capability
    /// after): the batch to the end then went out as any other, and the
    /// store never had a last commit (the PostgreSQL sink's waits for the
    /// run's last restart points, which were then never stored; the
    /// kill-and-rescale test found a run that stored none). Once the end is
    /// known, each store gets one more batch, at the end, empty here.
    #[test]
    fn a_store_gets_a_last_batch_at_the_end_once_the_end_is_known() {
        const END: Time = 100;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let store = Recording(seen.clone(), None);
        timely::execute_directly(move |worker| {
            let end = InputEnd::default();
            let options = every_ms(Duration::from_millis(1), Some(end.clone()));
            let (mut stats, mut alerts, marks) = recording_sink(worker, store, options);
            stats.update_at((key(1), change(1, false)), 10, 1);
            stats.advance_to(END);
            alerts.advance_to(END);
            stats.flush();
            alerts.flush();
            // The batch to the end, committed while the end is not known.
            worker.step_while(|| marks[0].frontier() < END);
            end.set(END);
            stats.close();
            alerts.close();
        });
        let batches = seen.lock().expect("recording");
        let at_end: Vec<&Recorded> = batches.iter().filter(|(f, _)| *f == END).collect();
        assert_eq!(at_end.len(), 2, "the batch to the end and the last one: {batches:?}");
        assert_eq!(at_end[0].1, vec![(key(1), 10)], "the batch to the end has the change");
        assert!(at_end[1].1.is_empty(), "the last batch has nothing left to write");
        assert_eq!(batches.last(), Some(at_end[1]), "it comes last");
    }

    /// Options of a store committing every millisecond in real time and
    /// every `catch_up` while catching up, up to `end` if given.
    fn every_ms(catch_up: Duration, end: Option<InputEnd>) -> CommitOptions {
        CommitOptions {
            interval: Duration::from_millis(1),
            resume_from: 0,
            report_to: None,
            catch_up_interval: catch_up,
            end,
        }
    }

    /// A payment of `card` at `t` (ms since the epoch, long past: a catch-up).
    fn payment(card: u64, t: Time) -> Transaction {
        Transaction {
            event_id: card * 1_000_000 + t,
            card_id: card,
            account_id: card,
            merchant_id: 7,
            mcc: 5411,
            amount_minor: 1_000,
            currency: *b"EUR",
            country: *b"DE",
            lat_e6: 0,
            lon_e6: 0,
            channel: tripwire_dataflow::Channel::Pos,
            event_time_ms: t,
            device_id: None,
        }
    }

    /// Step `worker` until `until` holds, parking between steps; panics
    /// after 30 s (a wake-up that never comes would park it for good).
    fn step_until(worker: &mut timely::worker::Worker, what: &str, until: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !until() {
            assert!(Instant::now() < deadline, "not within 30 s: {what}");
            worker.step_or_park(Some(Duration::from_millis(100)));
        }
    }

    type EventsInput = differential_dataflow::input::InputSession<Time, Transaction, Diff>;

    /// Events fed by hand through the fraud dataflow (default config) into
    /// one commit operator with `committers`, coalescing; the input is then
    /// advanced to 5, so that the operator has seen the results behind the
    /// wall clock (times in 1970): a catch-up. With `end`, a bounded run's;
    /// `changes` counts the statistics changes that reach the operator.
    fn catching_up_sink(
        worker: &mut timely::worker::Worker,
        committers: Vec<Committer>,
        end: Option<InputEnd>,
        changes: Arc<AtomicUsize>,
    ) -> (EventsInput, Vec<Committed>) {
        use differential_dataflow::input::Input;
        use tripwire_dataflow::DetectFraud;
        let config = tripwire_dataflow::FraudConfig::default();
        let (mut events, marks) = worker.dataflow::<Time, _, _>(|scope| {
            let (events_in, events) = scope.new_collection::<Transaction, Diff>();
            let out = match end {
                Some(end) => events.detect_fraud_to(&config, end),
                None => events.detect_fraud(&config),
            };
            let inputs = SinkInputs {
                stats: out.stats.inspect(move |_| {
                    changes.fetch_add(1, Ordering::Relaxed);
                }),
                alerts: out.alerts,
                archive: None,
                coalesce: Some(out.coalesce.clone()),
            };
            (events_in, frontier_sinks(inputs, committers))
        });
        events.advance_to(5);
        events.flush();
        step_until(worker, "the operator sees 5", || marks[0].input_frontier() >= 5);
        (events, marks)
    }

    /// While catching up, what waits goes at the catch-up interval; a source
    /// at its backpressure bound presses the sink, and then it goes at once
    /// (woken by the press: the operator's next wake-up is an hour away).
    #[test]
    fn a_pressed_sink_commits_what_waits_at_once_while_catching_up() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let store = Recording(seen.clone(), None);
        let batches = seen.clone();
        timely::execute_directly(move |worker| {
            let options = every_ms(Duration::from_secs(3600), None);
            let (mut stats, mut alerts, marks) = recording_sink(worker, store, options);
            let mark = marks[0].clone();
            let reached = |to: Time| {
                let mark = mark.clone();
                move || mark.input_frontier() >= to
            };
            stats.update_at((key(1), change(1, false)), 10, 1);
            for to in [20, 40] {
                stats.advance_to(to);
                alerts.advance_to(to);
                stats.flush();
                alerts.flush();
                step_until(worker, "the operator sees the frontier", reached(to));
                assert!(
                    batches.lock().expect("recording").is_empty(),
                    "catching up, at {to}: no batch before the catch-up interval"
                );
            }
            marks[0].press(true);
            step_until(worker, "a batch once pressed", || {
                !batches.lock().expect("recording").is_empty()
            });
            assert_eq!(*batches.lock().expect("recording"), vec![(40, vec![(key(1), 10)])]);
            // Released: the catch-up interval again.
            marks[0].press(false);
            stats.update_at((key(2), change(1, false)), 50, 1);
            stats.advance_to(60);
            alerts.advance_to(60);
            stats.flush();
            alerts.flush();
            step_until(worker, "the operator sees the frontier", reached(60));
            assert_eq!(batches.lock().expect("recording").len(), 1, "no batch once released");
            stats.close();
            alerts.close();
        });
        let batches = seen.lock().expect("recording");
        assert_eq!(batches.last().map(|b| b.0), Some(Time::MAX), "the rest at the input's end");
    }

    /// At a catch-up's start the window operator opens an epoch and holds
    /// its statistics at the epoch's start; the first batch due is cut
    /// there, with nothing in it. It must not restart the catch-up
    /// interval: the epoch closes at once and its changes land one interval
    /// after the start, not two (before, the second interval was 20 s of
    /// the 10M-event benchmark's first 42). The empty batch and the next
    /// may reach the store as one (a committer folds what waits for it), so
    /// what is checked is when the epoch's change lands.
    #[test]
    fn an_empty_batch_at_an_open_epochs_start_does_not_restart_the_interval() {
        const CATCH_UP: Duration = Duration::from_secs(3);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let store = Recording(seen.clone(), None);
        let batches = seen.clone();
        let started = Instant::now();
        timely::execute_directly(move |worker| {
            let options = every_ms(CATCH_UP, None);
            // A second store with a longer catch-up interval: an epoch stays
            // open at most the longest, so the first store's batch, not the
            // epoch's own time limit (which raced it), closes it.
            let slow =
                CommitOptions { catch_up_interval: Duration::from_secs(3600), ..options.clone() };
            let (mut events, _marks) = catching_up_sink(
                worker,
                vec![
                    committer("Recording", 0, store, options, false),
                    committer("Slow", 0, Recording(Arc::default(), None), slow, false),
                ],
                None,
                Arc::default(),
            );
            events.update_at(payment(1, 10), 10, 1);
            events.update_at(payment(1, 12), 12, 1);
            events.advance_to(20);
            events.flush();
            let landed =
                || batches.lock().expect("recording").iter().any(|b| b.1.contains(&(1, 12)));
            step_until(worker, "the epoch's change", landed);
            let took = started.elapsed();
            assert!(
                took < CATCH_UP + CATCH_UP / 2,
                "the epoch's change landed {took:?} after the start, not one catch-up interval ({CATCH_UP:?})"
            );
            events.close();
        });
        let batches = seen.lock().expect("recording");
        let batch = batches.iter().find(|b| b.1.contains(&(1, 12))).expect("the change");
        assert_eq!(batch.0, 20, "its batch ends at the frontier past the epoch: {batches:?}");
    }

    /// A bulk load's sources read to the end of their input well before the
    /// windows catch up with it. The epoch open then must not close at each
    /// of the window operator's activations from the input's end on (each
    /// does a bounded amount of work): it closes once, when everything due
    /// before the end is done, so each card's change reaches the sink once.
    #[test]
    fn an_epoch_stays_open_until_the_windows_catch_up_with_an_ended_input() {
        // More arrivals than one activation of the window operator takes.
        const CARDS: u64 = 3_000;
        const EACH: u64 = 20;
        let end = InputEnd::default();
        let changes = Arc::new(AtomicUsize::new(0));
        let counted = changes.clone();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let batches = seen.clone();
        timely::execute_directly(move |worker| {
            // No batch is due before the end: only the end closes the epoch.
            let options = every_ms(Duration::from_secs(3600), Some(end.clone()));
            let store = Recording(seen, None);
            let (mut events, _marks) = catching_up_sink(
                worker,
                vec![committer("Recording", 0, store, options, false)],
                Some(end.clone()),
                counted,
            );
            for i in 0..EACH {
                for card in 0..CARDS {
                    let t = 10 + i * 1_000 + card % 100;
                    events.update_at(payment(card, t), t, 1);
                }
            }
            end.set(EACH * 1_000 + 10);
            events.close();
        });
        let changes = changes.load(Ordering::Relaxed);
        assert_eq!(changes, CARDS as usize, "one change per card reached the sink");
        let batches = batches.lock().expect("recording");
        let stored: usize = batches.iter().map(|b| b.1.len()).sum();
        assert_eq!(
            stored,
            CARDS as usize,
            "and one row per card was stored, in {} batches",
            batches.len()
        );
    }

    /// A [`Recording`] behind `gate`.
    fn gated(gate: &Gate) -> Recording {
        Recording(Arc::default(), Some(gate.clone()))
    }

    /// An alert of velocity on `card`'s event `event` at `t`.
    fn alert(card: u64, event: u64, t: Time) -> Alert {
        use tripwire_dataflow::{Details, Rule};
        Alert {
            id: tripwire_dataflow::alert_id(Rule::Velocity, card, event, 0),
            card_id: card,
            rule: Rule::Velocity,
            trigger_event: event,
            event_time_ms: t,
            details: Details::Velocity { window_ms: 60_000, count: 9, limit: 8 },
        }
    }

    /// What a source's backpressure bound learns of a sink: the alerts it
    /// holds until they are committed, and whether it archives (then it
    /// holds every event until committed). Statistics it holds do not count,
    /// however many changes wait: what waits is one row per card.
    #[test]
    fn a_sink_counts_the_alerts_it_holds_until_committed_and_says_whether_it_archives() {
        use differential_dataflow::input::Input;
        let gate: Gate = Arc::new((Mutex::new(false), Condvar::new()));
        let opener = gate.clone();
        timely::execute_directly(move |worker| {
            let options = every_ms(Duration::from_millis(1), None);
            let (mut stats, mut alerts, mut archive, marks) =
                worker.dataflow::<Time, _, _>(|scope| {
                    let (stats_in, stats) = scope.new_collection::<(u64, CardChange), Diff>();
                    let (alerts_in, alerts) = scope.new_collection::<Alert, Diff>();
                    let (archive_in, archived) = scope.new_collection::<Transaction, Diff>();
                    let committers = vec![
                        committer("Archiving", 0, gated(&gate), options.clone(), true),
                        committer("Plain", 0, gated(&gate), options, false),
                    ];
                    let inputs =
                        SinkInputs { stats, alerts, archive: Some(archived), coalesce: None };
                    (stats_in, alerts_in, archive_in, frontier_sinks(inputs, committers))
                });
            // A thousand statistics changes of a hundred cards, 50 archived
            // events and 3 alerts; the stores take nothing yet.
            for card in 0..100 {
                for t in 1..=10 {
                    stats.update_at((key(card), change(t as i64, t > 1)), t, 1);
                }
            }
            for i in 0..50 {
                archive.update_at(payment(i % 7, 5), 5, 1);
            }
            for i in 0..3 {
                alerts.update_at(alert(i, i, 6), 6, 1);
            }
            stats.advance_to(20);
            alerts.advance_to(20);
            archive.advance_to(20);
            stats.flush();
            alerts.flush();
            archive.flush();
            step_until(worker, "both sinks see 20", || {
                marks.iter().all(|m| m.input_frontier() >= 20)
            });
            assert!(marks.iter().all(|m| m.alerts_held() == 3), "the alerts, in both sinks");
            assert_eq!(marks.iter().map(Committed::archives).collect::<Vec<_>>(), [true, false]);
            assert!(marks.iter().all(|m| m.through() >= 20), "without coalescing, the frontier");
            assert!(marks.iter().all(|m| m.frontier() == 0), "nothing committed yet");
            // The stores take it: nothing is held any more.
            *opener.0.lock().expect("gate") = true;
            opener.1.notify_all();
            step_until(worker, "both sinks commit 20", || marks.iter().all(|m| m.frontier() >= 20));
            assert!(marks.iter().all(|m| m.alerts_held() == 0), "committed, no alert is held");
            stats.close();
            alerts.close();
            archive.close();
        });
    }

    /// While catching up, the window operator holds its statistics at the
    /// open epoch's start: the sink's input frontier stays there, but what
    /// has passed the dataflow (what a source's bound no longer counts as
    /// unapplied) moves on with the alerts' frontier.
    #[test]
    fn an_open_epoch_holds_the_sinks_input_back_but_not_what_has_passed_the_dataflow() {
        timely::execute_directly(move |worker| {
            // The epoch stays open: no batch is due for an hour.
            let options = every_ms(Duration::from_secs(3600), None);
            let store = Recording(Arc::default(), None);
            let (mut events, marks) = catching_up_sink(
                worker,
                vec![committer("Recording", 0, store, options, false)],
                None,
                Arc::default(),
            );
            events.update_at(payment(1, 10), 10, 1);
            events.update_at(payment(2, 12), 12, 1);
            events.advance_to(20);
            events.flush();
            step_until(worker, "the events pass the dataflow", || marks[0].through() >= 20);
            let input = marks[0].input_frontier();
            assert!(input <= 10, "the statistics wait in the epoch opened at 10: input at {input}");
            events.close();
        });
    }

    #[test]
    fn changes_count_in_time_order_whatever_order_they_reach_the_sink_in() {
        let updates = vec![
            ((key(1), change(4, true)), 6, 1),
            ((key(1), change(3, false)), 2, 1),
            ((key(2), change(0, true)), 5, 1),
            ((key(2), change(9, true)), 1, 1),
        ];
        let p = Pending { stats: updates, ..Pending::default() };
        let b = p.batch(0, 10, false);
        assert_eq!(b.upserts, vec![(key(1), stats(4), 6)]);
        assert_eq!(b.deletes, vec![(key(2), 5)]);
        assert_eq!(b.absent_before, vec![key(1)], "card 1's first change (at 2) says it was new");
    }

    #[test]
    fn absorbing_a_later_batch_keeps_each_keys_latest_state_and_every_alert() {
        let mut early = Batch {
            frontier: 10,
            upserts: vec![(key(1), stats(1), 3), (key(2), stats(2), 4)],
            deletes: vec![(key(3), 5)],
            ..Batch::default()
        };
        let later = Batch {
            frontier: 20,
            upserts: vec![(key(3), stats(7), 15)],
            deletes: vec![(key(1), 12)],
            ..Batch::default()
        };
        early.absorb(later);
        assert_eq!(early.frontier, 20);
        assert_eq!(early.upserts, vec![(key(2), stats(2), 4), (key(3), stats(7), 15)]);
        assert_eq!(early.deletes, vec![(key(1), 12)]);
    }

    #[test]
    fn a_key_absent_before_the_merged_batch_is_the_earlier_batchs_say() {
        // Key 1 had a row before the early batch, which deleted it; the later
        // batch inserted and deleted it again: merged, a real delete.
        // Key 2 came in the early batch and went in the later: merged, passing.
        // Key 3, untouched early, came and went in the later batch: passing.
        let mut early = Batch {
            start: 5,
            frontier: 10,
            upserts: vec![(key(2), stats(2), 6)],
            deletes: vec![(key(1), 7)],
            absent_before: vec![key(2)],
            ..Batch::default()
        };
        let later = Batch {
            start: 10,
            frontier: 20,
            deletes: vec![(key(1), 14), (key(2), 15), (key(3), 16)],
            absent_before: vec![key(1), key(3)],
            ..Batch::default()
        };
        early.absorb(later);
        assert_eq!((early.start, early.frontier), (5, 20));
        assert_eq!(early.deletes, vec![(key(1), 14), (key(2), 15), (key(3), 16)]);
        assert_eq!(early.absent_before, vec![key(2), key(3)]);
        assert!(!early.passing(&key(1)) && early.passing(&key(2)) && early.passing(&key(3)));
    }
}
