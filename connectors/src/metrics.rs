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
