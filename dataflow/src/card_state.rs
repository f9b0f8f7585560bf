//! One card's recent transactions, oldest first, and the window aggregates computed from them.
//!
//! A card's transactions within the longest window live in one sequence
//! ordered by time (the first two inline in the card's state, more in a
//! deque, see [`Entries`]); each window is a suffix of it. Aggregates are
//! computed by one backward pass over the deque when the card changes, which
//! for real cards (a handful to a few dozen transactions a day) touches a few
//! cache lines, where per-window hash maps and trees touched a dozen scattered
//! allocations per event. A distinct-count set switches from a scan to a hash
//! set past a few dozen values, so a card with thousands of transactions costs
//! linear, not quadratic, time per pass.

use std::collections::{HashSet, VecDeque};

use crate::event::{Time, Transaction};
use crate::fxhash::FxHasher;
pub use crate::output::MAX_STAT_WINDOWS;
use crate::output::{CardStats, WindowStats};

/// What the card keeps of one transaction.
///
/// Its timely time (the event time rounded up to the tick) is not kept: a
/// window's test on it is a test on the event time (see [`At::earliest_in`]),
/// and without it an entry is 48 bytes instead of 56, fewer cache lines for
/// every scan of a card.
#[derive(Clone, Copy, Debug, Default)]
pub struct Entry {
    /// Event time, ms.
    pub event_time_ms: Time,
    /// Event id.
    pub event_id: u64,
    /// Amount, minor units.
    pub amount: i64,
    /// Merchant id.
    pub merchant: u64,
    /// Country code as a number.
    pub country: u16,
    /// Latitude, micro-degrees.
    pub lat_e6: i32,
    /// Longitude, micro-degrees.
    pub lon_e6: i32,
}

impl Entry {
    /// The entry for `x`.
    pub fn of(x: &Transaction) -> Self {
        Entry {
            event_time_ms: x.event_time_ms,
            event_id: x.event_id,
            amount: x.amount_minor,
            merchant: x.merchant_id,
            country: u16::from_be_bytes(x.country),
            lat_e6: x.lat_e6,
            lon_e6: x.lon_e6,
        }
    }
}

/// A time `t` of the window operator, and the tick event times are rounded
/// up to (a transaction's timely time `tau`).
#[derive(Clone, Copy, Debug)]
pub struct At {
    /// The time.
    pub t: Time,
    /// The tick (0 counts as 1).
    pub tick: Time,
}

impl At {
    /// The earliest event time whose `tau` is within a window of length `w`
    /// at `t` (`tau + w > t`). For `t >= w`, with `m` the largest multiple of
    /// the tick at most `t - w`: `tau > t - w` iff `tau > m` (no multiple of
    /// the tick lies in between) iff `event_time > m`.
    #[inline]
    pub fn earliest_in(self, w: Time) -> Time {
        match self.t.checked_sub(w) {
            None => 0,
            // The usual tick, 1 ms, without a division (a scan asks once per window).
            Some(c) if self.tick <= 1 => c.saturating_add(1),
            Some(c) => (c / self.tick * self.tick).saturating_add(1),
        }
    }

    /// The timely time `tau` of an event time.
    #[inline]
    fn tau(self, event_time_ms: Time) -> Time {
        crate::config::round_up_to_tick(event_time_ms, self.tick)
    }
}

/// How many of a card's transactions its state holds inline.
const INLINE: usize = 2;

/// A card's transactions within the longest window, in ascending timely time: the
/// first [`INLINE`] in the card's own state, more in a deque of their own.
///
/// Most cards hold one or two (a card pays a few times a day), and a
/// departure visits each card once per window: with every card's
/// transactions in a heap deque, each visit was a second cache miss after
/// the card's state, and each new card an allocation (together a fifth of
/// the workers' time in a bulk load).
#[derive(Clone, Debug)]
pub enum Entries {
    /// Up to [`INLINE`], the first `len` of `items`.
    Inline {
        /// How many of `items` are held.
        len: u8,
        /// The transactions, oldest first.
        items: [Entry; INLINE],
    },
    /// More than ever fitted inline (it stays a deque until the card goes).
    Spilled(VecDeque<Entry>),
}

impl Default for Entries {
    fn default() -> Self {
        Entries::Inline { len: 0, items: [Entry::default(); INLINE] }
    }
}

