//! The keyed window operator: per card, applies each closed time's arrivals and
//! departures, emits the changed window statistics and each arrival judged against
//! its card's state at its own time.
//!
//! Why one keyed operator and not one differential operator per aggregate: the
//! aggregates were first built from `explode`/`count_total`, `distinct_total`
//! and `reduce` over arrangements, with rules as joins against a probe of the
//! events. Correct (the same tests pass), but it ran at 28 K events/s on one
//! worker for the default windows: every event is eight window updates (four
//! windows in and out), each going through batching, merging and trace seeks
//! in every aggregate's arrangement, and `reduce` (for the maximum) replays
//! key histories. Here each update is a hash-map or B-tree step on the card's
//! own recent transactions (see [`crate::card_state`]). Departures are wake-ups
//! queued in time order and handled once the frontier reaches them (the
//! design's queue-holding operator), so a bulk catch-up parks nothing in
//! arrangements. The statistics that leave this operator are an ordinary
//! differential collection, consolidated per time.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;

use crate::card_state::{Agg, At, CardState, Entry, Scratch};
use crate::coalesce::Coalesce;
use crate::config::FraudConfig;
use crate::event::{Diff, InputEnd, Time, Transaction};
use crate::open_map::SlotMap;
use crate::output::{CardChange, CardStats, WindowStats};

/// How many distinct window lengths the rules may read.
pub const MAX_RULE_WINDOWS: usize = 4;

/// One window's state at a judged event's time, as the rules read it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct WindowView {
    /// Window length, ms.
    pub window_ms: Time,
    /// Transactions in the window, the judged one included.
    pub count: u64,
    /// Their total amount.
    pub sum: i64,
    /// Distinct countries among them.
    pub distinct_countries: u64,
}

/// The card's previous transaction (by event time, then id), for travel checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Previous {
    /// Its id.
    pub event_id: u64,
    /// Its event time.
    pub event_time_ms: Time,
    /// Latitude, micro-degrees.
    pub lat_e6: i32,
    /// Longitude, micro-degrees.
    pub lon_e6: i32,
}

/// What the rules need of the judged transaction itself; kept small, since
/// every rule gets its own copy of each judged event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Trigger {
    /// Event id.
    pub event_id: u64,
    /// Card id.
    pub card_id: u64,
    /// Event time, ms.
    pub event_time_ms: Time,
    /// Amount, minor units.
    pub amount_minor: i64,
    /// Latitude, micro-degrees.
    pub lat_e6: i32,
    /// Longitude, micro-degrees.
    pub lon_e6: i32,
}

impl Trigger {
    /// The trigger part of `x`.
    pub fn of(x: &Transaction) -> Self {
        Trigger {
            event_id: x.event_id,
            card_id: x.card_id,
            event_time_ms: x.event_time_ms,
            amount_minor: x.amount_minor,
            lat_e6: x.lat_e6,
            lon_e6: x.lon_e6,
        }
    }
}

/// An accepted event with its card's state at the event's time: what every rule judges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Judged {
    /// The event.
    pub event: Trigger,
    /// The windows the rules read (velocity, amount spike, country hopping),
    /// in ascending length; unused slots have `window_ms == 0`. Inline, so that
    /// handing an event to five rules copies it without allocating.
    pub windows: [WindowView; MAX_RULE_WINDOWS],
    /// Distinct merchants among the card's small transactions in the card-testing window.
    pub small_merchants: u64,
    /// The previous transaction within the travel lookback, if any.
    pub previous: Option<Previous>,
}

impl Judged {
    /// The view of the window of length `window_ms`, if the operator keeps it.
    pub fn window(&self, window_ms: Time) -> Option<&WindowView> {
        self.windows.iter().find(|w| w.window_ms == window_ms && window_ms > 0)
    }
}

/// The two outputs of [`card_windows`].
pub struct CardWindows<'s> {
    /// `(card_id, CardChange)`: each card's statistics of every window of the
    /// config, as a changelog (see [`CardChange`]).
    pub stats: VecCollection<'s, Time, (u64, CardChange), Diff>,
    /// Every accepted event once, at its time, with its card's state then.
    pub judged: VecCollection<'s, Time, Judged, Diff>,
    /// How much this worker's operator holds, updated after each activation.
    pub size: Rc<Cell<StateSize>>,
    /// Coalescing of `stats` while results are caught up on, which the
    /// operator committing `stats` enables (see [`crate::coalesce`]).
    pub coalesce: Rc<Coalesce>,
}

