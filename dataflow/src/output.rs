//! What the fraud computation emits: per-card window statistics and alerts.

use serde::{Deserialize, Serialize};

use crate::event::Time;

/// One statistic of one card over one window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Metric {
    /// Number of transactions.
    Count,
    /// Sum of amounts in minor units.
    Sum,
    /// Largest amount.
    MaxAmount,
    /// Number of distinct merchants.
    DistinctMerchants,
    /// Number of distinct countries.
    DistinctCountries,
}

impl Metric {
    /// All metrics, in column order.
    pub const ALL: [Metric; 5] = [
        Metric::Count,
        Metric::Sum,
        Metric::MaxAmount,
        Metric::DistinctMerchants,
        Metric::DistinctCountries,
    ];
}

/// The key of one statistic: `(card, window length in ms, metric)`; the
/// per-metric view of [`WindowStats`] that the reference model answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StatKey {
    /// Card id.
    pub card_id: u64,
    /// Window length in ms.
    pub window_ms: Time,
    /// Which statistic.
    pub metric: Metric,
}

/// The statistics of one card over one window, all five metrics in one record.
///
/// The statistics collection holds `(CardWindow, WindowStats)`: at any closed
/// time exactly one record for each `(card, window)` whose window is not
/// empty, and nothing for empty windows. Sinks write it as one row.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct WindowStats {
    /// Number of transactions.
    pub count: i64,
    /// Sum of amounts in minor units.
    pub sum: i64,
    /// Largest amount.
    pub max_amount: i64,
    /// Number of distinct merchants.
    pub distinct_merchants: i64,
    /// Number of distinct countries.
    pub distinct_countries: i64,
}

impl WindowStats {
    /// The five metrics as `(Metric, value)` pairs.
    pub fn metrics(&self) -> [(Metric, i64); 5] {
        [
            (Metric::Count, self.count),
            (Metric::Sum, self.sum),
            (Metric::MaxAmount, self.max_amount),
            (Metric::DistinctMerchants, self.distinct_merchants),
            (Metric::DistinctCountries, self.distinct_countries),
        ]
    }
}

/// The key of the statistics collection: a card and a window length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CardWindow {
    /// Card id.
    pub card_id: u64,
    /// Window length in ms.
    pub window_ms: Time,
}

/// The fraud rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Rule {
    /// Too many transactions in a window.
    Velocity,
    /// An amount far above the card's recent average.
    AmountSpike,
    /// Consecutive transactions further apart than a plane flies.
    ImpossibleTravel,
    /// Many small transactions at distinct merchants.
    CardTesting,
    /// Many countries in a short time.
    CountryHopping,
}

impl Rule {
    /// The rule's stable code, part of every alert id.
    pub fn code(self) -> u64 {
        match self {
            Rule::Velocity => 1,
            Rule::AmountSpike => 2,
            Rule::ImpossibleTravel => 3,
            Rule::CardTesting => 4,
            Rule::CountryHopping => 5,
        }
    }

    /// The rule's name as stored in sinks and shown in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Velocity => "velocity",
            Rule::AmountSpike => "amount_spike",
            Rule::ImpossibleTravel => "impossible_travel",
            Rule::CardTesting => "card_testing",
            Rule::CountryHopping => "country_hopping",
        }
    }
}

/// Why a rule fired, in integers so that alerts compare exactly.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Details {
    /// `count` transactions in `window_ms`, more than `limit`.
    Velocity {
        /// Window length.
        window_ms: Time,
        /// Transactions in it, the trigger included.
        count: u64,
        /// The configured limit.
        limit: u64,
    },
    /// `amount` against the other transactions of the window.
    AmountSpike {
        /// The trigger's amount.
        amount: i64,
        /// How many other transactions the window held.
        history_count: u64,
        /// Their total amount.
        history_sum: i64,
    },
    /// The previous transaction `previous_event` was `distance_km` away, `speed_kmh` apart.
    ImpossibleTravel {
        /// The previous transaction of the card.
        previous_event: u64,
        /// Great-circle distance, km, rounded down.
        distance_km: u64,
        /// Implied speed, km/h, rounded down (`u64::MAX` for two places at one instant).
        speed_kmh: u64,
    },
    /// Small transactions at `merchants` distinct merchants within the window.
    CardTesting {
        /// Distinct merchants among the small transactions.
        merchants: u64,
    },
    /// `countries` distinct countries within the window.
    CountryHopping {
        /// Distinct countries.
        countries: u64,
    },
}

/// An alert: a rule fired on a transaction.
///
/// Alerts are facts about one event: the collection of alerts only grows, and
/// each alert enters it at its trigger's (rounded) event time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Alert {
    /// Deterministic id: [`alert_id`] of rule, trigger and variant.
    pub id: u64,
    /// The card.
    pub card_id: u64,
    /// Which rule.
    pub rule: Rule,
    /// The transaction that fired it.
    pub trigger_event: u64,
    /// The trigger's event time (not rounded).
    pub event_time_ms: Time,
    /// Why.
    pub details: Details,
}

/// The id of the alert `rule` raises on `trigger_event` of `card`; `variant`
/// tells apart alerts of one rule on one event (the velocity window's length),
/// else 0. The card is part of it: event ids are unique per card stream, not
/// necessarily across cards.
///
/// A fixed mix (SplitMix64 steps), stable across runs, processes and Rust
/// versions: sinks de-duplicate on it.
pub fn alert_id(rule: Rule, card: u64, trigger_event: u64, variant: u64) -> u64 {
    let mut h = splitmix64(0x5452_4950_5749_5245 ^ rule.code());
    h = splitmix64(h ^ card);
    h = splitmix64(h ^ trigger_event);
    splitmix64(h ^ variant)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
