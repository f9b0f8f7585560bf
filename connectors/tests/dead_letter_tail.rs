//! The dead-letter sink's tail reader against a real broker: where a replay's
//! letters are already committed, when the topic's end holds transaction
//! markers, aborted letters, letters of another source topic and letters
//! written without a transaction (by builds before transactions).
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use tripwire_connectors::dead_letter::DeadLetterReason;
use tripwire_connectors::dead_letter_sink::{
    committed_late, dead_letter_sink, headers, written, Confirm,
};
use tripwire_connectors::kafka_admin::ensure_topic;
use tripwire_connectors::kafka_source::{DeadLetter, Progress};
use tripwire_connectors::Endpoints;

fn producer(
    bootstrap: &str,
    transactional_id: Option<&str>,
) -> ThreadedProducer<DefaultProducerContext> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    match transactional_id {
        Some(id) => config.set("transactional.id", id),
        None => config.set("enable.idempotence", "true"),
    };
    let p: ThreadedProducer<DefaultProducerContext> = config.create().unwrap();
    if transactional_id.is_some() {
        p.init_transactions(Duration::from_secs(30)).unwrap();
    }
    p
}

/// A late letter on dead-letter `partition` for record `offset` of `source` partition `partition`.
fn letter(
    p: &ThreadedProducer<DefaultProducerContext>,
    dlq: &str,
    source: &str,
    partition: i32,
    offset: i64,
) {
    letter_for(p, dlq, source, partition, offset, "late");
}

/// [`letter`] with another reason.
fn letter_for(
    p: &ThreadedProducer<DefaultProducerContext>,
    dlq: &str,
    source: &str,
    partition: i32,
    offset: i64,
    reason: &str,
) {
    let (part, off) = (partition.to_string(), offset.to_string());
    let hs = OwnedHeaders::new()
        .insert(Header { key: headers::REASON, value: Some(reason) })
        .insert(Header { key: headers::TOPIC, value: Some(source) })
        .insert(Header { key: headers::PARTITION, value: Some(part.as_str()) })
        .insert(Header { key: headers::OFFSET, value: Some(off.as_str()) });
    let record =
        BaseRecord::<[u8], [u8]>::to(dlq).partition(partition).payload(&b"x"[..]).headers(hs);
    p.send(record).map_err(|(e, _)| e).unwrap();
}

/// A fresh source name, its dead-letter topic with `partitions` partitions,
/// and a transactional producer for it: `(bootstrap, source, dlq, producer)`.
fn fixture(
    name: &str,
    partitions: i32,
) -> (String, String, String, ThreadedProducer<DefaultProducerContext>) {
    let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
    let source = common::unique(name);
    let dlq = format!("{source}-dlq");
    ensure_topic(&bootstrap, &dlq, partitions).expect("topic; is the stack up?");
    let txn = producer(&bootstrap, Some(&format!("tripwire-test-{dlq}")));
    (bootstrap, source, dlq, txn)
}

#[test]
fn the_tail_is_the_last_committed_letter_of_the_source() {
    let (bootstrap, source, dlq, txn) = fixture("tail_src", 4);

    // Partition 0: offsets 1-3 committed, then 4-5 aborted, then 6-45 aborted
    // (more than the reader's first look back of 16 records).
    txn.begin_transaction().unwrap();
    for o in 1..=3 {
        letter(&txn, &dlq, &source, 0, o);
    }
    txn.commit_transaction(Duration::from_secs(30)).unwrap();
    for range in [4..=5, 6..=45] {
        txn.begin_transaction().unwrap();
        for o in range {
            letter(&txn, &dlq, &source, 0, o);
        }
        txn.flush(Duration::from_secs(30)).unwrap();
        txn.abort_transaction(Duration::from_secs(30)).unwrap();
    }
    // Partition 1: only aborted letters.
    txn.begin_transaction().unwrap();
    letter(&txn, &dlq, &source, 1, 7);
    txn.flush(Duration::from_secs(30)).unwrap();
    txn.abort_transaction(Duration::from_secs(30)).unwrap();
    // Partition 2: a committed letter of this source, then committed letters
    // of another source topic after it.
    txn.begin_transaction().unwrap();
    letter(&txn, &dlq, &source, 2, 11);
    for o in 100..130 {
        letter(&txn, &dlq, "another_topic", 2, o);
    }
    txn.commit_transaction(Duration::from_secs(30)).unwrap();
    // Partition 3: letters written without a transaction (an older build), last.
    let plain = producer(&bootstrap, None);
    letter(&plain, &dlq, &source, 3, 21);
    letter(&plain, &dlq, &source, 3, 22);
    plain.flush(Duration::from_secs(30)).unwrap();

    let tail = written(&bootstrap, &dlq, &source).unwrap();
    let want: HashMap<i32, i64> = [(0, 3), (2, 11), (3, 22)].into_iter().collect();
    assert_eq!(tail, want, "per partition the last committed letter of this source");
}

