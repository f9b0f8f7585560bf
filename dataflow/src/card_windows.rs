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
//! own state. Departures are queued in time order and applied once the frontier
//! reaches them (the design's queue-holding operator), so a bulk catch-up parks
//! nothing in arrangements. The statistics that leave this operator are an
//! ordinary differential collection, consolidated per time.

use std::collections::BTreeMap;
use std::rc::Rc;

use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;

use crate::card_state::CardState;
use crate::config::FraudConfig;
use crate::event::{Diff, Time, Transaction};
use crate::fxhash::FxHashMap;
use crate::output::{CardWindow, WindowStats};

/// One window's state at a judged event's time, as the rules read it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WindowView {
    /// Window length, ms.
    pub window_ms: Time,
    /// Transactions in the window, the judged one included.
    pub count: u64,
    /// Their total amount.
    pub sum: i64,
    /// Distinct merchants among them.
    pub distinct_merchants: u64,
    /// Distinct countries among them.
    pub distinct_countries: u64,
}

/// The card's previous transaction (by event time, then id), for travel checks.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

/// An accepted event with its card's state at the event's time: what every rule judges.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Judged {
    /// The event.
    pub event: Transaction,
    /// Every window the operator keeps, in ascending length.
    pub windows: Vec<WindowView>,
    /// Distinct merchants among the card's small transactions in the card-testing window.
    pub small_merchants: u64,
    /// The previous transaction within the travel lookback, if any.
    pub previous: Option<Previous>,
}

impl Judged {
    /// The view of the window of length `window_ms`, if the operator keeps it.
    pub fn window(&self, window_ms: Time) -> Option<&WindowView> {
        self.windows.iter().find(|w| w.window_ms == window_ms)
    }
}

/// The two outputs of [`card_windows`].
pub struct CardWindows<'s> {
    /// `(CardWindow, WindowStats)` for the statistics windows of the config.
    pub stats: VecCollection<'s, Time, (CardWindow, WindowStats), Diff>,
    /// Every accepted event once, at its time, with its card's state then.
    pub judged: VecCollection<'s, Time, Judged, Diff>,
}

/// Which state a batch of departures leaves.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Window(usize),
    Small,
    Point,
}

/// What a departure needs of a transaction that arrived.
#[derive(Clone, Debug)]
struct Leaving {
    card_id: u64,
    amount: i64,
    merchant: u64,
    country: [u8; 2],
    key: (Time, u64),
    small: bool,
}

/// What happens at one time: arrivals, and batches of earlier arrivals leaving
/// a slot. One batch per (arrival time, slot) is shared by reference, so a
/// departure costs one queue entry per time and window, not per event.
#[derive(Default)]
struct Due {
    arrivals: Vec<Transaction>,
    departures: Vec<(Slot, Rc<[Leaving]>)>,
}

/// Route by a mix of the card id, so that sequential ids spread over workers.
fn route(card_id: u64) -> u64 {
    let mut z = card_id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 27)
}

