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

/// The source's rules (`dataflow/SEMANTICS.md`, "What the source accepts") as
/// plain loops over everything produced to a topic, in produce order, sharing
/// no code with the source but the decoder: per partition, duplicates of an
/// earlier accepted id, lateness against the second largest accepted event
/// time (test records are produced after their event time, so the log time
/// never clamps it), and floors where a bounded run ended: `ends[i] = (n, t)` says that the
/// records from plan index `n` on were read after a run ended at `t`.
pub struct SourceModel {
    /// Lateness bound `L`, ms.
    pub lateness_ms: Time,
    /// Duplicate horizon `H`, ms.
    pub dedup_horizon_ms: Time,
    /// The tick of the fraud config.
    pub tick_ms: Time,
}

/// What [`SourceModel::judge`] makes of a plan.
#[derive(Default)]
pub struct Judged {
    /// Accepted events, in produce order.
    pub accepted: Vec<Transaction>,
    /// Plan indices of the records judged late.
    pub late: Vec<usize>,
    /// Plan indices of identical duplicates (dropped, counted once).
    pub duplicates: Vec<usize>,
    /// Plan indices of every record that must reach the dead-letter topic.
    pub dead: Vec<usize>,
}

impl SourceModel {
    /// The ticked time of an event time.
    pub fn tick(&self, e: Time) -> Time {
        let t = self.tick_ms.max(1);
        e.div_ceil(t) * t
    }

    /// Judge `plan` (produced in this order) with floors at `ends`.
    pub fn judge(&self, plan: &[Planned], ends: &[(usize, Time)]) -> Judged {
        self.judge_with(Arc::new(EmbeddedRegistry::new().unwrap()), plan, ends)
    }

    /// [`SourceModel::judge`], reading schemas from `registry`.
    pub fn judge_with(
        &self,
        registry: Arc<dyn tripwire_connectors::registry::SchemaRegistry>,
        plan: &[Planned],
        ends: &[(usize, Time)],
    ) -> Judged {
        let mut codec = TransactionCodec::new(registry, Limits::default());
        let mut out = Judged::default();
        // Per partition, the accepted event times, largest first (two are kept).
        let mut largest: HashMap<i32, Vec<Time>> = HashMap::new();
        let mut seen: HashMap<(i32, u64), (Transaction, Time)> = HashMap::new();
        for (i, p) in plan.iter().enumerate() {
            let Ok(x) = codec.decode(&p.payload, Some(now_ms())) else {
                out.dead.push(i);
                continue;
            };
            let floor = ends.iter().filter(|(n, _)| i >= *n).map(|e| e.1).max().unwrap_or(0);
            if let Some((first, first_time)) = seen.get(&(p.partition, x.event_id)) {
                if first_time + self.dedup_horizon_ms >= x.event_time_ms {
                    if *first == x {
                        out.duplicates.push(i);
                    } else {
                        out.dead.push(i);
                    }
                    continue;
                }
            }
            let second = largest.get(&p.partition).and_then(|l| l.get(1).copied());
            let behind = second.is_some_and(|b| x.event_time_ms + self.lateness_ms < b);
            if behind || self.tick(x.event_time_ms) < floor {
                out.late.push(i);
                out.dead.push(i);
                continue;
            }
            let l = largest.entry(p.partition).or_default();
            l.push(x.event_time_ms);
            l.sort_unstable_by(|a, b| b.cmp(a));
            l.truncate(2);
            seen.insert((p.partition, x.event_id), (x.clone(), x.event_time_ms));
            out.accepted.push(x);
        }
        out
    }

    /// Where a bounded run over what `judged` accepted ends: just past the last event.
    pub fn end(&self, judged: &Judged) -> Time {
        judged.accepted.iter().map(|x| self.tick(x.event_time_ms)).max().unwrap_or(0) + 1
    }
}
