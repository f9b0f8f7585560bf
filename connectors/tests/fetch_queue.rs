//! Records read a batch at a time (`FetchQueue`) against a real broker: every
//! record of every assigned partition once, in offset order, with its key,
//! value and timestamp as produced; an end of partition for each; nothing
//! left to the consumer's own queue; and a partition paused and resumed in
//! the middle (librdkafka drops what it had fetched for it and fetches again)
//! still read once each.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tripwire_connectors::fetch_queue::{FetchQueue, Fetched, MOST};
use tripwire_connectors::kafka_admin::{ensure_topic, ReadsToEnd};
use tripwire_connectors::Endpoints;

/// What one record was produced with.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Produced {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    timestamp: i64,
}

/// Produce to `partitions` of `topic` a seeded number of records each (one
/// partition none), some without a key, some without a value; what each got.
fn produce(bootstrap: &str, topic: &str, partitions: i32, seed: u64) -> Vec<Vec<Produced>> {
    let mut next = tripwire_dataflow::seeded(seed);
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut sent: Vec<Vec<Produced>> = vec![Vec::new(); partitions as usize];
    for p in 1..partitions {
        for i in 0..200 + next(400) {
            let key = (next(5) != 0).then(|| format!("card-{}", next(1000)).into_bytes());
            let value =
                (next(7) != 0).then(|| (0..1 + next(300)).map(|_| next(256) as u8).collect());
            let r = Produced { key, value, timestamp: 1_700_000_000_000 + i as i64 };
            let mut record =
                BaseRecord::<[u8], [u8]>::to(topic).partition(p).timestamp(r.timestamp);
            if let Some(k) = &r.key {
                record = record.key(k);
            }
            if let Some(v) = &r.value {
                record = record.payload(v);
            }
            producer.send(record).map_err(|(e, _)| e).unwrap();
            sent[p as usize].push(r);
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    sent
}

fn reader(bootstrap: &str, topic: &str, partitions: i32) -> FetchQueue<ReadsToEnd> {
    let consumer: BaseConsumer<ReadsToEnd> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", common::unique("fetch_queue"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // Small fetches: many batches, and a pause that finds records fetched.
        .set("message.max.bytes", "4096")
        .set("fetch.max.bytes", "4096")
        .set("max.partition.fetch.bytes", "2048")
        .create_with_context(ReadsToEnd)
        .unwrap();
    let all: Vec<i32> = (0..partitions).collect();
    let reader = FetchQueue::new(consumer, topic, &all).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in all {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    reader.consumer().assign(&tpl).unwrap();
    reader
}

/// What [`read_all`] read: the records per partition, how many came from
/// the consumer's own queue, and how many of partition 1's had been read
/// when it was paused.
struct ReadAll {
    read: HashMap<i32, Vec<(i64, Produced)>>,
    polled: usize,
    paused_after: Option<usize>,
}

/// Read until every partition has ended, pausing partition 1 for a while
/// after its first records if `pause`.
fn read_all(reader: &FetchQueue<ReadsToEnd>, topic: &str, partitions: i32, pause: bool) -> ReadAll {
    let mut read: HashMap<i32, Vec<(i64, Produced)>> = HashMap::new();
    let mut ended = vec![false; partitions as usize];
    let (mut polled, mut paused_at, mut paused_after) = (0, None::<Instant>, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut fetched = Vec::new();
    while ended.iter().any(|e| !e) {
        assert!(Instant::now() < deadline, "not every partition ended: {ended:?}");
        fetched.extend(reader.poll());
        reader.read(MOST, Duration::from_millis(50), &mut fetched);
        for result in fetched.drain(..) {
            match result {
                Ok(m) => {
                    if matches!(m, Fetched::Polled(_)) {
                        polled += 1;
                    }
                    let r = Produced {
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        timestamp: m.timestamp_ms().expect("a timestamp"),
                    };
                    read.entry(m.partition()).or_default().push((m.offset(), r));
                }
                Err(KafkaError::PartitionEOF(p)) => ended[p as usize] = true,
                Err(e) => panic!("read: {e}"),
            }
        }
        let p1 = read.get(&1).map_or(0, Vec::len);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, 1);
        if pause && p1 > 0 && paused_at.is_none() {
            reader.consumer().pause(&tpl).unwrap();
            paused_at = Some(Instant::now());
            paused_after = Some(p1);
        } else if paused_at.is_some_and(|t| t.elapsed() > Duration::from_millis(300)) {
            reader.consumer().resume(&tpl).unwrap();
            paused_at = Some(Instant::now() + Duration::from_secs(3600));
        }
    }
    ReadAll { read, polled, paused_after }
}

fn check(read: &HashMap<i32, Vec<(i64, Produced)>>, sent: &[Vec<Produced>]) {
    for (p, produced) in sent.iter().enumerate() {
        let got = read.get(&(p as i32)).cloned().unwrap_or_default();
        let offsets: Vec<i64> = got.iter().map(|(o, _)| *o).collect();
        let want: Vec<i64> = (0..produced.len() as i64).collect();
        assert_eq!(offsets, want, "partition {p}: each offset once, in order");
        let records: Vec<Produced> = got.into_iter().map(|(_, r)| r).collect();
        assert_eq!(&records, produced, "partition {p}: the records as produced");
    }
}

#[test]
fn every_record_is_read_once_in_order_as_produced_and_each_partition_ends() {
    let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
    for seed in [1, 2, 3] {
        let topic = common::unique(&format!("fetch_queue_{seed}"));
        ensure_topic(&bootstrap, &topic, 4).unwrap();
        let sent = produce(&bootstrap, &topic, 4, seed);
        let reader = reader(&bootstrap, &topic, 4);
        let all = read_all(&reader, &topic, 4, false);
        check(&all.read, &sent);
        assert_eq!(all.polled, 0, "no record reached the consumer's own queue");
    }
}

#[test]
fn a_partition_paused_and_resumed_midway_is_still_read_once_in_order() {
    let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
    let topic = common::unique("fetch_queue_pause");
    ensure_topic(&bootstrap, &topic, 3).unwrap();
    let sent = produce(&bootstrap, &topic, 3, 7);
    let reader = reader(&bootstrap, &topic, 3);
    let all = read_all(&reader, &topic, 3, true);
    let paused_after = all.paused_after.expect("partition 1 was paused");
    assert!(paused_after < sent[1].len(), "paused with records still to read: {paused_after}");
    check(&all.read, &sent);
}
