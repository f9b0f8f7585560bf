//! Amount spike: a transaction far above the card's average over the window.

use crate::card_windows::Judged;
use crate::config::AmountSpikeConfig;
use crate::output::{Alert, Details, Rule};
use crate::rules::alert;

/// An alert for an event whose amount exceeds `factor_percent / 100` times the
/// average of the card's other transactions in the window, once the window
/// holds at least `min_history` of them. Exact, in integers.
pub fn check(c: &AmountSpikeConfig, j: &Judged, out: &mut Vec<Alert>) {
    let Some(w) = j.window(c.window_ms) else { return };
    // The window at the event's time holds the event itself; the history is the rest.
    let amount = j.event.amount_minor;
    let history_count = w.count - 1;
    let history_sum = w.sum - amount;
    let spike = history_count >= c.min_history
        && amount as i128 * history_count as i128 * 100
            > c.factor_percent as i128 * history_sum as i128;
    if spike {
        let details = Details::AmountSpike { amount, history_count, history_sum };
        out.push(alert(j, Rule::AmountSpike, 0, details));
    }
}
