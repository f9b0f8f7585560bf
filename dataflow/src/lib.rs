//! The fraud computation of Tripwire as pure timely/differential operators.
//!
//! # Layout
//!
//! - [`event`]: the transaction, the one type shared with the reference model.
//! - [`config`]: windows, tick and rule thresholds with documented defaults.
//! - [`output`]: what comes out: per-card window statistics and alerts.
//! - [`card_state`]: one card's incremental window aggregates and recent positions.
//! - [`card_windows`]: the keyed operator applying arrivals and departures per
//!   closed time; emits statistics changes and each event judged against its
//!   card's state at its time.
//! - [`coalesce`]: while results are caught up on, each card's changes
//!   within an epoch leave the window operator as one; what it and the commit
//!   operator agree on so that every batch stays exact.
//! - [`fxhash`]: the fast hasher of the operator's maps.
//! - [`rules`]: one fraud rule per file, each a pure function of a judged
//!   event; all of them applied in one operator.
//! - [`fraud`]: the whole computation, [`DetectFraud::detect_fraud`].
//! - [`reference`]: the brute-force reference model, plain loops over the whole
//!   input; the judge of the dataflow in tests. It shares nothing with the
//!   dataflow but the types above.
//!
//! `SEMANTICS.md` beside this crate is the contract both implement.
//!
//! This crate does no I/O: it depends on timely and differential only, so that
//! the computation can be judged in-process against its reference model.

pub mod card_state;
pub mod card_windows;
pub mod coalesce;
pub mod config;
pub mod event;
pub mod fraud;
pub mod fxhash;
pub mod open_map;
pub mod output;
pub mod prefetch;
pub mod reference;
pub mod rules;

pub use coalesce::Coalesce;
pub use config::FraudConfig;
pub use event::{Channel, Diff, InputEnd, Time, Transaction};
pub use fraud::{DetectFraud, FraudOutputs};
pub use output::{
    alert_id, Alert, CardChange, CardStats, Details, Metric, Rule, StatKey, WindowStats,
    MAX_STAT_WINDOWS,
};

/// A seeded xorshift for tests' random inputs (this crate's and the
/// connectors'): each call gives the next value modulo `n`.
#[doc(hidden)]
pub fn seeded(mut x: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    }
}
