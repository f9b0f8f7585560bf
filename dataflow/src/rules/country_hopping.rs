//! Country hopping: transactions in many countries within a short window.

use differential_dataflow::VecCollection;

use crate::config::CountryHoppingConfig;
use crate::event::{Diff, Time, Transaction};
use crate::output::{alert_id, Alert, Details, Rule};
use crate::rules::Probe;
use crate::stats::Distinct;

/// Extension trait: the country-hopping rule.
pub trait CountryHopping<'s> {
    /// Alerts for events whose card has seen at least `min_countries` distinct
    /// countries in the window; `countries` must cover the window.
    fn country_hopping(
        self,
        probe: &Probe<'s>,
        countries: &Distinct<'s>,
        config: &CountryHoppingConfig,
    ) -> VecCollection<'s, Time, Alert, Diff>;
}

impl<'s> CountryHopping<'s> for VecCollection<'s, Time, Transaction, Diff> {
    fn country_hopping(
        self,
        probe: &Probe<'s>,
        countries: &Distinct<'s>,
        config: &CountryHoppingConfig,
    ) -> VecCollection<'s, Time, Alert, Diff> {
        let (window, min) = (config.window_ms, config.min_countries);
        countries
            .clone()
            .filter(move |((_, w), k)| *w == window && *k as u64 >= min)
            .map(|((card, _), k)| (card, k))
            .join_core(probe.clone(), move |_card, &k, x: &Transaction| {
                Some(Alert {
                    id: alert_id(Rule::CountryHopping, x.event_id, 0),
                    card_id: x.card_id,
                    rule: Rule::CountryHopping,
                    trigger_event: x.event_id,
                    event_time_ms: x.event_time_ms,
                    details: Details::CountryHopping {
                        countries: k as u64,
                    },
                })
            })
    }
}
