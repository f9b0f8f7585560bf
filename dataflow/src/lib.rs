//! The fraud computation of Tripwire as pure timely/differential operators.
//!
//! # Layout
//!
//! - [`event`]: the transaction, the one type shared with the reference model.
//! - [`config`]: windows, tick and rule thresholds with documented defaults.
//! - [`output`]: what comes out: per-card window statistics and alerts.
//! - [`windows`]: the sliding-window operator (retractions queued, emitted at the frontier).
//! - [`stats`]: per-card window aggregates and the statistics output.
//! - [`rules`]: one fraud rule per file, each an extension trait.
//! - [`latch`]: alerts as point events at their trigger's time.
//! - [`fraud`]: the whole computation, [`DetectFraud::detect_fraud`].
//! - [`reference`]: the brute-force reference model, plain loops over the whole
//!   input; the judge of the dataflow in tests. It shares nothing with the
//!   dataflow but the types above.
//!
//! `SEMANTICS.md` beside this crate is the contract both implement.
//!
//! This crate does no I/O: it depends on timely and differential only, so that
//! the computation can be judged in-process against its reference model.

pub mod config;
pub mod event;
pub mod fraud;
pub mod latch;
pub mod output;
pub mod reference;
pub mod rules;
pub mod stats;
pub mod windows;

pub use config::FraudConfig;
pub use event::{Channel, Diff, Time, Transaction};
pub use fraud::{DetectFraud, FraudOutputs};
pub use output::{alert_id, Alert, Details, Metric, Rule, StatKey};