/// Run the keyed window operator over `events` (each present from its rounded time).
pub fn card_windows<'s>(
    events: VecCollection<'s, Time, Transaction, Diff>,
    config: &FraudConfig,
) -> CardWindows<'s> {
    let mut lengths: Vec<Time> = config.windows.clone();
    lengths.extend(config.velocity.limits.iter().map(|(w, _)| *w));
    lengths.push(config.amount_spike.window_ms);
    lengths.push(config.country_hopping.window_ms);
    lengths.sort_unstable();
    lengths.dedup();
    let is_stat: Vec<bool> = lengths.iter().map(|w| config.windows.contains(w)).collect();
    let small_amount = config.card_testing.small_amount_minor;
    let small_window = config.card_testing.window_ms;
    let lookback = config.travel.lookback_ms;

    let mut builder = OperatorBuilder::new("CardWindows".to_owned(), events.inner.scope());
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

    builder.build(move |_initial| {
        let mut cards: FxHashMap<u64, CardState> = FxHashMap::default();
        let mut due: BTreeMap<Time, Due> = BTreeMap::new();
        // Capabilities for both outputs at the earliest due time; `None` iff `due` is empty.
        let mut held: Option<[Capability<Time>; 2]> = None;
        let mut touched: Vec<u64> = Vec::new();

        move |frontiers| {
            let mut stats_handle = stats_out.activate();
            let mut judged_handle = judged_out.activate();

            input.for_each(|cap, data| {
                let Some(&least) = cap.least() else { return };
                for (x, t, r) in data.drain(..) {
                    // Accepted events are only ever inserted.
                    debug_assert_eq!(r, 1, "card_windows expects insert-only input");
                    due.entry(t).or_default().arrivals.push(x);
                }
                if let Some((&first, _)) = due.first_key_value() {
                    if held.as_ref().is_none_or(|h| *h[0].time() > first) {
                        // A new earliest time came with this message, so `first >= least`.
                        debug_assert!(first >= least);
                        held = Some([cap.delayed(&first, 0), cap.delayed(&first, 1)]);
                    }
                }
            });

            let frontier = frontiers[0].frontier();
            while let Some(entry) = due.first_entry() {
                let t = *entry.key();
                // Time `t` is complete once no input at or before it can arrive.
                if frontier.iter().any(|f| *f <= t) {
                    break;
                }
                let Due {
                    arrivals,
                    departures,
                } = entry.remove();
                let caps = held
                    .as_mut()
                    .expect("capabilities held while times are due");
                caps[0].downgrade(&t);
                caps[1].downgrade(&t);

                for (slot, batch) in departures {
                    for d in batch.iter() {
                        let state = cards
                            .get_mut(&d.card_id)
                            .expect("a departing card has state");
                        if state.touch(t) {
                            touched.push(d.card_id);
                        }
                        match slot {
                            Slot::Window(i) => {
                                state.windows[i].remove(d.amount, d.merchant, d.country)
                            }
                            Slot::Small if d.small => {
                                state.small.remove(d.amount, d.merchant, d.country)
                            }
                            Slot::Small => {}
                            Slot::Point => {
                                state.points.remove(&d.key);
                            }
                        }
                    }
                }

                if !arrivals.is_empty() {
                    let leaving: Rc<[Leaving]> = arrivals
                        .iter()
                        .map(|x| Leaving {
                            card_id: x.card_id,
                            amount: x.amount_minor,
                            merchant: x.merchant_id,
                            country: x.country,
                            key: (x.event_time_ms, x.event_id),
                            small: x.amount_minor < small_amount,
                        })
                        .collect();
                    for x in &arrivals {
                        let state = cards
                            .entry(x.card_id)
                            .or_insert_with(|| CardState::new(lengths.len()));
                        if state.touch(t) {
                            touched.push(x.card_id);
                        }
                        for agg in state.windows.iter_mut() {
                            agg.insert(x.amount_minor, x.merchant_id, x.country);
                        }
                        if x.amount_minor < small_amount {
                            state.small.insert(x.amount_minor, x.merchant_id, x.country);
                        }
                        state
                            .points
                            .insert((x.event_time_ms, x.event_id), (x.lat_e6, x.lon_e6));
                    }
                    let mut leave = |at: Time, slot: Slot| {
                        due.entry(t.saturating_add(at))
                            .or_default()
                            .departures
                            .push((slot, leaving.clone()));
                    };
                    for (i, w) in lengths.iter().enumerate() {
                        leave(*w, Slot::Window(i));
                    }
                    if leaving.iter().any(|l| l.small) {
                        leave(small_window, Slot::Small);
                    }
                    leave(lookback, Slot::Point);
                }

                let mut judged_session = judged_handle.session(&caps[1]);
                for x in arrivals {
                    let state = &cards[&x.card_id];
                    let windows = lengths
                        .iter()
                        .zip(&state.windows)
                        .map(|(&window_ms, agg)| WindowView {
                            window_ms,
                            count: agg.count(),
                            sum: agg.sum(),
                            distinct_merchants: agg.distinct_merchants(),
                            distinct_countries: agg.distinct_countries(),
                        })
                        .collect();
                    let previous = state
                        .points
                        .range(..(x.event_time_ms, x.event_id))
                        .next_back()
                        .map(|(&(event_time_ms, event_id), &(lat_e6, lon_e6))| Previous {
                            event_id,
                            event_time_ms,
                            lat_e6,
                            lon_e6,
                        });
                    let small_merchants = state.small.distinct_merchants();
                    judged_session.give((
                        Judged {
                            event: x,
                            windows,
                            small_merchants,
                            previous,
                        },
                        t,
                        1,
                    ));
                }
                drop(judged_session);

                let mut stats_session = stats_handle.session(&caps[0]);
                for card_id in touched.drain(..) {
                    let state = cards.get_mut(&card_id).expect("touched card has state");
                    for (i, agg) in state.windows.iter().enumerate() {
                        let (before, after) = (state.before[i], agg.stats());
                        if !is_stat[i] || before == after {
                            continue;
                        }
                        let key = CardWindow {
                            card_id,
                            window_ms: lengths[i],
                        };
                        if let Some(b) = before {
                            stats_session.give(((key, b), t, -1));
                        }
                        if let Some(a) = after {
                            stats_session.give(((key, a), t, 1));
                        }
                    }
                    // State is bounded by the window contents: an empty card goes.
                    if state.is_empty() {
                        cards.remove(&card_id);
                    }
                }
            }
            match due.first_key_value() {
                Some((&next, _)) => {
                    let caps = held.as_mut().expect("held");
                    caps[0].downgrade(&next);
                    caps[1].downgrade(&next);
                }
                None => held = None,
            }
        }
    });

    CardWindows {
        stats: stats.as_collection(),
        judged: judged.as_collection(),
    }
}
