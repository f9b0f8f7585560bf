//! Kafka client helpers: creating topics on purpose (the broker's automatic
//! creation is off, see the README), waiting out a broker that is starting,
//! producing through a full queue, and the context of consumers that read to
//! a partition's end.

use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
    TopicResult,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};

/// Whether `error` is the end of a partition: a consumer with
/// `enable.partition.eof` asked for it, and librdkafka reports it as a
/// global error too.
pub fn is_partition_eof(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
    )
}

/// The context of a consumer that reads to the end of its partitions: the
/// ends are expected, not errors (librdkafka's default context logged each
/// at ERROR, in every bounded run and every job start that reads a
/// dead-letter topic's tail).
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadsToEnd;

impl ClientContext for ReadsToEnd {
    fn error(&self, error: KafkaError, reason: &str) {
        if is_partition_eof(&error) {
            tracing::debug!(%reason, "end of partition");
        } else {
            tracing::error!(error = %error, %reason, "kafka client error");
        }
    }
}

impl ConsumerContext for ReadsToEnd {}

/// An admin client, and a runtime to wait for its operations on.
fn admin(
    bootstrap: &str,
) -> Result<(AdminClient<DefaultClientContext>, tokio::runtime::Runtime), KafkaError> {
    let admin = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    Ok((admin, rt))
}

/// Create `topic` with `partitions` partitions unless it exists (then leave it as it is).
pub fn ensure_topic(bootstrap: &str, topic: &str, partitions: i32) -> Result<(), KafkaError> {
    ensure_topic_with(bootstrap, topic, partitions, &[])
}

/// [`ensure_topic`] with topic settings (`config`) for a topic it creates.
pub fn ensure_topic_with(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    config: &[(&str, &str)],
) -> Result<(), KafkaError> {
    let (admin, rt) = admin(bootstrap)?;
    let new = config
        .iter()
        .fold(NewTopic::new(topic, partitions, TopicReplication::Fixed(1)), |t, (k, v)| {
            t.set(k, v)
        });
    while_starting(|| {
        let results = rt.block_on(admin.create_topics(
            std::slice::from_ref(&new),
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))?;
        all_done(results, RDKafkaErrorCode::TopicAlreadyExists)
    })
}

/// `Ok` if every topic operation succeeded or failed only with `fine`.
fn all_done(results: Vec<TopicResult>, fine: RDKafkaErrorCode) -> Result<(), KafkaError> {
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, code)) if code == fine => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// Delete `topics`; one that does not exist is no error.
pub fn delete_topics(bootstrap: &str, topics: &[&str]) -> Result<(), KafkaError> {
    if topics.is_empty() {
        return Ok(());
    }
    let (admin, rt) = admin(bootstrap)?;
    let results = rt.block_on(admin.delete_topics(
        topics,
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
    ))?;
    all_done(results, RDKafkaErrorCode::UnknownTopicOrPartition)
}

/// How many partitions `topic` has; `None` if it does not exist.
pub fn partition_count(bootstrap: &str, topic: &str) -> Result<Option<usize>, KafkaError> {
    let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let metadata = while_starting(|| client.fetch_metadata(Some(topic), Duration::from_secs(10)))?;
    Ok(metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0))
}

/// The largest record batch `topic` takes (its `max.message.bytes`), if the
/// topic exists.
pub fn max_message_bytes(bootstrap: &str, topic: &str) -> Result<Option<usize>, KafkaError> {
    let (admin, rt) = admin(bootstrap)?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = while_starting(|| {
        rt.block_on(admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &opts))
    })?;
    match results.into_iter().next() {
        Some(Ok(config)) => Ok(config
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse().ok())),
        Some(Err(RDKafkaErrorCode::UnknownTopicOrPartition)) | None => Ok(None),
        Some(Err(code)) => Err(KafkaError::AdminOp(code)),
    }
}

/// Set `config` on `topic`; settings it does not name go back to their defaults.
pub fn alter_topic(
    bootstrap: &str,
    topic: &str,
    config: &[(&str, &str)],
) -> Result<(), KafkaError> {
    let (admin, rt) = admin(bootstrap)?;
    let alter = config
        .iter()
        .fold(AlterConfig::new(ResourceSpecifier::Topic(topic)), |a, (k, v)| a.set(k, v));
    let results = rt.block_on(admin.alter_configs(
        std::slice::from_ref(&alter),
        &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
    ))?;
    for r in results {
        r.map_err(|(_, code)| KafkaError::AdminOp(code))?;
    }
    Ok(())
}

/// Run `f` again (for up to a minute) while it fails as a broker does in
/// its first seconds up or while it is away: no leader yet, not reachable.
/// A job started beside a restarting broker waits for it, as Kafka clients
/// do, instead of exiting.
pub fn while_starting<T>(mut f: impl FnMut() -> Result<T, KafkaError>) -> Result<T, KafkaError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match f() {
            Err(e) if std::time::Instant::now() < deadline && starting(&e) => {
                tracing::warn!(error = %e, "Kafka not ready; trying again");
                std::thread::sleep(Duration::from_millis(500));
            }
            done => return done,
        }
    }
}

/// Whether `e` is what a client sees while the broker starts or is away.
pub fn starting(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    let code = match e {
        KafkaError::AdminOp(code) => Some(*code),
        e => e.rdkafka_error_code(),
    };
    matches!(
        code,
        Some(
            NotLeaderForPartition
                | LeaderNotAvailable
                | AllBrokersDown
                | BrokerTransportFailure
                | BrokerNotAvailable
                | RequestTimedOut
                | OperationTimedOut
                | NotCoordinator
                | CoordinatorLoadInProgress
                | CoordinatorNotAvailable
        )
    )
}

/// Send `record`, waiting while the producer's queue is full: the queue
/// drains on rdkafka's own thread, so a flood slows the caller down rather
/// than losing records. Any other error is the caller's.
pub fn send_waiting<K: ToBytes + ?Sized, P: ToBytes + ?Sized, C: ProducerContext + 'static>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, K, P, C::DeliveryOpaque>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}
