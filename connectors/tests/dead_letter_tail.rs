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
    committed_late, dead_letter_sink, header, headers, written, Confirm,
};
use tripwire_connectors::kafka_admin::ensure_topic;
use tripwire_connectors::kafka_source::{DeadLetter, Progress};
use tripwire_connectors::Endpoints;

/// The job the sinks under test write for.
const JOB: &str = "tail_job";

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
    letter_of(p, dlq, source, partition, offset, "late", None);
}

/// [`letter`] with another reason, naming the job that wrote it (none: as
/// builds before letters named their job wrote them).
fn letter_of(
    p: &ThreadedProducer<DefaultProducerContext>,
    dlq: &str,
    source: &str,
    partition: i32,
    offset: i64,
    reason: &str,
    job: Option<&str>,
) {
    let (part, off) = (partition.to_string(), offset.to_string());
    let mut hs = OwnedHeaders::new()
        .insert(Header { key: headers::REASON, value: Some(reason) })
        .insert(Header { key: headers::TOPIC, value: Some(source) })
        .insert(Header { key: headers::PARTITION, value: Some(part.as_str()) })
        .insert(Header { key: headers::OFFSET, value: Some(off.as_str()) });
    if let Some(job) = job {
        hs = hs.insert(Header { key: headers::JOB, value: Some(job) });
    }
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

    let tail = written(&bootstrap, &dlq, &source, JOB, None).unwrap();
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
            let confirm = Confirm {
                taken: Progress::default(),
                confirmed: Progress::default(),
                settled: Default::default(),
            };
            dead_letter_sink(input.to_stream(scope), &b, &d, &s, JOB, 1, Some(confirm), None)
                .unwrap();
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
            if written(&bootstrap, &dlq, &source, JOB, None).unwrap().get(&0) == Some(&41) {
                break;
            }
            assert!(Instant::now() < deadline, "the letter was not committed within 30 s");
        }
        println!("committed after {:?}", started.elapsed());
    })
    .unwrap();
}

#[test]
fn restart_points_queued_behind_a_commit_share_its_transaction() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use tripwire_connectors::kafka_source::ProgressSample;
    // A catch-up: a letter, then a restart point past it, many times over,
    // as fast as the worker goes; each commit waits for the broker.
    const POINTS: i64 = 100;
    let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
    let source = common::unique("queued_src");
    let dlq = format!("{source}-dlq");
    ensure_topic(&bootstrap, &dlq, 1).expect("topic; is the stack up?");
    let confirmed = Progress::default();
    let (b, d, s, c) = (bootstrap.clone(), dlq.clone(), source.clone(), confirmed.clone());
    timely::execute(timely::Config::thread(), move |worker| {
        let mut input = timely::dataflow::InputHandleVec::<u64, DeadLetter>::new();
        let taken = Progress::default();
        worker.dataflow::<u64, _, _>(|scope| {
            let confirm =
                Confirm { taken: taken.clone(), confirmed: c.clone(), settled: Default::default() };
            dead_letter_sink(input.to_stream(scope), &b, &d, &s, JOB, 1, Some(confirm), None)
                .unwrap();
        });
        for offset in 0..POINTS {
            input.send(DeadLetter {
                reason: DeadLetterReason::Late,
                detail: "behind the floor".into(),
                topic: s.clone(),
                partition: 0,
                offset,
                key: None,
                payload: offset.to_string().into_bytes(),
            });
            let point = ProgressSample {
                topic: s.clone(),
                partition: 0,
                offset: offset + 1,
                max_event_time: 0,
                basis: 0,
                top: 0,
            };
            taken.lock().unwrap().push(point);
            input.advance_to(offset as u64 + 1);
            worker.step();
        }
        // The input closes: the sink commits what it has and ends.
    })
    .unwrap();

    let offsets: Vec<i64> = read_letters(&bootstrap, &dlq).iter().map(|(o, _, _)| *o).collect();
    assert_eq!(offsets, (0..POINTS).collect::<Vec<_>>(), "every letter, once, in order");
    let passed: Vec<i64> = confirmed.lock().unwrap().iter().map(|p| p.offset).collect();
    assert_eq!(passed, (1..=POINTS).collect::<Vec<_>>(), "every restart point, in order");
    // Each committed transaction leaves a marker in the partition: its end
    // is the letters plus one marker per commit.
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let (_, end) = consumer.fetch_watermarks(&dlq, 0, Duration::from_secs(30)).unwrap();
    let commits = end - POINTS;
    println!("{POINTS} restart points, {commits} commits");
    assert!(
        commits <= POINTS / 4,
        "restart points waiting behind a commit share the next one: \
         {commits} commits for {POINTS} restart points"
    );
}