/// What the window operator of one worker holds: the measure of its state,
/// for metrics and for tests that state stays bounded by the windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateSize {
    /// Cards with at least one transaction in a window.
    pub cards: usize,
    /// Transactions held, over all cards.
    pub entries: usize,
    /// Arrivals waiting for their time to complete, plus distinct future
    /// times with departures queued.
    pub due: usize,
}

/// Arrivals plus card passes one activation may do before yielding to downstream operators.
const FUEL: usize = 20_000;

/// The cards (by slot) whose transactions leave one window, by time.
///
/// Times are processed in ascending order and a card's transactions arriving
/// at `t` leave window `w` at `t + w`, so each window's departures are
/// scheduled in ascending time: a queue, with no per-time allocation or tree
/// node. (A B-tree entry with its own vectors per time and window cost about
/// 150 bytes per transaction in the day window; a queue entry costs 4, plus
/// 16 per time.)
#[derive(Default)]
struct Departures {
    /// `(time, how many of the next slots leave then)`, ascending time.
    times: VecDeque<(Time, u32)>,
    slots: VecDeque<u32>,
    /// How many of the first `slots` had their state prefetched, and how
    /// many their transactions.
    ahead: usize,
    deep: usize,
}

/// How many departures ahead a card's state is prefetched, and its
/// transactions (read from the state, so once that is in cache).
const PREFETCH_STATES: usize = 8;
const PREFETCH_ENTRIES: usize = 4;
/// Cache lines of a card's state prefetched (all of it: about 300 bytes).
const STATE_LINES: usize = 8;
/// How many departures ahead a mark is prefetched, within an epoch.
const PREFETCH_MARKS: usize = 16;
/// How many marked cards ahead an epoch's close prefetches a card's state,
/// and its transactions (read from the state, so once that is in cache).
const CLOSE_STATES: usize = 8;
const CLOSE_ENTRIES: usize = 4;

impl Departures {
    fn first(&self) -> Option<Time> {
        self.times.front().map(|&(t, _)| t)
    }

    /// `slots` leave at `t`, at or after every time scheduled so far.
    fn push(&mut self, t: Time, slots: &[u32]) {
        match self.times.back_mut() {
            // Only where `t + w` saturates at the end of time.
            Some((last, n)) if *last == t => *n += slots.len() as u32,
            last => {
                debug_assert!(last.is_none_or(|(l, _)| *l < t), "departures in time order");
                self.times.push_back((t, slots.len() as u32));
            }
        }
        self.slots.extend(slots);
    }

    /// The slots leaving at `t`, with `depth`, onto `wake`.
    fn pop_at(&mut self, t: Time, depth: usize, wake: &mut Vec<(u32, usize)>) {
        if self.first() == Some(t) {
            let (_, n) = self.times.pop_front().expect("first");
            wake.extend(self.slots.drain(..n as usize).map(|slot| (slot, depth)));
            self.ahead = self.ahead.saturating_sub(n as usize);
            self.deep = self.deep.saturating_sub(n as usize);
        }
    }

    /// Prefetch what the next departures read: with `marks` (an open
    /// epoch, where a departure from this window only marks its card) their
    /// marks; otherwise the cards' states, and their transactions.
    fn prefetch(&mut self, states: &[(u64, CardState)], marks: Option<&[u64]>) {
        let len = self.slots.len();
        if let Some(marks) = marks {
            while self.ahead < PREFETCH_MARKS.min(len) {
                if let Some(mark) = marks.get(self.slots[self.ahead] as usize) {
                    crate::prefetch::prefetch(mark, 1);
                }
                self.ahead += 1;
            }
            self.deep = self.ahead;
            return;
        }
        while self.deep < PREFETCH_ENTRIES.min(len) {
            if let Some((_, state)) = states.get(self.slots[self.deep] as usize) {
                state.entries.prefetch(4);
            }
            self.deep += 1;
        }
        while self.ahead < PREFETCH_STATES.min(len) {
            if let Some(state) = states.get(self.slots[self.ahead] as usize) {
                crate::prefetch::prefetch(state, STATE_LINES);
            }
            self.ahead += 1;
        }
    }
}

/// Arrivals waiting for their time to complete, in buckets of consecutive
/// times (a calendar queue).
///
/// Catching up, a worker holds minutes of event time here (its partitions
/// are fetched a megabyte at a time, so they run apart), at about one arrival
/// per time. A map from each time to its list cost a node, a list's
/// allocation and its free per event, and a heap of arrivals cost a dozen
/// cache misses per event: together a tenth to a sixth of a worker's time.
/// A bucket is a plain list, sorted once when its first time is taken.
#[derive(Default)]
struct Waiting {
    buckets: BTreeMap<Time, Bucket>,
    /// Emptied buckets' lists, kept for reuse.
    spare: Vec<Vec<(Time, Transaction)>>,
    len: usize,
}

