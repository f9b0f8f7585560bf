//! txgen and the fraud detector through the schema registry: txgen registers
//! the schemas (the registry assigns ids the embedded manifest does not have)
//! and frames records with them; the job, told to use the registry, reads every
//! record: each one ends up archived or, if late, in `late_events`, and none is
//! rejected for its schema.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_postgres::NoTls;
use tripwire_connectors::confluent_registry::ConfluentRegistry;
use tripwire_connectors::Endpoints;

#[test]
fn records_framed_with_registry_ids_are_all_read_through_the_registry() {
    let endpoints = Endpoints::from_env().unwrap();
    let id = format!(
        "{}_{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
    );
    let topic = format!("registry_{id}");
    let registry =
        ConfluentRegistry::new(&endpoints.registry_url).retry_for(Duration::from_secs(20));
    let status = Command::new(env!("CARGO_BIN_EXE_txgen"))
        .args(["--topic", &topic, "--partitions", "6", "--events", "3000", "--cards", "300"])
        .args(["--bad-per-10k", "0", "--schema-registry"])
        .status()
        .unwrap();
    assert!(status.success());

    // Every record of the topic, and the schema ids they carry.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &endpoints.kafka_bootstrap)
        .set("group.id", format!("check-{id}"))
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..6 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let (mut records, mut ids, mut ended) = (0i64, std::collections::BTreeSet::new(), 0);
    while ended < 6 {
        match consumer.poll(Duration::from_secs(10)) {
            Some(Ok(m)) => {
                records += 1;
                let p = m.payload().unwrap();
                ids.insert(u32::from_be_bytes([p[1], p[2], p[3], p[4]]));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => ended += 1,
            other => panic!("reading the topic back: {other:?}"),
        }
    }
    let subject = format!("{topic}-value");
    let latest =
        registry.latest_version(&subject).unwrap().expect("txgen registered the subject").0;
    assert!(ids.contains(&latest) && ids.len() == 2, "records carry the subject's ids: {ids:?}");

    let status = Command::new(env!("CARGO_BIN_EXE_fraud-detector"))
        .args(["--topic", &topic, "--dlq-topic", &format!("{topic}-dlq"), "--job", &topic])
        .args(["--bounded", "--idle-timeout-s", "0", "--schema-registry", "--metrics-port", "0"])
        .env("TRIPWIRE_PG_SCHEMA", &topic)
        .env("RUST_LOG", "error")
        .status()
        .unwrap();
    assert!(status.success());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let read = |schema: &str| -> (i64, i64, i64) {
        let mut e = endpoints.clone();
        e.pg_schema = Some(schema.to_string());
        rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&e.postgres_config(), NoTls).await.unwrap();
            tokio::spawn(conn);
            let one = |sql: &'static str| {
                let c = &c;
                async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
            };
            (
                one("SELECT count(*) FROM raw_transactions").await,
                one("SELECT count(*) FROM late_events WHERE reason = 'late'").await,
                one("SELECT count(*) FROM late_events WHERE reason <> 'late'").await,
            )
        })
    };
    let (archived, late, other) = read(&topic);
    println!("{records} records: {archived} archived, {late} late");
    assert!(archived > 2_900, "most records are accepted: {archived}");
    assert_eq!(other, 0);
    assert_eq!(archived + late, records, "every record read, none rejected for its schema");

    // The control: without the registry the job has only the manifest's ids
    // (v1 = 1, v2 = 2, alert = 3). Unless the registry happened to assign the
    // same ones, records must then go to the dead letters instead.
    if ids != [1, 2].into_iter().collect() {
        let control = format!("{topic}_control");
        let status = Command::new(env!("CARGO_BIN_EXE_fraud-detector"))
            .args(["--topic", &topic, "--dlq-topic", &format!("{topic}-dlq"), "--job", &control])
            .args(["--bounded", "--idle-timeout-s", "0", "--metrics-port", "0"])
            .env("TRIPWIRE_PG_SCHEMA", &control)
            .env("RUST_LOG", "error")
            .status()
            .unwrap();
        assert!(status.success());
        let (archived_without, _, _) = read(&control);
        assert!(
            archived_without < archived,
            "the embedded ids do not read registry-framed records"
        );
    } else {
        println!(
            "the registry assigned the manifest's ids; the control run cannot tell them apart"
        );
    }
}
