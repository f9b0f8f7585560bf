//! The dead-letter sink: every rejected record goes to the dead-letter topic,
//! its payload untouched (unless too large, below), with the reason and its
//! source coordinates in headers.
//!
//! Exactly once, across crashes and restarts:
//! - a dead letter goes to the dead-letter partition of its source partition
//!   (the topic has at least as many partitions as the input), in source
//!   offset order, in Kafka transactions (one transactional id per worker);
//! - on start the sink reads the last committed letter of each dead-letter
//!   partition: its `source.offset` header says up to where a replay's dead
//!   letters are already there, and those are skipped;
//! - a restart point (progress sample) reaches the PostgreSQL sink only once
//!   the transaction holding every dead letter before it is committed
//!   ([`Confirm`]), so that no restart can begin after a dead letter that
//!   never landed.
//!
//! The producer runs on a thread of its own, fed in order by the operator: a
//! transaction's commit waits for the broker, and on the worker's thread it
//! held up every operator of the worker (in a bulk run the workers spent
//! half their time there).
//!
//! A letter the dead-letter topic will not take whole (larger than its
//! `max.message.bytes`, refused by the client or by the broker) goes without
//! its key and payload, with a [`headers::PAYLOAD_OMITTED`] header giving the
//! payload's size: the record itself is still in the source topic at the
//! coordinates the letter names. Without that, the refused letter failed
//! every commit of its transaction and stalled the worker for good.
//!
//! Read the topic with `isolation.level=read_committed` (librdkafka's
//! default; the Java client's default is `read_uncommitted`): a transaction
//! that failed and was sent again leaves aborted copies behind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::StreamVec;
use tripwire_dataflow::Time;

use crate::dead_letter::DeadLetterReason;
use crate::kafka_admin::ReadsToEnd;
use crate::kafka_source::{DeadLetter, Progress, ProgressSample};
use crate::metrics::dead_letters_total;

/// Header names on dead-letter records.
pub mod headers {
    /// The reason class, e.g. `late`.
    pub const REASON: &str = "tripwire.reason";
    /// The error text.
    pub const ERROR: &str = "tripwire.error";
    /// Where the record was read: topic.
    pub const TOPIC: &str = "source.topic";
    /// Partition, decimal.
    pub const PARTITION: &str = "source.partition";
    /// Offset, decimal.
    pub const OFFSET: &str = "source.offset";
    /// The job that wrote the letter: jobs may share a dead-letter topic
    /// (and read the same source), and each reads back only its own letters.
    pub const JOB: &str = "tripwire.job";
    /// On a letter sent without its key and payload, because the topic would
    /// not take it whole: the payload's size in bytes, decimal.
    pub const PAYLOAD_OMITTED: &str = "tripwire.payload-omitted";
}

/// The value of `m`'s header `name` (the first of that name), as text.
pub fn header(m: &impl Message, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Restart points the source took, and those whose dead letters are all delivered.
#[derive(Clone)]
pub struct Confirm {
    /// What the source took (`Source::progress`).
    pub taken: Progress,
    /// What the PostgreSQL sink may store.
    pub confirmed: Progress,
    /// Set once the input has ended and every letter is committed and every
    /// restart point confirmed: a bounded run's last PostgreSQL commit waits
    /// for it, so that it stores them all.
    pub settled: Arc<AtomicBool>,
}

/// The dead-letter topic could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Kafka refused or did not answer.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Too few partitions for one per input partition.
    #[error("dead-letter topic {topic} has {has} partitions, fewer than the input's {needs}: each input partition's dead letters go to a partition of their own (add partitions)")]
    TooFewPartitions {
        /// The dead-letter topic.
        topic: String,
        /// Its partitions.
        has: usize,
        /// The input's partitions.
        needs: usize,
    },
}

/// One committed letter as the tail readers see it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// Its source partition and offset.
    partition: i32,
    offset: i64,
    late: bool,
}

