//! The Kafka source: a timely operator per worker that reads its statically
//! assigned partitions without blocking, decodes, validates, decides lateness
//! per partition, and emits accepted events at their event time.
//!
//! - **Assignment**: partition `p` belongs to the worker with global index
//!   `p % peers`, across all processes; no consumer-group rebalancing. Offsets
//!   are still committed to the group, only so that lag tools work; resuming is
//!   driven by checkpoints.
//! - **Never blocks**: reads with a zero timeout, a batch of records at a
//!   time from a queue of its own ([`crate::fetch_queue`]), at most
//!   [`SourceConfig::batch`] per activation, then asks to be scheduled again (at once when it
//!   found data; when it did not, after `busy_poll` while records are
//!   flowing and after `idle_poll` once they have stopped: see [`next_poll`]).
//! - **Decisions** (lateness, duplicates, floors) are made per partition by
//!   [`crate::partition::Partition`] from the partition's own records and the
//!   recorded floors only: see there. The operator's capability is the least
//!   watermark over the partitions that hold it.
//! - **Idle partitions**: a partition with nothing new for `idle_timeout`
//!   (default 30 s; not while paused by backpressure, nor while it replays
//!   what an earlier run recorded) stops holding the capability back, so a
//!   quiet partition does not stall results: the worker's capability follows
//!   its partitions that are not quiet. When every partition of a worker is
//!   quiet, its capability follows what the other workers have read (workers
//!   tell each other, over a broadcast stream, just past the last record they
//!   read and whether they are quiet): while some read on, the latest of
//!   their records less the lateness bound, so that a quiet partition's
//!   record within the bound of the others' latest is on time, however long
//!   after theirs it arrives; when the whole input is quiet, just past the
//!   latest record.
//!   A quiet partition that reads a record again *wakes* the input: for
//!   [`WAKE_GRACE`] after that, on every worker, quiet partitions hold the
//!   capability where it is, so that a producer's burst after a quiet spell,
//!   which reaches the partitions one after another, does not release the
//!   ones it reaches last (whose records would then all be late).
//!   Whenever the capability passes a partition that does not hold it, that
//!   partition's floor rises to the capability at its current offset, and the
//!   decision is recorded with the PostgreSQL commit that covers it (Materialize
//!   calls this reclocking): a replay re-applies it at the same offset, so a
//!   record the first run found late is late again, whatever the timing.
//! - **Bounded runs** end at the end of their input, not at the end of time:
//!   once every worker has read its partitions to their end offsets, the
//!   workers agree on the end `T` (just past the latest record of any
//!   partition, its time clamped by its log time), record it as every partition's floor, and the sinks commit
//!   the results as of `T`, windows as they stand. The same job run again on a
//!   grown topic continues from there.
//! - **Backpressure**: with [`SourceConfig::max_in_flight`] set, the source
//!   bounds what memory holds on its account, per the PostgreSQL sink
//!   ([`Source::feedback`], handed to the sink as its `report_to`): the
//!   events it emitted until they have passed the dataflow
//!   ([`Committed::through`]), or, where the sink archives them, until they
//!   are committed; counted by 64 ms granules of event time, each released
//!   once all of it is. Plus the alerts the sink holds uncommitted.
//!   Statistics do not count: what waits of them is folded per card, so a
//!   catch-up without an archive reads on while its commits wait, and a
//!   store outage holds one row per card however long it lasts.
//!   Above the bound it pauses its partitions and presses the sink
//!   ([`Committed::press`]): what waits is committed at once, where a
//!   catch-up would wait for its catch-up interval. Should the sink have committed
//!   everything up to the dataflow's frontier and the count still be above
//!   the bound (many events ahead of the frontier), the partitions whose
//!   watermark holds the frontier back read on, since only they can let
//!   commits, and so the count, move again (without an archive, the
//!   partitions holding back what has passed the dataflow read on at once).
//!   Memory stays bounded while a store is down, and a slow store (with an
//!   archive to write) slows the source instead of filling the heap.
//! - **Bad records** (undecodable, invalid, too far in the future or past, late)
//!   leave on the dead-letter stream with their reason and coordinates.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use differential_dataflow::{AsCollection, VecCollection};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::ClientContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::{Scope, StreamVec};
use tripwire_dataflow::{Diff, FraudConfig, Time, Transaction};

use crate::avro::{Limits, TransactionCodec};
use crate::commit::{Committed, InputEnd};
use crate::dead_letter::DeadLetterReason;
use crate::fetch_queue::FetchQueue;
use crate::partition::{Partition, Restored, Rules, Verdict};
use crate::registry::SchemaRegistry;

/// How the source reads.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Kafka bootstrap servers.
    pub bootstrap: String,
    /// The topic of Avro transactions.
    pub topic: String,
    /// Consumer group, for committed offsets that lag tools read.
    pub group_id: String,
    /// Allowed out-of-orderness `L` within a partition, ms.
    pub lateness_ms: Time,
    /// After this long without a record a partition stops holding the
    /// capability back; `None` never (see the module documentation).
    pub idle_timeout: Option<Duration>,
    /// Most messages read per activation, so other operators get their turn.
    pub batch: usize,
    /// How long to wait before polling again after finding nothing, once
    /// nothing has been read for [`BUSY_SPELL`].
    pub idle_poll: Duration,
    /// How long to wait before polling again after finding nothing, while
    /// records were read in the last [`BUSY_SPELL`] (see [`next_poll`]).
    pub busy_poll: Duration,
    /// Read each partition up to its end offset at start-up, then finish
    /// (benchmarks, tests, bulk loads); otherwise run forever.
    pub bounded: bool,
    /// Where each partition starts; partitions not listed start at the beginning.
    pub start_offsets: HashMap<i32, i64>,
    /// Size and event-time limits.
    pub limits: Limits,
    /// Resuming after a crash: where lateness state starts and what to skip.
    pub resume: Option<Resume>,
    /// Records between two progress samples of a partition: fewer re-read after a crash, more rows.
    pub sample_every: u64,
    /// Most of what memory may hold on this worker's account: events it
    /// emitted that have not passed the dataflow (or, archived, are not
    /// committed), plus alerts the sink reporting to [`Source::feedback`]
    /// holds uncommitted (see the module's backpressure); `None` reads freely.
    pub max_in_flight: Option<u64>,
    /// How far back in event time a copy of an accepted event id makes a duplicate, ms.
    pub dedup_horizon_ms: Time,
    /// librdkafka consumer properties set over the source's own (fetch
    /// sizes and waits, security settings), as `(key, value)`.
    pub consumer_properties: Vec<(String, String)>,
}

