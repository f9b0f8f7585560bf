//! Card testing: many small transactions at distinct merchants within minutes.

use differential_dataflow::VecCollection;

use crate::card_windows::Judged;
use crate::config::CardTestingConfig;
use crate::event::{Diff, Time};
use crate::output::{Alert, Details, Rule};
use crate::rules::alert;

/// Extension trait: the card-testing rule.
pub trait CardTesting<'s> {
    /// Alerts for small events whose card's small transactions in the window
    /// span at least `min_merchants` distinct merchants.
    fn card_testing(self, config: &CardTestingConfig) -> VecCollection<'s, Time, Alert, Diff>;
}

impl<'s> CardTesting<'s> for VecCollection<'s, Time, Judged, Diff> {
    fn card_testing(self, config: &CardTestingConfig) -> VecCollection<'s, Time, Alert, Diff> {
        let (small, min) = (config.small_amount_minor, config.min_merchants);
        self.flat_map(move |j| {
            let merchants = j.small_merchants;
            (j.event.amount_minor < small && merchants >= min)
                .then(|| alert(&j, Rule::CardTesting, 0, Details::CardTesting { merchants }))
        })
    }
}