#[test]
fn a_letter_is_committed_soon_without_a_restart_point() {
    let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
    let source = common::unique("linger_src");
    let dlq = format!("{source}-dlq");
    ensure_topic(&bootstrap, &dlq, 1).expect("topic; is the stack up?");
    timely::execute(timely::Config::thread(), move |worker| {
        let mut input = timely::dataflow::InputHandleVec::<u64, DeadLetter>::new();
        let (b, d, s) = (bootstrap.clone(), dlq.clone(), source.clone());
        worker.dataflow::<u64, _, _>(|scope| {
            // Restart points are taken every few thousand records of a
            // partition: none comes here, as on a slow topic.
            let confirm = Confirm { taken: Progress::default(), confirmed: Progress::default() };
            dead_letter_sink(input.to_stream(scope), &b, &d, &s, 1, Some(confirm)).unwrap();
        });
        input.send(DeadLetter {
            reason: DeadLetterReason::Late,
            detail: "behind the floor".into(),
            topic: source.clone(),
            partition: 0,
            offset: 41,
            key: None,
            payload: b"x".to_vec(),
        });
        input.advance_to(1);
        // The input stays open: only the sink's own timer can commit the letter.
        let deadline = Instant::now() + Duration::from_secs(30);
        let started = Instant::now();
        loop {
            worker.step_or_park(Some(Duration::from_millis(20)));
            if written(&bootstrap, &dlq, &source).unwrap().get(&0) == Some(&41) {
                break;
            }
            assert!(Instant::now() < deadline, "the letter was not committed within 30 s");
        }
        println!("committed after {:?}", started.elapsed());
    })
    .unwrap();
}

#[test]
fn committed_late_letters_past_the_restart_points_are_found() {
    let (bootstrap, source, dlq, txn) = fixture("late_src", 2);
    txn.begin_transaction().unwrap();
    // Partition 0 restarts at offset 3: the late letter at 2 lies before it.
    letter(&txn, &dlq, &source, 0, 2);
    letter_for(&txn, &dlq, &source, 0, 3, "truncated");
    letter(&txn, &dlq, &source, 0, 10);
    for o in 11..40 {
        letter_for(&txn, &dlq, &source, 0, o, "wrong_magic");
    }
    letter(&txn, &dlq, &source, 0, 41);
    // Partition 1 restarts at its beginning.
    letter(&txn, &dlq, &source, 1, 5);
    txn.commit_transaction(Duration::from_secs(30)).unwrap();
    // Aborted: no record of anything.
    txn.begin_transaction().unwrap();
    letter(&txn, &dlq, &source, 0, 44);
    txn.flush(Duration::from_secs(30)).unwrap();
    txn.abort_transaction(Duration::from_secs(30)).unwrap();

    let from: HashMap<i32, i64> = [(0, 3), (1, 0)].into_iter().collect();
    let late = committed_late(&bootstrap, &dlq, &source, &from).unwrap();
    let want: HashMap<i32, Vec<i64>> = [(0, vec![10, 41]), (1, vec![5])].into_iter().collect();
    assert_eq!(late, want, "committed late letters at or after each restart offset");
    let none = committed_late(&bootstrap, &format!("{dlq}-missing"), &source, &from).unwrap();
    assert!(none.is_empty(), "no dead-letter topic yet: nothing");
}