/// How a restarted source reproduces the original run's decisions.
///
/// Each partition restarts at a recorded offset `o` (see [`ProgressSample`]),
/// with its watermark basis and recorded floors restored, so that every
/// decision comes out as before. Records below `skip_below` are still judged
/// (they move the watermark and are remembered for duplicate detection), but
/// not emitted: no output at or after the committed frontier depends on them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    /// Event time below which accepted records are not emitted.
    pub skip_below: Time,
    /// Per partition, what the earlier run leaves it.
    pub partitions: HashMap<i32, Restored>,
}

/// "Before offset `offset` of `partition`, the largest event time was `max_event_time`":
/// recorded as the source reads, so that a restart knows where to begin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgressSample {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The next offset to read.
    pub offset: i64,
    /// Largest event time among the partition's accepted records before `offset`.
    pub max_event_time: Time,
    /// The partition's watermark basis before `offset`.
    pub basis: Time,
    /// The largest `min(event_time, log_time)` before `offset`.
    pub top: Time,
}

/// Source decisions a store records with its commits: floors and read positions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceDecisions {
    /// `(partition, offset)` → floor: from that offset on, records below the floor are late.
    pub floors: BTreeMap<(i32, i64), Time>,
    /// Per partition, how far the source had read (a replay decides nothing new before it).
    pub positions: BTreeMap<i32, i64>,
}

impl SourceDecisions {
    /// Add `other`'s decisions: the greater floor per offset, the further position per partition.
    ///
    /// Both stores record decisions of one history (a restart takes the union
    /// of what they hold and re-applies it), so the union is that history as
    /// far as either store knows it.
    pub fn merge(&mut self, other: SourceDecisions) {
        for (k, f) in other.floors {
            let e = self.floors.entry(k).or_default();
            *e = (*e).max(f);
        }
        for (p, o) in other.positions {
            let e = self.positions.entry(p).or_default();
            *e = (*e).max(o);
        }
    }

    /// Nothing to store.
    pub fn is_empty(&self) -> bool {
        self.floors.is_empty() && self.positions.is_empty()
    }
}

/// The stores that record the source's decisions with their commits.
///
/// Each store records them: a store whose results depend on a decision holds
/// that decision, so a restart finds it even when the other store lost it (a
/// PostgreSQL failover to an older copy, or a crash while PostgreSQL was down
/// and Redis kept committing). Without that, a replay could decide anew and
/// disagree with results a store already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionStore {
    /// The PostgreSQL sink (`source_floors`, `source_positions`).
    Postgres = 0,
    /// The Redis sink (the `floors` and `positions` hashes).
    Redis = 1,
}

/// Decisions the source has taken and each store has not yet recorded.
#[derive(Clone, Debug, Default)]
pub struct Decisions(Arc<std::sync::Mutex<[SourceDecisions; 2]>>);

impl Decisions {
    fn update(&self, f: impl Fn(&mut SourceDecisions)) {
        self.0.lock().expect("source decisions").iter_mut().for_each(f);
    }
    /// From `offset` of `partition` on, records below `floor` are late.
    pub fn floor(&self, partition: i32, offset: i64, floor: Time) {
        self.update(|d| {
            let f = d.floors.entry((partition, offset)).or_default();
            *f = (*f).max(floor);
        });
    }
    /// The source has read each `(partition, offset)` up to that offset.
    pub fn positions(&self, read: impl Iterator<Item = (i32, i64)> + Clone) {
        self.update(|d| d.positions.extend(read.clone()));
    }
    /// What `store` has not recorded yet; its commit records it.
    pub fn take(&self, store: DecisionStore) -> SourceDecisions {
        std::mem::take(&mut self.0.lock().expect("source decisions")[store as usize])
    }
    /// A commit that failed: `store` records `taken` with a later one.
    pub fn put_back(&self, store: DecisionStore, taken: SourceDecisions) {
        self.0.lock().expect("source decisions")[store as usize].merge(taken);
    }
}

/// Samples the source has taken and a sink has not yet stored.
pub type Progress = Arc<std::sync::Mutex<Vec<ProgressSample>>>;

/// Sampled `(time, Kafka timestamp)` of emitted records, for the end-to-end latency a sink measures.
pub type ProduceTimes = Arc<std::sync::Mutex<Vec<(Time, i64)>>>;

/// Late records the source has rejected and a sink has not yet stored in `late_events`.
pub type LateEvents = Arc<std::sync::Mutex<Vec<DeadLetter>>>;

impl SourceConfig {
    /// Defaults for `topic` at `bootstrap`: 5 s lateness, 30 s idle timeout, 1 h dedup horizon, unbounded.
    pub fn new(bootstrap: &str, topic: &str) -> Self {
        SourceConfig {
            bootstrap: bootstrap.into(),
            topic: topic.into(),
            group_id: format!("tripwire-{topic}"),
            lateness_ms: 5_000,
            idle_timeout: Some(Duration::from_secs(30)),
            batch: 4_096,
            idle_poll: Duration::from_millis(5),
            busy_poll: Duration::from_millis(1),
            bounded: false,
            start_offsets: HashMap::new(),
            limits: Limits::default(),
            resume: None,
            sample_every: 5_000,
            max_in_flight: None,
            dedup_horizon_ms: 3_600_000,
            consumer_properties: Vec::new(),
        }
    }
}

/// A record that did not enter the dataflow, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// Why.
    pub reason: DeadLetterReason,
    /// The error text.
    pub detail: String,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The record's key, if any.
    pub key: Option<Vec<u8>>,
    /// The record's bytes as read.
    pub payload: Vec<u8>,
}

