//! The Kafka Streams peer (`bench/peers/kafka-streams/`) and a Redis reader,
//! for the throughput benchmark.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tripwire_connectors::avro::{Limits, TransactionCodec};
use tripwire_connectors::redis_sink::Keys;
use tripwire_connectors::registry::EmbeddedRegistry;
use tripwire_dataflow::reference::Reference;
use tripwire_dataflow::{FraudConfig, Metric, StatKey, Transaction};
use tripwire_jobs::generator::{Expect, Planned};

fn peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/peers/kafka-streams")
}

/// The peer's jar, built with Maven if it is not there yet; `Err` says why not.
pub fn jar() -> Result<PathBuf, String> {
    let dir = peer_dir();
    let jar = dir.join("target/kstreams-peer.jar");
    if jar.exists() {
        return Ok(jar);
    }
    let pom = dir.join("pom.xml");
    let built = Command::new("mvn")
        .args(["-q", "-B", "-f"])
        .arg(&pom)
        .args(["package", "-DskipTests"])
        .status()
        .map_err(|e| format!("mvn: {e}"))?;
    if !built.success() || !jar.exists() {
        return Err(format!("mvn package of {} failed ({built})", pom.display()));
    }
    Ok(jar)
}

/// One `command` (`run`, or `dump` with `--at T` in `extra`) of the peer in
/// `mode` (`dsl` or `processor`) over `input`: its run line as JSON (`eps`
/// excludes JVM and app start-up, see the peer's README) and its stdout.
pub fn run(
    jar: &Path,
    command: &str,
    mode: &str,
    bootstrap: &str,
    input: &str,
    extra: &[&str],
) -> (serde_json::Value, String) {
    let app = crate::support::unique(&format!("kstreams_{mode}"));
    let output = format!("{app}-out");
    let state = std::env::temp_dir().join("kstreams-peer");
    let out = Command::new("java")
        .args(["-Xmx1g", "-jar"])
        .arg(jar)
        .args([command, "--mode", mode, "--bootstrap", bootstrap, "--input", input])
        .args(["--output", &output, "--app-id", &app, "--threads", "2", "--state-dir"])
        .arg(&state)
        .args(extra)
        .output()
        .expect("java runs the peer");
    let _ = std::fs::remove_dir_all(state.join(&app));
    assert!(
        out.status.success(),
        "the peer ({mode}) failed: {}",
        String::from_utf8_lossy(&out.stderr).lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // The run line: on stdout for `run`, on stderr for `dump`.
    let line = stdout
        .lines()
        .chain(stderr.lines())
        .find(|l| l.starts_with('{') && l.contains("\"eps\""))
        .expect("the peer printed its run line");
    let summary: serde_json::Value = serde_json::from_str(line).expect("the run line is JSON");
    // Its output and internal topics are of no further use.
    let internal = topics_starting_with(bootstrap, &app);
    let mut topics: Vec<&str> = internal.iter().map(String::as_str).collect();
    topics.push(&output);
    let _ = tripwire_connectors::kafka_admin::delete_topics(bootstrap, &topics);
    (summary, stdout)
}

/// The peer's `processor` app must compute the reference model's statistics:
/// on `plan` (every record valid, none late or duplicated, already in
/// `topic`), its final store at the last event time against the reference's.
/// Returns how many statistics were compared.
pub fn check_against_reference(
    jar: &Path,
    bootstrap: &str,
    topic: &str,
    plan: &[Planned],
) -> Result<usize, String> {
    assert!(plan.iter().all(|p| matches!(p.expect, Expect::Accept(_))), "a plain input");
    let mut codec =
        TransactionCodec::new(Arc::new(EmbeddedRegistry::new().unwrap()), Limits::default());
    let events: Vec<Transaction> =
        plan.iter().map(|p| codec.decode(&p.payload, None).expect("valid records")).collect();
    let at = events.iter().map(|x| x.event_time_ms).max().expect("events");
    let (_, dump) = run(jar, "dump", "processor", bootstrap, topic, &["--at", &at.to_string()]);
    let mut got = BTreeMap::new();
    for line in dump.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let n = |k: &str| v[k].as_i64().ok_or(format!("{k} in {line}"));
        let (card_id, window_ms) = (n("card")? as u64, n("window")? as u64);
        for (metric, k) in [
            (Metric::Count, "count"),
            (Metric::Sum, "sum"),
            (Metric::MaxAmount, "max"),
            (Metric::DistinctMerchants, "merchants"),
            (Metric::DistinctCountries, "countries"),
        ] {
            got.insert(StatKey { card_id, window_ms, metric }, n(k)?);
        }
    }
    let fraud = FraudConfig::default();
    let mut by_card: BTreeMap<u64, Vec<Transaction>> = BTreeMap::new();
    for x in events {
        by_card.entry(x.card_id).or_default().push(x);
    }
    let mut want = BTreeMap::new();
    for events in by_card.values() {
        want.extend(Reference::new(&fraud, events).stats_at(at as tripwire_dataflow::Time));
    }
    if got != want {
        let wrong = want.iter().filter(|(k, v)| got.get(k) != Some(v)).count();
        let extra = got.keys().filter(|k| !want.contains_key(k)).count();
        let first = want.iter().find(|(k, v)| got.get(k) != Some(v));
        return Err(format!(
            "{wrong} of {} statistics differ, {extra} extra; first: {first:?} got {:?}",
            want.len(),
            first.and_then(|(k, _)| got.get(k))
        ));
    }
    Ok(want.len())
}

/// A client of the read model: reads one random card's hash after another
/// (as an authorisation service does) until stopped, timing each read.
pub struct Reader {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<f64>>,
}

impl Reader {
    /// Start reading `job`'s cards `0..cards`, about `per_s` reads a second.
    pub fn start(job: &str, cards: u64, per_s: u32) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let keys = Keys::new(job);
        let url = crate::support::endpoints().redis_url();
        let stopped = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut ms = Vec::new();
            let mut hashes = false;
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let pace = Duration::from_secs(1) / per_s;
            while !stopped.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let started = Instant::now();
                let key = keys.card(x % cards);
                if hashes {
                    let _: Vec<(String, String)> =
                        redis::cmd("HGETALL").arg(&key).query(&mut con).unwrap();
                } else if let Err(e) = redis::cmd("GET").arg(&key).query::<Option<String>>(&mut con)
                {
                    // A build from before cards were strings (an A/B run
                    // against a baseline) keeps a hash per card.
                    assert_eq!(e.code(), Some("WRONGTYPE"), "reading {key}: {e}");
                    hashes = true;
                }
                ms.push(started.elapsed().as_secs_f64() * 1e3);
                // A steady rate of reads, not a busy loop stealing a core from the job.
                std::thread::sleep(pace.saturating_sub(started.elapsed()));
            }
            ms
        });
        Reader { stop, handle }
    }

    /// Stop; the read latencies in ms, sorted.
    pub fn finish(self) -> Vec<f64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut ms = self.handle.join().unwrap();
        ms.sort_by(f64::total_cmp);
        ms
    }
}

/// The topics whose names start with `prefix`.
fn topics_starting_with(bootstrap: &str, prefix: &str) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("a Kafka client");
    let Ok(metadata) = c.fetch_metadata(None, Duration::from_secs(10)) else { return Vec::new() };
    metadata
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|t| t.starts_with(prefix))
        .collect()
}
