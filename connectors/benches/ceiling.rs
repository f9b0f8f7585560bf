//! The physical limit later benchmarks are compared against: one topic read
//! three ways, from offset 0 to its end.
//!
//! ```text
//! ./tripwire stack up
//! cargo run --release -p tripwire-jobs --bin txgen -- --topic bench_tx --events 1000000
//! cargo bench -p tripwire-connectors --bench ceiling -- bench_tx
//! ```
//!
//! (a) consume only (rdkafka, one thread, all partitions), (b) consume and
//! decode (the codec, validated), (c) the Kafka source operator on 1 and 2
//! timely workers (decode, validate, watermarks), counting accepted events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use timely::dataflow::operators::core::Inspect;
use tripwire_connectors::ceiling::read_topic;
use tripwire_connectors::kafka_source::{kafka_source, SourceConfig};
use tripwire_connectors::registry::EmbeddedRegistry;
use tripwire_connectors::Endpoints;
use tripwire_dataflow::FraudConfig;

fn main() {
    let topic = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_else(|| "bench_tx".into());
    let bootstrap = Endpoints::from_env().expect("endpoints").kafka_bootstrap;
    println!("topic {topic} at {bootstrap}, read from offset 0 to its end\n");
    println!("| reader | records | seconds | records/s |");
    println!("|---|---|---|---|");
    let (n, s) = read_topic(&bootstrap, &topic, false);
    println!("| consume only | {n} | {s:.2} | {:.0} |", n as f64 / s);
    let consume_eps = n as f64 / s;
    let (n, s) = read_topic(&bootstrap, &topic, true);
    println!("| consume + decode | {n} | {s:.2} | {:.0} |", n as f64 / s);
    let decode_eps = n as f64 / s;
    let mut source_eps = 0.0;
    for workers in [1, 2] {
        let (n, s) = source(&bootstrap, &topic, workers);
        println!("| source operator, {workers} worker(s) | {n} | {s:.2} | {:.0} |", n as f64 / s);
        source_eps = n as f64 / s;
    }
    println!(
        "\nconsume_eps={consume_eps:.0}\ndecode_eps={decode_eps:.0}\nsource_eps={source_eps:.0}"
    );
}

fn source(bootstrap: &str, topic: &str, workers: usize) -> (u64, f64) {
    let count = Arc::new(AtomicU64::new(0));
    let config = SourceConfig {
        bounded: true,
        idle_timeout: None,
        group_id: "tripwire-ceiling-source".into(),
        ..SourceConfig::new(bootstrap, topic)
    };
    let counter = count.clone();
    let start = Instant::now();
    timely::execute(timely::Config::process(workers), move |worker| {
        let registry = Arc::new(EmbeddedRegistry::new().unwrap());
        let counter = counter.clone();
        worker.dataflow::<u64, _, _>(|scope| {
            let s = kafka_source(scope, &config, &FraudConfig::default(), registry).unwrap();
            s.events.inner.inspect_core(move |event| {
                if let Ok((_, batch)) = event {
                    counter.fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
            });
        });
    })
    .expect("timely")
    .join();
    (count.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}
