//! The whole fraud computation: accepted events in, window statistics and alerts out.

use differential_dataflow::VecCollection;

use crate::config::FraudConfig;
use crate::event::{Diff, Time, Transaction};
use crate::latch::Latch;
use crate::output::{Alert, StatKey};
use crate::rules::{probe, AmountSpike, CardTesting, CountryHopping, ImpossibleTravel, Velocity};
use crate::stats::Aggregates;

/// The two outputs of the fraud computation.
pub struct FraudOutputs<'s> {
    /// `(StatKey, value)`: per card, window and metric, the current value.
    pub stats: VecCollection<'s, Time, (StatKey, i64), Diff>,
    /// Alerts; a monotone collection, each alert at its trigger's time.
    pub alerts: VecCollection<'s, Time, Alert, Diff>,
}

/// Extension trait: run the fraud computation on a collection of accepted events.
pub trait DetectFraud<'s> {
    /// Statistics and alerts of these events. Each event must be present from
    /// time `config.time_of(event_time_ms)` on (the source's job).
    fn detect_fraud(self, config: &FraudConfig) -> FraudOutputs<'s>;
}

impl<'s> DetectFraud<'s> for VecCollection<'s, Time, Transaction, Diff> {
    fn detect_fraud(self, config: &FraudConfig) -> FraudOutputs<'s> {
        // One set of sliding windows serves the statistics and the rules that read aggregates.
        let mut windows = config.windows.clone();
        windows.extend(config.velocity.limits.iter().map(|(w, _)| *w));
        windows.push(config.amount_spike.window_ms);
        windows.push(config.country_hopping.window_ms);
        windows.sort_unstable();
        windows.dedup();

        let aggregates = Aggregates::new(self.clone(), &windows);
        let stats = aggregates.statistics(&config.windows);

        let probe = probe(self.clone(), config.tick_ms);
        let alerts = self
            .clone()
            .velocity(&probe, &aggregates.count_sum, &config.velocity)
            .concat(
                self.clone()
                    .amount_spike(&probe, &aggregates.count_sum, &config.amount_spike),
            )
            .concat(self.clone().country_hopping(
                &probe,
                &aggregates.countries,
                &config.country_hopping,
            ))
            .concat(self.clone().card_testing(&probe, &config.card_testing))
            .concat(self.impossible_travel(&config.travel));
        let config = config.clone();
        let alerts = alerts.latch(move |a: &Alert| config.time_of(a.event_time_ms));
        FraudOutputs { stats, alerts }
    }
}
