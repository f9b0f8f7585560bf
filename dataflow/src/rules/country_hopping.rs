//! Country hopping: transactions in many countries within a short window.

use differential_dataflow::VecCollection;

use crate::card_windows::Judged;
use crate::config::CountryHoppingConfig;
use crate::event::{Diff, Time};
use crate::output::{Alert, Details, Rule};
use crate::rules::alert;

/// Extension trait: the country-hopping rule.
pub trait CountryHopping<'s> {
    /// Alerts for events whose card has seen at least `min_countries` distinct
    /// countries in the window, the event's own included.
    fn country_hopping(self, config: &CountryHoppingConfig)
        -> VecCollection<'s, Time, Alert, Diff>;
}

impl<'s> CountryHopping<'s> for VecCollection<'s, Time, Judged, Diff> {
    fn country_hopping(
        self,
        config: &CountryHoppingConfig,
    ) -> VecCollection<'s, Time, Alert, Diff> {
        let (window, min) = (config.window_ms, config.min_countries);
        self.flat_map(move |j| {
            let countries = j.window(window)?.distinct_countries;
            (countries >= min)
                .then(|| alert(&j, Rule::CountryHopping, 0, Details::CountryHopping { countries }))
        })
    }
}
