//! The fraud rules, one per file, each a pure function of a judged event.
//!
//! [`crate::card_windows`] hands every accepted event over once, at its own
//! time, with its card's window state at that time ([`Judged`]); a rule is
//! then a pure function of that record. Alerts are therefore facts about one
//! moment: the alert collection only grows, each alert at its trigger's time.
//!
//! [`Rules`] applies every rule of a config to each judged event in one
//! operator ([`Judge::alerts`]). One operator per rule, as before, cost a copy
//! of every judged event per rule (timely clones a stream for each reader
//! but the last) and five operators' scheduling per batch.

pub mod amount_spike;
pub mod card_testing;
pub mod country_hopping;
pub mod impossible_travel;
pub mod velocity;

use differential_dataflow::VecCollection;

use crate::card_windows::Judged;
use crate::config::FraudConfig;
use crate::event::{Diff, Time};
use crate::output::{alert_id, Alert, Details, Rule};

/// The alert `rule` raises on the judged event.
pub(crate) fn alert(j: &Judged, rule: Rule, variant: u64, details: Details) -> Alert {
    Alert {
        id: alert_id(rule, j.event.card_id, j.event.event_id, variant),
        card_id: j.event.card_id,
        rule,
        trigger_event: j.event.event_id,
        event_time_ms: j.event.event_time_ms,
        details,
    }
}

/// Every rule of a config.
#[derive(Clone, Debug)]
pub struct Rules {
    config: FraudConfig,
}

impl Rules {
    /// The rules with `config`'s thresholds.
    pub fn new(config: &FraudConfig) -> Self {
        Rules { config: config.clone() }
    }

    /// The alerts every rule raises on `j`, onto `out`.
    pub fn judge(&self, j: &Judged, out: &mut Vec<Alert>) {
        let c = &self.config;
        velocity::check(&c.velocity, j, out);
        amount_spike::check(&c.amount_spike, j, out);
        country_hopping::check(&c.country_hopping, j, out);
        card_testing::check(&c.card_testing, j, out);
        impossible_travel::check(&c.travel, j, out);
    }
}

/// Extension trait: the alerts of a collection of judged events.
pub trait Judge<'s> {
    /// Every alert `rules` raise, each at its trigger's time.
    fn alerts(self, rules: Rules) -> VecCollection<'s, Time, Alert, Diff>;
}

impl<'s> Judge<'s> for VecCollection<'s, Time, Judged, Diff> {
    fn alerts(self, rules: Rules) -> VecCollection<'s, Time, Alert, Diff> {
        self.flat_map(move |j| {
            let mut out = Vec::new();
            rules.judge(&j, &mut out);
            out
        })
    }
}
