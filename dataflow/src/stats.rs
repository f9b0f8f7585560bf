//! Per-card window aggregates, each with the cheapest correct differential idiom.
//!
//! | aggregate | idiom | why |
//! |---|---|---|
//! | count, sum | `explode` into a `(count, sum)` difference, `count_total` | an abelian group: the retraction is a negated diff, no per-key recomputation |
//! | distinct merchants, countries | `distinct_total` then `count_total` | presence of `(card, window, value)` is a threshold; counting present keys is a group again |
//! | max amount | `reduce` | not a group: a retracted maximum needs the remaining values |
//!
//! `count_total` and `distinct_total` are the totally-ordered-time operators:
//! event time is a `u64`, so they apply and skip `reduce`'s general machinery.

use differential_dataflow::operators::{CountTotal, ThresholdTotal};
use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};

use crate::event::{Diff, Time, Transaction};
use crate::output::{Metric, StatKey};
use crate::windows::Sliding;

/// What the aggregates need of a transaction; windows hold this, not the whole event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Slim {
    /// Card id.
    pub card_id: u64,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Merchant id.
    pub merchant_id: u64,
    /// Country code.
    pub country: [u8; 2],
}

impl Slim {
    /// The aggregate-relevant part of `x`.
    pub fn of(x: &Transaction) -> Self {
        Slim {
            card_id: x.card_id,
            amount_minor: x.amount_minor,
            merchant_id: x.merchant_id,
            country: x.country,
        }
    }
}

/// `((card, window), (count, sum))` for every non-empty window.
pub type CountSum<'s> = VecCollection<'s, Time, ((u64, Time), (i64, i64)), Diff>;
/// `((card, window), distinct count)` for every non-empty window.
pub type Distinct<'s> = VecCollection<'s, Time, ((u64, Time), i64), Diff>;

/// The aggregates of one set of windows, shared by the statistics output and the rules.
pub struct Aggregates<'s> {
    /// Count and sum per card and window.
    pub count_sum: CountSum<'s>,
    /// Distinct countries per card and window.
    pub countries: Distinct<'s>,
    /// Distinct merchants per card and window.
    pub merchants: Distinct<'s>,
    /// Largest amount per card and window.
    pub max_amount: VecCollection<'s, Time, ((u64, Time), i64), Diff>,
}

impl<'s> Aggregates<'s> {
    /// Aggregates of `events` over each length in `windows` (one sliding operator for all).
    pub fn new(events: VecCollection<'s, Time, Transaction, Diff>, windows: &[Time]) -> Self {
        let win = events.map(|x| Slim::of(&x)).sliding(windows);
        let count_sum = win
            .clone()
            .explode(|(w, s)| Some(((s.card_id, w), (1i64, s.amount_minor))))
            .count_total_core::<Diff>();
        let distinct = |win: VecCollection<'s, Time, (Time, Slim), Diff>,
                        value: fn(&Slim) -> u64| {
            win.map(move |(w, s)| (s.card_id, w, value(&s)))
                .distinct_total_core::<Diff>()
                .map(|(card, w, _)| (card, w))
                .count_total_core::<Diff>()
        };
        let countries = distinct(win.clone(), |s| u16::from_be_bytes(s.country) as u64);
        let merchants = distinct(win.clone(), |s| s.merchant_id);
        let max_amount = win
            .map(|(w, s)| ((s.card_id, w), s.amount_minor))
            .reduce_named("MaxAmount", |_key, input, output| {
                // Values arrive sorted; all have positive multiplicity.
                if let Some((max, _)) = input.last() {
                    output.push((**max, 1 as Diff));
                }
            });
        Aggregates {
            count_sum,
            countries,
            merchants,
            max_amount,
        }
    }

    /// The statistics output for the windows in `windows`: `(StatKey, value)`.
    pub fn statistics(&self, windows: &[Time]) -> VecCollection<'s, Time, (StatKey, i64), Diff> {
        let keep = windows.to_vec();
        let key = |card_id, window_ms, metric| StatKey {
            card_id,
            window_ms,
            metric,
        };
        let count_sum = self.count_sum.clone().flat_map(move |((c, w), (n, s))| {
            [(key(c, w, Metric::Count), n), (key(c, w, Metric::Sum), s)]
        });
        let one = |col: VecCollection<'s, Time, ((u64, Time), i64), Diff>, metric: Metric| {
            col.map(move |((c, w), v)| (key(c, w, metric), v))
        };
        count_sum
            .concat(one(self.max_amount.clone(), Metric::MaxAmount))
            .concat(one(self.merchants.clone(), Metric::DistinctMerchants))
            .concat(one(self.countries.clone(), Metric::DistinctCountries))
            .filter(move |(k, _)| keep.contains(&k.window_ms))
    }
}