/// One bucket: its arrivals, latest first once `sorted`, and its earliest time.
struct Bucket {
    items: Vec<(Time, Transaction)>,
    sorted: bool,
    first: Time,
}

/// A bucket spans `1 << BUCKET_BITS` ms of time.
const BUCKET_BITS: u32 = 6;
/// Emptied lists kept, and the largest kept.
const SPARE_LISTS: usize = 1024;
const SPARE_CAPACITY: usize = 4096;

impl Waiting {
    fn push(&mut self, t: Time, x: Transaction) {
        let spare = &mut self.spare;
        let b = self.buckets.entry(t >> BUCKET_BITS).or_insert_with(|| Bucket {
            items: spare.pop().unwrap_or_default(),
            sorted: true,
            first: t,
        });
        b.sorted &= b.items.last().is_none_or(|l| l.0 >= t);
        b.first = b.first.min(t);
        b.items.push((t, x));
        self.len += 1;
    }

    /// The earliest time waiting.
    fn first(&self) -> Option<Time> {
        self.buckets.first_key_value().map(|(_, b)| b.first)
    }

    /// Move the arrivals at `t`, the earliest time waiting, into `into`.
    fn take(&mut self, t: Time, into: &mut Vec<Transaction>) {
        let Some(mut e) = self.buckets.first_entry() else { return };
        let b = e.get_mut();
        debug_assert_eq!(b.first, t, "only the earliest time is taken");
        if !b.sorted {
            b.items.sort_unstable_by_key(|(t, _)| Reverse(*t));
            b.sorted = true;
        }
        while let Some((_, x)) = b.items.pop_if(|(u, _)| *u == t) {
            into.push(x);
            self.len -= 1;
        }
        match b.items.last() {
            Some(&(next, _)) => b.first = next,
            None => {
                let items = e.remove().items;
                if items.capacity() <= SPARE_CAPACITY && self.spare.len() < SPARE_LISTS {
                    self.spare.push(items);
                }
            }
        }
    }

    fn clear(&mut self) {
        self.buckets.clear();
        self.len = 0;
    }

    /// The earliest bucket's key and, once it is sorted, its arrivals (the
    /// next one last); none while it is not.
    fn upcoming(&self) -> Option<(Time, &[(Time, Transaction)])> {
        let (&key, b) = self.buckets.first_key_value()?;
        Some((key, if b.sorted { &b.items[..] } else { &[] }))
    }
}

/// Prefetching for the arrivals waiting next, in two steps: the map's place
/// of a card [`PREFETCH_MAP`] arrivals ahead, and, once that is in cache,
/// the state and mark of the card [`PREFETCH_CARDS`] ahead. Only within the
/// earliest bucket, which is sorted when its first time is taken.
#[derive(Default)]
struct ArrivalsAhead {
    /// The bucket these counts are of.
    bucket: Option<Time>,
    /// How many of its next arrivals had their map place prefetched, and
    /// how many their card.
    map: usize,
    cards: usize,
    /// How many had their card's newest transactions prefetched.
    entries: usize,
}

const PREFETCH_MAP: usize = 16;
const PREFETCH_CARDS: usize = 8;
/// How many arrivals ahead a card's newest transactions are prefetched (read
/// from its state, so once that is in cache), and how many cache lines.
const PREFETCH_NEWEST: usize = 4;
const NEWEST_LINES: usize = 10;

impl ArrivalsAhead {
    /// `taken` arrivals have just left `pending`; prefetch for the next
    /// ones, and with `marks` (an open epoch, which marks a changed card)
    /// their marks.
    fn prefetch(&mut self, pending: &Waiting, taken: usize, cards: &Cards, marks: Option<&[u64]>) {
        let Some((key, items)) = pending.upcoming() else { return };
        if self.bucket == Some(key) {
            self.map = self.map.saturating_sub(taken);
            self.cards = self.cards.saturating_sub(taken);
            self.entries = self.entries.saturating_sub(taken);
        } else {
            *self = ArrivalsAhead { bucket: Some(key), ..ArrivalsAhead::default() };
        }
        let next = |k: usize| &items[items.len() - 1 - k].1;
        while self.entries < PREFETCH_NEWEST.min(items.len()) {
            if let Some(slot) = cards.slot_of.get(next(self.entries).card_id) {
                cards.states[slot as usize].1.entries.prefetch_newest(NEWEST_LINES);
            }
            self.entries += 1;
        }
        while self.cards < PREFETCH_CARDS.min(items.len()) {
            if let Some(slot) = cards.slot_of.get(next(self.cards).card_id) {
                crate::prefetch::prefetch(&cards.states[slot as usize], STATE_LINES);
                if let Some(mark) = marks.and_then(|m| m.get(slot as usize)) {
                    crate::prefetch::prefetch(mark, 1);
                }
            }
            self.cards += 1;
        }
        while self.map < PREFETCH_MAP.min(items.len()) {
            cards.slot_of.prefetch(next(self.map).card_id);
            self.map += 1;
        }
    }
}