/// What the source produces on each worker.
pub struct Source<'s> {
    /// Accepted events, each at `config.time_of(event_time)`.
    pub events: VecCollection<'s, Time, Transaction, Diff>,
    /// Rejected records, at the capability's time when they were read.
    pub dead_letters: StreamVec<'s, Time, DeadLetter>,
    /// Progress samples for the PostgreSQL sink to store.
    pub progress: Progress,
    /// Late records for the PostgreSQL sink's `late_events` table (they also
    /// go to the dead-letter topic like every rejected record).
    pub late: LateEvents,
    /// For the sink whose commits release backpressure (its `report_to`).
    pub feedback: Committed,
    /// Sampled produce times, for the sink that measures end-to-end latency.
    pub produce_times: ProduceTimes,
    /// Floors and read positions for the sinks to store with their commits.
    pub decisions: Decisions,
    /// Where a bounded run ends (set once every worker has read to its end), for the sinks.
    pub end: InputEnd,
}

/// The source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Kafka refused or did not answer.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The topic does not exist.
    #[error("topic {0} does not exist (topics are created on purpose, not automatically)")]
    NoTopic(String),
    /// Retention removed records a restart needs.
    #[error(
        "cannot resume {topic} partition {partition} at offset {wanted}: the earliest offset the broker still has is {earliest} (retention removed records the job needs; raise retention above the longest window plus commit lag, or reset the job)"
    )]
    ResumePointGone {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// The recorded resume offset.
        wanted: i64,
        /// The log's start offset now.
        earliest: i64,
    },
}

/// librdkafka's client callbacks for the source: the end of a partition is
/// news in bounded mode, not an error worth a log line at ERROR. It also
/// learns what a partition's quiet depends on: whether a broker is reachable,
/// and which partitions the broker said hold records not yet read.
#[derive(Default)]
struct SourceContext {
    sight: Arc<Sight>,
}

/// What the consumer knows of the log beyond what the source has read.
#[derive(Default)]
struct Sight {
    /// No broker connection is up (set on transport failures, cleared by statistics).
    blind: std::sync::atomic::AtomicBool,
    /// Partitions that, at the last statistics, had records beyond the fetch
    /// position or fetched and not yet read.
    behind: std::sync::Mutex<std::collections::HashSet<i32>>,
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        SourceContext::lag(&statistics);
        let up = statistics.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        self.sight.blind.store(!up, std::sync::atomic::Ordering::Release);
        let behind = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.iter())
            .filter(|(p, part)| {
                **p >= 0
                    && (part.fetchq_cnt > 0
                        || (part.next_offset >= 0 && part.ls_offset > part.next_offset))
            })
            .map(|(p, _)| *p)
            .collect();
        *self.sight.behind.lock().expect("sight") = behind;
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error {
            e if crate::kafka_admin::is_partition_eof(&e) => {
                tracing::debug!(%reason, "end of partition")
            }
            KafkaError::Global(
                rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure
                | rdkafka::types::RDKafkaErrorCode::AllBrokersDown,
            ) => {
                self.sight.blind.store(true, std::sync::atomic::Ordering::Release);
                tracing::warn!(error = %error, %reason, "kafka client error");
            }
            _ => tracing::warn!(error = %error, %reason, "kafka client error"),
        }
    }
}

impl ConsumerContext for SourceContext {}

impl SourceContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): consumer lag per partition.
    fn lag(statistics: &rdkafka::Statistics) {
        for topic in statistics.topics.values() {
            for (p, part) in &topic.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    crate::metrics::consumer_lag()
                        .with_label_values(&[&p.to_string()])
                        .set(part.consumer_lag);
                }
            }
        }
    }
}

/// Events a worker emitted that memory still holds, for backpressure:
/// counted by granule of [`IN_FLIGHT_GRANULE`] ms of event time and released
/// once the sink's [`Committed::through`] (or, where it archives, its
/// committed frontier) has passed the whole granule. An event so counts at
/// most a granule longer than its own time would, never shorter.
/// Counted per event time, a catch-up's map held one key per millisecond
/// (a million per worker in a 2M-event bulk run), and its lookup per record
/// was a fiftieth of the workers' time.
#[derive(Default)]
struct InFlight {
    /// Count by the last time of each granule.
    by_end: BTreeMap<Time, u64>,
    /// The latest granule's end and its count not yet in `by_end`: records
    /// mostly come in runs of one partition's, and of nearby times.
    latest: Option<(Time, u64)>,
    /// All counted.
    total: u64,
}

/// The granule of [`InFlight`], ms (a power of two).
const IN_FLIGHT_GRANULE: Time = 64;

/// Records polled and decoded before the first of them is judged: enough
/// that duplicate detection's prefetched places arrive before they are
/// read, few enough that they are still in cache then.
const CHUNK: usize = 16;

impl InFlight {
    fn add(&mut self, t: Time) {
        let end = t | (IN_FLIGHT_GRANULE - 1);
        self.total += 1;
        match &mut self.latest {
            Some((e, n)) if *e == end => *n += 1,
            latest => {
                if let Some((e, n)) = latest.replace((end, 1)) {
                    *self.by_end.entry(e).or_default() += n;
                }
            }
        }
    }

    /// Forget every granule that lies wholly below `through`.
    fn release_below(&mut self, through: Time) {
        if let Some((e, n)) = self.latest.take() {
            *self.by_end.entry(e).or_default() += n;
        }
        while let Some(entry) = self.by_end.first_entry() {
            if *entry.key() >= through {
                break;
            }
            self.total -= entry.remove();
        }
    }
}

/// `tripwire_transactions_total` and `tripwire_transaction_amount_minor`, with
/// the counters looked up once per channel and country rather than per
/// record, counted on the worker and added to the shared metrics once per
/// activation: both workers updating the same counters and histogram per
/// record made their cache lines travel between the cores.
struct Business {
    by_kind: tripwire_dataflow::fxhash::FxHashMap<
        (tripwire_dataflow::Channel, [u8; 2]),
        prometheus::local::LocalIntCounter,
    >,
    amounts: prometheus::local::LocalHistogram,
}