#[test]
fn committed_late_letters_past_the_restart_points_are_found() {
    let (bootstrap, source, dlq, txn) = fixture("late_src", 2);
    txn.begin_transaction().unwrap();
    // Partition 0 restarts at offset 3: the late letter at 2 lies before it.
    letter(&txn, &dlq, &source, 0, 2);
    letter_of(&txn, &dlq, &source, 0, 3, "truncated", None);
    letter(&txn, &dlq, &source, 0, 10);
    for o in 11..40 {
        letter_of(&txn, &dlq, &source, 0, o, "wrong_magic", None);
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
    let late = committed_late(&bootstrap, &dlq, &source, JOB, &from).unwrap();
    let want: HashMap<i32, Vec<i64>> = [(0, vec![10, 41]), (1, vec![5])].into_iter().collect();
    assert_eq!(late, want, "committed late letters at or after each restart offset");
    let none = committed_late(&bootstrap, &format!("{dlq}-missing"), &source, JOB, &from).unwrap();
    assert!(none.is_empty(), "no dead-letter topic yet: nothing");
}

#[test]
fn jobs_sharing_a_dead_letter_topic_read_back_only_their_own_letters() {
    // Two jobs read the same source and write to the same dead-letter topic:
    // with other lateness bounds, other records are late for each.
    let (bootstrap, source, dlq, txn) = fixture("shared_dlq", 2);
    txn.begin_transaction().unwrap();
    // Partition 0: this job's letters, then more of the other job's than
    // the reader's first look back (16 records).
    for o in 1..=3 {
        letter_of(&txn, &dlq, &source, 0, o, "late", Some(JOB));
    }
    for o in 10..=40 {
        letter_of(&txn, &dlq, &source, 0, o, "late", Some("another_job"));
    }
    // Partition 1: the other job's, then one written before letters named
    // their job, which every job counts as its own, as it did then.
    letter_of(&txn, &dlq, &source, 1, 7, "late", Some("another_job"));
    letter_of(&txn, &dlq, &source, 1, 8, "late", None);
    txn.commit_transaction(Duration::from_secs(30)).unwrap();

    let mine = written(&bootstrap, &dlq, &source, JOB, None).unwrap();
    let want: HashMap<i32, i64> = [(0, 3), (1, 8)].into_iter().collect();
    assert_eq!(mine, want, "this job's last letters, not the other's");
    let theirs = written(&bootstrap, &dlq, &source, "another_job", None).unwrap();
    let want: HashMap<i32, i64> = [(0, 40), (1, 8)].into_iter().collect();
    assert_eq!(theirs, want, "the other job's last letters");
    let from: HashMap<i32, i64> = [(0, 0), (1, 0)].into_iter().collect();
    let late = committed_late(&bootstrap, &dlq, &source, JOB, &from).unwrap();
    let want: HashMap<i32, Vec<i64>> = [(0, vec![1, 2, 3]), (1, vec![8])].into_iter().collect();
    assert_eq!(late, want, "late again for this job: only its own letters");
}

/// Every committed letter of `dlq` partition 0 (each written by the sink
/// for [`JOB`]), in order:
/// `(source offset, payload, payload-omitted header)`.
fn read_letters(bootstrap: &str, dlq: &str) -> Vec<(i64, Vec<u8>, Option<String>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{dlq}-reader"))
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(dlq, 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let mut letters = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the dead-letter topic's end was not reached");
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => letters.push((
                {
                    assert_eq!(header(&m, headers::JOB).as_deref(), Some(JOB), "the writer named");
                    header(&m, headers::OFFSET).unwrap().parse().unwrap()
                },
                m.payload().unwrap_or_default().to_vec(),
                header(&m, headers::PAYLOAD_OMITTED),
            )),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return letters,
            Some(Err(e)) => panic!("reading the dead-letter topic: {e}"),
            None => {}
        }
    }
}

/// Produce a record of `bytes` bytes to partition 1 of `topic` (no letter:
/// it has no headers) and say whether the broker took it.
fn broker_takes(bootstrap: &str, topic: &str, bytes: usize) -> bool {
    use rdkafka::producer::{BaseProducer, DeliveryResult, ProducerContext};
    use std::sync::{Arc, Mutex};
    struct Took(Arc<Mutex<Option<bool>>>);
    impl rdkafka::ClientContext for Took {}
    impl ProducerContext for Took {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
            *self.0.lock().unwrap() = Some(result.is_ok());
        }
    }
    let took = Arc::new(Mutex::new(None));
    let p: BaseProducer<Took> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create_with_context(Took(took.clone()))
        .unwrap();
    let payload = vec![0_u8; bytes];
    p.send(BaseRecord::<[u8], [u8]>::to(topic).partition(1).payload(&payload[..]))
        .map_err(|(e, _)| e)
        .unwrap();
    p.flush(Duration::from_secs(30)).unwrap();
    let took = took.lock().unwrap().expect("a delivery report after flush");
    took
}

