//! Card testing: many small transactions at distinct merchants within minutes.

use crate::card_windows::Judged;
use crate::config::CardTestingConfig;
use crate::output::{Alert, Details, Rule};
use crate::rules::alert;

/// An alert for a small event whose card's small transactions in the window
/// span at least `min_merchants` distinct merchants.
pub fn check(c: &CardTestingConfig, j: &Judged, out: &mut Vec<Alert>) {
    let merchants = j.small_merchants;
    if j.event.amount_minor < c.small_amount_minor && merchants >= c.min_merchants {
        out.push(alert(j, Rule::CardTesting, 0, Details::CardTesting { merchants }));
    }
}