impl Default for Business {
    fn default() -> Self {
        Business {
            by_kind: Default::default(),
            amounts: crate::metrics::transaction_amount().local(),
        }
    }
}

impl Business {
    fn count(&mut self, x: &Transaction) {
        self.by_kind
            .entry((x.channel, x.country))
            .or_insert_with(|| {
                let channel = match x.channel {
                    tripwire_dataflow::Channel::Pos => "POS",
                    tripwire_dataflow::Channel::Ecom => "ECOM",
                    tripwire_dataflow::Channel::Atm => "ATM",
                };
                let country = String::from_utf8_lossy(&x.country).into_owned();
                crate::metrics::transactions_total().with_label_values(&[channel, &country]).local()
            })
            .inc();
        self.amounts.observe(x.amount_minor as f64);
    }

    /// Add what was counted since the last flush to the shared metrics.
    fn flush(&self) {
        self.by_kind.values().for_each(|c| c.flush());
        self.amounts.flush();
    }
}

struct PartitionState {
    /// The partition's decisions.
    decide: Partition,
    since_sample: u64,
    last_record: Instant,
    /// In bounded mode: the offset to stop at (exclusive).
    end: Option<i64>,
    done: bool,
    /// Held back by backpressure.
    paused: bool,
    /// No broker reachable, or the broker said there is more to read.
    unsure: bool,
    /// `tripwire_source_events_total` of this partition.
    events: prometheus::IntCounter,
}

impl PartitionState {
    /// Quiet for `timeout` (or quiet at an earlier run's end and still), and
    /// neither paused, nor replaying recorded decisions, nor with a broker
    /// out of reach or saying there is more to read.
    fn idle(&self, timeout: Option<Duration>) -> bool {
        self.idle_at(timeout, Instant::now())
    }

    /// [`PartitionState::idle`] as of `now` (a clock already read).
    fn idle_at(&self, timeout: Option<Duration>, now: Instant) -> bool {
        timeout.is_some_and(|d| {
            now.saturating_duration_since(self.last_record) >= d || self.decide.still_quiet()
        }) && !self.paused
            && !self.unsure
            && !self.decide.replaying()
    }
}

/// How long, after a quiet partition reads a record again (on any worker),
/// the quiet partitions still hold the capability: what one producer sends
/// together reaches the partitions within its linger and a fetch or two of
/// each other, far less than this. Before, the first partition a burst
/// reached moved the frontier past the others, still idle, and their share
/// of the burst (about a thousand records a partition, in the store-rollback
/// test) was late.
pub const WAKE_GRACE: Duration = Duration::from_secs(1);

/// After reading a record, the source polls again `busy_poll` after finding
/// nothing for this long, and `idle_poll` after that.
pub const BUSY_SPELL: Duration = Duration::from_millis(100);

/// When to poll again after a poll that found nothing, the last record having
/// been read `since_read` ago (`None`: none yet). In steady traffic the next
/// fetch response is a millisecond or two away, and every millisecond it
/// waits in librdkafka's queue is a millisecond on the results' latency: at
/// 10,000 events/s, polling 1 ms rather than 5 ms after an empty poll took
/// 3 ms off the p50 and the p99 of produce -> visible (`bench/README.md`).
/// Once the input is quiet, polling that often would only cost CPU (an idle
/// job's doubled).
pub fn next_poll(config: &SourceConfig, since_read: Option<Duration>) -> Duration {
    match since_read {
        Some(d) if d < BUSY_SPELL => config.busy_poll,
        _ => config.idle_poll,
    }
}

/// A partition is idle after `idle_timeout` in which the source *saw* no
/// record of it: time in which it could not look (blocked, or not scheduled)
/// moves every partition's last record forward, so that records waiting in
/// the consumer's queue are never taken for quiet.
fn unobserved(partitions: &mut [PartitionState], time: Duration) {
    if time >= Duration::from_millis(100) {
        let now = Instant::now();
        for p in partitions {
            p.last_record = (p.last_record + time).min(now);
        }
    }
}

/// The partitions of a topic with `count` that worker `index` of `peers` reads
/// (the dead-letter sink writes their letters to the same partitions of its topic).
pub fn partitions_of(count: usize, index: usize, peers: usize) -> Vec<i32> {
    (0..count as i32).filter(|p| *p as usize % peers == index).collect()
}

