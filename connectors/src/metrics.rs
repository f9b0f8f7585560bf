//! Prometheus metrics the connectors keep, registered once in the default registry.

use std::sync::OnceLock;

use prometheus::{register_int_counter_vec, IntCounterVec};

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