/// The earliest time with arrivals or departures.
fn next_due(arrivals: &Waiting, departures: &[Departures]) -> Option<Time> {
    arrivals.first().into_iter().chain(departures.iter().filter_map(Departures::first)).min()
}

/// Route by a mix of the card id, so that sequential ids spread over workers.
fn route(card_id: u64) -> u64 {
    let mut z = card_id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 27)
}

/// Card states in a slab: wake-ups name a slot, so a departure costs no hash lookup.
///
/// A slot is freed only when its card's last transaction has left the longest
/// window, which is also the time of the card's last scheduled wake-up, so no
/// pending wake-up ever names a reused slot.
struct Cards {
    slot_of: SlotMap,
    states: Vec<(u64, CardState)>,
    free: Vec<u32>,
    /// A new card's emitted record: every statistics window, all empty.
    empty: CardStats,
}

impl Cards {
    fn new(empty: CardStats) -> Self {
        Cards { slot_of: SlotMap::new(), states: Vec::new(), free: Vec::new(), empty }
    }

    fn slot(&mut self, card_id: u64) -> u32 {
        if let Some(slot) = self.slot_of.get(card_id) {
            return slot;
        }
        let state = (card_id, CardState { emitted: self.empty, ..CardState::new() });
        let slot = match self.free.pop() {
            Some(slot) => {
                self.states[slot as usize] = state;
                slot
            }
            None => {
                self.states.push(state);
                (self.states.len() - 1) as u32
            }
        };
        self.slot_of.insert(card_id, slot);
        slot
    }

    fn release(&mut self, slot: u32) {
        let (card_id, state) = &mut self.states[slot as usize];
        self.slot_of.remove(*card_id);
        *state = CardState::default();
        self.free.push(slot);
    }
}

/// The depth of an arrival's wake-up (every window), above any departure's
/// but the longest window's: the deepest of a card's wake-ups at one time is
/// the one that counts.
const ARRIVAL: usize = usize::MAX - 1;
/// The depth of a departure from the longest window (every window, and the
/// card is trimmed).
const TRIM: usize = usize::MAX;

/// A slot no change of the open epoch has marked.
const UNMARKED: u64 = u64::MAX;
/// In a mark: the card had statistics before its first change in the epoch.
const EXISTED: u64 = 1 << 63;

/// The window operator's side of an open epoch (see [`crate::coalesce`]).
///
/// A card changed within it is marked, not emitted: the time of its last
/// change and whether it had statistics before its first, in a dense array
/// by slot (a few megabytes, where the cards' states are hundreds; still
/// more than the caches hold, so the departure queues and the arrivals
/// prefetch the marks they will set). A card's departure from a window shorter than the
/// longest is then only a mark: it does not visit the card's state at all
/// (a departure always changes the window it leaves, and a card that had a
/// transaction in a statistics window had statistics). Each marked card is
/// visited once when the epoch closes, its windows computed as they stand
/// at the epoch's last time, and emitted at its last change.
#[derive(Default)]
struct Epoch {
    /// The statistics output held at the epoch's start; `Some` iff one is open.
    held: Option<Capability<Time>>,
    /// Per slot, [`UNMARKED`] or the card's last change, with [`EXISTED`].
    marks: Vec<u64>,
    /// The marked slots, in marking order (in slot order once the epoch
    /// closes). A slot may be listed twice (its card went and another took
    /// the slot): its mark is taken once.
    dirty: Vec<u32>,
    /// The last time processed within the epoch.
    processed: Time,
    /// Its last change.
    last: Option<Time>,
    /// Changes marked and not yet emitted.
    changes: u64,
}

/// The state of the `i`-th of the `dirty` slots, if any.
fn state_of<'a>(states: &'a [(u64, CardState)], dirty: &[u32], i: usize) -> Option<&'a CardState> {
    dirty.get(i).and_then(|&s| states.get(s as usize)).map(|(_, state)| state)
}

