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
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use tripwire_connectors::confluent_registry::ConfluentRegistry;
use tripwire_connectors::kafka_admin::{ensure_topic, partition_count, send_waiting};
use tripwire_connectors::registry::{EmbeddedRegistry, SchemaRegistry};
use tripwire_connectors::Endpoints;
use tripwire_jobs::generator::{Expect, GenConfig, Generator, Planned, SchemaIds};
use tripwire_jobs::wire_producer::WireProducer;

/// Which producer writes the records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ProducerKind {
    Batched,
    Librdkafka,
}

/// Produce generated card transactions (Avro, Confluent wire format) to Kafka.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Topic to write; created with `--partitions` if it does not exist.
    #[arg(long, default_value = "transactions")]
    topic: String,
    /// Partitions of the topic when txgen creates it (a topic that exists
    /// keeps its own, and txgen writes to all of them).
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
    /// The consumer's lateness bound, ms: out-of-order records arrive up to
    /// half of it behind, late records beyond it.
    #[arg(long, default_value_t = 5_000)]
    lateness_ms: i64,
    /// Out-of-order records (within the bound) per 10,000 events.
    #[arg(long, default_value_t = 100)]
    out_of_order_per_10k: u64,
    /// Late records (beyond the bound) per 10,000 events.
    #[arg(long, default_value_t = 20)]
    late_per_10k: u64,
    /// Benign near misses per 10,000 events, for each rule: legitimate
    /// traffic just short of the rule's threshold (false-positive bait).
    #[arg(long, default_value_t = 0)]
    near_miss_per_10k: u64,
    /// Write `event_id,scenario` of every labelled fraud event here.
    #[arg(long)]
    labels: Option<String>,
    /// Producer: compression codec (librdkafka's producer: default snappy;
    /// the batched producer writes uncompressed batches only).
    #[arg(long)]
    compression: Option<String>,
    /// Producer: `batched` (every partition's records for a broker in one
    /// request, as the Java producer sends them) or `librdkafka` (one request
    /// per partition). Default: batched at a fixed rate, librdkafka in bulk
    /// and in transactions.
    #[arg(long, value_enum)]
    producer: Option<ProducerKind>,
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
    // A topic that exists keeps its own partitions: write to all of them, and
    // to none it lacks.
    let partitions = match partition_count(&bootstrap, &args.topic)? {
        Some(n) if n as i32 != args.partitions => {
            eprintln!(
                "txgen: {} has {n} partitions, not {}: writing to its {n}",
                args.topic, args.partitions
            );
            n as i32
        }
        _ => args.partitions,
    };

    let kind =
        args.producer.unwrap_or(if args.rate.is_some() && args.transaction_records.is_none() {
            ProducerKind::Batched
        } else {
            ProducerKind::Librdkafka
        });
    let producer = match kind {
        ProducerKind::Batched => {
            if args.transaction_records.is_some() {
                bail!("--transaction-records needs --producer librdkafka");
            }
            if args.compression.as_deref().is_some_and(|c| c != "none") {
                bail!("the batched producer writes uncompressed batches: --compression needs --producer librdkafka");
            }
            let linger = Duration::from_millis(args.linger_ms.into());
            Producing::Batched(WireProducer::new(&bootstrap, &args.topic, linger)?)
        }
        ProducerKind::Librdkafka => {
            let mut cfg = ClientConfig::new();
            cfg.set("bootstrap.servers", &bootstrap)
                // Retries must not duplicate or reorder records within a partition.
                .set("enable.idempotence", "true")
                .set("compression.type", args.compression.as_deref().unwrap_or("snappy"))
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
            Producing::Librdkafka(producer)
        }
    };

    let now = now_ms();
    let config = GenConfig {
        seed: args.seed,
        cards: args.cards,
        partitions,
        // Bulk: event times 1 ms apart, ending an hour before the present so that
        // every scenario (the longest spans 30 min) completes in the past.
        start_ms: now - args.events as i64 - 3_600_000,
        spacing_ms: 1,
        fraud_per_10k: args.fraud_per_10k,
        bad_per_10k: args.bad_per_10k,
        v1_percent: args.v1_percent,
        lateness_ms: args.lateness_ms,
        out_of_order_per_10k: args.out_of_order_per_10k,
        late_per_10k: args.late_per_10k,
        near_miss_per_10k: args.near_miss_per_10k,
        now_ms: now,
        schema_ids,
        ..GenConfig::default()
    };
    let mut out = Output {
        producer,
        topic: args.topic.clone(),
        labels: match &args.labels {
            Some(path) => {
                Some(BufWriter::new(File::create(path).context("creating the labels file")?))
            }
            None => None,
        },
        transaction_records: args.transaction_records,
        in_txn: 0,
        sent: 0,
    };
    let started = Instant::now();
    match args.rate {
        None => {
            let plan = Generator::new(config).generate(args.events);
            let mut last_report = Instant::now();
            for p in &plan {
                out.send(p)?;
                if last_report.elapsed() >= Duration::from_secs(2) {
                    last_report = Instant::now();
                    let rate = out.sent as f64 / started.elapsed().as_secs_f64();
                    eprintln!("txgen: {}/{} records, {rate:.0}/s", out.sent, plan.len());
                }
            }
        }
        Some(rate) => fixed_rate(&mut out, config, rate.max(1), args.seconds)?,
    }
    let sent = out.finish()?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "txgen: {} records to {} in {secs:.1} s, {:.0} records/s",
        sent,
        args.topic,
        sent as f64 / secs
    );
    Ok(())
}

