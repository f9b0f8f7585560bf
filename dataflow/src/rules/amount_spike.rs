//! Amount spike: a transaction far above the card's average over the window.

use differential_dataflow::VecCollection;

use crate::card_windows::Judged;
use crate::config::AmountSpikeConfig;
use crate::event::{Diff, Time};
use crate::output::{Alert, Details, Rule};
use crate::rules::alert;

/// Extension trait: the amount-spike rule.
pub trait AmountSpike<'s> {
    /// Alerts for events whose amount exceeds `factor_percent / 100` times the
    /// average of the card's other transactions in the window, once the window
    /// holds at least `min_history` of them. Exact, in integers.
    fn amount_spike(self, config: &AmountSpikeConfig) -> VecCollection<'s, Time, Alert, Diff>;
}

impl<'s> AmountSpike<'s> for VecCollection<'s, Time, Judged, Diff> {
    fn amount_spike(self, config: &AmountSpikeConfig) -> VecCollection<'s, Time, Alert, Diff> {
        let c = config.clone();
        self.flat_map(move |j| {
            let w = j.window(c.window_ms)?;
            // The window at the event's time holds the event itself; the history is the rest.
            let amount = j.event.amount_minor;
            let history_count = w.count - 1;
            let history_sum = w.sum - amount;
            let spike = history_count >= c.min_history
                && amount as i128 * history_count as i128 * 100
                    > c.factor_percent as i128 * history_sum as i128;
            spike.then(|| {
                alert(
                    &j,
                    Rule::AmountSpike,
                    0,
                    Details::AmountSpike { amount, history_count, history_sum },
                )
            })
        })
    }
}
