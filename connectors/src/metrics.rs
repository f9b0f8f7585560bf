//! Prometheus metrics the connectors keep, registered once in the default registry.

use std::sync::OnceLock;

use prometheus::{
    exponential_buckets, register_histogram_vec, register_int_counter_vec, register_int_gauge_vec,
    HistogramVec, IntCounterVec, IntGaugeVec,
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

/// Serve `/metrics` (Prometheus text format), `/health` (the process is up) and
/// `/ready` (`ready()` says so) on `address`, from a thread of its own.
pub fn serve(
    address: &str,
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
                "/metrics" => {
                    let mut buf = Vec::new();
                    let encoder = prometheus::TextEncoder::new();
                    let _ = prometheus::Encoder::encode(&encoder, &prometheus::gather(), &mut buf);
                    ("200 OK", "text/plain; version=0.0.4", buf)
                }
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
