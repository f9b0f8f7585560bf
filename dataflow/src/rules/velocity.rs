//! Velocity: more than N transactions of one card within a window.

use differential_dataflow::VecCollection;

use crate::config::VelocityConfig;
use crate::event::{Diff, Time, Transaction};
use crate::output::{alert_id, Alert, Details, Rule};
use crate::rules::Probe;
use crate::stats::CountSum;

/// Extension trait: the velocity rule.
pub trait Velocity<'s> {
    /// Alerts for events whose card has more than `limit` transactions in a
    /// window of `config.limits`; `count_sum` must cover those windows.
    fn velocity(
        self,
        probe: &Probe<'s>,
        count_sum: &CountSum<'s>,
        config: &VelocityConfig,
    ) -> VecCollection<'s, Time, Alert, Diff>;
}

impl<'s> Velocity<'s> for VecCollection<'s, Time, Transaction, Diff> {
    fn velocity(
        self,
        probe: &Probe<'s>,
        count_sum: &CountSum<'s>,
        config: &VelocityConfig,
    ) -> VecCollection<'s, Time, Alert, Diff> {
        let limits = config.limits.clone();
        let windows: Vec<Time> = limits.iter().map(|(w, _)| *w).collect();
        count_sum
            .clone()
            .filter(move |((_, w), _)| windows.contains(w))
            .map(|((card, w), (n, _))| (card, (w, n)))
            .join_core(probe.clone(), move |_card, &(w, n), x: &Transaction| {
                let count = n as u64;
                limits
                    .iter()
                    .filter(|(lw, limit)| *lw == w && count > *limit)
                    .map(|&(window_ms, limit)| Alert {
                        id: alert_id(Rule::Velocity, x.event_id, window_ms),
                        card_id: x.card_id,
                        rule: Rule::Velocity,
                        trigger_event: x.event_id,
                        event_time_ms: x.event_time_ms,
                        details: Details::Velocity {
                            window_ms,
                            count,
                            limit,
                        },
                    })
                    .collect::<Vec<_>>()
            })
    }
}
