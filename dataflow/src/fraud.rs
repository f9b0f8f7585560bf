//! The whole fraud computation: accepted events in, window statistics and alerts out.

use differential_dataflow::VecCollection;

use std::cell::Cell;
use std::rc::Rc;

use crate::card_windows::{card_windows, CardWindows, StateSize};
use crate::coalesce::Coalesce;
use crate::config::FraudConfig;
use crate::event::{Diff, InputEnd, Time, Transaction};
use crate::output::{Alert, CardChange};
use crate::rules::{Judge, Rules};

/// The two outputs of the fraud computation.
pub struct FraudOutputs<'s> {
    /// `(card_id, CardChange)`: the changelog of every card's statistics (see [`CardChange`]).
    pub stats: VecCollection<'s, Time, (u64, CardChange), Diff>,
    /// Alerts; a monotone collection, each alert at its trigger's time.
    pub alerts: VecCollection<'s, Time, Alert, Diff>,
    /// What this worker's window state holds, for metrics and tests.
    pub state: Rc<Cell<StateSize>>,
    /// Coalescing of `stats` while results are caught up on: the commit
    /// operator that reads `stats` enables it (see [`crate::coalesce`]).
    pub coalesce: Rc<Coalesce>,
}

/// Extension trait: run the fraud computation on a collection of accepted events.
pub trait DetectFraud<'s> {
    /// Statistics and alerts of these events. Each event must be present from
    /// time `config.time_of(event_time_ms)` on, and never retracted (the source's job).
    fn detect_fraud(self, config: &FraudConfig) -> FraudOutputs<'s>;

    /// [`DetectFraud::detect_fraud`] for a bounded run, whose input ends at
    /// `end` once that is set: nothing at or after the end is computed (the
    /// windows are not closed at the end of time), so outputs stop there.
    fn detect_fraud_to(self, config: &FraudConfig, end: InputEnd) -> FraudOutputs<'s>;
}

impl<'s> DetectFraud<'s> for VecCollection<'s, Time, Transaction, Diff> {
    fn detect_fraud(self, config: &FraudConfig) -> FraudOutputs<'s> {
        outputs(card_windows(self, config, None), config)
    }

    fn detect_fraud_to(self, config: &FraudConfig, end: InputEnd) -> FraudOutputs<'s> {
        outputs(card_windows(self, config, Some(end)), config)
    }
}

/// The rules over the windows' judged events.
fn outputs<'s>(windows: CardWindows<'s>, config: &FraudConfig) -> FraudOutputs<'s> {
    let alerts = windows.judged.alerts(Rules::new(config));
    FraudOutputs { state: windows.size, stats: windows.stats, alerts, coalesce: windows.coalesce }
}
