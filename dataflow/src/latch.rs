//! Point events out of windowed state: keep each record only at the time it names.
//!
//! A rule judges an event against the state at the event's own time; the
//! condition it computes may stay true, change or vanish later as windows
//! slide. An alert, though, is a fact about that one moment. `latch` turns a
//! consolidated condition collection into the monotone alert collection: it
//! passes an insertion only at the time its record names (the trigger's time)
//! and drops everything else (later retractions, re-derivations).
//!
//! Its input must be consolidated (one net update per record and time), or an
//! intermediate `+1 -1` pair at one time would leak; `latch` consolidates itself.

use differential_dataflow::{Data, ExchangeData, Hashable, VecCollection};

use crate::event::{Diff, Time};

/// Extension trait: keep only insertions at the time each record names.
pub trait Latch<'s, D> {
    /// `time_of(d)` is the time at which `d` holds; only `+` updates at that time pass.
    fn latch(self, time_of: impl Fn(&D) -> Time + 'static) -> VecCollection<'s, Time, D, Diff>;
}

impl<'s, D: ExchangeData + Hashable + Data> Latch<'s, D> for VecCollection<'s, Time, D, Diff> {
    fn latch(self, time_of: impl Fn(&D) -> Time + 'static) -> VecCollection<'s, Time, D, Diff> {
        use differential_dataflow::AsCollection;
        use timely::dataflow::operators::vec::{Filter, Map};
        self.consolidate()
            .inner
            .filter(move |(d, t, r)| *r > 0 && *t == time_of(d))
            .map_in_place(|(_, _, r)| *r = 1)
            .as_collection()
    }
}
