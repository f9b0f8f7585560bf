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
    use rdkafka::{Message, Offset, TopicPartitionList};
    use tripwire_connectors::dead_letter_sink::{header, headers};
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
                assert!(m.headers().is_some(), "dead letters carry headers");
                let get = |name: &str| header(&m, name).unwrap_or_default();
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

/// Plan index → (partition, offset), for a plan produced in order to an empty topic.
pub fn coordinates(plan: &[Planned]) -> Vec<(i32, i64)> {
    let mut next: HashMap<i32, i64> = HashMap::new();
    plan.iter()
        .map(|p| {
            let o = next.entry(p.partition).or_default();
            *o += 1;
            (p.partition, *o - 1)
        })
        .collect()
}

/// Each record's event time (`None` for one that does not decode).
pub fn event_times(plan: &[Planned]) -> Vec<Option<Time>> {
    let mut codec =
        TransactionCodec::new(Arc::new(EmbeddedRegistry::new().unwrap()), Limits::default());
    plan.iter().map(|p| codec.decode(&p.payload, None).ok().map(|x| x.event_time_ms)).collect()
}

/// Where `plan`'s rejected records lie once produced to a fresh topic: (partition, offset), sorted.
pub fn rejected(plan: &[Planned]) -> Vec<(i32, i64)> {
    let mut next: HashMap<i32, i64> = Default::default();
    let mut out = Vec::new();
    for p in plan {
        let o = next.entry(p.partition).or_default();
        if matches!(p.expect, Expect::Reject(_)) {
            out.push((p.partition, *o));
        }
        *o += 1;
    }
    out.sort_unstable();
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
        self.judge_by(registry, plan, |i, _, _| {
            ends.iter().filter(|(n, _)| i >= *n).map(|e| e.1).max().unwrap_or(0)
        })
    }

    /// Judge `plan`, the only input of its topic (a record's offset is its
    /// place among the plan's records of its partition), with the decisions a
    /// job recorded: the floors in its stores, `(partition, offset) → floor`
    /// from that offset on, and the records whose late letters it committed
    /// (`lettered`: a decision whose letters were committed but whose floor
    /// no store recorded, the process gone between the two, is repeated
    /// from its letters).
    pub fn judge_recorded(
        &self,
        plan: &[Planned],
        floors: &std::collections::BTreeMap<(i32, i64), Time>,
        lettered: &std::collections::BTreeSet<(i32, i64)>,
    ) -> Judged {
        self.judge_by(Arc::new(EmbeddedRegistry::new().unwrap()), plan, |_, partition, offset| {
            if lettered.contains(&(partition, offset)) {
                return Time::MAX;
            }
            let here = floors.range((partition, 0)..=(partition, offset));
            here.map(|(_, f)| *f).max().unwrap_or(0)
        })
    }

    /// Judge `plan` with `floor_of(plan index, partition, offset)`.
    fn judge_by(
        &self,
        registry: Arc<dyn tripwire_connectors::registry::SchemaRegistry>,
        plan: &[Planned],
        floor_of: impl Fn(usize, i32, i64) -> Time,
    ) -> Judged {
        let mut codec = TransactionCodec::new(registry, Limits::default());
        let mut out = Judged::default();
        // Per partition, the accepted event times, largest first (two are kept).
        let mut largest: HashMap<i32, Vec<Time>> = HashMap::new();
        let mut seen: HashMap<(i32, u64), (Transaction, Time)> = HashMap::new();
        let mut offsets: HashMap<i32, i64> = HashMap::new();
        for (i, p) in plan.iter().enumerate() {
            let offset = offsets.entry(p.partition).or_default();
            let floor = floor_of(i, p.partition, *offset);
            *offset += 1;
            let Ok(x) = codec.decode(&p.payload, Some(now_ms())) else {
                out.dead.push(i);
                continue;
            };
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

/// How `got` differs from `want`: `None` when equal, else counts and the first
/// few differing keys with both values, for an assertion message.
pub fn stats_differ(
    want: &std::collections::BTreeMap<tripwire_dataflow::StatKey, i64>,
    got: &std::collections::BTreeMap<tripwire_dataflow::StatKey, i64>,
) -> Option<String> {
    let wrong: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(k) != Some(v))
        .map(|(k, v)| format!("{k:?} want {v} got {:?}", got.get(k)))
        .collect();
    let extra: Vec<String> = got
        .iter()
        .filter(|(k, _)| !want.contains_key(k))
        .map(|(k, v)| format!("{k:?} want none got {v}"))
        .collect();
    if wrong.is_empty() && extra.is_empty() {
        return None;
    }
    let first: Vec<&String> = wrong.iter().chain(&extra).take(12).collect();
    Some(format!(
        "{} of {} wrong or missing, {} extra; first: {first:#?}",
        wrong.len(),
        want.len(),
        extra.len()
    ))
}

/// A hand-made transaction of `card` at `event_time` on `partition`.
pub fn record(
    partition: i32,
    event_id: u64,
    card: u64,
    event_time: i64,
    expect: Expect,
) -> Planned {
    use tripwire_connectors::avro::{encode, AvroChannel, AvroTransaction};
    use tripwire_connectors::registry::SchemaRegistry;
    let schema = EmbeddedRegistry::new().unwrap().schema(2).unwrap();
    let r = AvroTransaction {
        event_id: event_id as i64,
        card_id: card as i64,
        account_id: card as i64,
        merchant_id: 7,
        mcc: 5411,
        amount_minor: 4_200,
        currency: "EUR".into(),
        country: "DE".into(),
        lat: 52.52,
        lon: 13.405,
        channel: AvroChannel::POS,
        event_time,
        device_id: None,
    };
    Planned {
        partition,
        key: card.to_string(),
        payload: encode(&r, 2, &schema).unwrap(),
        expect,
        label: None,
    }
}

/// Children killed when the test ends, however it ends.
pub struct Processes(pub Vec<std::process::Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Poll `done` every 200 ms until it holds; fail after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A PostgreSQL client on `schema`, with the runtime that drives it.
pub fn pg(schema: &str) -> (tokio::runtime::Runtime, tokio_postgres::Client) {
    let mut endpoints = tripwire_connectors::Endpoints::from_env().unwrap();
    endpoints.pg_schema = Some(schema.to_string());
    tripwire_connectors::readback::pg_client(&endpoints)
}

/// The least checkpoint of the job (a starting run gives every one of its workers a row).
pub fn committed(
    rt: &tokio::runtime::Runtime,
    c: &tokio_postgres::Client,
    job: &str,
) -> Option<i64> {
    rt.block_on(async {
        let rows =
            c.query("SELECT min(frontier) FROM checkpoints WHERE job = $1", &[&job]).await.ok()?;
        rows[0].get(0)
    })
}