/// This source's committed letters at the end of each partition of `topic`
/// (of those in `only`, if given), by dead-letter partition, read backwards
/// until `enough(partition, letters)`.
///
/// Reads with `read_committed`: the last record of a partition is usually a
/// transaction marker, not a letter, and letters of aborted transactions are
/// not there at all; so it reads the last 16 records, then 32, 64 and so on
/// until `enough` or the partition's start (a topic may hold other sources'
/// letters too).
fn read_back(
    bootstrap: &str,
    topic: &str,
    source_topic: &str,
    job: &str,
    only: Option<&[i32]>,
    enough: impl Fn(i32, &[Seen]) -> bool,
) -> Result<HashMap<i32, Vec<Seen>>, KafkaError> {
    let consumer: BaseConsumer<ReadsToEnd> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("tripwire-dlq-tail-{topic}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        // Each round (16 records back, then 32, ...) waits for its fetch to
        // reach the end: at the default 500 ms a start spent seconds here.
        .set("fetch.wait.max.ms", "10")
        .create_with_context(ReadsToEnd)?;
    let count = crate::kafka_admin::partition_count(bootstrap, topic)?.unwrap_or(0);
    // Per partition still unsettled: (its start, its end, how far back to read).
    let mut unsettled: HashMap<i32, (i64, i64, i64)> = HashMap::new();
    for p in (0..count as i32).filter(|p| only.is_none_or(|only| only.contains(p))) {
        let (low, high) = crate::kafka_admin::while_starting(|| {
            consumer.fetch_watermarks(topic, p, Duration::from_secs(10))
        })?;
        if high > low {
            unsettled.insert(p, (low, high, 16));
        }
    }
    let mut found: HashMap<i32, Vec<Seen>> = HashMap::new();
    while !unsettled.is_empty() {
        let mut assignment = TopicPartitionList::new();
        for (&p, &(low, high, back)) in &unsettled {
            assignment.add_partition_offset(topic, p, Offset::Offset((high - back).max(low)))?;
            // Each round reads its window whole.
            found.remove(&p);
        }
        consumer.assign(&assignment)?;
        let mut at_end = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while at_end < unsettled.len() {
            if std::time::Instant::now() > deadline {
                return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut));
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let header = |name: &str| header(&m, name);
                    if header(headers::TOPIC).as_deref() != Some(source_topic) {
                        continue;
                    }
                    // Another job's letter. (One without the header was
                    // written before letters named their job, when each
                    // job counted every letter of its source as its own.)
                    if header(headers::JOB).is_some_and(|j| j != job) {
                        continue;
                    }
                    let partition = header(headers::PARTITION).and_then(|p| p.parse::<i32>().ok());
                    let offset = header(headers::OFFSET).and_then(|o| o.parse::<i64>().ok());
                    if let (Some(partition), Some(offset)) = (partition, offset) {
                        let late = header(headers::REASON).as_deref()
                            == Some(DeadLetterReason::Late.as_str());
                        found.entry(m.partition()).or_default().push(Seen {
                            partition,
                            offset,
                            late,
                        });
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => at_end += 1,
                // The broker away for a moment: the consumer reconnects on its
                // own, within the deadline.
                Some(Err(e)) if crate::kafka_admin::starting(&e) => {
                    tracing::debug!(error = %e, topic, "reading the dead-letter tail: broker away");
                }
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
        unsettled.retain(|p, (low, high, back)| {
            let read = found.get(p).map_or(&[][..], Vec::as_slice);
            let settled = enough(*p, read) || *high - *back <= *low;
            *back *= 2;
            !settled
        });
    }
    Ok(found)
}

/// Per source partition, the highest source offset whose dead letter `job`
/// committed in `topic` already: a replay skips letters up to there. A
/// letter goes to the dead-letter partition of its source partition's
/// number, so a worker reads `only` its own source partitions' (every
/// partition with `None`).
pub fn written(
    bootstrap: &str,
    topic: &str,
    source_topic: &str,
    job: &str,
    only: Option<&[i32]>,
) -> Result<HashMap<i32, i64>, KafkaError> {
    let tails =
        read_back(bootstrap, topic, source_topic, job, only, |_, letters| !letters.is_empty())?;
    let mut found = HashMap::new();
    for s in tails.values().flatten() {
        let e = found.entry(s.partition).or_insert(s.offset);
        *e = (*e).max(s.offset);
    }
    Ok(found)
}

/// Per source partition, the source offsets at or after `from[partition]`
/// whose letters with reason `late` `job` committed in `topic`.
///
/// A replay must find those records late again. Lateness against a floor
/// (a quiet partition passed by the frontier) depends on timing, and the
/// floor is recorded with the store's next commit; a letter committed before
/// that commit, then a crash, leaves a replay that would not know the floor
/// and could accept the record its letter already rejects. The committed
/// letter is itself the record of that decision.
pub fn committed_late(
    bootstrap: &str,
    topic: &str,
    source_topic: &str,
    job: &str,
    from: &HashMap<i32, i64>,
) -> Result<HashMap<i32, Vec<i64>>, KafkaError> {
    let start = |p: i32| from.get(&p).copied().unwrap_or(0);
    let tails = read_back(bootstrap, topic, source_topic, job, None, |_, letters| {
        letters.iter().any(|s| s.offset < start(s.partition))
    })?;
    let mut late: HashMap<i32, Vec<i64>> = HashMap::new();
    for s in tails.values().flatten().filter(|s| s.late && s.offset >= start(s.partition)) {
        late.entry(s.partition).or_default().push(s.offset);
    }
    for offsets in late.values_mut() {
        offsets.sort_unstable();
        offsets.dedup();
    }
    Ok(late)
}

/// The dead-letter producer of one worker: letters go out in Kafka
/// transactions, each committed before the restart points taken after its
/// letters are confirmed.
///
/// An idempotent producer alone is not enough: after a broker restart or a
/// timed-out request librdkafka may bump the producer epoch and send letters
/// the broker had already written again (confluentinc/librdkafka#4953). In a
/// transaction such a failure aborts instead, and the letters are sent again
/// in a new one, so a `read_committed` reader sees each letter once. A
/// restarted worker's `init_transactions` (same transactional id) aborts what
/// its previous incarnation left open.
struct Transactional {
    bootstrap: String,
    id: String,
    /// The job whose letters these are ([`headers::JOB`]).
    job: String,
    producer: ThreadedProducer<Delivery>,
    /// The delivery reports of `producer`'s letters.
    reports: Arc<Reports>,
    /// Whether a transaction is open (it may hold no letter yet: its first
    /// was refused by the client).
    in_transaction: bool,
    /// Letters sent in the open transaction.
    open: Vec<Letter>,
    /// When the open transaction began.
    began: Instant,
}

/// A dead letter as sent.
#[derive(Clone)]
struct Letter {
    d: DeadLetter,
    /// The size of the payload left out, when the topic would not take it whole.
    omitted: Option<usize>,
    /// Whether the broker has refused it as too large (sent whole once more,
    /// with the topic's limit read again, before its payload is left out).
    refused: bool,
}

impl Letter {
    /// The most of a letter's error text kept when its payload is left out.
    const DETAIL: usize = 1024;

    /// This letter without its key and payload (and its error text cut to
    /// [`Self::DETAIL`] bytes), or `None` if it has been cut already.
    fn without_payload(&self) -> Option<Letter> {
        if self.omitted.is_some() {
            return None;
        }
        let mut d = self.d.clone();
        let mut end = d.detail.len().min(Self::DETAIL);
        while !d.detail.is_char_boundary(end) {
            end -= 1;
        }
        d.detail.truncate(end);
        d.key = None;
        let omitted = std::mem::take(&mut d.payload).len();
        tracing::warn!(topic = %d.topic, partition = d.partition, offset = d.offset,
            bytes = omitted, "dead letter too large for its topic; sent without its payload");
        Some(Letter { d, omitted: Some(omitted), refused: false })
    }
}

/// The delivery reports of one producer's open transaction.
#[derive(Default)]
struct Reports {
    seen: Mutex<Reported>,
    came: Condvar,
}

#[derive(Default)]
struct Reported {
    /// How many came.
    reports: usize,
    /// Whether any letter failed.
    failed: bool,
    /// The letters (by their place in the transaction) refused as too large.
    refused: Vec<usize>,
}

/// The dead-letter producer's context: it keeps the delivery reports.
struct Delivery(Arc<Reports>);

impl ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, place: usize) {
        let mut seen = self.0.seen.lock().expect("delivery reports");
        seen.reports += 1;
        if let Err((e, _)) = result {
            seen.failed = true;
            if too_large(e) {
                seen.refused.push(place);
            }
        }
        self.0.came.notify_all();
    }
}