/// Letters of up to `big` bytes through the sink to a dead-letter topic that
/// takes records of up to 4 KiB, from its creation (`lowered: false`: the
/// client refuses what is larger) or from after the sink's producer read its
/// limit (`lowered: true`: the broker does): every letter arrives once, in
/// order, the large ones without their payload.
fn too_large_letters(name: &str, lowered: bool) {
    use std::sync::mpsc::RecvTimeoutError;
    use tripwire_connectors::kafka_admin::{alter_topic, ensure_topic_with};
    let bootstrap = Endpoints::from_env().unwrap().kafka_bootstrap;
    let source = common::unique(name);
    let dlq = format!("{source}-dlq");
    let small = [("max.message.bytes", "4096")];
    ensure_topic_with(&bootstrap, &dlq, 2, if lowered { &[] } else { &small })
        .expect("topic; is the stack up?");
    // (offset, payload size): 50 KB first (it opens the transaction), and
    // 3 MB (more than the client takes from any topic: its
    // `message.max.bytes` is 1 MB) between small ones.
    let sizes = [(10_i64, 50_000_usize), (11, 100), (12, 200), (13, 3_000_000), (14, 300)];
    let payload = |offset: i64, n: usize| vec![b'a' + (offset % 26) as u8; n];
    let (b, d, s) = (bootstrap.clone(), dlq.clone(), source.clone());
    let started = Instant::now();
    let (done, finished) = std::sync::mpsc::channel();
    let run = std::thread::spawn(move || {
        let ran = timely::execute(timely::Config::thread(), move |worker| {
            let mut input = timely::dataflow::InputHandleVec::<u64, DeadLetter>::new();
            worker.dataflow::<u64, _, _>(|scope| {
                dead_letter_sink(input.to_stream(scope), &b, &d, &s, JOB, 1, None, None).unwrap();
            });
            if lowered {
                alter_topic(&b, &d, &small).unwrap();
                // The broker applies it soon after it answers.
                let deadline = Instant::now() + Duration::from_secs(60);
                while broker_takes(&b, &d, 8192) {
                    assert!(Instant::now() < deadline, "the broker still takes 8 KB records");
                }
            }
            for (offset, n) in sizes {
                input.send(DeadLetter {
                    reason: DeadLetterReason::Truncated,
                    detail: format!("{n} bytes, limit 1000"),
                    topic: s.clone(),
                    partition: 0,
                    offset,
                    key: Some(b"card".to_vec()),
                    payload: payload(offset, n),
                });
            }
            // The input closes: the sink commits what it has and ends.
        });
        done.send(ran.map(drop)).unwrap();
    });
    // A refused letter used to stall the sink for good: bound the wait.
    match finished.recv_timeout(Duration::from_secs(120)) {
        Ok(ran) => ran.unwrap(),
        Err(RecvTimeoutError::Timeout) => panic!("the sink did not finish within 120 s"),
        Err(RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(run.join().expect_err("it sent nothing: it panicked"))
        }
    }
    println!("all letters committed after {:?}", started.elapsed());

    let letters = read_letters(&bootstrap, &dlq);
    let offsets: Vec<i64> = letters.iter().map(|(o, _, _)| *o).collect();
    assert_eq!(offsets, vec![10, 11, 12, 13, 14], "every letter, once, in source order");
    for ((offset, n), (_, got, omitted)) in sizes.iter().zip(&letters) {
        if *n > 4096 {
            assert!(got.is_empty(), "letter {offset} went without its payload");
            assert_eq!(omitted.as_deref(), Some(n.to_string().as_str()), "letter {offset}");
        } else {
            assert_eq!(got, &payload(*offset, *n), "letter {offset} went whole");
            assert_eq!(omitted, &None, "letter {offset}");
        }
    }
    assert_eq!(written(&bootstrap, &dlq, &source, JOB, None).unwrap().get(&0), Some(&14));
}

#[test]
fn a_letter_larger_than_the_topic_takes_goes_without_its_payload() {
    too_large_letters("too_large_src", false);
}

#[test]
fn a_letter_the_broker_refuses_goes_again_then_without_its_payload() {
    too_large_letters("refused_src", true);
}
