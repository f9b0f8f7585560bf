//! Country hopping: transactions in many countries within a short window.

use crate::card_windows::Judged;
use crate::config::CountryHoppingConfig;
use crate::output::{Alert, Details, Rule};
use crate::rules::alert;

/// An alert for an event whose card has seen at least `min_countries` distinct
/// countries in the window, the event's own included.
pub fn check(c: &CountryHoppingConfig, j: &Judged, out: &mut Vec<Alert>) {
    let Some(w) = j.window(c.window_ms) else { return };
    let countries = w.distinct_countries;
    if countries >= c.min_countries {
        out.push(alert(j, Rule::CountryHopping, 0, Details::CountryHopping { countries }));
    }
}