/// Build the source operator for this worker.
pub fn kafka_source<'s>(
    scope: Scope<'s, Time>,
    config: &SourceConfig,
    fraud: &FraudConfig,
    registry: Arc<dyn SchemaRegistry>,
) -> Result<Source<'s>, SourceError> {
    let (index, peers) = (scope.index(), scope.peers());
    let mut client_config = ClientConfig::new();
    client_config
        .set("bootstrap.servers", &config.bootstrap)
        // Only so that committed offsets show consumer lag; partitions are
        // assigned statically, so the group never rebalances anything.
        .set("group.id", &config.group_id)
        // Offsets are committed by the operator (for lag tools only); nothing
        // is committed behind its back.
        .set("enable.auto.commit", "false")
        // A transactional producer's aborted batches must never become events.
        .set("isolation.level", "read_committed")
        // Positions come from the assignment (checkpoints). A resume offset
        // that retention removed is checked before assigning (an error, never
        // a silent jump); a partition started from its beginning starts at
        // whatever the log still holds.
        .set("auto.offset.reset", "earliest")
        // Bounded runs finish at each partition's end; with transactions the
        // last offset is a commit marker, never a record, so the end is seen
        // as an end-of-partition event rather than as a last record.
        .set("enable.partition.eof", if config.bounded { "true" } else { "false" })
        // Consumer lag per partition for `tripwire_consumer_lag`, from librdkafka's own view.
        .set("statistics.interval.ms", "2000")
        // When a partition's prefetch queue is full, fetch again 10 ms later,
        // not librdkafka's default 1 s: reading from offset 0 stalled for a
        // second at a time (consume-only 0.4-0.7M records/s instead of 1M).
        .set("fetch.queue.backoff.ms", "10");
    for (key, value) in &config.consumer_properties {
        client_config.set(key, value);
    }
    let client: BaseConsumer<SourceContext> =
        client_config.create_with_context(SourceContext::default())?;
    let count = crate::kafka_admin::partition_count(&config.bootstrap, &config.topic)?
        .ok_or_else(|| SourceError::NoTopic(config.topic.clone()))?;
    let mine = partitions_of(count, index, peers);
    // Records are read a batch at a time from a queue of the source's own,
    // set up before the partitions are assigned (see `fetch_queue`).
    let reader = FetchQueue::new(client, &config.topic, &mine)?;
    let client = reader.consumer();
    let sight = client.context().sight.clone();
    let mut assignment = TopicPartitionList::new();
    let mut partitions = Vec::new();
    for &p in &mine {
        let start = config.start_offsets.get(&p).map_or(Offset::Beginning, |o| Offset::Offset(*o));
        assignment.add_partition_offset(&config.topic, p, start)?;
        let (low, high) = crate::kafka_admin::while_starting(|| {
            client.fetch_watermarks(&config.topic, p, Duration::from_secs(10))
        })?;
        if let Some(&wanted) = config.start_offsets.get(&p) {
            if wanted < low {
                return Err(SourceError::ResumePointGone {
                    topic: config.topic.clone(),
                    partition: p,
                    wanted,
                    earliest: low,
                });
            }
        }
        let end = config.bounded.then_some(high);
        let start_at = config.start_offsets.get(&p).copied().unwrap_or(0);
        let restored =
            config.resume.as_ref().and_then(|r| r.partitions.get(&p).cloned()).unwrap_or_default();
        let mut decide = Partition::new(p, start_at, restored);
        decide.log_ends_at(high);
        partitions.push(PartitionState {
            decide,
            since_sample: 0,
            last_record: Instant::now(),
            done: end.is_some_and(|e| e <= start_at),
            end,
            paused: false,
            unsure: false,
            events: crate::metrics::source_events_total().with_label_values(&[&p.to_string()]),
        });
    }
    client.assign(&assignment)?;

    let mut builder = OperatorBuilder::new(format!("KafkaSource({})", config.topic), scope);
    let activator = scope.activator_for(builder.operator_info().address);
    let (events_out, events) = builder.new_output();
    let (dead_out, dead_letters) = builder.new_output();
    let (ends_out, ends) = builder.new_output();
    let mut events_out =
        OutputBuilder::<_, timely::container::CapacityContainerBuilder<Vec<_>>>::from(events_out);
    let mut dead_out =
        OutputBuilder::<_, timely::container::CapacityContainerBuilder<Vec<_>>>::from(dead_out);
    let mut ends_out =
        OutputBuilder::<_, timely::container::CapacityContainerBuilder<Vec<News>>>::from(ends_out);

    let mut codec = TransactionCodec::new(registry, config.limits.clone());
    let config = config.clone();
    let fraud = fraud.clone();
    let rules =
        Rules { lateness_ms: config.lateness_ms, dedup_horizon_ms: config.dedup_horizon_ms };
    // Partition number → its index in `partitions` (numbers are small and
    // dense: a look-up in a list, where a hashed map cost a SipHash per record).
    let mut place: Vec<Option<usize>> = Vec::new();
    for (i, p) in partitions.iter().enumerate() {
        let n = usize::try_from(p.decide.partition).expect("partition numbers are not negative");
        if place.len() <= n {
            place.resize(n + 1, None);
        }
        place[n] = Some(i);
    }
    let index_of =
        move |p: i32| usize::try_from(p).ok().and_then(|n| place.get(n).copied().flatten());
    let mut last_commit = Instant::now();
    let progress: Progress = Arc::default();
    let samples = progress.clone();
    let late: LateEvents = Arc::default();
    let late_out = late.clone();
    let decisions = Decisions::default();
    let decided = decisions.clone();
    let end = InputEnd::default();
    let end_for_sinks = end.clone();
    let skip_below = config.resume.as_ref().map_or(0, |r| r.skip_below);
    let feedback = Committed::default();
    let produce_times: ProduceTimes = Arc::default();
    let produced = produce_times.clone();
    let mut business = Business::default();
    let mut emitted: u64 = 0;
    let released = feedback.clone();
    let mut in_flight = InFlight::default();
    let paused_gauge =
        crate::metrics::source_paused_partitions().with_label_values(&[&index.to_string()]);
    let duplicates = crate::metrics::duplicates_total().with_label_values::<&str>(&[]);
    // What every worker has read, gathered by every worker (see `gossip`).
    let heard = gossip(ends, peers, activator.clone());
    let mut told: Option<News> = None;
    // Quiet partitions this worker saw read a record again, and until when
    // quiet partitions hold the capability after the last wake-up anywhere.
    let mut wakes: u64 = 0;
    let mut heard_wakes: u64 = 0;
    let mut grace_until: Option<Instant> = None;
    let mut last_activation = Instant::now();
    let mut last_read: Option<Instant> = None;
    let mut told_at = Instant::now();

    builder.build(move |capabilities| {
        let mut caps = Some(capabilities);
        move |_frontiers| {
            let Some(held) = caps.as_mut() else { return };
            let mut events_handle = events_out.activate();
            let mut dead_handle = dead_out.activate();
            let mut events_session = events_handle.session(&held[0]);
            let mut dead_session = dead_handle.session(&held[1]);
            // Time this worker spent elsewhere (other operators, a stall) is
            // not time in which a partition was seen to be quiet.
            let expected = config.idle_poll + Duration::from_millis(50);
            unobserved(&mut partitions, last_activation.elapsed().saturating_sub(expected));
            // Nor is time in which no broker could be reached (a broker
            // restart longer than the idle timeout released every partition
            // with a backlog, and made it late), nor a partition the broker
            // said has records this source has not read yet.
            {
                let blind = sight.blind.load(std::sync::atomic::Ordering::Acquire);
                let behind = sight.behind.lock().expect("sight");
                let now = Instant::now();
                for p in partitions.iter_mut() {
                    p.unsure = blind || behind.contains(&p.decide.partition);
                    if p.unsure {
                        p.last_record = now;
                    }
                }
            }
            let mut read = 0;
            // One clock read per chunk: the time since the previous one is
            // polling (no wait), decoding and judging, so a registry that
            // keeps a decode waiting shows in it as in the decode's own time.
            let mut clock = Instant::now();
            // Records are polled and decoded a chunk at a time, and the place
            // duplicate detection looks each one up in is asked for as it is
            // decoded: by the time the chunk is judged it is in cache.
            let mut chunk = Vec::with_capacity(CHUNK);
            let mut fetched = Vec::with_capacity(CHUNK);
            // The consumer's own queue first: its events (statistics,
            // errors) are served by polling it; a record found there (none
            // is expected: see `fetch_queue`) is read like any other.
            while fetched.len() < CHUNK {
                match reader.poll() {
                    None => break,
                    Some(polled) => fetched.push(polled),
                }
            }
            let mut polled_all = false;
            while read < config.batch && !polled_all {
                let want = CHUNK.min(config.batch - read);
                if fetched.len() < want {
                    reader.read(want - fetched.len(), Duration::ZERO, &mut fetched);
                    polled_all = fetched.len() < want;
                }
                read += fetched.len();
                for result in fetched.drain(..) {
                    let msg = match result {
                        Ok(m) => m,
                        Err(KafkaError::PartitionEOF(p)) => {
                            if let Some(i) = index_of(p) {
                                partitions[i].done = config.bounded;
                            }
                            continue;
                        }
                        // Broker and network errors are retried by librdkafka; they are not records.
                        Err(e) => {
                            tracing::warn!(error = %e, "kafka source poll error");
                            continue;
                        }
                    };
                    let Some(i) = index_of(msg.partition()) else { continue };
                    if partitions[i].end.is_some_and(|end| msg.offset() >= end) {
                        partitions[i].done = true;
                        continue;
                    }
                    let decoded =
                        codec.decode(msg.payload().unwrap_or_default(), msg.timestamp_ms());
                    if let Ok(x) = &decoded {
                        partitions[i].decide.prefetch(x.event_id);
                    }
                    chunk.push((msg, i, decoded));
                }
                let now = Instant::now();
                // Waiting for an unreachable schema registry is not quiet time.
                unobserved(&mut partitions, now - clock);
                clock = now;
                for (msg, i, decoded) in chunk.drain(..) {
                    let payload = msg.payload().unwrap_or_default();
                    let log_time = msg.timestamp_ms();
                    let part = &mut partitions[i];
                    if part.idle_at(config.idle_timeout, now) {
                        // The input wakes: quiet partitions hold for a while.
                        wakes += 1;
                        grace_until = Some(now + WAKE_GRACE);
                    }
                    part.last_record = now;
                    let verdict = match decoded {
                        Ok(x) => {
                            let t = fraud.time_of(x.event_time_ms);
                            part.decide
                                .judge(&rules, msg.offset(), log_time, &x, t)
                                .map(|v| (x, t, v))
                        }
                        Err(rejected) => {
                            part.decide.skipped(msg.offset());
                            Err(rejected)
                        }
                    };
                    match verdict {
                        Ok((x, _, Verdict::Duplicate)) => {
                            duplicates.inc();
                            tracing::debug!(
                                event_id = x.event_id,
                                partition = msg.partition(),
                                offset = msg.offset(),
                                "identical duplicate counted once"
                            );
                        }
                        // Replayed below what any uncommitted output needs: the
                        // partition's state moved, nothing else to do.
                        Ok((x, _, Verdict::Accept)) if x.event_time_ms < skip_below => {}
                        Ok((x, t, Verdict::Accept)) => {
                            part.events.inc();
                            business.count(&x);
                            emitted += 1;
                            // One record in 64 is followed to its commit.
                            if emitted.is_multiple_of(64) {
                                if let Some(ts) = log_time {
                                    produced.lock().expect("produce times").push((t, ts));
                                }
                            }
                            if config.max_in_flight.is_some() {
                                in_flight.add(t);
                            }
                            events_session.give((x, t, 1 as Diff))
                        }
                        Err(rejected) => {
                            tracing::warn!(
                                reason = rejected.reason.as_str(),
                                event_id = rejected.event_id,
                                worker = index,
                                partition = msg.partition(),
                                offset = msg.offset(),
                                "dead letter: {}",
                                rejected.detail
                            );
                            let letter = DeadLetter {
                                reason: rejected.reason,
                                detail: rejected.detail,
                                topic: config.topic.clone(),
                                partition: msg.partition(),
                                offset: msg.offset(),
                                key: msg.key().map(<[u8]>::to_vec),
                                payload: payload.to_vec(),
                            };
                            if letter.reason == DeadLetterReason::Late {
                                late_out.lock().expect("late events").push(letter.clone());
                            }
                            dead_session.give(letter);
                        }
                    }
                    // After the record's dead letter, if any: a restart point is
                    // stored only once the dead letters before it are delivered.
                    let part = &mut partitions[i];
                    part.since_sample += 1;
                    if part.since_sample >= config.sample_every {
                        part.since_sample = 0;
                        if let (Some(max_event_time), Some(top)) =
                            (part.decide.max_event, part.decide.top)
                        {
                            let basis = part.decide.basis.unwrap_or(0);
                            samples.lock().expect("progress samples").push(ProgressSample {
                                topic: config.topic.clone(),
                                partition: part.decide.partition,
                                offset: msg.offset() + 1,
                                max_event_time,
                                basis,
                                top,
                            });
                        }
                    }
                }
            }
            drop(events_session);
            drop(dead_session);

            let mut over = false;
            if let Some(max) = config.max_in_flight {
                let committed = released.frontier();
                let archives = released.archives();
                let through = released.through();
                in_flight.release_below(if archives { committed } else { through });
                let alerts = released.alerts_held();
                over = in_flight.total + alerts > max;
                // Over the bound, what waits is committed at once, not at the
                // catch-up interval: the paused partitions read on after one
                // commit. Every worker's sink is pressed (the news below):
                // a batch ends where every worker's results are final, so
                // one worker's epoch left open held every worker's commits
                // back. (Asking at half the bound, so that the commit ran
                // while the source read on, cost more than it saved: twice
                // the commits, each of nearly every card, 70 s against 48 s
                // for the 10M-event benchmark topic, and 3.6 GB against 2.7.)
                released.press(over || heard.borrow().pressed_elsewhere(index));
                // Archived events wait for commits: once the sink has
                // committed all it has, only more input can move the
                // frontier, and then the partitions holding it back read on.
                // Other events wait for the dataflow alone: the partitions
                // holding back what has passed it read on at once.
                let (frontier, caught_up) = if archives {
                    let input = released.input_frontier();
                    (input, committed >= input)
                } else {
                    (through, true)
                };
                let (mut pause, mut resume) =
                    (TopicPartitionList::new(), TopicPartitionList::new());
                for p in partitions.iter_mut() {
                    let ahead = p
                        .decide
                        .watermark(&rules, |t| fraud.time_of(t))
                        .is_some_and(|w| w > frontier);
                    let hold = over && !p.done && (ahead || !caught_up);
                    if hold != p.paused {
                        p.paused = hold;
                        // Paused time is not quiet time.
                        p.last_record = Instant::now();
                        let list = if hold { &mut pause } else { &mut resume };
                        list.add_partition(&config.topic, p.decide.partition);
                    }
                }
                if pause.count() + resume.count() > 0 {
                    let paused = partitions.iter().filter(|p| p.paused).count();
                    paused_gauge.set(paused as i64);
                    tracing::info!(
                        worker = index,
                        events = in_flight.total,
                        alerts,
                        committed,
                        frontier,
                        paused,
                        "backpressure: {} partitions paused",
                        paused
                    );
                    // A failure here only loosens the bound; reading goes on.
                    for (list, what) in [(&pause, "pause"), (&resume, "resume")] {
                        if list.count() > 0 {
                            let r = if what == "pause" {
                                reader.consumer().pause(list)
                            } else {
                                reader.consumer().resume(list)
                            };
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "could not {what} partitions");
                            }
                        }
                    }
                }
            }

            // Just past the last record read (its time clamped by its log
            // time): where the capability goes when nothing holds it (all
            // quiet, or all read).
            let past_last =
                partitions.iter().filter_map(|p| p.decide.top).max().map(|b| fraud.time_of(b) + 1);
            let all_done = partitions.iter().all(|p| p.done);
            // A wake-up anywhere, read in the same message as what woke it:
            // before this worker says whether it is quiet.
            let woken = heard.borrow().wakes();
            if woken > heard_wakes {
                heard_wakes = woken;
                grace_until = Some(Instant::now() + WAKE_GRACE);
            }
            let in_grace = grace_until.is_some_and(|g| Instant::now() < g);
            let holding: Vec<Option<Time>> = partitions
                .iter()
                .filter(|p| !p.done && (in_grace || !p.idle(config.idle_timeout)))
                .map(|p| p.decide.watermark(&rules, |t| fraud.time_of(t)))
                .collect();
            // Tell the other workers how far this one has read, whether all
            // its partitions are quiet, and whether it has read everything:
            // when news changed, at most every 50 ms, and at once when it is done.
            let news = News {
                worker: index,
                seq: told.map_or(0, |t| t.seq),
                past_last: past_last.unwrap_or(0).max(*held[0].time()),
                quiet: !all_done && holding.is_empty(),
                done: all_done,
                pressed: over,
                wakes,
            };
            if told != Some(news) && (all_done || told_at.elapsed() >= Duration::from_millis(50)) {
                let news = News { seq: news.seq + 1, ..news };
                ends_out.activate().session(&held[2]).give(news);
                told = Some(news);
                told_at = Instant::now();
            }
            let target = if all_done {
                // Bounded: wait until every worker has read everything, and
                // end just past the latest record any of them read.
                let heard = heard.borrow();
                heard.all_done().then(|| heard.latest().max(*held[0].time()))
            } else if holding.is_empty() {
                // All quiet here: this worker holds nothing back.
                match heard.borrow().busy_latest(index) {
                    // Others read on: follow the latest of their records less
                    // the lateness bound, as a quiet partition beside a busy
                    // one on the same worker follows that one's watermark. A
                    // record of these partitions within the bound of the
                    // others' latest is on time, however long after theirs
                    // it arrives.
                    Some(latest) => Some(fraud.time_of(latest.saturating_sub(rules.lateness_ms))),
                    // The whole input is quiet: just past the latest record.
                    None => past_last.into_iter().chain([heard.borrow().latest()]).max(),
                }
            } else if holding.iter().any(Option::is_none) {
                None
            } else {
                holding.iter().flatten().min().copied()
            };
            if let Some(t) = target.filter(|t| *t > *held[0].time()) {
                // Record the floor of every partition the capability passes
                // before passing it: a commit at or below `t` carries them.
                for p in partitions.iter_mut() {
                    if p.decide.watermark(&rules, |t| fraud.time_of(t)).is_none_or(|w| w < t) {
                        if let Some(floor) = p.decide.release_to(t) {
                            tracing::debug!(
                                worker = index,
                                partition = p.decide.partition,
                                offset = floor.0,
                                floor = floor.1,
                                quiet_ms = p.last_record.elapsed().as_millis() as u64,
                                still_quiet = p.decide.still_quiet(),
                                done = p.done,
                                "the frontier passes a partition that does not hold it"
                            );
                            decided.floor(p.decide.partition, floor.0, floor.1);
                        }
                    }
                }
                held[0].downgrade(&t);
                held[1].downgrade(&t);
                held[2].downgrade(&t);
            }
            decided
                .positions(partitions.iter().map(|p| (p.decide.partition, p.decide.next_offset)));
            if all_done && target.is_some() {
                // Every worker has read its input: the sinks commit up to the
                // agreed end, and the dataflow ends.
                end_for_sinks.set(*held[0].time());
                caps = None;
            } else if read > 0 {
                activator.activate();
            } else {
                activator.activate_after(next_poll(&config, last_read.map(|t| t.elapsed())));
            }
            business.flush();
            last_activation = Instant::now();
            if read > 0 {
                last_read = Some(last_activation);
            }
            if last_commit.elapsed() >= Duration::from_secs(5) || caps.is_none() {
                last_commit = Instant::now();
                // For lag tools only; a failure here loses nothing.
                if let Err(e) = reader.consumer().commit_consumer_state(CommitMode::Async) {
                    tracing::debug!(error = %e, "offset commit for lag monitoring failed");
                }
            }
        }
    });

    Ok(Source {
        events: events.as_collection(),
        dead_letters,
        progress,
        late,
        feedback,
        produce_times,
        decisions,
        end,
    })
}

