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

/// A job config file in the temp folder holding `fraud` as its `[fraud]` table.
pub fn fraud_config_file(name: &str, fraud: &tripwire_dataflow::FraudConfig) -> std::path::PathBuf {
    #[derive(serde::Serialize)]
    struct File<'a> {
        fraud: &'a tripwire_dataflow::FraudConfig,
    }
    let path = std::env::temp_dir().join(format!("{name}.toml"));
    std::fs::write(&path, toml::to_string(&File { fraud }).unwrap()).unwrap();
    path
}

/// Test traffic over `partitions` from `start_ms`: 300 cards, 50 ms apart,
/// rules firing, bad, out-of-order and late records, resends of event ids.
pub fn traffic(seed: u64, partitions: i32, start_ms: i64) -> tripwire_jobs::generator::GenConfig {
    tripwire_jobs::generator::GenConfig {
        seed,
        cards: 300,
        partitions,
        start_ms,
        spacing_ms: 50,
        fraud_per_10k: 30,
        bad_per_10k: 10,
        v1_percent: 30,
        lateness_ms: 5_000,
        out_of_order_per_10k: 300,
        late_per_10k: 30,
        duplicates_per_10k: 30,
        near_miss_per_10k: 0,
        spending_profiles: false,
        rate_per_s: None,
        now_ms: now_ms(),
        schema_ids: tripwire_jobs::generator::SchemaIds::EMBEDDED,
    }
}

/// Write one record with an explicit Kafka timestamp (ms).
pub fn produce_at(bootstrap: &str, topic: &str, p: &Planned, timestamp_ms: i64) {
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let record = BaseRecord::to(topic)
        .partition(p.partition)
        .key(&p.key)
        .payload(&p.payload)
        .timestamp(timestamp_ms);
    producer.send(record).map_err(|(e, _)| e).unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Every record of the dead-letter topic `dlq`, as its source partition, offset and reason.
pub fn dead_letters(dlq: &str) -> Vec<(i32, i64, String)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::{Message, Offset, TopicPartitionList};
    use tripwire_connectors::dead_letter_sink::headers;
    let bootstrap = tripwire_connectors::Endpoints::from_env().unwrap().kafka_bootstrap;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("read-{dlq}"))
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let n =
        tripwire_connectors::kafka_admin::partition_count(&bootstrap, dlq).unwrap().unwrap_or(0);
    let mut tpl = TopicPartitionList::new();
    for p in 0..n as i32 {
        tpl.add_partition_offset(dlq, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let (mut out, mut eof) = (Vec::new(), 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while eof < n && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let hs = m.headers().expect("dead letters carry headers");
                let get = |name: &str| {
                    hs.iter()
                        .find(|h| h.key == name)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default()
                };
                out.push((
                    get(headers::PARTITION).parse().unwrap(),
                    get(headers::OFFSET).parse().unwrap(),
                    get(headers::REASON),
                ));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => eof += 1,
            _ => {}
        }
    }
    assert_eq!(eof, n, "read {dlq} to its end");
    out
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
