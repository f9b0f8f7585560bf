//! txgen on a topic that exists with fewer partitions than its `--partitions`
//! (the default 12): it writes to every partition the topic has and to none
//! it lacks, in both modes, and every record it counts is in the topic.
//!
//! Needs the stack up on this machine (`./tripwire test` brings it up).

mod common;

use std::process::Command;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tripwire_connectors::endpoints::Endpoints;
use tripwire_connectors::kafka_admin::ensure_topic;

use common::now_ms;

/// Records in each partition of `topic` (its high watermarks; nothing is compacted or deleted).
fn records(bootstrap: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    (0..partitions)
        .map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1)
        .collect()
}

/// What txgen says it sent: `txgen: N records to ...`.
fn sent(stdout: &[u8]) -> i64 {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().find(|l| l.contains(" records to ")).expect("txgen's summary");
    line.trim_start_matches("txgen: ").split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn txgen_writes_to_the_partitions_an_existing_topic_has() {
    let endpoints = Endpoints::from_env().unwrap();
    let bootstrap = &endpoints.kafka_bootstrap;
    for (mode, args) in
        [("bulk", &["--events", "3000"][..]), ("rate", &["--rate", "500", "--seconds", "3"])]
    {
        let topic = format!("txgen_{mode}_{}_{}", std::process::id(), now_ms());
        ensure_topic(bootstrap, &topic, 3).expect("topic; is the stack up?");
        let out = Command::new(env!("CARGO_BIN_EXE_txgen"))
            .args(["--topic", &topic, "--cards", "300"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("has 3 partitions, not 12"), "{mode}: txgen says so:\n{stderr}");
        let per_partition = records(bootstrap, &topic, 3);
        assert!(
            per_partition.iter().all(|n| *n > 0),
            "{mode}: every partition written: {per_partition:?}"
        );
        assert_eq!(
            per_partition.iter().sum::<i64>(),
            sent(&out.stdout),
            "{mode}: every record counted is in the topic"
        );
    }
}