/// What a source worker tells the others: just past the last record it read,
/// whether it has read all its partitions to their end (bounded runs), and
/// whether it is at its backpressure bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct News {
    worker: usize,
    /// The sender's count of its news: messages of one sender may overtake
    /// each other, and the latest is the one with the largest count.
    seq: u64,
    past_last: Time,
    /// Whether all the sender's partitions are quiet (it holds nothing back).
    quiet: bool,
    done: bool,
    pressed: bool,
    /// Quiet partitions of this worker that read a record again, so far.
    wakes: u64,
}

/// The latest news of every worker.
struct Heard {
    latest: Vec<Option<News>>,
}

impl Heard {
    /// Whether a worker other than `me` is at its backpressure bound.
    fn pressed_elsewhere(&self, me: usize) -> bool {
        self.latest.iter().flatten().any(|n| n.pressed && n.worker != me)
    }

    /// Just past the last record any worker has read.
    fn latest(&self) -> Time {
        self.latest.iter().flatten().map(|n| n.past_last).max().unwrap_or(0)
    }

    /// Just past the latest record read by a worker other than `me` that is
    /// not quiet, if any is: what a worker whose partitions are all quiet
    /// follows (less the lateness bound) while others read on.
    fn busy_latest(&self, me: usize) -> Option<Time> {
        self.latest
            .iter()
            .flatten()
            .filter(|n| n.worker != me && !n.quiet && !n.done)
            .map(|n| n.past_last)
            .max()
    }

