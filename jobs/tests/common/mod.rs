//! Pieces the job tests share: producing a generated plan, and what the source accepts of it.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use tripwire_connectors::avro::{Limits, TransactionCodec};
use tripwire_connectors::registry::EmbeddedRegistry;
use tripwire_dataflow::{Time, Transaction};
use tripwire_jobs::generator::{Expect, Planned};

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Write `plan` to `topic` (each record to its planned partition) with an idempotent producer.
pub fn produce(bootstrap: &str, topic: &str, plan: &[Planned]) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "10")
        .set("compression.type", "snappy")
        .create()
        .unwrap();
    for p in plan {
        let mut record =
            BaseRecord::to(topic).partition(p.partition).key(&p.key).payload(&p.payload);
        while let Err((_, back)) = producer.send(record) {
            record = back;
            producer.poll(Duration::from_millis(1));
        }
    }
    producer.flush(Duration::from_secs(120)).unwrap();
}

/// The events the source accepts from `plan`, and per partition the largest accepted event time.
pub fn accepted(plan: &[Planned]) -> (Vec<Transaction>, HashMap<i32, Time>) {
    let registry = Arc::new(EmbeddedRegistry::new().unwrap());
    let mut codec = TransactionCodec::new(registry, Limits::default());
    let mut events = Vec::new();
    let mut last: HashMap<i32, Time> = HashMap::new();
    for p in plan.iter().filter(|p| matches!(p.expect, Expect::Accept(_))) {
        let x = codec.decode(&p.payload, Some(now_ms())).expect("accepted records decode");
        let l = last.entry(p.partition).or_default();
        *l = (*l).max(x.event_time_ms);
        events.push(x);
    }
    (events, last)
}
