//! Coalescing a catch-up's statistics changes: what the window operator and
//! the commit operator of one worker agree on.
//!
//! While results are being caught up on (the commit operator finds them more
//! than a minute behind the wall clock, so it commits at its catch-up
//! interval), the window operator opens an *epoch*. A card whose statistics
//! change within it is only marked: the time of its last change, and whether
//! it had statistics before its first. When the epoch closes, each marked
//! card's record is emitted once, at its last change. Without this, a bulk
//! load emitted about three changes per event (the arrival, and a departure
//! from each short window), each a copy of the card's whole record, and the
//! commit operator held, sorted and dropped all but the last of each card's
//! per batch.
//!
//! What keeps batches exact:
//!
//! - While an epoch is open, the window operator holds its statistics output
//!   at the epoch's start, so no batch reaches into it.
//! - A closed epoch's changes stand for the card's state at the epoch's last
//!   change: a batch must end at or before the epoch's start, or after its
//!   last change. [`Coalesce::cut`] moves any other cut down to the start.
//! - No epoch opens below [`Coalesce::enable`]'s `from` (the highest of the
//!   stores' resume points): a change coalesced across a store's resume point
//!   would misstate whether the card had statistics there.
//!
//! An epoch closes when the commit operator has a batch due and the epoch is
//! what holds its frontier ([`Coalesce::request`]), when results are no
//! longer behind, once the window operator's input has ended and everything
//! due before its end is done, and in any case once it has been open for the
//! longest commit interval (so that nothing the commit operator misses can
//! hold results back). In real time no epoch opens and nothing changes.
//!
//! Both operators run on the same worker thread; each worker has its own.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use timely::scheduling::Activator;

use crate::event::Time;

/// One worker's coalescing state, shared by its window and commit operators.
#[derive(Default)]
pub struct Coalesce(RefCell<Inner>);

#[derive(Default)]
struct Inner {
    /// Set once by the commit operator: epochs open at or after `from`.
    from: Option<Time>,
    /// The commit operator, woken when an epoch opens or closes.
    committer: Option<Activator>,
    /// The window operator, woken when its epoch should close.
    window: Option<Activator>,
    /// The longest an epoch stays open.
    longest: Duration,
    /// Results are being caught up on, as the commit operator last saw them.
    behind: bool,
    /// The commit operator has asked for the open epoch to close.
    wanted: bool,
    /// The open epoch's start, and when it opened.
    open: Option<(Time, Instant)>,
    /// Closed epochs some store may still cut through: `(start, one past
    /// the last change)`, ascending.
    closed: VecDeque<(Time, Time)>,
    /// Changes not emitted, for metrics.
    folded: u64,
}

impl Coalesce {
    /// Coalescing, not yet enabled (no commit operator reads its output yet).
    pub fn new() -> Self {
        Self::default()
    }

    // The commit operator's side.

    /// Enable coalescing from `from` on; `committer` wakes the commit
    /// operator, and no epoch stays open longer than `longest`.
    ///
    /// Panics if called twice: one commit operator reads one window operator.
    pub fn enable(&self, from: Time, committer: Activator, longest: Duration) {
        let mut s = self.0.borrow_mut();
        assert!(s.from.is_none(), "coalescing enabled twice");
        s.from = Some(from);
        s.committer = Some(committer);
        s.longest = longest;
    }

    /// Whether results are being caught up on.
    pub fn catching_up(&self, behind: bool) {
        let mut s = self.0.borrow_mut();
        let was = std::mem::replace(&mut s.behind, behind);
        if was && !behind && s.open.is_some() {
            // The window operator closes its epoch once it knows.
            if let Some(w) = s.window.as_ref() {
                w.activate();
            }
        }
    }

    /// Whether an epoch is open.
    pub fn is_open(&self) -> bool {
        self.0.borrow().open.is_some()
    }

    /// A batch is due and the statistics' frontier is at `frontier`: close
    /// the open epoch (at the window operator's next activation) if it is
    /// what holds the frontier there, at its start.
    ///
    /// Frontiers are every worker's, epochs each worker's own. When another
    /// worker's epoch holds the frontier lower, closing this one frees
    /// nothing: a batch cut inside the epoch just closed waits for that other
    /// epoch all the same. Closing it anyway cut every epoch of the waiting
    /// worker short, at each of its activations (a 10M-event bulk load:
    /// hundreds of epochs of a few hundred cards each, four million changes
    /// uncoalesced for ten seconds). Whoever holds the frontier lowest closes
    /// when its own batch is due, and the epoch's time limit bounds the wait.
    pub fn request(&self, frontier: Time) {
        let mut s = self.0.borrow_mut();
        if s.open.is_some_and(|(start, _)| frontier >= start) && !s.wanted {
            s.wanted = true;
            if let Some(w) = s.window.as_ref() {
                w.activate();
            }
        }
    }

