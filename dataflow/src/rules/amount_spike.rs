//! Amount spike: a transaction far above the card's average over the window.

use differential_dataflow::VecCollection;

use crate::config::AmountSpikeConfig;
use crate::event::{Diff, Time, Transaction};
use crate::output::{alert_id, Alert, Details, Rule};
use crate::rules::Probe;
use crate::stats::CountSum;

/// Extension trait: the amount-spike rule.
pub trait AmountSpike<'s> {
    /// Alerts for events whose amount exceeds `factor_percent / 100` times the
    /// average of the card's other transactions in the window, once the window
    /// holds at least `min_history` of them; `count_sum` must cover the window.
    fn amount_spike(
        self,
        probe: &Probe<'s>,
        count_sum: &CountSum<'s>,
        config: &AmountSpikeConfig,
    ) -> VecCollection<'s, Time, Alert, Diff>;
}

impl<'s> AmountSpike<'s> for VecCollection<'s, Time, Transaction, Diff> {
    fn amount_spike(
        self,
        probe: &Probe<'s>,
        count_sum: &CountSum<'s>,
        config: &AmountSpikeConfig,
    ) -> VecCollection<'s, Time, Alert, Diff> {
        let c = config.clone();
        let window = c.window_ms;
        count_sum
            .clone()
            .filter(move |((_, w), _)| *w == window)
            .map(|((card, _), count_sum)| (card, count_sum))
            .join_core(probe.clone(), move |_card, &(n, s), x: &Transaction| {
                // The window at τ holds the trigger itself; the history is the rest.
                let history_count = (n - 1) as u64;
                let history_sum = s - x.amount_minor;
                let spike = history_count >= c.min_history
                    && x.amount_minor as i128 * history_count as i128 * 100
                        > c.factor_percent as i128 * history_sum as i128;
                spike.then(|| Alert {
                    id: alert_id(Rule::AmountSpike, x.event_id, 0),
                    card_id: x.card_id,
                    rule: Rule::AmountSpike,
                    trigger_event: x.event_id,
                    event_time_ms: x.event_time_ms,
                    details: Details::AmountSpike {
                        amount: x.amount_minor,
                        history_count,
                        history_sum,
                    },
                })
            })
    }
}
