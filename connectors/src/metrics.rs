//! Prometheus metrics the connectors keep, registered once in the default registry.

use std::sync::OnceLock;

use prometheus::{
    exponential_buckets, register_histogram, register_histogram_vec, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec, Histogram, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec,
};

/// `tripwire_dead_letters_total{reason}`: records sent to the dead-letter topic, by reason.
pub fn dead_letters_total() -> &'static IntCounterVec {
    static C: OnceLock<IntCounterVec> = OnceLock::new();
    C.get_or_init(|| {
        register_int_counter_vec!(
            "tripwire_dead_letters_total",
            "Records that did not enter the dataflow, by reason.",
            &["reason"]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_sink_breaker_state{sink,worker}`: 0 closed, 1 open, 2 half-open.
pub fn sink_breaker_state() -> &'static IntGaugeVec {
    static G: OnceLock<IntGaugeVec> = OnceLock::new();
    G.get_or_init(|| {
        register_int_gauge_vec!(
            "tripwire_sink_breaker_state",
            "Circuit breaker of a sink's committer: 0 closed, 1 open, 2 half-open.",
            &["sink", "worker"]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_commit_seconds{sink}`: how long one commit (batch and checkpoint) took.
pub fn commit_seconds() -> &'static HistogramVec {
    static H: OnceLock<HistogramVec> = OnceLock::new();
    H.get_or_init(|| {
        register_histogram_vec!(
            "tripwire_commit_seconds",
            "Time to write one batch with its checkpoint.",
            &["sink"],
            exponential_buckets(0.000_5, 2.0, 16).expect("buckets")
        )
        .expect("metric registered once")
    })
}

/// `tripwire_committed_rows_total{sink}`: rows written by successful commits.
pub fn committed_rows_total() -> &'static IntCounterVec {
    static C: OnceLock<IntCounterVec> = OnceLock::new();
    C.get_or_init(|| {
        register_int_counter_vec!(
            "tripwire_committed_rows_total",
            "Rows (statistics, deletions, alerts, archived events) written by commits.",
            &["sink"]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_commit_failures_total{sink}`: commits that failed and were retried.
pub fn commit_failures_total() -> &'static IntCounterVec {
    static C: OnceLock<IntCounterVec> = OnceLock::new();
    C.get_or_init(|| {
        register_int_counter_vec!(
            "tripwire_commit_failures_total",
            "Commit attempts that failed (and were retried).",
            &["sink"]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_registry_retries_total`: requests to an unreachable schema registry, retried.
pub fn registry_retries_total() -> &'static prometheus::IntCounter {
    static C: OnceLock<prometheus::IntCounter> = OnceLock::new();
    C.get_or_init(|| {
        prometheus::register_int_counter!(
            "tripwire_registry_retries_total",
            "Requests to the schema registry that found it unreachable and were retried (records wait)."
        )
        .expect("metric registered once")
    })
}

/// `tripwire_dead_letters_lost_total`: rejected records Kafka would not take
/// as dead letters even without their payload; each is also logged
/// as an error with its source partition and offset. Should stay 0.
pub fn dead_letters_lost_total() -> &'static prometheus::IntCounter {
    static C: OnceLock<prometheus::IntCounter> = OnceLock::new();
    C.get_or_init(|| {
        prometheus::register_int_counter!(
            "tripwire_dead_letters_lost_total",
            "Rejected records the dead-letter topic would not take even without their payload (logged with their source offsets)."
        )
        .expect("metric registered once")
    })
}

/// `tripwire_store_rollbacks_total{sink}`: a store found behind what it had acknowledged.
pub fn store_rollbacks_total() -> &'static IntCounterVec {
    static C: OnceLock<IntCounterVec> = OnceLock::new();
    C.get_or_init(|| {
        register_int_counter_vec!(
            "tripwire_store_rollbacks_total",
            "Times a store was found holding less than it had acknowledged.",
            &["sink"]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_duplicates_total`: identical copies of accepted events, counted once and dropped.
pub fn duplicates_total() -> &'static IntCounterVec {
    static C: OnceLock<IntCounterVec> = OnceLock::new();
    C.get_or_init(|| {
        register_int_counter_vec!(
            "tripwire_duplicates_total",
            "Identical resends of an accepted event id (counted once in results, dropped).",
            &[]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_source_paused_partitions{worker}`: partitions the source holds back (backpressure).
pub fn source_paused_partitions() -> &'static IntGaugeVec {
    static G: OnceLock<IntGaugeVec> = OnceLock::new();
    G.get_or_init(|| {
        register_int_gauge_vec!(
            "tripwire_source_paused_partitions",
            "Partitions paused because too much read input is not yet committed.",
            &["worker"]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_source_events_total{partition}`: accepted events the source emitted.
pub fn source_events_total() -> &'static IntCounterVec {
    static C: OnceLock<IntCounterVec> = OnceLock::new();
    C.get_or_init(|| {
        register_int_counter_vec!(
            "tripwire_source_events_total",
            "Accepted events the source read and emitted, by partition.",
            &["partition"]
        )
        .expect("metric registered once")
    })
}

/// Serve `/metrics` (Prometheus text format, every sample labelled `process`), `/health` (the process is up) and
/// `/ready` (`ready()` says so) on `address`, from a thread of its own.
pub fn serve(
    address: &str,
    process: usize,
    ready: impl Fn() -> bool + Send + 'static,
) -> std::io::Result<std::net::SocketAddr> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind(address)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (status, kind, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", encode_with_process(process)),
                "/health" => ("200 OK", "text/plain", b"ok\n".to_vec()),
                "/ready" if ready() => ("200 OK", "text/plain", b"ready\n".to_vec()),
                "/ready" => ("503 Service Unavailable", "text/plain", b"not ready\n".to_vec()),
                _ => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
            };
            let mut s = &stream;
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    })?;
    Ok(bound)
}

/// `tripwire_transactions_total{channel,country}`: accepted transactions.
pub fn transactions_total() -> &'static IntCounterVec {
    static C: OnceLock<IntCounterVec> = OnceLock::new();
    C.get_or_init(|| {
        register_int_counter_vec!(
            "tripwire_transactions_total",
            "Accepted transactions, by channel and merchant country.",
            &["channel", "country"]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_transaction_amount_minor`: amounts of accepted transactions, in minor units.
pub fn transaction_amount() -> &'static Histogram {
    static H: OnceLock<Histogram> = OnceLock::new();
    H.get_or_init(|| {
        register_histogram!(
            "tripwire_transaction_amount_minor",
            "Amounts of accepted transactions, in minor units (cents).",
            exponential_buckets(100.0, 4.0, 10).expect("buckets")
        )
        .expect("metric registered once")
    })
}

/// `tripwire_alerts_total{rule}`: alerts committed to PostgreSQL.
pub fn alerts_total() -> &'static IntCounterVec {
    static C: OnceLock<IntCounterVec> = OnceLock::new();
    C.get_or_init(|| {
        register_int_counter_vec!(
            "tripwire_alerts_total",
            "Alerts committed to PostgreSQL, by rule.",
            &["rule"]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_consumer_lag{partition}`: records behind the partition's end (librdkafka statistics).
pub fn consumer_lag() -> &'static IntGaugeVec {
    static G: OnceLock<IntGaugeVec> = OnceLock::new();
    G.get_or_init(|| {
        register_int_gauge_vec!(
            "tripwire_consumer_lag",
            "Records between the source's position and the partition's end.",
            &["partition"]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_committed_frontier_ms{sink,worker}`: event time below which the sink has committed everything.
pub fn committed_frontier() -> &'static IntGaugeVec {
    static G: OnceLock<IntGaugeVec> = OnceLock::new();
    G.get_or_init(|| {
        register_int_gauge_vec!(
            "tripwire_committed_frontier_ms",
            "Event time (ms) below which the sink worker has committed every result.",
            &["sink", "worker"]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_commit_batch_rows{sink}`: rows per committed batch.
pub fn commit_batch_rows() -> &'static HistogramVec {
    static H: OnceLock<HistogramVec> = OnceLock::new();
    H.get_or_init(|| {
        register_histogram_vec!(
            "tripwire_commit_batch_rows",
            "Rows written by one commit.",
            &["sink"],
            exponential_buckets(1.0, 4.0, 12).expect("buckets")
        )
        .expect("metric registered once")
    })
}

/// `tripwire_end_to_end_latency_seconds`: from a record's produce time to the commit that covers it.
pub fn end_to_end_latency() -> &'static Histogram {
    static H: OnceLock<Histogram> = OnceLock::new();
    H.get_or_init(|| {
        register_histogram!(
            "tripwire_end_to_end_latency_seconds",
            "From a record's Kafka timestamp to the PostgreSQL commit covering its results (sampled).",
            exponential_buckets(0.001, 2.0, 18).expect("buckets")
        )
        .expect("metric registered once")
    })
}

/// `tripwire_state{worker,what}`: the fraud computation's state (cards, entries, due).
pub fn state_size() -> &'static IntGaugeVec {
    static G: OnceLock<IntGaugeVec> = OnceLock::new();
    G.get_or_init(|| {
        register_int_gauge_vec!(
            "tripwire_state",
            "Size of a worker's window state: cards, entries (events held), due (arrivals waiting, departure times).",
            &["worker", "what"]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_coalesced_changes_total{worker}`: statistics changes a worker's
/// window operator folded into a later change of the same card while results
/// were caught up on, and so never emitted (see `tripwire_dataflow::coalesce`).
pub fn coalesced_changes() -> &'static IntCounterVec {
    static C: OnceLock<IntCounterVec> = OnceLock::new();
    C.get_or_init(|| {
        register_int_counter_vec!(
            "tripwire_coalesced_changes_total",
            "Statistics changes folded into a later change of the same card while catching up.",
            &["worker"]
        )
        .expect("metric registered once")
    })
}

/// `tripwire_nice`: the nice of the job's threads now (higher while catching up).
pub fn nice() -> &'static IntGauge {
    static G: OnceLock<IntGauge> = OnceLock::new();
    G.get_or_init(|| {
        register_int_gauge!(
            "tripwire_nice",
            "CPU priority (Linux nice) of the job's threads now: higher while catching up."
        )
        .expect("metric registered once")
    })
}

/// `tripwire_group_restarts`: restarts of this process's group so far (from the supervisor).
pub fn group_restarts() -> &'static IntGauge {
    static G: OnceLock<IntGauge> = OnceLock::new();
    G.get_or_init(|| {
        register_int_gauge!(
            "tripwire_group_restarts",
            "How many times the supervisor has restarted this process's group."
        )
        .expect("metric registered once")
    })
}

/// Everything registered, each sample labelled with `process`.
pub fn encode_with_process(process: usize) -> Vec<u8> {
    let mut families = prometheus::gather();
    for f in &mut families {
        for m in f.mut_metric().iter_mut() {
            let mut label = prometheus::proto::LabelPair::default();
            label.set_name("process".into());
            label.set_value(process.to_string());
            let mut labels = m.take_label();
            labels.push(label);
            m.set_label(labels);
        }
    }
    let mut buf = Vec::new();
    let _ = prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families, &mut buf);
    buf
}
