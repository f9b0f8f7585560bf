//! The dead-letter sink: every rejected record goes to the dead-letter topic,
//! its payload untouched, with the reason and its source coordinates in headers.
//!
//! Exactly once, across crashes and restarts:
//! - a dead letter goes to the dead-letter partition of its source partition
//!   (the topic has at least as many partitions as the input), in source
//!   offset order, by an idempotent producer;
//! - on start the sink reads the last record of each dead-letter partition:
//!   its `source.offset` header says up to where a replay's dead letters are
//!   already there, and those are skipped;
//! - a restart point (progress sample) reaches the PostgreSQL sink only once
//!   every dead letter before it is delivered ([`DeadLetterSink::confirm`]),
//!   so that no restart can begin after a dead letter that never landed.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;
use tripwire_dataflow::Time;

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
}

/// Restart points the source took, and those whose dead letters are all delivered.
#[derive(Clone)]
pub struct Confirm {
    /// What the source took (`Source::progress`).
    pub taken: Progress,
    /// What the PostgreSQL sink may store.
    pub confirmed: Progress,
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

/// Per source partition, the highest source offset whose dead letter is in `topic` already.
pub fn written(
    bootstrap: &str,
    topic: &str,
    source_topic: &str,
) -> Result<HashMap<i32, i64>, KafkaError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("tripwire-dlq-tail-{topic}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?;
    let count = crate::kafka_admin::partition_count(bootstrap, topic)?.unwrap_or(0);
    let mut assignment = TopicPartitionList::new();
    let mut waiting = 0;
    for p in 0..count as i32 {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > low {
            assignment.add_partition_offset(topic, p, Offset::Offset(high - 1))?;
            waiting += 1;
        }
    }
    let mut found = HashMap::new();
    if waiting == 0 {
        return Ok(found);
    }
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while waiting > 0 && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let header = |name: &str| {
                    m.headers().and_then(|hs| {
                        hs.iter()
                            .find(|h| h.key == name)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                };
                if header(headers::TOPIC).as_deref() == Some(source_topic) {
                    let partition = header(headers::PARTITION).and_then(|p| p.parse::<i32>().ok());
                    let offset = header(headers::OFFSET).and_then(|o| o.parse::<i64>().ok());
                    if let (Some(p), Some(o)) = (partition, offset) {
                        let e = found.entry(p).or_insert(o);
                        *e = (*e).max(o);
                    }
                }
                waiting -= 1;
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    if waiting > 0 {
        return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut));
    }
    Ok(found)
}

/// Write the dead letters of `stream` (read from `source_topic`, which has
/// `source_partitions` partitions) to `topic` at `bootstrap`, exactly once;
/// with `confirm`, pass restart points on once their dead letters are delivered.
pub fn dead_letter_sink(
    stream: StreamVec<'_, Time, DeadLetter>,
    bootstrap: &str,
    topic: &str,
    source_topic: &str,
    source_partitions: usize,
    confirm: Option<Confirm>,
) -> Result<(), DeadLetterError> {
    let partitions = crate::kafka_admin::partition_count(bootstrap, topic)?.unwrap_or(0);
    if partitions < source_partitions {
        return Err(DeadLetterError::TooFewPartitions {
            topic: topic.into(),
            has: partitions,
            needs: source_partitions,
        });
    }
    let already = written(bootstrap, topic, source_topic)?;
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        // No duplicates or reordering from producer retries.
        .set("enable.idempotence", "true")
        .create()?;
    let topic = topic.to_string();
    let mut pending: VecDeque<DeadLetter> = VecDeque::new();
    let mut flushed = false;
    let mut unflushed = false;
    stream.sink(Pipeline, "DeadLetterSink", move |(input, frontier)| {
        // Restart points taken so far: their dead letters are in `input` by now
        // (the source gives a record's dead letter before the sample after it).
        let taken: Vec<ProgressSample> = match &confirm {
            Some(c) => std::mem::take(&mut *c.taken.lock().expect("progress samples")),
            None => Vec::new(),
        };
        input.for_each(|_cap, data| {
            pending.extend(
                data.drain(..).filter(|d| already.get(&d.partition).is_none_or(|o| d.offset > *o)),
            )
        });
        while let Some(d) = pending.front() {
            let partition = d.partition.to_string();
            let offset = d.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: headers::REASON, value: Some(d.reason.as_str()) })
                .insert(Header { key: headers::ERROR, value: Some(d.detail.as_str()) })
                .insert(Header { key: headers::TOPIC, value: Some(d.topic.as_str()) })
                .insert(Header { key: headers::PARTITION, value: Some(partition.as_str()) })
                .insert(Header { key: headers::OFFSET, value: Some(offset.as_str()) });
            let mut record = BaseRecord::<[u8], [u8]>::to(&topic)
                .partition(d.partition)
                .payload(&d.payload[..])
                .headers(headers);
            if let Some(k) = &d.key {
                record = record.key(&k[..]);
            }
            match producer.send(record) {
                Ok(()) => {
                    dead_letters_total().with_label_values(&[d.reason.as_str()]).inc();
                    unflushed = true;
                    pending.pop_front();
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The producer's own thread drains its queue. A flood of dead
                    // letters slows this worker down rather than losing any.
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => {
                    // Not retryable here (e.g. message too large for the broker):
                    // an invariant of the pipeline is broken, say so loudly.
                    tracing::error!(error = %e, partition = d.partition, offset = d.offset,
                        "dead letter could not be produced");
                    pending.pop_front();
                }
            }
        }
        if let Some(c) = &confirm {
            if !taken.is_empty() {
                // Delivered before a restart point may be stored (rare: only
                // when dead letters were sent since the last restart point).
                if unflushed {
                    while let Err(e) = producer.flush(Duration::from_secs(30)) {
                        tracing::warn!(error = %e, "dead letters not yet delivered; waiting");
                    }
                    unflushed = false;
                }
                c.confirmed.lock().expect("progress samples").extend(taken);
            }
        }
        if frontier.is_empty() && pending.is_empty() && !flushed {
            flushed = true;
            if let Err(e) = producer.flush(Duration::from_secs(30)) {
                tracing::error!(error = %e, "dead-letter producer did not flush");
            }
        }
    });
    Ok(())
}
