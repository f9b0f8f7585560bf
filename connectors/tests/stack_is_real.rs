//! The local stack is the real thing: Kafka (idempotent and transactional producers,
//! `read_committed`), PostgreSQL and Redis answer through the client crates Tripwire uses.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tripwire_connectors::Endpoints;

fn endpoints() -> Endpoints {
    Endpoints::from_env().expect("TRIPWIRE_* overrides")
}

/// A name no other test run uses, so runs against a long-lived stack never meet.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", endpoints().kafka_bootstrap)
        .create()
        .expect("admin client");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let results = rt
        .block_on(admin.create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .expect("create_topics request; is the stack up? (./tripwire stack up)");
    for r in results {
        r.expect("topic created");
    }
}

fn producer(extra: &[(&str, &str)]) -> ThreadedProducer<DefaultProducerContext> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", endpoints().kafka_bootstrap);
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    cfg.create().expect("producer")
}

/// Read every partition of `topic` from the start until `done` says the set is complete or 30 s pass.
fn read_all(
    topic: &str,
    partitions: i32,
    isolation: &str,
    done: impl Fn(&BTreeSet<String>) -> bool,
) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", endpoints().kafka_bootstrap)
        .set("group.id", unique("stack-test"))
        .set("isolation.level", isolation)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen = Vec::new();
    let mut set = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(&set) && Instant::now() < deadline {
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            let msg = msg.expect("consume");
            let v = String::from_utf8(msg.payload().unwrap().to_vec()).unwrap();
            set.insert(v.clone());
            seen.push(v);
        }
    }
    seen
}

#[test]
fn idempotent_producer_round_trips_every_record_once() {
    let topic = unique("stack_idem");
    create_topic(&topic, 3);
    // Idempotence needs the single-broker settings the stack applies to internal topics.
    let p = producer(&[("enable.idempotence", "true")]);
    let sent: Vec<String> = (0..300).map(|i| format!("record-{i}")).collect();
    for (i, v) in sent.iter().enumerate() {
        let key = i.to_string();
        p.send(BaseRecord::to(&topic).key(&key).payload(v)).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).expect("flush");
    let got = read_all(&topic, 3, "read_uncommitted", |s| s.len() >= sent.len());
    let mut sorted = got.clone();
    sorted.sort();
    let mut expected = sent.clone();
    expected.sort();
    assert_eq!(sorted, expected, "each produced record read exactly once");
}

#[test]
fn transactional_producer_commits_and_aborts_as_read_committed_sees_them() {
    let topic = unique("stack_txn");
    create_topic(&topic, 2);
    let p = producer(&[("transactional.id", &unique("stack-txn")), ("enable.idempotence", "true")]);
    let t = Duration::from_secs(30);
    p.init_transactions(t).expect("init_transactions: transaction coordinator running");
    let batch = |tag: &str| -> Vec<String> { (0..20).map(|i| format!("{tag}-{i}")).collect() };
    let send_all = |vals: &[String]| {
        for (i, v) in vals.iter().enumerate() {
            let key = i.to_string();
            p.send(BaseRecord::to(&topic).key(&key).payload(v)).map_err(|(e, _)| e).unwrap();
        }
    };
    let (committed, aborted, last) = (batch("committed"), batch("aborted"), batch("last"));
    p.begin_transaction().unwrap();
    send_all(&committed);
    p.commit_transaction(t).unwrap();
    p.begin_transaction().unwrap();
    send_all(&aborted);
    p.flush(t).unwrap();
    p.abort_transaction(t).unwrap();
    p.begin_transaction().unwrap();
    send_all(&last);
    p.commit_transaction(t).unwrap();

    let want: BTreeSet<String> = committed.iter().chain(&last).cloned().collect();
    let got = read_all(&topic, 2, "read_committed", |s| last.iter().all(|v| s.contains(v)));
    let got_set: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(got.len(), got_set.len(), "no duplicates under read_committed");
    assert_eq!(got_set, want, "read_committed sees committed batches only");

    // The aborted batch did reach the log: read_uncommitted sees it, so the test above is not vacuous.
    let raw = read_all(&topic, 2, "read_uncommitted", |s| last.iter().all(|v| s.contains(v)));
    assert!(aborted.iter().all(|v| raw.contains(v)), "aborted records are in the log");
}

#[tokio::test]
async fn postgres_round_trips_rows_through_tokio_postgres() {
    let (client, conn) =
        tokio_postgres::connect(&endpoints().postgres_config(), tokio_postgres::NoTls)
            .await
            .expect("connect as the tripwire role; is the stack up? (./tripwire stack up)");
    tokio::spawn(conn);
    let table = unique("stack_rows");
    client
        .batch_execute(&format!("CREATE TABLE {table} (id bigint PRIMARY KEY, card text NOT NULL, amount numeric NOT NULL)"))
        .await
        .unwrap();
    let insert = client
        .prepare(&format!("INSERT INTO {table} VALUES ($1, $2, $3::text::numeric)"))
        .await
        .unwrap();
    let rows: Vec<(i64, String, String)> = (0..50)
        .map(|i| (i, format!("card-{}", i % 7), format!("{}.{:02}", i * 13, i % 100)))
        .collect();
    for (id, card, amount) in &rows {
        client.execute(&insert, &[id, card, amount]).await.unwrap();
    }
    let back: Vec<(i64, String, String)> = client
        .query(&format!("SELECT id, card, amount::text FROM {table} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    client.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
    assert_eq!(back, rows);
}

#[tokio::test]
async fn redis_answers_set_get_and_eval() {
    let client = redis::Client::open(endpoints().redis_url()).unwrap();
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect; is the stack up? (./tripwire stack up)");
    let key = unique("stack:key");
    let () = redis::cmd("SET").arg(&key).arg("41").query_async(&mut con).await.unwrap();
    let got: String = redis::cmd("GET").arg(&key).query_async(&mut con).await.unwrap();
    assert_eq!(got, "41");
    // A script runs atomically on the server: increment and read back in one step.
    let after: i64 = redis::cmd("EVAL")
        .arg("redis.call('INCRBY', KEYS[1], ARGV[1]); return tonumber(redis.call('GET', KEYS[1]))")
        .arg(1)
        .arg(&key)
        .arg(1)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(after, 42);
    let () = redis::cmd("DEL").arg(&key).query_async(&mut con).await.unwrap();
}