/// The producer txgen writes with (see `--producer`).
enum Producing {
    Batched(WireProducer),
    Librdkafka(ThreadedProducer<DefaultProducerContext>),
}

/// Where records go: the producer, the open transaction, the labels file.
struct Output {
    producer: Producing,
    topic: String,
    labels: Option<BufWriter<File>>,
    transaction_records: Option<usize>,
    in_txn: usize,
    sent: u64,
}

impl Output {
    fn send(&mut self, p: &Planned) -> Result<()> {
        match &self.producer {
            Producing::Batched(wire) => wire.send(p.partition, p.key.as_bytes(), &p.payload)?,
            Producing::Librdkafka(producer) => {
                if let Some(size) = self.transaction_records {
                    if self.in_txn == 0 {
                        producer.begin_transaction()?;
                    }
                    self.in_txn += 1;
                    if self.in_txn == size {
                        producer.commit_transaction(Duration::from_secs(30))?;
                        self.in_txn = 0;
                    }
                }
                let record = BaseRecord::to(&self.topic)
                    .partition(p.partition)
                    .key(&p.key)
                    .payload(&p.payload);
                send_waiting(producer, record).context("producing")?;
            }
        }
        if let (Some(w), Some(s), Expect::Accept(id)) = (self.labels.as_mut(), p.label, &p.expect) {
            writeln!(w, "{id},{}", s.rule_name())?;
        }
        self.sent += 1;
        Ok(())
    }

    /// Flush what is queued; the records sent.
    fn finish(mut self) -> Result<u64> {
        match self.producer {
            Producing::Batched(wire) => wire.flush()?,
            Producing::Librdkafka(producer) => {
                if self.in_txn > 0 {
                    producer.commit_transaction(Duration::from_secs(30))?;
                }
                producer.flush(Duration::from_secs(120))?;
            }
        }
        if let Some(w) = self.labels.as_mut() {
            w.flush()?;
        }
        Ok(self.sent)
    }
}

/// Fixed-rate mode: `rate` events/s for `seconds`, each record sent when the
/// wall clock reaches its slot, so that event time follows the wall clock.
/// A planner thread makes the traffic a tenth of a second at a time, ahead of
/// the sender.
fn fixed_rate(out: &mut Output, mut config: GenConfig, rate: u64, seconds: u64) -> Result<()> {
    const SLICE_MS: i64 = 100;
    let per_slice = (rate * SLICE_MS as u64 / 1000).max(1);
    let slices = seconds * 1000 / SLICE_MS as u64;
    // Event time starts a moment ahead, while the first slices are planned.
    let start_ms = now_ms() + 300;
    config.start_ms = start_ms;
    config.now_ms = start_ms;
    config.rate_per_s = Some(per_slice * 1000 / SLICE_MS as u64);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Planned>>(4);
    let planner = std::thread::spawn(move || {
        let mut generator = Generator::new(config);
        for _ in 0..slices {
            if tx.send(generator.generate_more(per_slice)).is_err() {
                return;
            }
        }
    });
    let mut last_report = Instant::now();
    for (k, slice) in rx.iter().enumerate() {
        let slice_start = start_ms + k as i64 * SLICE_MS;
        for (i, p) in slice.iter().enumerate() {
            let due = slice_start as f64 + i as f64 * SLICE_MS as f64 / slice.len() as f64;
            let wait = due - now_us() as f64 / 1000.0;
            if wait > 0.0 {
                // At least a millisecond: what falls due meanwhile goes out
                // together on waking (a record is never sent before its
                // time, at most a millisecond after), instead of one sleep
                // and one producer wake-up per record, which cost more CPU
                // than the job at 10K events/s.
                std::thread::sleep(Duration::from_secs_f64(wait.max(1.0) / 1000.0));
            }
            out.send(p)?;
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            let behind = now_ms() - (slice_start + SLICE_MS);
            eprintln!("txgen: {} records, {behind} ms behind the schedule", out.sent);
        }
    }
    planner.join().map_err(|_| anyhow::anyhow!("the planner thread panicked"))?;
    Ok(())
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
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
