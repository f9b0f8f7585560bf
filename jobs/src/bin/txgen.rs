//! `txgen`: produce generated card transactions to Kafka as Avro, in bulk or at a fixed rate.
//!
//! ```text
//! txgen --topic transactions --events 1000000                 # bulk, as fast as possible
//! txgen --topic transactions --rate 10000 --seconds 60        # fixed rate, event time = wall clock
//! ```
//!
//! Labels (event id, scenario) of injected fraud go to `--labels FILE` as CSV.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use tripwire_connectors::confluent_registry::ConfluentRegistry;
use tripwire_connectors::kafka_admin::ensure_topic;
use tripwire_connectors::registry::{EmbeddedRegistry, SchemaRegistry};
use tripwire_connectors::Endpoints;
use tripwire_jobs::generator::{Expect, GenConfig, Generator, SchemaIds};

/// Produce generated card transactions (Avro, Confluent wire format) to Kafka.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Topic to write; created with `--partitions` if it does not exist.
    #[arg(long, default_value = "transactions")]
    topic: String,
    /// Partitions of the topic when txgen creates it.
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// Bulk mode: this many benign events, as fast as the broker takes them.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Fixed-rate mode: events per second, event time = wall clock (with --seconds).
    #[arg(long)]
    rate: Option<u64>,
    /// Fixed-rate mode: for how long.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seed; equal seeds give equal traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Distinct cards.
    #[arg(long, default_value_t = 100_000)]
    cards: u64,
    /// Fraud scenarios per 10,000 events, for each scenario type.
    #[arg(long, default_value_t = 2)]
    fraud_per_10k: u64,
    /// Bad records per 10,000 events, for each bad-input class.
    #[arg(long, default_value_t = 0)]
    bad_per_10k: u64,
    /// Share of records written with schema v1, per cent.
    #[arg(long, default_value_t = 30)]
    v1_percent: u64,
    /// Write `event_id,scenario` of every labelled fraud event here.
    #[arg(long)]
    labels: Option<String>,
    /// Producer: compression codec.
    #[arg(long, default_value = "snappy")]
    compression: String,
    /// Producer: batch size in bytes.
    #[arg(long, default_value_t = 32 * 1024)]
    batch_bytes: u32,
    /// Producer: linger in ms.
    #[arg(long, default_value_t = 10)]
    linger_ms: u32,
    /// Produce in Kafka transactions of this many records (transactional mode).
    #[arg(long)]
    transaction_records: Option<usize>,
    /// Register the schemas with the schema registry at `TRIPWIRE_REGISTRY_URL`
    /// (subject `{topic}-value`, BACKWARD compatibility) and frame records with
    /// the ids it assigns, instead of the embedded manifest's.
    #[arg(long)]
    schema_registry: bool,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let endpoints = Endpoints::from_env()?;
    let bootstrap = endpoints.kafka_bootstrap.clone();
    let schema_ids = if args.schema_registry {
        register_schemas(&endpoints.registry_url, &args.topic)?
    } else {
        SchemaIds::EMBEDDED
    };
    ensure_topic(&bootstrap, &args.topic, args.partitions)?;

    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &bootstrap)
        // Retries must not duplicate or reorder records within a partition.
        .set("enable.idempotence", "true")
        .set("compression.type", &args.compression)
        .set("batch.size", args.batch_bytes.to_string())
        .set("linger.ms", args.linger_ms.to_string())
        // Bulk loads queue far more than the default 100K messages in flight.
        .set("queue.buffering.max.messages", "1000000");
    if args.transaction_records.is_some() {
        cfg.set("transactional.id", format!("txgen-{}-{}", args.topic, args.seed));
    }
    let producer: ThreadedProducer<DefaultProducerContext> = cfg.create()?;
    if args.transaction_records.is_some() {
        producer.init_transactions(Duration::from_secs(30))?;
    }

    let now = now_ms();
    let (events, spacing_ms, start_ms) = match args.rate {
        Some(rate) => (rate * args.seconds, (1000 / rate.max(1)).max(1) as i64, now),
        // Bulk: event times 1 ms apart, ending an hour before the present so that
        // every scenario (the longest spans 30 min) completes in the past.
        None => (args.events, 1, now - args.events as i64 - 3_600_000),
    };
    let plan = Generator::new(GenConfig {
        seed: args.seed,
        cards: args.cards,
        partitions: args.partitions,
        start_ms,
        spacing_ms,
        fraud_per_10k: args.fraud_per_10k,
        bad_per_10k: args.bad_per_10k,
        v1_percent: args.v1_percent,
        now_ms: now,
        schema_ids,
        ..GenConfig::default()
    })
    .generate(events);

    let mut labels = match &args.labels {
        Some(path) => Some(BufWriter::new(File::create(path).context("creating the labels file")?)),
        None => None,
    };
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut in_txn = 0usize;
    for (n, p) in plan.iter().enumerate() {
        if let Some(rate) = args.rate {
            // Fixed rate: wait for the record's slot.
            let due = Duration::from_secs_f64(n as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if let Some(size) = args.transaction_records {
            if in_txn == 0 {
                producer.begin_transaction()?;
            }
            in_txn += 1;
            if in_txn == size {
                producer.commit_transaction(Duration::from_secs(30))?;
                in_txn = 0;
            }
        }
        let mut record =
            BaseRecord::to(&args.topic).partition(p.partition).key(&p.key).payload(&p.payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e).context("producing"),
            }
        }
        if let (Some(w), Some(s), Expect::Accept(id)) = (labels.as_mut(), p.label, &p.expect) {
            writeln!(w, "{id},{}", s.rule_name())?;
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            let rate = n as f64 / started.elapsed().as_secs_f64();
            eprintln!("txgen: {n}/{} records, {rate:.0}/s", plan.len());
        }
    }
    if in_txn > 0 {
        producer.commit_transaction(Duration::from_secs(30))?;
    }
    producer.flush(Duration::from_secs(120))?;
    if let Some(mut w) = labels {
        w.flush()?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "txgen: {} records to {} in {secs:.1} s, {:.0} records/s",
        plan.len(),
        args.topic,
        plan.len() as f64 / secs
    );
    Ok(())
}

/// Register transaction v1 and v2 under `{topic}-value` (checking v2 against
/// the subject's BACKWARD rule first) and the alert schema under `alerts-value`.
fn register_schemas(url: &str, topic: &str) -> Result<SchemaIds> {
    let registry = ConfluentRegistry::new(url).retry_for(Duration::from_secs(30));
    let embedded = EmbeddedRegistry::new()?;
    let schema = |id| embedded.schema(id).map(|s| (*s).clone()).context("embedded schema");
    let subject = format!("{topic}-value");
    registry.set_compatibility(Some(&subject), "BACKWARD")?;
    let v1 = registry.register(&subject, &schema(1)?)?;
    if !registry.is_compatible(&subject, &schema(2)?)? {
        bail!("transaction v2 is not BACKWARD compatible with what {subject} holds");
    }
    let v2 = registry.register(&subject, &schema(2)?)?;
    let alert = registry.register("alerts-value", &schema(3)?)?;
    eprintln!("txgen: schemas registered at {url}: {subject} v1 = id {v1}, v2 = id {v2}; alerts-value = id {alert}");
    Ok(SchemaIds { v1, v2, alert })
}
