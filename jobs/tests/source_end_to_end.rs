//! The Kafka source against the real broker: the generator writes v1 and v2
//! records mixed with every bad-input class, out-of-order and late records into
//! a 6-partition topic; a 2-worker dataflow reads it. Every accepted event must
//! arrive exactly once, and every bad record must land in the dead-letter
//! topic with the right reason in its headers.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use timely::dataflow::operators::capture::{Capture, Extract};
use tripwire_connectors::dead_letter::DeadLetterReason;
use tripwire_connectors::dead_letter_sink::{dead_letter_sink, header, headers};
use tripwire_connectors::kafka_source::{kafka_source, SourceConfig};
use tripwire_connectors::registry::EmbeddedRegistry;
use tripwire_connectors::Endpoints;
use tripwire_dataflow::FraudConfig;
use tripwire_jobs::generator::{Expect, GenConfig, Generator, SchemaIds};

const PARTITIONS: i32 = 6;

fn bootstrap() -> String {
    Endpoints::from_env().expect("TRIPWIRE_* overrides").kafka_bootstrap
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn create_topics(names: &[&str]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap()).create().unwrap();
    let topics: Vec<NewTopic> =
        names.iter().map(|n| NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1))).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for r in rt
        .block_on(admin.create_topics(&topics, &AdminOptions::new()))
        .expect("create topics; is the stack up? (./tripwire stack up)")
    {
        r.expect("topic created");
    }
}

#[test]
fn source_accepts_every_good_record_once_and_dead_letters_every_bad_one_with_its_reason() {
    let suffix = format!("{}_{}", std::process::id(), now_ms());
    let topic = format!("e2e_tx_{suffix}");
    let dlq = format!("e2e_dlq_{suffix}");
    create_topics(&[&topic, &dlq]);

    let now = now_ms();
    let config = GenConfig {
        seed: 7,
        cards: 300,
        partitions: PARTITIONS,
        // Two hours back, so scenario events (up to 30 min apart) are all in the past.
        start_ms: now - 2 * 3_600_000,
        spacing_ms: 20,
        fraud_per_10k: 30,
        bad_per_10k: 40,
        v1_percent: 40,
        lateness_ms: 5_000,
        out_of_order_per_10k: 400,
        late_per_10k: 20,
        duplicates_per_10k: 5,
        near_miss_per_10k: 0,
        spending_profiles: true,
        rate_per_s: None,
        now_ms: now,
        schema_ids: SchemaIds::EMBEDDED,
    };
    let plan = Generator::new(config.clone()).generate(4_000);

    // Produce in plan order; the idempotent producer keeps each partition's order,
    // so a record's offset is its index among its partition's records.
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    let mut expect_at: HashMap<(i32, i64), Expect> = HashMap::new();
    let mut next_offset: HashMap<i32, i64> = HashMap::new();
    for p in &plan {
        let offset = next_offset.entry(p.partition).or_default();
        expect_at.insert((p.partition, *offset), p.expect.clone());
        *offset += 1;
        let mut record =
            BaseRecord::to(&topic).partition(p.partition).key(&p.key).payload(&p.payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");

    // Guards: the plan holds every class, both schema versions, out-of-order and late records.
    let rejects: Vec<DeadLetterReason> = plan
        .iter()
        .filter_map(|p| match p.expect {
            Expect::Reject(r) => Some(r),
            _ => None,
        })
        .collect();
    for reason in DeadLetterReason::ALL {
        assert!(rejects.contains(&reason), "the plan has a {reason} record");
    }
    assert!(plan.iter().any(|p| p.payload.get(4) == Some(&1)), "v1 records");
    assert!(plan.iter().any(|p| p.payload.get(4) == Some(&2)), "v2 records");

    // Two workers read the topic to its end.
    let (events_tx, events_rx) = mpsc::channel();
    let events_tx = Arc::new(Mutex::new(events_tx));
    let source_config = SourceConfig {
        bounded: true,
        idle_timeout: None,
        lateness_ms: config.lateness_ms as u64,
        group_id: format!("e2e-{suffix}"),
        ..SourceConfig::new(&bootstrap(), &topic)
    };
    let (bs, dlq_topic, source_topic) = (bootstrap(), dlq.clone(), topic.clone());
    timely::execute(timely::Config::process(2), move |worker| {
        let events_tx = events_tx.lock().unwrap().clone();
        let registry = Arc::new(EmbeddedRegistry::new().unwrap());
        worker.dataflow::<u64, _, _>(|scope| {
            let source =
                kafka_source(scope, &source_config, &FraudConfig::default(), registry).unwrap();
            source.events.inner.capture_into(events_tx);
            dead_letter_sink(
                source.dead_letters,
                &bs,
                &dlq_topic,
                &source_topic,
                "e2e",
                PARTITIONS as usize,
                None,
                None,
            )
            .unwrap();
        });
    })
    .unwrap()
    .join()
    .into_iter()
    .for_each(|r| r.unwrap());

    // Every accepted event exactly once, and nothing else.
    let mut got: BTreeMap<u64, i64> = BTreeMap::new();
    for (_, batch) in events_rx.extract() {
        for (x, _t, d) in batch {
            *got.entry(x.event_id).or_default() += d;
        }
    }
    let want: BTreeMap<u64, i64> = plan
        .iter()
        .filter_map(|p| match p.expect {
            Expect::Accept(id) => Some((id, 1)),
            _ => None,
        })
        .collect();
    let missing = want.keys().filter(|k| !got.contains_key(k)).count();
    let extra = got.keys().filter(|k| !want.contains_key(k)).count();
    let doubled = got.values().filter(|d| **d != 1).count();
    assert_eq!((missing, extra, doubled), (0, 0, 0), "accepted events: missing, extra, not once");

    // The business metrics (counted per worker, added once per activation)
    // count every accepted event once, whatever the workers' activations.
    let families = prometheus::gather();
    let family = |name: &str| {
        families.iter().find(|f| f.name() == name).unwrap_or_else(|| panic!("{name} gathered"))
    };
    let counted: u64 = family("tripwire_transactions_total")
        .get_metric()
        .iter()
        .map(|m| m.get_counter().get_value() as u64)
        .sum();
    assert_eq!(counted, want.len() as u64, "tripwire_transactions_total over its labels");
    let amounts = family("tripwire_transaction_amount_minor").get_metric()[0].get_histogram();
    assert_eq!(amounts.get_sample_count(), want.len() as u64, "amounts observed");

    // Every bad record in the dead-letter topic, with the reason planned for its offset.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", format!("e2e-dlq-{suffix}"))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&dlq, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen: HashMap<(i32, i64), String> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < rejects.len() && Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else { continue };
        let m = m.unwrap();
        assert!(m.headers().is_some(), "dead letters carry headers");
        let get = |name: &str| header(&m, name).unwrap_or_default();
        assert_eq!(get(headers::TOPIC), topic);
        assert!(!get(headers::ERROR).is_empty(), "the error text is there");
        let at = (get(headers::PARTITION).parse().unwrap(), get(headers::OFFSET).parse().unwrap());
        assert!(seen.insert(at, get(headers::REASON)).is_none(), "{at:?} dead-lettered once");
    }
    assert_eq!(seen.len(), rejects.len(), "every bad record reached the dead-letter topic");
    for (at, reason) in &seen {
        match &expect_at[at] {
            Expect::Reject(r) => assert_eq!(reason, r.as_str(), "reason of the record at {at:?}"),
            Expect::Accept(id) | Expect::Duplicate(id) => {
                panic!("event {id} at {at:?} was dead-lettered as {reason}")
            }
        }
    }
}
