//! The physical limit: a topic read from offset 0 to its end as fast as one
//! rdkafka consumer can, with or without decoding: a batch at a time, as the
//! source reads ([`FetchQueue`]). The benchmarks compare Tripwire's
//! throughput against it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::avro::{Limits, TransactionCodec};
use crate::fetch_queue::{FetchQueue, MOST};
use crate::kafka_admin::ReadsToEnd;
use crate::registry::EmbeddedRegistry;

/// Read all of `topic` (every partition, one consumer), decoding and validating
/// each record if `decode`: how many records, in how many seconds.
pub fn read_topic(bootstrap: &str, topic: &str, decode: bool) -> (u64, f64) {
    let consumer: BaseConsumer<ReadsToEnd> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "tripwire-ceiling")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // See the source: a full prefetch queue must not stall reading for a second.
        .set("fetch.queue.backoff.ms", "10")
        .create_with_context(ReadsToEnd)
        .expect("consumer");
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let parts = md.topics()[0].partitions().len();
    assert!(parts > 0, "topic {topic} is missing: run txgen first");
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    let all: Vec<i32> = (0..parts as i32).collect();
    let reader = FetchQueue::new(consumer, topic, &all).expect("fetch queue");
    reader.consumer().assign(&tpl).unwrap();
    let registry = Arc::new(EmbeddedRegistry::new().unwrap());
    let mut codec = TransactionCodec::new(registry, Limits::default());
    let start = Instant::now();
    let (mut n, mut eof, mut checksum) = (0u64, 0usize, 0u64);
    let mut fetched = Vec::with_capacity(MOST);
    while eof < parts {
        // The consumer's own events, then the records.
        fetched.extend(reader.poll());
        reader.read(MOST, Duration::from_millis(100), &mut fetched);
        for result in fetched.drain(..) {
            match result {
                Ok(m) => {
                    n += 1;
                    let payload = m.payload().unwrap_or_default();
                    if decode {
                        if let Ok(x) = codec.decode(payload, m.timestamp_ms()) {
                            checksum = checksum.wrapping_add(x.event_id);
                        }
                    } else {
                        checksum = checksum.wrapping_add(payload.len() as u64);
                    }
                }
                Err(KafkaError::PartitionEOF(_)) => eof += 1,
                Err(e) => panic!("consume: {e}"),
            }
        }
    }
    std::hint::black_box(checksum);
    (n, start.elapsed().as_secs_f64())
}