impl Epoch {
    /// Card `slot` changed at `t`; before its first change in the epoch it
    /// had statistics if `existed` (consulted only if this is its first).
    fn mark(&mut self, slot: u32, t: Time, existed: bool) {
        let i = slot as usize;
        if self.marks.len() <= i {
            self.marks.resize(i + 1, UNMARKED);
        }
        let m = &mut self.marks[i];
        if *m == UNMARKED {
            *m = t | if existed { EXISTED } else { 0 };
            self.dirty.push(slot);
        } else {
            *m = t | (*m & EXISTED);
        }
        self.changes += 1;
        self.last = Some(t);
    }

    /// The mark of a card that goes now (its slot may be reused): its last
    /// change and whether it had statistics before its first.
    fn take(&mut self, slot: u32) -> Option<(Time, bool)> {
        let m = self.marks.get_mut(slot as usize)?;
        let taken = std::mem::replace(m, UNMARKED);
        (taken != UNMARKED).then(|| {
            self.changes -= 1;
            (taken & !EXISTED, taken & EXISTED != 0)
        })
    }

    /// Close the epoch: every marked card's windows as they stand at its
    /// last time, emitted once at its last change.
    fn close(
        &mut self,
        cards: &mut Cards,
        rescan: &mut impl FnMut(&mut CardState, Time),
        coalesce: &Coalesce,
        mut give: impl FnMut((u64, CardChange), Time),
    ) {
        let mut emitted = 0;
        // In slot order, each card's state and transactions asked for a few
        // cards ahead: in marking order every visit waited for main memory
        // twice (a catch-up's epoch marks most of the cards, half a
        // second of a bulk run's last second).
        self.dirty.sort_unstable();
        self.dirty.dedup();
        let dirty = &self.dirty;
        for i in 0..CLOSE_STATES {
            if let Some(state) = state_of(&cards.states, dirty, i) {
                crate::prefetch::prefetch(state, STATE_LINES);
            }
        }
        for i in 0..dirty.len() {
            if let Some(state) = state_of(&cards.states, dirty, i + CLOSE_ENTRIES) {
                state.entries.prefetch(4);
            }
            if let Some(state) = state_of(&cards.states, dirty, i + CLOSE_STATES) {
                crate::prefetch::prefetch(state, STATE_LINES);
            }
            let slot = dirty[i];
            let m = std::mem::replace(&mut self.marks[slot as usize], UNMARKED);
            if m == UNMARKED {
                continue;
            }
            let (card_id, state) = &mut cards.states[slot as usize];
            rescan(state, self.processed);
            let change = CardChange { stats: state.emitted, existed: m & EXISTED != 0 };
            give((*card_id, change), m & !EXISTED);
            emitted += 1;
        }
        self.dirty.clear();
        coalesce.close(self.last.take(), std::mem::take(&mut self.changes) - emitted);
        self.held = None;
    }
}