    /// Where a batch may end, at most `frontier`: not strictly inside a closed epoch.
    pub fn cut(&self, frontier: Time) -> Time {
        let s = self.0.borrow();
        let mut cut = frontier;
        // Epochs are disjoint and ascending: at most one holds the cut.
        for &(start, end) in s.closed.iter().rev() {
            if start < cut && cut < end {
                cut = start;
            }
        }
        cut
    }

    /// Every store has been sent everything below `below`: epochs ending
    /// there can no longer be cut through.
    pub fn forget(&self, below: Time) {
        let mut s = self.0.borrow_mut();
        while s.closed.front().is_some_and(|&(_, end)| end <= below) {
            s.closed.pop_front();
        }
    }

    /// Changes that were folded into a later one and not emitted, so far.
    pub fn folded(&self) -> u64 {
        self.0.borrow().folded
    }

    // The window operator's side.

    /// The window operator's activator.
    pub(crate) fn wake_window_with(&self, window: Activator) {
        self.0.borrow_mut().window = Some(window);
    }

    /// Whether an epoch may open at `t`: none is open, coalescing is enabled,
    /// results are behind and `t` is at or past `from`.
    pub(crate) fn may_open(&self, t: Time) -> bool {
        let s = self.0.borrow();
        s.open.is_none() && s.behind && s.from.is_some_and(|from| t >= from)
    }

    /// Open an epoch at `t`.
    pub(crate) fn open(&self, t: Time) {
        let mut s = self.0.borrow_mut();
        debug_assert!(s.open.is_none(), "one epoch at a time");
        s.open = Some((t, Instant::now()));
        s.wanted = false;
        if let Some(c) = s.committer.as_ref() {
            c.activate();
        }
        // Closed within `longest` whatever happens downstream.
        if let Some(w) = s.window.as_ref() {
            w.activate_after(s.longest);
        }
    }

    /// Whether the open epoch should close now: asked for, no longer behind,
    /// or open for `longest`.
    pub(crate) fn should_close(&self) -> bool {
        let s = self.0.borrow();
        s.open.is_some_and(|(_, since)| s.wanted || !s.behind || since.elapsed() >= s.longest)
    }

    /// The open epoch closed with its last change at `last` (none: `None`),
    /// having folded `folded` changes.
    pub(crate) fn close(&self, last: Option<Time>, folded: u64) {
        let mut s = self.0.borrow_mut();
        let Some((start, _)) = s.open.take() else { return };
        s.wanted = false;
        s.folded += folded;
        if let Some(last) = last {
            debug_assert!(last >= start);
            debug_assert!(s.closed.back().is_none_or(|&(_, end)| end <= start));
            if last > start {
                s.closed.push_back((start, last + 1));
            }
        }
        if let Some(c) = s.committer.as_ref() {
            c.activate();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(epochs: &[(Time, Time)]) -> Coalesce {
        let c = Coalesce::new();
        c.0.borrow_mut().closed = epochs.iter().copied().collect();
        c
    }

    /// Frontiers are every worker's, epochs each worker's own: a batch due
    /// while another worker's epoch holds the frontier below this one's
    /// start leaves this epoch open; once the frontier is at its start, it closes.
    #[test]
    fn a_due_batch_closes_the_open_epoch_only_where_it_holds_the_frontier() {
        let c = Coalesce::new();
        {
            let mut s = c.0.borrow_mut();
            s.behind = true;
            s.longest = Duration::from_secs(3600);
            s.open = Some((100, Instant::now()));
        }
        assert!(!c.should_close());
        c.request(60);
        assert!(!c.should_close(), "held at 60 by another worker's epoch: this one stays open");
        c.request(100);
        assert!(c.should_close(), "held at its start: it closes");
    }

    #[test]
    fn a_cut_inside_a_closed_epoch_moves_to_its_start_and_others_stand() {
        let c = closed(&[(10, 20), (30, 31), (40, 50)]);
        for (cut, want) in [(5, 5), (10, 10), (11, 10), (19, 10), (20, 20), (25, 25)] {
            assert_eq!(c.cut(cut), want, "cut {cut}");
        }
        for (cut, want) in [(30, 30), (31, 31), (45, 40), (50, 50), (Time::MAX, Time::MAX)] {
            assert_eq!(c.cut(cut), want, "cut {cut}");
        }
        c.forget(20);
        assert_eq!(c.cut(15), 15, "an epoch every store has passed no longer moves cuts");
        assert_eq!(c.cut(45), 40);
    }
}