/// Whether `e` says a record is larger than the topic (or the client) takes.
fn too_large(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

/// How often the operator looks again: whether the thread has ended, once its
/// input has, and whether the thread's queue has room for its backlog.
const ENDING_POLL: Duration = Duration::from_millis(2);

/// The longest a dead letter waits in an open transaction.
const LINGER: Duration = Duration::from_millis(200);

impl Transactional {
    fn new(bootstrap: &str, topic: &str, id: String, job: &str) -> Result<Self, KafkaError> {
        let (producer, reports) = Self::producer(bootstrap, topic, &id)?;
        Ok(Transactional {
            bootstrap: bootstrap.to_string(),
            id,
            job: job.to_string(),
            producer,
            reports,
            in_transaction: false,
            open: Vec::new(),
            began: Instant::now(),
        })
    }

    /// A producer for `topic`, its batches and letters no larger than the
    /// topic takes: a letter larger than that is refused at once, by the
    /// client, and goes without its payload.
    fn producer(
        bootstrap: &str,
        topic: &str,
        id: &str,
    ) -> Result<(ThreadedProducer<Delivery>, Arc<Reports>), KafkaError> {
        // librdkafka's default, and room for a batch's framing below the
        // topic's limit. Without the topic's settings (no DescribeConfigs
        // right, say) the broker's refusals still find a letter too large.
        let topic_limit = crate::kafka_admin::max_message_bytes(bootstrap, topic)
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, topic, "cannot read the dead-letter topic's max.message.bytes");
                None
            });
        let limit = topic_limit
            .map_or(1_000_000, |topic| topic.saturating_sub(512).clamp(1000, 1_000_000))
            .to_string();
        let reports = Arc::new(Reports::default());
        let producer: ThreadedProducer<Delivery> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("transactional.id", id)
            .set("message.max.bytes", &limit)
            .set("batch.size", &limit)
            .create_with_context(Delivery(reports.clone()))?;
        producer.init_transactions(Duration::from_secs(60))?;
        Ok((producer, reports))
    }

    /// Send `letter` in the open transaction (beginning one if none is).
    fn send(&mut self, topic: &str, letter: &Letter) -> Result<(), KafkaError> {
        if !self.in_transaction {
            self.producer.begin_transaction()?;
            self.in_transaction = true;
            self.began = Instant::now();
            // Places count from 0 again (the last transaction's reports are
            // all in: it was committed after them).
            *self.reports.seen.lock().expect("delivery reports") = Reported::default();
        }
        let d = &letter.d;
        let partition = d.partition.to_string();
        let offset = d.offset.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: headers::REASON, value: Some(d.reason.as_str()) })
            .insert(Header { key: headers::ERROR, value: Some(d.detail.as_str()) })
            .insert(Header { key: headers::TOPIC, value: Some(d.topic.as_str()) })
            .insert(Header { key: headers::PARTITION, value: Some(partition.as_str()) })
            .insert(Header { key: headers::OFFSET, value: Some(offset.as_str()) })
            .insert(Header { key: headers::JOB, value: Some(self.job.as_str()) });
        let omitted = letter.omitted.map(|n| n.to_string());
        if let Some(n) = &omitted {
            headers = headers.insert(Header { key: headers::PAYLOAD_OMITTED, value: Some(n) });
        }
        let mut record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(topic, self.open.len())
            .partition(d.partition)
            .payload(&d.payload[..])
            .headers(headers);
        if let Some(k) = &d.key {
            record = record.key(&k[..]);
        }
        // A flood of dead letters slows this worker down rather than losing any.
        crate::kafka_admin::send_waiting(&self.producer, record)?;
        self.open.push(letter.clone());
        Ok(())
    }

    /// How long the open transaction has been open, if one is.
    fn open_for(&self) -> Option<Duration> {
        (!self.open.is_empty()).then(|| self.began.elapsed())
    }

    /// Send `letter`, starting the transaction over if the producer cannot go
    /// on, and without its payload if the client will not take it whole. An
    /// error left is the letter's own, and it is counted as lost.
    fn send_or_start_over(&mut self, topic: &str, letter: &Letter) {
        while let Err(e) = self.send_or_cut(topic, letter) {
            tracing::warn!(error = %e, "dead-letter producer failed; starting over");
            self.start_over(topic);
        }
    }

    /// Send `letter`, without its payload if the client will not take it
    /// whole. An error left is the producer's; a letter it will not take
    /// even so is counted as lost.
    fn send_or_cut(&mut self, topic: &str, letter: &Letter) -> Result<(), KafkaError> {
        let mut cut = None;
        loop {
            let letter = cut.as_ref().unwrap_or(letter);
            match self.send(topic, letter) {
                Err(e) if !Self::producer_failed(&e) => {
                    // Cut (and say so) only when the size is the reason.
                    match too_large(&e).then(|| letter.without_payload()).flatten() {
                        Some(without) => cut = Some(without),
                        None => {
                            lost_loudly(&e, &letter.d);
                            return Ok(());
                        }
                    }
                }
                done => return done,
            }
        }
    }

    /// Whether `e` is the producer's or transaction's failure, not one letter's.
    fn producer_failed(e: &KafkaError) -> bool {
        matches!(
            e,
            KafkaError::Transaction(_)
                | KafkaError::MessageProduction(RDKafkaErrorCode::Fatal | RDKafkaErrorCode::State)
        )
    }

    /// Commit the open transaction; when it fails, start over until its
    /// letters are committed.
    fn commit(&mut self, topic: &str) {
        while !self.open.is_empty() {
            // Every letter's delivery report first: a transaction with a
            // letter the broker refused would fail its commit; the reports
            // say which, and it is sent again at once. (`flush` fails only by
            // timing out; letters still queued then time out within the
            // transaction's timeout and report as failed.)
            if let Err(e) = self.producer.flush(Duration::from_secs(30)) {
                tracing::warn!(error = %e, "dead letters not yet delivered; waiting");
                continue;
            }
            if !self.all_delivered() {
                tracing::warn!(
                    letters = self.open.len(),
                    "dead letters not delivered; sending them again"
                );
                self.start_over(topic);
                continue;
            }
            match self.producer.commit_transaction(Duration::from_secs(30)) {
                Ok(()) => {
                    self.in_transaction = false;
                    for d in self.open.drain(..) {
                        dead_letters_total().with_label_values(&[d.d.reason.as_str()]).inc();
                    }
                }
                Err(KafkaError::Transaction(e)) if e.is_retriable() => {
                    tracing::warn!(error = %e, "dead letters not yet committed; waiting");
                }
                Err(e) => {
                    tracing::warn!(error = %e, letters = self.open.len(),
                        "dead-letter transaction failed; sending its letters again");
                    self.start_over(topic);
                }
            }
        }
    }

    /// After a flush: whether every letter of the open transaction was delivered.
    fn all_delivered(&self) -> bool {
        let sent = self.open.len();
        // The reports come on the producer's polling thread, by the end of
        // the flush; the bound only guards against one that never comes.
        let seen = self.reports.seen.lock().expect("delivery reports");
        let (seen, _) = self
            .reports
            .came
            .wait_timeout_while(seen, Duration::from_secs(30), |s| s.reports < sent)
            .expect("delivery reports");
        seen.reports >= sent && !seen.failed
    }

    /// Leave the open transaction behind and send its letters again in a new
    /// one: a new producer under the same transactional id, whose
    /// initialisation aborts what the old one left open, and which reads the
    /// topic's limit again. The letters the broker refused as too large
    /// (its limit was lowered since) go whole once more (a batch is refused
    /// whole, and its small letters may fit), then without their payload.
    fn start_over(&mut self, topic: &str) {
        loop {
            let refused = std::mem::take(&mut self.reports.seen.lock().expect("reports").refused);
            for lost in refused_again(&mut self.open, &refused) {
                let refusal = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
                lost_loudly(&refusal, &lost.d);
            }
            let letters = std::mem::take(&mut self.open);
            self.in_transaction = false;
            loop {
                match Self::producer(&self.bootstrap, topic, &self.id) {
                    Ok((producer, reports)) => {
                        self.producer = producer;
                        self.reports = reports;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "dead-letter producer not ready; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
            let mut rest = letters.iter();
            let failed = rest.by_ref().find_map(|letter| self.send_or_cut(topic, letter).err());
            match failed {
                None => return,
                Some(e) => {
                    tracing::warn!(error = %e, "dead-letter producer failed; starting over");
                    // The letter that failed and those after it go after the
                    // ones sent (whose places the reports name).
                    let from = letters.len() - rest.len() - 1;
                    self.open.extend(letters[from..].iter().cloned());
                }
            }
        }
    }
}

/// Mark the letters at `refused` places of `open` (refused by the broker as
/// too large): one refused for the first time goes whole once more, one
/// refused again goes without its payload; one refused without its payload
/// already is taken out and returned, lost.
fn refused_again(open: &mut Vec<Letter>, refused: &[usize]) -> Vec<Letter> {
    let mut lost = Vec::new();
    for &place in refused {
        let Some(letter) = open.get_mut(place) else { continue };
        if !letter.refused {
            letter.refused = true;
            continue;
        }
        match letter.without_payload() {
            Some(cut) => *letter = cut,
            None => lost.push(place),
        }
    }
    // Reports come in any order: out from the back, each once.
    lost.sort_unstable();
    lost.dedup();
    lost.into_iter().rev().map(|place| open.remove(place)).collect()
}

/// What the sink's operator hands its producer thread, in order.
enum Order {
    /// Letters to send in the open transaction (beginning one if none is).
    Letters(Vec<DeadLetter>),
    /// Commit the open transaction, then pass these restart points on.
    Commit(Vec<ProgressSample>),
}

/// Orders the producer thread's queue holds.
const ORDERS: usize = 64;

/// Letters the operator holds beyond a full queue before it waits for the
/// producer thread: a flood of dead letters slows the worker down rather
/// than holding an unbounded backlog, but a thread that is still starting
/// (its producer's `init_transactions` and its read of the topic's tail take
/// 0.3-1.2 s) does not stop the worker, and with it the dataflow, as a queue
/// of 64 orders did for 0.1-0.9 s at a bulk run's start.
const BACKLOG_LETTERS: usize = 10_000;

/// Orders the producer thread's queue did not take yet, in order, each
/// merged into the one before it where that is of the same kind.
#[derive(Default)]
struct Backlog {
    orders: std::collections::VecDeque<Order>,
    letters: usize,
}

impl Backlog {
    fn letters(&mut self, mut letters: Vec<DeadLetter>) {
        self.letters += letters.len();
        match self.orders.back_mut() {
            Some(Order::Letters(held)) => held.append(&mut letters),
            _ => self.orders.push_back(Order::Letters(letters)),
        }
    }

    fn commit(&mut self, samples: Vec<ProgressSample>) {
        match self.orders.back_mut() {
            Some(Order::Commit(held)) => held.extend(samples),
            _ => self.orders.push_back(Order::Commit(samples)),
        }
    }

    fn is_empty(&self) -> bool {
        self.orders.is_empty()
    }

    /// Into `queue`, in order, as far as it has room; while more than
    /// [`BACKLOG_LETTERS`] letters are held, waiting for room. `Err` if the
    /// thread has ended (what it did not take stays here).
    fn hand_over(&mut self, queue: &std::sync::mpsc::SyncSender<Order>) -> Result<(), ()> {
        use std::sync::mpsc::TrySendError;
        while let Some(order) = self.orders.pop_front() {
            let n = match &order {
                Order::Letters(l) => l.len(),
                Order::Commit(_) => 0,
            };
            let handed = if self.letters > BACKLOG_LETTERS {
                queue.send(order).map_err(|e| TrySendError::Disconnected(e.0))
            } else {
                queue.try_send(order)
            };
            match handed {
                Ok(()) => self.letters -= n,
                Err(TrySendError::Full(order)) => {
                    self.orders.push_front(order);
                    return Ok(());
                }
                Err(TrySendError::Disconnected(order)) => {
                    self.orders.push_front(order);
                    return Err(());
                }
            }
        }
        Ok(())
    }
}

/// The producer thread: carry out `inbox`'s orders, and commit an open
/// transaction within LINGER of its first letter (restart points come every
/// few thousand records of a partition, which on a slow topic is minutes,
/// and readers should not wait that long; committing early is safe: a replay
/// skips what the tail shows). When the operator is done, commit and end.
fn produce(
    mut producer: Transactional,
    topic: &str,
    inbox: &std::sync::mpsc::Receiver<Order>,
    confirmed: Option<&Progress>,
    already: &HashMap<i32, i64>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        let wait = producer
            .open_for()
            .map_or(Duration::from_secs(3600), |open| LINGER.saturating_sub(open));
        match inbox.recv_timeout(wait) {
            Ok(order) => {
                // With it, whatever else is queued (at most a queue's worth),
                // in order, and one commit for every restart point among
                // them. A commit is a round trip to the transaction
                // coordinator and its markers: one per restart point (about
                // ten a second per worker in a catch-up) filled the queue, and
                // the workers waited for it at 40 % of a core. Committing
                // letters given after a restart point with it is committing
                // early, which is safe (see above).
                let mut samples: Option<Vec<ProgressSample>> = None;
                for order in std::iter::once(order).chain(inbox.try_iter().take(ORDERS - 1)) {
                    match order {
                        Order::Letters(letters) => {
                            let new = letters.into_iter().filter(|d| {
                                already.get(&d.partition).is_none_or(|o| d.offset > *o)
                            });
                            for d in new {
                                let letter = Letter { d, omitted: None, refused: false };
                                producer.send_or_start_over(topic, &letter);
                            }
                        }
                        Order::Commit(s) => samples.get_or_insert_with(Vec::new).extend(s),
                    }
                }
                if let Some(samples) = samples {
                    producer.commit(topic);
                    if let Some(c) = confirmed {
                        c.lock().expect("progress samples").extend(samples);
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if producer.open_for().is_some_and(|open| open >= LINGER) {
                    producer.commit(topic);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                producer.commit(topic);
                return;
            }
        }
    }
}

/// A letter Kafka will not take even without its payload: an invariant of
/// the pipeline is broken, so say so loudly.
fn lost_loudly(e: &KafkaError, d: &DeadLetter) {
    crate::metrics::dead_letters_lost_total().inc();
    tracing::error!(error = %e, partition = d.partition, offset = d.offset,
        "dead letter could not be produced");
}

/// What becomes of a dead-letter sink that cannot start once the dataflow
/// runs (its producer, or the reading of what its topic holds, failed on its
/// thread): given the error, on the worker's thread, it should end the job
/// (which cannot go on without its dead letters). Without one, or should it
/// return, the worker panics with it.
pub type OnStartError = Box<dyn FnOnce(&DeadLetterError)>;

/// Write `job`'s dead letters of `stream` (read from `source_topic`, which has
/// `source_partitions` partitions) to `topic` at `bootstrap`, exactly once;
/// with `confirm`, pass restart points on once their dead letters are delivered.
/// What can be checked before the dataflow runs is returned; a failure of
/// the rest of the start goes to `on_start_error`.
// The dead letters' coordinates (topic, source, job) and the start's hooks, each its own.
#[allow(clippy::too_many_arguments)]
pub fn dead_letter_sink(
    stream: StreamVec<'_, Time, DeadLetter>,
    bootstrap: &str,
    topic: &str,
    source_topic: &str,
    job: &str,
    source_partitions: usize,
    confirm: Option<Confirm>,
    mut on_start_error: Option<OnStartError>,
) -> Result<(), DeadLetterError> {
    let partitions = crate::kafka_admin::partition_count(bootstrap, topic)?.unwrap_or(0);
    if partitions < source_partitions {
        return Err(DeadLetterError::TooFewPartitions {
            topic: topic.into(),
            has: partitions,
            needs: source_partitions,
        });
    }
    let scope = stream.scope();
    let worker = scope.index();
    let mine = crate::kafka_source::partitions_of(source_partitions, worker, scope.peers());
    // The producer works on a thread of its own: a commit waits for the
    // broker (a round trip to the transaction coordinator and its markers, and
    // during an outage much longer), which on the worker's thread held up
    // every operator of the worker. Orders go in sequence, so a restart point
    // is confirmed only after the letters given before it are committed. A
    // bounded queue: when the producer cannot keep up, the worker waits
    // rather than holding an unbounded backlog.
    let (orders, inbox) = std::sync::mpsc::sync_channel::<Order>(ORDERS);
    let confirmed = confirm.as_ref().map(|c| c.confirmed.clone());
    let settled = confirm.as_ref().map(|c| c.settled.clone());
    //
    // The thread also starts the producer and reads what the topic holds,
    // while the dataflow runs (letters given meanwhile wait in the queue):
    // on the worker's thread this held up the whole dataflow, and so every
    // worker, for 0.3-1.4 s of a bounded run's start.
    let thread = std::thread::Builder::new()
        .name(format!("DeadLetters-{worker}"))
        .spawn({
            let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
            let (source_topic, job) = (source_topic.to_string(), job.to_string());
            move || -> Result<(), KafkaError> {
                // Before reading the tail: a restarted worker's producer aborts
                // what its previous incarnation left open. One id per worker,
                // job, dead-letter topic and source: jobs sharing a
                // dead-letter topic must not fence each other.
                let id = format!("tripwire-dlq-{job}-{topic}-{source_topic}-{worker}");
                // The dataflow, and the stores' commits, run meanwhile: a
                // broker restarting now is waited for, as the source waits
                // for it, instead of ending the job (the chaos test restarts
                // the broker under a group that may be starting).
                let (producer, already) = crate::kafka_admin::while_starting(|| {
                    let producer = Transactional::new(&bootstrap, &topic, id.clone(), &job)?;
                    // Letters a replay gives again that are in the topic already.
                    let already = written(&bootstrap, &topic, &source_topic, &job, Some(&mine))?;
                    Ok((producer, already))
                })?;
                produce(producer, &topic, &inbox, confirmed.as_ref(), &already);
                if let Some(settled) = settled {
                    settled.store(true, Ordering::Release);
                }
                Ok(())
            }
        })
        .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    // Exported from the start, at 0, so that an alert on it has a series.
    crate::metrics::dead_letters_lost_total();
    let mut running = Some((orders, thread));
    let mut start_failed = move |e: KafkaError| -> ! {
        let e = DeadLetterError::Kafka(e);
        if let Some(hook) = on_start_error.take() {
            hook(&e);
        }
        panic!("cannot start the dead-letter sink of worker {worker}: {e}")
    };
    let mut builder = OperatorBuilder::new("DeadLetterSink".to_owned(), scope);
    let activator = scope.activator_for(builder.operator_info().address);
    let mut input = builder.new_input(stream, Pipeline);
    let mut backlog = Backlog::default();
    // After the input's end: the thread, committing its last transaction.
    let mut ending: Option<std::thread::JoinHandle<Result<(), KafkaError>>> = None;
    builder.build_reschedule(move |_capabilities| {
        move |frontiers| {
            // The last commit is a round trip to the transaction coordinator
            // and its markers (0.1-0.2 s). Joining the thread at once held up
            // the worker, and so the epoch's close and the stores' last batch,
            // for that long; the operator now stays (incomplete, so the
            // dataflow does not end before the letters are committed) and
            // looks again shortly. The last PostgreSQL commit waits for
            // `settled` instead.
            if let Some(thread) = ending.take() {
                if !thread.is_finished() {
                    ending = Some(thread);
                    activator.activate_after(ENDING_POLL);
                    return true;
                }
                match thread.join() {
                    Err(panic) => std::panic::resume_unwind(panic),
                    Ok(Err(e)) => start_failed(e),
                    Ok(Ok(())) => return false,
                }
            }
            let Some((orders, thread)) = &running else { return false };
            // Its end is noticed now, not at the next letter (restart points
            // would stop being confirmed without a word).
            if thread.is_finished() {
                let (_, thread) = running.take().expect("running");
                match thread.join() {
                    Err(panic) => std::panic::resume_unwind(panic),
                    Ok(Err(e)) => start_failed(e),
                    Ok(Ok(())) => panic!("the dead-letter thread of worker {worker} has stopped"),
                }
            }
            // Restart points taken so far: their dead letters are in `input` by
            // now (the source gives a record's dead letter before the sample after it).
            let taken: Vec<ProgressSample> = match &confirm {
                Some(c) => std::mem::take(&mut *c.taken.lock().expect("progress samples")),
                None => Vec::new(),
            };
            let mut letters = Vec::new();
            input.for_each(|_cap, data| letters.append(data));
            let sent = !letters.is_empty();
            if sent {
                backlog.letters(letters);
            }
            // Committed before a restart point after them may be stored (and
            // within LINGER of the first in any case, by the thread).
            if !taken.is_empty() || (sent && confirm.is_none()) {
                backlog.commit(taken);
            }
            // What the queue has no room for yet is handed over shortly
            // (and the thread's end, if it ended, noticed then).
            if backlog.hand_over(orders).is_err() || !backlog.is_empty() {
                activator.activate_after(ENDING_POLL);
                return true;
            }
            if frontiers[0].is_empty() {
                // All input seen: the thread commits what is open and ends.
                let (orders, thread) = running.take().expect("running");
                drop(orders);
                ending = Some(thread);
                activator.activate_after(ENDING_POLL);
                return true;
            }
            false
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(offset: i64, refused: bool, omitted: Option<usize>) -> Letter {
        let d = DeadLetter {
            reason: DeadLetterReason::Truncated,
            detail: "é".repeat(600),
            topic: "t".into(),
            partition: 0,
            offset,
            key: Some(b"k".to_vec()),
            payload: vec![1; if omitted.is_some() { 0 } else { 10 }],
        };
        Letter { d, omitted, refused }
    }

    /// An order as what it carries, in order: letters by offset, and a
    /// commit as `-1` followed by its restart points' offsets; a commit right
    /// after another commit (the backlog merges them) counts once.
    fn flatten(orders: &[Order]) -> Vec<(char, i64)> {
        let mut out: Vec<(char, i64)> = Vec::new();
        for order in orders {
            match order {
                Order::Letters(l) => out.extend(l.iter().map(|d| ('L', d.offset))),
                Order::Commit(s) => {
                    if out.last().is_none_or(|(kind, _)| *kind == 'L') {
                        out.push(('C', -1));
                    }
                    out.extend(s.iter().map(|p| ('C', p.offset)));
                }
            }
        }
        out
    }

    fn dead(offset: i64) -> DeadLetter {
        DeadLetter { offset, ..letter(0, false, None).d }
    }

    fn sample(offset: i64) -> ProgressSample {
        ProgressSample {
            topic: "t".into(),
            partition: 0,
            offset,
            max_event_time: 0,
            basis: 0,
            top: 0,
        }
    }

    /// Letters and restart points reach the thread in the order given, none
    /// lost and none doubled, however little room its queue has; below
    /// BACKLOG_LETTERS the operator never waits for room, above it it does;
    /// a thread that ended leaves what it did not take in the backlog.
    #[test]
    fn a_backlog_hands_over_in_order_and_waits_only_when_full() {
        let mut next = tripwire_dataflow::seeded(0x9E37_79B9_7F4A_7C15);
        for _ in 0..100 {
            let (queue, inbox) = std::sync::mpsc::sync_channel::<Order>(1 + next(3) as usize);
            let (mut backlog, mut given, mut taken) = (Backlog::default(), Vec::new(), Vec::new());
            let mut offset = 0;
            for _ in 0..200 {
                let n = 1 + next(5) as usize;
                let order = if next(3) == 0 {
                    Order::Commit((0..next(3)).map(|_| sample(offset)).collect())
                } else {
                    Order::Letters((0..n).map(|k| dead(offset + k as i64)).collect())
                };
                offset += n as i64;
                match order {
                    Order::Letters(l) => {
                        given.push(Order::Letters(l.clone()));
                        backlog.letters(l);
                    }
                    Order::Commit(s) => {
                        given.push(Order::Commit(s.clone()));
                        backlog.commit(s);
                    }
                }
                // Returns at once (a full queue would block this test).
                backlog.hand_over(&queue).expect("the thread is there");
                for _ in 0..next(3) {
                    taken.extend(inbox.try_recv());
                }
            }
            while !backlog.is_empty() {
                backlog.hand_over(&queue).expect("the thread is there");
                taken.extend(inbox.try_iter());
            }
            taken.extend(inbox.try_iter());
            assert_eq!(flatten(&taken), flatten(&given));
        }

        // Past the bound, with a full queue: it waits until the thread takes them all.
        let (queue, inbox) = std::sync::mpsc::sync_channel::<Order>(1);
        queue.send(Order::Commit(Vec::new())).unwrap();
        let mut backlog = Backlog::default();
        backlog.letters((0..=BACKLOG_LETTERS as i64).map(dead).collect());
        let thread = std::thread::spawn(move || inbox.iter().collect::<Vec<_>>());
        backlog.hand_over(&queue).expect("the thread is there");
        assert!(backlog.is_empty(), "past the bound the operator waited for room");
        drop(queue);
        let got = thread.join().unwrap();
        assert_eq!(
            flatten(&got[1..]),
            flatten(&[Order::Letters((0..=BACKLOG_LETTERS as i64).map(dead).collect())])
        );

        // The thread has ended: nothing handed over is lost from the backlog.
        let (queue, inbox) = std::sync::mpsc::sync_channel::<Order>(4);
        drop(inbox);
        let mut backlog = Backlog::default();
        backlog.letters(vec![dead(1)]);
        assert!(backlog.hand_over(&queue).is_err());
        assert_eq!(flatten(backlog.orders.make_contiguous()), vec![('L', 1)]);
    }

    #[test]
    fn refused_letters_go_whole_once_then_without_payload_then_are_lost() {
        let mut open = vec![
            letter(0, false, None),
            letter(1, true, None),
            letter(2, false, Some(10)),
            letter(3, false, None),
            letter(4, true, Some(10)),
            letter(5, true, Some(10)),
        ];
        // Reports in any order, one place twice.
        let lost = refused_again(&mut open, &[5, 0, 1, 4, 2, 5]);
        let offsets = |ls: &[Letter]| ls.iter().map(|l| l.d.offset).collect::<Vec<_>>();
        assert_eq!(offsets(&lost), vec![5, 4], "refused again without payload: lost");
        assert_eq!(offsets(&open), vec![0, 1, 2, 3], "the rest keep their order");
        assert!(open[0].refused && open[0].omitted.is_none(), "first refusal: whole once more");
        assert_eq!(open[1].omitted, Some(10), "second refusal: without its payload");
        assert!(open[1].d.payload.is_empty() && open[1].d.key.is_none());
        assert!(open[1].d.detail.len() <= Letter::DETAIL, "error text cut");
        assert!(open[2].refused, "a cut letter refused once goes once more");
        assert!(!open[3].refused && open[3].omitted.is_none(), "not refused: untouched");
    }
}
