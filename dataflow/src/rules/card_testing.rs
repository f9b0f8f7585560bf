//! Card testing: many small transactions at distinct merchants within minutes.

use differential_dataflow::operators::{CountTotal, ThresholdTotal};
use differential_dataflow::VecCollection;

use crate::config::CardTestingConfig;
use crate::event::{Diff, Time, Transaction};
use crate::output::{alert_id, Alert, Details, Rule};
use crate::rules::Probe;
use crate::windows::Sliding;

/// Extension trait: the card-testing rule.
pub trait CardTesting<'s> {
    /// Alerts for small events whose card's small transactions in the window
    /// span at least `min_merchants` distinct merchants.
    fn card_testing(
        self,
        probe: &Probe<'s>,
        config: &CardTestingConfig,
    ) -> VecCollection<'s, Time, Alert, Diff>;
}

impl<'s> CardTesting<'s> for VecCollection<'s, Time, Transaction, Diff> {
    fn card_testing(
        self,
        probe: &Probe<'s>,
        config: &CardTestingConfig,
    ) -> VecCollection<'s, Time, Alert, Diff> {
        let (small, min) = (config.small_amount_minor, config.min_merchants);
        self.filter(move |x| x.amount_minor < small)
            .map(|x| (x.card_id, x.merchant_id))
            .sliding(&[config.window_ms])
            .map(|(_, card_merchant)| card_merchant)
            .distinct_total_core::<Diff>()
            .map(|(card, _merchant)| card)
            .count_total_core::<Diff>()
            .filter(move |(_, m)| *m as u64 >= min)
            .join_core(probe.clone(), move |_card, &m, x: &Transaction| {
                (x.amount_minor < small).then(|| Alert {
                    id: alert_id(Rule::CardTesting, x.event_id, 0),
                    card_id: x.card_id,
                    rule: Rule::CardTesting,
                    trigger_event: x.event_id,
                    event_time_ms: x.event_time_ms,
                    details: Details::CardTesting {
                        merchants: m as u64,
                    },
                })
            })
    }
}