impl Entries {
    /// How many.
    pub fn len(&self) -> usize {
        match self {
            Entries::Inline { len, .. } => *len as usize,
            Entries::Spilled(d) => d.len(),
        }
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The oldest.
    pub fn front(&self) -> Option<&Entry> {
        match self {
            Entries::Inline { len, items } => items[..*len as usize].first(),
            Entries::Spilled(d) => d.front(),
        }
    }

    /// Prefetch the first `max_lines` cache lines of the transactions held
    /// out of line (inline ones come with the card's state).
    #[inline]
    pub fn prefetch(&self, max_lines: usize) {
        if let Entries::Spilled(d) = self {
            crate::prefetch::prefetch(d.as_slices().0, max_lines);
        }
    }

    /// Prefetch what an arrival reads and writes of the transactions held
    /// out of line: the newest, up to `max_lines` cache lines (a scan reads
    /// them newest first), and the slot [`Entries::push_back`] fills next.
    #[inline]
    pub fn prefetch_newest(&self, max_lines: usize) {
        if let Entries::Spilled(d) = self {
            let (older, newer) = d.as_slices();
            let newest = if newer.is_empty() { older } else { newer };
            crate::prefetch::prefetch_after(newest);
            crate::prefetch::prefetch_tail(newer, max_lines);
            let left = max_lines
                .saturating_sub(std::mem::size_of_val(newer).div_ceil(crate::prefetch::LINE));
            crate::prefetch::prefetch_tail(older, left);
        }
    }

    /// Add `e`, at or after every one held.
    pub fn push_back(&mut self, e: Entry) {
        match self {
            Entries::Inline { len, items } if (*len as usize) < INLINE => {
                items[*len as usize] = e;
                *len += 1;
            }
            Entries::Inline { len, items } => {
                let mut d = VecDeque::with_capacity(2 * INLINE + 2);
                d.extend(&items[..*len as usize]);
                d.push_back(e);
                *self = Entries::Spilled(d);
            }
            Entries::Spilled(d) => d.push_back(e),
        }
    }

    /// Drop the oldest.
    pub fn pop_front(&mut self) {
        match self {
            Entries::Inline { len, items } => {
                if *len > 0 {
                    items.copy_within(1..*len as usize, 0);
                    *len -= 1;
                }
            }
            Entries::Spilled(d) => {
                d.pop_front();
            }
        }
    }

    /// Newest first.
    pub fn iter_rev(&self) -> impl Iterator<Item = &Entry> + '_ {
        let (older, newer) = match self {
            Entries::Inline { len, items } => (&items[..*len as usize], &[][..]),
            Entries::Spilled(d) => d.as_slices(),
        };
        newer.iter().rev().chain(older.iter().rev())
    }
}

/// One window's aggregates at one time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Agg {
    /// Transactions in the window.
    pub count: u64,
    /// Their total amount.
    pub sum: i64,
    /// The largest amount (0 when empty).
    pub max_amount: i64,
    /// Distinct merchants.
    pub distinct_merchants: u64,
    /// Distinct countries.
    pub distinct_countries: u64,
}

impl Agg {
    /// As the statistics row, `None` for an empty window.
    pub fn stats(&self) -> Option<WindowStats> {
        (self.count > 0).then_some(WindowStats {
            count: self.count as i64,
            sum: self.sum,
            max_amount: self.max_amount,
            distinct_merchants: self.distinct_merchants as i64,
            distinct_countries: self.distinct_countries as i64,
        })
    }
}

/// A set of distinct values that scans while small and hashes once large.
#[derive(Default)]
struct Distinct {
    small: Vec<u64>,
    large: HashSet<u64, std::hash::BuildHasherDefault<FxHasher>>,
}

impl Distinct {
    const SCAN_LIMIT: usize = 32;

    fn clear(&mut self) {
        self.small.clear();
        if !self.large.is_empty() {
            self.large = HashSet::default();
        }
    }

    fn insert(&mut self, v: u64) {
        if !self.large.is_empty() {
            self.large.insert(v);
        } else if !self.small.contains(&v) {
            self.small.push(v);
            if self.small.len() > Self::SCAN_LIMIT {
                self.large.extend(self.small.drain(..));
            }
        }
    }

    fn len(&self) -> u64 {
        (self.small.len() + self.large.len()) as u64
    }
}

/// Reusable buffers for [`CardState::scan`], one per operator.
#[derive(Default)]
pub struct Scratch {
    merchants: Distinct,
    countries: Distinct,
    small_merchants: Distinct,
}

/// Everything the computation keeps about one card.
///
/// `repr(C)` keeps the fields every visit reads (arrival bookkeeping, the
/// oldest transaction's time) together in the first cache line; the other
/// transactions and the emitted record follow.
#[derive(Clone, Debug, Default)]
#[repr(C)]
pub struct CardState {
    /// The last time transactions of the card arrived.
    pub touched_at: Option<Time>,
    /// Where those arrivals sit in that time's (card-sorted) arrival list.
    pub arrivals: std::ops::Range<usize>,
    /// Transactions within the longest window, in ascending `tau`.
    pub entries: Entries,
    /// The record last emitted, every statistics window listed (empty ones
    /// with a count of 0); emitted again, as it is, when a window changes.
    /// Inline (a separate allocation was a cache miss on every card visit)
    /// and packed (136 bytes, where a row per window took 192).
    pub emitted: CardStats,
}

