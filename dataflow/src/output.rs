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

/// How many statistics windows a config may have (and a card's record hold).
pub const MAX_STAT_WINDOWS: usize = 6;

/// The statistics of one card over every statistics window, as of one time:
/// what a reader of the card needs, in one record. It lists all the config's
/// statistics windows, ascending by length; an empty one has a count of 0 (a
/// non-empty one never does). Sinks write it as one row, one hash.
///
/// One record per card, not per card and window: an arrival changes every
/// window of its card at once, so the stores write one row where they wrote
/// four, and the dataflow moves one change where it moved four.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct CardStats {
    /// How many of `windows` are in use.
    len: u8,
    /// The windows; unused slots stay at their default, so that derived
    /// equality and order see only the used ones.
    windows: [Packed; MAX_STAT_WINDOWS],
}

/// One window of a card's record, packed: length and counts in 32 bits (32
/// bytes, not 48). Every change of a card moves its record through the
/// dataflow and the sinks, and moving bytes was the workers' largest cost.
/// [`crate::FraudConfig::validate`] keeps statistics windows below 2³² ms
/// (49 days); counts saturate at 2³² - 1, which no card's window can reach
/// (its transactions are held in memory).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
struct Packed {
    sum: i64,
    max_amount: i64,
    window_ms: u32,
    count: u32,
    distinct_merchants: u32,
    distinct_countries: u32,
}

impl Packed {
    fn new(window_ms: Time, s: &WindowStats) -> Self {
        let small = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
        Packed {
            sum: s.sum,
            max_amount: s.max_amount,
            window_ms: u32::try_from(window_ms).unwrap_or(u32::MAX),
            count: small(s.count),
            distinct_merchants: small(s.distinct_merchants),
            distinct_countries: small(s.distinct_countries),
        }
    }

    fn unpack(&self) -> (Time, WindowStats) {
        let stats = WindowStats {
            count: self.count.into(),
            sum: self.sum,
            max_amount: self.max_amount,
            distinct_merchants: self.distinct_merchants.into(),
            distinct_countries: self.distinct_countries.into(),
        };
        (self.window_ms.into(), stats)
    }
}

/// The longest statistics window a card's record can hold, ms (49 days).
pub const MAX_STAT_WINDOW_MS: Time = u32::MAX as Time;

impl CardStats {
    /// A card's record of `windows` (length in ms and statistics, ascending by
    /// length, empty windows with a count of 0). Panics past [`MAX_STAT_WINDOWS`].
    pub fn new(windows: impl IntoIterator<Item = (Time, WindowStats)>) -> Self {
        let mut s = CardStats::default();
        for (window_ms, stats) in windows {
            assert!((s.len as usize) < MAX_STAT_WINDOWS, "at most {MAX_STAT_WINDOWS} windows");
            s.windows[s.len as usize] = Packed::new(window_ms, &stats);
            s.len += 1;
        }
        s
    }

    /// Set the `k`-th window it lists to `stats` (`None`: empty); whether that changed it.
    pub fn set(&mut self, k: usize, stats: Option<&WindowStats>) -> bool {
        let slot = &mut self.windows[..self.len as usize][k];
        let new = Packed::new(slot.window_ms.into(), stats.unwrap_or(&WindowStats::default()));
        let changed = *slot != new;
        *slot = new;
        changed
    }

    /// How many windows it lists.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Every statistics window: length in ms and statistics (empty ones with a count of 0).
    pub fn windows(&self) -> impl Iterator<Item = (Time, WindowStats)> + '_ {
        self.windows[..self.len as usize].iter().map(Packed::unpack)
    }

    /// The non-empty windows.
    pub fn non_empty(&self) -> impl Iterator<Item = (Time, WindowStats)> + '_ {
        self.windows().filter(|(_, s)| s.count > 0)
    }

    /// Whether every window is empty (the card has no statistics).
    pub fn is_empty(&self) -> bool {
        self.windows[..self.len as usize].iter().all(|w| w.count == 0)
    }

    /// The per-metric view of card `card_id`'s non-empty windows, as the reference model answers.
    pub fn stat_keys(&self, card_id: u64) -> impl Iterator<Item = (StatKey, i64)> + '_ {
        self.non_empty().flat_map(move |(window_ms, s)| {
            s.metrics().map(move |(metric, v)| (StatKey { card_id, window_ms, metric }, v))
        })
    }
}

/// A change of one card's statistics, at the time it happens.
///
/// The statistics output is the collection of these changes, a changelog: each
/// enters once (multiplicity 1) at its time and is never retracted, as alerts
/// are a log of facts. A card has at most one change per time, and only where
/// a window of it changes; its statistics at time `t` are those of its latest
/// change at or before `t`, none before its first. Why not the collection of
/// current statistics (a retraction and an insertion per change): sinks want
/// each card's latest value per commit, and the retraction doubled what the
/// dataflow moved for nothing.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct CardChange {
    /// The card's statistics from this time on; every window empty: it has none left.
    pub stats: CardStats,
    /// Whether the card had statistics (a non-empty window) just before.
    pub existed: bool,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FraudConfig, DAY, MINUTE};

    fn stats(count: i64, sum: i64) -> WindowStats {
        WindowStats {
            count,
            sum,
            max_amount: sum,
            distinct_merchants: count,
            distinct_countries: 1,
        }
    }

    #[test]
    fn a_cards_record_gives_back_the_windows_it_was_made_of() {
        let windows = [
            (MINUTE, WindowStats::default()),
            (DAY, stats(3, -(1 << 40))),
            (40 * DAY, stats(1, 7)),
        ];
        let record = CardStats::new(windows);
        assert_eq!(record.len(), 3);
        assert_eq!(record.windows().collect::<Vec<_>>(), windows);
        assert_eq!(record.non_empty().map(|(w, _)| w).collect::<Vec<_>>(), [DAY, 40 * DAY]);
        assert!(!record.is_empty());
        assert_eq!(record.stat_keys(9).count(), 10, "five metrics of two non-empty windows");
        assert!(CardStats::new([(MINUTE, WindowStats::default())]).is_empty());
    }

    #[test]
    fn setting_a_window_keeps_its_length_and_says_whether_it_changed() {
        let mut record = CardStats::new([(MINUTE, WindowStats::default()), (DAY, stats(2, 5))]);
        assert!(record.set(0, Some(&stats(1, 3))), "empty to one transaction");
        assert!(!record.set(0, Some(&stats(1, 3))), "the same again");
        assert!(record.set(1, None), "emptied");
        assert_eq!(
            record.windows().collect::<Vec<_>>(),
            [(MINUTE, stats(1, 3)), (DAY, WindowStats::default())]
        );
        assert!(!record.set(1, None), "empty stays empty");
        assert!(record.set(0, None));
        assert!(record.is_empty());
    }

    #[test]
    fn a_statistics_window_longer_than_a_record_holds_is_refused() {
        let mut config = FraudConfig { windows: vec![MINUTE, 50 * DAY], ..FraudConfig::default() };
        let error = config.validate().unwrap_err();
        assert!(error.contains("49 days"), "{error}");
        config.windows = vec![MINUTE, 49 * DAY];
        assert!(config.validate().is_ok());
    }
}
