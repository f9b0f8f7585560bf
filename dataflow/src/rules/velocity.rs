//! Velocity: more than N transactions of one card within a window.

use differential_dataflow::VecCollection;

use crate::card_windows::Judged;
use crate::config::VelocityConfig;
use crate::event::{Diff, Time};
use crate::output::{Alert, Details, Rule};
use crate::rules::alert;

/// Extension trait: the velocity rule.
pub trait Velocity<'s> {
    /// Alerts for events whose card has more than `limit` transactions in a
    /// window of `config.limits`, one alert per window exceeded.
    fn velocity(self, config: &VelocityConfig) -> VecCollection<'s, Time, Alert, Diff>;
}

impl<'s> Velocity<'s> for VecCollection<'s, Time, Judged, Diff> {
    fn velocity(self, config: &VelocityConfig) -> VecCollection<'s, Time, Alert, Diff> {
        let limits = config.limits.clone();
        self.flat_map(move |j| {
            limits
                .iter()
                .filter_map(|&(window_ms, limit)| {
                    let count = j.window(window_ms)?.count;
                    (count > limit).then(|| {
                        alert(
                            &j,
                            Rule::Velocity,
                            window_ms,
                            Details::Velocity { window_ms, count, limit },
                        )
                    })
                })
                .collect::<Vec<_>>()
        })
    }
}
