//! The fraud rules, one per file, each an extension trait on the collection of judged events.
//!
//! [`crate::card_windows`] hands every accepted event over once, at its own
//! time, with its card's window state at that time ([`Judged`]); a rule is
//! then a pure function of that record. Alerts are therefore facts about one
//! moment: the alert collection only grows, each alert at its trigger's time.

pub mod amount_spike;
pub mod card_testing;
pub mod country_hopping;
pub mod impossible_travel;
pub mod velocity;

pub use amount_spike::AmountSpike;
pub use card_testing::CardTesting;
pub use country_hopping::CountryHopping;
pub use impossible_travel::ImpossibleTravel;
pub use velocity::Velocity;

use crate::card_windows::Judged;
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