impl CardState {
    /// A card with nothing in its windows.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drop entries that have left every window at `at` (`tau + longest <= t`);
    /// how many.
    pub fn trim(&mut self, at: At, longest: Time) -> usize {
        let before = self.entries.len();
        let earliest = at.earliest_in(longest);
        while self.entries.front().is_some_and(|e| e.event_time_ms < earliest) {
            self.entries.pop_front();
        }
        before - self.entries.len()
    }

    /// The aggregates at time `t` of each window in `lengths` (ascending), and
    /// the distinct merchants among transactions below `small_amount` within
    /// `small_window`, in one backward pass.
    pub fn scan(
        &self,
        at: At,
        lengths: &[Time],
        small_amount: i64,
        small_window: Time,
        scratch: &mut Scratch,
        out: &mut Vec<Agg>,
    ) -> u64 {
        out.clear();
        scratch.merchants.clear();
        scratch.countries.clear();
        scratch.small_merchants.clear();
        let mut acc = Agg::default();
        let mut i = 0;
        // The earliest event time within `lengths[i]`, and within the small window.
        let mut earliest = lengths.first().map_or(0, |&w| at.earliest_in(w));
        let earliest_small = at.earliest_in(small_window);
        for e in self.entries.iter_rev() {
            while i < lengths.len() && e.event_time_ms < earliest {
                out.push(acc);
                i += 1;
                earliest = lengths.get(i).map_or(0, |&w| at.earliest_in(w));
            }
            if i == lengths.len() && e.event_time_ms < earliest_small {
                break;
            }
            if i < lengths.len() {
                acc.count += 1;
                acc.sum += e.amount;
                acc.max_amount = acc.max_amount.max(e.amount);
                scratch.merchants.insert(e.merchant);
                scratch.countries.insert(e.country as u64);
                acc.distinct_merchants = scratch.merchants.len();
                acc.distinct_countries = scratch.countries.len();
            }
            if e.amount < small_amount && e.event_time_ms >= earliest_small {
                scratch.small_merchants.insert(e.merchant);
            }
        }
        while out.len() < lengths.len() {
            out.push(acc);
        }
        scratch.small_merchants.len()
    }

    /// The card's previous transaction before `(event_time_ms, event_id)`
    /// within `lookback` at `at`: the largest `(event_time_ms, event_id)` below it.
    pub fn previous(
        &self,
        at: At,
        event_time_ms: Time,
        event_id: u64,
        lookback: Time,
    ) -> Option<&Entry> {
        let before = (event_time_ms, event_id);
        let earliest = at.earliest_in(lookback);
        let mut best: Option<&Entry> = None;
        for e in self.entries.iter_rev() {
            if e.event_time_ms < earliest {
                break;
            }
            // Entries of an earlier tau than the best so far have smaller event
            // times (tau is monotone in event time): none of them can beat it.
            if best.is_some_and(|b| at.tau(e.event_time_ms) < at.tau(b.event_time_ms)) {
                break;
            }
            let key = (e.event_time_ms, e.event_id);
            if key < before && best.is_none_or(|b| key > (b.event_time_ms, b.event_id)) {
                best = Some(e);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a scan reads per transaction: 48 bytes (the timely time is not kept).
    #[test]
    fn an_entry_is_48_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 48);
    }

    /// Pushed and popped in a seeded random order, through the inline slots
    /// and past them: always what a plain deque given the same holds.
    #[test]
    fn entries_hold_what_a_deque_holds_inline_and_spilled() {
        let mut next = crate::seeded(0x9E37_79B9_7F4A_7C15);
        for _ in 0..200 {
            let (mut entries, mut model) = (Entries::default(), VecDeque::new());
            let mut time = 0;
            for _ in 0..next(20) {
                if next(3) == 0 {
                    entries.pop_front();
                    model.pop_front();
                } else {
                    time += next(5);
                    let e =
                        Entry { event_time_ms: time, event_id: next(u64::MAX), ..Entry::default() };
                    entries.push_back(e);
                    model.push_back(e);
                }
                let held: Vec<(Time, u64)> =
                    entries.iter_rev().map(|e| (e.event_time_ms, e.event_id)).collect();
                let want: Vec<(Time, u64)> =
                    model.iter().rev().map(|e| (e.event_time_ms, e.event_id)).collect();
                assert_eq!(held, want);
                assert_eq!(entries.len(), model.len());
                assert_eq!(entries.front().map(|e| e.event_id), model.front().map(|e| e.event_id));
            }
        }
    }
}
