//! The fraud rules, one per file, each an extension trait on the accepted-event collection.
//!
//! A rule judges each event against its card's state at the event's own time.
//! Rules that read shared aggregates join them with [`Probe`], the events
//! arranged by card and present for exactly one tick `[τ, τ + tick)`; the
//! joined result therefore holds each event with the aggregate's value at `τ`.
//! Whatever a rule emits passes through [`crate::latch::Latch`] in
//! [`crate::fraud`], which keeps each alert once, at its trigger's time.

pub mod amount_spike;
pub mod card_testing;
pub mod country_hopping;
pub mod impossible_travel;
pub mod velocity;

use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::{AsCollection, VecCollection};

use crate::event::{Diff, Time, Transaction};

pub use amount_spike::AmountSpike;
pub use card_testing::CardTesting;
pub use country_hopping::CountryHopping;
pub use impossible_travel::ImpossibleTravel;
pub use velocity::Velocity;

/// Events keyed by card, each present during `[τ, τ + tick)` only.
pub type Probe<'s> = Arranged<'s, TraceAgent<ValSpine<u64, Transaction, Time, Diff>>>;

/// Arrange `events` as a [`Probe`]: inserted at their time, retracted one tick later.
pub fn probe<'s>(events: VecCollection<'s, Time, Transaction, Diff>, tick: Time) -> Probe<'s> {
    use timely::dataflow::operators::vec::Map;
    let tick = tick.max(1);
    events
        .inner
        .flat_map(move |(x, t, r)| {
            let retract = (x.clone(), t + tick, -r);
            [(x, t, r), retract]
        })
        .as_collection()
        .map(|x: Transaction| (x.card_id, x))
        .arrange_by_key_named("Probe")
}
