//! One card's sliding-window state: incremental aggregates per window, and its recent positions.

use std::collections::BTreeMap;

use crate::fxhash::FxHashMap;

use crate::event::Time;
use crate::output::WindowStats;

/// The aggregates of one window of one card, maintained under insert and remove.
///
/// Count and sum are a group; max and the distinct counts keep a multiset of
/// what is in the window, so that removing any element is exact. The state is
/// exactly the window's contents, so it is bounded by them.
#[derive(Clone, Debug, Default)]
pub struct WindowAgg {
    count: i64,
    sum: i64,
    amounts: BTreeMap<i64, u32>,
    merchants: FxHashMap<u64, u32>,
    countries: Vec<([u8; 2], u32)>,
}

impl WindowAgg {
    /// Add one transaction.
    pub fn insert(&mut self, amount: i64, merchant: u64, country: [u8; 2]) {
        self.count += 1;
        self.sum += amount;
        *self.amounts.entry(amount).or_insert(0) += 1;
        *self.merchants.entry(merchant).or_insert(0) += 1;
        match self.countries.iter_mut().find(|(c, _)| *c == country) {
            Some((_, n)) => *n += 1,
            None => self.countries.push((country, 1)),
        }
    }

    /// Remove one transaction that an earlier `insert` added.
    pub fn remove(&mut self, amount: i64, merchant: u64, country: [u8; 2]) {
        self.count -= 1;
        self.sum -= amount;
        if let std::collections::btree_map::Entry::Occupied(mut e) = self.amounts.entry(amount) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.merchants.entry(merchant) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        if let Some(i) = self.countries.iter().position(|(c, _)| *c == country) {
            self.countries[i].1 -= 1;
            if self.countries[i].1 == 0 {
                self.countries.swap_remove(i);
            }
        }
    }

    /// The window's statistics, `None` when it is empty.
    pub fn stats(&self) -> Option<WindowStats> {
        (self.count > 0).then(|| WindowStats {
            count: self.count,
            sum: self.sum,
            max_amount: self.amounts.last_key_value().map_or(0, |(a, _)| *a),
            distinct_merchants: self.merchants.len() as i64,
            distinct_countries: self.countries.len() as i64,
        })
    }

    /// Number of transactions in the window.
    pub fn count(&self) -> u64 {
        self.count as u64
    }

    /// Sum of their amounts.
    pub fn sum(&self) -> i64 {
        self.sum
    }

    /// Number of distinct merchants.
    pub fn distinct_merchants(&self) -> u64 {
        self.merchants.len() as u64
    }

    /// Number of distinct countries.
    pub fn distinct_countries(&self) -> u64 {
        self.countries.len() as u64
    }

    /// Whether nothing is in the window.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Everything the computation keeps about one card.
#[derive(Clone, Debug, Default)]
pub struct CardState {
    /// One aggregate per window length of the operator, in its order.
    pub windows: Vec<WindowAgg>,
    /// The card-testing window: small transactions only.
    pub small: WindowAgg,
    /// Positions within the travel lookback, by `(event_time_ms, event_id)`.
    pub points: BTreeMap<(Time, u64), (i32, i32)>,
    /// The time whose changes [`CardState::before`] holds the start of.
    pub touched_at: Option<Time>,
    /// Per window, its statistics before the changes at `touched_at`.
    pub before: Vec<Option<WindowStats>>,
}

impl CardState {
    /// A state with `windows` empty windows.
    pub fn new(windows: usize) -> Self {
        CardState {
            windows: vec![WindowAgg::default(); windows],
            before: vec![None; windows],
            ..Default::default()
        }
    }

    /// Remember every window's statistics before the first change at `t`;
    /// returns whether this is that first change.
    pub fn touch(&mut self, t: Time) -> bool {
        if self.touched_at == Some(t) {
            return false;
        }
        self.touched_at = Some(t);
        for (b, w) in self.before.iter_mut().zip(&self.windows) {
            *b = w.stats();
        }
        true
    }

    /// Whether every window is empty, so the card's state can be dropped.
    pub fn is_empty(&self) -> bool {
        self.windows.iter().all(WindowAgg::is_empty)
            && self.small.is_empty()
            && self.points.is_empty()
    }
}