/// Run the keyed window operator over `events` (each present from its rounded time).
///
/// With `end` (a bounded run), once the input has ended nothing at or after
/// the end is computed: the departures after it (every window closing, most
/// of them the hour and the day) would change only what no sink commits, and
/// in a bulk run spanning half an hour of event time they were two card
/// visits per transaction, where the run before the end made three.
///
/// Panics if `config` fails [`FraudConfig::validate`]; jobs validate it on load.
pub fn card_windows<'s>(
    events: VecCollection<'s, Time, Transaction, Diff>,
    config: &FraudConfig,
    end: Option<InputEnd>,
) -> CardWindows<'s> {
    if let Err(e) = config.validate() {
        panic!("invalid fraud config: {e}");
    }
    let mut lengths: Vec<Time> = config.windows.clone();
    let mut rule_lengths: Vec<Time> = config.velocity.limits.iter().map(|(w, _)| *w).collect();
    rule_lengths.push(config.amount_spike.window_ms);
    rule_lengths.push(config.country_hopping.window_ms);
    rule_lengths.sort_unstable();
    rule_lengths.dedup();
    lengths.extend(&rule_lengths);
    lengths.sort_unstable();
    lengths.dedup();
    // Indexes into `lengths` of the statistics windows and of the rule windows.
    let stat_index: Vec<usize> =
        (0..lengths.len()).filter(|&i| config.windows.contains(&lengths[i])).collect();
    let rule_index: Vec<usize> =
        (0..lengths.len()).filter(|&i| rule_lengths.contains(&lengths[i])).collect();
    let small_amount = config.card_testing.small_amount_minor;
    let small_window = config.card_testing.window_ms;
    let lookback = config.travel.lookback_ms;
    let longest = lengths.iter().copied().chain([small_window, lookback]).max().unwrap_or(0);
    let tick = config.tick_ms;
    // A card wakes when a transaction leaves one of its statistics windows, and
    // when it leaves the longest window (to forget it).
    // With each wake-up goes how many windows (shortest first) it can change,
    // so a departure from the 1-minute window rescans one minute, not a day.
    let mut wakes: Vec<Time> = stat_index.iter().map(|&i| lengths[i]).chain([longest]).collect();
    wakes.sort_unstable();
    wakes.dedup();
    // The longest window's departure trims the card (and may let it go).
    let wakes: Vec<(Time, usize)> = wakes
        .into_iter()
        .map(|w| (w, if w == longest { TRIM } else { lengths.iter().filter(|l| **l <= w).count() }))
        .collect();

    let scope = events.inner.scope();
    let mut builder = OperatorBuilder::new("CardWindows".to_owned(), scope);
    let activator = scope.activator_for(builder.operator_info().address);
    let coalesce = Rc::new(Coalesce::new());
    coalesce.wake_window_with(activator.clone());
    let epochs = coalesce.clone();
    let mut input = builder.new_input(
        events.inner,
        Exchange::new(|(x, _t, _r): &(Transaction, Time, Diff)| route(x.card_id)),
    );
    let (stats_out, stats) = builder.new_output();
    let (judged_out, judged) = builder.new_output();
    let mut stats_out =
        OutputBuilder::<_, timely::container::CapacityContainerBuilder<Vec<_>>>::from(stats_out);
    let mut judged_out =
        OutputBuilder::<_, timely::container::CapacityContainerBuilder<Vec<_>>>::from(judged_out);

    let size = Rc::new(Cell::new(StateSize::default()));
    let gauge = size.clone();
    builder.build(move |_initial| {
        let mut cards = Cards::new(CardStats::new(
            stat_index.iter().map(|&i| (lengths[i], WindowStats::default())),
        ));
        let mut entries: usize = 0;
        let mut arrived: Vec<u32> = Vec::new();
        let mut pending = Waiting::default();
        let mut ahead = ArrivalsAhead::default();
        let mut arrivals: Vec<Transaction> = Vec::new();
        // Per entry of `wakes`, its departures.
        let mut departures: Vec<Departures> = wakes.iter().map(|_| Departures::default()).collect();
        let mut wake: Vec<(u32, usize)> = Vec::new();
        // Capabilities for both outputs at the earliest due time; `None` iff `due` is empty.
        let mut held: Option<[Capability<Time>; 2]> = None;
        // The open epoch, if any.
        let mut epoch = Epoch::default();
        // A card's windows as they stand at a time, into its record.
        let stat_lengths: Vec<Time> = stat_index.iter().map(|&i| lengths[i]).collect();
        let (mut rescan_scratch, mut rescan_aggs) = (Scratch::default(), Vec::new());
        let mut rescan = move |state: &mut CardState, t: Time| {
            state.scan(At { t, tick }, &stat_lengths, 0, 0, &mut rescan_scratch, &mut rescan_aggs);
            for (k, a) in rescan_aggs.iter().enumerate() {
                state.emitted.set(k, a.stats().as_ref());
            }
        };
        let mut scratch = Scratch::default();
        let mut aggs: Vec<Agg> = Vec::new();

        move |frontiers| {
            let mut stats_handle = stats_out.activate();
            let mut judged_handle = judged_out.activate();

            input.for_each(|cap, data| {
                let Some(&least) = cap.least() else { return };
                for (x, t, r) in data.drain(..) {
                    // Accepted events are only ever inserted.
                    debug_assert_eq!(r, 1, "card_windows expects insert-only input");
                    pending.push(t, x);
                }
                if let Some(first) = next_due(&pending, &departures) {
                    if held.as_ref().is_none_or(|h| *h[0].time() > first) {
                        // A new earliest time came with this message, so `first >= least`.
                        debug_assert!(first >= least);
                        held = Some([cap.delayed(&first, 0), cap.delayed(&first, 1)]);
                    }
                }
            });

            // One session per output for this activation, at the earliest
            // time it may emit at (the open epoch's start, else the earliest
            // due time); every update carries its own (later or equal) time.
            let Some(stats_cap) = epoch.held.as_ref().or(held.as_ref().map(|h| &h[0])).cloned()
            else {
                return;
            };
            let mut stats_session = stats_handle.session(&stats_cap);
            // A batch asked for since the last activation is cut before anything else.
            if epoch.held.is_some() && epochs.should_close() {
                epoch.close(&mut cards, &mut rescan, &epochs, |change, t| {
                    stats_session.give((change, t, 1))
                });
            }
            let frontier = frontiers[0].frontier();
            let mut judged_session = held.as_ref().map(|caps| judged_handle.session(&caps[1]));
            // Work done in this activation, in arrivals and card passes. A frontier
            // that jumps far (end of input, catch-up after replay) would otherwise
            // make one activation produce everything at once, and hold all of it
            // in channel buffers before anything downstream runs.
            let mut fuel: usize = FUEL;
            let end_at = end.as_ref().and_then(InputEnd::get);
            let mut ended = end_at.is_some_and(|e| frontier.iter().all(|f| *f >= e));
            while let Some(t) = next_due(&pending, &departures) {
                // Time `t` is complete once no input at or before it can arrive.
                if frontier.iter().any(|f| *f <= t) {
                    break;
                }
                if end_at.is_some_and(|e| t >= e) {
                    // The input has ended before `t`, and nothing from its end
                    // on is wanted: what waits goes, and the outputs close.
                    pending.clear();
                    departures.iter_mut().for_each(|d| *d = Departures::default());
                    ended = true;
                    break;
                }
                if fuel == 0 {
                    activator.activate();
                    break;
                }
                if epoch.held.is_none() && epochs.may_open(t) {
                    epochs.open(t);
                    epoch.held = Some(stats_cap.delayed(&t));
                }
                let coalescing = epoch.held.is_some();
                if coalescing {
                    epoch.processed = t;
                }
                let judged_session = judged_session.as_mut().expect("held while anything is due");
                arrivals.clear();
                if pending.first() == Some(t) {
                    pending.take(t, &mut arrivals);
                }
                let marks = coalescing.then_some(&epoch.marks[..]);
                ahead.prefetch(&pending, arrivals.len(), &cards, marks);
                wake.clear();
                for (d, &(_, depth)) in departures.iter_mut().zip(&wakes) {
                    d.pop_at(t, depth, &mut wake);
                    let marks = (coalescing && depth < ARRIVAL).then_some(&epoch.marks[..]);
                    d.prefetch(&cards.states, marks);
                }

                // Arrivals first, grouped by card; then one pass per changed card.
                arrivals.sort_unstable_by_key(|x| (x.card_id, x.event_time_ms, x.event_id));
                arrived.clear();
                for (n, x) in arrivals.iter().enumerate() {
                    let slot = cards.slot(x.card_id);
                    let state = &mut cards.states[slot as usize].1;
                    state.entries.push_back(Entry::of(x));
                    entries += 1;
                    // Arrivals are sorted by card: each card's are one range.
                    state.arrivals.end = n + 1;
                    if state.touched_at != Some(t) {
                        state.touched_at = Some(t);
                        state.arrivals.start = n;
                        wake.push((slot, ARRIVAL));
                        arrived.push(slot);
                    }
                }
                // Their departures, one queue entry per window for all of them.
                if !arrived.is_empty() {
                    for (d, &(w, _)) in departures.iter_mut().zip(&wakes) {
                        d.push(t.saturating_add(w), &arrived);
                    }
                }
                // One pass per card, as deep as its deepest change.
                wake.sort_unstable_by_key(|&(slot, depth)| (slot, std::cmp::Reverse(depth)));
                wake.dedup_by_key(|(slot, _)| *slot);
                fuel = fuel.saturating_sub(arrivals.len() + wake.len());

                for (slot, depth) in wake.drain(..) {
                    if coalescing && depth < ARRIVAL {
                        // Within an epoch a departure is only a mark.
                        epoch.mark(slot, t, true);
                        continue;
                    }
                    let depth = depth.min(lengths.len());
                    let (card_id, state) = &mut cards.states[slot as usize];
                    let card_id = *card_id;
                    let at = At { t, tick };
                    entries -= state.trim(at, longest);
                    let mine =
                        if state.touched_at == Some(t) { state.arrivals.clone() } else { 0..0 };
                    // Only arrivals are judged, and only they need the card-testing window.
                    let small = if mine.is_empty() { 0 } else { small_window };
                    let small_merchants = state.scan(
                        at,
                        &lengths[..depth],
                        small_amount,
                        small,
                        &mut scratch,
                        &mut aggs,
                    );
                    // One change per card: if any window changed, the card's record after.
                    let existed = !state.emitted.is_empty();
                    let mut changed = false;
                    for (k, &i) in stat_index.iter().enumerate().filter(|(_, &i)| i < depth) {
                        changed |= state.emitted.set(k, aggs[i].stats().as_ref());
                    }
                    if changed && coalescing {
                        // Marked, emitted when the epoch closes.
                        epoch.mark(slot, t, existed);
                    } else if changed {
                        let stats = state.emitted;
                        stats_session.give(((card_id, CardChange { stats, existed }), t, 1));
                    }
                    let mut windows = [WindowView::default(); MAX_RULE_WINDOWS];
                    if !mine.is_empty() {
                        for (view, &i) in windows.iter_mut().zip(&rule_index) {
                            let a = &aggs[i];
                            *view = WindowView {
                                window_ms: lengths[i],
                                count: a.count,
                                sum: a.sum,
                                distinct_countries: a.distinct_countries,
                            };
                        }
                    }
                    for x in &arrivals[mine] {
                        let previous = state
                            .previous(at, x.event_time_ms, x.event_id, lookback)
                            .map(|e| Previous {
                                event_id: e.event_id,
                                event_time_ms: e.event_time_ms,
                                lat_e6: e.lat_e6,
                                lon_e6: e.lon_e6,
                            });
                        let judged =
                            Judged { event: Trigger::of(x), windows, small_merchants, previous };
                        judged_session.give((judged, t, 1));
                    }
                    // State is bounded by the window contents: an empty card goes.
                    // A card marked in the open epoch leaves at once: its slot may be reused.
                    if state.entries.is_empty() {
                        if let Some((at, existed)) = epoch.take(slot) {
                            let change = CardChange { stats: state.emitted, existed };
                            stats_session.give(((card_id, change), at, 1));
                        }
                        cards.release(slot);
                    }
                }
            }
            // The epoch closes when a batch is due, when results are no longer
            // behind, and once the input has ended and everything due before
            // its end is done (nothing more will close it). Not as soon as
            // the input ends: a bulk load's sources finish reading well before
            // the windows have caught up, and closing at every activation
            // from then on cut its last seconds into epochs of a few hundred
            // cards each.
            let drained =
                (frontier.is_empty() || ended) && next_due(&pending, &departures).is_none();
            if epoch.held.is_some() && (epochs.should_close() || drained) {
                epoch.close(&mut cards, &mut rescan, &epochs, |change, t| {
                    stats_session.give((change, t, 1))
                });
            }
            drop(stats_session);
            drop(judged_session);
            match next_due(&pending, &departures) {
                Some(next) => {
                    let caps = held.as_mut().expect("held");
                    caps[0].downgrade(&next);
                    caps[1].downgrade(&next);
                }
                None => held = None,
            }
            gauge.set(StateSize {
                cards: cards.slot_of.len(),
                entries,
                due: pending.len + departures.iter().map(|d| d.times.len()).sum::<usize>(),
            });
        }
    });

    CardWindows { stats: stats.as_collection(), judged: judged.as_collection(), size, coalesce }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Channel;

    fn tx(event_id: u64, event_time_ms: Time) -> Transaction {
        Transaction {
            event_id,
            card_id: event_id % 7,
            account_id: 1,
            merchant_id: 1,
            mcc: 5411,
            amount_minor: 100,
            currency: *b"EUR",
            country: *b"DE",
            lat_e6: 0,
            lon_e6: 0,
            channel: Channel::Pos,
            event_time_ms,
            device_id: None,
        }
    }

    /// Arrivals come out time by time, earliest first, each exactly once,
    /// however they went in: out of order within and across buckets, into a
    /// bucket already sorted and partly taken, at times far apart.
    #[test]
    fn waiting_arrivals_leave_in_time_order_each_once() {
        let mut next = crate::seeded(0x2545_F491_4F6C_DD1D);
        for round in 0..50 {
            let mut waiting = Waiting::default();
            // What a brute-force model holds: every (time, id) not yet taken.
            let mut model: Vec<(Time, u64)> = Vec::new();
            let (mut frontier, mut id) = (1_000 * round, 0u64);
            for _ in 0..200 {
                // Input at or beyond the frontier: near it, or far ahead.
                for _ in 0..next(20) {
                    let t = frontier + if next(10) == 0 { next(100_000) } else { next(300) };
                    waiting.push(t, tx(id, t));
                    model.push((t, id));
                    id += 1;
                }
                // The frontier moves on; every time below it is taken.
                frontier += next(200);
                while let Some(t) = waiting.first().filter(|t| *t < frontier) {
                    let mut out = Vec::new();
                    waiting.take(t, &mut out);
                    let mut got: Vec<(Time, u64)> =
                        out.iter().map(|x| (x.event_time_ms, x.event_id)).collect();
                    got.sort_unstable();
                    model.sort_unstable();
                    let earliest = model[0].0;
                    assert_eq!(t, earliest, "the earliest time waiting comes first");
                    let want: Vec<_> = model.iter().take_while(|(u, _)| *u == t).copied().collect();
                    model.drain(..want.len());
                    assert_eq!(got, want, "every arrival at {t}, once");
                }
                assert_eq!(waiting.len, model.len());
                assert!(model.iter().all(|(t, _)| *t >= frontier));
            }
        }
    }
}
