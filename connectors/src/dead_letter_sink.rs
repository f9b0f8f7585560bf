//! The dead-letter sink: every rejected record goes to the dead-letter topic,
//! its payload untouched, with the reason and its source coordinates in headers.
//!
//! Delivery is at least once: after a crash and replay a rejected record can be
//! written again. Consumers of the dead-letter topic de-duplicate on the
//! `source.topic`/`source.partition`/`source.offset` headers, which identify the
//! record exactly.

use std::collections::VecDeque;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;
use tripwire_dataflow::Time;

use crate::kafka_source::DeadLetter;
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

/// Write the dead letters of `stream` to `topic` at `bootstrap`.
pub fn dead_letter_sink(
    stream: StreamVec<'_, Time, DeadLetter>,
    bootstrap: &str,
    topic: &str,
) -> Result<(), KafkaError> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        // No duplicates from producer retries; replays may still repeat (see module docs).
        .set("enable.idempotence", "true")
        .create()?;
    let topic = topic.to_string();
    let mut pending: VecDeque<DeadLetter> = VecDeque::new();
    let mut flushed = false;
    stream.sink(Pipeline, "DeadLetterSink", move |(input, frontier)| {
        input.for_each(|_cap, data| pending.extend(data.drain(..)));
        while let Some(d) = pending.front() {
            let partition = d.partition.to_string();
            let offset = d.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: headers::REASON, value: Some(d.reason.as_str()) })
                .insert(Header { key: headers::ERROR, value: Some(d.detail.as_str()) })
                .insert(Header { key: headers::TOPIC, value: Some(d.topic.as_str()) })
                .insert(Header { key: headers::PARTITION, value: Some(partition.as_str()) })
                .insert(Header { key: headers::OFFSET, value: Some(offset.as_str()) });
            let mut record =
                BaseRecord::<[u8], [u8]>::to(&topic).payload(&d.payload[..]).headers(headers);
            if let Some(k) = &d.key {
                record = record.key(&k[..]);
            }
            match producer.send(record) {
                Ok(()) => {
                    dead_letters_total().with_label_values(&[d.reason.as_str()]).inc();
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
        if frontier.is_empty() && pending.is_empty() && !flushed {
            flushed = true;
            if let Err(e) = producer.flush(Duration::from_secs(30)) {
                tracing::error!(error = %e, "dead-letter producer did not flush");
            }
        }
    });
    Ok(())
}
