//! Velocity: more than N transactions of one card within a window.

use crate::card_windows::Judged;
use crate::config::VelocityConfig;
use crate::output::{Alert, Details, Rule};
use crate::rules::alert;

/// Alerts for an event whose card has more than `limit` transactions in a
/// window of `config.limits`, one alert per window exceeded.
pub fn check(config: &VelocityConfig, j: &Judged, out: &mut Vec<Alert>) {
    for &(window_ms, limit) in &config.limits {
        let Some(w) = j.window(window_ms) else { continue };
        let count = w.count;
        if count > limit {
            let details = Details::Velocity { window_ms, count, limit };
            out.push(alert(j, Rule::Velocity, window_ms, details));
        }
    }
}