    /// Wake-ups of the input seen by any worker, so far.
    fn wakes(&self) -> u64 {
        self.latest.iter().flatten().map(|n| n.wakes).sum()
    }

    /// Whether every worker has read all its input.
    fn all_done(&self) -> bool {
        self.latest.iter().all(|n| n.is_some_and(|n| n.done))
    }
}

/// Gather every worker's news (broadcast): a worker whose partitions are all
/// quiet follows what the others have read, and a bounded run ends once every
/// worker has read everything, just past the latest record any of them read.
fn gossip(
    news: StreamVec<'_, Time, News>,
    peers: usize,
    wake: timely::scheduling::Activator,
) -> std::rc::Rc<std::cell::RefCell<Heard>> {
    use timely::dataflow::operators::vec::Broadcast;
    use timely::dataflow::operators::Inspect;
    let heard = std::rc::Rc::new(std::cell::RefCell::new(Heard { latest: vec![None; peers] }));
    let result = heard.clone();
    news.broadcast().inspect(move |n| {
        let mut h = heard.borrow_mut();
        let slot = &mut h.latest[n.worker];
        // Messages of one sender may overtake each other: keep its latest.
        let newer = slot.is_none_or(|s| n.seq > s.seq);
        let pressing = slot.is_some_and(|s| s.pressed) != n.pressed;
        let woke = slot.is_none_or(|s| n.wakes > s.wakes);
        let wakes = slot.map_or(n.wakes, |s| s.wakes.max(n.wakes));
        if newer {
            *slot = Some(*n);
        }
        if let Some(s) = slot.as_mut() {
            s.wakes = wakes;
        }
        // The end, a press and a wake-up are acted on at once (see `Committed::press`).
        if (newer && (n.done || pressing)) || (woke && n.wakes > 0) {
            wake.activate();
        }
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Right after records, an empty poll is retried within the busy poll;
    /// from a busy spell after the last record on (or before any), within
    /// the idle poll.
    #[test]
    fn an_empty_poll_is_retried_sooner_while_records_flow() {
        let config = SourceConfig::new("localhost:9092", "t");
        assert!(config.busy_poll < config.idle_poll);
        assert_eq!(next_poll(&config, Some(Duration::ZERO)), config.busy_poll);
        assert_eq!(
            next_poll(&config, Some(BUSY_SPELL - Duration::from_millis(1))),
            config.busy_poll
        );
        assert_eq!(next_poll(&config, Some(BUSY_SPELL)), config.idle_poll);
        assert_eq!(next_poll(&config, Some(Duration::from_secs(60))), config.idle_poll);
        assert_eq!(next_poll(&config, None), config.idle_poll);
    }

    /// Against every event's own time: after each release, exactly the
    /// events whose granule reaches `through` still count, so none at or
    /// after `through` was let go and none counts past its granule.
    #[test]
    fn in_flight_events_are_released_by_whole_granules_once_through() {
        let mut next = tripwire_dataflow::seeded(11);
        for _ in 0..200 {
            let mut counted = InFlight::default();
            let mut events: Vec<Time> = Vec::new();
            let mut through: Time = 0;
            let mut around: Time = 1_000;
            for _ in 0..300 {
                if next(5) == 0 {
                    through += next(300);
                    counted.release_below(through);
                    events.retain(|&t| t | (IN_FLIGHT_GRANULE - 1) >= through);
                    assert!(events.iter().all(|&t| t + IN_FLIGHT_GRANULE > through));
                    assert_eq!(counted.total, events.len() as u64);
                } else {
                    // Runs of nearby times, out of order, some already through.
                    around += next(40);
                    let t = around.saturating_sub(next(200));
                    counted.add(t);
                    events.push(t);
                    assert_eq!(counted.total, events.len() as u64);
                }
            }
        }
    }
}
